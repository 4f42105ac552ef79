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
                        attention, kept exactly: the most a tracker could know).
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
from agacc.tiers import INT3  # noqa: E402

MODES = ("oracle", "values-2bit", "keys-allocated")


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


def install_oracle(reduce: str, heads: str, when: str = "future") -> None:
    """Every cache's planner reads ``oracle_scores`` of the text ``bench_ppl.measure`` is measuring."""
    seen: dict[str, torch.Tensor] = {}
    before_each_text(lambda model, ids, prefill: seen.update(attn=attention_of(model, ids, heads)))
    importance.scores_all = lambda trackers, seq_len, ready: oracle_scores(seen["attn"], seq_len, ready, reduce, when)


def install_values_2bit() -> None:
    """3-bit blocks: values quantised to 2-bit codes (repacked into the 3-bit container), priced at 2 bits."""
    cost, quantize = planner.block_cost_bytes, store.QuantSegment.quantize

    def block_cost_bytes(tier, bits, keep, **kw):
        saved = kw["batch"] * kw["heads"] * kw["block_size"] * kw["head_dim"] // 8 if tier == INT3 else 0
        return cost(tier, bits, keep, **kw) - saved  # one bit less per value element

    def patched_quantize(self, k, v, b):
        out = quantize(self, k, v, b)
        if self.container != 3:
            return out
        pv, vs, vz = quantize(self, k, v, 2)[3:]
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
    h, d = k.shape[1], k.shape[-1]
    q_rms = q.float().reshape(h, -1, d).pow(2).mean(1).sqrt()
    kb = k.float()[0].reshape(h, -1, block, d)
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


def quantize_allocated(k: torch.Tensor, bits: torch.Tensor, block: int = 16) -> torch.Tensor:
    """k [Bt, H, n, D] quantised and read back per channel per ``block`` tokens with channel widths ``bits``
    [H, D] (fp16 scale and zero, min-max; a 0-bit channel reads its block's mid-range) -> fp32 like k."""
    bt, h, n, d = k.shape
    kb = k.float().reshape(bt, h, n // block, block, d)
    lo, hi = kb.amin(3, keepdim=True), kb.amax(3, keepdim=True)
    levels = ((1 << bits) - 1).float()[None, :, None, None, :]
    scale = ((hi - lo) / levels.clamp_min(1)).clamp_min(1e-6).half().float()
    zero = lo.half().float()
    out = (torch.round((kb - zero) / scale).clamp(min=torch.zeros_like(levels), max=levels) * scale + zero)
    out = torch.where(levels == 0, ((lo + hi) / 2).half().float(), out)
    return out.reshape(k.shape)


def install_keys_allocated(pre_rope: bool = False, widths_from: list[str] | None = None):
    """The store's reads of 2/3/4-bit key blocks replaced by ``quantize_allocated`` of the exact keys (kept
    beside the store), the widths from ``allocate_key_bits`` on the prompt (one live cache at a time, as
    bench_ppl runs them; through ``attribute_loss.substitute_reads``); ``pre_rope``: the keys and queries with
    RoPE undone (Llama's ``rotate_half`` pairs); ``widths_from``: names of ``bench/corpus.py`` texts whose
    prompts' channel costs, averaged, give one table of widths for every text measured. Returns ``prompt(model,
    ids [1, T], prefill, tok=None)``, which sets the widths (before each text bench_ppl measures; ``tok``
    reads the ``widths_from`` texts, by default the tokenizer bench_ppl loaded, and their table is found at
    the first call only) and returns them, {layer: {bits: [H, D]}}."""
    import attribute_loss
    import bench_ppl
    import corpus

    from agacc.cache import CompressedLayer
    from agacc.eval.runner import capture_prefill
    from kernels.format import DENSE, QUANT, Part

    widths: dict[int, dict[int, torch.Tensor]] = {}
    rope: dict[str, torch.Tensor] = {}
    loaded: dict[str, object] = {}  # the tokenizer bench_ppl loads
    init, load = CompressedLayer.lazy_initialization, bench_ppl.common.load_model

    def turn(x: torch.Tensor, pos: torch.Tensor, sign: int) -> torch.Tensor:
        """x [Bt, H, n, D] at positions pos [n]: RoPE applied (sign 1) or undone (-1); as is without pre_rope."""
        if not pre_rope:
            return x
        return rope_turn(x, rope["cos"][pos], rope["sin"][pos], sign)

    def costs(model, ids, prefill):
        """Per layer, the channel costs of the first ``prefill`` tokens of ids [1, >= prefill]."""
        cap = capture_prefill(model, ids[0, :prefill].tolist(), n_obs=64)
        pos = torch.arange(prefill)
        return [key_channel_cost(turn(q.float(), pos[-q.shape[2]:], -1), turn(k.float(), pos, -1))
                for q, k in zip(cap.queries, cap.keys)]

    def prompt(model, ids, prefill, tok=None):
        cos, sin = model.model.rotary_emb(torch.zeros(1), torch.arange(ids.shape[1])[None])
        rope.update(cos=cos[0].float(), sin=sin[0].float())
        if widths and widths_from:
            return widths  # one table for every text, found once
        if widths_from:
            tok = tok or loaded["tok"]
            per_text = [costs(model, tok(corpus.read(corpus.TEXTS[name], tok), return_tensors="pt").input_ids, prefill)
                        for name in widths_from]
            layer_costs = [torch.stack(c).mean(0) for c in zip(*per_text)]
        else:
            layer_costs = costs(model, ids, prefill)
        widths.clear()
        widths.update({layer: {b: allocate_key_bits(c, b) for b in (2, 3, 4)} for layer, c in enumerate(layer_costs)})
        return widths

    def patched_load(*a, **kw):
        model, loaded["tok"] = load(*a, **kw)
        return model, loaded["tok"]

    def patched_init(self, key_states, value_states):
        init(self, key_states, value_states)
        self.store.layer_idx = self.layer_idx

    def read(store_, part, exact_k, exact_v, where):
        if part.kind != QUANT or not part.key_block or part.container not in (2, 3, 4):
            return None
        k = quantize_allocated(turn(exact_k, where, -1), widths[store_.layer_idx][part.container], part.key_block)
        return Part(DENSE, turn(k, where, 1).to(store_.dtype), quant.dequantize_part(part, store_.dtype)[1])

    before_each_text(prompt)
    bench_ppl.common.load_model = patched_load
    CompressedLayer.lazy_initialization = patched_init
    attribute_loss.substitute_reads(read)
    return prompt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    ap.add_argument("--mode", choices=MODES, required=True)
    ap.add_argument("--reduce", choices=("mean", "max"), default="max")
    ap.add_argument("--heads", choices=("mean", "max"), default="mean")
    ap.add_argument("--when", choices=("future", "past"), default="future")
    ap.add_argument("--pre-rope", action="store_true", help="keys-allocated: the keys taken before RoPE")
    ap.add_argument("--widths-from", nargs="+", default=None, metavar="TEXT",
                    help="keys-allocated: one table of widths from these texts of bench/corpus.py for every text")
    args, rest = ap.parse_known_args(argv)
    if args.mode == "oracle":
        install_oracle(args.reduce, args.heads, args.when)
    elif args.mode == "values-2bit":
        install_values_2bit()
    else:
        install_keys_allocated(args.pre_rope, args.widths_from)
    import bench_ppl
    bench_ppl.main(rest)


if __name__ == "__main__":
    main()
