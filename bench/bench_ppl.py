"""Teacher-forced perplexity, bytes and decode speed of the compressed cache on the embedded model.

Prefill the first ``--prefill`` tokens of a natural text, then feed the rest one token at a time
through the cache (``agacc.eval.runner.teacher_force`` with chunks of 1: every prediction after the
first comes from a decode step over the compressed store). Reports perplexity vs the plain model
(DynamicCache, same loop), top-1 agreement, KL (``agacc.eval.metrics.lm_stats``), bytes held vs a
16-bit cache (measured ``cache.memory()`` at the end), decode tokens/s.

    python bench/bench_ppl.py --tokens 2048 --prefill 1024 --threads 1 --json out/bench_ppl.json \\
        agacc agacc@4 uniform-int4 h2o@4,recent_window=32

Each method is ``NAME[@RATIO][,key=value]...`` (``agacc.spec``). ``--threads`` sets torch's
intra-op threads for the plain and the compressed runs alike (on the 2-core CPU this was measured
on, one thread is faster for both: decode steps are many small ops).
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch

from bench import common

DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"
DEFAULT_METHODS = ["agacc", "dynacompress", "attention-sum", "uniform-int8", "uniform-int4", "uniform-int2"]


def run(model, ids, prefill, cache, prefill_chunk: int = 0):
    """Prefill (``prefill_chunk`` tokens a forward; 0: one forward), then token-by-token teacher
    forcing -> (logits [n, V] fp32 predicting ids[prefill:], decode s, steps)."""
    from agacc.eval.runner import teacher_force

    step = prefill_chunk or prefill
    with torch.inference_mode():
        for lo in range(0, prefill, step):
            out = model(ids[:, lo:min(prefill, lo + step)], past_key_values=cache, use_cache=True, logits_to_keep=1)
        first = out.logits[0, -1:].float()
    rest = ids[0, prefill:-1].tolist()
    t0 = time.perf_counter()
    logits = teacher_force(model, cache, rest, chunk=1)
    dt = time.perf_counter() - t0
    return torch.cat([first, logits]), dt, len(rest)


def main(argv=None):
    from agacc.eval.metrics import lm_stats

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("methods", nargs="*", metavar="METHOD", help=common.METHOD_HELP + f" (default: {' '.join(DEFAULT_METHODS)})")
    ap.add_argument("--methods", "--presets", dest="more_methods", nargs="+", default=[], metavar="METHOD",
                    help="more methods (the same as the positional ones)")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--prefill", type=int, default=1024)
    ap.add_argument("--prefill-chunk", type=int, default=512,
                    help="prompt tokens a prefill forward (the library's default chunked prefill); 0 = one forward")
    common.add_model_args(ap, text=DEFAULT_TEXT)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    methods = common.parse_methods((args.methods + args.more_methods) or DEFAULT_METHODS)
    if not 0 < args.prefill < args.tokens - 1:
        ap.error("need 0 < --prefill < --tokens - 1")
    common.set_threads(args.threads)

    torch.manual_seed(0)
    model, tok = common.load_model(args.model)
    ids = common.text_ids(tok, args.text, args.tokens)
    targets = ids[0, args.prefill:]

    if args.prefill_chunk < 0:
        ap.error("--prefill-chunk must be >= 0")
    ref, ref_dt, steps = run(model, ids, args.prefill, common.make_cache(model, None), args.prefill_chunk)
    ref_st = lm_stats(ref, ref, targets)
    ref_ppl = math.exp(ref_st["nll"] / ref_st["tokens"])
    rows = [{"preset": "plain (DynamicCache)", "ppl": ref_ppl, "ppl_rel": 1.0, "top1": 1.0, "kl": 0.0, "ratio": None,
             "bytes": None, "bytes_fp16": None, "tok_s": steps / ref_dt, "speed_rel": 1.0}]
    print(f"plain: ppl {ref_ppl:.3f}, {steps / ref_dt:.1f} tok/s", flush=True)
    for label, cfg in methods:
        cache = common.make_cache(model, cfg)
        logits, dt, _ = run(model, ids, args.prefill, cache, args.prefill_chunk)
        st = lm_stats(logits, ref, targets)
        mem = cache.memory()
        ppl = math.exp(st["nll"] / st["tokens"])
        top1, kl = st["top1"] / st["tokens"], st["kl"] / st["tokens"]
        row = {"preset": label, "ppl": ppl, "ppl_rel": ppl / ref_ppl, "top1": top1, "kl": kl, "ratio": mem["ratio"],
               "bytes": mem["bytes"], "bytes_fp16": mem["bytes_fp16"], "tok_s": steps / dt,
               "speed_rel": (steps / dt) / (steps / ref_dt), "by_tier": mem["by_tier"],
               "overrides": common.method_overrides(label)}
        rows.append(row)
        print(f"{label}: ppl {ppl:.3f} ({100 * (ppl / ref_ppl - 1):+.2f}%), top1 {top1:.3f}, KL {kl:.4f}, "
              f"ratio {mem['ratio']:.2f}x, {steps / dt:.1f} tok/s ({row['speed_rel']:.2f}x)", flush=True)
        del cache, logits

    print(f"\n{args.tokens} tokens of {os.path.basename(args.text)}, prefill {args.prefill} "
          f"({f'chunks of {args.prefill_chunk}' if args.prefill_chunk else 'one forward'}), "
          f"{steps} teacher-forced decode steps, "
          f"{torch.get_num_threads()} torch thread(s)")
    common.print_table(["method", "ppl", "Δppl", "top-1", "KL", "ratio", "MiB", "tok/s", "speed"], [
        [r["preset"], f"{r['ppl']:.3f}", f"{100 * (r['ppl_rel'] - 1):+.2f}%", f"{r['top1']:.3f}", f"{r['kl']:.4f}",
         f"{r['ratio']:.2f}x" if r["ratio"] else "1.00x", f"{r['bytes'] / 2**20:.2f}" if r["bytes"] else "-",
         f"{r['tok_s']:.1f}", f"{r['speed_rel']:.2f}x"] for r in rows])
    common.write_json(args.json, {"tokens": args.tokens, "prefill": args.prefill, "prefill_chunk": args.prefill_chunk,
                                  "text": args.text,
                                  "threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
