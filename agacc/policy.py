"""Policy: pure helpers that map normalised block importance to tier, bits and pruning rate
(seed 000 §2.4, 001 §2.2-2.3). The methods' rules (``agacc/methods/``) are built from them.

All functions are pure: the same scores and config give the same tiers, which is what lets the app
replay a recorded importance history under new thresholds without generating.

Fidelity is monotone in importance for every rule (tested): more importance never gets fewer bits,
more pruning or eviction.
"""
from __future__ import annotations

import math

import torch

from agacc.quant import CONTAINER_OF, container_bits, pack_unit, value_group
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


def spill_scores(scores: torch.Tensor, rho: float) -> torch.Tensor:
    """Block scores [..., n] -> max(s_b, rho * s_{b-1}) along the last dim: the score a block
    borrows from the block before it (``cfg.spill``, the eviction guard). Monotone: raising any
    score never lowers another. rho <= 0: ``scores``."""
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


# --- keeping every token (``cfg.keep_all``) --------------------------------------------------------
# Where ``keeps_all``, a block scoring below this fraction of tau_e is held at KEEP_ALL_LOW_BITS instead
# of being evicted: the threshold scale that meets the budget gives up the 16-bit blocks (above tau_h)
# long before it cuts 8-bit ones to 4 bits, lowest scores first.
KEEP_ALL_LOW = 1e-3
KEEP_ALL_LOW_BITS = 4


def keep_all_reach(cfg, head_dim: int, bits: int = KEEP_ALL_LOW_BITS) -> float:
    """16-bit bytes / bytes of the same tokens as ``bits``-bit codes, keys and values per token with one
    fp16 (scale, zero) per group of channels (``key_group_size``, ``value_group_size``): what blocks alone
    reach in ``keep_all``'s format (no hot tail, no tracker). Head dim 64, groups of 64: 32 / 9 = 3.56 at
    4 bits, 32 / 17 = 1.88 at 8."""
    def per_element(group: int) -> float:  # the code + 2 x 16 bits per group
        return bits + 32 / value_group(head_dim, group)
    return 32 / (per_element(cfg.key_group_size) + per_element(cfg.value_group_size))


def keep_all_upto(cfg, head_dim: int) -> float:
    """The largest target ratio at which ``keeps_all``: ``cfg.keep_all``, never beyond ``keep_all_reach``."""
    return min(cfg.keep_all, keep_all_reach(cfg, head_dim))


def keeps_all(cfg, head_dim: int) -> bool:
    """A target ratio up to ``keep_all_upto``: the thresholds rule then keeps every token, each block at
    16, 8 or 4 bits, none evicted or pruned (b_min, b_max, tau_l and p_max give way), keys per token
    (docs/tuning.md round 19)."""
    return cfg.target_ratio is not None and cfg.target_ratio <= keep_all_upto(cfg, head_dim)


def key_grouping(cfg, head_dim: int) -> str:
    """How keys are grouped in the store: per token where ``keeps_all``, else ``cfg.key_quant`` ("auto" not
    yet resolved for a model, ``basis.default_key_quant``: "channel", as without a key basis)."""
    return "token" if keeps_all(cfg, head_dim) else "channel" if cfg.key_quant == "auto" else cfg.key_quant


BASIS_WIDTHS = (8, 4, 3, 2)  # the code widths of ``cfg.basis_layout``'s counts, widest first


def basis_layouts(cfg, head_dim: int) -> tuple:
    """Where keys are held in a basis (``key_grouping`` "basis"): for 2-, 3- and 4-bit blocks, their keys'
    layout ((width, coefficients), ...), widest first along the axes (``kernels.format.Part.key_groups``):
    ``cfg.basis_layout``'s counts times head_dim / 64, each rounded (half up) to whole bytes of its width, at most
    head_dim in all. Else ()."""
    if key_grouping(cfg, head_dim) != "basis":
        return ()
    out = []
    for i in range(3):
        groups, left = [], head_dim
        for w, n in zip(BASIS_WIDTHS, cfg.basis_layout[4 * i:4 * i + 4]):
            u = pack_unit(w)
            n = min(math.floor(n * head_dim / 64 / u + 0.5) * u, left // u * u)
            if n:
                groups.append((w, n))
                left -= n
        out.append(tuple(groups))
    return tuple(out)


def basis_rank(layouts) -> int:
    """The most coefficients a block keeps under ``basis_layouts`` (the axes a store holds), 0 for none."""
    return max((sum(n for _, n in lay) for lay in layouts), default=0)


def full_plan(n: int, head_dim: int):
    """(tier, bits, keep) [n] of ``n`` blocks at full precision."""
    return (torch.full((n,), FULL, dtype=torch.int8), torch.full((n,), 16, dtype=torch.int8),
            torch.full((n,), head_dim, dtype=torch.int16))


# --- token selection (the eviction baselines) ----------------------------------------------------
# Token-selection rules read ``scale`` as a budget divisor: of the n ready blocks (outside sinks and
# the recent window, which the cache keeps anyway) they keep floor(n / scale) at full precision and
# evict the rest. Kept sets are nested as the budget shrinks, so bytes fall monotonically with scale.

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


def selection_rule(select):
    """A tier rule from ``select(scores [n], k) -> bool mask``: keep ``kept_blocks(n, scale)`` blocks
    at full precision, evict the rest."""
    def rule(scores, cfg, head_dim, layer=0, scale=1.0, spill=0.0):
        n = scores.numel()
        tier, bits, keep = full_plan(n, head_dim)
        ev = ~select(scores, kept_blocks(n, scale))
        tier[ev], bits[ev], keep[ev] = EVICTED, 0, 0
        return tier, bits, keep
    return rule


def hold_evictions(tier, bits, keep, cfg, head_dim: int):
    """The plan as a prompt chunk holds it until the prompt ends: every block it evicts takes the lowest
    kept tier instead (``b_min`` bits in their container, nothing pruned), so later prompt chunks still
    read it; with ``cfg.prefill_bits`` every quantised block, held or planned, keeps at least that many
    bits, so later chunks do not read (and build on) keys and values cut to fewer. Shapes [n] or [L, n];
    nothing to hold: the inputs themselves. The caller floors the result against the tiers already
    applied (a block pruned or evicted before stays so)."""
    floor = max(cfg.b_min, cfg.prefill_bits or 0)
    raise_ = (tier == EVICTED) | ((tier > FULL) & (tier < PRUNED) & (bits < floor))
    if not bool(raise_.any()):
        return tier, bits, keep
    c = container_bits(floor)
    return (torch.where(raise_, CONTAINER_TIER[c], tier).to(tier.dtype),
            torch.where(raise_, c if cfg.fill_container else floor, bits).to(bits.dtype),
            torch.where(tier == EVICTED, head_dim, keep).to(keep.dtype))


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
