"""CPU decode step of the embedded model, by part: the linear layers (fp32 weights vs the GGUF's own
blocks in ``kernels/cpu_linear.cpp``) and whole decode steps (plain ``DynamicCache`` vs the AGACC
cache, fp32 vs packed weights).

    python bench/bench_cpu.py [--steps 48] [--reps 3] [--prompt story] [--method agacc] [--json out/bench_cpu.json]

Rows:
  linear <shape>        one layer's product for a decode (1 row of x), x @ W^T: ``F.linear`` on the
                        fp32 weight vs ``PackedLinear`` (Q4_1 / Q8_0 blocks), microseconds a call;
                        ``all 211 layers`` sums them over the model's layers (cold: each layer's
                        weight read once per step, as in a decode)
  decode step           ms per greedy decode step after prefilling the example prompt, ``model(...)``
                        with ``logits_to_keep=1``; plain vs ``CompressedCache`` (``--method``,
                        default the ``agacc`` preset, re-evaluations included), with the fp32 and the packed model

Every timing is the best of ``--reps`` repeats (this machine is shared: the best is the least
disturbed). One torch thread, as the app runs.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from bench.common import METHOD_HELP, ROOT, make_cache, parse_methods, write_json


def best_of(fn, reps: int, n: int) -> float:
    """Seconds per call of ``fn``: the best mean over ``reps`` batches of ``n`` calls (after a warm-up)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def linear_rows(packed_model, fp32_model, reps: int) -> list[dict]:
    from kernels.packed_linear import PackedLinear

    packed = {n: m for n, m in packed_model.named_modules() if isinstance(m, PackedLinear)}
    dense = dict(fp32_model.named_modules())
    rows, by_shape = [], {}
    for name, m in packed.items():
        by_shape.setdefault((m.kind, m.out_features, m.in_features), []).append(name)
    with torch.inference_mode():
        for (kind, n_out, n_in), names in sorted(by_shape.items()):
            x = torch.randn(1, 1, n_in)
            p, d = packed[names[0]], dense[names[0]]
            t_fp32 = best_of(lambda: torch.nn.functional.linear(x, d.weight), reps, 200)
            t_packed = best_of(lambda: p(x), reps, 200)
            rows.append({"part": f"linear {kind} [{n_out} x {n_in}] x{len(names)}", "fp32_us": t_fp32 * 1e6,
                         "packed_us": t_packed * 1e6})
        # a decode's view: every layer once per step, so each weight comes from memory, not the cache
        xs = {n: torch.randn(1, 1, packed[n].in_features) for n in packed}
        t_fp32 = best_of(lambda: [torch.nn.functional.linear(xs[n], dense[n].weight) for n in packed], reps, 5)
        t_packed = best_of(lambda: [packed[n](xs[n]) for n in packed], reps, 5)
        rows.append({"part": f"all {len(packed)} layers, each once (ms)", "fp32_us": t_fp32 * 1e6, "packed_us": t_packed * 1e6})
    return rows


def step_ms(model, tok, prompt: str, cfg, steps: int, reps: int) -> float:
    """ms per greedy decode step; ``cfg`` None = the plain DynamicCache."""
    from agacc.session import encode_prompt

    ids = encode_prompt(tok, prompt)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(reps):
            cache = make_cache(model, cfg)
            nxt = model(input_ids=ids, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(steps):
                nxt = model(input_ids=nxt, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
            best = min(best, (time.perf_counter() - t0) / steps)
    return best * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--prompt", default="story", choices=["story", "document", "passkey"])
    p.add_argument("--method", default="agacc", help="the compressed cache of the decode-step rows: " + METHOD_HELP)
    p.add_argument("--json", default=str(ROOT / "out" / "bench_cpu.json"))
    args = p.parse_args(argv)
    ((label, cfg),) = parse_methods([args.method])
    torch.set_num_threads(1)

    import agacc
    from kernels import cpu

    if cpu.load() is None:
        print("the CPU kernels are not built (AGACC_CPU_KERNEL=0 or no compiler): nothing to compare")
        return 0
    fp32_model, tok = agacc.load_model()
    packed_model, _ = agacc.load_model(packed_weights=True)
    prompt = (ROOT / "assets" / "examples" / f"{args.prompt}.txt").read_text()

    lin = linear_rows(packed_model, fp32_model, args.reps)
    steps = []
    for weights, model in (("fp32", fp32_model), ("packed", packed_model)):
        for kind, c in (("plain", None), (label, cfg)):
            steps.append({"weights": weights, "cache": kind, "ms": step_ms(model, tok, prompt, c, args.steps, args.reps)})

    print("\n| part | fp32 weights | GGUF blocks (packed) | speed-up |\n|---|---|---|---|")
    for r in lin:
        unit, f = ("ms", 1e-3) if "(ms)" in r["part"] else ("us", 1.0)
        print(f"| {r['part'].replace(' (ms)', '')} | {r['fp32_us'] * f:.1f} {unit} | {r['packed_us'] * f:.1f} {unit} | "
              f"{r['fp32_us'] / r['packed_us']:.2f}x |")
    print(f"\n| decode step ({args.prompt} prompt, best of {args.reps} x {args.steps} steps) | fp32 weights | packed |"
          "\n|---|---|---|")
    for kind in ("plain", label):
        ms = {s["weights"]: s["ms"] for s in steps if s["cache"] == kind}
        name = "plain DynamicCache" if kind == "plain" else f"CompressedCache ({kind})"
        print(f"| {name} | {ms['fp32']:.1f} ms ({1e3 / ms['fp32']:.1f} tok/s) | {ms['packed']:.1f} ms ({1e3 / ms['packed']:.1f} tok/s) |")
    out = {"linear": lin, "decode_step": steps, "prompt": args.prompt, "steps": args.steps, "reps": args.reps,
           "threads": torch.get_num_threads()}
    write_json(args.json, out, indent=1)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
