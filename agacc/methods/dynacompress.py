"""DynaCompress (seed 001 §2.2-2.3) with its sign inversions corrected (docs/seeds.md):
A^ = A / max A in [0, 1];  bits b = max(b_min, floor(b_max (1 - gamma (1 - A^))));
p_evict = sigmoid(lambda (tau - A^)), drawn once per block from a seeded RNG; A above tau_h stays
full precision. Its per-layer budgets
(``c_max``, split by the layer weights w_l: ``budget_shape="weights"``) are the planner's default."""
from __future__ import annotations

import torch

from agacc.methods import Method, register
from agacc.policy import code_bits, quant_tier
from agacc.tiers import EVICTED, FULL


def block_uniforms(seed: int, layer: int, n_blocks: int) -> torch.Tensor:
    """One fixed U(0,1) draw per (layer, block): probabilistic pruning is reproducible and a block's
    fate only changes when its probability does."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    return torch.rand(n_blocks, generator=g)


def dynacompress_rule(scores: torch.Tensor, cfg, head_dim: int, layer: int, scale: float = 1.0, spill: float = 0.0):
    """Scores [n] -> (tier, bits, keep); ``scale`` multiplies tau_h and tau (the ratio fitter)."""
    n = scores.numel()
    s = scores.float().cpu()
    a_hat = (s / s.max().clamp_min(1e-12)).clamp(0, 1) if n else s
    b = code_bits(torch.clamp(torch.floor(cfg.b_max * (1 - cfg.gamma * (1 - a_hat))), min=cfg.b_min).to(torch.int8), cfg)
    tier = quant_tier(b)
    bits = b.clone()
    keep = torch.full((n,), head_dim, dtype=torch.int16)
    full = s > cfg.tau_h * scale
    tier[full], bits[full] = FULL, 16
    p_evict = torch.sigmoid(cfg.lam * (cfg.tau_prune * scale - a_hat))
    ev = (block_uniforms(cfg.seed, layer, n) < p_evict) & ~full
    tier[ev], bits[ev], keep[ev] = EVICTED, 0, 0
    return tier, bits, keep


register(Method(
    "dynacompress", presets={"dynacompress": dict(scoring="decay", position_norm="none")}, kind="adaptive", order=1,
    rule=dynacompress_rule,
    citation="DynaCompress, seed 001: decay-weighted, layer-weighted importance (shared/seeds/001)",
))
