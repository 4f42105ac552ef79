"""Error of each K/V storage format on the embedded model's own keys and values, at equal bits.

One forward over the first ``--tokens`` tokens of a text captures every layer's queries, keys and
values (after RoPE, as the cache stores them). The first ``--quantised`` positions are then
quantised with one format at a time and the attention of the last ``--queries`` queries is
compared with exact K/V: for keys the attention KL(exact || quantised) per query (nats), for
values the relative error of the attention output. Bits per element include the fp16 scale and
zero of each group (keys per channel over 16-token blocks: +2; per token over 64 channels: +0.5).

    python bench/bench_quant_error.py --text /usr/share/common-licenses/GFDL-1.3 --json out/quant_error.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import agacc  # noqa: E402
from agacc import quant  # noqa: E402
from transformers import AttentionInterface  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402


def per_channel(x, b, block=16):
    return quant.dequantize_keys(*quant.quantize_keys(x, b, block), b, block)


def per_token(x, b, group=64):
    return quant.dequantize_values(*quant.quantize_values(x, b, group), b)


def rotated(fmt):
    return lambda x, b: quant.rotate(fmt(quant.rotate(x), b))


FORMATS = {  # name -> (quantise-dequantise, extra bits per element for scales and zeros at head dim 64)
    "per channel, 16-token blocks": (per_channel, 2.0),
    "per channel, rotated": (rotated(per_channel), 2.0),
    "per token, 64 channels": (per_token, 0.5),
    "per token, rotated": (rotated(per_token), 0.5),
}


def attention(q, k, v):
    """q [Bt,Hq,m,D] (the last m positions), k/v [Bt,H,n,D] -> (probs, out), causal, GQA."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    n, m = k.shape[2], q.shape[2]
    s = s.masked_fill(torch.arange(n)[None, :] > torch.arange(n - m, n)[:, None], float("-inf"))
    p = s.softmax(-1)
    return p, p @ v


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default="/usr/share/common-licenses/GFDL-1.3")
    ap.add_argument("--tokens", type=int, default=1536)
    ap.add_argument("--quantised", type=int, default=1280)
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    model, tok = agacc.load_model()
    captured = []

    def capture(module, query, key, value, attention_mask, **kw):
        captured.append((query[:, :, -args.queries:].float(), key.float(), value.float()))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("agacc_capture", capture)
    model.set_attn_implementation("agacc_capture")
    with open(args.text) as f:
        ids = tok(f.read(), return_tensors="pt").input_ids[:, : args.tokens]
    with torch.inference_mode():
        model(ids)
    nq = args.quantised
    rows = []
    for name, (fmt, extra) in FORMATS.items():
        for b in args.bits:
            kl = k_err = v_err = 0.0
            for q, k, v in captured:
                p0, o0 = attention(q, k, v)
                p1, _ = attention(q, torch.cat([fmt(k[:, :, :nq], b), k[:, :, nq:]], 2), v)
                kl += float((p0 * (p0.clamp_min(1e-30).log() - p1.clamp_min(1e-30).log())).sum(-1).mean())
                _, o2 = attention(q, k, torch.cat([fmt(v[:, :, :nq], b), v[:, :, nq:]], 2))
                v_err += float((o2 - o0).norm() / o0.norm())
            n = len(captured)
            rows.append({"format": name, "bits": b, "bits_per_element": b + extra,
                         "key_attention_kl": kl / n, "value_output_rel_err": v_err / n})
    print(f"{len(captured)} layers, {args.tokens} tokens of {os.path.basename(args.text)}, first {nq} quantised, "
          f"last {args.queries} queries")
    print(f"{'format':32s} {'bits':>4s} {'bits/elem':>9s} {'key attn KL':>12s} {'value rel err':>14s}")
    for r in rows:
        print(f"{r['format']:32s} {r['bits']:4d} {r['bits_per_element']:9.1f} {r['key_attention_kl']:12.5f} "
              f"{r['value_output_rel_err']:14.4f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"text": args.text, "tokens": int(ids.shape[1]), "quantised": nq, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
