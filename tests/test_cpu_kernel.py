"""The fused CPU decode kernel (kernels/cpu_decode.cpp) against its PyTorch reference
(agacc.decode._key_scores / _value_out) and a hand-worked case; decode_attention with and without it.

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

from agacc import quant
from agacc.config import AGACCConfig
from agacc.decode import _key_scores, _value_out, decode_attention
from agacc.store import QuantSegment
from kernels import cpu

_missing = [name for name, ok in (
    ("a C++ compiler", shutil.which("c++") or shutil.which("g++")),
    ("ninja", shutil.which("ninja") or importlib.util.find_spec("ninja")),
    ("Python.h", (Path(sysconfig.get_paths()["include"]) / "Python.h").exists()),
) if not ok]


@pytest.fixture(scope="module", autouse=True)
def built():
    assert not _missing, f"no {', '.join(_missing)}: run scripts/setup.sh (it installs the kernel's toolchain)"
    assert cpu.load() is not None, f"the CPU kernel did not build: {cpu._state.get('error')}"


def _segment(container, bits, key_quant, group, bt=2, h=3, d=64, n_blocks=5, B=16, rotate=False, seed=0):
    cfg = AGACCConfig(block_size=B, key_quant=key_quant, key_group_size=group, value_group_size=group,
                      rotate=rotate, b_min=2)
    seg = QuantSegment(B, torch.device("cpu"), container, cfg)
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(bt, h, n_blocks * B, d, generator=gen) * 2 + torch.randn(d, generator=gen)  # channel offsets
    v = torch.randn(bt, h, n_blocks * B, d, generator=gen)
    seg.add(torch.arange(n_blocks), k, v, bits=torch.full((n_blocks,), bits, dtype=torch.int8))
    return seg


@pytest.mark.parametrize("container,bits", [(2, 2), (2, 1), (3, 3), (4, 4), (8, 8), (8, 5)])
@pytest.mark.parametrize("key_quant,group", [("channel", 64), ("token", 64), ("token", 16), ("channel", 16)])
def test_kernel_equals_reference(container, bits, key_quant, group):
    seg = _segment(container, bits, key_quant, group)
    gen = torch.Generator().manual_seed(1)
    qg = torch.randn(2, 3, 3, 64, generator=gen)
    p = torch.rand(2, 3, 3, seg.k.shape[2], generator=gen)
    torch.testing.assert_close(cpu.key_scores(qg, seg, 16), _key_scores(qg, seg, 16), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cpu.value_out(p, seg), _value_out(p, seg), rtol=1e-5, atol=1e-4)


def test_kernel_head96_groups_of_24_and_a_strided_probability_slice():
    seg = _segment(3, 3, "token", 24, bt=1, h=2, d=96, n_blocks=3)
    qg = torch.randn(1, 2, 4, 96)
    probs = torch.rand(1, 2, 4, seg.k.shape[2] + 7)[..., 5:-2]  # a view, as decode_attention passes it
    torch.testing.assert_close(cpu.key_scores(qg, seg, 16), _key_scores(qg, seg, 16), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cpu.value_out(probs, seg), _value_out(probs, seg), rtol=1e-5, atol=1e-4)


def test_kernel_hand_worked_three_bit_codes():
    """Every key code 5 (binary 101: low plane 01, high bit 1) with scale 0.5 and zero -1 dequantises
    to 1.5 per channel: q . k = 1.5 * sum(q); every value code 6 with scale 2, zero 1 -> 13, so the
    output is 13 * sum_t p_t."""
    B, d = 16, 64
    seg = QuantSegment(B, torch.device("cpu"), 3, AGACCConfig(block_size=B, rotate=False, b_min=2))
    seg.bits = torch.tensor([3], dtype=torch.int8)
    seg.k = quant.pack(torch.full((1, 1, B, d), 5, dtype=torch.uint8), 3)
    seg.v = quant.pack(torch.full((1, 1, B, d), 6, dtype=torch.uint8), 3)
    seg.k_scale, seg.k_zero = torch.full((1, 1, 1, d), 0.5).half(), torch.full((1, 1, 1, d), -1.0).half()
    seg.v_scale, seg.v_zero = torch.full((1, 1, B, 1), 2.0).half(), torch.full((1, 1, B, 1), 1.0).half()
    q = torch.arange(d, dtype=torch.float32).view(1, 1, 1, d) / d
    assert torch.allclose(cpu.key_scores(q, seg, B), torch.full((1, 1, 1, B), 1.5 * float(q.sum())))
    p = torch.full((1, 1, 1, B), 1 / B)
    assert torch.allclose(cpu.value_out(p, seg), torch.full((1, 1, 1, d), 13.0))


@pytest.mark.parametrize("rotate", [True, False])
def test_decode_attention_with_and_without_the_kernel(monkeypatch, rotate):
    """A store with every quantised container: decode_attention through the kernel == through the
    PyTorch path (AGACC_CPU_KERNEL=0)."""
    from agacc.store import LayerStore
    from agacc.tiers import FULL, INT2, INT3, INT4, INT8

    cfg = AGACCConfig(block_size=16, recent_window=16, b_min=2, rotate=rotate)
    store = LayerStore(cfg, torch.device("cpu"), torch.float16)
    store.append(torch.randn(1, 3, 16 * 6 + 20, 64).half(), torch.randn(1, 3, 16 * 6 + 20, 64).half())
    store.apply_tiers(torch.tensor([FULL, INT8, INT4, INT3, INT2, INT3]), torch.tensor([16, 8, 4, 3, 2, 3]),
                      torch.full((6,), 64), torch.ones(store.seq_len))
    q = torch.randn(1, 9, 1, 64)
    out, mass = decode_attention(q, store, 0.125)
    monkeypatch.setenv(cpu.ENV, "0")
    ref_out, ref_mass = decode_attention(q, store, 0.125)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mass, ref_mass, rtol=1e-5, atol=1e-7)
