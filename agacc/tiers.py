"""Tier codes, ordered by fidelity (lower code = more fidelity)."""
FULL, INT8, INT4, INT3, INT2, PRUNED, EVICTED = range(7)
NAMES = ("full", "int8", "int4", "int3", "int2", "pruned", "evicted")
HOT = -1  # not yet tiered: inside the recent window / not a whole block yet (full precision)
CONTAINER_TIER = {8: INT8, 4: INT4, 3: INT3, 2: INT2}
TIER_CONTAINER = {INT8: 8, INT4: 4, INT3: 3, INT2: 2}
