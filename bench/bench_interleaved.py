"""Decode speed of methods relative to the plain model, interleaved in one process.

Every cache is prefilled with the same ``--prefill`` tokens of a text; then the caches take turns
decoding the next ``--chunk`` tokens (teacher-forced token by token, ``agacc.eval.runner.teacher_force``),
plain first, until ``--tokens``. The machine's drift (other load, clock changes) hits every method
alike, so the speed ratios are steadier than those of separate runs (``bench_ppl.py``'s rates move by
about 10% from run to run on a 2-core CPU). The first two chunks are warm-up and not timed.

    python bench/bench_interleaved.py --tokens 1424 --prefill 1024 --threads 1 \\
        agacc@4 agacc@4,rotate=false --json out/bench_interleaved.json
    python bench/bench_interleaved.py --text /usr/share/common-licenses/GPL-3 --prefill 6000 --tokens 6128 \\
        --threads 1 --packed-weights agacc@4          # long context, the model as the app loads it

Each method is ``NAME[@RATIO][,key=value]...`` (``agacc.spec``); ``plain`` (the DynamicCache) always runs first.
"""
from __future__ import annotations

import argparse
import time

import torch

from bench import common


def main(argv=None):
    from agacc.eval.runner import teacher_force

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("methods", nargs="+", metavar="METHOD", help=common.METHOD_HELP + " (plain is always run first)")
    common.add_model_args(ap, text="/usr/share/common-licenses/GFDL-1.3")
    ap.add_argument("--tokens", type=int, default=1424)
    ap.add_argument("--prefill", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens a prefill forward takes (0: one forward)")
    ap.add_argument("--packed-weights", action="store_true",
                    help="the embedded model on its GGUF blocks, as the app loads it (default: fp32 weights)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    methods = common.parse_methods([common.PLAIN] + [s for s in args.methods if s.strip() != common.PLAIN], allow_plain=True)
    common.set_threads(args.threads)
    model, tok = common.load_model(args.model, **({"packed_weights": True} if args.packed_weights else {}))
    ids = common.text_ids(tok, args.text, args.tokens, need=args.prefill + 3 * args.chunk)
    caches = {label: common.make_cache(model, cfg) for label, cfg in methods}
    seconds = dict.fromkeys(caches, 0.0)
    timed = 0
    with torch.inference_mode():
        step = args.prefill_chunk or args.prefill
        for c in caches.values():
            for lo in range(0, args.prefill, step):
                model(ids[:, lo:min(lo + step, args.prefill)], past_key_values=c, logits_to_keep=1)
    for n, t in enumerate(range(args.prefill, ids.shape[1] - args.chunk + 1, args.chunk)):
        chunk = ids[0, t:t + args.chunk].tolist()
        for s, c in caches.items():
            t0 = time.perf_counter()
            teacher_force(model, c, chunk, chunk=1)
            if n >= 2:
                seconds[s] += time.perf_counter() - t0
        timed += args.chunk if n >= 2 else 0
    rows = [{"spec": s, "tok_s": timed / seconds[s], "speed_rel": seconds[common.PLAIN] / seconds[s]} for s in caches]
    print(f"{timed} timed decode steps per method, {args.prefill} -> {ids.shape[1]} tokens, "
          f"chunks of {args.chunk}, {torch.get_num_threads()} torch thread(s)")
    common.print_table(["method", "tok/s", "vs plain"],
                       [[r["spec"], f"{r['tok_s']:.2f}", f"{r['speed_rel']:.3f}x"] for r in rows])
    common.write_json(args.json, {"text": args.text, "prefill": args.prefill, "tokens": int(ids.shape[1]), "chunk": args.chunk,
                                  "packed_weights": args.packed_weights, "prefill_chunk": args.prefill_chunk,
                                  "threads": torch.get_num_threads(), "rows": rows}, indent=1)


if __name__ == "__main__":
    main()
