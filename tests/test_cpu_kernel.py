"""The fused CPU decode kernel (kernels/cpu_decode.cpp, ``kernels.cpu.decode_layer(qg, store.parts())``)
against its PyTorch reference (agacc.decode's decode_attention on the "torch" backend: AGACC_CPU_KERNEL=0)
on stores holding every kind of part, and a hand-worked case.

The kernel is built on first use. The README's test command (scripts/test.sh -> setup.sh) installs its
toolchain (g++, ninja, Python's headers), so these tests never skip: a missing piece fails them with
its name, and so does a build that does not compile."""
from __future__ import annotations

import importlib.util
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

import kernels
from agacc import quant
from agacc.config import AGACCConfig
from agacc.decode import decode_attention
from kernels import cpu
from tests.helpers import every_part_store

_missing = [name for name, ok in (
    ("a C++ compiler", shutil.which("c++") or shutil.which("g++")),
    ("ninja", shutil.which("ninja") or importlib.util.find_spec("ninja")),
    ("Python.h", (Path(sysconfig.get_paths()["include"]) / "Python.h").exists()),
) if not ok]


@pytest.fixture(scope="module", autouse=True)
def built():
    assert not _missing, f"no {', '.join(_missing)}: run scripts/setup.sh (it installs the kernel's toolchain)"
    assert cpu.load() is not None, f"the CPU kernel did not build: {cpu._state.get('error')}"


def _store(key_quant="channel", group=64, rotate=True, bt=1, h=3, d=64, B=16, dtype=torch.float16, seed=0):
    """Every kind of part (``tests.helpers.every_part_store``), pruned blocks keeping half the elements."""
    return every_part_store(key_quant, rotate, group=group, keep=d // 2, bt=bt, h=h, d=d, B=B, dtype=dtype, seed=seed)


def _with_and_without_kernel(monkeypatch, q, store, scaling=0.125):
    monkeypatch.delenv(kernels.FORCE_TRITON_ENV, raising=False)
    assert kernels.backend(q.device) == "cpp"
    out, mass = decode_attention(q, store, scaling)
    monkeypatch.setenv(cpu.ENV, "0")
    assert kernels.backend(q.device) == "torch"
    ref_out, ref_mass = decode_attention(q, store, scaling)
    monkeypatch.delenv(cpu.ENV)
    return out, mass, ref_out, ref_mass


@pytest.mark.parametrize("rotate", [True, False])
@pytest.mark.parametrize("key_quant,group", [("channel", 64), ("channel", 16), ("token", 64), ("token", 16)])
def test_kernel_equals_the_pytorch_path(monkeypatch, key_quant, group, rotate):
    """Every part kind in one store, two batch rows: the fused step == decode_attention's PyTorch path."""
    store = _store(key_quant, group, rotate, bt=2)
    assert {s.container for s in store.quant.values() if s.n_blocks} == {8, 4, 3, 2}
    assert store.markers.n and store.sparse and store.full.n_blocks and store.hot_k.shape[2]
    q = torch.randn(2, 9, 1, 64, generator=torch.Generator().manual_seed(1))
    out, mass, ref_out, ref_mass = _with_and_without_kernel(monkeypatch, q, store)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mass, ref_mass, rtol=1e-4, atol=1e-7)
    assert mass.shape == (store.n_entries,) and abs(float(mass.sum()) - 1) < 1e-5


@pytest.mark.parametrize("dtype,rotate", [(torch.float32, True), (torch.bfloat16, False)])
def test_kernel_head96_groups_of_24_and_other_store_dtypes(monkeypatch, dtype, rotate):
    """Head dim 96: rotated, three Hadamard runs of 32 channels each (the kernel's own butterflies)."""
    store = _store("token", 24, rotate=rotate, h=2, d=96, dtype=dtype)
    q = torch.randn(1, 8, 1, 96)
    out, mass, ref_out, ref_mass = _with_and_without_kernel(monkeypatch, q, store)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mass, ref_mass, rtol=1e-4, atol=1e-7)


def test_kernel_hand_worked_three_bit_codes():
    """One block of 16 identical 3-bit keys and values. Every key code 5 (binary 101: low plane 01,
    high bit 1) with scale 0.5 and zero -1 dequantises to 1.5 per channel, so every score is equal and
    each entry gets probability 1/16; every value code 6 with scale 2 and zero 1 is 13, so the output is
    13 in every channel and the mass 1/16 per entry."""
    from agacc.store import LayerStore
    B, d = 16, 64
    store = LayerStore(AGACCConfig(block_size=B, rotate=False, b_min=2), torch.device("cpu"), torch.float16)
    seg = store.quant[3]
    seg.block_ids, seg.bits = torch.tensor([0], dtype=torch.int32), torch.tensor([3], dtype=torch.int8)
    seg.k = quant.pack(torch.full((1, 1, B, d), 5, dtype=torch.uint8), 3)
    seg.v = quant.pack(torch.full((1, 1, B, d), 6, dtype=torch.uint8), 3)
    seg.k_scale, seg.k_zero = torch.full((1, 1, 1, d), 0.5).half(), torch.full((1, 1, 1, d), -1.0).half()
    seg.v_scale, seg.v_zero = torch.full((1, 1, B, 1), 2.0).half(), torch.full((1, 1, B, 1), 1.0).half()
    qg = torch.arange(d, dtype=torch.float32).view(1, 1, 1, d) / d
    out, mass = cpu.decode_layer(qg, store.parts())
    assert torch.allclose(out, torch.full((1, 1, 1, d), 13.0))
    assert torch.allclose(mass, torch.full((B,), 1 / B))
