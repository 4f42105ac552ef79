"""What a re-evaluation (``CompressedCache.reevaluate``: tracker -> scores -> ratio fitter -> tiers ->
store) costs at long context on the embedded model, per re-evaluation and per decoded token.

    python bench/bench_reeval.py [--contexts 2048 6144] [--steps 64] [--method agacc@4] [--json out/bench_reeval.json]

For each context length: the first N tokens of the licence texts of the OS (several concatenated
when one is too short), prefilled in chunks of ``--chunk`` tokens (``logits_to_keep=1``), then
``--steps`` greedy decode steps. ``cache.reevaluate`` is wrapped and timed: the prefill's
re-evaluations (one per chunk) and the decode's (every N_r steps) are reported apart;
``ms/token`` = decode re-evaluation time / decode steps (the cost amortised over the tokens), next
to the mean decode step (re-evaluations included). ``--plain``: the same prefill and decode with the
model's own ``DynamicCache`` too, for its mean step and the speed ratio (plain step / AGACC step).
One torch thread.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.common import ROOT, load_model, parse_methods, print_table, write_json

LICENSES = Path("/usr/share/common-licenses")
TEXTS = ("GPL-3", "LGPL-2.1", "MPL-2.0", "Apache-2.0", "GFDL-1.3", "MPL-1.1", "GPL-2")


def context_ids(tok, n: int) -> torch.Tensor:
    """The first ``n`` tokens of the licence texts laid end to end -> [1, n]."""
    text = ""
    for name in TEXTS:
        p = LICENSES / name
        if p.exists():
            text += p.read_text(errors="replace") + "\n\n"
        ids = tok(text, return_tensors="pt").input_ids
        if ids.shape[1] >= n:
            return ids[:, :n]
    raise SystemExit(f"error: the licence texts hold {ids.shape[1]} tokens, {n} needed")


def run(model, tok, cfg, n_ctx: int, steps: int, chunk: int) -> dict:
    from agacc import CompressedCache

    cache = CompressedCache(model.config, cfg)
    times: list[tuple[bool, float]] = []
    inner = cache.reevaluate

    def timed(prefill: bool = False):
        t0 = time.perf_counter()
        inner(prefill=prefill)
        times.append((prefill, time.perf_counter() - t0))

    cache.reevaluate = timed
    ids = context_ids(tok, n_ctx)
    with torch.inference_mode():
        t0 = time.perf_counter()
        for lo in range(0, n_ctx, chunk):
            out = model(ids[:, lo:lo + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
        t_prefill = time.perf_counter() - t0
        nxt = out.logits[:, -1:].argmax(-1)
        tokens = []
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1:].argmax(-1)
            tokens.append(int(nxt))
        t_decode = time.perf_counter() - t0
    pre = [t for p, t in times if p]
    dec = [t for p, t in times if not p]
    mem = cache.memory()
    return {"context": n_ctx, "steps": steps, "chunk": chunk, "prefill_s": t_prefill,
            "prefill_reevals": len(pre), "prefill_reeval_ms": [1e3 * t for t in pre],
            "decode_reevals": len(dec), "decode_reeval_ms": [1e3 * t for t in dec],
            "decode_reeval_mean_ms": 1e3 * sum(dec) / max(1, len(dec)),
            "reeval_ms_per_token": 1e3 * sum(dec) / steps, "decode_step_ms": 1e3 * t_decode / steps,
            "ratio": mem["ratio"], "bytes": mem["bytes"], "tokens": tokens}


def plain_step_ms(model, tok, n_ctx: int, steps: int, chunk: int) -> float:
    """Mean greedy decode step (ms) after the same chunked prefill, with the model's ``DynamicCache``."""
    from bench.common import make_cache

    cache = make_cache(model, None)
    ids = context_ids(tok, n_ctx)
    with torch.inference_mode():
        for lo in range(0, n_ctx, chunk):
            out = model(ids[:, lo:lo + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1:].argmax(-1)
        return 1e3 * (time.perf_counter() - t0) / steps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 6144])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--method", default="agacc@4", help="one method (bench.common grammar), default agacc@4")
    ap.add_argument("--plain", action="store_true", help="also time the decode with the model's DynamicCache")
    ap.add_argument("--json", default=str(ROOT / "out" / "bench_reeval.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    (label, cfg), = parse_methods([args.method])
    model, tok = load_model(packed_weights=True)
    rows, recs = [], []
    for n in args.contexts:
        r = run(model, tok, cfg, n, args.steps, args.chunk)
        r["method"] = label
        if args.plain:
            r["plain_step_ms"] = plain_step_ms(model, tok, n, args.steps, args.chunk)
            r["speed_vs_plain"] = r["plain_step_ms"] / r["decode_step_ms"]
        recs.append(r)
        dec = r["decode_reeval_ms"]
        rows.append([f"{n}", f"{r['prefill_s']:.1f}", f"{sum(r['prefill_reeval_ms']) / max(1, r['prefill_reevals']):.1f}",
                     f"{r['decode_reevals']}", f"{r['decode_reeval_mean_ms']:.1f}", f"{min(dec, default=0):.1f}",
                     f"{max(dec, default=0):.1f}", f"{r['reeval_ms_per_token']:.2f}", f"{r['decode_step_ms']:.1f}",
                     f"{r['ratio']:.2f}"] + ([f"{r['plain_step_ms']:.1f}", f"{r['speed_vs_plain']:.2f}x"] if args.plain else []))
    print(f"method {label}, {args.steps} decode steps, prefill chunks of {args.chunk}, 1 thread")
    print_table(["context", "prefill s", "prefill reeval ms", "decode reevals", "mean ms", "min ms", "max ms",
                 "reeval ms/token", "step ms", "ratio"] + (["plain step ms", "speed"] if args.plain else []), rows)
    write_json(args.json, {"method": label, "records": recs})


if __name__ == "__main__":
    main()
