"""Policy: normalised block importance -> tier, bits and pruning rate (seed 000 §2.4, 001 §2.2-2.3).

All functions are pure: the same scores and config give the same tiers, which is what lets the app
replay a recorded importance history under new thresholds without generating.

Fidelity is monotone in importance for every rule (tested): more importance never gets fewer bits,
more pruning or eviction.
"""
from __future__ import annotations

import math

import torch

from agacc.quant import CONTAINER_OF, container_bits, kept_counts
from agacc.tiers import CONTAINER_TIER, EVICTED, FULL, PRUNED, TIER_OF_CONTAINER


def layer_weights(cfg, n_layers: int) -> list[float]:
    """w_l: the config's, or linearly rising with depth from 0.5 to 1.5 (001: deeper layers keep more)."""
    if cfg.layer_weights is not None:
        if len(cfg.layer_weights) != n_layers:
            raise ValueError(f"layer_weights has {len(cfg.layer_weights)} entries, the model has {n_layers} layers")
        return list(cfg.layer_weights)
    if n_layers == 1:
        return [1.0]
    return [0.5 + l / (n_layers - 1) for l in range(n_layers)]


def block_uniforms(seed: int, layer: int, n_blocks: int) -> torch.Tensor:
    """One fixed U(0,1) draw per (layer, block): probabilistic pruning is reproducible and a block's
    fate only changes when its probability does."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    return torch.rand(n_blocks, generator=g)


def spill(scores: torch.Tensor, rho: float) -> torch.Tensor:
    """Block scores [..., n] -> max(s_b, rho * s_{b-1}) along the last dim: the score a block
    borrows from the block before it (``cfg.spill``). Monotone: raising any score never lowers
    another. rho <= 0: ``scores``."""
    if rho <= 0 or scores.shape[-1] < 2:
        return scores
    s = scores.float()
    out = s.clone()
    out[..., 1:] = torch.maximum(s[..., 1:], rho * s[..., :-1])
    return out


def quant_tier(b: torch.Tensor) -> torch.Tensor:
    """Quantised tier (int8) of code widths ``b``: the tier of their container."""
    return TIER_OF_CONTAINER[CONTAINER_OF[b.long()].long()]


def code_bits(b: torch.Tensor, cfg) -> torch.Tensor:
    """The code width actually used for seed bits ``b`` (int8): the container's with ``fill_container``."""
    return CONTAINER_OF[b.long()] if cfg.fill_container else b


def thresholds_rule(scores: torch.Tensor, cfg, head_dim: int, scale: float = 1.0, guard: float = 0.0):
    """Seed 000 §2.4 on block scores [n] (or [L, n]) -> (tier int8, bits int8, keep int16) alike.

    ``scale`` multiplies all three thresholds (the ratio fitter moves it). ``guard`` (rho, the
    config's ``spill`` at a prefill's re-evaluation): a block below tau_e is evicted unless
    ``spill(scores, rho)`` lifts it to tau_e (it follows a strongly attended block); then it takes
    the lowest kept tier (b_min bits, pruned at its own score's rate)."""
    tau_h, tau_l, tau_e = cfg.tau_h * scale, cfg.tau_l * scale, cfg.tau_e * scale
    shape = scores.shape  # elementwise: [n] for one layer or [L, n] for all at once
    tier = torch.full(shape, FULL, dtype=torch.int8)
    bits = torch.full(shape, 16, dtype=torch.int8)
    keep = torch.full(shape, head_dim, dtype=torch.int16)
    s = scores.float().cpu()
    mid = (s > tau_l) & (s <= tau_h)
    if cfg.bit_interp == "log":  # importance is heavy-tailed: interpolate on its log (docs/tuning.md)
        x = (torch.log(s.clamp_min(1e-30) / tau_l) / math.log(tau_h / tau_l)).clamp(0, 1)
    else:  # the seed's linear position inside (tau_l, tau_h]
        x = ((s - tau_l) / (tau_h - tau_l)).clamp(0, 1)
    b = (cfg.b_min + torch.floor(x * (cfg.b_max - cfg.b_min + 1))).clamp(max=cfg.b_max).to(torch.int8)
    b = code_bits(b, cfg)
    tier[mid] = quant_tier(b)[mid]
    bits[mid] = b[mid]
    ev = s < tau_e
    if guard > 0:  # the block after a strongly attended one is kept (at the lowest tier) instead
        ev &= spill(s, guard) < tau_e
    low = (s <= tau_l) & ~ev
    p = cfg.p_max * (1 - torch.clamp(s / tau_l, max=1.0))
    bits[low] = container_bits(cfg.b_min) if cfg.fill_container else cfg.b_min
    keep[low] = kept_counts(head_dim, p[low])
    # a block that keeps every element is not pruned: it is a b_min-bit block
    tier[low] = torch.where(keep[low] < head_dim, PRUNED, CONTAINER_TIER[container_bits(cfg.b_min)]).to(torch.int8)
    tier[ev], bits[ev], keep[ev] = EVICTED, 0, 0
    return tier, bits, keep


def dynacompress_rule(scores: torch.Tensor, cfg, head_dim: int, layer: int, scale: float = 1.0):
    """Seed 001 §2.2 with its sign inversions corrected (docs/seeds.md):
    A^ = A / max A in [0, 1];  bits b = max(b_min, floor(b_max * (1 - gamma * (1 - A^))));
    p_evict = sigmoid(lambda * (tau - A^)), drawn once per block from a seeded RNG;
    A above tau_h stays full precision. ``scale`` multiplies tau_h and tau (the ratio fitter)."""
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


RULES = {
    "thresholds": lambda scores, cfg, head_dim, layer, scale: thresholds_rule(scores, cfg, head_dim, scale),
    "dynacompress": dynacompress_rule,
}


def register_rule(name: str, fn) -> None:
    """Add a tier rule ``fn(scores [n], cfg, head_dim, layer, scale) -> (tier, bits, keep)``.
    A rule must lose fidelity (never gain) as ``scale`` grows: the ratio fitter relies on it."""
    RULES[name] = fn


def rule_names() -> tuple[str, ...]:
    try:  # the baselines register their rules on import
        import agacc.baselines  # noqa: F401
    except ImportError:
        pass
    return tuple(RULES)


def assign_tiers(scores: torch.Tensor, cfg, head_dim: int, layer: int = 0, scale: float = 1.0):
    """Dispatch on ``cfg.rule``; protected blocks (sinks) are handled by the caller."""
    if cfg.rule not in RULES:
        rule_names()
    return RULES[cfg.rule](scores, cfg, head_dim, layer, scale)


def apply_layer_budget(tier, bits, keep, scores, budget_blocks: int):
    """Seed 001 §2.3: keep at most ``budget_blocks`` non-evicted blocks, evicting the least important."""
    alive = (tier != EVICTED).nonzero().squeeze(1)
    if alive.numel() <= budget_blocks:
        return tier, bits, keep
    order = alive[torch.argsort(scores[alive].float().cpu(), descending=False)]
    drop = order[: alive.numel() - max(0, budget_blocks)]
    tier, bits, keep = tier.clone(), bits.clone(), keep.clone()
    tier[drop], bits[drop], keep[drop] = EVICTED, 0, 0
    return tier, bits, keep


def budget_weights(cfg, block_scores: list[torch.Tensor]) -> list[float]:
    """Relative share of the global budget per layer, after ``cfg.budget_shape``."""
    n_layers = len(block_scores)
    if cfg.budget_shape == "pyramid":  # PyramidKV: more at the bottom, less at the top
        return [1.5 - l / max(1, n_layers - 1) for l in range(n_layers)]
    if cfg.budget_shape == "dynamic":  # DynamicKV: layers with diffuse importance need more blocks
        out = []
        for s in block_scores:
            if s.numel() == 0:
                out.append(1.0)
                continue
            v = torch.sort(s.float().clamp_min(0), descending=True).values
            cum = torch.cumsum(v, 0) / v.sum().clamp_min(1e-12)
            out.append(float((cum < 0.9).sum() + 1) / s.numel())
        return out
    return layer_weights(cfg, n_layers)


def layer_budgets(cfg, weights: list[float], seq_len: int, block_size: int, protected_blocks: list[int],
                  scale: float = 1.0) -> list[int]:
    """Per-layer budgets in blocks with sum_l ceil(L / kappa_l) <= C_max (001 §2.3): the kept entries
    of layer l are proportional to ``weights[l]``; protected (sink, recent) blocks count against the
    layer's budget. ``scale`` divides C_max (the ratio fitter moves it)."""
    n_layers = len(weights)
    w = weights
    total = cfg.c_max / scale * seq_len * n_layers
    mean_w = sum(w) / n_layers
    out = []
    for l in range(n_layers):
        kept_tokens = min(seq_len, math.floor(total * w[l] / (mean_w * n_layers)))
        out.append(max(0, kept_tokens // block_size - protected_blocks[l]))
    return out


def fidelity_floor(prev, tier, bits, keep):
    """Without a host copy a block can only lose fidelity: where the new plan is above ``prev`` =
    (tier, bits, keep) of the blocks already tiered (lower tier code, or more bits / kept elements in
    the same tier) the previous values stay. Shapes [n] (prev [n_old]) or stacked layers [L, n]
    (prev [L, n_old]). ``prev`` None or empty: the plan as is."""
    if prev is None or prev[0].numel() == 0:
        return tier, bits, keep
    ot, ob, ok = prev
    n_old = ot.shape[-1]
    t, b, k = tier[..., :n_old], bits[..., :n_old], keep[..., :n_old]
    same = t == ot
    promote = (t < ot) | (same & (b > ob)) | (same & (t == PRUNED) & (k > ok))
    tier, bits, keep = tier.clone(), bits.clone(), keep.clone()
    tier[..., :n_old] = torch.where(promote, ot, t)
    bits[..., :n_old] = torch.where(promote, ob, b)
    keep[..., :n_old] = torch.where(promote, ok, k)
    return tier, bits, keep
