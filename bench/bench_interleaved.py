"""Decode speed of presets relative to the plain model, interleaved in one process.

Every cache is prefilled with the same ``--prefill`` tokens of a text; then the caches take turns
decoding the next ``--chunk`` tokens (teacher-forced), plain first, until ``--tokens``. The machine's
drift (other load, clock changes) hits every method alike, so the speed ratios are steadier than
those of separate runs (``bench_ppl.py``'s rates move by about 10% from run to run on a 2-core CPU).
The first two chunks are warm-up and not timed.

    python bench/bench_interleaved.py --tokens 1424 --prefill 1024 --threads 1 \\
        agacc,target_ratio=4 agacc,target_ratio=4,rotate=false --json out/bench_interleaved.json

A spec is ``PRESET[,key=value...]`` (``AGACCConfig`` fields, as ``--set`` in the CLI).
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


def make_cache(model, spec: str):
    if spec == "plain":
        return DynamicCache(config=model.config)
    name, *items = spec.split(",")
    return agacc.CompressedCache(model.config, agacc.AGACCConfig.preset(name, **dict(parse_override(x) for x in items)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="+", help="PRESET[,key=value...] (plain is always run first)")
    ap.add_argument("--text", default="/usr/share/common-licenses/GFDL-1.3")
    ap.add_argument("--tokens", type=int, default=1424)
    ap.add_argument("--prefill", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--model", default=None, help="hub id or local path (default: the embedded model)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = agacc.load_model(args.model)
    with open(args.text) as f:
        ids = tok(f.read(), return_tensors="pt").input_ids[:, : args.tokens]
    if ids.shape[1] < args.prefill + 3 * args.chunk:
        raise SystemExit(f"{args.text} has {ids.shape[1]} tokens: need prefill + 3 chunks")
    specs = ["plain"] + [s for s in args.specs if s != "plain"]
    caches = {s: make_cache(model, s) for s in specs}
    seconds = dict.fromkeys(specs, 0.0)
    timed = 0
    with torch.inference_mode():
        for c in caches.values():
            model(ids[:, : args.prefill], past_key_values=c)
        for n, t in enumerate(range(args.prefill, ids.shape[1] - args.chunk + 1, args.chunk)):
            for s, c in caches.items():
                t0 = time.perf_counter()
                for i in range(t, t + args.chunk):
                    model(ids[:, i:i + 1], past_key_values=c)
                if n >= 2:
                    seconds[s] += time.perf_counter() - t0
            timed += args.chunk if n >= 2 else 0
    rows = [{"spec": s, "tok_s": timed / seconds[s], "speed_rel": seconds["plain"] / seconds[s]} for s in specs]
    print(f"{timed} timed decode steps per method, {args.prefill} -> {ids.shape[1]} tokens, "
          f"chunks of {args.chunk}, {torch.get_num_threads()} torch thread(s)")
    print(f"{'method':45s} {'tok/s':>7s} {'vs plain':>9s}")
    for r in rows:
        print(f"{r['spec']:45s} {r['tok_s']:7.2f} {r['speed_rel']:8.3f}x")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"text": args.text, "prefill": args.prefill, "tokens": int(ids.shape[1]), "chunk": args.chunk,
                       "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
