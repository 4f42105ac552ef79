"""Colours shared by the plots, the token view and the CSS (one source of truth)."""
from agacc.tiers import FULL, HOT, NAMES

_COLOUR = {"hot": "#93c5fd", "full": "#1e40af", "int8": "#15803d", "int4": "#84cc16", "int3": "#c3c814",
           "int2": "#eab308", "pruned": "#f97316", "evicted": "#dc2626"}

# tier code -> (name, colour); code -1 = hot (recent window / not yet a whole block: 16-bit, or 8 with hot_bits=8)
TIER_COLORS = {HOT: ("hot", _COLOUR["hot"])} | {code: (name, _COLOUR[name]) for code, name in enumerate(NAMES)}

TIER_LABELS = {code: name for code, (name, _) in TIER_COLORS.items()} | {
    HOT: "hot (recent window)", FULL: "full (16-bit)"}
