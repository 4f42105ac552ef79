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

import contextlib
import copy
import warnings
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from agacc import planner
from agacc.attention import chunk_attention, dense_attention, observe_prefill
from agacc.config import CALIBRATED, AGACCConfig, forecasts, hot_width, repeat_weight
from agacc.decode import decode_attention
from agacc.importance import WINDOW_ITEMSIZE, ImportanceTracker
from agacc.planner import Geometry, sliding_windows
from agacc.policy import basis_layouts, basis_rank, layer_weights
from agacc.store import LayerStore, narrow_hot
from agacc.tiers import EVICTED, HOT, NAMES

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}

ENABLE_HINT = ("call agacc.enable(model) (or load it with agacc.load_model) before passing a CompressedCache; "
               "if you did, this architecture reads the cached K/V outside transformers' attention interface "
               "and is not supported (see agacc.models.unsupported_reason)")


class AttentionNotEnabledError(RuntimeError):
    """A ``CompressedCache`` was used by an attention that is not the ``agacc`` function."""


class _NeedsAgacc(torch.Tensor):
    """What ``CompressedLayer.update`` hands the model: a view of the *new* tokens' K/V, tagged with
    its layer for the ``agacc`` attention function, which unwraps it (``as_subclass``, no copy) and
    attends over everything the layer stores. Any other use -- transformers' sdpa / eager / flash
    functions, or model code touching the K/V between the cache and the attention -- would attend
    over the new tokens only (a silent wrong answer), so every torch operation on it raises instead.
    Cost: one tensor object per layer per forward (~1 us), no data copied, nothing checked per step."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise AttentionNotEnabledError(
            "the attention that ran is not agacc's: a CompressedCache hands the model only the new tokens' K/V, "
            f"and only the agacc attention function attends over everything it stores. Fix: {ENABLE_HINT}")


def unsupported_attention(model_config) -> str | None:
    """Why a ``CompressedCache`` cannot serve a model of this config (its attention is a variant no
    path implements), or None. Read from the config only: layer kinds, latent (MLA) caches,
    encoder-decoder (logit softcapping is applied by every path; sliding windows by every preset:
    ``CompressedLayer.attend``, ``CompressedCache.dropped_blocks``)."""
    tc = planner.text_config(model_config)
    if getattr(model_config, "is_encoder_decoder", False):
        return "encoder-decoder models (cross-attention caches) are not supported"
    if getattr(tc, "kv_lora_rank", None) is not None:
        return ("multi-head latent attention (MLA, DeepSeek-V2/V3 family): the cache holds a shared latent "
                "(kv_lora_rank) that the model expands after the cache, and the compressed paths attend over "
                "per-head K/V; compressing the latent is not implemented. Use a plain DynamicCache")
    if getattr(tc, "attention_chunk_size", None) is not None:
        return "chunked attention (attention_chunk_size) is not implemented by the compressed attention paths"
    kinds = set(getattr(tc, "layer_types", None) or ()) - {"full_attention", "sliding_attention"}
    if getattr(tc, "kv_sharing_modes", None) is not None:
        kinds.add("KV sharing across layers (kv_sharing_modes)")
    if kinds:
        return f"layer kinds {sorted(kinds)} are not implemented (only full and sliding-window attention)"
    return None


class CompressedLayer(CacheLayerMixin):
    """One attention layer: its ``LayerStore`` (bytes) and ``ImportanceTracker`` (history)."""

    is_sliding = False

    def __init__(self, cache: "CompressedCache", layer_idx: int):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.window = cache.windows[layer_idx]  # sliding window in tokens, None for a global layer
        self.store: LayerStore | None = None
        self.tracker = ImportanceTracker(cache.cfg, cache.layer_weights[layer_idx])
        self.scores = torch.zeros(0)  # latest normalised block scores (snapshot)

    def lazy_initialization(self, key_states, value_states):
        cfg = self.cache.cfg
        self.dtype, self.device = key_states.dtype, key_states.device
        store_dtype = self.dtype if (cfg.store_dtype == "model" or not cfg.compress) else _DTYPES[cfg.store_dtype]
        if self.window is not None and cfg.markers:  # what a sliding layer evicts, its window has passed: no marker
            cfg = cfg.with_overrides(markers=False)
        basis = self.cache.key_basis
        if basis is not None:  # this layer's table moves to the layer's device: the cache keeps that copy alone
            basis[self.layer_idx] = tuple(t.to(self.device) for t in basis[self.layer_idx])
        self.store = LayerStore(cfg, self.device, store_dtype, key_basis=None if basis is None else basis[self.layer_idx])
        self.tracker.to(self.device)
        self.is_initialized = True

    # --- transformers cache-layer API -------------------------------------------------------
    def update(self, key_states, value_states, *args, **kwargs):
        if self.cache.rows is not None:  # a padded batch: each row's own cache stores its tokens (``attend``)
            return self._tagged(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif self.layer_idx == 0 and key_states.shape[-2] == 1 and self.cache.held is not None \
                and self.cache.probe is None:  # (a lookahead's pseudo tokens read the held plan)
            self.cache.end_prefill()  # the first decode step: the prompt is in, its evictions are decided
        self.store.append(key_states, value_states)
        self.tracker.add_values(value_states)
        return self._tagged(key_states, value_states)

    def _tagged(self, key_states, value_states):
        """The new tokens' K/V, readable only by the agacc attention function (which attends over the store)."""
        key, value = key_states.as_subclass(_NeedsAgacc), value_states.as_subclass(_NeedsAgacc)
        key._agacc_layer = self
        return key, value

    def get_seq_length(self) -> int:
        if self.cache.rows is not None:
            return self.cache.padded_len
        return 0 if self.store is None else self.store.seq_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The mask's (kv_length, kv_offset): one column per position (padding included), the new tokens
        last. The lossless preset applies it to its entries (one per position); the compressing presets
        read only which new tokens are padding (``_pad_counts``)."""
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.store = None
        self.is_initialized = False
        self.tracker = ImportanceTracker(self.cache.cfg, self.cache.layer_weights[self.layer_idx])
        self.scores = torch.zeros(0)

    @property
    def is_croppable(self) -> bool:
        """transformers' flag: ``crop`` restores the cache exactly as it was. True for the lossless
        preset; a compressing preset crops only its hot region, and its tiers may already reflect the
        cropped tokens' attention."""
        return not self.cache.cfg.compress

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (transformers' convention: a negative count; 0 does
        nothing), as assisted decoding does with rejected draft tokens. Works while every cropped token is
        still in the hot region (uncompressed, in position order): always for the lossless preset, and for
        the last ``recent_window`` tokens at least for the others; raises otherwise, changing nothing."""
        self.check_crop(tokens_to_remove)
        if tokens_to_remove and self.store is not None:
            self.truncate(self.store.seq_len + tokens_to_remove)

    def check_crop(self, tokens_to_remove: int) -> None:
        """Raise (a ValueError naming the fix) unless ``crop(tokens_to_remove)`` can be carried out."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number of tokens to remove "
                             "(transformers' convention; a positive absolute length is not supported)")
        st, r = self.store, -tokens_to_remove
        if st is not None and r > st.seq_len - st.hot_start:
            raise ValueError(
                f"cannot crop {r} tokens from layer {self.layer_idx}: only the last {st.seq_len - st.hot_start} of its "
                f"{st.seq_len} tokens are uncompressed, the rest are already stored in tiers (preset "
                f"{self.cache.cfg.name!r}). Crop fewer tokens, raise recent_window, or use the lossless preset 'full'")

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` tokens (``n >= store.hot_start``: only hot tokens go): the store's hot
        K/V [Bt, H, n_hot, D] and the tracker's per-token and per-entry state."""
        st, tr = self.store, self.tracker
        st.truncate(n)
        tr.truncate(n)
        tr.window = tr.window[: st.n_entries]  # entries are in attention order: the hot ones last

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
    def attend(self, query, key, value, attention_mask, scaling, softcap=None):
        """query [Bt, Hq, q, D]; key/value: the q new tokens (already stored), as ``update`` returned
        them; ``softcap``: the model's logit softcapping (Gemma2), in every path. -> [Bt, q, Hq, D]."""
        key, value = key.as_subclass(torch.Tensor), value.as_subclass(torch.Tensor)  # views, no copy
        cfg, store = self.cache.cfg, self.store
        q = query.shape[2]
        if self.layer_idx == 0:  # padding is the forward's, the same in every layer: read its mask once
            self.cache.forward_pads = _pad_counts(attention_mask, q, query.shape[0])
        pads = self.cache.forward_pads
        if self.cache.rows is not None or any(pads):
            return self.attend_rows(query, key, value, pads, scaling, softcap)
        n_prior = store.n_entries - q
        # a sliding layer past its window, applied by position (compressing presets: entries are not in
        # position order; the lossless preset: when no mask carries it, a padded batch's row)
        past = self.window is not None and store.seq_len > self.window
        window = self.window if past and (cfg.compress or attention_mask is None) else None
        if q == 1:
            # the lossless preset keeps entries in position order, so a padding mask applies as is
            mask = attention_mask if (attention_mask is not None and not cfg.compress) else None
            if window is not None:  # the PyTorch path, masked by position
                mask = (store.entry_positions() > store.seq_len - 1 - window).view(1, 1, 1, -1)
            out, mass = decode_attention(query, store, scaling, mask, softcap)  # the backend is chosen there
            if self.cache.probe is None:
                self.tracker.observe(mass)  # per entry; mapped to tokens at the re-evaluation
            else:  # a pseudo token of a lookahead (agacc.probe): its attention kept aside
                self.cache.probe.observe(self.layer_idx, store.token_mass(mass))
        elif n_prior == 0:
            if window is not None and attention_mask is None:  # causal within the window
                i = torch.arange(q, device=query.device)
                attention_mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
            out = dense_attention(query, key, value, attention_mask, scaling, softcap)
            self.tracker.init_prefill(observe_prefill(query, key, scaling, cfg.n_q, softcap=softcap, window=window))
        elif not cfg.compress and attention_mask is not None:
            # lossless, a later chunk (assisted decoding's draft check, a next turn): every entry is hot and in
            # position order, so the mask (causal, padding, sliding window) applies as is, as with a plain cache
            out = dense_attention(query, store.hot_k, store.hot_v, attention_mask, scaling, softcap)
            # the observation window's mass alone (n_q queries), not a second pass of every query
            self.tracker.init_prefill(observe_prefill(query, store.hot_k, scaling, cfg.n_q, softcap=softcap,
                                                      window=self.window if past else None))
        else:  # a later chunk of a prompt: key slices over the packed store, never a dequantised copy
            pos = dict(window=window, positions=store.entry_positions(), q_start=store.seq_len - q) if window else {}
            probe = self.cache.probe  # a context probe's chunk (agacc.probe): the most its queries pay, kept aside
            out, mass = chunk_attention(query, store.parts(), scaling, n_new=q, n_obs=probe.n_obs if probe else cfg.n_q,
                                        softcap=softcap, reduce=probe.queries if probe else "mean", **pos)
            if probe is None:
                self.tracker.init_prefill(store.token_mass(mass))
            else:
                probe.observe(self.layer_idx, store.token_mass(mass))
        if self.layer_idx == self.cache.n_layers - 1:
            self.cache._step_done(q)
        return out


    def attend_rows(self, query, key, value, pads, scaling, softcap):
        """A padded batch: every row has a cache of its own
        (``CompressedCache.rows``, made at the first forward) that stores, scores and tiers only that
        row's tokens, as if it ran alone; padding is never stored. Row by row: its real new tokens are
        appended to its layer and attended (``attend``), the outputs are laid back in the batch (zeros
        at padding). query [Bt, Hq, q, D]; key/value [Bt, H, q, D], the forward's new tokens; ``pads``:
        per row, how many of them are padding (``_pad_counts``)."""
        cache, q = self.cache, query.shape[2]
        if cache.rows is None:
            if self.layer_idx != 0 or self.store.n_entries != q:
                raise ValueError(
                    "a padded batch reached a CompressedCache that already holds tokens: padding can only start "
                    f"with the first prompt (preset {cache.cfg.name!r}). Start a new cache for a padded batch")
            cache.split_rows(query.shape[0])
        if self.store is not None:  # the first forward's K/V, stored before the padding showed: the rows take them
            self.reset()
        out = torch.zeros(query.shape[0], q, query.shape[1], query.shape[3], dtype=query.dtype, device=query.device)
        for r, (row, p) in enumerate(zip(cache.rows, pads)):
            if p == q:  # nothing but padding in this forward
                continue
            layer = row.layers[self.layer_idx]
            k, v = layer.update(key[r:r + 1, :, p:], value[r:r + 1, :, p:])
            out[r:r + 1, p:] = layer.attend(query[r:r + 1, :, p:], k, v, None, scaling, softcap)
        if self.layer_idx == cache.n_layers - 1:
            cache.padded_len += q
        return out


def _add_counts(dicts) -> dict[str, int]:
    """Key-wise sums of {name: count} dicts (bytes by tier over layers, or over a padded batch's rows)."""
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _pad_counts(mask, q: int, batch: int) -> list[int]:
    """Per row, how many of a forward's q new tokens are padding: keys its 4D mask [Bt, 1, q, kv] (bool:
    True = visible, or additive; the new tokens' columns last, ``get_mask_sizes``) hides from every query
    of the row (a token always sees itself, with or without a sliding window). No mask: none."""
    if mask is None:
        return [0] * batch
    new = mask[..., -q:]  # the new tokens' columns [Bt, 1, q, q]: O(q^2), whatever the context
    seen = new.any(-2) if new.dtype == torch.bool else (new == 0).any(-2)
    return (~seen[:, 0]).sum(-1).tolist()


class CompressedCache(Cache):
    """KV cache with attention-guided mixed-precision storage.

    Args:
        model_config: the model's ``PretrainedConfig`` (layers, KV heads, head dim).
        config: an ``AGACCConfig`` (default: the ``agacc`` preset).
        record_history: keep the normalised block scores of every re-evaluation on the host
            (``history``), so tiers can be replayed under other thresholds without generating.
    """

    def __init__(self, model_config, config: AGACCConfig | None = None, record_history: bool = False):
        reason = unsupported_attention(model_config)
        if reason is not None:
            raise ValueError(f"CompressedCache cannot serve this model: {reason}")
        geo = Geometry.of(model_config)
        from agacc import basis
        from agacc.calibrate import resolve

        cfg = config if config is not None else AGACCConfig.preset("agacc")
        # the model's own: its keys' format (agacc.basis) and its layers' calibration (agacc.calibrate)
        self.cfg = resolve(cfg.with_overrides(key_quant=basis.default_key_quant(cfg, model_config)), model_config)
        self.n_layers, self.n_kv_heads, self.head_dim = geo.n_layers, geo.heads, geo.head_dim
        self.layer_weights = layer_weights(self.cfg, self.n_layers)
        self.record_history = record_history
        self.windows = sliding_windows(model_config)  # per layer: its sliding window (tokens) or None
        self.key_basis = None  # per layer, its key basis (agacc.basis) where keys may be held in one
        if self.cfg.key_quant == "basis":
            table = basis.require(model_config)
            if tuple(table.V.shape[:3]) != (geo.n_layers, geo.heads, geo.head_dim):
                raise ValueError(f"the key basis filed for this model has {tuple(table.V.shape[:3])} (layers, KV "
                                 f"heads, head dim), the model {(geo.n_layers, geo.heads, geo.head_dim)}: re-run "
                                 "python -m agacc calibrate --key-basis --save")
            # the most coefficients a block keeps: the axes held (none where keys are per token: keep_all)
            r = basis_rank(basis_layouts(self.cfg, geo.head_dim))
            self.key_basis = [table.layer(i, r) for i in range(geo.n_layers)] if r else None
        self._start()
        super().__init__(layers=[CompressedLayer(self, i) for i in range(self.n_layers)])

    def _start(self) -> None:
        """The cache-level state of an empty cache (``__init__`` and ``reset``)."""
        self.history: list[dict] = []
        self.steps = 0           # decode steps since the last prefill
        self.reevaluations = 0
        self.threshold_scale = 1.0
        self.peak_bytes = 0      # the most bytes held at once since creation (or reset_peak)
        self.held = None         # stacked plans whose evictions wait for the prompt's end (hold_evictions)
        self.paused = 0          # > 0 inside ``no_reevaluation()``
        self.teacher_forced = False  # a forward of q > 1 tokens counts as q decode steps (``teacher_forcing()``)
        self.rows: list[CompressedCache] | None = None  # a padded batch: one cache per row (``split_rows``)
        self.padded_len = 0      # with rows: positions so far, padding included (what a plain cache holds)
        self.forward_pads: list[int] = []  # per row, the padding among this forward's tokens (layer 0 reads it)
        self.probe = None        # an ``agacc.probe.Probe`` while a probe's tokens go in (a context, a lookahead)
        self.looked_ahead = False  # ``agacc.probe.lookahead`` ran on the latest prompt (``config.forecasts``)
        # the latest prompt's forwards' (token ids [Bt, q], padding mask [Bt, q] or None), None where it went in as
        # embeddings: ``agacc.enable``'s hook records them (references, no copy) for the repeat (cfg.repeat_weight)
        self.prompt_ids: list = []

    def reset(self) -> None:
        """Empty the cache for a new sequence, as if just created: every layer's store, tracker and
        scores, and the step count, re-evaluations, threshold scale, peak bytes, history and held plans."""
        super().reset()
        self._start()

    def split_rows(self, batch: int) -> None:
        """Give each of ``batch`` rows an empty cache of its own (``rows``), of this one's settings: a
        padded batch, whose rows hold different numbers of tokens (``CompressedLayer.attend_rows``)."""
        rows = []
        for _ in range(batch):
            row = copy.copy(self)  # the settings (config, geometry, windows), shared; then a fresh state
            row._start()
            Cache.__init__(row, layers=[CompressedLayer(row, i) for i in range(self.n_layers)])
            rows.append(row)
        self.rows = rows

    def crop(self, tokens_to_remove: int) -> None:
        """``CompressedLayer.crop`` on every layer, once every layer can (else nothing changes)."""
        if self.rows is not None:
            raise ValueError("crop() of a padded batch is not supported (transformers' assisted decoding runs one "
                             "row); crop each row's cache (cache.rows[i]) or run the rows one at a time")
        for layer in self.layers:
            layer.check_crop(tokens_to_remove)
        super().crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: reorder the batch (a padded batch: its rows' caches, copied where a row repeats)."""
        if self.rows is None:
            return super().reorder_cache(beam_idx)
        used, rows = set(), []
        for i in beam_idx.tolist():
            rows.append(copy.deepcopy(self.rows[i]) if i in used else self.rows[i])
            used.add(i)
        self.rows = rows

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.rows is None:
            return super().batch_repeat_interleave(repeats)
        self.rows = [r if j == 0 else copy.deepcopy(r) for r in self.rows for j in range(repeats)]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.rows is None:
            return super().batch_select_indices(indices)
        self.rows = [self.rows[i] for i in indices.tolist()]

    def plain_tokens(self, layer: int, seq_len: int) -> int:
        """Tokens transformers' own cache holds for ``layer`` after ``seq_len``: all of them, or on a
        sliding layer the last window - 1 (the next query brings the window's last)."""
        w = self.windows[layer]
        return seq_len if w is None else min(seq_len, w - 1)

    def dropped_blocks(self, n_ready: int) -> list[int] | None:
        """Per layer, the first blocks whose tokens every later query's window has passed (a sliding
        layer; at most the ``n_ready`` planned ones), or None when no layer has any."""
        B, n = self.cfg.block_size, self.seq_len
        out = [0 if w is None else min(n_ready, max(0, n - w + 1) // B) for w in self.windows]
        return out if any(out) else None

    # --- schedule --------------------------------------------------------------------------
    @contextlib.contextmanager
    def no_reevaluation(self):
        """Tokens forwarded inside this block are stored (hot, full precision) and observed, but no
        re-evaluation runs: the tiers stay as planned before it. The query-agnostic protocol asks its
        question so, after ``end_prefill()``, keeping the plan the context alone made."""
        with contextlib.ExitStack() as rows:
            for row in self.rows or ():
                rows.enter_context(row.no_reevaluation())
            self.paused += 1
            try:
                yield self
            finally:
                self.paused -= 1

    def teacher_forcing(self) -> None:
        """From now on a forward of q tokens counts as q decode steps (a re-evaluation whenever a multiple
        of N_r is crossed) instead of a prompt chunk: teacher-forced evaluation in chunks after the prompt
        keeps the schedule of one token a forward. Copies (``copy.deepcopy``) keep it; ``reset`` clears it."""
        self.teacher_forced = True

    def _step_done(self, q_len: int) -> None:
        """After the last layer of a forward: every layer holds its new tokens, none is compressed yet,
        so this is when the bytes held peak; then the schedule's re-evaluation, and where ``hot_width`` is 8 the
        forward's tokens, attended and (a prompt's) planned at full precision, go to 8 bits (``narrow_hot``)."""
        self.peak_bytes = max(self.peak_bytes, self.held_bytes())
        if not self.paused:
            if q_len > 1 and not self.teacher_forced:
                self.looked_ahead = False  # a prompt (or its next chunk): its plan is new
                self.reevaluate(prefill=True)
            else:
                before, self.steps = self.steps, self.steps + q_len
                if self.steps // self.cfg.n_r > before // self.cfg.n_r:
                    self.reevaluate()
        if hot_width(self.cfg) == 8:  # the forward's tokens, attended and planned: to 8 bits
            narrow_hot([l.store for l in self.layers if l.store is not None])

    @property
    def seq_len(self) -> int:
        return self.layers[0].get_seq_length()

    def _geometry(self) -> Geometry:
        st = self.layers[0].store
        return Geometry(self.n_layers, self.n_kv_heads, self.head_dim, st.batch, st.dtype.itemsize)

    def reevaluate(self, prefill: bool = False) -> None:
        """Tracker -> normalised block scores -> policy -> store, for every layer (000 §2.6).
        ``prefill``: this re-evaluation follows a forward of prompt tokens (the eviction guard
        ``cfg.spill`` applies)."""
        from agacc.importance import scores_all, update_all
        from agacc.store import apply_plans, token_mass_all

        cfg = self.cfg
        layers = [l for l in self.layers if l.store is not None]
        if not layers:
            return
        trackers = [l.tracker for l in layers]
        stores = [l.store for l in layers]
        # the windows to tokens, before the tiers change the entry layout
        update_all(trackers, [st.token_mass for st in stores], lambda ws: token_mass_all(stores, ws))
        seq_len = self.seq_len
        n_ready = layers[0].store.n_ready_blocks()
        for t in trackers:  # (config.block_state: the tiered blocks' state packed, 8 bytes a block)
            t.pack(n_ready)
        token_scores = scores_all(trackers, seq_len, n_ready * cfg.block_size)  # [L, seq_len]
        block_scores = planner.block_scores(token_scores, cfg, n_ready)
        for l, s in zip(layers, block_scores):
            l.scores = s
        self.reevaluations += 1
        unplanned = self.unplanned_bytes()
        overhead = unplanned + self.ahead_bytes() + self.headroom_bytes()  # what the ratio fitter adds to its plan
        prices = self.tracker_prices()  # the tracker state a plan holds (its blocks' tokens, its evictions)
        dropped = self.dropped_blocks(n_ready)
        reference = self.reference_bytes()
        if self.record_history:
            self.history.append({"step": self.steps, "seq_len": seq_len, "n_ready": n_ready, "block_size": cfg.block_size,
                                 "overhead": overhead, "dropped": dropped, "bytes_fp16": reference,
                                 **{k: getattr(cfg, k) for k in CALIBRATED},
                                 "unplanned": unplanned, "tracker_prices": prices, "prefill": prefill,
                                 "scores": [s.clone() for s in block_scores]})
        if cfg.compress and n_ready > 0:
            geo = self._geometry()
            fitted: dict = {}  # scale -> the plans (stacked, floored) of every scale the fitter tried
            window = dict(dropped=dropped, reference_bytes=reference)  # sliding layers: their windows
            if cfg.target_ratio is not None:
                prev = None if cfg.host_copy else [(l.store.block_tier, l.store.block_bits, l.store.block_keep) for l in layers]
                self.threshold_scale = planner.fit_threshold_scale(block_scores, cfg, geo, seq_len, cfg.target_ratio,
                                                                   overhead, prev=prev, start=self.threshold_scale,
                                                                   prefill=prefill, plans_out=fitted, tracker=prices,
                                                                   **window)
            floored = self.threshold_scale in fitted  # the fitter planned (and floored) this scale already
            plans = fitted[self.threshold_scale] if floored else planner.plan_tiers(
                block_scores, cfg, geo, seq_len, self.threshold_scale, prefill=prefill, stacked=True, dropped=dropped)
            self.held = None
            if prefill and cfg.hold_evictions and not cfg.host_copy:
                gentle = plans
                if cfg.gentle_prefill:
                    gentle = planner.fit_plans(block_scores, cfg, geo, seq_len, cfg.prefill_ratio, overhead,
                                               prev, self.threshold_scale, prefill, tracker=prices, **window)
                held = planner.held_plans(*gentle, cfg, self.head_dim, dropped)
                if any(a is not b for a, b in zip(held, plans)):  # blocks would go or lose bits: held till the prompt ends
                    self.held, plans, floored = plans, held, False
            apply_plans(stores, *plans, self._token_weight(layers), floored=floored)
            _forget_evicted(layers)
        for l in layers:  # the next window, held (and counted) from now on
            l.tracker.start_window(l.store.n_entries)

    def end_prefill(self) -> None:
        """Carry out the evictions the last prompt chunk's re-evaluation held (``hold_evictions``): the
        plan it made with the whole prompt's evidence, applied as made. Called by the first decode
        step; call it yourself to compress a context before its question arrives (query-agnostic
        reuse of one compressed context). Nothing held: nothing to do."""
        for row in self.rows or ():
            row.end_prefill()
        self.prompt_ids = []
        if forecasts(self.cfg) and not self.looked_ahead and self.rows is None:
            self.looked_ahead = True  # (warned once a prompt)
            what = " and ".join(f"{f}={v}" for f, v in (("lookahead", self.cfg.lookahead),
                                                        ("repeat_weight", repeat_weight(self.cfg))) if v)
            warnings.warn(f"AGACC: {what} did not run before the prompt's plan was carried "
                          "out: call agacc.probe.lookahead(model, cache, next_token) before end_prefill(), or let the "
                          "first decode step (one token) run it in a model switched by agacc.enable", stacklevel=2)
        if self.held is None:
            return
        plans, self.held = self.held, None
        layers = [l for l in self.layers if l.store is not None]
        from agacc.store import apply_plans

        apply_plans([l.store for l in layers], *plans, self._token_weight(layers))
        _forget_evicted(layers)
        for l in layers:  # the layout changed before anything was observed in the window
            l.tracker.start_window(l.store.n_entries)

    def rescore_prompt(self, token_scores: list[torch.Tensor]) -> None:
        """Replace the importance of the tokens held (per layer, [n <= seq_len] fp32: their first n) and
        re-make the prompt's plan from it, as the re-evaluation that ends a prefill would (the held
        evictions included, applied by ``end_prefill``). For a context scored another way before its
        question is known (``agacc.probe``). Blocks already cut to fewer bits or evicted stay so."""
        if self.rows is not None:
            raise ValueError("rescore_prompt() of a padded batch is not supported: rescore each row's cache (cache.rows[i])")
        layers = [l for l in self.layers if l.store is not None]
        if len(token_scores) != len(layers):
            raise ValueError(f"rescore_prompt() needs one score tensor per layer ({len(layers)}), got {len(token_scores)}")
        for l, s in zip(layers, token_scores):
            l.tracker.set_raw(s)
        self.reevaluate(prefill=True)

    def _token_weight(self, layers):
        if not self.cfg.markers:  # (only a marker weighs its tokens)
            return lambda i: None
        seq_len = self.seq_len
        return lambda i: layers[i].tracker.raw()[:seq_len]

    def headroom_bytes(self) -> int:
        """Room the ratio fitter leaves for the tokens that arrive before the next re-evaluation
        (N_r of them, at most one block: compress-once presets never re-evaluate); they join the
        hot region (``planner.headroom_bytes``), so the target ratio holds until then, not only right now."""
        return planner.headroom_bytes(self.cfg, self._geometry())

    def unplanned_bytes(self) -> int:
        """Bytes held that the tier plan does not cover (tracker state but the ready blocks' (a plan prices
        it: ``tracker_prices``), block scores, the int32 block layout of the attention order, the key basis):
        ``planned_bytes(..., tracker=tracker_prices())`` + these = what the cache holds under a plan
        (the window held now is the plan's: one slot per entry). Recorded with the history, so a
        replay reports bytes held."""
        layers = [l for l in self.layers if l.store is not None]
        tracker = sum(l.tracker.nbytes() - l.tracker.window.nbytes for l in layers)  # the window is in the plan
        per_token, per_evicted = self.tracker_prices()
        for l in layers:  # what a plan of the ready blocks prices (see tracker_prices; without forgetting the
            ev = l.tracker.n_evicted  # tracker counts none, and an evicted block is priced as a kept one)
            tracker -= per_token * (l.store.n_ready_blocks() - ev) * self.cfg.block_size + per_evicted * ev
        basis = sum(t.nbytes for l in layers for t in l.store.basis_tensors())  # a fixed cost per layer
        return round(tracker) + basis + sum(l.scores.nbytes + 4 * l.store.n_ready_blocks() for l in layers)

    def tracker_prices(self) -> tuple[float, int]:
        """``planner.tracker_prices`` of this cache's trackers now (the window sums they hold)."""
        chunks = next((len(l.tracker.chunks) for l in self.layers if l.store is not None), 0)
        return planner.tracker_prices(self.cfg, chunks)

    def ahead_bytes(self) -> int:
        """Window slots of the tokens that arrive before the next re-evaluation (the ratio fitter
        leaves room for them)."""
        return WINDOW_ITEMSIZE * min(self.cfg.n_r, self.cfg.block_size) * sum(l.store is not None for l in self.layers)

    # --- reporting -------------------------------------------------------------------------
    def held_bytes(self) -> int:
        """``memory()["bytes"]``: the store's tensors and the tracker's, counted once."""
        if self.rows is not None:
            return sum(row.held_bytes() for row in self.rows)
        return sum(l.store.nbytes() + l.tracker.nbytes() + l.scores.nbytes for l in self.layers if l.store is not None)

    def reference_bytes(self) -> int:
        """``memory()["bytes_fp16"]``: what a 16-bit cache of the same tokens holds, as transformers' own
        cache holds them (every token; on a sliding layer its window, ``plain_tokens``)."""
        layers = [l for l in self.layers if l.store is not None]
        return sum(Geometry(1, self.n_kv_heads, self.head_dim, l.store.batch).bytes_fp16(
            self.plain_tokens(l.layer_idx, l.store.seq_len)) for l in layers)

    def reset_peak(self) -> None:
        """Start ``memory()["peak_bytes"]`` again from what is held now."""
        for row in self.rows or ():
            row.reset_peak()
        self.peak_bytes = self.held_bytes()

    def memory(self) -> dict:
        """Bytes actually held (``nbytes`` of every tensor) vs a 16-bit cache of the same tokens;
        ``peak_bytes``: the most held at once since the cache was created (or ``reset_peak``), measured
        after every forward, before the re-evaluation compresses (a forward only adds tokens).
        A padded batch: the sums over its rows' caches (each row's tokens only, never padding; the rows
        forward and compress together, so their peaks add); ``tokens``: positions, padding included."""
        if self.rows is not None:
            rows = [row.memory() for row in self.rows]
            by_tier = _add_counts(m["by_tier"] for m in rows)
            # the rows share one key basis (the model's table): each row counts it, the batch holds it once
            table = {id(t): t.nbytes for row in self.rows for l in row.layers if l.store is not None
                     for t in l.store.basis_tensors()}
            shared = by_tier.get("basis", 0) - sum(table.values())
            if shared:
                by_tier["basis"] -= shared
            total, fp16 = sum(m["bytes"] for m in rows) - shared, sum(m["bytes_fp16"] for m in rows)
            return {"bytes": total, "peak_bytes": sum(m["peak_bytes"] for m in rows) - shared,
                    "host_bytes": sum(m["host_bytes"] for m in rows), "bytes_fp16": fp16,
                    "ratio": fp16 / total if total else 1.0, "by_tier": by_tier,
                    "tokens": self.padded_len,
                    "entries": sum(m["entries"] for m in rows)}
        layers = [l for l in self.layers if l.store is not None]
        store_bytes = sum(l.store.nbytes() for l in layers)
        tracker_bytes = sum(l.tracker.nbytes() + l.scores.nbytes for l in layers)
        by_tier = _add_counts(l.store.bytes_by_tier() for l in layers)
        by_tier["tracker"] = tracker_bytes
        total = store_bytes + tracker_bytes
        fp16 = self.reference_bytes()
        return {
            "bytes": total,
            "peak_bytes": max(self.peak_bytes, total),
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
        bits [L][nb]: code bits (16 full, the hot region's ``hot_width``, 0 evicted); keep [L][nb]: kept elements
        per vector;
        markers [L]: evicted runs as [first_block, last_block]; token_importance [seq_len]: mean over
        layers of the normalised per-token score (a block the tracker holds packed, ``config.block_state``:
        its block score on each token); memory: ``memory()``. A padded batch has one per row:
        ``cache.rows[i].snapshot()``."""
        if self.rows is not None:
            raise ValueError("a padded batch's cache has one snapshot per row: cache.rows[i].snapshot()")
        B = self.cfg.block_size
        seq_len = self.seq_len
        nb = -(-seq_len // B)
        imp, tiers, bits, keeps, markers, tok = [], [], [], [], [], []
        for l in self.layers:
            st = l.store
            t = torch.full((nb,), HOT, dtype=torch.int8)
            b = torch.full((nb,), hot_width(self.cfg), dtype=torch.int8)
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
                ts = l.tracker.scores(seq_len, max(1, st.n_ready_blocks() * B)).cpu()
                k = l.tracker.n_packed * B  # (held as the block's largest: each token shows it)
                ts[:k] = ts[:k].view(-1, B).amax(1).repeat_interleave(B)
                tok.append(ts)
        token_importance = torch.stack(tok).mean(0).tolist() if tok else []
        return {
            "step": self.steps, "seq_len": seq_len, "block_size": B, "n_layers": self.n_layers,
            "reevaluations": self.reevaluations, "threshold_scale": self.threshold_scale,
            "importance": imp, "tier": tiers, "bits": bits, "keep": keeps, "markers": markers,
            "token_importance": [round(x, 5) for x in token_importance],
            "tier_names": list(NAMES), "memory": self.memory(), "config": self.cfg.to_dict(),
        }


def _forget_evicted(layers) -> None:
    """Each layer's tracker forgets the blocks its store holds evicted (``ImportanceTracker.forget``)."""
    tiers = [l.store.block_tier for l in layers]
    evicted = (torch.cat(tiers) == EVICTED).cpu().split([t.numel() for t in tiers])  # one copy off the device
    for l, e in zip(layers, evicted):
        l.tracker.forget(e.nonzero().squeeze(1))


def safe_globals() -> list[type]:
    """The classes a saved ``CompressedCache`` holds, to load it with ``torch.load(weights_only=True)``:

        torch.save(cache, path)
        with torch.serialization.safe_globals(agacc.safe_globals()):
            cache = torch.load(path, weights_only=True)

    (or ``torch.serialization.add_safe_globals(agacc.safe_globals())`` once). Every class defined in
    the modules whose objects a cache holds (cache, store, importance, config); nothing else is allowed."""
    import inspect

    from agacc import config, importance, store

    out = []
    for mod in (importance, store, config, inspect.getmodule(CompressedCache)):
        for obj in vars(mod).values():
            if (inspect.isclass(obj) and obj.__module__ == mod.__name__ and not issubclass(obj, (BaseException, torch.Tensor))):
                out.append(obj)
    return out
