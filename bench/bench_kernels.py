"""GPU benchmark of the Triton kernels: decode attention over a compressed store vs fp16 SDPA, and
end-to-end decode tokens/s of an 8B-shaped random-weight Llama with compressed vs plain cache.

    python bench/bench_kernels.py [--contexts 8192 32768 131072] [--e2e-context 32768]
                                  [--e2e-layers 4] [--e2e-method agacc@4] [--json bench_kernels.json]

Layer part: one Llama-3-8B-shaped layer (32 query / 8 KV heads, head dim 128, batch 1, random K/V)
stored as a mix of full / int4 / int2 blocks and evicted runs (markers), about 4x smaller than
fp16. Timings are CUDA events around each call, after warm-up, with the L2 flushed before every
call (a 256 MiB write); the median is reported. Achieved bandwidth = bytes the kernel must read
(and the logits it writes and reads back for the attention mass) / time, vs the H100 SXM peak
of 3.35 TB/s. SDPA reads the same tokens as fp16 K/V.

End-to-end part: LlamaForCausalLM with 8B shapes (hidden 4096, 32/8 heads, MLP 14336, vocab
128256) and ``--e2e-layers`` layers, random weights in fp16, a random prompt of
``--e2e-context`` tokens, then greedy decode steps timed with a synchronised wall clock (prefill
excluded): plain ``DynamicCache`` + SDPA vs ``agacc.CompressedCache`` of ``--e2e-method`` (default ``agacc@4``;
imported lazily; skipped with the reason if it is missing or fails).

Without CUDA it prints "no CUDA device: GPU benchmark skipped" and exits 0.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from bench.common import write_json

H100_PEAK_BPS = 3.35e12
HQ, H, D = 32, 8, 128  # Llama-3-8B attention shape
# one period of 16 blocks: 1 full, 6 int4, 6 int2, a run of 3 evicted blocks (one marker)
PATTERN = ["full"] + ["int4"] * 3 + ["int2"] * 3 + ["evicted"] * 3 + ["int4"] * 3 + ["int2"] * 3


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------

def cuda_time_ms(fn, iters: int = 20, warmup: int = 5) -> float:
    """Median milliseconds of ``fn()`` measured with CUDA events, L2 flushed before each call."""
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------
# layer benchmark
# ------------------------------------------------------------------------------------------------

def build_store(n_tokens: int, device, seed: int = 0):
    """A LayerStore of n_tokens random tokens, tiers repeating PATTERN, recent window 64 tokens."""
    from agacc.config import AGACCConfig
    from agacc.store import LayerStore
    from agacc.tiers import EVICTED, FULL, INT2, INT4

    codes = {"full": (FULL, 8), "int4": (INT4, 4), "int2": (INT2, 2), "evicted": (EVICTED, 2)}
    cfg = AGACCConfig(block_size=32, recent_window=64, value_group_size=64)
    store = LayerStore(cfg, device, torch.float16)
    gen = torch.Generator(device=device).manual_seed(seed)
    k = torch.randn(1, H, n_tokens, D, device=device, dtype=torch.float16, generator=gen)
    v = torch.randn(1, H, n_tokens, D, device=device, dtype=torch.float16, generator=gen)
    store.append(k, v)
    nb = store.n_ready_blocks()
    tb = [codes[PATTERN[i % len(PATTERN)]] for i in range(nb)]
    tier = torch.tensor([t for t, _ in tb])
    bits = torch.tensor([b for _, b in tb])
    store.apply_tiers(tier, bits, torch.full((nb,), D), torch.ones(n_tokens, device=device))
    return store, k, v


def kernel_bytes(store, n_query_heads: int) -> tuple[int, int]:
    """(K/V bytes the decode kernel reads: every tensor of the store's parts, codes, scales, zeros,
    bitmaps, markers and their bias, the hot window; + the logits written and read back for the mass)."""
    kv = 0
    for part in store.parts():
        for t in (part.k, part.v, part.bias, part.k_scale, part.k_zero, part.v_scale, part.v_zero, part.k_map, part.v_map):
            if t is not None:
                kv += t.nbytes
    bt = store.hot_k.shape[0]
    logits = 2 * bt * n_query_heads * store.n_entries * 4
    return kv, kv + logits


def sdpa_fn(q, k, v):
    import torch.nn.functional as F

    try:
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    except (RuntimeError, TypeError):  # older torch: expand the KV heads
        ke, ve = k.repeat_interleave(HQ // H, 1), v.repeat_interleave(HQ // H, 1)
        return lambda: F.scaled_dot_product_attention(q, ke, ve)


def bench_layer(n_tokens: int, device, iters: int, with_reference: bool) -> dict:
    from agacc.attention import attend
    from kernels.triton_decode import decode_parts

    store, k, v = build_store(n_tokens, device)
    q = torch.randn(1, HQ, 1, D, device=device, dtype=torch.float16)
    scaling = D ** -0.5
    parts = store.parts()  # what agacc.decode hands the Triton backend (kernels.backend(device) == "triton")
    out, mass = decode_parts(q, parts, scaling)
    ref_out, ref_mass = attend(q.float(), store.attention_entries(torch.float32), scaling)
    err_out = float((out.float() - ref_out).abs().max())
    err_mass = float((mass - ref_mass).abs().max())
    del ref_out, ref_mass
    kv_bytes, total_bytes = kernel_bytes(store, HQ)
    fp16_bytes = k.nbytes + v.nbytes
    t_kernel = cuda_time_ms(lambda: decode_parts(q, parts, scaling), iters)
    t_sdpa = cuda_time_ms(sdpa_fn(q, k, v), iters)
    row = {
        "context": n_tokens,
        "entries": store.n_entries,
        "compression": fp16_bytes / store.nbytes(),
        "kernel_ms": t_kernel,
        "sdpa_fp16_ms": t_sdpa,
        "speedup_vs_sdpa": t_sdpa / t_kernel,
        "kernel_bytes_kv": kv_bytes,
        "kernel_bytes_total": total_bytes,
        "kernel_TBps": total_bytes / t_kernel / 1e9,
        "kernel_peak_frac": total_bytes / (t_kernel * 1e-3) / H100_PEAK_BPS,
        "sdpa_bytes": fp16_bytes,
        "sdpa_TBps": fp16_bytes / t_sdpa / 1e9,
        "sdpa_peak_frac": fp16_bytes / (t_sdpa * 1e-3) / H100_PEAK_BPS,
        "max_abs_err_out": err_out,
        "max_abs_err_mass": err_mass,
    }
    if with_reference:  # what runs without the kernel: dequantise everything, then attend
        row["torch_reference_ms"] = cuda_time_ms(
            lambda: attend(q, store.attention_entries(q.dtype), scaling), max(3, iters // 4), warmup=2)
    del store, k, v
    torch.cuda.empty_cache()
    return row


# ------------------------------------------------------------------------------------------------
# end-to-end decode
# ------------------------------------------------------------------------------------------------

def llama_8b_shaped(n_layers: int, max_pos: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=HQ, num_key_value_heads=H,
                      head_dim=D, num_hidden_layers=n_layers, vocab_size=128256, rope_theta=500000.0,
                      max_position_embeddings=max(max_pos, 8192), tie_word_embeddings=False)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.float16).eval()
    return model


@torch.no_grad()
def decode_tokens_per_s(model, prompt, cache, steps: int) -> tuple[float, object]:
    """Prefill ``prompt`` into ``cache`` (untimed), then ``steps`` greedy steps timed end to end."""
    out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    out = model(input_ids=nxt, past_key_values=cache, use_cache=True)  # warm-up step
    nxt = out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0), cache


def bench_e2e(context: int, n_layers: int, steps: int, method: str = "agacc@4") -> dict:
    from transformers import DynamicCache

    res = {"context": context, "layers": n_layers, "steps": steps, "method": method}
    model = llama_8b_shaped(n_layers, context + steps + 8)
    prompt = torch.randint(0, model.config.vocab_size, (1, context), device="cuda")
    model.set_attn_implementation("sdpa")
    res["plain_tokens_per_s"], _ = decode_tokens_per_s(model, prompt, DynamicCache(config=model.config), steps)
    torch.cuda.empty_cache()
    try:
        import agacc
        from agacc import CompressedCache
        from agacc.spec import parse_method
    except Exception as e:  # the core library may not be there yet
        res["compressed"] = f"skipped: {type(e).__name__}: {e}"
        return res
    try:
        agacc.enable(model)
        cache = CompressedCache(model.config, parse_method(method))
        tps, cache = decode_tokens_per_s(model, prompt, cache, steps)
        res["compressed_tokens_per_s"] = tps
        res["speedup"] = tps / res["plain_tokens_per_s"]
        mem = cache.memory()
        res["compressed_ratio"] = mem.get("ratio")
    except Exception as e:
        res["compressed"] = f"failed: {type(e).__name__}: {e}"
    return res


# ------------------------------------------------------------------------------------------------

def print_layer_table(rows: list[dict]) -> None:
    hdr = (f"{'context':>8} {'ratio':>6} {'kernel ms':>10} {'TB/s':>6} {'%peak':>6} "
           f"{'sdpa ms':>8} {'TB/s':>6} {'%peak':>6} {'speedup':>8} {'ref ms':>8} {'err out':>9} {'err mass':>9}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        ref = f"{r['torch_reference_ms']:8.3f}" if "torch_reference_ms" in r else f"{'-':>8}"
        print(f"{r['context']:>8} {r['compression']:6.2f} {r['kernel_ms']:10.3f} {r['kernel_TBps']:6.2f} "
              f"{100 * r['kernel_peak_frac']:6.1f} {r['sdpa_fp16_ms']:8.3f} {r['sdpa_TBps']:6.2f} "
              f"{100 * r['sdpa_peak_frac']:6.1f} {r['speedup_vs_sdpa']:8.2f} {ref} "
              f"{r['max_abs_err_out']:9.2e} {r['max_abs_err_mass']:9.2e}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-reference", action="store_true", help="skip timing the PyTorch reference path")
    ap.add_argument("--e2e-context", type=int, default=32768)
    ap.add_argument("--e2e-layers", type=int, default=4)
    ap.add_argument("--e2e-steps", type=int, default=32)
    ap.add_argument("--e2e-method", default="agacc@4", help="the compressed cache of the end-to-end part: "
                    "NAME[@RATIO][,key=value]... (agacc.spec)")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("no CUDA device: GPU benchmark skipped")
        write_json(args.json, {"skipped": "no CUDA device"})
        return 0

    device = torch.device("cuda")
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "peak_TBps_assumed": H100_PEAK_BPS / 1e12, "layer": [], "e2e": None}
    try:
        import triton
        result["triton"] = triton.__version__
    except ImportError:
        print("triton is not installed: GPU benchmark skipped")
        return 0
    print(f"device: {result['device']}  (bandwidth % of the H100 SXM peak {H100_PEAK_BPS / 1e12} TB/s)")
    print("decode attention, one Llama-3-8B layer (32 q / 8 kv heads, D=128), batch 1, fp16 store:")
    for n in args.contexts:
        row = bench_layer(n, device, args.iters, with_reference=not args.no_reference)
        result["layer"].append(row)
        print(f"  context {n}: kernel {row['kernel_ms']:.3f} ms, sdpa {row['sdpa_fp16_ms']:.3f} ms", flush=True)
    print()
    print_layer_table(result["layer"])
    if not args.skip_e2e:
        print(f"\nend-to-end decode, 8B-shaped Llama, {args.e2e_layers} layers, context {args.e2e_context}:")
        e2e = bench_e2e(args.e2e_context, args.e2e_layers, args.e2e_steps, args.e2e_method)
        result["e2e"] = e2e
        for key, val in e2e.items():
            print(f"  {key:>24}: {val:.3f}" if isinstance(val, float) else f"  {key:>24}: {val}")
    if args.json:
        write_json(args.json, result)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
