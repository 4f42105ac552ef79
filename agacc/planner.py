"""The planner: what tiers cost and which tiers to give, for every layer at once. Pure (no model, no
store), so the cache, the trace replay and the app's what-if all plan with the same code.

    block_scores(token_scores, cfg, n_ready)        per-token scores -> per-block scores (pooling,
                                                    layer sharing, block max, FastKV's propagation)
    plan_tiers(block_scores, cfg, geo, seq_len)     -> per layer (tier, bits, keep): the method's rule,
                                                    sinks kept, per-layer budgets (c_max)
    planned_bytes(plans, cfg, geo, seq_len)         the store's cost model: bytes those plans hold
    fit_threshold_scale / fit_thresholds            target ratio -> threshold scale / config

Geometry is the shape facts the cost model needs (``Geometry.of(model_config)``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from agacc import methods
from agacc.config import CALIBRATED, block_state, hot_width
from agacc.importance import GONE_ITEMSIZE, PACKED_ITEMSIZE, STATE_ITEMSIZE, WINDOW_ITEMSIZE, block_max, max_pool
from agacc.policy import basis_layouts, basis_rank, fidelity_floor, hold_evictions, key_grouping, layer_weights
from agacc.quant import container_bits, value_group
from agacc.tiers import CONTAINER_OF_TIER, CONTAINER_TIER, EVICTED, FULL, PRUNED, TIER_CONTAINER, TIER_OF_CONTAINER


def text_config(config):
    """The text model's config of a (possibly multimodal) transformers config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def sliding_windows(model_config) -> list[int | None]:
    """Per layer: the sliding window in tokens (a query sees itself and the window - 1 tokens before
    it), or None for a global layer; read as transformers reads it (``layer_types``, else
    ``sliding_window`` for every layer)."""
    tc = text_config(model_config)
    n, w = tc.num_hidden_layers, getattr(tc, "sliding_window", None)
    types = getattr(tc, "layer_types", None)
    if types is None:
        return [w] * n
    return [w if t == "sliding_attention" else None for t in types[:n]]


@dataclass(frozen=True)
class Geometry:
    """Shape facts the cost model needs: layers, KV heads, head dim, batch, bytes per full-precision element."""
    n_layers: int
    heads: int
    head_dim: int
    batch: int = 1
    full_itemsize: int = 2

    @classmethod
    def of(cls, model_config, batch: int = 1, full_itemsize: int = 2) -> "Geometry":
        tc = text_config(model_config)
        return cls(tc.num_hidden_layers, getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads,
                   getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads, batch, full_itemsize)

    def bytes_fp16(self, seq_len: int) -> int:
        """What a 16-bit cache of ``seq_len`` tokens holds (K and V, every layer)."""
        return 2 * self.batch * self.heads * seq_len * self.head_dim * 2 * self.n_layers

    def bytes_full(self, seq_len: int) -> int:
        """``seq_len`` tokens at full precision in the store dtype, every layer."""
        return 2 * self.batch * self.heads * seq_len * self.head_dim * self.full_itemsize * self.n_layers


# --- scores ---------------------------------------------------------------------------------------

def block_scores(token_scores: list[torch.Tensor], cfg, n_ready: int) -> list[torch.Tensor]:
    """Per layer normalised token scores [seq_len] (a list, or stacked [L, seq_len]) -> block scores
    [n_ready] (cpu): averaged over
    layers (``share_across_layers``, 000 §2.2 as written), max-pooled over ``pool_kernel``
    neighbours (SnapKV), max over each block (000 §2.5); from ``tsp_layer`` on every layer reuses
    that layer's scores (FastKV's token-selective propagation)."""
    if isinstance(token_scores, torch.Tensor) and not cfg.share_across_layers and cfg.pool_kernel <= 1:
        # stacked [L, seq_len]: the block max of every layer at once (a max: the same values)
        B, n_layers = cfg.block_size, token_scores.shape[0]
        out = list(token_scores[:, : n_ready * B].reshape(n_layers, n_ready, B).amax(2).cpu().unbind(0))
        if cfg.tsp_layer is not None and cfg.tsp_layer < len(out):
            out = out[: cfg.tsp_layer] + [out[cfg.tsp_layer]] * (len(out) - cfg.tsp_layer)
        return out
    token_scores = list(token_scores)
    if cfg.share_across_layers:
        mean = torch.stack(token_scores).mean(0)
        token_scores = [mean for _ in token_scores]
    if cfg.pool_kernel > 1:
        token_scores = [max_pool(s, cfg.pool_kernel) for s in token_scores]
    out = [block_max(s, cfg.block_size, n_ready).cpu() for s in token_scores]
    if cfg.tsp_layer is not None and cfg.tsp_layer < len(out):
        out = out[: cfg.tsp_layer] + [out[cfg.tsp_layer]] * (len(out) - cfg.tsp_layer)
    return out


# --- budgets (seed 001 §2.3) ----------------------------------------------------------------------

def budget_weights(cfg, block_scores: list[torch.Tensor]) -> list[float]:
    """Relative share of the global budget per layer: the layer weights w_l (``budget_shape="weights"``,
    001) or the budget hook of the method ``cfg.budget_shape`` names (PyramidKV, DynamicKV)."""
    if cfg.budget_shape == "weights":
        return layer_weights(cfg, len(block_scores))
    return methods.load()[cfg.budget_shape].budget(cfg, block_scores)


def layer_budgets(cfg, weights: list[float], seq_len: int, block_size: int, protected_blocks: list[int],
                  scale: float = 1.0) -> list[int]:
    """Per-layer budgets in blocks with sum_l ceil(L / kappa_l) <= C_max (001 §2.3): the kept entries
    of layer l are proportional to ``weights[l]``; protected (sink, recent) blocks count against the
    layer's budget. ``scale`` divides C_max (the ratio fitter moves it)."""
    n_layers = len(weights)
    total = cfg.c_max / scale * seq_len * n_layers
    mean_w = sum(weights) / n_layers
    out = []
    for l in range(n_layers):
        kept_tokens = min(seq_len, math.floor(total * weights[l] / (mean_w * n_layers)))
        out.append(max(0, kept_tokens // block_size - protected_blocks[l]))
    return out


def apply_layer_budget(tier, bits, keep, scores, budget_blocks: int):
    """Keep at most ``budget_blocks`` non-evicted blocks, evicting the least important."""
    alive = (tier != EVICTED).nonzero().squeeze(1)
    if alive.numel() <= budget_blocks:
        return tier, bits, keep
    order = alive[torch.argsort(scores[alive].float().cpu(), descending=False)]
    drop = order[: alive.numel() - max(0, budget_blocks)]
    tier, bits, keep = tier.clone(), bits.clone(), keep.clone()
    tier[drop], bits[drop], keep[drop] = EVICTED, 0, 0
    return tier, bits, keep


# --- plans ----------------------------------------------------------------------------------------

def plan_tiers(block_scores: list[torch.Tensor], cfg, geo: Geometry, seq_len: int, scale: float = 1.0,
               prefill: bool = False, stacked: bool = False, dropped: list[int] | None = None):
    """Per layer (tier, bits, keep) for the ready blocks under the rule of the method ``cfg.rule``;
    the sink blocks at ``cfg.sink_bits`` (16: full); the C_max budget applies. ``prefill``: the
    re-evaluation ends a prefill, so the eviction guard (``cfg.spill``) applies. ``stacked``: the same
    plans as (tier, bits, keep) [L, n] (None without layers), not a list per layer. ``dropped``: per
    layer, how many first blocks are evicted whatever their scores (``drop_blocks``: a sliding-window
    layer's blocks every later query is past)."""
    drop = bool(dropped) and any(dropped)
    plans = _plan_rule(block_scores, cfg, geo, seq_len, scale, prefill, stacked or drop)
    if not drop or plans is None:
        return plans
    plans = drop_blocks(*plans, dropped)
    return plans if stacked else list(zip(*(x.unbind(0) for x in plans)))


def drop_blocks(tier: torch.Tensor, bits: torch.Tensor, keep: torch.Tensor, dropped: list[int] | None):
    """Stacked plans [L, n] with the first ``dropped[l]`` blocks of layer l evicted (a sliding-window
    layer drops what its window has passed, as transformers' own sliding layers do; its store keeps
    no marker for them). None or all 0: the plans themselves."""
    if not dropped or not any(dropped):
        return tier, bits, keep
    tier, bits, keep = tier.clone(), bits.clone(), keep.clone()
    for layer, k in enumerate(dropped):
        if k:
            tier[layer, :k], bits[layer, :k], keep[layer, :k] = EVICTED, 0, 0
    return tier, bits, keep


def held_plans(tier: torch.Tensor, bits: torch.Tensor, keep: torch.Tensor, cfg, head_dim: int,
               dropped: list[int] | None):
    """What a prompt chunk holds until the prompt ends (``policy.hold_evictions``), stacked [L, n]: the
    blocks a sliding window passed stay dropped, not held. The cache and its replay both use it."""
    return drop_blocks(*hold_evictions(tier, bits, keep, cfg, head_dim), dropped)


def _layer_scaled(rule, cfg, n_layers: int):
    """The rule with each layer's block scores times ``cfg.layer_scale[l]`` (a layer's sensitivity to
    its cache's error, ``agacc.calibrate``): under one threshold scale a sensitive layer keeps more
    bits and evicts less, an insensitive one gives them up. (Steering bits only, evictions by the
    unscaled scores, lost the gain at 4x: docs/tuning.md round 6.) With ``cfg.evict_scale`` (a layer's
    sensitivity to eviction) the rule runs twice, and a block is evicted exactly where the run on
    the scores times ``evict_scale`` evicts it; a block only the ``layer_scale`` run would evict
    takes the tier the other run gave it (round 10). With ``cfg.layer_floor`` the plan's quantised blocks
    are then raised to their layer's floor (``floored``; round 15)."""
    for name in CALIBRATED:
        if getattr(cfg, name) is not None and len(getattr(cfg, name)) != n_layers:
            flag = " --evict 0.5 0.75" if name == "evict_scale" else ""
            raise ValueError(f"{name} has {len(getattr(cfg, name))} entries, the model has {n_layers} layers: "
                             f"calibrate it for this model (python -m agacc calibrate{flag} --save) or set {name}=none")

    def times(scores, factors, layer):
        if factors is None:
            return scores
        f = (torch.tensor(factors, dtype=scores.dtype, device=scores.device)[:, None] if scores.dim() == 2
             else factors[layer])
        return scores * f

    def scaled(scores, cfg, head_dim, layer=0, scale=1.0, spill=0.0):
        plan = rule(times(scores, cfg.layer_scale, layer), cfg, head_dim, layer, scale, spill)
        if cfg.evict_scale is not None:
            by_e = rule(times(scores, cfg.evict_scale, layer), cfg, head_dim, layer, scale, spill)
            use = (plan[0] == EVICTED) | (by_e[0] == EVICTED)
            plan = tuple(torch.where(use, b, a) for a, b in zip(plan, by_e))
        return plan if cfg.layer_floor is None else floored(plan, cfg.layer_floor, layer)
    return scaled


def floored(plan, layer_floor, layer: int = 0):
    """(tier, bits, keep) [n] (layer ``layer``) or [L, n] with each layer's quantised blocks below its
    ``layer_floor`` bits (a container width; 0: none) raised to it; full, pruned and evicted blocks unchanged."""
    tier, bits, keep = plan
    f = torch.tensor(layer_floor, dtype=torch.int8)
    f = (f[:, None] if tier.dim() == 2 else f[layer]).expand_as(bits)
    low = (CONTAINER_OF_TIER[tier.long()] > 0) & (bits < f)
    if not bool(low.any()):
        return plan
    return torch.where(low, TIER_OF_CONTAINER[f.long()], tier), torch.where(low, f, bits), keep


def _plan_rule(block_scores, cfg, geo: Geometry, seq_len: int, scale: float, prefill: bool, stacked: bool):
    """``plan_tiers`` before ``dropped``."""
    B = cfg.block_size
    sink_blocks = -(-cfg.n_sink // B) if cfg.n_sink else 0
    sink = (FULL if cfg.sink_bits == 16 else CONTAINER_TIER[cfg.sink_bits], cfg.sink_bits, geo.head_dim)
    budgets = None
    if cfg.c_max is not None:
        hot_blocks = -(-(seq_len - (block_scores[0].numel() * B)) // B)
        budgets = layer_budgets(cfg, budget_weights(cfg, block_scores), seq_len, B,
                                [sink_blocks + hot_blocks] * len(block_scores), scale)
    m = methods.rule(cfg.rule)
    scaled = any(getattr(cfg, name) is not None for name in CALIBRATED)
    rule = _layer_scaled(m.rule, cfg, len(block_scores)) if scaled else m.rule
    spill = cfg.spill if prefill else 0.0
    if m.elementwise and len(block_scores):  # all layers in one call; the sinks of all layers at once
        all_layers = rule(block_scores if isinstance(block_scores, torch.Tensor) else torch.stack(block_scores),
                            cfg, geo.head_dim, 0, scale, spill)
        tier, bits, keep = all_layers
        n_sink = min(sink_blocks, tier.shape[-1])
        if n_sink:
            tier[:, :n_sink], bits[:, :n_sink], keep[:, :n_sink] = sink
        if budgets is None:
            return all_layers if stacked else list(zip(tier.unbind(0), bits.unbind(0), keep.unbind(0)))
        raw = list(zip(tier.unbind(0), bits.unbind(0), keep.unbind(0)))  # views: the budgets write through
    else:
        all_layers = None
        raw = [rule(s, cfg, geo.head_dim, layer, scale, spill) for layer, s in enumerate(block_scores)]
    out = []
    for layer, (s, (tier, bits, keep)) in enumerate(zip(block_scores, raw)):
        n_sink = min(sink_blocks, s.numel())
        if all_layers is None:
            tier[:n_sink], bits[:n_sink], keep[:n_sink] = sink
        if budgets is not None:
            rest = slice(n_sink, None)
            tier[rest], bits[rest], keep[rest] = apply_layer_budget(tier[rest], bits[rest], keep[rest], s[rest],
                                                                    budgets[layer])
        out.append((tier, bits, keep))
    if not stacked:
        return out
    if all_layers is not None:
        return all_layers
    return tuple(torch.stack(x) for x in zip(*out)) if out else None


# --- the cost model (the store's format: agacc/store.py) ---------------------------------------------

def block_cost_bytes(tier: int, bits: int, keep: int, *, batch: int, heads: int, head_dim: int,
                     block_size: int, full_itemsize: int, value_group_size: int, b_min: int,
                     sparse_threshold: float, key_quant: str, key_group_size: int,
                     key_layouts: tuple = (), basis_meta: str = "fp16") -> int:
    """Bytes one block of ``block_size`` tokens occupies in ``tier`` (K and V, scales, ids, per-block
    metadata). For planning only; ``memory()`` counts ``nbytes`` of what is held (a test checks the
    two agree). Evicted blocks cost nothing here (markers are counted per run). ``key_layouts``: the layouts of
    2-, 3- and 4-bit blocks' keys held in a basis (``policy.basis_layouts``; (): per channel), their scales and
    zeros in ``basis_meta`` ("fp16" or "8bit": ``quant.quantize_coeffs``)."""
    vecs = batch * heads * block_size
    meta = 1 + 1 + 2 + 4  # tier, bits, keep, block id
    if tier == FULL:
        return 2 * vecs * head_dim * full_itemsize + meta
    if tier in TIER_CONTAINER or (tier == PRUNED and (keep >= head_dim or 1 - keep / head_dim < sparse_threshold)):
        c = container_bits(bits if tier != PRUNED else b_min)
        layout = dict(zip((2, 3, 4), key_layouts)).get(c)  # keys in a basis: its coefficients, else channels
        k_dim = basis_rank((layout,)) if layout else head_dim
        k_codes = vecs * sum(n * w for w, n in layout) // 8 if layout else vecs * head_dim * c // 8
        codes = k_codes + vecs * head_dim * c // 8
        if key_quant == "token":
            k_scales = 2 * vecs * (head_dim // value_group(head_dim, key_group_size)) * 2
        elif layout and basis_meta == "8bit":  # a step code and a zero a coefficient, one fp16 reference
            k_scales = batch * heads * (2 * k_dim + 2)
        else:
            k_scales = 2 * batch * heads * k_dim * 2
        v_scales = 2 * vecs * (head_dim // value_group(head_dim, value_group_size)) * 2
        return codes + k_scales + v_scales + 1 + meta
    if tier == PRUNED:
        c = container_bits(b_min)
        per_vec = head_dim // 8 + keep * c // 8 + 4
        return 2 * vecs * per_vec + meta
    return meta  # evicted


def marker_cost_bytes(*, batch: int, heads: int, head_dim: int, full_itemsize: int) -> int:
    """Bytes of one marker entry (k, v, log_count, weight, span)."""
    return 2 * batch * heads * head_dim * full_itemsize + 4 + 4 + 8


def tracker_prices(cfg, chunks: int) -> tuple[float, int]:
    """(bytes of tracker state a token of a tiered block holds, bytes an evicted block leaves): fp32 I_i
    and a bf16 sum per window held (``chunks``: the trackers' ``len(chunks)``); an evicted block's tokens
    are forgotten (``ImportanceTracker.forget``: its id and its largest and summed I_i, 12 bytes)
    unless markers or a host copy keep them in play (then they hold their state too). A block evicted
    in decoding is forgotten at the next re-evaluation, once its window sums are folded in: until then
    it holds ``per_token`` bytes a token more than priced (a block of 16 with one sum: 84 bytes).
    With ``config.block_state`` a tiered block, evicted or not, holds its largest and summed I_i (8 bytes:
    half a byte a token of 16; no window sums held)."""
    if block_state(cfg):
        return PACKED_ITEMSIZE / cfg.block_size, PACKED_ITEMSIZE
    per_token = STATE_ITEMSIZE + WINDOW_ITEMSIZE * chunks
    return per_token, (per_token * cfg.block_size if cfg.markers or cfg.host_copy else GONE_ITEMSIZE)


def hot_bytes(cfg, geo: Geometry, tokens: int) -> int:
    """Bytes ``tokens`` hot tokens hold in one layer between forwards (K and V): in the store dtype, or with
    ``hot_width(cfg)`` 8 (``store.narrow_hot``) one byte an element plus an fp16 scale and zero per token per
    group of ``value_group_size`` channels (head dim 64: 68 bytes a vector instead of 128)."""
    d = geo.head_dim
    vector = d * geo.full_itemsize if hot_width(cfg) == 16 else d + 4 * (d // value_group(d, cfg.value_group_size))
    return 2 * geo.batch * geo.heads * tokens * vector


def headroom_bytes(cfg, geo: Geometry) -> int:
    """Room the ratio fitter leaves for the tokens that arrive before the next re-evaluation (N_r of them, at
    most one block), in every layer's hot region (``hot_bytes``)."""
    return min(cfg.n_r, cfg.block_size) * geo.n_layers * hot_bytes(cfg, geo, 1)


def planned_bytes(plans, cfg, geo: Geometry, seq_len: int, tracker: tuple[int, int] = (0, 0)) -> int:
    """Bytes the plans would hold, hot region included, plus the tracker's attention window (one bf16
    slot per entry the plan leaves) and, by ``tracker`` (``tracker_prices``), its state of the tiered
    blocks' tokens; the rest of the tracker excluded. ``plans`` None: nothing tiered yet, every token
    hot (``hot_bytes``)."""
    if plans is None:
        return geo.n_layers * hot_bytes(cfg, geo, seq_len)
    if not plans:
        return 0
    return stacked_bytes(*(torch.stack([p[i] for p in plans]) for i in range(3)), cfg, geo, seq_len, tracker)


def cost_settings(cfg, geo: Geometry, block_size: int | None = None) -> dict:
    """``block_cost_bytes``'s keyword settings for a config on a geometry (blocks of ``block_size``
    tokens, default the config's; keys grouped as the store groups them, ``policy.key_grouping``)."""
    return dict(batch=geo.batch, heads=geo.heads, head_dim=geo.head_dim, block_size=block_size or cfg.block_size,
                full_itemsize=geo.full_itemsize, value_group_size=cfg.value_group_size, b_min=cfg.b_min,
                sparse_threshold=cfg.sparse_threshold, key_quant=key_grouping(cfg, geo.head_dim),
                key_group_size=cfg.key_group_size, key_layouts=basis_layouts(cfg, geo.head_dim),
                basis_meta=cfg.basis_meta)


_COSTS: dict = {}  # (cost-model settings, code) -> block_cost_bytes


def stacked_bytes(tier: torch.Tensor, bits: torch.Tensor, keep: torch.Tensor, cfg, geo: Geometry, seq_len: int,
                  tracker: tuple[int, int] = (0, 0)) -> int:
    """``planned_bytes`` of plans stacked over layers: tier, bits, keep [L, n]."""
    B = cfg.block_size
    n_layers, n = tier.shape
    hot_tokens = seq_len - n * B
    kw = cost_settings(cfg, geo)
    key = tuple(kw.values())
    total = n_layers * hot_bytes(cfg, geo, hot_tokens)
    # one code per (tier, bits, keep); int32 holds it for any int8 tier / bits and int16 keep
    uniq, counts = torch.unique((tier.to(torch.int32) * 32 + bits) * 1024 + keep, return_counts=True)
    for code, count in zip(uniq.tolist(), counts.tolist()):
        cost = _COSTS.get((key, code))
        if cost is None:
            cost = _COSTS[(key, code)] = block_cost_bytes(code // 1024 // 32, code // 1024 % 32, code % 1024, **kw)
        total += count * cost
    ev = tier == EVICTED
    n_evicted = int(ev.sum()) if n else 0
    # count_evicted_runs: blocks evicted after a kept one (or first)
    runs = int((ev[:, 1:] > ev[:, :-1]).sum()) + int(ev[:, 0].sum()) if cfg.markers and n else 0
    total += runs * marker_cost_bytes(batch=geo.batch, heads=geo.heads, head_dim=geo.head_dim,
                                      full_itemsize=geo.full_itemsize)
    entries = (n_layers * n - n_evicted) * B + runs + n_layers * hot_tokens
    state = tracker[0] * (n_layers * n - n_evicted) * B + tracker[1] * n_evicted
    return total + WINDOW_ITEMSIZE * entries + round(state)


# --- the ratio fitter -----------------------------------------------------------------------------

def fit_threshold_scale(block_scores, cfg, geo, seq_len, target_ratio, overhead_bytes: int = 0,
                        tol: float = 1e-3, prev=None, start: float | None = None, byte_tol: float = 0.01,
                        prefill: bool = False, plans_out: dict | None = None, dropped: list[int] | None = None,
                        reference_bytes: int | None = None, tracker: tuple[int, int] = (0, 0)) -> float:
    """Scale s for (tau_h, tau_l, tau_e) * s so the planned bytes (+ ``overhead_bytes`` the plan does
    not cover) are just under bytes_fp16 / target: the library's target-ratio -> thresholds map.
    ``prev``: per layer (tier, bits, keep) already applied, when blocks cannot regain fidelity (no
    host copy): the plan is floored as the store will floor it, so bytes the store cannot spend on
    promotions go to other blocks instead of being left unused.

    Planned bytes fall as s grows; bisection on log s in [-12, 12] until the bracket is ``tol`` wide
    (0.1% in s) and the plan uses at least 99% of the budget (``byte_tol``; near-equal block scores
    need a finer s), or the bracket is 1e-7 wide. ``start``: the scale fitted at the previous
    re-evaluation, which rarely moves much: the search walks out from it (steps 0.25, 1, 4 in log s)
    to a bracket first (about 10 plans instead of 26), unless its plan already uses 99-100% of the
    budget: then it is kept (one plan; stable tiers between re-evaluations). If the target is out of
    reach (recent window and sinks alone exceed it) the largest scale is returned.

    ``plans_out``: a dict that receives, per scale planned, its plans stacked (``plan_tiers(...,
    stacked=True)``) and floored to ``prev`` when given, so the caller need not plan the returned
    scale again. ``dropped``: as ``plan_tiers``; ``reference_bytes``: what a 16-bit cache of the same
    tokens holds (default ``geo.bytes_fp16(seq_len)``; sliding-window layers hold only their window);
    ``tracker``: the tracker state each plan holds (``tracker_prices``; ``overhead_bytes`` has the rest)."""
    reference = geo.bytes_fp16(seq_len) if reference_bytes is None else reference_bytes
    budget = reference / target_ratio - overhead_bytes
    # [L, n_old] each, where the plans are made (block scores are on the CPU; a store's tiers on its device)
    prev_stacked = tuple(torch.stack(x).to(block_scores[0].device) for x in zip(*prev)) if prev else None
    seen: dict[float, int] = {}

    def bytes_at(log_s):
        if log_s not in seen:
            scale = math.exp(log_s)
            plans = plan_tiers(block_scores, cfg, geo, seq_len, scale, prefill=prefill, stacked=True,
                               dropped=dropped)  # [L, n] each
            if plans is None:  # no layers
                seen[log_s] = 0
                return 0
            if prev_stacked is not None:  # one floor over all layers at once
                plans = fidelity_floor(prev_stacked, *plans)
            seen[log_s] = stacked_bytes(*plans, cfg, geo, seq_len, tracker)
            if plans_out is not None:
                plans_out[scale] = plans
        return seen[log_s]

    lo, hi = -12.0, 12.0  # invariant: bytes_at(lo) > budget >= bytes_at(hi)
    if start is not None and -12.0 < math.log(start) < 12.0:  # walk out from the last scale, steps x4
        x, step = math.log(start), 0.25
        if (1 - byte_tol) * budget <= bytes_at(x) <= budget:
            return start  # the last scale still fills the budget: keep it (and the tiers it gave)
        fits = bytes_at(x) <= budget
        while -12.0 < x < 12.0:
            if fits:
                hi, x = x, max(-12.0, x - step)
            else:
                lo, x = x, min(12.0, x + step)
            step *= 4
            if -12.0 < x < 12.0 and (bytes_at(x) <= budget) != fits:
                lo, hi = (x, hi) if fits else (lo, x)
                break
    if lo == -12.0 and bytes_at(lo) <= budget:
        return math.exp(lo)
    if hi == 12.0 and bytes_at(hi) > budget:
        return math.exp(hi)
    while hi - lo > 1e-7:
        if hi - lo <= tol and bytes_at(hi) >= (1 - byte_tol) * budget:
            break
        mid = (lo + hi) / 2
        if bytes_at(mid) <= budget:
            hi = mid
        else:
            lo = mid
    return math.exp(hi)


def fit_plans(block_scores, cfg, geo, seq_len, ratio, overhead_bytes: int = 0, prev=None, start: float | None = None,
              prefill: bool = False, dropped: list[int] | None = None, reference_bytes: int | None = None,
              tracker: tuple[int, int] = (0, 0)):
    """The stacked plans (tier, bits, keep) [L, n] fitted to ``ratio`` (``fit_threshold_scale``; floored
    against ``prev`` where the fitter floored them)."""
    fitted: dict = {}
    s = fit_threshold_scale(block_scores, cfg, geo, seq_len, ratio, overhead_bytes, prev=prev, start=start,
                            prefill=prefill, plans_out=fitted, dropped=dropped, reference_bytes=reference_bytes,
                            tracker=tracker)
    return fitted[s] if s in fitted else plan_tiers(block_scores, cfg, geo, seq_len, s, prefill=prefill, stacked=True,
                                                    dropped=dropped)


def fit_thresholds(block_scores, cfg, geo: Geometry, seq_len: int, target_ratio: float,
                   overhead_bytes: int = 0, prefill: bool = False):
    """Target ratio -> a config whose thresholds (tau_h, tau_l, tau_e; tau_prune and C_max for the
    rules that use them) reach it on these block scores."""
    s = fit_threshold_scale(block_scores, cfg, geo, seq_len, target_ratio, overhead_bytes, prefill=prefill)
    kw = dict(tau_h=cfg.tau_h * s, tau_l=cfg.tau_l * s, tau_e=cfg.tau_e * s, tau_prune=cfg.tau_prune * s,
              target_ratio=None)
    if cfg.c_max is not None:
        kw["c_max"] = min(1.0, cfg.c_max / s)
    return cfg.with_overrides(**kw)
