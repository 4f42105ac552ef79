"""What better scores or a cheaper kept format could buy at most (docs/tuning.md round 16).

Runs ``bench/bench_ppl.py`` (token by token) with one part of the method replaced:

    --mode oracle       the planner's token scores are the plain model's own attention from the
                        queries still to come: at a cache of t tokens, token i scores the mean
                        (``--reduce mean``) or the largest (``--reduce max``) attention any later query
                        of the text pays it (averaged over query heads, or their max with
                        ``--heads max``), divided by its mean over the compressible tokens as the
                        tracker's scores are; the tracker is not consulted. What an exact forecast of
                        the attention would give the same tiers, fitter and byte budget. With
                        ``--when past`` the queries are the earlier ones instead (every query's
                        attention, kept exactly: the most a tracker could know). ``--phase prompt``
                        (``decode``): only the prompt's re-evaluations (only the decode steps') read
                        them, the others the tracker's own scores (docs/tuning.md round 28).
    --mode values-2bit  3-bit blocks hold their values as 2-bit codes (in the 3-bit container) and
                        the cost model prices the codes at 2 bits, so the fitter plans what a K3V2
                        format would hold at the same bytes. The bytes the run reports are the 3-bit
                        container's: compare KL, not ratios.
    --mode keys-allocated
                        every quantised block of 2, 3 or 4 bits is read with its keys in another format
                        at the same bytes: per channel per block, un-rotated, each KV head's channels given
                        their own code widths (0 to 8 bits, the block's bits on average) by greedy
                        water-filling on (the prompt's last 64 queries' RMS x the keys' block range RMS)^2,
                        from one plain forward over the prompt (what a cache sees at its prefill); a 0-bit
                        channel reads its block's mid-range. The plan, the bytes and the values are the
                        method's (docs/tuning.md round 20). With ``--pre-rope`` the keys (and the queries
                        that weigh them) are taken before RoPE (KVQuant): each key's rotation undone at its
                        position, quantised so, and redone. ``--widths-from TEXT ...`` (names of
                        bench/corpus.py): one table of widths from those texts' prompts for every text.
    --mode keys-basis   every quantised block of a container named in ``--key-bits`` (default 2=1.5,3=3,4=4.5)
                        holds its keys in a calibrated basis at that many bits an element, metadata included:
                        RoPE undone, each channel weighed by the queries' energy (a rotate_half pair shares
                        one weight), projected on the principal axes of the weighed keys of the
                        ``--basis-from`` texts' prompts (default licence-tuning narrative-tuning
                        code-tuning: each layer's basis and widths found once, fixed before any text), each
                        coefficient at its own width (0 to 8 bits; 0: dropped) per block, fp16 scale and zero.
                        The cost model and the bytes held price those keys so: the fitter keeps more at the
                        same ratio, and the ratio reported is the format's (docs/tuning.md round 21).
                        ``--key-widths 2,3,4,8``: the widths limited to those; ``--key-meta 8bit``: each
                        scale and zero in 8 bits (a log2 grid of 1/16, an int8 zero).

    --mode lookahead    at the prompt's end (before its held evictions are carried out) the prompt's importance is
                        the mean attention of ``--look K`` pseudo queries: the plain model's own greedy
                        continuation of the prompt (nothing of the text after it read; Lookahead Q-Cache's
                        idea), head-averaged; ``--combine max``: the larger of that and the tracker's prompt
                        evidence, each over its mean. Decode then runs the tracker as ever (docs/tuning.md round 26).

    python bench/bounds.py --mode oracle --reduce max --suite tuning --threads 1 --ref-cache out/ref agacc@8
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import agacc.importance as importance  # noqa: E402
import agacc.store as store  # noqa: E402
from agacc import planner, quant  # noqa: E402
from agacc.basis import layer_basis, query_energy, rotary_inv_freq, turned_prompts  # noqa: E402
from agacc.tiers import INT3  # noqa: E402
import common  # noqa: E402

MODES = ("oracle", "values-2bit", "keys-allocated", "keys-basis", "lookahead")


def attention_of(model, ids: torch.Tensor, heads: str = "mean") -> torch.Tensor:
    """The plain model's attention over ``ids`` [1, T] -> [L, T (queries), T (keys)] fp32, each layer's
    query heads reduced by ``heads`` (mean or max). One eager forward, no cache."""
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = model(ids, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation(impl)
    return torch.stack([a[0].float().amax(0) if heads == "max" else a[0].float().mean(0) for a in out.attentions])


def oracle_scores(attn: torch.Tensor, seq_len: int, ready_tokens: int, reduce: str = "max",
                  when: str = "future") -> torch.Tensor:
    """Scores [L, seq_len] for a cache of ``seq_len`` tokens from ``attention_of``'s [L, T, T]: each token's
    attention from the queries at positions >= seq_len (the last query when none is left; ``when="past"``:
    from the queries before seq_len instead, all a tracker could have seen), reduced by ``reduce`` (mean
    or max), divided per layer by its mean over the first ``ready_tokens`` tokens."""
    if when == "past":
        later = attn[:, :seq_len, :seq_len]
    else:
        later = attn[:, min(seq_len, attn.shape[1] - 1):, :seq_len]
    s = later.amax(1) if reduce == "max" else later.mean(1)
    ref = s[:, :ready_tokens] if ready_tokens > 0 else s
    return s / ref.mean(1, keepdim=True).clamp_min(1e-12)


def before_each_text(fn) -> None:
    """``fn(model, ids [1, T], prefill)`` runs before ``bench_ppl.measure`` measures each text."""
    import bench_ppl

    measure = bench_ppl.measure

    def patched_measure(model, ids, methods, prefill, *a, **kw):
        fn(model, ids, prefill)
        return measure(model, ids, methods, prefill, *a, **kw)

    bench_ppl.measure = patched_measure


def install_oracle(reduce: str, heads: str, when: str = "future", phase: str = "all") -> None:
    """Every cache's planner reads ``oracle_scores`` of the text ``bench_ppl.measure`` is measuring: at every
    re-evaluation (``phase="all"``), or only at those of the prompt (``"prompt"``: the cache holds at most the
    prompt's tokens) or only at the decode steps' (``"decode"``), the tracker's own scores at the others."""
    seen: dict = {}
    before_each_text(lambda model, ids, prefill: seen.update(attn=attention_of(model, ids, heads), prefill=prefill))
    tracker_scores = importance.scores_all

    def scores_all(trackers, seq_len, ready):
        if phase == "all" or (phase == "prompt") == (seq_len <= seen["prefill"]):
            return oracle_scores(seen["attn"], seq_len, ready, reduce, when)
        return tracker_scores(trackers, seq_len, ready)

    importance.scores_all = scores_all


def lookahead_attention(model, prompt: torch.Tensor, k: int) -> torch.Tensor:
    """[L, t]: the mean attention (over query heads and the k pseudo queries) the plain model's greedy
    continuation of ``prompt`` [1, t] pays each prompt token."""
    t = prompt.shape[1]
    return attention_of(model, common.greedy_continuation(model, prompt, k))[:, t:, :t].mean(1)


def install_lookahead(k: int, combine: str) -> None:
    """Every cache's prompt importance is replaced (or, ``combine="max"``, joined) by ``lookahead_attention`` of the
    text being measured, by ``rescore_prompt`` just before its held evictions are carried out."""
    from agacc.cache import CompressedCache
    from agacc.config import AGACCConfig
    from agacc.probe import joined

    seen: dict = {}
    before_each_text(lambda model, ids, prefill: seen.update(look=lookahead_attention(model, ids[:, :prefill], k)))
    end, init = CompressedCache.end_prefill, CompressedCache.__init__

    def __init__(self, model_config, config=None, **kw):  # the bound replaces the cache's own forecasts (rounds 27, 32)
        init(self, model_config, (config or AGACCConfig.preset("agacc")).with_overrides(lookahead=0, repeat_weight=0.0),
             **kw)

    def end_prefill(self):
        if self.held is not None and self.seq_len == seen["look"].shape[1]:
            layers = [l for l in self.layers if l.store is not None]
            scores = []
            for l, look in zip(layers, seen["look"]):
                raw = l.tracker.raw()[: look.shape[0]].float()
                scores.append(joined(raw, look) if combine == "max" else look.to(raw.device))
            self.rescore_prompt(scores)
        end(self)

    CompressedCache.end_prefill, CompressedCache.__init__ = end_prefill, __init__


def install_values_2bit() -> None:
    """3-bit blocks: values quantised to 2-bit codes (repacked into the 3-bit container), priced at 2 bits."""
    cost, quantize = planner.block_cost_bytes, store.QuantSegment.quantize

    def block_cost_bytes(tier, bits, keep, **kw):
        saved = kw["batch"] * kw["heads"] * kw["block_size"] * kw["head_dim"] // 8 if tier == INT3 else 0
        return cost(tier, bits, keep, **kw) - saved  # one bit less per value element

    def patched_quantize(self, k, v, b, pos=None):
        out = quantize(self, k, v, b, pos)
        if self.container != 3:
            return out
        pv, vs, vz = quantize(self, k, v, 2, pos)[3:]
        return (*out[:3], quant.pack(quant.unpack(pv, 2), 3), vs, vz)

    planner.block_cost_bytes = block_cost_bytes
    store.QuantSegment.quantize = patched_quantize


def rope_turn(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: int) -> torch.Tensor:
    """x [..., n, D] with its positions' cos / sin (broadcast to x; Llama's ``rotate_half`` pairs): RoPE
    applied (``sign`` 1) or undone (-1: the rotation is orthonormal, its inverse turns by -theta)."""
    from transformers.models.llama.modeling_llama import rotate_half

    return x * cos + sign * rotate_half(x) * sin


def key_channel_cost(q: torch.Tensor, k: torch.Tensor, block: int = 16) -> torch.Tensor:
    """What each key channel's quantisation error costs the logits, [H, D] fp32: (the RMS of queries q [1, Hq,
    m, D] in that channel, over a KV head's group) x (the RMS over blocks of ``block`` tokens of the keys k [1,
    H, n, D]'s range there), squared; n a multiple of ``block``."""
    h = k.shape[1]
    q_rms = query_energy(q, h).sqrt()
    kb = k.float()[0].reshape(h, -1, block, k.shape[-1])
    k_range = (kb.amax(2) - kb.amin(2)).pow(2).mean(1).sqrt()
    return (q_rms * k_range).pow(2)


def allocate_key_bits(cost: torch.Tensor, avg_bits: int) -> torch.Tensor:
    """Code widths [H, D] int64 (0..8, mean ``avg_bits`` per head) for channel costs [H, D]
    (``key_channel_cost``): greedy water-filling, each bit to the channel with the largest cost / 4^bits (a bit
    quarters a channel's squared error)."""
    h, d = cost.shape
    err, bits, rows = cost.clone(), torch.zeros(h, d, dtype=torch.long), torch.arange(h)
    for _ in range(avg_bits * d):
        j = err.argmax(1)
        bits[rows, j] += 1
        err[rows, j] = torch.where(bits[rows, j] == 8, -1.0, err[rows, j] / 4)
    return bits


def quantize_allocated(k: torch.Tensor, bits: torch.Tensor, block: int = 16, scale_step: float = 0.0) -> torch.Tensor:
    """k [Bt, H, n, D] quantised and read back per channel per ``block`` tokens with channel widths ``bits``
    [H, D] (fp16 scale and zero, min-max; a 0-bit channel reads its block's mid-range) -> fp32 like k.
    ``scale_step`` > 0: 8-bit metadata instead (round 9's coded form): the scale rounded up to a log2 grid of that
    step, the zero an int8 in units of the scale."""
    bt, h, n, d = k.shape
    kb = k.float().reshape(bt, h, n // block, block, d)
    lo, hi = kb.amin(3, keepdim=True), kb.amax(3, keepdim=True)
    levels = ((1 << bits) - 1).float()[None, :, None, None, :]
    if scale_step:
        scale = ((hi - lo) / levels.clamp_min(1)).clamp_min(1e-6)
        scale = torch.exp2(torch.ceil(torch.log2(torch.maximum(scale, lo.abs() / 127.5)) / scale_step) * scale_step)
        zero = torch.round(lo / scale).clamp(-128, 127) * scale
    else:
        scale = ((hi - lo) / levels.clamp_min(1)).clamp_min(1e-6).half().float()
        zero = lo.half().float()
    out = (torch.round((kb - zero) / scale).clamp(min=torch.zeros_like(levels), max=levels) * scale + zero)
    out = torch.where(levels == 0, ((lo + hi) / 2).half().float(), out)
    return out.reshape(k.shape)


def _install_key_reads(prompt, key_read) -> tuple:
    """The hooks both key-format simulations share: bench_ppl's tokenizer kept (``state["tok"]``), each store
    told its layer, ``run(model, ids [1, T], prefill, tok=None)`` before each text (the text's RoPE tables set,
    ``state["cos"]``, ``state["sin"]`` [T, D], then ``prompt(model, ids, prefill, tok)``), and the reads of every
    quantised block whose keys are per channel per block replaced: ``key_read(layer, k [Bt, H, n, D] fp32 exact,
    where [n], container, block)`` -> the keys read (None: as held); the values as held. Returns (state, run)."""
    import attribute_loss
    import bench_ppl

    from agacc.cache import CompressedLayer
    from kernels.format import DENSE, QUANT, Part

    state: dict = {}
    init, load = CompressedLayer.lazy_initialization, bench_ppl.common.load_model

    def run(model, ids, prefill, tok=None):
        cos, sin = model.model.rotary_emb(torch.zeros(1), torch.arange(ids.shape[1])[None])
        state.update(cos=cos[0].float(), sin=sin[0].float())
        return prompt(model, ids, prefill, tok)

    def patched_load(*a, **kw):
        model, state["tok"] = load(*a, **kw)
        return model, state["tok"]

    def patched_init(self, key_states, value_states):
        init(self, key_states, value_states)
        self.store.layer_idx = self.layer_idx

    def read(store_, part, exact_k, exact_v, where):
        if part.kind != QUANT or not part.key_block:
            return None
        k = key_read(store_.layer_idx, exact_k, where, part.container, part.key_block)
        return None if k is None else Part(DENSE, k.to(store_.dtype), quant.dequantize_part(part, store_.dtype)[1])

    before_each_text(run)
    bench_ppl.common.load_model = patched_load
    CompressedLayer.lazy_initialization = patched_init
    attribute_loss.substitute_reads(read)
    return state, run


def calibration_prompts(model, names: list[str], tok, prefill: int) -> list:
    """``capture_prefill`` (last 64 queries) of the first ``prefill`` tokens of each named bench/corpus.py text."""
    import corpus

    from agacc.eval.runner import capture_prefill

    ids = [tok(corpus.read(corpus.TEXTS[name], tok), return_tensors="pt").input_ids[0, :prefill] for name in names]
    return [capture_prefill(model, i.tolist(), n_obs=64) for i in ids]


def install_keys_allocated(pre_rope: bool = False, widths_from: list[str] | None = None):
    """The store's reads of 2/3/4-bit key blocks replaced by ``quantize_allocated`` of the exact keys (kept
    beside the store), the widths from ``allocate_key_bits`` on the prompt (one live cache at a time, as
    bench_ppl runs them; through ``attribute_loss.substitute_reads``); ``pre_rope``: the keys and queries with
    RoPE undone (Llama's ``rotate_half`` pairs); ``widths_from``: names of ``bench/corpus.py`` texts whose
    prompts' channel costs, averaged, give one table of widths for every text measured. Returns ``prompt(model,
    ids [1, T], prefill, tok=None)``, which sets the widths (before each text bench_ppl measures; ``tok``
    reads the ``widths_from`` texts, by default the tokenizer bench_ppl loaded, and their table is found at
    the first call only) and returns them, {layer: {bits: [H, D]}}."""
    from agacc.eval.runner import capture_prefill

    widths: dict[int, dict[int, torch.Tensor]] = {}

    def turn(x: torch.Tensor, pos: torch.Tensor, sign: int) -> torch.Tensor:
        """x [Bt, H, n, D] at positions pos [n]: RoPE applied (sign 1) or undone (-1); as is without pre_rope."""
        if not pre_rope:
            return x
        return rope_turn(x, state["cos"][pos], state["sin"][pos], sign)

    def costs(caps) -> list[torch.Tensor]:
        """Per layer, the channel costs of captured prompts (``capture_prefill``), averaged over them."""
        per_cap = []
        for cap in caps:
            pos = torch.arange(cap.n)
            per_cap.append([key_channel_cost(turn(q.float(), pos[-q.shape[2]:], -1), turn(k.float(), pos, -1))
                            for q, k in zip(cap.queries, cap.keys)])
        return [torch.stack(c).mean(0) for c in zip(*per_cap)]

    def prompt(model, ids, prefill, tok=None):
        if widths and widths_from:
            return widths  # one table for every text, found once
        if widths_from:
            caps = calibration_prompts(model, widths_from, tok or state["tok"], prefill)
        else:
            caps = [capture_prefill(model, ids[0, :prefill].tolist(), n_obs=64)]
        widths.clear()
        widths.update({layer: {b: allocate_key_bits(c, b) for b in (2, 3, 4)} for layer, c in enumerate(costs(caps))})
        return widths

    def key_read(layer, k, where, container, block):
        if container not in (2, 3, 4):
            return None
        return turn(quantize_allocated(turn(k, where, -1), widths[layer][container], block), where, 1)

    state, run = _install_key_reads(prompt, key_read)
    return run


# --- keys in a calibrated basis (round 21) -----------------------------------------------------------------

META8_STEP = 1 / 16  # the log2 grid of an 8-bit scale (``quantize_allocated``'s scale_step)


def key_basis(queries: list[torch.Tensor], keys: list[torch.Tensor], block: int = 16,
              tails: tuple[int, ...] = ()) -> dict:
    """A basis for one layer's keys before RoPE, from calibration prompts (RoPE undone on both): queries
    [1, Hq, m, D] and keys [1, H, n, D], one of each per prompt -> {w, V, energy, range_sq, tail}:
    w [H, D] and V [H, D, D] the library's (``agacc.basis.layer_basis``: the pair-averaged query RMS per
    channel, the eigenvectors of the weighed keys' second moments by decreasing eigenvalue); energy [H, D]
    the mean square of each coefficient (``coefficients``), range_sq [H, D] the mean over blocks of ``block``
    tokens of its squared range, both averaged over the prompts; tail {bits: levels [H, D, 2**bits]} for each of
    ``tails``, each axis' fixed levels over all the prompts' coefficients (``tail_levels``). fp32."""
    h, d = keys[0].shape[1], keys[0].shape[-1]
    w, V = layer_basis(queries, keys)
    cs = [coefficients(k[0], {"w": w, "V": V}) for k in keys]  # [H, n, D] each
    energy, range_sq = [], []
    for c in cs:
        cb = c[:, :c.shape[1] // block * block].reshape(h, -1, block, d)
        energy.append(c.pow(2).mean(1))
        range_sq.append((cb.amax(2) - cb.amin(2)).pow(2).mean(1))
    return dict(w=w, V=V, energy=torch.stack(energy).mean(0), range_sq=torch.stack(range_sq).mean(0),
                tail={t: tail_levels(torch.cat(cs, 1), t) for t in tails})


def calibrate_key_basis(model, caps, tails: tuple[int, ...] = ()) -> list[dict]:
    """``key_basis`` per layer from captured prompts (``capture_prefill``: their keys and last queries), RoPE
    undone on both at their positions (the library's ``agacc.basis.turned_prompts``); ``tails``: the bits of
    the fixed levels each axis gets (``key_basis``)."""
    return [key_basis(qs, ks, tails=tails) for qs, ks in turned_prompts(caps, rotary_inv_freq(model))]


def coefficients(k: torch.Tensor, basis: dict) -> torch.Tensor:
    """Keys before RoPE k [..., H, n, D] -> their coefficients (k * w) @ V in a basis (``key_basis``), fp32."""
    return (k.float() * basis["w"][:, None]) @ basis["V"]


def basis_bits(energy: torch.Tensor, range_sq: torch.Tensor, budget: float, meta: float = 2.0,
               allowed: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)) -> torch.Tensor:
    """Code widths [H, D] int64 (0 or one of ``allowed``, at most 8) of a basis' coefficients (``key_basis``:
    energy, range_sq [H, D]) for ``budget`` bits per key element, counting each coded coefficient's ``meta`` bits
    an element (fp16 scale and zero per block of 16 tokens: 2): greedy on the error removed per bit spent, a
    coefficient's expected squared error its energy at 0 bits (dropped: read as 0, nothing stored) and range_sq /
    (12 (2^w - 1)^2) at w bits. From 0 bits a step may go to any allowed width up to 4 at once (a min-max code's
    first bit alone removes little), from w to the next allowed width."""
    h, d = energy.shape
    above = torch.tensor([min([a for a in allowed if a > b], default=99) for b in range(9)], dtype=torch.float32)

    def err(w):
        return torch.where(w == 0, energy, range_sq / (12 * (2.0 ** w - 1).clamp_min(1) ** 2))

    w, spent, rows = torch.zeros(h, d), torch.zeros(h), torch.arange(h)
    while True:
        nxt = above[w.long()] - w
        steps = torch.stack([torch.where(w == 0, float(s), nxt) for s in allowed if s <= 4])  # [<= 4, H, D]
        cost = torch.where(w == 0, steps + meta, steps)
        gain = (err(w) - err(w + steps)) / cost
        gain = torch.where((w + steps > 8) | (spent[:, None] + cost > budget * d), -1.0, gain)
        best, pick = gain.max(0)  # the best step per coefficient, [H, D]
        j = best.argmax(1)
        ok = best[rows, j] > 0
        if not ok.any():
            return w.long()
        r, j = rows[ok], j[ok]
        spent[r] += cost[pick[r, j], r, j]
        w[r, j] += steps[pick[r, j], r, j]


def quantize_in_basis(k: torch.Tensor, basis: dict, widths: torch.Tensor, block: int = 16,
                      scale_step: float = 0.0, tail: torch.Tensor | None = None) -> torch.Tensor:
    """k [Bt, H, n, D] (before RoPE) -> its coefficients (k * w) @ V (``key_basis``) quantised per coefficient
    per block of ``block`` tokens at ``widths`` [H, D] (``quantize_allocated``, its ``scale_step``; 0 bits:
    dropped, read as 0, or with ``tail`` [H, D, L] each dropped coefficient read as the nearest of its axis'
    L fixed levels, ``key_basis``' tail: log2 L bits a coefficient, no metadata) and turned back -> fp32 like k."""
    exact = coefficients(k, basis)
    c = quantize_allocated(exact, widths.clamp_min(1), block, scale_step)
    dropped = 0.0 if tail is None else nearest_level(exact, tail)
    c = torch.where(widths[:, None] == 0, dropped, c)
    return (c @ basis["V"].transpose(-1, -2)) / basis["w"][:, None]


def nearest_level(c: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """c [Bt, H, n, D] -> each coefficient replaced by the nearest of its axis' ``levels`` [H, D, L]."""
    lv = levels[None, :, None]  # [1, H, 1, D, L]
    return lv.expand(*c.shape, -1).gather(-1, (c[..., None] - lv).abs().argmin(-1, keepdim=True))[..., 0]


def tail_levels(coeffs: torch.Tensor, bits: int, iters: int = 30) -> torch.Tensor:
    """A fixed codebook per axis (Lloyd's k-means in one dimension, started at the quantiles): coeffs [H, N, D]
    (calibration keys' coefficients, ``coefficients``) -> levels [H, D, 2**bits] fp32, increasing."""
    x = coeffs.float().transpose(1, 2)  # [H, D, N]
    n_lv = 1 << bits
    lv = torch.quantile(x, (torch.arange(n_lv) + 0.5) / n_lv, dim=-1).permute(1, 2, 0).contiguous()
    for _ in range(iters):
        code = (x[..., None] - lv[:, :, None]).abs().argmin(-1)  # [H, D, N]
        hot = torch.nn.functional.one_hot(code, n_lv).float()
        count = hot.sum(2)
        lv = torch.where(count > 0, (hot * x[..., None]).sum(2) / count.clamp_min(1), lv)
    return lv.sort(-1).values


def key_bytes_in_basis(budget: float, container: int, *, batch: int, heads: int, head_dim: int, block_size: int) -> int:
    """Bytes a block's keys lose when held in a basis at ``budget`` bits an element instead of the store's
    per-channel codes of ``container`` bits with their fp16 scale and zero per channel (can be negative)."""
    vecs = batch * heads * block_size
    held = vecs * head_dim * container // 8 + 2 * batch * heads * head_dim * 2
    return held - int(budget * vecs * head_dim / 8)


def layout_widths(layout: dict[int, int], head_dim: int) -> torch.Tensor:
    """Code widths [D] int64 of a fixed layout {width: coefficients}: the widest first, along the axes' order
    (by energy), the rest dropped (0)."""
    w = [b for b in sorted(layout, reverse=True) for _ in range(layout[b])]
    return torch.tensor(w + [0] * (head_dim - len(w)), dtype=torch.long)


def install_keys_basis(key_bits: dict[int, float], basis_from: list[str],
                       allowed: tuple[int, ...] | None = tuple(range(1, 9)), meta8: bool = False,
                       layouts: dict[int, dict[int, int]] | None = None):
    """Quantised blocks whose container is a key of ``key_bits`` (2/3/4) hold their keys in a basis at that
    many bits an element, everything else as the store holds it: reads from ``quantize_in_basis`` of the exact
    keys (RoPE undone at their positions, and redone), each layer's basis and widths (``key_basis``,
    ``basis_bits``) calibrated once on the prompts of the ``basis_from`` texts of bench/corpus.py; the cost
    model (so the fitter plans with them) and the store's held bytes (so the ratio reported is the format's)
    price those keys at ``key_bits`` (``key_bytes_in_basis``); ``allowed``: the code widths (``basis_bits``; None:
    each container's own width only, a fixed rank at one width);
    ``meta8``: each coded coefficient's scale and zero in 8 bits each (``quantize_allocated``'s log2 grid of 1/16),
    1 bit an element of metadata instead of 2; ``layouts``: {container: {width: coefficients}}, one fixed
    layout for every layer and head (``layout_widths``) instead of the greedy's widths.
    Returns ``prompt(model, ids [1, T], prefill, tok=None)`` (bench_ppl runs it before each text), which
    calibrates at its first call and returns {layer: {"basis": key_basis, container: widths [H, D]}}."""
    from agacc.tiers import TIER_CONTAINER

    table: dict[int, dict] = {}

    def prompt(model, ids, prefill, tok=None):
        if not table:
            caps = calibration_prompts(model, basis_from, tok or state["tok"], prefill)
            for layer, basis in enumerate(calibrate_key_basis(model, caps)):
                table[layer] = {"basis": basis, **{c: basis_bits(basis["energy"], basis["range_sq"], b,
                                                                 1.0 if meta8 else 2.0, allowed or (c,))
                                                   for c, b in key_bits.items()}}
                for c, lay in (layouts or {}).items():
                    table[layer][c] = layout_widths(lay, basis["V"].shape[-1]).expand_as(table[layer][c])
        return table

    def key_read(layer, k, where, container, block):
        if container not in key_bits:
            return None
        cos, sin = state["cos"][where], state["sin"][where]
        return rope_turn(quantize_in_basis(rope_turn(k, cos, sin, -1), table[layer]["basis"],
                                           table[layer][container], block, META8_STEP if meta8 else 0.0), cos, sin, 1)

    cost, seg_bytes, layer_bytes = planner.block_cost_bytes, store.QuantSegment.nbytes, store.LayerStore.nbytes

    def block_cost_bytes(tier, bits, keep, **kw):
        full = cost(tier, bits, keep, **kw)
        c = quant.container_bits(bits) if tier in TIER_CONTAINER else 0
        if c not in key_bits or kw["key_quant"] == "token":
            return full
        geo = {n: kw[n] for n in ("batch", "heads", "head_dim", "block_size")}
        return full - key_bytes_in_basis(key_bits[c], c, **geo)

    def saved(seg) -> int:
        """What a quantised segment's keys weigh less in the basis."""
        if seg.key_per_token or seg.container not in key_bits or not seg.n_blocks:
            return 0
        bt, h, _, packed = seg.v.shape
        return seg.n_blocks * key_bytes_in_basis(key_bits[seg.container], seg.container, batch=bt, heads=h,
                                                 head_dim=packed * 8 // seg.container, block_size=seg.block_size)

    planner.block_cost_bytes = block_cost_bytes
    store.QuantSegment.nbytes = lambda self: seg_bytes(self) - saved(self)
    store.LayerStore.nbytes = lambda self: layer_bytes(self) - sum(saved(seg) for seg in self.quant.values())
    state, run = _install_key_reads(prompt, key_read)
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    ap.add_argument("--mode", choices=MODES, required=True)
    ap.add_argument("--reduce", choices=("mean", "max"), default="max")
    ap.add_argument("--heads", choices=("mean", "max"), default="mean")
    ap.add_argument("--when", choices=("future", "past"), default="future")
    ap.add_argument("--phase", choices=("all", "prompt", "decode"), default="all",
                    help="oracle: at every re-evaluation, or the prompt's or the decode steps' alone")
    ap.add_argument("--look", type=int, default=8, help="lookahead: pseudo queries (greedy tokens)")
    ap.add_argument("--combine", choices=("replace", "max"), default="replace", help="lookahead: with the tracker's")
    ap.add_argument("--pre-rope", action="store_true", help="keys-allocated: the keys taken before RoPE")
    ap.add_argument("--widths-from", nargs="+", default=None, metavar="TEXT",
                    help="keys-allocated: one table of widths from these texts of bench/corpus.py for every text")
    ap.add_argument("--key-bits", default="2=1.5,3=3,4=4.5", metavar="C=BITS,...",
                    help="keys-basis: the containers whose keys the basis holds, and its bits an element for each")
    ap.add_argument("--basis-from", nargs="+", default=["licence-tuning", "narrative-tuning", "code-tuning"],
                    metavar="TEXT", help="keys-basis: the bench/corpus.py texts the basis is calibrated on")
    ap.add_argument("--key-widths", default="1,2,3,4,5,6,7,8", metavar="W,...",
                    help="keys-basis: the code widths a coefficient may take (besides 0); own: the container's only")
    ap.add_argument("--key-layout", default=None, metavar="C=W:N,...;...",
                    help="keys-basis: a fixed layout per container, e.g. 2=4:4,3:8,2:8 (N coefficients at W bits)")
    ap.add_argument("--key-meta", choices=("fp16", "8bit"), default="fp16",
                    help="keys-basis: each coded coefficient's scale and zero per block in fp16 or in 8 bits each")
    args, rest = ap.parse_known_args(argv)
    if args.mode == "oracle":
        install_oracle(args.reduce, args.heads, args.when, args.phase)
    elif args.mode == "lookahead":
        install_lookahead(args.look, args.combine)
    elif args.mode == "values-2bit":
        install_values_2bit()
    elif args.mode == "keys-allocated":
        install_keys_allocated(args.pre_rope, args.widths_from)
    else:
        key_bits = {int(c): float(b) for c, b in (item.split("=") for item in args.key_bits.split(","))}
        widths = None if args.key_widths == "own" else tuple(int(w) for w in args.key_widths.split(","))
        layouts = {int(c): {int(w): int(n) for w, n in (g.split(":") for g in lay.split(","))}
                   for c, lay in (item.split("=") for item in args.key_layout.split(";"))} if args.key_layout else None
        install_keys_basis(key_bits, args.basis_from, widths, args.key_meta == "8bit", layouts)
    import bench_ppl
    bench_ppl.main(rest)


if __name__ == "__main__":
    main()
