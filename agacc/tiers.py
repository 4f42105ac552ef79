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


def evicted_runs(tier: torch.Tensor) -> list[tuple[int, int]]:
    """Contiguous runs of evicted blocks in a layer's tier codes [n] as (first_block, last_block):
    one marker entry each."""
    ev = (tier == EVICTED).nonzero().squeeze(1).tolist()
    runs, start = [], None
    for i, b in enumerate(ev):
        if start is None:
            start = b
        if i + 1 == len(ev) or ev[i + 1] != b + 1:
            runs.append((start, b))
            start = None
    return runs


def count_evicted_runs(tier: torch.Tensor) -> int:
    """How many runs ``evicted_runs`` finds, summed over the rows of tier codes [L, n] (vectorised)."""
    ev = (tier == EVICTED).to(torch.int8)
    if ev.shape[-1] == 0:
        return 0
    return int(((ev[:, 1:] == 1) & (ev[:, :-1] == 0)).sum()) + int(ev[:, 0].sum())
