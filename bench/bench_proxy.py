"""Fast quality proxy for tuning: prefill P tokens into the cache (compressed at the end of the
prefill), then score the next tokens of the text in ONE forward pass over the compressed prefix.

Much cheaper than bench_ppl.py's token-at-a-time protocol (two forwards per setting), it measures
how well the compressed prefix serves later queries; it does not exercise decode-time re-tiering.

    python bench/bench_proxy.py --text FILE agacc uniform-int2 "agacc,target_ratio=4,p_max=0.5"
Each spec is PRESET[,key=value...]. Prints ppl vs the plain model, KL, measured ratio, bytes by tier.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import agacc  # noqa: E402
from agacc.config import parse_override  # noqa: E402
from transformers import DynamicCache  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--prefill", type=int, default=1536)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    model, tok = agacc.load_model()
    text = open(args.text, encoding="utf-8", errors="replace").read()
    ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens]
    P = args.prefill

    def score(cache):
        with torch.inference_mode():
            model(ids[:, :P], past_key_values=cache)
            lp = model(ids[:, P:-1], past_key_values=cache).logits[0].float().log_softmax(-1)
        return float(-lp.gather(-1, ids[0, P + 1:, None]).mean()), lp

    base, ref = score(DynamicCache(config=model.config))
    print(f"{os.path.basename(args.text)}: {ids.shape[1]} tokens, prefill {P}; plain ppl {torch.tensor(base).exp():.3f}")
    rows = []
    for spec in args.specs:
        name, *kv = spec.split(",")
        cfg = agacc.AGACCConfig.preset(name, **dict(parse_override(x) for x in kv))
        cache = agacc.CompressedCache(model.config, cfg)
        nll, lp = score(cache)
        kl = float((ref.exp() * (ref - lp)).sum(-1).mean())
        mem = cache.memory()
        row = {"spec": spec, "ppl": float(torch.tensor(nll).exp()), "dppl_pct": 100 * (float(torch.tensor(nll - base).exp()) - 1),
               "kl": kl, "ratio": mem["ratio"],
               "bytes_pct": {k: round(100 * v / mem["bytes"]) for k, v in mem["by_tier"].items() if v}}
        rows.append(row)
        print(f"{spec:58s} ppl {row['ppl']:.3f} ({row['dppl_pct']:+.2f}%) KL {kl:.4f} ratio {mem['ratio']:.2f}x "
              f"bytes% {row['bytes_pct']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"text": args.text, "tokens": args.tokens, "prefill": P, "plain_ppl": float(torch.tensor(base).exp()),
                       "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
