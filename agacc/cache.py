"""CompressedCache: a transformers ``Cache`` whose layers hold K/V in mixed precision.

Data flow per forward: ``update`` appends the new K/V to the layer's store and tags them; the
``agacc`` attention function (attention.py) calls ``CompressedLayer.attend``, which attends over
the store and feeds the attention mass to the layer's tracker; after the last layer the cache
re-evaluates tiers (after every prefill, and every N_r decode steps): tracker -> policy -> store.

    cache = CompressedCache(model.config, AGACCConfig.preset("agacc"))
    model.generate(**inputs, past_key_values=cache)
    cache.memory(); cache.snapshot()
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from agacc import policy
from agacc.attention import attend, observe_prefill
from agacc.config import AGACCConfig
from agacc.decode import decode_attention
from agacc.importance import WINDOW_ITEMSIZE, ImportanceTracker, block_max, max_pool
from agacc.store import LayerStore, block_cost_bytes, marker_cost_bytes
from agacc.tiers import EVICTED, FULL, HOT, NAMES

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


class CompressedLayer(CacheLayerMixin):
    """One attention layer: its ``LayerStore`` (bytes) and ``ImportanceTracker`` (history)."""

    is_sliding = False

    def __init__(self, cache: "CompressedCache", layer_idx: int):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.store: LayerStore | None = None
        self.tracker = ImportanceTracker(cache.cfg, cache.layer_weights[layer_idx])
        self.scores = torch.zeros(0)  # latest normalised block scores (snapshot)

    def lazy_initialization(self, key_states, value_states):
        cfg = self.cache.cfg
        self.dtype, self.device = key_states.dtype, key_states.device
        store_dtype = self.dtype if (cfg.store_dtype == "model" or not cfg.compress) else _DTYPES[cfg.store_dtype]
        self.store = LayerStore(cfg, self.device, store_dtype)
        self.tracker.device = self.device
        self.tracker.importance = self.tracker.importance.to(self.device)
        self.tracker.window = self.tracker.window.to(self.device)
        self.is_initialized = True

    # --- transformers cache-layer API -------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.store.append(key_states, value_states)
        key_states._agacc_layer = self  # read by the agacc attention function
        return key_states, value_states

    def get_seq_length(self) -> int:
        return 0 if self.store is None else self.store.seq_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return (0 if self.store is None else self.store.n_entries) + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.store = None
        self.is_initialized = False
        self.tracker = ImportanceTracker(self.cache.cfg, self.cache.layer_weights[self.layer_idx])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("CompressedCache cannot be cropped (tokens may already be compressed)")

    def reorder_cache(self, beam_idx):
        if self.store is not None:
            self.store.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        if self.store is not None:
            self.store.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices):
        if self.store is not None:
            self.store.map_batch(lambda t: t[indices])

    # --- attention -----------------------------------------------------------------------------
    def attend(self, query, key, value, attention_mask, scaling):
        """query [Bt, Hq, q, D]; key/value: the q new tokens (already stored). -> [Bt, q, Hq, D]."""
        cfg, store = self.cache.cfg, self.store
        q = query.shape[2]
        n_prior = store.n_entries - q
        if q > 1:
            _check_no_padding(attention_mask, cfg)
        if q == 1:
            # the lossless preset keeps entries in position order, so a padding mask applies as is
            mask = attention_mask if (attention_mask is not None and not cfg.compress) else None
            out, mass = _decode_attention(query, store, scaling, mask)
            self.tracker.observe(mass)  # per entry; mapped to tokens at the re-evaluation
        elif n_prior == 0:
            g = query.shape[1] // key.shape[1]
            out = F.scaled_dot_product_attention(
                query, key.to(query.dtype), value.to(query.dtype), attn_mask=attention_mask,
                is_causal=attention_mask is None, scale=scaling, enable_gqa=g > 1,
            ).transpose(1, 2).contiguous()
            self.tracker.init_prefill(observe_prefill(query, key, scaling, cfg.n_q))
        else:
            entries = store.attention_entries(query.dtype)
            out, mass = attend(query, entries, scaling, causal_new=q, n_obs=cfg.n_q)
            self.tracker.init_prefill(store.token_mass(mass))
        if self.layer_idx == self.cache.n_layers - 1:
            self.cache._step_done(q)
        return out


def _decode_attention(query, store, scaling, mask=None):
    """Triton kernel on CUDA when the kernels package is importable, else the packed PyTorch path."""
    if query.is_cuda and mask is None:
        try:
            from kernels.dispatch import decode_attention as triton_decode
        except ImportError:
            triton_decode = None
        if triton_decode is not None:
            return triton_decode(query, store, scaling)
    return decode_attention(query, store, scaling, mask)


def _check_no_padding(mask, cfg):
    """Compressed storage shares one tier layout across the batch: padded rows are not supported."""
    if mask is None or not cfg.compress:
        return
    last = mask[..., -1, :]
    ok = last.all() if last.dtype == torch.bool else (last == 0).all()
    if not bool(ok):
        raise ValueError("CompressedCache does not support padded batches; use batch size 1 or equal-length prompts")


@dataclass(frozen=True)
class Geometry:
    """Shape facts the cost model needs."""
    n_layers: int
    heads: int
    head_dim: int
    batch: int
    full_itemsize: int


class CompressedCache(Cache):
    """KV cache with attention-guided mixed-precision storage.

    Args:
        model_config: the model's ``PretrainedConfig`` (layers, KV heads, head dim).
        config: an ``AGACCConfig`` (default: the ``agacc`` preset).
        record_history: keep the normalised block scores of every re-evaluation on the host
            (``history``), so tiers can be replayed under other thresholds without generating.
    """

    def __init__(self, model_config, config: AGACCConfig | None = None, record_history: bool = False):
        tc = _text_config(model_config)
        self.cfg = config if config is not None else AGACCConfig.preset("agacc")
        self.n_layers = tc.num_hidden_layers
        self.n_kv_heads = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
        self.head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        self.layer_weights = policy.layer_weights(self.cfg, self.n_layers)
        self.record_history = record_history
        self.history: list[dict] = []
        self.steps = 0           # decode steps since the last prefill
        self.reevaluations = 0
        self.threshold_scale = 1.0
        super().__init__(layers=[CompressedLayer(self, i) for i in range(self.n_layers)])

    # --- schedule --------------------------------------------------------------------------
    def _step_done(self, q_len: int) -> None:
        if q_len > 1:
            self.reevaluate(prefill=True)
            return
        self.steps += 1
        if self.steps % self.cfg.n_r == 0:
            self.reevaluate()

    @property
    def seq_len(self) -> int:
        return self.layers[0].get_seq_length()

    def _geometry(self) -> Geometry:
        st = self.layers[0].store
        return Geometry(self.n_layers, self.n_kv_heads, self.head_dim, st.hot_k.shape[0] if st.hot_k is not None else 1,
                        torch.empty(0, dtype=st.dtype).element_size())

    def reevaluate(self, prefill: bool = False) -> None:
        """Tracker -> normalised block scores -> policy -> store, for every layer (000 §2.6).
        ``prefill``: this re-evaluation follows a forward of prompt tokens (the eviction guard
        ``cfg.spill`` applies)."""
        cfg = self.cfg
        layers = [l for l in self.layers if l.store is not None]
        if not layers:
            return
        for l in layers:
            l.tracker.update(l.store.token_mass)  # before apply_tiers changes the entry layout
        seq_len = self.seq_len
        n_ready = layers[0].store.n_ready_blocks()
        token_scores = [l.tracker.scores(seq_len, n_ready * cfg.block_size) for l in layers]
        if cfg.share_across_layers:
            mean = torch.stack(token_scores).mean(0)
            token_scores = [mean for _ in layers]
        if cfg.pool_kernel > 1:
            token_scores = [max_pool(s, cfg.pool_kernel) for s in token_scores]
        block_scores = [block_max(s, cfg.block_size, n_ready).cpu() for s in token_scores]
        if cfg.tsp_layer is not None and cfg.tsp_layer < len(block_scores):
            block_scores = block_scores[: cfg.tsp_layer] + [block_scores[cfg.tsp_layer]] * (len(block_scores) - cfg.tsp_layer)
        for l, s in zip(layers, block_scores):
            l.scores = s
        self.reevaluations += 1
        overhead = self.unplanned_bytes() + self.headroom_bytes()  # what the ratio fitter adds to its plan
        if self.record_history:
            self.history.append({"step": self.steps, "seq_len": seq_len, "n_ready": n_ready, "overhead": overhead,
                                 "prefill": prefill, "scores": [s.clone() for s in block_scores]})
        if cfg.compress and n_ready > 0:
            geo = self._geometry()
            if cfg.target_ratio is not None:
                prev = None if cfg.host_copy else [(l.store.block_tier, l.store.block_bits, l.store.block_keep) for l in layers]
                self.threshold_scale = fit_threshold_scale(block_scores, cfg, geo, seq_len, cfg.target_ratio, overhead,
                                                           prev=prev, start=self.threshold_scale, prefill=prefill)
            plans = plan_tiers(block_scores, cfg, geo, seq_len, self.threshold_scale, prefill=prefill)
            for l, (tier, bits, keep) in zip(layers, plans):
                l.store.apply_tiers(tier, bits, keep, l.tracker.raw()[:seq_len])
        for l in layers:  # the next window, held (and counted) from now on
            l.tracker.start_window(l.store.n_entries)

    def headroom_bytes(self) -> int:
        """Room the ratio fitter leaves for the tokens that arrive before the next re-evaluation
        (N_r of them, at most one block: compress-once presets never re-evaluate); they join the
        hot region at full precision, so the target ratio holds until then, not only right now."""
        geo = self._geometry()
        per_token = 2 * geo.batch * geo.heads * geo.head_dim * geo.full_itemsize * geo.n_layers
        return min(self.cfg.n_r, self.cfg.block_size) * per_token

    def unplanned_bytes(self) -> int:
        """Bytes the tier plan does not cover (tracker state, block scores, the int32 block layout
        of the attention order, window slots of the tokens before the next re-evaluation), which the
        ratio fitter adds to the plan (the window held now is the plan's: one slot per entry)."""
        layers = [l for l in self.layers if l.store is not None]
        ahead = WINDOW_ITEMSIZE * min(self.cfg.n_r, self.cfg.block_size) * len(layers)  # window slots of the tokens to come
        tracker = sum(l.tracker.nbytes() - l.tracker.window.nbytes for l in layers)  # the window is in the plan
        return tracker + sum(l.scores.nbytes + 4 * l.store.n_ready_blocks() for l in layers) + ahead

    # --- reporting -------------------------------------------------------------------------
    def memory(self) -> dict:
        """Bytes actually held (``nbytes`` of every tensor) vs a 16-bit cache of the same tokens."""
        layers = [l for l in self.layers if l.store is not None]
        store_bytes = sum(l.store.nbytes() for l in layers)
        tracker_bytes = sum(l.tracker.nbytes() + l.scores.nbytes for l in layers)
        by_tier: dict[str, int] = {}
        for l in layers:
            for k, v in l.store.bytes_by_tier().items():
                by_tier[k] = by_tier.get(k, 0) + v
        by_tier["tracker"] = tracker_bytes
        total = store_bytes + tracker_bytes
        fp16 = 0
        for l in layers:
            st = l.store
            bt = st.hot_k.shape[0] if st.hot_k is not None else 1
            fp16 += 2 * bt * self.n_kv_heads * st.seq_len * self.head_dim * 2
        return {
            "bytes": total,
            "host_bytes": sum(l.store.host_nbytes() for l in layers),
            "bytes_fp16": fp16,
            "ratio": fp16 / total if total else 1.0,
            "by_tier": by_tier,
            "tokens": self.seq_len,
            "entries": sum(l.store.n_entries for l in layers),
        }

    def snapshot(self) -> dict:
        """Everything the app draws, per layer x block, as plain Python data (JSON-ready).

        importance [L][nb]: latest normalised block score (None for blocks still hot);
        tier [L][nb]: tier code (-1 hot, 0 full, 1 int8, 2 int4, 3 int3, 4 int2, 5 pruned, 6 evicted);
        bits [L][nb]: code bits (16 full/hot, 0 evicted); keep [L][nb]: kept elements per vector;
        markers [L]: evicted runs as [first_block, last_block]; token_importance [seq_len]: mean over
        layers of the normalised per-token score; memory: ``memory()``."""
        B = self.cfg.block_size
        seq_len = self.seq_len
        nb = -(-seq_len // B)
        imp, tiers, bits, keeps, markers, tok = [], [], [], [], [], []
        for l in self.layers:
            st = l.store
            t = torch.full((nb,), HOT, dtype=torch.int8)
            b = torch.full((nb,), 16, dtype=torch.int8)
            k = torch.full((nb,), self.head_dim, dtype=torch.int16)
            if st is not None and st.n_blocks:
                n = st.n_blocks
                t[:n], b[:n], k[:n] = st.block_tier.cpu(), st.block_bits.cpu(), st.block_keep.cpu()
            s = [None] * nb
            for i, v in enumerate(l.scores.tolist()[:nb]):
                s[i] = round(float(v), 5)
            imp.append(s)
            tiers.append(t.tolist())
            bits.append(b.tolist())
            keeps.append(k.tolist())
            markers.append(st.markers.span.tolist() if st is not None else [])
            if st is not None and seq_len:
                tok.append(l.tracker.scores(seq_len, max(1, st.n_ready_blocks() * B)).cpu())
        token_importance = torch.stack(tok).mean(0).tolist() if tok else []
        return {
            "step": self.steps, "seq_len": seq_len, "block_size": B, "n_layers": self.n_layers,
            "reevaluations": self.reevaluations, "threshold_scale": self.threshold_scale,
            "importance": imp, "tier": tiers, "bits": bits, "keep": keeps, "markers": markers,
            "token_importance": [round(x, 5) for x in token_importance],
            "tier_names": list(NAMES), "memory": self.memory(), "config": self.cfg.to_dict(),
        }


def fit_thresholds(block_scores, cfg: AGACCConfig, geo: Geometry, seq_len: int, target_ratio: float,
                   overhead_bytes: int = 0, prefill: bool = False) -> AGACCConfig:
    """Target ratio -> a config whose thresholds (tau_h, tau_l, tau_e; tau_prune and C_max for the
    rules that use them) reach it on these block scores."""
    s = fit_threshold_scale(block_scores, cfg, geo, seq_len, target_ratio, overhead_bytes, prefill=prefill)
    kw = dict(tau_h=cfg.tau_h * s, tau_l=cfg.tau_l * s, tau_e=cfg.tau_e * s, tau_prune=cfg.tau_prune * s,
              target_ratio=None)
    if cfg.c_max is not None:
        kw["c_max"] = min(1.0, cfg.c_max / s)
    return cfg.with_overrides(**kw)


# --- planning: scores -> tiers for every layer (also used by replay and the ratio fitter) --------

def plan_tiers(block_scores: list[torch.Tensor], cfg: AGACCConfig, geo: Geometry, seq_len: int, scale: float = 1.0,
               prefill: bool = False):
    """Per layer (tier, bits, keep) for the ready blocks; sinks stay full; the C_max budget applies.
    ``prefill``: the re-evaluation ends a prefill, so the thresholds rule's eviction guard
    (``cfg.spill``) applies."""
    B = cfg.block_size
    sink_blocks = -(-cfg.n_sink // B) if cfg.n_sink else 0
    out = []
    budgets = None
    if cfg.c_max is not None:
        hot_blocks = -(-(seq_len - (block_scores[0].numel() * B)) // B)
        budgets = policy.layer_budgets(cfg, policy.budget_weights(cfg, block_scores), seq_len, B,
                                       [sink_blocks + hot_blocks] * len(block_scores), scale)
    if cfg.rule == "thresholds" and block_scores:  # elementwise: all layers in one call
        stacked = policy.thresholds_rule(torch.stack(block_scores), cfg, geo.head_dim, scale,
                                         guard=cfg.spill if prefill else 0.0)
        raw = [(t, b, k) for t, b, k in zip(*stacked)]
    else:
        raw = [policy.assign_tiers(s, cfg, geo.head_dim, layer, scale) for layer, s in enumerate(block_scores)]
    for layer, (s, (tier, bits, keep)) in enumerate(zip(block_scores, raw)):
        n_sink = min(sink_blocks, s.numel())
        tier[:n_sink], bits[:n_sink], keep[:n_sink] = FULL, 16, geo.head_dim
        if budgets is not None:
            rest = slice(n_sink, None)
            t2, b2, k2 = policy.apply_layer_budget(tier[rest], bits[rest], keep[rest], s[rest], budgets[layer])
            tier[rest], bits[rest], keep[rest] = t2, b2, k2
        out.append((tier, bits, keep))
    return out


def planned_bytes(plans, cfg: AGACCConfig, geo: Geometry, seq_len: int) -> int:
    """Bytes the plans would hold (cost model of store.py), hot region included, plus the tracker's
    attention window (one bf16 slot per entry the plan leaves); the rest of the tracker excluded."""
    if not plans:
        return 0
    B = cfg.block_size
    kw = dict(batch=geo.batch, heads=geo.heads, head_dim=geo.head_dim, block_size=B, full_itemsize=geo.full_itemsize,
              value_group_size=cfg.value_group_size, b_min=cfg.b_min, sparse_threshold=cfg.sparse_threshold,
              key_quant=cfg.key_quant, key_group_size=cfg.key_group_size)
    tier = torch.stack([p[0] for p in plans]).long()  # [L, n]
    bits = torch.stack([p[1] for p in plans]).long()
    keep = torch.stack([p[2] for p in plans]).long()
    n = tier.shape[1]
    hot_tokens = seq_len - n * B
    total = len(plans) * 2 * geo.batch * geo.heads * hot_tokens * geo.head_dim * geo.full_itemsize
    uniq, counts = torch.unique((tier * 32 + bits) * 1024 + keep, return_counts=True)  # one code per (tier, bits, keep)
    for code, count in zip(uniq.tolist(), counts.tolist()):
        total += count * block_cost_bytes(code // 1024 // 32, code // 1024 % 32, code % 1024, **kw)
    runs = 0
    if cfg.markers and n:
        ev = (tier == EVICTED).to(torch.int8)
        runs = int(((ev[:, 1:] == 1) & (ev[:, :-1] == 0)).sum()) + int(ev[:, 0].sum())
        total += runs * marker_cost_bytes(batch=geo.batch, heads=geo.heads, head_dim=geo.head_dim,
                                          full_itemsize=geo.full_itemsize)
    entries = int((tier != EVICTED).sum()) * B + runs + len(plans) * hot_tokens
    return total + WINDOW_ITEMSIZE * entries


def fit_threshold_scale(block_scores, cfg, geo, seq_len, target_ratio, overhead_bytes: int = 0,
                        tol: float = 1e-3, prev=None, start: float | None = None, byte_tol: float = 0.01,
                        prefill: bool = False) -> float:
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
    reach (recent window and sinks alone exceed it) the largest scale is returned."""
    fp16 = 2 * geo.batch * geo.heads * seq_len * geo.head_dim * 2 * len(block_scores)
    budget = fp16 / target_ratio - overhead_bytes

    prev_stacked = tuple(torch.stack(x) for x in zip(*prev)) if prev else None  # [L, n_old] each

    seen: dict[float, int] = {}

    def bytes_at(log_s):
        if log_s not in seen:
            plans = plan_tiers(block_scores, cfg, geo, seq_len, math.exp(log_s), prefill=prefill)
            if prev_stacked is not None:  # one floor over all layers at once
                floored = policy.fidelity_floor(prev_stacked, *(torch.stack(x) for x in zip(*plans)))
                plans = list(zip(*floored))
            seen[log_s] = planned_bytes(plans, cfg, geo, seq_len)
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
