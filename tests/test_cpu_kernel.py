"""The fused CPU decode kernel (kernels/cpu_decode.cpp, ``kernels.cpu.decode_layer(qg, store.parts())``)
against its PyTorch reference (agacc.decode's decode_attention on the "torch" backend: AGACC_CPU_KERNEL=0)
on stores holding every kind of part, and hand-worked cases; with logit softcapping (Gemma2's
``attn_logit_softcapping``: c * tanh(z / c), then the parts' bias) against the PyTorch path and a
reference written out here over the dequantised parts; keys held in a basis (``Part.basis``: coefficients
rebuilt into keys and turned to their positions inside the kernel) on parts built by hand and in a store.

The kernel is built on first use. The README's test command (scripts/test.sh -> setup.sh) installs its
toolchain (g++, ninja, Python's headers), so these tests never skip: a missing piece fails them with
its name, and so does a build that does not compile."""
from __future__ import annotations

import importlib.util
import math
import shutil
import sysconfig
import warnings
from pathlib import Path

import pytest
import torch

import kernels
from agacc import quant
from agacc.config import AGACCConfig
from agacc.decode import _decode_parts, decode_attention
from kernels import cpu
from kernels.format import DENSE, QUANT, Part, pack, pack_groups
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


# --- keys held in a basis (kernels/format.py's Part.basis) ---------------------------------------------

def _inv_freq(d: int) -> torch.Tensor:
    return 10000.0 ** (-torch.arange(0, d, 2).float() / d)


def _basis_part(gen, *, bt=2, h=3, d=64, B=16, blocks=(0, 3, 5), groups=((3, 40),), container=3, rotated=False,
                value_group=16, scale_dtype=torch.float16, pos=None) -> Part:
    """A quantised part whose keys are held in a basis, from random codes: the r coefficients' codes in
    ``groups`` ((width, count), ...) per coefficient per block of B tokens, random axes [H, r, D], RoPE's
    inv_freq, the entries at ``pos`` (default: blocks ``blocks`` of B positions each, not contiguous);
    values per token in groups of ``value_group`` (rotated or not: random codes either way)."""
    n, r = B * len(blocks), sum(cnt for _, cnt in groups)
    codes = torch.cat([torch.randint(0, 2 ** w, (bt, h, n, cnt), generator=gen, dtype=torch.uint8)
                       for w, cnt in groups], -1)
    vcodes = torch.randint(0, 2 ** container, (bt, h, n, d), generator=gen, dtype=torch.uint8)
    if pos is None:
        pos = (torch.tensor(blocks)[:, None] * B + torch.arange(B)).reshape(-1)
    return Part(QUANT, pack_groups(codes, groups), pack(vcodes, container),
                k_scale=(torch.rand(bt, h, n // B, r, generator=gen) * 0.3 + 0.05).to(scale_dtype),
                k_zero=(torch.randn(bt, h, n // B, r, generator=gen) * 0.5).to(scale_dtype),
                v_scale=(torch.rand(bt, h, n, d // value_group, generator=gen) * 0.2 + 0.05).to(scale_dtype),
                v_zero=(torch.randn(bt, h, n, d // value_group, generator=gen) * 0.3).to(scale_dtype),
                container=container, key_block=B, value_group=value_group, rotated=rotated,
                basis=torch.randn(h, r, d, generator=gen) / math.sqrt(r), key_groups=tuple(groups),
                inv_freq=_inv_freq(d), pos=pos.to(torch.int32))


def _plain_quant_part(gen, *, bt=2, h=3, d=64, n=32, B=16, container=4, rotated=True) -> Part:
    """A quantised part (keys per channel per block of B, values per token in groups of 16) from random codes."""
    def codes():
        return pack(torch.randint(0, 2 ** container, (bt, h, n, d), generator=gen, dtype=torch.uint8), container)
    return Part(QUANT, codes(), codes(), k_scale=(torch.rand(bt, h, n // B, d, generator=gen) * 0.2).half(),
                k_zero=(torch.randn(bt, h, n // B, d, generator=gen) * 0.3).half(),
                v_scale=(torch.rand(bt, h, n, d // 16, generator=gen) * 0.2).half(),
                v_zero=(torch.randn(bt, h, n, d // 16, generator=gen) * 0.3).half(),
                container=container, key_block=B, value_group=16, rotated=rotated)


def _dense_part(gen, *, bt=2, h=3, d=64, n=24, bias=False) -> Part:
    return Part(DENSE, torch.randn(bt, h, n, d, generator=gen).half(), torch.randn(bt, h, n, d, generator=gen).half(),
                bias=torch.rand(n, generator=gen) * 2 if bias else None)


def _basis_layer(seed, *, bt=2, h=3, d=64, B=16, r=40, container=3, rotated=False, groups=None, **kw):
    """A layer's parts in attention order: dense (full), a plain quantised part (rotated as asked), two basis
    parts (keys of r coefficients, one at blocks 0, 3, 5 and one at 7, 8), dense markers with a bias, dense hot."""
    gen = torch.Generator().manual_seed(seed)
    groups = groups or ((container, r),)
    return [_dense_part(gen, bt=bt, h=h, d=d, n=2 * B),
            _plain_quant_part(gen, bt=bt, h=h, d=d, B=B, n=2 * B, rotated=rotated),
            _basis_part(gen, bt=bt, h=h, d=d, B=B, groups=groups, container=container, rotated=rotated, **kw),
            _basis_part(gen, bt=bt, h=h, d=d, B=B, blocks=(7, 8), groups=groups, container=container,
                        rotated=rotated, **kw),
            _dense_part(gen, bt=bt, h=h, d=d, n=2, bias=True),
            _dense_part(gen, bt=bt, h=h, d=d, n=5)]


def _check_against_both(qg, parts, softcap=None):
    """kernel == the PyTorch path (agacc.decode._decode_parts) and == softmax attention written out over
    ``quant.dequantize_part`` (``_capped_reference``); -> the kernel's (out, mass)."""
    out, mass = cpu.decode_layer(qg, parts, softcap=softcap)
    for ref_out, ref_mass in (_decode_parts(qg, parts, None, softcap=softcap), _capped_reference(qg, parts, softcap)):
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mass, ref_mass, rtol=1e-4, atol=1e-7)
    assert abs(float(mass.sum()) - 1) < 1e-5
    return out, mass


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("rotated", [False, True])
@pytest.mark.parametrize("container", [2, 3, 4])
@pytest.mark.parametrize("r", [24, 40, 48])
def test_kernel_basis_parts_equal_both_references(r, container, rotated, softcap):
    """Keys of r coefficients in one group of ``container`` bits, among dense, plain quantised and biased
    parts, two batch rows (the head is bh % H): == the PyTorch path and the dense reference. Rotated, the
    basis part's values are of V H while its keys meet the query as it is, the plain part's keys the
    rotated one; capped, the logits are larger so the cap matters."""
    parts = _basis_layer(r * 10 + container, r=r, container=container, rotated=rotated)
    assert sum(p.basis is not None for p in parts) == 2 and parts[2].k.shape[-1] == r * container // 8
    qg = torch.randn(2, 3, 3, 64, generator=torch.Generator().manual_seed(r)) * (0.5 if softcap else 0.15)
    out, mass = _check_against_both(qg, parts, softcap)
    if softcap:
        free_out, _ = cpu.decode_layer(qg, parts)
        assert (out - free_out).abs().max() > 0.05


@pytest.mark.parametrize("groups", [((8, 3), (4, 14), (3, 24), (2, 12)), ((4, 4), (3, 8), (2, 8)), ((2, 64),)])
def test_kernel_basis_key_groups_and_scale_dtypes(groups):
    """Coefficients in groups of mixed widths as ``policy.basis_layouts`` makes them (counts not multiples
    of 8: the scalar unpacking), up to r = D; scales fp32 and bf16 as well as fp16."""
    for i, dtype in enumerate((torch.float16, torch.float32, torch.bfloat16)):
        parts = _basis_layer(i, groups=groups, rotated=i == 1, scale_dtype=dtype)
        _check_against_both(torch.randn(2, 3, 3, 64, generator=torch.Generator().manual_seed(i)) * 0.2, parts)


@pytest.mark.parametrize("d,B,g", [(40, 5, 12), (48, 16, 2), (96, 16, 1), (128, 3, 8)])
def test_kernel_basis_head_dims_blocks_and_groups(d, B, g):
    """Head dims 40 and 48 (a rebuilt key's last 8 or 16 channels after runs of 32: each vector width of
    the rebuild), 96, 128; blocks of 5 and 3 tokens (the one-token tail of the rebuild); 12 queries per KV
    head (the generic loops)."""
    parts = _basis_layer(d, d=d, B=B, r=24, container=3, rotated=True, value_group=8)
    qg = torch.randn(2, 3, g, d, generator=torch.Generator().manual_seed(d)) * 0.2
    _check_against_both(qg, parts, softcap=None)
    _check_against_both(qg * 2, parts, softcap=1.5)


def test_kernel_basis_reads_the_positions():
    """The same codes at other positions (one block moved, and all at position 0: no turn at all) give
    other answers, each matched by the references: a kernel that ignored ``pos`` (or read it per block,
    or from the wrong part) would fail one of them."""
    gen = torch.Generator().manual_seed(3)
    base = _basis_part(gen, groups=((3, 40),))
    qg = torch.randn(2, 3, 3, 64, generator=gen) * 0.3
    dense = _dense_part(gen)
    outs = []
    for pos in (base.pos, base.pos + 16 * (base.pos >= 80), torch.zeros_like(base.pos),
                base.pos.flip(0)):
        part = Part(**{**base.__dict__, "pos": pos.to(torch.int32)})
        out, mass = _check_against_both(qg, [dense, part])
        outs.append((out, mass))
    for out, mass in outs[1:]:
        assert (out - outs[0][0]).abs().max() > 1e-2 and (mass - outs[0][1]).abs().max() > 1e-3


def test_kernel_basis_hand_worked_turn():
    """D = 8, r = 8, axes = identity, one KV head, blocks of one token: token t's only coefficient is c_0 = 1
    (code 1, scale 1, zero 0), so its key is e_0 turned by pos_t * inv_freq[0] = 0.5 pos_t:
    cos(0.5 p) e_0 + sin(0.5 p) e_4 (format.frame: a cos - b sin, b cos + a sin). Query 4 e_4 -> logits
    4 sin(0.5 p) = 0 and 4 sin(3.5) = -1.403 at positions 0 and 7; values e_0 and e_1 (8-bit codes 1,
    scale 1) make the output the two probabilities."""
    d, n = 8, 2
    codes = torch.zeros(1, 1, n, d, dtype=torch.uint8)
    codes[..., 0] = 1
    vcodes = torch.zeros(1, 1, n, d, dtype=torch.uint8)
    vcodes[0, 0, 0, 0] = vcodes[0, 0, 1, 1] = 1
    ones, zeros = torch.ones(1, 1, n, d).half(), torch.zeros(1, 1, n, d).half()
    part = Part(QUANT, codes, vcodes, k_scale=ones, k_zero=zeros, v_scale=ones[..., :1], v_zero=zeros[..., :1],
                container=8, key_block=1, value_group=d, basis=torch.eye(d)[None], key_groups=((8, d),),
                inv_freq=torch.tensor([0.5, 0.0, 0.0, 0.0]), pos=torch.tensor([0, 7], dtype=torch.int32))
    q = torch.zeros(1, 1, 1, d)
    q[..., 4] = 4
    p = torch.softmax(torch.tensor([0.0, 4 * math.sin(3.5)]), 0)
    out, mass = cpu.decode_layer(q, [part])
    torch.testing.assert_close(mass, p)
    torch.testing.assert_close(out[0, 0, 0, :2], p)
    assert out[0, 0, 0, 2:].abs().max() == 0


@pytest.mark.parametrize("rotate", [True, False])
def test_kernel_basis_store_through_decode_attention(monkeypatch, rotate):
    """A store with key_quant="basis" (every kind of part; the 4/3/2-bit blocks' keys in a random basis,
    mixed-width groups): decode_attention on the "cpp" backend runs the kernel (no fallback, no warning)
    and == the "torch" backend."""
    store = _store("basis", 16, rotate, bt=2)
    assert sum(p.basis is not None for p in store.parts()) == 3
    calls = []
    real = cpu.decode_layer
    monkeypatch.setattr(cpu, "decode_layer", lambda *a, **k: calls.append(1) or real(*a, **k))
    q = torch.randn(2, 9, 1, 64, generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(kernels, "_warned", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, mass, ref_out, ref_mass = _with_and_without_kernel(monkeypatch, q, store)
    assert calls == [1]
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mass, ref_mass, rtol=1e-4, atol=1e-7)


def test_kernel_basis_bad_inputs():
    """Basis tensors of the wrong shape or dtype are refused with a message, not read past their end."""
    gen = torch.Generator().manual_seed(5)
    part = _basis_part(gen, groups=((3, 40),))
    qg = torch.randn(2, 3, 3, 64, generator=gen)
    for bad in ({"pos": part.pos[:-1]}, {"basis": part.basis[:, :-1]}, {"inv_freq": part.inv_freq[:-1]},
                {"key_groups": ((3, 32),)}, {"key_groups": ((5, 40),)}):
        with pytest.raises(RuntimeError):
            cpu.decode_layer(qg, [Part(**{**part.__dict__, **bad})])
    with pytest.raises(ValueError):
        cpu.decode_layer(qg, [Part(**{**part.__dict__, "key_groups": ((2, 8),) * 5})])
