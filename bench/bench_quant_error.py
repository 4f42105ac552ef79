"""Error of each K/V storage format on the embedded model's own keys and values, at equal bits.

One forward over the first ``--tokens`` tokens of a text captures every layer's queries, keys and
values (after RoPE, as the cache stores them: ``agacc.eval.runner.capture_prefill``). The first
``--quantised`` positions are then quantised with one format at a time and the attention of the
last ``--queries`` queries is compared with exact K/V: for keys the attention KL(exact ||
quantised) per query (nats), for values the relative error of the attention output. Bits per
element include the fp16 scale and zero of each group (keys per channel over 16-token blocks: +2;
per token over 64 channels: +0.5). The pre-RoPE rows (KVQuant) are key formats: RoPE undone per
position, quantised, redone. The "allocated" rows are key formats too: per channel per block with each
KV head's channels at their own code widths (``bench/bounds.py``'s ``allocate_key_bits``: the bits on
average, given by the 64 queries before the scored ones, the prompt's last queries of a real cache). The
"basis" rows are keys before RoPE in each layer's basis calibrated on the ``--basis-from`` texts' first
``--tokens`` tokens (``bounds.calibrate_key_basis``), each coefficient at its own width (with 8-bit scales and
zeros: "basis, 8-bit scales"): ``--bits`` are then bits per element with the metadata (round 21).
The "Lloyd-Max" rows are a non-uniform codebook (round 28): each group's levels at its mean + its standard
deviation x the unit Gaussian's Lloyd-Max centroids, the same metadata as min-max. The "store layout" rows (round
35) hold each block of container ``--bits`` in the basis as the store does (the ``agacc`` preset's ``basis_layout``,
8-bit scales and zeros), "+ N-bit tail" with the coefficients it drops coded too, each to the nearest of its axis'
2**N levels fixed on the calibration texts (no metadata; ``bounds.key_basis``' tail).

    python bench/bench_quant_error.py --text /usr/share/common-licenses/GFDL-1.3 --json out/quant_error.json
"""
from __future__ import annotations

import argparse
import functools
import os

import torch

from agacc import quant
from bench import bounds, common


def per_channel(x, b, block=16):
    return quant.dequantize_keys(*quant.quantize_keys(x, b, block), b, block)


per_channel_32 = functools.partial(per_channel, block=32)


def per_token(x, b, group=64):
    return quant.dequantize_values(*quant.quantize_values(x, b, group), b)


def rotated(fmt):
    return lambda x, b: quant.rotate(fmt(quant.rotate(x), b))


def pre_rope(fmt, cos, sin, block: int = 0):
    """KVQuant's pre-RoPE keys: each position's RoPE rotation undone (it is orthonormal: the inverse
    rotates by -theta), the keys quantised with ``fmt``, the rotation applied again. cos / sin
    [1, 1, n, D] of the positions 0..n-1 (the model's rotary embedding). ``block`` > 0: only the
    rotation relative to the key's block of ``block`` tokens is undone (offsets 0..block-1, so every
    block is read with the same ``block`` rows of cos / sin, whatever its position)."""
    def f(x, b):
        pos = torch.arange(x.shape[2]) % block if block else torch.arange(x.shape[2])
        c, s = cos[:, :, pos], sin[:, :, pos]
        return bounds.rope_turn(fmt(bounds.rope_turn(x, c, s, -1), b), c, s, 1)
    return f


def _key_blocks(x, block=16):
    bt, h, n, d = x.shape
    return x.reshape(bt, h, n // block, block, d), 3


def _value_groups(x, group=64):
    bt, h, n, d = x.shape
    return x.reshape(bt, h, n, d // group, group), 4


def per_channel_coded(scale_step: float, int_zero: bool, block: int = 16):
    """Keys per channel per block with cheaper metadata than fp16 scale + zero (docs/tuning.md round 9),
    simulated in fp32: the scale on a log2 grid of ``scale_step`` (8 bits hold 256 steps; the grid is
    not bounded here, a stored form needs a per-block reference), and either the zero an fp16 block
    minimum (exact extremes) or an integer in units of the scale (8 bits: the grid shifts by up to half
    a step, so a block's min and max are no longer exact)."""
    def fmt(x, b):
        if int_zero:  # scale rounded up so the range still fits; zero = round(lo / s) as an int8
            return bounds.quantize_allocated(x, torch.full((x.shape[1], x.shape[-1]), b), block, scale_step)
        xb, dim = _key_blocks(x.float(), block)
        lo, hi = xb.amin(dim, keepdim=True), xb.amax(dim, keepdim=True)
        levels = (1 << b) - 1
        s = ((hi - lo) / levels).clamp_min(1e-6)
        s = torch.exp2(torch.round(torch.log2(s) / scale_step) * scale_step)
        lo = lo.half().float()
        return (torch.round((xb - lo) / s).clamp(0, levels) * s + lo).reshape(x.shape)
    return fmt


def clipped(dim_of, factors=(1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)):
    """Min-max groups whose range is shrunk about its centre by the factor (of ``factors``) that gives
    the group the least squared error (codes saturate beyond it): same bytes as min-max.
    ``dim_of(x)`` -> (x viewed as groups, the dim reduced over)."""
    def fmt(x, b):
        xg, dim = dim_of(x.float())
        lo, hi = xg.amin(dim, keepdim=True), xg.amax(dim, keepdim=True)
        mid, half = (lo + hi) / 2, (hi - lo) / 2
        levels = (1 << b) - 1
        best, err = xg, torch.full_like(lo, float("inf"))
        for f in factors:
            l = (mid - f * half).half().float()
            s = (2 * f * half / levels).clamp_min(1e-6).half().float()
            y = torch.round((xg - l) / s).clamp(0, levels) * s + l
            e = ((y - xg) ** 2).sum(dim, keepdim=True)
            best, err = torch.where(e < err, y, best), torch.minimum(e, err)
        return best.reshape(x.shape)
    return fmt


# the Lloyd-Max quantiser of a unit Gaussian (its centroids, the positive half): the least squared error a codebook
# of 2**b levels has for normal data; "per token, Lloyd-Max" places a group's levels at mean + std x these
LLOYD_MAX = {1: (0.7979,), 2: (0.4528, 1.5104), 3: (0.2451, 0.7560, 1.3439, 2.1520),
             4: (0.1284, 0.3881, 0.6568, 0.9424, 1.2562, 1.6181, 2.0690, 2.7326)}


def lloyd_max(dim_of):
    """A non-uniform codebook (docs/tuning.md round 28): each group's 2**b levels at its mean + its standard
    deviation x the Gaussian Lloyd-Max centroids (``LLOYD_MAX``; fp16 mean and std: min-max's metadata), each
    element coded to the nearest level. ``dim_of(x)`` -> (x viewed as groups, the dim reduced over)."""
    def fmt(x, b):
        xg, dim = dim_of(x.float())
        half = torch.tensor(LLOYD_MAX[b])
        levels = torch.cat([-half.flip(0), half])
        mu = xg.mean(dim, keepdim=True).half().float()
        sd = xg.std(dim, keepdim=True, unbiased=False).clamp_min(1e-6).half().float()
        z = ((xg - mu) / sd).unsqueeze(-1)
        code = (z - levels).abs().argmin(-1)
        return (levels[code] * sd + mu).reshape(x.shape)
    return fmt


def allocated(x, b, ctx):
    """Keys per channel per 16-token block, un-rotated, each channel at its own width (``b`` on average),
    weighed by the queries ``ctx["queries"]`` (``CONTEXT_FORMATS``' signature)."""
    return bounds.quantize_allocated(x, bounds.allocate_key_bits(bounds.key_channel_cost(ctx["queries"], x), b))


STATS = 64  # queries before the scored ones that weigh the query-aware formats' channels
# key formats called fmt(x, bits, ctx): ctx {"queries": the STATS queries, "q_end": their end, "layer": index}
CONTEXT_FORMATS = ("allocated", "allocated, pre-RoPE", "basis", "basis, 8-bit scales", "basis, store layout",
                   "basis, store layout + 1-bit tail", "basis, store layout + 2-bit tail")
FORMATS = {  # name -> (quantise-dequantise, extra bits per element for scales and zeros at head dim 64)
    "per channel, 16-token blocks": (per_channel, 2.0),
    "per channel, rotated": (rotated(per_channel), 2.0),
    "per token, 64 channels": (per_token, 0.5),
    "per token, rotated": (rotated(per_token), 0.5),
    "per channel, rotated, MSE-clipped": (rotated(clipped(_key_blocks)), 2.0),
    "per token, rotated, MSE-clipped": (rotated(clipped(_value_groups)), 0.5),
    "per token, rotated, Lloyd-Max": (rotated(lloyd_max(_value_groups)), 0.5),
    "per channel, rotated, Lloyd-Max": (rotated(lloyd_max(_key_blocks)), 2.0),
    "per channel, rotated, 32-token blocks": (rotated(per_channel_32), 1.0),
    "per channel, rotated, 8-bit log scale (1/32) + fp16 zero": (rotated(per_channel_coded(1 / 32, False)), 1.5),
    "per channel, rotated, 8-bit log scale (1/16) + int8 zero": (rotated(per_channel_coded(1 / 16, True)), 1.0),
    "allocated": (allocated, 2.0),  # a 0-bit channel keeps its mid-range (1 bit): at most 2
}


def rope_formats(model, n, bases=None):
    """The pre-RoPE key formats (they need the model's rotation of positions 0..n-1, rotate_half pairs as
    Llama's): name -> (fmt, bits); none for a model without a ``model.rotary_emb``. ``bases``: the "basis"
    format's calibrated bases, one per layer (its bits an element include the metadata), with the fixed levels
    of the "store layout + tail" formats in their ``tail`` (their bits: a function of the container,
    ``layout_bits``)."""
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is None:
        return {}
    cos, sin = rotary(torch.zeros(1), torch.arange(n)[None])
    cos, sin = cos.float()[:, None], sin.float()[:, None]
    return {"per channel, pre-RoPE, rotated": (pre_rope(rotated(per_channel), cos, sin), 2.0),
            "per channel, pre-RoPE, not rotated": (pre_rope(per_channel, cos, sin), 2.0),
            "per channel, pre-RoPE, rotated, 32-token blocks": (
                pre_rope(rotated(per_channel_32), cos, sin), 1.0),
            "per channel, pre-RoPE within the block, rotated": (pre_rope(rotated(per_channel), cos, sin, 16), 2.0),
            "allocated, pre-RoPE": (allocated_pre_rope(cos, sin), 2.0),
            **({"basis": (in_basis(bases, cos, sin, greedy_widths(2.0)), 0.0),
                "basis, 8-bit scales": (in_basis(bases, cos, sin, greedy_widths(1.0), bounds.META8_STEP), 0.0)}
               if bases else {}),
            **(_layout_formats(bases, cos, sin, int(cos.shape[-1])) if bases else {})}


def _layout_formats(bases, cos, sin, head_dim):
    """The "store layout" rows: keys in the basis in the store's layout of container ``b`` (``store_layouts``),
    8-bit scales and zeros, alone (tail bits 0) and with each fixed tail the bases hold (round 35)."""
    lay, out = store_layouts(head_dim), {}

    def widths(basis, b, heads):
        return bounds.layout_widths(lay[b], head_dim).expand(heads, -1)

    for t in (0, *bases[0]["tail"]):
        name = "basis, store layout" + (f" + {t}-bit tail" if t else "")
        out[name] = (in_basis(bases, cos, sin, widths, bounds.META8_STEP, t),
                     lambda b, t=t: layout_bits(lay[b], head_dim, t))
    return out


def allocated_pre_rope(cos, sin):
    """``allocated`` on the keys and the queries with RoPE undone (``pre_rope``; the queries end at position
    ``ctx["q_end"]``, before the scored ones)."""
    def f(x, b, ctx):
        q = ctx["queries"]
        at = slice(ctx["q_end"] - q.shape[2], ctx["q_end"])
        q_pre = bounds.rope_turn(q, cos[:, :, at], sin[:, :, at], -1)
        return pre_rope(lambda kp, bits: allocated(kp, bits, {"queries": q_pre}), cos, sin)(x, b)
    return f


def in_basis(bases, cos, sin, widths, step: float = 0.0, tail_bits: int = 0):
    """Keys in each layer's calibrated basis (``bounds.calibrate_key_basis``, before RoPE), each coefficient per
    block of 16 at ``widths(basis, b, heads)`` [H, D] bits (0: dropped) with scales on the log2 grid ``step`` (0:
    fp16); ``tail_bits``: the dropped coefficients read as the nearest of their axis' fixed levels (the basis'
    ``tail``, round 35) instead of 0."""
    def f(x, b, ctx):
        basis = bases[ctx["layer"]]
        tail = basis["tail"][tail_bits] if tail_bits else None
        return pre_rope(lambda kp, bits: bounds.quantize_in_basis(kp, basis, widths(basis, b, x.shape[1]), 16, step,
                                                                  tail), cos, sin)(x, b)
    return f


def greedy_widths(meta: float):
    """``in_basis``' widths at ``b`` bits an element, metadata (``meta`` bits an element a coded coefficient)
    included: ``bounds.basis_bits`` (round 21)."""
    return lambda basis, b, heads: bounds.basis_bits(basis["energy"], basis["range_sq"], b, meta)


def store_layouts(head_dim: int) -> dict[int, dict[int, int]]:
    """The ``agacc`` preset's basis layouts by container (``policy.basis_layouts``): {2|3|4: {width: coefficients}}."""
    from agacc.config import AGACCConfig
    from agacc.policy import basis_layouts

    return {c: dict(lay) for c, lay in zip((2, 3, 4), basis_layouts(AGACCConfig.preset("agacc", key_quant="basis"),
                                                                     head_dim))}


def layout_bits(layout: dict[int, int], head_dim: int, tail_bits: int = 0) -> float:
    """Bits an element of a key block in a basis layout: its codes, 16 bits of 8-bit scale and zero per coded
    coefficient per 16 tokens, and ``tail_bits`` for each coefficient the layout drops (fixed levels: no metadata)."""
    coded = sum(layout.values())
    return (sum(w * n for w, n in layout.items()) + coded + tail_bits * (head_dim - coded)) / head_dim


def attention(q, k, v, scaling):
    """q [Bt,Hq,m,D] (the last m positions), k/v [Bt,H,n,D] -> (probs, out), causal, GQA."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * scaling
    n, m = k.shape[2], q.shape[2]
    s = s.masked_fill(torch.arange(n)[None, :] > torch.arange(n - m, n)[:, None], float("-inf"))
    p = s.softmax(-1)
    return p, p @ v


def main(argv=None):
    from agacc.eval.runner import capture_prefill

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(ap, text="/usr/share/common-licenses/GFDL-1.3")
    ap.add_argument("--tokens", type=int, default=1536)
    ap.add_argument("--quantised", type=int, default=1280)
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--formats", nargs="+", default=None, metavar="TEXT",
                    help="only the formats whose name contains one of these (default: all)")
    ap.add_argument("--basis-from", nargs="+", default=["licence-tuning", "narrative-tuning", "code-tuning"],
                    metavar="TEXT", help="the bench/corpus.py texts whose prompts calibrate the basis format")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    common.set_threads(args.threads)
    model, tok = common.load_model(args.model)
    ids = common.text_ids(tok, args.text, args.tokens, need=max(args.quantised, args.queries + STATS) + 1)
    cap = capture_prefill(model, ids[0].tolist(), n_obs=args.queries + STATS)
    captured = [(q.float()[:, :, STATS:], k.float(), v.float(), sc)
                for q, k, v, sc in zip(cap.queries, cap.keys, cap.values, cap.scaling)]
    stats = [q.float()[:, :, :STATS] for q in cap.queries]  # the "allocated" formats' weights
    nq = args.quantised
    rows = []
    exact = [attention(q, k, v, sc) for q, k, v, sc in captured]  # (probs, out) per layer, exact K/V
    def wanted(name: str) -> bool:
        return not args.formats or any(f in name for f in args.formats)

    bases = None  # the "basis" rows' calibration (a model with RoPE, the rows asked for)
    if getattr(getattr(model, "model", None), "rotary_emb", None) is not None and any(
            wanted(n) for n in CONTEXT_FORMATS if n.startswith("basis")):
        caps = bounds.calibration_prompts(model, args.basis_from, tok, args.tokens)
        tails = tuple(t for t in (1, 2) if wanted(f"basis, store layout + {t}-bit tail"))
        bases = bounds.calibrate_key_basis(model, caps, tails)
    rope = rope_formats(model, ids.shape[1], bases)  # keys only: values carry no RoPE
    for name, (fmt, extra) in {**FORMATS, **rope}.items():
        if not wanted(name):
            continue
        keys_only = name in rope or name in CONTEXT_FORMATS
        for b in args.bits:
            kl = v_err = 0.0
            for layer, ((q, k, v, sc), (p0, o0), qs) in enumerate(zip(captured, exact, stats)):
                if name in CONTEXT_FORMATS:
                    kq = fmt(k[:, :, :nq], b, {"queries": qs, "q_end": ids.shape[1] - args.queries, "layer": layer})
                else:
                    kq = fmt(k[:, :, :nq], b)
                p1, _ = attention(q, torch.cat([kq, k[:, :, nq:]], 2), v, sc)
                kl += float((p0 * (p0.clamp_min(1e-30).log() - p1.clamp_min(1e-30).log())).sum(-1).mean())
                if not keys_only:
                    _, o2 = attention(q, k, torch.cat([fmt(v[:, :, :nq], b), v[:, :, nq:]], 2), sc)
                    v_err += float((o2 - o0).norm() / o0.norm())
            n = len(captured)
            bits = extra(b) if callable(extra) else b + extra
            rows.append({"format": name, "bits": b, "bits_per_element": bits, "key_attention_kl": kl / n,
                         "value_output_rel_err": None if keys_only else v_err / n})
    print(f"{len(captured)} layers, {ids.shape[1]} tokens of {os.path.basename(args.text)}, first {nq} quantised, "
          f"last {args.queries} queries")
    common.print_table(["format", "bits", "bits/elem", "key attn KL", "value rel err"], [
        [r["format"], str(r["bits"]), f"{r['bits_per_element']:.1f}", f"{r['key_attention_kl']:.5f}",
         "-" if r["value_output_rel_err"] is None else f"{r['value_output_rel_err']:.4f}"] for r in rows])
    common.write_json(args.json, {"text": args.text, "tokens": int(ids.shape[1]), "quantised": nq, "rows": rows}, indent=1)


if __name__ == "__main__":
    main()
