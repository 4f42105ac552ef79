"""CPU decode step of the embedded model, by part: one layer's decode attention (the C++ kernel over a
packed store vs SDPA over the plain cache's tensors), the linear layers (fp32 weights vs the GGUF's own
blocks in ``kernels/cpu_linear.cpp``) and whole decode steps (plain ``DynamicCache`` vs the AGACC
cache, fp32 vs packed weights).

    python bench/bench_cpu.py [--steps 48] [--reps 3] [--prompt story] [--method agacc] [--json out/bench_cpu.json]
    python bench/bench_cpu.py --attention-only --contexts 2048 6000     # the kernel rows alone (no model)

Rows:
  attention <n>         one layer's decode attention over n cached tokens, the embedded model's shape (3 KV
                        heads, 9 query heads, head dim 64), microseconds a call: ``kernels.cpu.decode_layer``
                        over a store as ``agacc@4`` holds one (a fifth of the tokens int4, the rest int3,
                        keys per 16-token block, rotated; the last 64 tokens fp32) vs
                        ``F.scaled_dot_product_attention`` over the same tokens as the plain cache holds them
                        (fp32 K/V, ``enable_gqa`` as transformers' SDPA path calls it for one unmasked row);
                        ``packed MB`` is what the kernel reads, MB/s that over the time
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


def attention_rows(contexts: list[int], reps: int, hot: int = 64) -> list[dict]:
    from agacc import quant
    from kernels import cpu
    from kernels.format import DENSE, QUANT, Part

    gen = torch.Generator().manual_seed(0)
    h, g, d = 3, 3, 64
    rows = []
    for n in contexts:
        n4 = (n - hot) // 5 // 16 * 16
        parts = []
        for bits, m in ((4, n4), (3, (n - hot - n4) // 16 * 16)):
            k, v = torch.randn(1, h, m, d, generator=gen), torch.randn(1, h, m, d, generator=gen)
            pk, ks, kz = quant.quantize_keys(quant.rotate(k), bits, 16)
            pv, vs, vz = quant.quantize_values(quant.rotate(v), bits, 64)
            parts.append(Part(QUANT, pk, pv, k_scale=ks, k_zero=kz, v_scale=vs, v_zero=vz, container=bits,
                              key_block=16, value_group=64, rotated=True))
        parts.append(Part(DENSE, torch.randn(1, h, hot, d, generator=gen), torch.randn(1, h, hot, d, generator=gen)))
        held = sum(p.n for p in parts)
        q = torch.randn(1, h, g, d, generator=gen) * d ** -0.5
        kf, vf = torch.randn(1, h, held, d, generator=gen), torch.randn(1, h, held, d, generator=gen)
        qf = q.reshape(1, h * g, 1, d)

        def sdpa():
            return torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, enable_gqa=True)

        read = sum(t.nbytes for p in parts for t in (p.k, p.v, p.k_scale, p.k_zero, p.v_scale, p.v_zero) if t is not None)
        with torch.inference_mode():
            t_kernel = best_of(lambda: cpu.decode_layer(q, parts), reps, 50)
            t_sdpa = best_of(sdpa, reps, 50)
        rows.append({"part": f"attention {held}", "tokens": held, "kernel_us": t_kernel * 1e6, "sdpa_us": t_sdpa * 1e6,
                     "packed_mb": read / 1e6, "kernel_mb_s": read / 1e6 / t_kernel})
    return rows


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
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 6000], help="cached tokens of the attention rows")
    p.add_argument("--attention-only", action="store_true", help="only the attention rows (no model is loaded)")
    p.add_argument("--json", default=str(ROOT / "out" / "bench_cpu.json"))
    args = p.parse_args(argv)
    ((label, cfg),) = parse_methods([args.method])
    torch.set_num_threads(1)

    import agacc
    from kernels import cpu

    if cpu.load() is None:
        print("the CPU kernels are not built (AGACC_CPU_KERNEL=0 or no compiler): nothing to compare")
        return 0
    att = attention_rows(args.contexts, args.reps)
    print("\n| one layer's decode attention | C++ kernel (agacc@4-like store) | SDPA (plain cache, fp32) | speed-up | packed MB read | MB/s |"
          "\n|---|---|---|---|---|---|")
    for r in att:
        print(f"| {r['tokens']} tokens | {r['kernel_us']:.0f} us | {r['sdpa_us']:.0f} us | {r['sdpa_us'] / r['kernel_us']:.2f}x | "
              f"{r['packed_mb']:.2f} | {r['kernel_mb_s']:.0f} |")
    if args.attention_only:
        write_json(args.json, {"attention": att, "reps": args.reps, "threads": torch.get_num_threads()}, indent=1)
        print(f"\nwrote {args.json}")
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
    out = {"attention": att, "linear": lin, "decode_step": steps, "prompt": args.prompt, "steps": args.steps, "reps": args.reps,
           "threads": torch.get_num_threads()}
    write_json(args.json, out, indent=1)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
