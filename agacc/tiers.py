"""Tier codes, ordered by fidelity (lower code = more fidelity)."""
import torch

FULL, INT8, INT4, INT3, INT2, PRUNED, EVICTED = range(7)
NAMES = ("full", "int8", "int4", "int3", "int2", "pruned", "evicted")
HOT = -1  # not yet tiered: inside the recent window / not a whole block yet (full precision)
CONTAINER_TIER = {8: INT8, 4: INT4, 3: INT3, 2: INT2}
TIER_CONTAINER = {t: c for c, t in CONTAINER_TIER.items()}
# the same maps as lookup tables (index with a long tensor)
TIER_OF_CONTAINER = torch.tensor([CONTAINER_TIER.get(c, -1) for c in range(9)], dtype=torch.int8)  # container bits -> tier, -1: none
CONTAINER_OF_TIER = torch.tensor([TIER_CONTAINER.get(t, 0) for t in range(len(NAMES))], dtype=torch.int8)  # tier -> container bits, 0: none
