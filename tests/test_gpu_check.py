"""The device check (bench/gpu_check.sh) rehearsed end to end on the CPU: ``--dry-run`` runs every
section with tiny shapes and the Triton interpreter, so the script a GPU session runs once is known
to work before the GPU time is spent. No timing is claimed in a dry run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out), "--dry-run"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "gpu_check.json").read_text())
    assert res["dry_run"] is True
    assert {k: v["status"] for k, v in res["sections"].items()} == {
        s: "ok" for s in ("env", "kernels", "decode", "sweep", "e2e", "memory", "session", "lookahead", "basis", "profile")}
    look = res["sections"]["lookahead"]  # the pseudo tokens' calls against the dequantised entries; generate() = loop
    for r in look["methods"].values():
        assert r["pseudo_calls"] == 16 * look["layers"] and r["max_err_out"] < 1e-3 and r["max_rel_err_mass"] < 1e-3
        assert r["generate_tokens_equal"] and r["generate_tiers_equal"] and r["blocks_moved_by_lookahead"] > 0
    bas = res["sections"]["basis"]  # keys in a basis: every decode step against the dequantised entries
    assert bas["key_quant"] == "basis" and bas["calls_with_basis"] > 0 and bas["max_err_out"] < 1e-3
    assert bas["bytes"] == bas["walk_bytes"] and bas["rows"] == []
    sweep = res["sections"]["sweep"]["rows"]
    assert len(sweep) == 2 and all(r["ms"] is None and r["max_diff_vs_default"] <= 2e-3 for r in sweep)
    assert sweep[1]["dot"] is True  # the tensor-core form is in the sweep, checked against the default
    kernels = res["sections"]["kernels"]["rows"]
    assert {r["kernel"] for r in kernels} >= {"quantize_keys+dequantize", "quantize_values+dequantize", "decode_parts"}
    assert all(r["ok"] for r in kernels)
    dec = res["sections"]["decode"]["rows"]
    assert [r["target_ratio"] for r in dec] == [2, 4, 8]
    assert all(r["kernel_ms"] is None and r["sdpa_ms"] is None and r["max_err_out"] < 1e-3 for r in dec)
    assert all(r["dot_max_diff"] < 1e-3 for r in dec)
    assert all("rot_dot_out_err" in r for r in kernels if r["kernel"] == "decode_parts")
    assert res["sections"]["e2e"]["plain_tokens_per_s"] is None  # no speed claims from a CPU rehearsal
    mem = res["sections"]["memory"]
    assert mem["compressed_chunked"]["cache_bytes"] > 0
    ses = res["sections"]["session"]
    assert ses["new_tokens"] > 0 and ses["frames"] > 0
    figs = json.loads((out / "session_figures.json").read_text())
    assert set(figs) == {"importance", "tiers", "bits", "memory", "compare"}
    assert (out / "summary.md").read_text().startswith("# gpu_check")
    assert "gpu_check" in (out / "log.txt").read_text()


def test_gpu_check_needs_cuda_without_dry_run(tmp_path):
    import torch

    if torch.cuda.is_available():
        return
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path), "--sections", "env"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr


def test_prefill_cut_at_the_deadline_keeps_a_whole_chunk_and_says_so():
    """A chunked prefill whose next chunk would end past the deadline stops there (the memory and e2e
    sections then give the plain cache the same tokens); without a deadline it runs to the end."""
    import time

    import torch
    from transformers import DynamicCache

    from bench import gpu_check

    dev = torch.device("cpu")
    model = gpu_check.llama(1, True, dev, 256)
    prompt = torch.randint(0, model.config.vocab_size, (1, 96), device=dev)
    cut = gpu_check._peak_prefill(model, prompt, DynamicCache(config=model.config), 32, dev, time.monotonic() - 1)
    assert (cut["tokens"], cut["cut"]) == (32, True)
    whole = gpu_check._peak_prefill(model, prompt, DynamicCache(config=model.config), 32, dev)
    assert (whole["tokens"], whole["cut"]) == (96, False)
    rate, n, cold = gpu_check._decode_rate(model, prompt, DynamicCache(config=model.config), 2, dev, 32,
                                           time.monotonic() - 1, warm_steps=2)
    assert n == 32 and rate > 0 and cold > 0
