"""Baseline methods as tier rules of the same compressed store (registered on import).

Every baseline is a preset (``agacc/presets.py``) of the one ``CompressedCache``: the same store,
the same byte accounting (``cache.memory()``), the same ratio fitter. What differs is the rule that
turns normalised block scores into tiers, and the config hooks (scoring, pooling, budgets, sharing).

Rules here follow the registry contract of ``agacc.policy.register_rule``:
``fn(scores [n_blocks], cfg, head_dim, layer, scale) -> (tier int8 [n], bits int8 [n], keep int16 [n])``
and lose fidelity (never gain) as ``scale`` grows, which the ratio fitter relies on.

Token-selection rules (``h2o``, ``recent``, ``topk``) read ``scale`` as a budget divisor: of the n
ready blocks (outside sinks and the recent window, which the cache keeps anyway) they keep
``floor(n / scale)`` at full precision and evict the rest. Kept sets are nested as the budget
shrinks, so bytes fall monotonically with ``scale``.
"""
from __future__ import annotations

import math

import torch

from agacc.policy import register_rule
from agacc.quant import container_bits
from agacc.tiers import CONTAINER_TIER, EVICTED, FULL

__all__ = ["uniform_rule", "keep_rule", "h2o_rule", "recent_rule", "topk_rule", "kept_blocks",
           "select_h2o", "select_recent", "select_topk", "KV_DISTILL_AVAILABLE"]

# KV-Distill (Chari et al., 2025, arXiv:2503.10337) trains an adaptor (LoRA-style) that distils the
# context KV into a shorter sequence. It needs a training run with a distillation objective over a
# corpus; that cannot be done honestly on this CPU in reasonable time, so it is not available.
KV_DISTILL_AVAILABLE = False


def _out(n: int, head_dim: int):
    return (torch.full((n,), FULL, dtype=torch.int8), torch.full((n,), 16, dtype=torch.int8),
            torch.full((n,), head_dim, dtype=torch.int16))


def kept_blocks(n: int, scale: float) -> int:
    """Blocks a token-selection rule keeps out of ``n`` at budget divisor ``scale`` (>= 0, <= n)."""
    if n == 0:
        return 0
    if scale <= 1.0:
        return n
    return max(0, min(n, math.floor(n / scale + 1e-9)))


def select_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` highest-scoring blocks (ties: the later block wins, as the recent one)."""
    n = scores.numel()
    keep = torch.zeros(n, dtype=torch.bool)
    if k <= 0 or n == 0:
        return keep
    s = scores.float().cpu()
    # stable descending sort of the reversed scores: equal scores prefer the more recent block
    order = (n - 1) - torch.argsort(s.flip(0), descending=True, stable=True)
    keep[order[:k]] = True
    return keep


def select_recent(n: int, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` most recent of ``n`` blocks."""
    keep = torch.zeros(n, dtype=torch.bool)
    if k > 0:
        keep[max(0, n - k):] = True
    return keep


def select_h2o(scores: torch.Tensor, k: int) -> torch.Tensor:
    """H2O: half of the budget to the most recent blocks, the other half to the heavy hitters
    (highest accumulated attention) among the rest."""
    n = scores.numel()
    k_recent = k // 2
    keep = select_recent(n, k_recent)
    rest = (~keep).nonzero().squeeze(1)
    k_heavy = k - k_recent
    if k_heavy > 0 and rest.numel():
        heavy = select_topk(scores[rest], k_heavy)
        keep[rest[heavy]] = True
    return keep


def _selection_rule(select):
    def rule(scores, cfg, head_dim, layer, scale):
        n = scores.numel()
        tier, bits, keep = _out(n, head_dim)
        kept = select(scores, kept_blocks(n, scale))
        ev = ~kept
        tier[ev], bits[ev], keep[ev] = EVICTED, 0, 0
        return tier, bits, keep
    return rule


h2o_rule = _selection_rule(select_h2o)
h2o_rule.__doc__ = "H2O: keep floor(n/scale) blocks, half most recent, half heavy hitters; evict the rest."
recent_rule = _selection_rule(lambda s, k: select_recent(s.numel(), k))
recent_rule.__doc__ = "StreamingLLM: keep the floor(n/scale) most recent ready blocks (sinks are kept by the cache)."
topk_rule = _selection_rule(select_topk)
topk_rule.__doc__ = "SnapKV / FastKV: keep the floor(n/scale) blocks with the highest (pooled) score."


def uniform_rule(scores, cfg, head_dim, layer, scale):
    """KIVI-style uniform quantisation: every ready block at ``cfg.b_max`` bits (keys per channel per
    block, values per token per group: the store's quantised format). Independent of ``scale``: the
    ratio is fixed by the bit width (the fitter cannot move it)."""
    n = scores.numel()
    c = container_bits(cfg.b_max)
    return (torch.full((n,), CONTAINER_TIER[c], dtype=torch.int8), torch.full((n,), cfg.b_max, dtype=torch.int8),
            torch.full((n,), head_dim, dtype=torch.int16))


def keep_rule(scores, cfg, head_dim, layer, scale):
    """Keep every ready block at full precision: selection is left to the per-layer budget
    (``c_max`` + ``budget_shape``: PyramidKV, DynamicKV), which the fitter scales."""
    return _out(scores.numel(), head_dim)


for _name, _fn in (("uniform", uniform_rule), ("keep", keep_rule), ("h2o", h2o_rule),
                   ("recent", recent_rule), ("topk", topk_rule)):
    register_rule(_name, _fn)

