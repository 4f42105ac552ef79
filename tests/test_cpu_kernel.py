"""The fused CPU decode kernel (kernels/cpu_decode.cpp, ``kernels.cpu.decode_layer(qg, store.parts())``)
against its PyTorch reference (agacc.decode's decode_attention on the "torch" backend: AGACC_CPU_KERNEL=0)
on stores holding every kind of part, and hand-worked cases; with logit softcapping (Gemma2's
``attn_logit_softcapping``: c * tanh(z / c), then the parts' bias) against the PyTorch path and a
reference written out here over the dequantised parts.

The kernel is built on first use. The README's test command (scripts/test.sh -> setup.sh) installs its
toolchain (g++, ninja, Python's headers), so these tests never skip: a missing piece fails them with
its name, and so does a build that does not compile."""
from __future__ import annotations

import importlib.util
import math
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

import kernels
from agacc import quant
from agacc.config import AGACCConfig
from agacc.decode import _decode_parts, decode_attention
from kernels import cpu
from kernels.format import DENSE, Part
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


def _capped_reference(qg, parts, softcap):
    """Softcapped decode written out over the dequantised (un-rotated) parts: logits z = qg . k, then
    c * tanh(z / c), then the part's bias; softmax over all entries; mass averaged over Bt x H x g."""
    scores, values = [], []
    for p in parts:
        k, v = quant.dequantize_part(p, torch.float32)
        z = qg @ k.transpose(-1, -2)
        if softcap:
            z = softcap * torch.tanh(z / softcap)
        scores.append(z + p.bias if p.bias is not None else z)
        values.append(v)
    probs = torch.softmax(torch.cat(scores, -1), -1)
    out, off = torch.zeros_like(qg), 0
    for v in values:
        out += probs[..., off:off + v.shape[2]] @ v
        off += v.shape[2]
    bt, h, g, _ = qg.shape
    return out, probs.sum((0, 1, 2)) / (bt * h * g)


@pytest.mark.parametrize("softcap", [None, 0.5, 2.0])
@pytest.mark.parametrize("key_quant,group,rotate", [("channel", 64, True), ("channel", 16, False),
                                                    ("token", 64, False), ("token", 16, True)])
def test_kernel_softcap_equals_the_pytorch_path(key_quant, group, rotate, softcap):
    """Every part kind in one store (full, int8..int2 per channel or per token, rotated or not, pruned,
    the markers' log-count bias, hot), two batch rows: the fused step with ``softcap`` ==
    ``_decode_parts(..., softcap)`` and the reference above. Capped, the queries are 4x larger, so the
    logits run to tens of units and a cap moves the answer far from the uncapped one (so the comparison
    can fail); uncapped (None), they are as in the test above (logits that large put the uncapped fp32
    sums ~2e-5 apart), and None, 0 and no argument give the same bits."""
    store = _store(key_quant, group, rotate, bt=2)
    parts = store.parts()
    assert {p.kind for p in parts} == {"dense", "quant", "sparse"} and any(p.bias is not None for p in parts)
    assert any(p.rotated for p in parts) == rotate
    qg = torch.randn(2, 3, 3, 64, generator=torch.Generator().manual_seed(1)) * (4 if softcap else 1) * 0.125
    out, mass = cpu.decode_layer(qg, parts, softcap=softcap)
    for ref_out, ref_mass in (_decode_parts(qg, parts, None, softcap=softcap), _capped_reference(qg, parts, softcap)):
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mass, ref_mass, rtol=1e-4, atol=1e-7)
    assert mass.shape == (store.n_entries,) and abs(float(mass.sum()) - 1) < 1e-5
    free_out, free_mass = cpu.decode_layer(qg, parts)
    if softcap is None:  # off: the uncapped kernel, bit for bit, whichever way it is said
        for off in (None, 0.0):
            o, m = cpu.decode_layer(qg, parts, softcap=off)
            assert torch.equal(o, free_out) and torch.equal(m, free_mass)
        assert torch.equal(out, free_out) and torch.equal(mass, free_mass)
    else:
        assert (out - free_out).abs().max() > 0.1 and (mass - free_mass).abs().max() > 0.01


@pytest.mark.parametrize("softcap", [0.5, 2.0])
def test_kernel_softcap_through_decode_attention(monkeypatch, softcap):
    """``decode_attention(..., softcap=c)`` on the "cpp" backend == on the "torch" backend (the kernel is
    handed the cap), and differs from the uncapped step."""
    store = _store("token", 16, True, bt=2)
    q = torch.randn(2, 9, 1, 64, generator=torch.Generator().manual_seed(2)) * 4
    monkeypatch.delenv(kernels.FORCE_TRITON_ENV, raising=False)
    assert kernels.backend(q.device) == "cpp"
    out, mass = decode_attention(q, store, 0.125, softcap=softcap)
    free, _ = decode_attention(q, store, 0.125)
    monkeypatch.setenv(cpu.ENV, "0")
    assert kernels.backend(q.device) == "torch"
    ref_out, ref_mass = decode_attention(q, store, 0.125, softcap=softcap)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mass, ref_mass, rtol=1e-4, atol=1e-7)
    assert (out - free).abs().max() > 0.1


def test_kernel_softcap_hand_worked_cap_then_bias():
    """One dense part, q = e_0, keys 4 e_0 and 0, biases 0 and 3, cap 2: logits 2 tanh(4 / 2) + 0 = 1.928
    and 2 tanh(0) + 3 = 3 (the bias after the cap; before it, the second would be 2 tanh(3 / 2) = 1.81),
    so p = softmax(1.928, 3) = (0.255, 0.745) (bias first: (0.53, 0.47)); values e_0 and e_1 make the
    output (p_0, p_1). Without the cap the logits are (4, 3)."""
    d = 8
    q = torch.zeros(1, 1, 1, d)
    q[..., 0] = 1
    k, v = torch.zeros(1, 1, 2, d), torch.zeros(1, 1, 2, d)
    k[0, 0, 0, 0], v[0, 0, 0, 0], v[0, 0, 1, 1] = 4, 1, 1
    part = Part(DENSE, k, v, bias=torch.tensor([0.0, 3.0]))
    z = torch.tensor([2 * math.tanh(2.0), 3.0])
    p = torch.softmax(z, 0)
    out, mass = cpu.decode_layer(q, [part], softcap=2.0)
    torch.testing.assert_close(mass, p)
    torch.testing.assert_close(out[0, 0, 0, :2], p)
    free, _ = cpu.decode_layer(q, [part])
    torch.testing.assert_close(free[0, 0, 0, :2], torch.softmax(torch.tensor([4.0, 3.0]), 0))
    with pytest.raises(ValueError):
        cpu.decode_layer(q, [part], softcap=float("nan"))


@pytest.mark.parametrize("h,g,B", [(4, 1, 16), (2, 8, 16), (1, 12, 16), (3, 3, 1)])
def test_kernel_query_groups_and_block_sizes(monkeypatch, h, g, B):
    """The vector paths are specialised per query-group size g (1..8; 12 takes the generic loops) and read
    key blocks two tokens at a time (B = 1: the one-token tail): each == the PyTorch path."""
    store = _store("channel", 64, True, h=h, B=B)
    q = torch.randn(1, h * g, 1, 64, generator=torch.Generator().manual_seed(2))
    out, mass, ref_out, ref_mass = _with_and_without_kernel(monkeypatch, q, store)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mass, ref_mass, rtol=1e-4, atol=1e-7)
