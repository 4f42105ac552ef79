"""Colours shared by the plots, the token view and the CSS (one source of truth)."""
from agacc.tiers import EVICTED, FULL, HOT, INT2, INT3, INT4, INT8, NAMES, PRUNED

# tier code -> (name, colour); code -1 = hot (recent window / not yet a whole block, full precision)
TIER_COLORS = {
    HOT: ("hot", "#93c5fd"),
    FULL: ("full", "#1e40af"),
    INT8: ("int8", "#15803d"),
    INT4: ("int4", "#84cc16"),
    INT3: ("int3", "#c3c814"),
    INT2: ("int2", "#eab308"),
    PRUNED: ("pruned", "#f97316"),
    EVICTED: ("evicted", "#dc2626"),
}
assert tuple(TIER_COLORS[i][0] for i in range(len(NAMES))) == tuple(NAMES)

TIER_LABELS = {
    HOT: "hot (recent, 16-bit)",
    FULL: "full (16-bit)",
    INT8: "int8",
    INT4: "int4",
    INT3: "int3",
    INT2: "int2",
    PRUNED: "pruned",
    EVICTED: "evicted",
}


def tier_name(code: int) -> str:
    return TIER_COLORS.get(int(code), ("?", "#000"))[0]
