"""Long prompts on bounded memory: peak memory, prefill time and decode speed against prompt length.

    python bench/bench_long.py --lengths 1024 2048 4096 8000 --methods plain agacc@4 agacc@8 uniform-int4 \
        --budget-mb 64 --json out/bench_long.json --plot docs/long_context.png

Each (length, method) point runs in a fresh process (``--point``), so one point's allocations never
inflate another's peak: the embedded model is loaded as the app loads it (its GGUF blocks), one torch
thread, then the prompt (the first N tokens of the texts) goes in through chunked prefill
(``--chunk`` tokens a forward, as ``generate(prefill_chunk_size=...)`` does), then ``--decode``
greedy tokens. Per point:

* ``rss_growth_mb``: peak resident memory during prefill + decode (VmHWM, reset after loading) minus
  the resident memory before the prompt: what the prompt costs the process, activations included;
* ``cache_peak_mb`` / ``cache_mb``: the cache's peak and final bytes (``memory()["peak_bytes"]``; a
  ``DynamicCache`` only grows: its tensors' bytes at the end), and ``fp16_mb``, a 16-bit cache of the
  same tokens (the model runs in fp32, so the plain cache holds twice that);
* ``prefill_s`` and ``decode_tok_s``.

``--budget-mb B``: per method, the longest measured prompt whose cache peak stays under B MB, and
the longest its measured bytes per token project to (a cache grows linearly with the prompt).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench.common import PLAIN, parse_methods, print_table, write_json

TEXTS = ["/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0",
         "/usr/share/common-licenses/MPL-2.0", "/usr/share/common-licenses/LGPL-2.1"]
MB = 2 ** 20


def _status(key: str) -> int:
    """A VmRSS / VmHWM line of /proc/self/status in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def run_point(n: int, spec: str, chunk: int, decode: int, texts: list[str]) -> dict:
    import torch

    import agacc
    from bench.common import make_cache

    torch.set_num_threads(1)
    (label, cfg), = parse_methods([spec], allow_plain=True)
    model, tok = agacc.load_model(packed_weights=True)
    text = "\n\n".join(open(t).read() for t in texts)
    ids = tok(text, return_tensors="pt").input_ids[:, :n]
    if ids.shape[1] < n:
        raise SystemExit(f"error: the texts have {ids.shape[1]} tokens, {n} needed")
    with torch.inference_mode():  # warm-up: the kernels, a compression, the first allocations
        warm = make_cache(model, cfg)
        for lo in range(0, 192, 64):
            out = model(ids[:, lo:lo + 64], past_key_values=warm, use_cache=True, logits_to_keep=1)
        for _ in range(16):
            out = model(ids[:, 192:193], past_key_values=warm, use_cache=True)
        del warm, out
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS
        f.write("5")
    rss0 = _status("VmRSS")
    cache = make_cache(model, cfg)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, n, chunk):
            out = model(ids[:, lo:lo + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
        prefill_s = time.perf_counter() - t0
        token = out.logits[0, -1].argmax().item()
        t1 = time.perf_counter()
        for _ in range(decode):
            out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            token = out.logits[0, -1].argmax().item()
        decode_s = time.perf_counter() - t1
    hwm = _status("VmHWM")
    geo = agacc.Geometry.of(model.config)
    if cfg is None:
        held = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
        peak = held
    else:
        mem = cache.memory()
        held, peak = mem["bytes"], mem["peak_bytes"]
    return {"tokens": n, "method": label, "chunk": chunk, "rss_growth_mb": (hwm - rss0) / MB,
            "cache_peak_mb": peak / MB, "cache_mb": held / MB, "fp16_mb": geo.bytes_fp16(n + decode) / MB,
            "prefill_s": prefill_s, "decode_tok_s": decode / decode_s}


def budget_rows(records: list[dict], budget_mb: float) -> list[list[str]]:
    rows = []
    for method in dict.fromkeys(r["method"] for r in records):
        pts = sorted((r for r in records if r["method"] == method), key=lambda r: r["tokens"])
        fits = [r["tokens"] for r in pts if r["cache_peak_mb"] <= budget_mb]
        per_token = pts[-1]["cache_peak_mb"] / pts[-1]["tokens"]
        rows.append([method, str(max(fits)) if fits else "none", f"{budget_mb / per_token:,.0f}"])
    return rows


def plot(records: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for method in dict.fromkeys(r["method"] for r in records):
        pts = sorted((r for r in records if r["method"] == method), key=lambda r: r["tokens"])
        x = [r["tokens"] for r in pts]
        axes[0].plot(x, [r["rss_growth_mb"] for r in pts], "o-", label=method)
        axes[1].plot(x, [r["cache_peak_mb"] for r in pts], "o-", label=method)
        axes[2].plot(x, [r["decode_tok_s"] for r in pts], "o-", label=method)
    for ax, title in zip(axes, ("peak RSS growth (MB)", "cache peak (MB)", "decode tokens/s")):
        ax.set_title(title)
        ax.set_xlabel("prompt tokens")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8000])
    ap.add_argument("--methods", nargs="+", default=[PLAIN, "agacc@4", "agacc@8", "uniform-int4"])
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk (tokens a forward)")
    ap.add_argument("--decode", type=int, default=32, help="greedy tokens decoded after the prompt")
    ap.add_argument("--texts", nargs="+", default=TEXTS, help="text files, joined (the prompt is their first N tokens)")
    ap.add_argument("--budget-mb", type=float, default=64.0, help="KV budget for the longest-prompt table")
    ap.add_argument("--json", default="out/bench_long.json")
    ap.add_argument("--plot", default=None, help="PNG of the three curves (needs matplotlib)")
    ap.add_argument("--point", nargs=2, metavar=("N", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.chunk < 1:
        raise SystemExit(f"error: --chunk must be >= 1, got {args.chunk}")
    if args.point:
        print(json.dumps(run_point(int(args.point[0]), args.point[1], args.chunk, args.decode, args.texts)))
        return 0
    parse_methods(args.methods, allow_plain=True)  # a bad spec fails before any run
    records = []
    for n in args.lengths:
        for spec in args.methods:
            cmd = [sys.executable, "-m", "bench.bench_long", "--point", str(n), spec, "--chunk", str(args.chunk),
                   "--decode", str(args.decode), "--texts", *args.texts]
            res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
            if res.returncode:
                raise SystemExit(f"error: point {n} {spec} failed:\n{res.stderr[-2000:]}")
            rec = json.loads(res.stdout.strip().splitlines()[-1])
            records.append(rec)
            print(f"{n:>6} {rec['method']:<14} RSS +{rec['rss_growth_mb']:.0f} MB, cache peak {rec['cache_peak_mb']:.1f} MB, "
                  f"prefill {rec['prefill_s']:.1f} s, decode {rec['decode_tok_s']:.2f} tok/s", flush=True)
    head = ["method", "tokens", "RSS growth MB", "cache peak MB", "cache MB", "fp16 MB", "prefill s", "decode tok/s"]
    print_table(head, [[r["method"], r["tokens"], f"{r['rss_growth_mb']:.0f}", f"{r['cache_peak_mb']:.1f}",
                        f"{r['cache_mb']:.1f}", f"{r['fp16_mb']:.1f}", f"{r['prefill_s']:.1f}",
                        f"{r['decode_tok_s']:.2f}"] for r in records])
    print(f"\nUnder a KV budget of {args.budget_mb:g} MB (cache peak):")
    print_table(["method", "longest measured", "projected tokens"], budget_rows(records, args.budget_mb))
    write_json(args.json, {"args": {k: v for k, v in vars(args).items() if k != "point"}, "records": records})
    if args.plot:
        plot(records, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
