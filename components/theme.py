"""Colours shared by the plots, the token view and the CSS (one source of truth)."""
from agacc.tiers import NAMES

# tier code -> (name, colour); code -1 = hot (recent window / not yet a whole block, full precision)
TIER_COLORS = {
    -1: ("hot", "#93c5fd"),
    0: ("full", "#1e40af"),
    1: ("int8", "#15803d"),
    2: ("int4", "#84cc16"),
    3: ("int3", "#c3c814"),
    4: ("int2", "#eab308"),
    5: ("pruned", "#f97316"),
    6: ("evicted", "#dc2626"),
}
assert tuple(TIER_COLORS[i][0] for i in range(len(NAMES))) == tuple(NAMES)

TIER_LABELS = {
    -1: "hot (recent, 16-bit)",
    0: "full (16-bit)",
    1: "int8",
    2: "int4",
    3: "int3",
    4: "int2",
    5: "pruned",
    6: "evicted",
}


def tier_name(code: int) -> str:
    return TIER_COLORS.get(int(code), ("?", "#000"))[0]
