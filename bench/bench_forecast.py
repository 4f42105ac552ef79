"""What the prompt's forecasts cost (``agacc.probe.lookahead``: the prompt read again, ``repeat_weight``, then
``lookahead`` pseudo tokens): time to the first token and the peak bytes, with and without them.

    python bench/bench_forecast.py [--tokens 1024] [--chunk 512] [--rounds 3]
        [--methods agacc@8 agacc@8,repeat_weight=0 agacc@8,repeat_weight=0,lookahead=0] [--json out/bench_forecast.json]

The first ``--tokens`` tokens of the held-out narrative text (``bench/corpus.py``), prefilled in chunks of ``--chunk``
(``logits_to_keep=1``), then the forecasts the method's config asks for, the methods interleaved for ``--rounds``
rounds, one torch thread; per method the median prefill, forecast and first-token seconds and the peak bytes held
(``memory()["peak_bytes"]``; a repeat forward's 128 tokens at full precision beside the held prompt stay under a
prefill chunk's own peak: docs/tuning.md round 32).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import ROOT, load_model, parse_methods, print_table, write_json


@torch.inference_mode()
def prefill(model, cache, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """``ids`` [1, n] through ``cache``, ``chunk`` tokens a forward -> the last position's logits [V]."""
    for lo in range(0, ids.shape[1], chunk):
        out = model(input_ids=ids[:, lo:lo + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1]


def measure(model, ids: torch.Tensor, methods: list[tuple[str, object]], chunk: int, rounds: int) -> list[dict]:
    """One row per method: its prefill, forecast and first-token seconds per round, and its peak bytes."""
    from agacc import CompressedCache
    from agacc.config import forecasts
    from agacc.probe import lookahead

    times = {label: [] for label, _ in methods}
    peaks = {}
    for _ in range(rounds):
        for label, cfg in methods:
            cache = CompressedCache(model.config, cfg)
            t0 = time.perf_counter()
            logits = prefill(model, cache, ids, chunk)
            t1 = time.perf_counter()
            if forecasts(cfg):
                lookahead(model, cache, int(logits.argmax()), prompt_ids=ids)
            cache.end_prefill()
            t2 = time.perf_counter()
            times[label].append((t1 - t0, t2 - t1))
            peaks[label] = cache.memory()["peak_bytes"]
    rows = []
    for label, _ in methods:
        pre, fc = zip(*times[label])
        rows.append({"method": label, "prefill_s": list(pre), "forecast_s": list(fc),
                     "first_token_s": [a + b for a, b in zip(pre, fc)], "peak_bytes": peaks[label]})
    return rows


def main(argv=None) -> None:
    from bench import corpus

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--methods", nargs="+",
                    default=["agacc@8", "agacc@8,repeat_weight=0", "agacc@8,repeat_weight=0,lookahead=0"])
    ap.add_argument("--json", default=str(ROOT / "out" / "bench_forecast.json"))
    args = ap.parse_args(argv)
    if args.tokens < 2 or args.chunk < 1 or args.rounds < 1:
        ap.error("need --tokens >= 2, --chunk >= 1, --rounds >= 1")
    torch.set_num_threads(1)
    methods = parse_methods(args.methods)
    model, tok = load_model()
    text = next(t for t in corpus.suite("heldout") if t.name == "narrative-heldout")
    ids = tok(corpus.read(text, tok), return_tensors="pt").input_ids[:, :args.tokens]
    rows = measure(model, ids, methods, args.chunk, args.rounds)
    med = statistics.median
    print(f"{ids.shape[1]} prompt tokens, prefill chunks of {args.chunk}, {args.rounds} rounds interleaved, 1 thread")
    print_table(["method", "prefill s", "forecasts s", "first token s", "peak MB"],
                [[r["method"], f"{med(r['prefill_s']):.2f}", f"{med(r['forecast_s']):.2f}",
                  f"{med(r['first_token_s']):.2f}", f"{r['peak_bytes'] / 1e6:.2f}"] for r in rows])
    write_json(args.json, {"tokens": int(ids.shape[1]), "chunk": args.chunk, "rounds": args.rounds, "rows": rows})


if __name__ == "__main__":
    main()
