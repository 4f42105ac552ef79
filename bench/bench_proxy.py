"""Fast quality proxy for tuning: prefill P tokens into the cache (compressed at the end of the
prefill), then score the next tokens of the text in ONE forward pass over the compressed prefix
(``agacc.eval.runner.teacher_force`` in one chunk; ppl and KL by ``agacc.eval.metrics.lm_stats``).

Much cheaper than bench_ppl.py's token-at-a-time protocol (two forwards per setting), it measures
how well the compressed prefix serves later queries; it does not exercise decode-time re-tiering.

    python bench/bench_proxy.py --text FILE agacc uniform-int2 agacc@4,p_max=0.5
Each method is ``NAME[@RATIO][,key=value]...`` (``agacc.spec``). Prints ppl vs the plain model, KL,
measured ratio, bytes by tier.
"""
from __future__ import annotations

import argparse
import math
import os

import torch

from bench import common


def main(argv=None):
    from agacc.eval.metrics import lm_stats
    from agacc.eval.runner import teacher_force

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("methods", nargs="+", metavar="METHOD", help=common.METHOD_HELP)
    common.add_model_args(ap, text="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--prefill", type=int, default=1536)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    methods = common.parse_methods(args.methods)
    common.set_threads(args.threads)
    model, tok = common.load_model(args.model)
    P = args.prefill
    ids = common.text_ids(tok, args.text, args.tokens, need=P + 2)
    targets = ids[0, P + 1:]

    def score(cache):
        """-> logits [T, V] of the positions P.. (predicting ids[P+1:]) after a real prefill of ids[:P]."""
        with torch.inference_mode():
            model(ids[:, :P], past_key_values=cache)
        return teacher_force(model, cache, ids[0, P:-1].tolist(), chunk=ids.shape[1])

    ref = score(common.make_cache(model, None))
    base = lm_stats(ref, ref, targets)["nll"] / len(targets)
    print(f"{os.path.basename(args.text)}: {ids.shape[1]} tokens, prefill {P}; plain ppl {math.exp(base):.3f}")
    rows = []
    for label, cfg in methods:
        cache = common.make_cache(model, cfg)
        st = lm_stats(score(cache), ref, targets)
        nll, kl = st["nll"] / st["tokens"], st["kl"] / st["tokens"]
        mem = cache.memory()
        row = {"spec": label, "ppl": math.exp(nll), "dppl_pct": 100 * (math.exp(nll - base) - 1), "kl": kl,
               "ratio": mem["ratio"], "bytes_pct": {k: round(100 * v / mem["bytes"]) for k, v in mem["by_tier"].items() if v}}
        rows.append(row)
        print(f"{label:58s} ppl {row['ppl']:.3f} ({row['dppl_pct']:+.2f}%) KL {kl:.4f} ratio {mem['ratio']:.2f}x "
              f"bytes% {row['bytes_pct']}", flush=True)
    common.write_json(args.json, {"text": args.text, "tokens": args.tokens, "prefill": P, "plain_ppl": math.exp(base),
                                  "rows": rows})


if __name__ == "__main__":
    main()
