"""Colours shared by the plots, the token view and the CSS (one source of truth)."""
from agacc.tiers import NAMES

# tier code -> (name, colour); code -1 = hot (recent window / not yet a whole block, full precision)
TIER_COLORS = {
    -1: ("hot", "#93c5fd"),
    0: ("full", "#1e40af"),
    1: ("int8", "#15803d"),
    2: ("int4", "#84cc16"),
    3: ("int2", "#eab308"),
    4: ("pruned", "#f97316"),
    5: ("evicted", "#dc2626"),
}
assert tuple(TIER_COLORS[i][0] for i in range(6)) == tuple(NAMES)

TIER_LABELS = {
    -1: "hot (recent, 16-bit)",
    0: "full (16-bit)",
    1: "int8",
    2: "int4",
    3: "int2",
    4: "pruned",
    5: "evicted",
}


def tier_name(code: int) -> str:
    return TIER_COLORS.get(int(code), ("?", "#000"))[0]
