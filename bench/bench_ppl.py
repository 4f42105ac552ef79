"""Teacher-forced perplexity, bytes and decode speed of the compressed cache on the embedded model.

Prefill the first ``--prefill`` tokens of a natural text, then feed the rest one token at a time
through the cache (every prediction after the first comes from a decode step over the compressed
store). Reports perplexity vs the plain model (DynamicCache, same loop), top-1 agreement, KL,
bytes held vs a 16-bit cache (measured ``cache.memory()`` at the end), decode tokens/s.

    python bench/bench_ppl.py --tokens 2048 --prefill 1024 --threads 1 --json out/bench_ppl.json

``--threads`` sets torch's intra-op threads for the plain and the compressed runs alike (on the
2-core CPU this was measured on, one thread is faster for both: decode steps are many small ops).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import agacc  # noqa: E402
from agacc.config import parse_override  # noqa: E402
from transformers import DynamicCache  # noqa: E402

DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"


def run(model, ids, prefill, cache):
    """-> (log-probs of the true next tokens [n], full log-prob rows fp16 [n, V], decode seconds, steps)."""
    logps, rows = [], []
    with torch.inference_mode():
        out = model(ids[:, :prefill], past_key_values=cache, use_cache=True)
        lp = out.logits[0, -1].float().log_softmax(-1)
        logps.append(lp[ids[0, prefill]])
        rows.append(lp.half())
        t0 = time.perf_counter()
        for t in range(prefill, ids.shape[1] - 1):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            lp = out.logits[0, -1].float().log_softmax(-1)
            logps.append(lp[ids[0, t + 1]])
            rows.append(lp.half())
        dt = time.perf_counter() - t0
    return torch.stack(logps), torch.stack(rows), dt, ids.shape[1] - 1 - prefill


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default=DEFAULT_TEXT)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--prefill", type=int, default=1024)
    ap.add_argument("--presets", nargs="+", default=["agacc", "dynacompress", "attention-sum",
                                                     "uniform-int8", "uniform-int4", "uniform-int2"])
    ap.add_argument("--set", action="append", default=[], help="PRESET:key=value override (repeatable)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model, tok = agacc.load_model()
    text = open(args.text, encoding="utf-8", errors="replace").read()
    ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens]
    if ids.shape[1] < args.tokens:
        raise SystemExit(f"{args.text} has only {ids.shape[1]} tokens")

    ref_lp, ref_rows, ref_dt, steps = run(model, ids, args.prefill, DynamicCache(config=model.config))
    ref_ppl = float(torch.exp(-ref_lp.mean()))
    rows = [{"preset": "plain (DynamicCache)", "ppl": ref_ppl, "ppl_rel": 1.0, "top1": 1.0, "kl": 0.0, "ratio": None,
             "bytes": None, "bytes_fp16": None, "tok_s": steps / ref_dt, "speed_rel": 1.0}]
    print(f"plain: ppl {ref_ppl:.3f}, {steps / ref_dt:.1f} tok/s", flush=True)
    overrides: dict[str, dict] = {}
    for item in args.set:
        name, kv = item.split(":", 1)
        k, v = parse_override(kv)
        overrides.setdefault(name, {})[k] = v
    for spec in args.presets:
        name = spec.split("@")[0]
        extra = dict(overrides.get(spec, {}))
        if "@" in spec:  # e.g. agacc@4 = the agacc preset fitted to ratio 4
            extra["target_ratio"] = float(spec.split("@")[1])
        try:
            cfg = agacc.AGACCConfig.preset(name, **extra)
        except ValueError as e:
            print(f"skip {spec}: {e}", flush=True)
            continue
        cache = agacc.CompressedCache(model.config, cfg)
        lp, lrows, dt, _ = run(model, ids, args.prefill, cache)
        mem = cache.memory()
        ppl = float(torch.exp(-lp.mean()))
        top1 = float((lrows.argmax(-1) == ref_rows.argmax(-1)).float().mean())
        p_ref = ref_rows.float().exp()
        kl = float((p_ref * (ref_rows.float() - lrows.float())).sum(-1).mean())
        row = {"preset": spec, "ppl": ppl, "ppl_rel": ppl / ref_ppl, "top1": top1, "kl": kl, "ratio": mem["ratio"],
               "bytes": mem["bytes"], "bytes_fp16": mem["bytes_fp16"], "tok_s": steps / dt,
               "speed_rel": (steps / dt) / (steps / ref_dt), "by_tier": mem["by_tier"], "overrides": extra}
        rows.append(row)
        print(f"{spec}: ppl {ppl:.3f} ({100 * (ppl / ref_ppl - 1):+.2f}%), top1 {top1:.3f}, KL {kl:.4f}, "
              f"ratio {mem['ratio']:.2f}x, {steps / dt:.1f} tok/s ({row['speed_rel']:.2f}x)", flush=True)

    print(f"\n{args.tokens} tokens of {os.path.basename(args.text)}, prefill {args.prefill}, {steps} teacher-forced decode steps, "
          f"{torch.get_num_threads()} torch thread(s)")
    print(f"{'method':<22}{'ppl':>9}{'Δppl':>9}{'top-1':>8}{'KL':>9}{'ratio':>8}{'MiB':>9}{'tok/s':>8}{'speed':>7}")
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "1.00x"
        mib = f"{r['bytes'] / 2**20:.2f}" if r["bytes"] else "-"
        print(f"{r['preset']:<22}{r['ppl']:>9.3f}{100 * (r['ppl_rel'] - 1):>+8.2f}%{r['top1']:>8.3f}{r['kl']:>9.4f}"
              f"{ratio:>8}{mib:>9}{r['tok_s']:>8.1f}{r['speed_rel']:>6.2f}x")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"tokens": args.tokens, "prefill": args.prefill, "text": args.text,
                       "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
