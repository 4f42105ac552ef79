"""One prepared device check: the Triton kernels on a CUDA GPU, timed, in one run of <= 8 minutes.

    python -m bench.gpu_check --out OUTDIR [--dry-run] [--sections env,kernels,...] [--budget-s 450]
    bash bench/gpu_check.sh OUTDIR [--dry-run]            # the same, with a log and a time limit

Sections (each writes its record into OUTDIR/gpu_check.json as soon as it ends, so a run cut short
keeps what it measured; OUTDIR/summary.md is the readable version):

  env       device, compute capability, memory, torch / triton versions, the peak bandwidth assumed
  kernels   every Triton kernel against its PyTorch reference on the device: quantise (keys, values;
            code widths 1, 2, 3, 4, 8 -- one per container; minmax bit-exact, meanstd within one code at <= 0.1%), dequantise, decode
            attention over a store holding every kind of part (fp32 out / mass errors), the
            chunked-prefill attention (``kernels.triton_chunk``) against ``attend(causal_new, n_obs)``
  decode    decode attention, Llama-3-8B shapes (32 query / 8 KV heads, D = 128, batch 1, fp16 store)
            at 8K / 32K / 128K tokens and about 2x / 4x / 8x compression: latency (CUDA events, L2
            flushed, median), bytes read / time as a fraction of the GPU's peak, against
            ``F.scaled_dot_product_attention`` over the same tokens in fp16 (flash backend forced
            when it accepts the call); targets: >= 60% of peak, >= 2x faster than flash at 4x, >= 32K
  sweep     ``decode_parts``'s knobs (block_n, num_warps, per_head, split) at ~4x, 32K and 128K tokens,
            timed as ``decode``, each config's output against the default's; capped at 60 s
  profile   where a decode step's time goes: decode_parts's kernels (torch.profiler), its host time,
            the packed PyTorch path on the same store; a cProfile of compressed decode steps in a
            30-layer model of the embedded model's shapes (OUTDIR/profile_step.txt)
  e2e       decode tokens/s of an 8B-shaped random-weight Llama (``--e2e-layers``, default all 32)
            at 32K tokens: ``agacc.CompressedCache`` (``agacc@4``) vs the plain ``DynamicCache``
  basis     keys held in a calibrated basis (the preset above 4x): a table calibrated on the device for a random
            Llama of the embedded model's shapes, every decode step of agacc@8 against attention over the
            dequantised entries, bytes against a walk; decode tokens/s basis vs per channel vs plain at 4K / 8K
  lookahead the preset's pseudo tokens (``agacc.probe.lookahead``) on a random Llama of the embedded model's
            shapes: every attention call of a prompt, its pseudo tokens and decode steps (agacc@4 and agacc@8 with
            keys per channel: the Triton decode kernel) against attention over the dequantised entries;
            ``generate()`` (the hook runs it) against the loop that calls it, token for token and tier for tier;
            time to the first token with and without it (bf16, 4K and 8K tokens)
  memory    peak GPU memory (``torch.cuda.max_memory_allocated``) of a 128K-token prompt through an
            8B-shaped Llama (``--mem-layers``): plain one-forward prefill vs a chunked prefill into
            the compressed cache (and a chunked prefill into the plain cache, for the split)
  session   the app's session (``agacc.session.GenerationSession``) generating 64 tokens on the device
            with the full-cache comparison, then every figure the app draws built from its trace
            (``components.plots``), written to OUTDIR/session_figures.html

Nothing is downloaded: random weights from ``LlamaConfig``; the session uses the embedded model
(its GGUF ships in a pip package) when it loads, else a random-weight Llama with a byte tokenizer.

``--dry-run`` runs every section end to end on the CPU with tiny shapes (the Triton kernels under
``TRITON_INTERPRET=1``): it checks the script, not the GPU; its timings mean nothing and no target
is judged. ``tests/test_gpu_check.py`` runs it.

Exit status: 0 when every section ran and every kernel matched its reference; 1 otherwise (targets
missed are reported, not failures).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

SECTIONS = ("env", "kernels", "decode", "sweep", "session", "lookahead", "basis", "memory", "e2e", "profile")  # run in this order (e2e, the longest, last)
HQ, H, D = 32, 8, 128  # Llama-3-8B attention
# tier mixes per 16 blocks -> about 2x / 4x / 8x fewer bytes than fp16 (the record has the real ratio)
PATTERNS = {
    2: ["full"] + ["int8"] * 11 + ["int4"] * 4,
    4: ["full"] + ["int4"] * 3 + ["int2"] * 3 + ["evicted"] * 3 + ["int4"] * 3 + ["int2"] * 3,
    8: ["int4"] + ["int2"] * 9 + ["evicted"] * 6,
}
# peak DRAM bandwidth (bytes/s) by device name; --peak-tbps overrides
PEAKS = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100-SXM4-80GB", 2.039e12),
         ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12), ("L40S", 0.864e12), ("A10G", 0.6e12),
         ("L4", 0.3e12), ("T4", 0.32e12)]

FULL = dict(contexts=(8192, 32768, 131072), ratios=(2, 4, 8), iters=20, sweep_contexts=(32768, 131072), e2e_context=32768, e2e_layers=32,
            e2e_steps=32, mem_prompt=131072, mem_layers=8, mem_chunk=4096, session_tokens=64,
            heads=(HQ, H, D), kernel_d=128, quant_bits=(1, 2, 3, 4, 8),  # one width per container (3: its own)
            groups=((4, (True, False)), (1, (True,)), (8, (True,))),  # (GQA g, rotated stores) of the checks
            basis_calib=1024, basis_context=2048, basis_steps=32, basis_chunk=512, basis_speed_contexts=(4096, 8000, 4096),
            basis_speed_steps=32,  # basis: 4K again last, after Triton's compiles
            look_context=1024, look_new=16, look_ttft_contexts=(4096, 8000), look_repeats=3)
DRY = dict(contexts=(256,), ratios=(2, 4, 8), iters=0, sweep_contexts=(256,), e2e_context=96, e2e_layers=2, e2e_steps=4,
           mem_prompt=256, mem_layers=2, mem_chunk=64, session_tokens=24, heads=(4, 2, 64), kernel_d=64,
           quant_bits=(1, 3, 4, 8), groups=((4, (True, False)),), basis_calib=128, basis_context=512, basis_steps=12,
           basis_chunk=128, basis_speed_contexts=(), basis_speed_steps=0, look_context=512, look_new=6,
           look_ttft_contexts=(), look_repeats=0)


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------

class Budget:
    """Seconds left of the run; a section that needs more than is left is skipped (and says so)."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def peak_bps(name: str, override_tbps: float | None) -> float | None:
    if override_tbps:
        return override_tbps * 1e12
    for key, bps in PEAKS:
        if key.lower() in name.lower():
            return bps
    return None


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, iters: int, warmup: int = 3) -> float | None:
    """Median ms of ``fn()`` (CUDA events, L2 flushed by a 256 MiB write before each call); None on the
    CPU or with ``iters`` 0 (a dry run times nothing)."""
    import torch

    if device.type != "cuda" or iters <= 0:
        fn()
        return None
    flush = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def free(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# stores
# ------------------------------------------------------------------------------------------------

def build_store(n_tokens: int, h: int, d: int, pattern: list[str], device, *, block: int = 32, seed: int = 0,
                **cfg):
    """A ``LayerStore`` of ``n_tokens`` random fp16 tokens [1, h, n, d], its ready blocks tiered by
    repeating ``pattern`` (names of ``agacc.tiers.NAMES``; "pruned" keeps a quarter of the elements,
    stored sparse), recent window 64 -> (store, k, v) with k, v the fp16 tokens."""
    import torch

    from agacc.config import AGACCConfig
    from agacc.store import LayerStore
    from agacc.tiers import NAMES

    bits_of = {"full": 16, "int8": 8, "int4": 4, "int3": 3, "int2": 2, "pruned": 2, "evicted": 0}
    conf = dict(block_size=block, recent_window=64, value_group_size=64, b_min=2)
    conf.update(cfg)
    store = LayerStore(AGACCConfig(**conf), device, torch.float16)
    gen = torch.Generator(device=device).manual_seed(seed)
    k = torch.randn(1, h, n_tokens, d, device=device, dtype=torch.float16, generator=gen)
    v = torch.randn(1, h, n_tokens, d, device=device, dtype=torch.float16, generator=gen)
    store.append(k, v)
    nb = store.n_ready_blocks()
    names = [pattern[i % len(pattern)] for i in range(nb)]
    tier = torch.tensor([NAMES.index(x) for x in names], dtype=torch.int8)
    bits = torch.tensor([bits_of[x] for x in names], dtype=torch.int8)
    keep = torch.tensor([d // 4 if x == "pruned" else d for x in names], dtype=torch.int16)
    store.apply_tiers(tier, bits, keep, torch.ones(n_tokens, device=device))
    return store, k, v


def store_bytes(store, n_query_heads: int) -> tuple[int, int]:
    """(bytes of every tensor a decode step reads: codes, scales, zeros, bitmaps, markers + bias, the
    hot window; that + the logits the kernel writes and reads back for the attention mass)."""
    kv = 0
    for part in store.parts():
        for t in (part.k, part.v, part.bias, part.k_scale, part.k_zero, part.v_scale, part.v_zero,
                  part.k_map, part.v_map):
            if t is not None:
                kv += t.nbytes
    return kv, kv + 2 * store.batch * n_query_heads * store.n_entries * 4


# ------------------------------------------------------------------------------------------------
# sections
# ------------------------------------------------------------------------------------------------

def section_env(ctx) -> dict:
    import torch

    dev = ctx["device"]
    rec = {"device": dev.type, "torch": torch.__version__, "python": platform.python_version(),
           "dry_run": ctx["dry"], "plan": {k: v for k, v in ctx["plan"].items()}}
    try:
        import triton

        rec["triton"] = triton.__version__
    except ImportError:
        rec["triton"] = None
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        rec.update(name=p.name, capability=f"sm_{p.major}{p.minor}", sms=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2 ** 30, 1), cuda=torch.version.cuda)
    else:
        rec.update(name=platform.processor() or platform.machine(), cpus=os.cpu_count())
    rec["peak_TBps"] = (ctx["peak"] or 0) / 1e12 or None
    return rec


def _quant_checks(device, d: int, widths) -> list[dict]:
    import torch

    from agacc import quant
    from kernels import quantize as tq

    out = []
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, 2, 64, d, device=device, generator=gen) * 3 + 0.5
    for method, lo in (("minmax", 1), ("meanstd", 2)):
        for bits in (b for b in widths if b >= lo):
            for what, fn_t, fn_r, arg in (("keys", tq.quantize_keys, quant.quantize_keys, 16),
                                          ("values", tq.quantize_values, quant.quantize_values, 32)):
                got = fn_t(x, bits, arg, method)
                ref = fn_r(x, bits, arg, method)
                c = quant.container_bits(bits)
                codes_t, codes_r = quant.unpack(got[0], c), quant.unpack(ref[0], c)
                bad_codes = float((codes_t != codes_r).float().mean())
                bad_scale = float((got[1] != ref[1]).float().mean())
                bad_zero = float((got[2] != ref[2]).float().mean())
                limit = 0.0 if method == "minmax" else 1e-3
                ok = max(bad_codes, bad_scale, bad_zero) <= limit
                if method == "meanstd":  # a code may differ by one at a rounding tie
                    ok = ok and int((codes_t.int() - codes_r.int()).abs().max()) <= 1
                deq = (tq.dequantize_keys(got[0], got[1], got[2], bits, arg) if what == "keys"
                       else tq.dequantize_values(got[0], got[1], got[2], bits))
                deq_ref = (quant.dequantize_keys(*got, bits, arg) if what == "keys"
                           else quant.dequantize_values(*got, bits))
                deq_err = float((deq - deq_ref).abs().max())
                ok = ok and deq_err <= 1e-5
                out.append({"kernel": f"quantize_{what}+dequantize", "bits": bits, "method": method,
                            "codes_differ": bad_codes, "scales_differ": bad_scale, "zeros_differ": bad_zero,
                            "dequant_max_err": deq_err, "ok": ok})
    return out


def _decode_check(device, h, d, g, rotations=(True, False)) -> dict:
    import torch

    from agacc.attention import attend
    from kernels.triton_decode import decode_parts

    pattern = ["full", "int8", "int4", "int3", "int2", "pruned", "evicted", "evicted"]
    rec = {"kernel": "decode_parts", "heads": f"{h * g}/{h}", "D": d}
    for rotate in rotations:
        store, _, _ = build_store(32 * len(pattern) * 2 + 70, h, d, pattern, device, rotate=rotate, seed=2)
        q = torch.randn(1, h * g, 1, d, device=device, generator=torch.Generator(device=device).manual_seed(3))
        ref_out, ref_mass = attend(q, store.attention_entries(torch.float32), d ** -0.5)
        tag = "rot" if rotate else "plain"
        for form, kw in (("", {}), ("dot_", {"dot": True})):  # the elementwise and the tensor-core form
            out, mass = decode_parts(q, store.parts(), d ** -0.5, **kw)
            rec[f"{tag}_{form}out_err"] = float((out.float() - ref_out).abs().max())
            rec[f"{tag}_{form}mass_err"] = float((mass - ref_mass).abs().max())
        rec[f"{tag}_parts"] = [p.kind if p.kind != "quant" else f"q{p.container}" for p in store.parts()]
    tags = ["rot" if r else "plain" for r in rotations]
    rec["ok"] = all(rec[f"{t}_{f}out_err"] <= 2e-3 and rec[f"{t}_{f}mass_err"] <= 1e-5 for t in tags for f in ("", "dot_"))
    return rec


def _chunk_check(device, h, d, g) -> dict:
    import torch

    try:
        from kernels.triton_chunk import chunk_parts
    except ImportError as e:
        return {"kernel": "chunk_parts", "skipped": f"kernels.triton_chunk: {e}", "ok": True}
    from agacc.attention import attend

    pattern = ["full", "int8", "int4", "int3", "int2", "pruned", "evicted", "evicted"]
    store, _, _ = build_store(32 * len(pattern) + 100, h, d, pattern, device, seed=4)
    n_new, n_obs = 40, 8
    q = torch.randn(1, h * g, n_new, d, device=device, generator=torch.Generator(device=device).manual_seed(5))
    out, mass = chunk_parts(q, store.parts(), d ** -0.5, n_new, n_obs)
    ref_out, ref_mass = attend(q, store.attention_entries(torch.float32), d ** -0.5, causal_new=n_new, n_obs=n_obs)
    rec = {"kernel": "chunk_parts", "heads": f"{h * g}/{h}", "D": d, "q": n_new,
           "out_err": float((out.float() - ref_out).abs().max()), "mass_err": float((mass - ref_mass).abs().max())}
    rec["ok"] = rec["out_err"] <= 2e-3 and rec["mass_err"] <= 1e-5
    return rec


def section_kernels(ctx) -> dict:
    dev, plan = ctx["device"], ctx["plan"]
    d = plan["kernel_d"]
    rows = _quant_checks(dev, d, plan["quant_bits"])
    for g, rotations in plan["groups"]:
        rows.append(_decode_check(dev, 2, d, g, rotations))
        rows.append(_chunk_check(dev, 2, d, g))
        free(dev)
    return {"rows": rows, "ok": all(r["ok"] for r in rows), "failed": [r for r in rows if not r["ok"]]}


def _sdpa(q, k, v, device):
    """(call, backend label): flash forced with GQA when torch takes it, else what does."""
    import torch
    import torch.nn.functional as F

    attempts = []
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def flash(q=q, k=k, v=v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        attempts.append((flash, "flash (enable_gqa)"))
    attempts.append((lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), "default (enable_gqa)"))
    for fn, label in attempts:
        try:
            fn()
            return fn, label
        except (RuntimeError, TypeError):
            continue
    g = q.shape[1] // k.shape[1]
    ke, ve = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return (lambda: F.scaled_dot_product_attention(q, ke, ve)), "default (KV heads expanded)"


def section_decode(ctx) -> dict:
    import torch

    from agacc.attention import attend
    from kernels.triton_decode import decode_parts

    dev, plan, peak = ctx["device"], ctx["plan"], ctx["peak"]
    hq, h, d = plan["heads"]
    rows = []
    for n in plan["contexts"]:
        for ratio in plan["ratios"]:
            if ctx["budget"].left() < 60 and not ctx["dry"]:
                rows.append({"context": n, "target_ratio": ratio, "skipped": "time budget"})
                continue
            store, k, v = build_store(n, h, d, PATTERNS[ratio], dev)
            q = torch.randn(1, hq, 1, d, device=dev, dtype=torch.float16)
            parts, scaling = store.parts(), d ** -0.5
            out, mass = decode_parts(q, parts, scaling)
            if n <= 32768:  # the reference's dense copy of 128K tokens is large and slow; 32K shows it
                ref_out, ref_mass = attend(q.float(), store.attention_entries(torch.float32), scaling)
                err = (float((out.float() - ref_out).abs().max()), float((mass - ref_mass).abs().max()))
                del ref_out, ref_mass
            else:
                err = (None, None)
            kv_bytes, total_bytes = store_bytes(store, hq)
            fp16_bytes = k.nbytes + v.nbytes
            t_k = time_ms(lambda: decode_parts(q, parts, scaling), dev, plan["iters"])
            dot_out, _ = decode_parts(q, parts, scaling, dot=True)
            t_dot = time_ms(lambda: decode_parts(q, parts, scaling, dot=True), dev, plan["iters"])
            sdpa, backend = _sdpa(q, k, v, dev)
            t_s = time_ms(sdpa, dev, plan["iters"])
            row = {"context": n, "target_ratio": ratio, "ratio": fp16_bytes / store.nbytes(),
                   "parts": [p.kind if p.kind != "quant" else f"q{p.container}" for p in parts],
                   "kernel_ms": t_k, "kernel_dot_ms": t_dot, "dot_max_diff": float((dot_out.float() - out.float()).abs().max()),
                   "sdpa_ms": t_s, "sdpa_backend": backend,
                   "kernel_bytes_kv": kv_bytes, "kernel_bytes_total": total_bytes, "sdpa_bytes": fp16_bytes,
                   "max_err_out": err[0], "max_err_mass": err[1]}
            if t_k and t_s:
                row.update(speedup=t_s / t_k, kernel_TBps=total_bytes / t_k / 1e9, sdpa_TBps=fp16_bytes / t_s / 1e9)
                if peak:
                    row.update(kernel_peak_frac=total_bytes / (t_k * 1e-3) / peak,
                               kernel_kv_peak_frac=kv_bytes / (t_k * 1e-3) / peak,
                               sdpa_peak_frac=fp16_bytes / (t_s * 1e-3) / peak)
                    row["target_bandwidth_60pct"] = row["kernel_peak_frac"] >= 0.6
                if ratio == 4 and n >= 32768:
                    row["target_2x_vs_flash"] = row["speedup"] >= 2.0
            if t_dot and t_s:
                row["dot_speedup"] = t_s / t_dot
                if peak:
                    row["dot_peak_frac"] = total_bytes / (t_dot * 1e-3) / peak
            rows.append(row)
            print(f"  decode {n:>6} tokens ~{ratio}x: ratio {row['ratio']:.2f}"
                  + (f", kernel {t_k:.3f} ms, sdpa {t_s:.3f} ms" if t_k and t_s else ""), flush=True)
            del store, k, v, parts, q
            free(dev)
    return {"rows": rows, "ok": True}


# decode_parts knobs tried by the sweep (keyword arguments), the default first; the tensor-core form
# (dot=True) right after it: the first H200 run measured only the elementwise form (0-4% of peak)
SWEEP = [{}, {"dot": True}, {"dot": True, "num_warps": 8}, {"dot": True, "block_n": 16},
         {"dot": True, "split": 256}, {"dot": True, "split": 1024}, {"dot": True, "split": 4096},
         {"block_n": 16, "num_warps": 2}, {"block_n": 32, "num_warps": 4}, {"split": 256},
         {"block_n": 32, "num_warps": 8, "split": 1024}, {"per_head": False}]


def section_sweep(ctx) -> dict:
    """``decode_parts``'s tuning knobs (block_n, num_warps, per_head, split, the tensor-core form ``dot``)
    at the decode section's ~4x store, 32K and 128K tokens: the data for choosing defaults.
    Each config's output is checked against the default config's (same math, another order)."""
    import torch

    from kernels.triton_decode import decode_parts

    dev, plan, peak = ctx["device"], ctx["plan"], ctx["peak"]
    hq, h, d = plan["heads"]
    stop = time.monotonic() + (1e9 if ctx["dry"] else min(SWEEP_CAP_S, ctx["budget"].left() - SWEEP_LEAVE_S))
    rows = []
    for n in plan["sweep_contexts"]:
        store, k, v = build_store(n, h, d, PATTERNS[4], dev)
        q = torch.randn(1, hq, 1, d, device=dev, dtype=torch.float16)
        parts, scaling = store.parts(), d ** -0.5
        _, total = store_bytes(store, hq)
        ref, _ = decode_parts(q, parts, scaling)
        for kw in (SWEEP[:2] if ctx["dry"] else SWEEP):
            row = {"context": n, **{k: kw.get(k) for k in ("block_n", "num_warps", "per_head", "split", "dot")}}
            if time.monotonic() > stop:
                rows.append({**row, "skipped": "time cap"})
                continue
            fn = lambda kw=kw: decode_parts(q, parts, scaling, **kw)  # noqa: E731
            try:
                out, _ = fn()
                row["max_diff_vs_default"] = float((out.float() - ref.float()).abs().max())
                row["ms"] = time_ms(fn, dev, plan["iters"])
            except Exception as e:  # noqa: BLE001 -- a config the compiler rejects is a result too
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            if row.get("ms") and peak:
                row["peak_frac"] = total / (row["ms"] * 1e-3) / peak
            rows.append(row)
            print(f"  sweep {n} {kw}: {row.get('ms')} ms {row.get('error', '')}", flush=True)
        del store, k, v, parts, q
        free(dev)
    ok = all(r.get("max_diff_vs_default", 0) <= 2e-3 for r in rows if "error" not in r)
    return {"rows": rows, "ok": ok}


def section_profile(ctx) -> dict:
    """Where a decode step's time goes, for the next round of kernel tuning: at ~4x, 32K and 128K
    tokens, (1) ``decode_parts``'s kernels by CUDA time (torch.profiler), (2) its host time per call
    (launches not waited for), (3) the packed PyTorch path (``agacc.decode._decode_parts``) on the same
    store, timed and checked against the kernel; then (4) a cProfile of decode steps of a
    ``CompressedCache`` (``--method``) in a model of the embedded model's shapes (30 layers) on the
    device: the Python time of a step, which the session section's tokens/s includes."""
    import cProfile
    import io
    import pstats

    import torch

    from agacc.decode import _decode_parts
    from kernels.triton_decode import decode_parts

    dev, plan = ctx["device"], ctx["plan"]
    hq, h, d = plan["heads"]
    rows = []
    for n in plan["sweep_contexts"]:
        store, k, v = build_store(n, h, d, PATTERNS[4], dev)
        q = torch.randn(1, hq, 1, d, device=dev, dtype=torch.float16)
        parts, scaling = store.parts(), d ** -0.5
        out, mass = decode_parts(q, parts, scaling)
        qg = q.reshape(1, h, hq // h, d).float() * scaling
        tout, tmass = _decode_parts(qg, parts, None)
        row = {"context": n, "torch_path_err_out": float((tout.reshape(1, hq, 1, d).transpose(1, 2) - out.float()).abs().max()),
               "torch_path_err_mass": float((tmass - mass).abs().max())}
        row["kernel_ms"] = time_ms(lambda: decode_parts(q, parts, scaling), dev, plan["iters"])
        row["torch_path_ms"] = time_ms(lambda: _decode_parts(qg, parts, None), dev, plan["iters"])
        sync(dev)
        calls = 20 if plan["iters"] else 1  # a dry run (the interpreter) claims no time: one call checks the loop
        t0 = time.perf_counter()
        for _ in range(calls):
            decode_parts(q, parts, scaling)
        row["host_ms_per_call"] = (time.perf_counter() - t0) / calls * 1e3
        sync(dev)
        if dev.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    decode_parts(q, parts, scaling)
                sync(dev)
            ev = [e for e in prof.key_averages() if getattr(e, "device_time_total", 0) > 0]
            ev.sort(key=lambda e: -e.device_time_total)
            row["cuda_kernels"] = [{"name": e.key[:80], "calls": e.count // 5, "us_per_step": e.device_time_total / 5}
                                   for e in ev[:10]]
        rows.append(row)
        del store, k, v, parts, q
        free(dev)
    # (4) the Python side of a compressed decode step in a 30-layer model
    from agacc import CompressedCache
    from agacc.spec import parse_method

    model = smollm_shaped(2 if ctx["dry"] else 30, dev, torch.float32 if ctx["dry"] else torch.bfloat16)
    n_ctx = 256 if ctx["dry"] else 4096
    prompt = torch.randint(0, 257, (1, n_ctx), device=dev)
    cache = CompressedCache(model.config, parse_method(ctx["method"]))
    steps = 4 if ctx["dry"] else 16
    _peak_prefill(model, prompt, cache, 512, dev)
    with torch.inference_mode():
        nxt = prompt[:, -1:]
        model(input_ids=nxt, past_key_values=cache, use_cache=True)
        sync(dev)
        pr = cProfile.Profile()
        t0 = time.perf_counter()
        pr.enable()
        for _ in range(steps):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
        sync(dev)
        pr.disable()
        wall = time.perf_counter() - t0
    buf = io.StringIO()
    stats = pstats.Stats(pr, stream=buf)
    # Triton compiles inside the profiled steps (the first H200 run: 18 in 16 steps, before the decode and
    # chunk kernels stopped specialising on their changing integer arguments)
    compiles = sum(v[1] for k, v in stats.stats.items() if k[2] == "make_cubin")
    stats.sort_stats("cumulative").print_stats(30)
    (ctx["out"] / "profile_step.txt").write_text(buf.getvalue())
    step = {"layers": model.config.num_hidden_layers, "context": n_ctx, "method": ctx["method"], "steps": steps,
            "ms_per_step": wall / steps * 1e3, "reevaluations": cache.reevaluations, "triton_compiles": compiles}
    del model, cache
    free(dev)
    return {"rows": rows, "step": step, "ok": all(r["torch_path_err_out"] <= 2e-3 for r in rows)}


def llama(layers: int, dry: bool, device, max_pos: int, vocab: int = 512):
    """An 8B-shaped Llama (hidden 4096, 32/8 heads of 128, MLP 14336, vocab 128256) with ``layers``
    layers and random fp16 weights on ``device``; tiny shapes in a dry run (fp32 on the CPU)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import agacc

    if dry:
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                          max_position_embeddings=max(max_pos, 4096))
        dtype = torch.float32
    else:
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=HQ, num_key_value_heads=H,
                          head_dim=D, num_hidden_layers=layers, vocab_size=128256, rope_theta=500000.0,
                          max_position_embeddings=max(max_pos, 8192), tie_word_embeddings=False)
        dtype = torch.float16
    torch.manual_seed(0)
    with torch.device(device):  # built on the device in its dtype: no fp32 copy of 8B weights on the way
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype).eval()
    return agacc.enable(model)


def smollm_shaped(layers: int, device, dtype):
    """A random Llama of the embedded model's shapes (SmolLM2-135M: hidden 576, 9 / 3 heads of 64, MLP
    1536; ``layers`` of its 30) with a 257-token vocabulary (``_byte_tokenizer``), ``agacc.enable``d."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import agacc

    cfg = LlamaConfig(vocab_size=257, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                      rope_theta=100000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):
        return agacc.enable(LlamaForCausalLM._from_config(cfg, dtype=dtype).eval())


def _decode_rate(model, prompt, cache, steps, device, chunk: int | None = None, deadline: float | None = None,
                 warm_steps: int = 1):
    """Prefill ``prompt`` into ``cache`` (untimed; ``chunk`` tokens a forward, cut as ``_peak_prefill``
    cuts it at ``deadline``), ``warm_steps`` untimed steps, then ``steps`` greedy steps timed end to
    end -> (tokens/s, tokens prefilled, tokens/s of the warm-up steps). The warm-up is where Triton
    compiles the decode kernel's variants (one per combination of parts a layer holds; the first H200
    run timed them: 18 compiles in 16 steps)."""
    import torch

    pre = _peak_prefill(model, prompt, cache, chunk, device, deadline)

    def run(n):
        nonlocal nxt
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
        sync(device)
        return n / (time.perf_counter() - t0)

    with torch.inference_mode():
        nxt = torch.zeros(prompt.shape[0], 1, dtype=prompt.dtype, device=device)
        cold = run(warm_steps)
        return run(steps), pre["tokens"], cold


def section_e2e(ctx) -> dict:
    """The compressed cache first (its chunked prefill cut where the budget would run out, 20 s kept
    for the plain run), then the plain cache over the same tokens in one forward."""
    import torch
    from transformers import DynamicCache

    from agacc import CompressedCache
    from agacc.spec import parse_method

    dev, plan = ctx["device"], ctx["plan"]
    n, layers, steps = plan["e2e_context"], plan["e2e_layers"], plan["e2e_steps"]
    model = llama(layers, ctx["dry"], dev, n + steps + 8)
    prompt = torch.randint(0, model.config.vocab_size, (1, n), device=dev)
    rec = {"context": n, "layers": layers, "steps": steps, "method": ctx["method"]}
    deadline = None if ctx["dry"] else time.monotonic() + max(20.0, ctx["budget"].left() - 20)
    cache = CompressedCache(model.config, parse_method(ctx["method"]))
    rec["compressed_tokens_per_s"], n, rec["compressed_warmup_tokens_per_s"] = _decode_rate(
        model, prompt, cache, steps, dev, plan["mem_chunk"], deadline, warm_steps=steps)
    rec["context_asked"], rec["context"] = rec["context"], n
    mem = cache.memory()
    rec["compressed_ratio"] = mem.get("ratio")
    rec["compressed_bytes"] = mem.get("bytes")
    del cache
    free(dev)
    rec["plain_tokens_per_s"], _, rec["plain_warmup_tokens_per_s"] = _decode_rate(
        model, prompt[:, :n], DynamicCache(config=model.config), steps, dev, warm_steps=4)
    rec["speedup"] = rec["compressed_tokens_per_s"] / rec["plain_tokens_per_s"]
    if ctx["dry"]:
        for key in ("plain_tokens_per_s", "compressed_tokens_per_s", "speedup", "plain_warmup_tokens_per_s",
                    "compressed_warmup_tokens_per_s"):
            rec[key] = None  # a CPU run of a tiny model says nothing about speed
    del model
    free(dev)
    return {**rec, "ok": True}


def _peak_prefill(model, prompt, cache, chunk, device, deadline: float | None = None) -> dict:
    """Prefill ``prompt`` (``chunk`` tokens a forward; None: one) into ``cache`` -> peak bytes over the
    weights, the cache's bytes after, seconds, and ``tokens`` prefilled: a chunked prefill stops
    before a chunk that would end past ``deadline`` (``time.monotonic()``; the next chunk is assumed
    to take as long as the last one took, times its share of the keys) and says so in ``cut``."""
    import torch

    from agacc.config import forecasts
    from agacc.probe import lookahead

    free(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    done, cut = 0, False
    with torch.inference_mode():
        step = chunk or prompt.shape[1]
        for lo in range(0, prompt.shape[1], step):
            t = time.monotonic()
            out = model(input_ids=prompt[:, lo:lo + step], past_key_values=cache, use_cache=True, logits_to_keep=1)
            sync(device)
            done = min(prompt.shape[1], lo + step)
            took = time.monotonic() - t
            if deadline is not None and done < prompt.shape[1] and time.monotonic() + took * (done + step) / done > deadline:
                cut = True
                break
        if hasattr(cache, "end_prefill"):
            if forecasts(cache.cfg):  # the preset's repeat and pseudo tokens (rounds 27, 32): part of its prompt, peak
                lookahead(model, cache, out.logits[:, -1].argmax(-1), prompt_ids=prompt[:, :done])
            cache.end_prefill()
    sync(device)
    rec = {"chunk": chunk, "tokens": done, "cut": cut, "seconds": time.perf_counter() - t0}
    if cuda:
        rec["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        rec["peak_over_weights_bytes"] = rec["peak_bytes"] - base
        rec["after_bytes"] = torch.cuda.memory_allocated(device) - base
    if hasattr(cache, "memory"):
        rec["cache_bytes"] = cache.memory().get("bytes")
    return rec


def section_memory(ctx) -> dict:
    """The compressed chunked prefill runs first, stopping where the time budget would run out (all
    but ``E2E_RESERVE_S`` for the e2e section and ~30 s for the plain runs); the plain runs then take
    the same tokens, so the three peaks always compare the same prompt."""
    import torch
    from transformers import DynamicCache

    from agacc import CompressedCache
    from agacc.spec import parse_method

    dev, plan = ctx["device"], ctx["plan"]
    n, layers, chunk = plan["mem_prompt"], plan["mem_layers"], plan["mem_chunk"]
    model = llama(layers, ctx["dry"], dev, n + 8)
    prompt = torch.randint(0, model.config.vocab_size, (1, n), device=dev)
    rec = {"prompt": n, "layers": layers, "method": ctx["method"], "weights_bytes":
           sum(p.nbytes for p in model.parameters())}
    deadline = None if ctx["dry"] else time.monotonic() + max(30.0, ctx["budget"].left() - E2E_RESERVE_S - 30)
    rec["compressed_chunked"] = _peak_prefill(model, prompt, CompressedCache(model.config, parse_method(ctx["method"])),
                                              chunk, dev, deadline)
    rec["prompt_asked"] = n
    n = rec["prompt"] = rec["compressed_chunked"]["tokens"]
    rec["plain_one_forward"] = _peak_prefill(model, prompt[:, :n], DynamicCache(config=model.config), None, dev)
    rec["plain_chunked"] = _peak_prefill(model, prompt[:, :n], DynamicCache(config=model.config), chunk, dev)
    a, b = rec["plain_one_forward"].get("peak_over_weights_bytes"), rec["compressed_chunked"].get("peak_over_weights_bytes")
    if a and b:
        rec["peak_reduction"] = a / b
    del model
    free(dev)
    return {**rec, "ok": True}


def section_basis(ctx) -> dict:
    """Keys held in a calibrated basis (``key_quant="auto"`` above 4x, the preset's since round 25) on the
    device, on a random Llama of the embedded model's shapes: a table calibrated there and filed (in OUTDIR),
    then (1) every decode step of ``agacc@8`` against attention over the store's dequantised entries (fp32;
    the Triton kernels do not read the format, so the PyTorch path runs, with one warning), its bytes
    against an independent walk; (2) decode tokens/s (bf16) of ``agacc@8`` in the basis, per channel (the
    Triton kernels) and the plain cache, at the contexts of ``bench/bench_long.py``'s CPU runs (4K again last:
    the first rows of a process pay the Triton kernels' compiles, one a combination of parts a layer holds)."""
    import warnings

    import torch
    from transformers import DynamicCache

    import agacc
    from agacc import basis, decode
    from agacc.eval.runner import capture_prefill
    from agacc.spec import parse_method
    from tests.helpers import walk_tensor_bytes

    dev, plan, dry = ctx["device"], ctx["plan"], ctx["dry"]
    old_env = os.environ.get("AGACC_CACHE")
    os.environ["AGACC_CACHE"] = str(ctx["out"] / "agacc_cache")
    real = decode.decode_attention
    try:
        layers = 2 if dry else 30
        model = llama(layers, True, dev, 4096, vocab=257) if dry else smollm_shaped(layers, dev, torch.float32)
        gen = torch.Generator().manual_seed(0)
        n_cal, n, steps = plan["basis_calib"], plan["basis_context"], plan["basis_steps"]
        with torch.inference_mode():
            caps = [capture_prefill(model, torch.randint(3, 257, (n_cal,), generator=gen).tolist()) for _ in range(2)]
            path = basis.save(model.config, basis.calibrate(model, caps))
        del caps
        cfg = parse_method("agacc@8")
        rec = {"table": str(path.name), "layers": layers, "context": n, "steps": steps}
        errs, seen = [], []

        def both(query, store, scaling, mask=None, softcap=None):
            out, mass = real(query, store, scaling, mask, softcap)
            ref_out, ref_mass = agacc.attention.attend(query.float(), store.attention_entries(torch.float32), scaling)
            errs.append(((out.float() - ref_out).abs().max().item(),
                         ((mass - ref_mass).abs() / ref_mass.abs().clamp_min(1e-6)).max().item()))
            seen.append(any(p.basis is not None for p in store.parts()))
            return out, mass

        x = torch.randint(3, 257, (1, n + steps), generator=gen).to(dev)
        cache = agacc.CompressedCache(model.config, cfg)
        agacc.cache.decode_attention = both  # the cache's own (restored below, in ``finally``)
        with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
            warnings.simplefilter("always")
            for lo in range(0, n, plan["basis_chunk"]):
                model(x[:, lo:min(n, lo + plan["basis_chunk"])], past_key_values=cache)
            for i in range(n, n + steps):
                model(x[:, i:i + 1], past_key_values=cache)
        agacc.cache.decode_attention = real
        m = cache.memory()
        rec.update(key_quant=cache.cfg.key_quant, decode_calls=len(errs), calls_with_basis=sum(seen),
                   max_err_out=max(e for e, _ in errs), max_rel_err_mass=max(e for _, e in errs),
                   ratio=m["ratio"], bytes=m["bytes"], walk_bytes=walk_tensor_bytes(cache),
                   basis_bytes=m["by_tier"].get("basis"),
                   warnings=sorted({str(w.message)[:90] for w in caught if "basis" in str(w.message)}))
        del cache, model
        free(dev)
        rows = []
        if not dry:
            model = smollm_shaped(layers, dev, torch.bfloat16)
            for ctx_len in plan["basis_speed_contexts"]:
                prompt = torch.randint(3, 257, (1, ctx_len), generator=gen).to(dev)
                for method in ("plain", "agacc@8", "agacc@8,key_quant=channel"):
                    if ctx["budget"].left() < 25:
                        rows.append({"context": ctx_len, "method": method, "skipped": "time budget"})
                        continue
                    c = (DynamicCache(config=model.config) if method == "plain"
                         else agacc.CompressedCache(model.config, parse_method(method)))
                    tps, done, cold = _decode_rate(model, prompt, c, plan["basis_speed_steps"], dev, 2048, warm_steps=16)
                    rows.append({"context": done, "method": method, "tokens_per_s": tps, "warmup_tokens_per_s": cold,
                                 "key_quant": getattr(getattr(c, "cfg", None), "key_quant", None),
                                 "ratio": c.memory()["ratio"] if hasattr(c, "memory") else 1.0})
                    del c
                    free(dev)
            del model
            free(dev)
        rec["rows"] = rows
        tol = 1e-3
        rec["ok"] = (rec["key_quant"] == "basis" and rec["calls_with_basis"] > 0
                     and rec["max_err_out"] <= tol and rec["max_rel_err_mass"] <= tol and rec["bytes"] == rec["walk_bytes"]
                     and (dry or len(rec["warnings"]) == 1))
        return rec
    finally:
        agacc.cache.decode_attention = real
        if old_env is None:
            os.environ.pop("AGACC_CACHE", None)
        else:
            os.environ["AGACC_CACHE"] = old_env


def section_lookahead(ctx) -> dict:
    """The preset's lookahead (round 27) on the device, on a random Llama of the embedded model's shapes (fp32):
    (1) every decode-attention call of a prompt, its ``lookahead`` pseudo tokens and ``look_new`` greedy steps,
    for agacc@4 and agacc@8 with keys per channel (the Triton decode kernel), against ``agacc.attention.attend``
    over the store's dequantised entries: the pseudo tokens' evidence is the mass those calls return;
    (2) ``generate()`` on ``agacc.enable``'s model (its hook runs the lookahead) against the loop that calls
    ``agacc.probe.lookahead`` itself: the same tokens, tiers and bytes, and tiers unlike lookahead=0's;
    (3) time to the first token (prefill in chunks of 2,048, the forecasts, the plan carried out), bf16, with both,
    without the pseudo tokens, and without the repeat too (round 32), interleaved, after one warm-up each (Triton's
    compiles)."""
    import torch

    import agacc
    from agacc.eval.runner import greedy
    from agacc.probe import lookahead
    from agacc.spec import parse_method
    from tests.helpers import tier_maps, walk_tensor_bytes

    dev, plan, dry = ctx["device"], ctx["plan"], ctx["dry"]
    real = agacc.cache.decode_attention
    gen = torch.Generator().manual_seed(1)
    n, new = plan["look_context"], plan["look_new"]
    model = llama(2, True, dev, 4096, vocab=257) if dry else smollm_shaped(30, dev, torch.float32)
    ids = torch.randint(3, 257, (1, n), generator=gen).to(dev)
    rec = {"layers": model.config.num_hidden_layers, "context": n, "new_tokens": new, "methods": {}}
    try:
        for method in ("agacc@4", "agacc@8,key_quant=channel"):
            cfg = parse_method(method + (",lookahead_weight=4" if dry else ""))  # (the tiny model's attention is flat)
            errs, live = {"decode": [], "pseudo": []}, {}

            def both(query, store, scaling, mask=None, softcap=None):
                out, mass = real(query, store, scaling, mask, softcap)
                ref_out, ref_mass = agacc.attention.attend(query.float(), store.attention_entries(torch.float32), scaling)
                errs["pseudo" if live["cache"].probe is not None else "decode"].append(
                    ((out.float() - ref_out).abs().max().item(),
                     ((mass - ref_mass).abs() / ref_mass.abs().clamp_min(1e-6)).max().item()))
                return out, mass

            def by_hand(look: bool):
                c = live["cache"] = agacc.CompressedCache(model.config, cfg)
                with torch.inference_mode():
                    first = model(input_ids=ids, past_key_values=c, use_cache=True, logits_to_keep=1).logits[0, -1]
                if look:
                    lookahead(model, c, int(first.argmax()))
                else:
                    c.looked_ahead = True  # (the first decode step would run it)
                return c, greedy(model, c, first, new)

            agacc.cache.decode_attention = both
            try:
                cache, toks = by_hand(True)
            finally:
                agacc.cache.decode_attention = real
            hook = agacc.CompressedCache(model.config, cfg)
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=hook, max_new_tokens=new,
                                     min_new_tokens=new, do_sample=False, pad_token_id=0)
            plain, _ = by_hand(False)
            same_tiers = all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                             for a, b in zip(tier_maps(cache), tier_maps(hook)))
            moved = sum(int((a[0] != b[0]).sum()) for a, b in zip(tier_maps(plain), tier_maps(cache)))
            m = cache.memory()
            rec["methods"][method] = {
                "decode_calls": len(errs["decode"]), "pseudo_calls": len(errs["pseudo"]),
                "max_err_out": max(e for e, _ in errs["decode"] + errs["pseudo"]),
                "max_rel_err_mass": max(e for _, e in errs["decode"] + errs["pseudo"]),
                "generate_tokens_equal": out[0, n:].tolist() == toks, "generate_tiers_equal": same_tiers,
                "generate_bytes_equal": m["bytes"] == hook.memory()["bytes"], "blocks_moved_by_lookahead": moved,
                "ratio": m["ratio"], "bytes": m["bytes"], "walk_bytes": walk_tensor_bytes(cache),
                "peak_ratio": m["bytes_fp16"] / m["peak_bytes"]}
            del cache, hook, plain
            free(dev)
        del model
        free(dev)
        rows = []
        if not dry:
            model = smollm_shaped(30, dev, torch.bfloat16)
            for ctx_len in plan["look_ttft_contexts"]:
                prompt = torch.randint(3, 257, (1, ctx_len), generator=gen).to(dev)
                times = {"agacc@8": [], "agacc@8,lookahead=0": [], "agacc@8,lookahead=0,repeat_weight=0": []}
                for rep in range(plan["look_repeats"] + 1):  # the first round warms up (not kept)
                    for method in times:
                        if ctx["budget"].left() < 20:
                            break
                        c = agacc.CompressedCache(model.config, parse_method(method))
                        pre = _peak_prefill(model, prompt, c, 2048, dev)
                        if rep:
                            times[method].append(pre["seconds"])
                        del c
                        free(dev)
                rows.append({"context": ctx_len, **{f"ttft_s[{k}]": v for k, v in times.items()}})
            del model
            free(dev)
        rec["ttft_rows"] = rows
        tol = 1e-3
        rec["ok"] = all(r["pseudo_calls"] > 0 and r["max_err_out"] <= tol and r["max_rel_err_mass"] <= tol
                        and r["generate_tokens_equal"] and r["generate_tiers_equal"] and r["generate_bytes_equal"]
                        and r["blocks_moved_by_lookahead"] > 0 and r["bytes"] == r["walk_bytes"]
                        for r in rec["methods"].values())
        return rec
    finally:
        agacc.cache.decode_attention = real


def _byte_tokenizer():
    """A byte-level tokenizer built here (nothing downloaded): 256 byte tokens + <eos>."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<0x{i:02X}>": i for i in range(256)}
    vocab["<eos>"] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    tok.decoder = decoders.ByteFallback()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def _session_model(ctx):
    """(model, tokenizer, label): the embedded model (as the app loads it) unless ``--session-model
    tiny`` or it cannot load; else a random-weight Llama with a byte tokenizer."""
    import torch

    import agacc

    dev = ctx["device"]
    why = "asked" if ctx["session_model"] == "tiny" else None
    if why is None:
        try:
            model, tok = agacc.load_model(device=str(dev))
            return model, tok, "embedded SmolLM2-135M-Instruct"
        except Exception as e:  # noqa: BLE001 -- the fallback says why
            why = f"{type(e).__name__}: {str(e)[:200]}"
    if ctx["dry"]:
        return llama(2, True, dev, 4096, vocab=257), _byte_tokenizer(), f"random tiny Llama + byte tokenizer ({why})"
    return (smollm_shaped(30, dev, torch.bfloat16), _byte_tokenizer(),
            f"random Llama of SmolLM2-135M's shapes (bf16) + byte tokenizer ({why})")


def section_session(ctx) -> dict:
    from agacc.config import AGACCConfig
    from agacc.session import GenerationSession
    from components import plots

    dev, out = ctx["device"], ctx["out"]
    model, tok, label = _session_model(ctx)
    prompt = ("Read this and answer. The depot opens at 7:45, the passkey is 48213, and the last bus leaves at 23:10. "
              "What is the passkey? ") * 4
    s = GenerationSession(model, tok, prompt, AGACCConfig.preset("agacc"), max_new_tokens=ctx["plan"]["session_tokens"],
                          compare=True, prefill_chunk=64)
    events = list(s.stream())
    res = s.result()
    tr = res["trace"]
    snap = tr.frames[-1] if tr.frames else None
    figs = {"importance": plots.importance_heatmap(snap, res["trace"].meta.get("config")),
            "tiers": plots.tier_map(snap), "bits": plots.bits_map(snap), "memory": plots.memory_chart(tr.steps),
            "compare": plots.compare_chart(tr.steps, (res.get("compare") or {}).get("diverged_at"))}
    for name, spec in figs.items():
        plots.to_json(spec)  # what the app sends: must be valid JSON (no NaN)
    (out / "session_figures.json").write_text(json.dumps(figs))
    try:
        (out / "session_figures.html").write_text(plots.figures_html(figs, title=f"gpu_check session ({label})"))
    except Exception:  # noqa: BLE001 -- plotly.js missing: the JSON is enough
        pass
    rec = {"model": label, "device": str(model.device), "dtype": str(model.dtype), "events": len(events),
           "new_tokens": res["new_tokens"], "stop_reason": res["stop_reason"], "frames": len(tr.frames),
           "figures": {k: len(v.get("data", [])) for k, v in figs.items()},
           "ttft_s": res["ttft"], "tokens_per_s": res["tokens_per_s"], "memory": res["memory"],
           "agreement": (res.get("compare") or {}).get("agreement"), "text": res["text"][:200]}
    if ctx["dry"]:
        rec["ttft_s"] = rec["tokens_per_s"] = None
    want = ctx["plan"]["session_tokens"]
    rec["ok"] = (res["new_tokens"] == want or res["stop_reason"] == "eos") and bool(tr.frames) and all(
        rec["figures"][k] > 0 for k in ("importance", "tiers", "memory"))
    del model
    free(dev)
    return rec


RUNNERS = {"env": section_env, "kernels": section_kernels, "decode": section_decode, "sweep": section_sweep, "profile": section_profile, "e2e": section_e2e,
           "memory": section_memory, "session": section_session, "basis": section_basis, "lookahead": section_lookahead}
# seconds a section needs at least to start on the GPU (the plan's shapes); skipped below that
SWEEP_CAP_S, SWEEP_LEAVE_S = 60, 200  # the sweep stops after 60 s, or earlier to leave 200 s for the rest
E2E_RESERVE_S = 100  # what the e2e section (last) is left by the memory section's cut
NEEDS = {"env": 0, "kernels": 30, "decode": 60, "sweep": 30, "profile": 30, "session": 20, "basis": 40, "lookahead": 40, "memory": 45, "e2e": 60}


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------

def _f(x, fmt="{:.3f}"):
    return "-" if x is None else fmt.format(x)


def summary_md(result: dict) -> str:
    env = result["sections"].get("env", {})
    lines = [f"# gpu_check: {env.get('name', '?')} ({env.get('capability', env.get('device', '?'))})", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, dry run: {result['dry_run']}, "
             f"{result['seconds']:.0f} s, command: `{result['command']}`", ""]
    for name, sec in result["sections"].items():
        status = sec.get("status", "ok")
        lines.append(f"- {name}: {status}" + (f" ({sec.get('error', '')})" if status != "ok" else ""))
    dec = result["sections"].get("decode", {}).get("rows", [])
    if dec:
        lines += ["", "## Decode attention (Llama-3-8B shapes, batch 1)", "",
                  "| context | ratio | kernel ms | dot form ms | SDPA ms | speedup | dot speedup | kernel % peak (kv + logits) "
                  "| dot % peak | SDPA % peak | SDPA backend | err out |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in dec:
            if "skipped" in r:
                lines.append(f"| {r['context']} | ~{r['target_ratio']}x | skipped: {r['skipped']} ||||||||||")
                continue
            pk = r.get("kernel_peak_frac")
            sp = r.get("sdpa_peak_frac")
            dp = r.get("dot_peak_frac")
            lines.append(f"| {r['context']} | {r['ratio']:.2f}x | {_f(r['kernel_ms'])} | {_f(r.get('kernel_dot_ms'))} | "
                         f"{_f(r['sdpa_ms'])} | {_f(r.get('speedup'), '{:.2f}')} | {_f(r.get('dot_speedup'), '{:.2f}')} | "
                         f"{_f(pk and 100 * pk, '{:.0f}')} | {_f(dp and 100 * dp, '{:.0f}')} | "
                         f"{_f(sp and 100 * sp, '{:.0f}')} | {r['sdpa_backend']} | {_f(r['max_err_out'], '{:.1e}')} |")
    sweep = [r for r in result["sections"].get("sweep", {}).get("rows", []) if r.get("ms")]
    if sweep:
        lines += ["", "## decode_parts knobs, ~4x store (default first)", "",
                  "| context | dot | block_n | num_warps | per_head | split | ms | % peak |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['context']} | {bool(r.get('dot'))} | {r['block_n'] or 'auto'} | {r['num_warps'] or 'auto'} | "
                  f"{r['per_head'] is not False} | {r['split'] or 'auto'} | {r['ms']:.3f} | "
                  f"{_f(r.get('peak_frac') and 100 * r['peak_frac'], '{:.0f}')} |" for r in sweep]
    prof = result["sections"].get("profile", {})
    if prof.get("rows"):
        lines += ["", "## Where a decode step goes (~4x store)", "",
                  "| context | kernel ms | PyTorch path ms | host ms / call | top CUDA kernels (us / step) |", "|---|---|---|---|---|"]
        for r in prof["rows"]:
            top = ", ".join(f"{k['name'][:40]} x{k['calls']} {k['us_per_step']:.0f}" for k in r.get("cuda_kernels", [])[:4])
            lines.append(f"| {r['context']} | {_f(r['kernel_ms'])} | {_f(r['torch_path_ms'])} | {r['host_ms_per_call']:.3f} | {top} |")
        st = prof.get("step", {})
        if st:
            lines += ["", f"Compressed decode step ({st['method']}, {st['layers']} layers of SmolLM2-135M's shapes, "
                      f"{st['context']} tokens): {st['ms_per_step']:.1f} ms a step under cProfile, "
                      f"{st.get('triton_compiles')} Triton compiles in {st['steps']} steps (profile_step.txt)"]
    e2e = result["sections"].get("e2e", {})
    if "plain_tokens_per_s" in e2e:
        lines += ["", f"## Decode tokens/s, 8B-shaped random Llama ({e2e['layers']} layers), {e2e['context']} tokens"
                  + (f" (cut from {e2e['context_asked']} by the time budget)" if e2e.get("context_asked", e2e["context"]) != e2e["context"] else ""), "",
                  f"plain {_f(e2e['plain_tokens_per_s'], '{:.1f}')}, {e2e['method']} "
                  f"{_f(e2e['compressed_tokens_per_s'], '{:.1f}')} (x{_f(e2e['speedup'], '{:.2f}')}), "
                  f"cache ratio {_f(e2e.get('compressed_ratio'), '{:.2f}')}; the untimed warm-up steps before: plain "
                  f"{_f(e2e.get('plain_warmup_tokens_per_s'), '{:.1f}')}, {e2e['method']} "
                  f"{_f(e2e.get('compressed_warmup_tokens_per_s'), '{:.1f}')} (Triton compiles there)"]
    mem = result["sections"].get("memory", {})
    if "plain_one_forward" in mem:
        gib = lambda r: _f(r.get("peak_over_weights_bytes") and r["peak_over_weights_bytes"] / 2 ** 30, "{:.2f}")  # noqa: E731
        lines += ["", f"## Peak memory over the weights, {mem['prompt']}-token prompt, {mem['layers']} layers"
                  + (f" (cut from {mem['prompt_asked']} by the time budget)" if mem.get("prompt_asked", mem["prompt"]) != mem["prompt"] else ""), "",
                  f"plain one forward {gib(mem['plain_one_forward'])} GiB, plain chunked {gib(mem['plain_chunked'])} GiB, "
                  f"{mem['method']} chunked {gib(mem['compressed_chunked'])} GiB"]
    bas = result["sections"].get("basis", {})
    if "max_err_out" in bas:
        lines += ["", f"## Keys in a basis ({bas['layers']} layers of SmolLM2-135M's shapes, agacc@8 -> {bas['key_quant']})",
                  "", f"{bas['decode_calls']} decode calls ({bas['calls_with_basis']} reading basis blocks) against "
                  f"attention over the dequantised entries: out err {bas['max_err_out']:.1e}, mass rel err "
                  f"{bas['max_rel_err_mass']:.1e}; ratio {bas['ratio']:.2f}, bytes {bas['bytes']} (walk "
                  f"{bas['walk_bytes']}); warnings {bas['warnings']}"]
        if bas.get("rows"):
            lines += ["", "| context | method | key_quant | tokens/s | warm-up tokens/s | ratio |", "|---|---|---|---|---|---|"]
            lines += [f"| {r['context']} | {r['method']} | {r.get('key_quant') or '-'} | {_f(r.get('tokens_per_s'), '{:.1f}')} "
                      f"| {_f(r.get('warmup_tokens_per_s'), '{:.1f}')} | {_f(r.get('ratio'), '{:.2f}')} |" for r in bas["rows"]]
    look = result["sections"].get("lookahead", {})
    if look.get("methods"):
        lines += ["", f"## Lookahead ({look['layers']} layers, {look['context']}-token prompt)", "",
                  "| method | decode / pseudo-token calls | out err | mass rel err | generate() = loop (tokens, tiers, bytes) "
                  "| blocks moved | ratio | peak ratio |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {m} | {r['decode_calls']} / {r['pseudo_calls']} | {r['max_err_out']:.1e} | {r['max_rel_err_mass']:.1e} "
                  f"| {r['generate_tokens_equal']}, {r['generate_tiers_equal']}, {r['generate_bytes_equal']} "
                  f"| {r['blocks_moved_by_lookahead']} | {r['ratio']:.2f} | {r['peak_ratio']:.2f} |"
                  for m, r in look["methods"].items()]
        for r in look.get("ttft_rows", []):
            lines += [f"- time to first token at {r['context']} tokens (s): " + "; ".join(
                f"{k[7:-1]} {', '.join(f'{t:.3f}' for t in v)}" for k, v in r.items() if k.startswith("ttft_s"))]
    ses = result["sections"].get("session", {})
    if "new_tokens" in ses:
        lines += ["", f"## Session: {ses['model']} on {ses['device']}: {ses['new_tokens']} tokens, "
                  f"{ses['frames']} frames, figures {ses['figures']}, {_f(ses['tokens_per_s'], '{:.1f}')} tokens/s"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Writes OUTDIR/gpu_check.json and OUTDIR/summary.md.")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter, no timing claims")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--budget-s", type=float, default=450.0, help="stop starting sections after this (default %(default)s)")
    ap.add_argument("--method", default="agacc@4", help="the compressed cache of e2e / memory (agacc.spec)")
    ap.add_argument("--e2e-layers", type=int, help="layers of the 8B-shaped model in e2e (default 32)")
    ap.add_argument("--mem-layers", type=int, help="layers of the 8B-shaped model in memory (default 8)")
    ap.add_argument("--peak-tbps", type=float, help="the GPU's peak bandwidth in TB/s (default: by device name)")
    ap.add_argument("--session-model", choices=("embedded", "tiny"), default=None,
                    help="session model (default: embedded on the GPU, tiny in a dry run)")
    args = ap.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        ap.error(f"unknown sections {bad}")

    if args.dry_run:  # before any kernel module is imported: @triton.jit reads it then
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run for the CPU rehearsal)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    plan = dict(DRY if args.dry_run else FULL)
    if args.e2e_layers:
        plan["e2e_layers"] = args.e2e_layers
    if args.mem_layers:
        plan["mem_layers"] = args.mem_layers
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    ctx = {"device": device, "dry": args.dry_run, "plan": plan, "out": out, "method": args.method,
           "peak": peak_bps(name, args.peak_tbps) if device.type == "cuda" else None,
           "budget": Budget(args.budget_s), "session_model": args.session_model or ("tiny" if args.dry_run else "embedded")}
    result = {"command": " ".join(["python -m bench.gpu_check", *(argv if argv is not None else sys.argv[1:])]),
              "dry_run": args.dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "sections": {}, "seconds": 0.0}
    t0 = time.perf_counter()
    failed = []
    for sec in sections:
        if ctx["budget"].left() < NEEDS[sec] and not args.dry_run:
            result["sections"][sec] = {"status": "skipped", "error": f"time budget ({ctx['budget'].left():.0f} s left)"}
            failed.append(sec)
            continue
        print(f"[gpu_check] {sec} ...", flush=True)
        ts = time.perf_counter()
        try:
            rec = RUNNERS[sec](ctx)
            rec["status"] = "ok" if rec.pop("ok", True) else "mismatch"
        except Exception as e:  # noqa: BLE001 -- one section's failure must not lose the others
            rec = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            if device.type == "cuda":
                free(device)
        rec["seconds"] = time.perf_counter() - ts
        if rec["status"] != "ok":
            failed.append(sec)
        print(f"[gpu_check] {sec}: {rec['status']} in {rec['seconds']:.1f} s"
              + (f" -- {rec.get('error', '')}" if rec["status"] == "error" else ""), flush=True)
        result["sections"][sec] = rec
        result["seconds"] = time.perf_counter() - t0
        (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
        (out / "summary.md").write_text(summary_md(result))
    result["seconds"] = time.perf_counter() - t0
    result["failed"] = failed
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "summary.md").write_text(summary_md(result))
    print(summary_md(result))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
