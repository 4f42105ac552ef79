"""Ahead-of-time compilation (kernels/aot.py): real GPU compiles on this CPU machine.

A deliberately broken specialisation (``tl.dot`` with K = 8 < 16, a non-power-of-two ``tl.arange``)
must be reported by name with a non-zero exit; a module without ``aot_specs`` too; a small real
subset of the kernels' own specialisations compiles for sm_90 and is then served from the cache.
The full sweep (``python -m kernels.aot --targets sm_80,sm_90``) is CI's job, not this file's."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BROKEN = textwrap.dedent('''
    import triton
    import triton.language as tl


    @triton.jit
    def dot_kernel(a, b, c, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
        m, n, k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
        x = tl.load(a + m[:, None] * K + k[None, :])
        y = tl.load(b + k[:, None] * N + n[None, :])
        tl.store(c + m[:, None] * N + n[None, :], tl.dot(x, y))


    @triton.jit
    def copy_kernel(x, y, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(y + i, tl.load(x + i))


    def aot_specs():
        sig = {"a": "*fp16", "b": "*fp16", "c": "*fp32"}
        return [
            ("fixture.dot[K=16]", dot_kernel, sig, {"M": 16, "N": 16, "K": 16}),
            ("fixture.dot[K=8]", dot_kernel, sig, {"M": 16, "N": 16, "K": 8}),        # tl.dot needs K >= 16
            ("fixture.copy[BLOCK=24]", copy_kernel, {"x": "*fp32", "y": "*fp32"}, {"BLOCK": 24}),  # not a power of 2
            ("fixture.copy[BLOCK=32]", copy_kernel, {"x": "*fp32", "y": "*fp32"}, {"BLOCK": 32}, {"num_warps": 1}),
        ]
''')


def run_aot(*args, pythonpath=None, timeout=240):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # tests run under the interpreter
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "kernels.aot", "--quiet", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture()
def fixture_module(tmp_path):
    (tmp_path / "aot_fixture_kernels.py").write_text(BROKEN)
    (tmp_path / "aot_fixture_nospecs.py").write_text("import triton\n")
    return tmp_path


def test_broken_specialisations_are_named_and_fail(fixture_module, tmp_path):
    out = tmp_path / "rows.json"
    p = run_aot("--targets", "sm_90", "--module", "aot_fixture_kernels", "--module", "aot_fixture_nospecs",
                "--no-cache", "--jobs", "1", "--json", str(out), pythonpath=fixture_module)
    assert p.returncode == 1, p.stdout + p.stderr
    failed = {line.split(" @ ")[0].split()[-1] for line in p.stderr.splitlines() if line.startswith("FAILED")}
    assert failed == {"fixture.dot[K=8]", "fixture.copy[BLOCK=24]", "(aot_specs)"}, p.stderr
    assert "K >= 16" in p.stderr and "power of 2" in p.stderr.lower() and "no aot_specs()" in p.stderr
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    good = rows["fixture.dot[K=16]"]
    assert good["ok"] and good["target"] == "sm_90" and good["regs"] > 0 and good["shared"] > 0
    assert rows["fixture.copy[BLOCK=32]"]["ok"] and rows["fixture.copy[BLOCK=32]"]["num_warps"] == 1
    table = p.stdout
    assert "fixture.dot[K=8]" in table and "FAIL" in table and "4 variants" not in table


def test_real_subset_compiles_for_sm90_then_comes_from_the_cache(tmp_path):
    subset = (r"^(decode\.combine\[D=128,g=4,SB=8,rot|decode\.mass\[g=4,E=1024\]"
              r"|quantize\.keys\[D=128,B=16,bits=4,minmax,x=fp32\]|quantize\.values\[D=128,G=64,bits=3,minmax)")
    cache = tmp_path / "cache"
    out = tmp_path / "rows.json"
    p = run_aot("--targets", "sm_90", "--filter", subset, "--cache-dir", str(cache), "--jobs", "2",
                "--module", "kernels.triton_decode", "--module", "kernels.quantize", "--json", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 and all(r["ok"] and r["regs"] and r["target"] == "sm_90" and not r["cached"] for r in rows)
    assert {r["kernel"] for r in rows} == {"_combine_kernel", "_mass_kernel", "_quantize_keys_kernel",
                                           "_quantize_values_kernel"}
    again = run_aot("--targets", "sm_90", "--filter", subset, "--cache-dir", str(cache), "--json", str(out),
                    "--module", "kernels.triton_decode", "--module", "kernels.quantize")
    assert again.returncode == 0 and all(r["cached"] for r in json.loads(out.read_text())["rows"])
    assert "4 from the cache" in again.stdout
    # a committed results file seeds an empty cache: rows whose key still matches are not recompiled
    seeded = run_aot("--targets", "sm_90", "--filter", subset, "--cache-dir", str(tmp_path / "empty"),
                     "--seed", str(out), "--module", "kernels.triton_decode", "--module", "kernels.quantize")
    assert seeded.returncode == 0 and "4 from the cache" in seeded.stdout, seeded.stdout + seeded.stderr


def test_every_kernel_module_lists_its_specialisations():
    p = run_aot("--list", timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    names = [line.split()[-1] for line in p.stdout.splitlines()]
    assert len(names) == len(set(names))
    modules = {line.split(".")[0] for line in p.stdout.splitlines()}
    expected = {"quantize", "triton_decode"} | {f.stem for f in (ROOT / "kernels").glob("triton_*.py")}
    assert modules == expected
    partial = [n for n in names if n.startswith("decode.partial[")]
    for d in (64, 96, 128, 256):
        for g in (1, 2, 4, 8):
            assert any(n.startswith(f"decode.partial[D={d},g={g},") for n in partial), (d, g)
    assert any(",plain," in n for n in partial) and any("keys=token" in n for n in partial)
    assert {n.split("keys=B")[1].split(",")[0] for n in partial if "keys=B" in n} >= {"8", "16", "32", "64", "128"}
    assert {f"bits={b}," for b in range(1, 9)} <= {f"bits={n.split('bits=')[1].split(',')[0]}," for n in names
                                                    if n.startswith("quantize.keys")}
    assert {n.split("c=")[1].split(",")[0] for n in names if n.startswith("decode.sparse")} == {"2", "3", "4", "8"}


def test_targets_parse():
    from kernels.aot import parse_targets

    assert parse_targets("sm_80,sm_90") == [80, 90]
    assert parse_targets("sm_75, 90, sm90a") == [75, 90, 90]
    with pytest.raises(ValueError):
        parse_targets("gfx90a")


def test_chunk_kernel_at_head_dim_256_fits_sm75_shared_memory(tmp_path):
    """Three stages of the chunk kernel's D = 256 tile took 69,760 B of shared memory on sm_75, over Turing's
    64 KiB a block (it would not launch on a T4): below sm_80 it is compiled, and launched, with two. The
    options of sm_80 / sm_90 stay what docs/aot.json holds (a change would recompile them in CI)."""
    from kernels import triton_chunk

    assert triton_chunk.launch_options("main", 256, 75)["num_stages"] == 2
    assert triton_chunk.launch_options("main", 256, 80) == triton_chunk.launch_options("main", 256) == {
        "num_warps": 4, "num_stages": 3, "enable_fp_fusion": True}
    assert triton_chunk.launch_options("main", 128, 75)["num_stages"] == 3
    out = tmp_path / "rows.json"
    p = run_aot("--targets", "sm_75", "--filter", r"^chunk\.main\[D256,dense,fp16,M", "--cache-dir", str(tmp_path / "c"),
                "--module", "kernels.triton_chunk", "--json", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["ok"] and row["target"] == "sm_75" and 0 < row["shared"] <= 65536
