"""Triton kernels (run by the interpreter on CPU, TRITON_INTERPRET=1 from conftest.py) against their
PyTorch references in ``agacc``: quantise/pack, unpack/dequantise, fused decode attention over
``store.parts()``, and the one backend choice (``kernels.backend``) as the library uses it.

Interpreter time grows with grid size x tiles, so shapes are small but chosen to hit the edges:
odd lengths, splits that are not multiples of the tile, GQA g in {1, 3, 4}, head dims 64/128,
batch 1/2, every container and several code widths, empty segments."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from agacc import quant as Q  # noqa: E402
from agacc.attention import attend, cap_logits  # noqa: E402
from agacc.config import AGACCConfig  # noqa: E402
from agacc.store import LayerStore  # noqa: E402
from agacc.tiers import EVICTED, FULL, INT2, INT3, INT4, INT8, PRUNED  # noqa: E402
import kernels  # noqa: E402
from agacc import decode, store as S  # noqa: E402
from kernels import quantize as KQ  # noqa: E402
from kernels.triton_decode import decode_parts  # noqa: E402


def triton_decode(query, store, scaling, **kw):
    """The Triton kernel over the store's parts."""
    return decode_parts(query, store.parts(), scaling, **kw)


# ------------------------------------------------------------------------------------------------
# quantise + pack, unpack + dequantise
# ------------------------------------------------------------------------------------------------

def _codes(packed, bits):
    return Q.unpack(packed, Q.container_bits(bits)).int()


def _check_quant(got, ref, bits, method):
    """Codes equal (meanstd: a rare +-1 where a different fp32 sum order moves a rounding tie);
    scale/zero equal (meanstd: within one fp16 ulp)."""
    (gp, gs, gz), (rp, rs, rz) = got, ref
    assert gp.dtype == torch.uint8 and gp.shape == rp.shape
    assert gs.dtype == Q.SCALE_DTYPE and gs.shape == rs.shape and gz.shape == rz.shape
    diff = (_codes(gp, bits) - _codes(rp, bits)).abs()
    if method != "meanstd":
        assert torch.equal(gp, rp), f"{int((diff > 0).sum())} codes differ"
        assert torch.equal(gs, rs) and torch.equal(gz, rz)
    else:
        assert int(diff.max()) <= 1
        assert float((diff > 0).float().mean()) <= 1e-3, "off-by-one codes must be rare"
        torch.testing.assert_close(gs.float(), rs.float(), rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(gz.float(), rz.float(), rtol=1e-3, atol=2e-3 * rs.float().abs().max().item())


def _data(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 1.5 + 0.25
    x[..., 3] *= 6  # an outlier channel, as keys have
    return x.to(dtype)


ALL_BITS = {"minmax": (1, 2, 3, 4, 5, 8), "meanstd": (2, 3, 4, 6, 8), "nested": (2, 3, 4, 8)}


@pytest.mark.parametrize("method", ["minmax", "meanstd", "nested"])
@pytest.mark.parametrize("shape,block", [((2, 2, 48, 64), 16), ((1, 1, 64, 128), 32)])
def test_quantize_keys_matches_reference(method, shape, block):
    k = _data(shape, 1)
    for bits in ALL_BITS[method]:
        got = KQ.quantize_keys(k, bits, block, method)
        ref = Q.quantize_keys(k, bits, block, method)
        _check_quant(got, ref, bits, method)
        deq = KQ.dequantize_keys(*got, bits, block)
        torch.testing.assert_close(deq, Q.dequantize_keys(*got, bits, block), rtol=1e-6, atol=1e-6)
        # error bound: |x - x~| <= scale/2 (meanstd: inside s standard deviations, where it does not clip)
        scale = got[1].float().repeat_interleave(block, dim=2)
        err = (deq - k).abs()
        if method == "meanstd":
            blocks = k.reshape(*shape[:2], -1, block, shape[3])
            mu, sd = blocks.mean(3, keepdim=True), blocks.std(3, keepdim=True, unbiased=False)
            inside = ((blocks - mu).abs() <= 2.5 * sd).reshape(shape)
            err = err[inside]
            scale = scale[inside]
        assert bool((err <= scale / 2 + 1e-5 * (1 + k.abs().max())).all())


@pytest.mark.parametrize("method", ["minmax", "meanstd", "nested"])
@pytest.mark.parametrize("shape,group", [((2, 2, 37, 64), 32), ((1, 2, 5, 128), 64), ((1, 1, 9, 64), 128),
                                         ((1, 1, 7, 96), 64)])
def test_quantize_values_matches_reference(method, shape, group):
    v = _data(shape, 2)
    for bits in ALL_BITS[method]:
        got = KQ.quantize_values(v, bits, group, method)
        ref = Q.quantize_values(v, bits, group, method)
        _check_quant(got, ref, bits, method)
        deq = KQ.dequantize_values(*got, bits)
        torch.testing.assert_close(deq, Q.dequantize_values(*got, bits), rtol=1e-6, atol=1e-6)
        if method != "meanstd":
            g = Q.value_group(shape[3], group)
            scale = got[1].float().repeat_interleave(g, dim=3)
            assert bool(((deq - v).abs() <= scale / 2 + 1e-5).all())


def test_quantize_rounds_ties_to_even_like_torch():
    # one block per channel with min 0, max 3 at 2 bits -> scale 1, zero 0: x = j/2 hits every tie
    col = torch.tensor([0.0, 3.0, 0.5, 1.5, 2.5, 1.0, 2.0, 0.5] * 2)
    k = col[None, None, :, None].repeat(1, 1, 1, 8)
    got, ref = KQ.quantize_keys(k, 2, 16), Q.quantize_keys(k, 2, 16)
    assert torch.equal(got[0], ref[0])
    assert _codes(got[0], 2)[0, 0, :8, 0].tolist() == [0, 3, 0, 2, 2, 1, 2, 0]
    v = k.transpose(2, 3).contiguous()  # the same ties along a value group
    assert torch.equal(KQ.quantize_values(v, 2, 16)[0], Q.quantize_values(v, 2, 16)[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantize_half_inputs_and_strided_views(dtype):
    base = _data((1, 2, 80, 64), 3, dtype)
    k = base[:, :, 16:]  # a slice along tokens: not contiguous, rows still contiguous
    assert not k.is_contiguous()
    _check_quant(KQ.quantize_keys(k, 4, 16), Q.quantize_keys(k, 4, 16), 4, "minmax")
    _check_quant(KQ.quantize_values(k, 2, 32), Q.quantize_values(k, 2, 32), 2, "minmax")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_to_half(dtype):
    k = _data((1, 2, 32, 64), 4)
    pk = Q.quantize_keys(k, 4, 16)
    pv = Q.quantize_values(k, 8, 32)
    # kernel: one rounding of the fp32 result; reference: dtype arithmetic -> within one ulp
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-3, atol=1e-3)
    got = KQ.dequantize_keys(*pk, 4, 16, dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), Q.dequantize_keys(*pk, 4, 16, torch.float32), **tol)
    torch.testing.assert_close(KQ.dequantize_values(*pv, 8, dtype).float(), Q.dequantize_values(*pv, 8), **tol)


# ------------------------------------------------------------------------------------------------
# fused decode attention over a LayerStore
# ------------------------------------------------------------------------------------------------

def make_store(bt, h, d, n, tiers=(), bits=None, keep=None, dtype=torch.float32, seed=0, **cfg_kw):
    """A LayerStore of ``n`` random tokens whose first ``len(tiers)`` blocks get the given tiers."""
    cfg = AGACCConfig(**{"block_size": 16, "recent_window": 16, "value_group_size": 32, "b_min": 2, **cfg_kw})
    store = LayerStore(cfg, torch.device("cpu"), dtype)
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(bt, h, n, d, generator=gen) * 1.5
    v = torch.randn(bt, h, n, d, generator=gen)
    store.append(k[:, :, : n - 3], v[:, :, : n - 3])
    store.append(k[:, :, n - 3:], v[:, :, n - 3:])  # two appends: the hot region is a view
    nb = len(tiers)
    assert nb <= store.n_ready_blocks()
    if nb:
        bits = bits or [8] * nb
        keep = keep or [d] * nb
        store.apply_tiers(torch.tensor(tiers), torch.tensor(bits), torch.tensor(keep),
                          torch.rand(n, generator=gen))
    return store


def check_decode(store, g, qdtype=torch.float32, seed=1, softcap=None, qscale=1.0, **kw):
    """Triton decode vs ``attend`` over the same store (fp32 reference) -> (out, mass); ``softcap``:
    logit softcapping in both, ``qscale`` scales the query (logits of several units for a cap to bite)."""
    bt, h, _, d = (store.hot_k if store.hot_k is not None else store.markers.k).shape
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(bt, h * g, 1, d, generator=gen) * qscale).to(qdtype)
    scaling = d ** -0.5
    out, mass = triton_decode(q, store, scaling, softcap=softcap, **kw)
    ref_out, ref_mass = attend(q.float(), store.attention_entries(torch.float32), scaling, softcap=softcap)
    assert out.shape == (bt, 1, h * g, d) and out.dtype == qdtype
    assert mass.shape == (store.n_entries,) and mass.dtype == torch.float32
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[qdtype]
    torch.testing.assert_close(out.float(), ref_out, rtol=0, atol=tol)
    torch.testing.assert_close(mass, ref_mass, rtol=1e-4, atol=1e-6)
    assert abs(float(mass.sum()) - 1.0) < 1e-5
    return out, mass


MIX = dict(
    tiers=[FULL, INT8, INT4, INT2, PRUNED, EVICTED, EVICTED, INT3, PRUNED, INT2, INT8],
    bits=[8, 8, 4, 2, 2, 2, 2, 3, 2, 1, 5],
    keep=[64, 64, 64, 64, 16, 64, 64, 64, 24, 64, 64],
)


@pytest.mark.parametrize("key_quant,rotate", [("token", True), ("channel", False), ("channel", True), ("token", False)])
def test_decode_every_tier_gqa3_batch2(key_quant, rotate):
    """full, int8 (8/5-bit), int4, int3, int2 (2/1-bit), two sparse segments (keep 16, 24),
    a marker with its log-count bias, an odd hot region; split 40 is not a multiple of the tile.
    Keys per token (groups of 16) or per channel, quantised slots rotated or not."""
    store = make_store(2, 2, 64, 16 * 11 + 16 + 5, key_quant=key_quant, key_group_size=16, rotate=rotate, **MIX)
    assert {s.keep for s in store.sparse.values()} == {16, 24} and store.markers.n == 1
    out, mass = check_decode(store, g=3, split=40, block_n=16)
    # one split per segment, tile 8, and the [g, BLOCK_N, D] product instead of per-head loops
    out2, mass2 = triton_decode(_query(store, 3), store, 64 ** -0.5, split=512, block_n=8, per_head=False)
    torch.testing.assert_close(out2, out, rtol=0, atol=1e-5)
    torch.testing.assert_close(mass2, mass, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("key_quant,rotate", [("token", True), ("channel", False)])
def test_decode_tensor_core_form_every_tier(key_quant, rotate):
    """``dot=True`` (scores and values as ``tl.dot``, g padded to 16 rows): the same store as above
    against ``attend``, at its default tile and at 16 entries, with a split that cuts tiles; a key
    block under 16 entries is refused by name."""
    store = make_store(2, 2, 64, 16 * 11 + 16 + 5, key_quant=key_quant, key_group_size=16, rotate=rotate, **MIX)
    check_decode(store, g=3, split=40, dot=True)
    check_decode(store, g=3, block_n=16, dot=True)
    small = make_store(1, 2, 64, 8 * 4 + 16 + 3, block_size=8, tiers=[INT4, INT2, FULL, INT8], bits=[4, 2, 8, 8])
    with pytest.raises(ValueError, match="dot=True.*key block is 8"):
        triton_decode(_query(small, 2), small, 0.125, dot=True)


def _query(store, g, seed=1):
    bt, h, _, d = store.hot_k.shape
    return torch.randn(bt, h * g, 1, d, generator=torch.Generator().manual_seed(seed))


def _ref_lse(q, entries, scaling, softcap=None):
    """The log-sum-exp [Bt, Hq] of ``attend``'s logits for a one-step query: scaled, capped, plus bias."""
    bt, hq, _, d = q.shape
    k = torch.cat([e.k.float() for e in entries], 2)
    h = k.shape[1]
    s = cap_logits(torch.einsum("bhgd,bhnd->bhgn", q.float().reshape(bt, h, hq // h, d), k) * scaling, softcap)
    bias = torch.cat([e.bias.float() if e.bias is not None else torch.zeros(e.k.shape[2]) for e in entries])
    return (s + bias).logsumexp(-1).reshape(bt, hq)


# the cap is a runtime argument (one compiled variant for both values): each value meets two of the four key layouts
@pytest.mark.parametrize("key_quant,rotate,softcap", [("token", True, 0.5), ("channel", False, 0.5),
                                                      ("channel", True, 2.0), ("token", False, 2.0)])
def test_decode_softcap_every_tier(key_quant, rotate, softcap):
    """Logit softcapping (Gemma2's ``attn_logit_softcapping``: c * tanh(z / c) on the scaled logits z,
    then the markers' log-count bias) over every part kind: full, int8/4/3/2 with keys per token or per
    channel, rotated or not, two sparse parts, a marker, hot. Out and mass against ``attend(softcap=c)``
    at the uncapped test's tolerances (per-head loops and the [g, N, D] product), and the returned lse
    against the capped logits'; the uncapped answer is far off, so each comparison can fail."""
    store = make_store(2, 2, 64, 16 * 11 + 16 + 5, key_quant=key_quant, key_group_size=16, rotate=rotate, **MIX)
    assert store.sparse and store.markers.n == 1
    out, mass = check_decode(store, g=3, split=40, block_n=16, softcap=softcap, qscale=4.0)
    q = _query(store, 3) * 4.0  # check_decode's query
    entries = store.attention_entries(torch.float32)
    free_out, free_mass = attend(q, entries, 0.125)
    assert (free_out - out).abs().max() > 0.1 and (free_mass - mass).abs().max() > 0.01
    out2, mass2, lse = triton_decode(q, store, 0.125, split=512, block_n=8, per_head=False, softcap=softcap,
                                     return_lse=True)
    torch.testing.assert_close(out2, out, rtol=0, atol=1e-5)
    torch.testing.assert_close(mass2, mass, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(lse, _ref_lse(q, entries, 0.125, softcap), rtol=1e-5, atol=1e-5)
    assert (lse - _ref_lse(q, entries, 0.125)).abs().min() > 0.1


@pytest.mark.parametrize("key_quant,rotate,softcap", [("token", True, 0.5), ("channel", False, 2.0)])
def test_decode_tensor_core_form_softcap(key_quant, rotate, softcap):
    """``dot=True`` with logit softcapping: every part kind against ``attend(softcap=c)``, and the lse."""
    store = make_store(2, 2, 64, 16 * 11 + 16 + 5, key_quant=key_quant, key_group_size=16, rotate=rotate, **MIX)
    out, mass = check_decode(store, g=3, split=40, dot=True, softcap=softcap, qscale=4.0)
    q = _query(store, 3) * 4.0
    entries = store.attention_entries(torch.float32)
    assert (attend(q, entries, 0.125)[0] - out).abs().max() > 0.1
    _, _, lse = triton_decode(q, store, 0.125, dot=True, softcap=softcap, return_lse=True)
    torch.testing.assert_close(lse, _ref_lse(q, entries, 0.125, softcap), rtol=1e-5, atol=1e-5)


def test_decode_fp16_store_head128_gqa4_sparse_8bit():
    """fp16 store and query, D = 128, g = 4; b_min = 8 puts sparse codes in 8-bit containers."""
    store = make_store(1, 2, 128, 16 * 7 + 16 + 9, tiers=[INT4, PRUNED, EVICTED, INT2, FULL, INT8, PRUNED],
                       bits=[4, 8, 8, 2, 8, 8, 8], keep=[128, 32, 128, 128, 128, 128, 128],
                       dtype=torch.float16, b_min=8, b_max=8, value_group_size=64)
    assert store.sparse and store.quant[8].n_blocks == 2  # keep 128 at b_min 8: dense int8
    check_decode(store, g=4, qdtype=torch.float16)


def test_decode_mha_head128_quant_only():
    """g = 1, batch 2, only quantised segments + hot: no full segment, no markers, no sparse."""
    store = make_store(2, 2, 128, 16 * 4 + 16 + 1, tiers=[INT8, INT4, INT2, INT3], bits=[7, 4, 2, 3])
    assert store.full.n_blocks == 0 and store.markers.n == 0 and not store.sparse
    check_decode(store, g=1, split=32, block_n=16)


def test_decode_head96_group24_padding_paths():
    """D = 96 (padded to 128 in registers) and value groups of 24 channels (the gather path for a
    group size that is not a power of two, for keys and values); keep 32 of 96 stays sparse; the
    rotation works on runs of 32 channels."""
    store = make_store(1, 2, 96, 16 * 4 + 16 + 3, tiers=[INT4, PRUNED, INT2, INT3], bits=[4, 2, 2, 3],
                       keep=[96, 32, 96, 96], value_group_size=24, key_quant="token", key_group_size=24)
    assert store.quant[4].v_scale.shape[-1] == 4 and store.quant[4].k_scale.shape[-1] == 4 and store.sparse
    check_decode(store, g=2)


def test_decode_three_bit_planes_dense_and_sparse():
    """b_min = 3: int3 blocks, a dense pruned block in the 3-bit container and a sparse one whose kept
    codes are 3-bit planes; g = 3, split not a multiple of the tile."""
    store = make_store(1, 2, 64, 16 * 5 + 16 + 4, tiers=[INT3, PRUNED, PRUNED, INT4, INT3],
                       bits=[3, 3, 3, 4, 3], keep=[64, 56, 16, 64, 64], b_min=3, b_max=4)
    assert store.quant[3].n_blocks == 3 and [s.keep for s in store.sparse.values()] == [16]
    assert next(iter(store.sparse.values())).k.shape[-1] == 16 * 3 // 8
    check_decode(store, g=3, split=24, block_n=8)


def test_decode_only_hot():
    store = make_store(2, 1, 64, 13)
    assert store.n_blocks == 0
    check_decode(store, g=4, block_n=8)
    # the log-sum-exp the mass is normalised with
    q = _query(store, 4)
    _, _, lse = triton_decode(q, store, 0.125, return_lse=True)
    ref = (torch.einsum("bhgd,bhnd->bhgn", q.reshape(2, 1, 4, 64), store.hot_k) * 0.125).logsumexp(-1)
    torch.testing.assert_close(lse, ref.reshape(2, 4), rtol=1e-5, atol=1e-5)


def test_decode_empty_hot_region():
    """recent_window 0 and a whole number of blocks: every token tiered, the hot region is empty."""
    store = make_store(1, 2, 64, 16 * 3, tiers=[INT4, EVICTED, INT8], bits=[4, 4, 8], recent_window=0)
    assert store.hot_k.shape[2] == 0 and store.n_entries == 16 + 16 + 1
    check_decode(store, g=4)


def test_decode_full_and_markers_no_quant():
    """full + two separate marker runs + hot, g = 3."""
    store = make_store(1, 2, 64, 16 * 6 + 16 + 7, tiers=[FULL, EVICTED, EVICTED, FULL, EVICTED, FULL])
    assert store.markers.n == 2 and not any(s.n_blocks for s in store.quant.values())
    check_decode(store, g=3, split=16, block_n=8)


def test_decode_evicted_without_markers():
    store = make_store(1, 2, 64, 16 * 3 + 16 + 2, tiers=[EVICTED, INT4, EVICTED], bits=[4, 4, 4], markers=False)
    assert store.markers.n == 0 and store.n_entries == 16 + 16 + 2
    check_decode(store, g=4)


def test_decode_meanstd_bf16_sparse_4bit():
    """bf16 store and query, the seed's mean/std quantiser, b_min = 4 (sparse 4-bit containers)."""
    store = make_store(1, 2, 64, 16 * 6 + 16 + 5, tiers=[INT8, PRUNED, INT2, EVICTED, PRUNED, INT4],
                       bits=[6, 4, 2, 4, 4, 4], keep=[64, 16, 64, 64, 48, 64],
                       dtype=torch.bfloat16, quantizer="meanstd", b_min=4)
    assert sorted(s.keep for s in store.sparse.values()) == [16, 48]
    check_decode(store, g=3, qdtype=torch.bfloat16, split=24, block_n=8)


def test_decode_reads_the_packed_bytes():
    """The kernel must read the store, not a stale copy: flipping a code changes out and mass."""
    store = make_store(1, 1, 64, 16 * 2 + 16 + 1, tiers=[INT4, FULL], bits=[4, 8])
    q = _query(store, 2)
    out1, mass1 = triton_decode(q, store, 0.125)
    seg = store.quant[4]
    seg.k[0, 0, 5] ^= 0xFF  # entry 16 + 5 in attention order (full comes first)
    seg.v[0, 0, 5] ^= 0xFF
    out2, mass2 = triton_decode(q, store, 0.125)
    assert int((mass2 - mass1).abs().argmax()) == 16 + 5
    assert (out2 - out1).abs().max() > 1e-4
    check_decode(store, g=2)


# ------------------------------------------------------------------------------------------------
# the backend choice, as the library uses it (agacc.decode.decode_attention, agacc.store's quantisers)
# ------------------------------------------------------------------------------------------------

def test_backend_choice(monkeypatch):
    monkeypatch.delenv(kernels.FORCE_TRITON_ENV, raising=False)
    monkeypatch.setenv("AGACC_CPU_KERNEL", "0")
    assert kernels.backend("cpu") == "torch" and kernels.backend(torch.device("cpu")) == "torch"
    monkeypatch.setenv(kernels.FORCE_TRITON_ENV, "1")
    assert kernels.backend("cpu") == "triton"


def test_torch_backend_runs_the_packed_path_and_the_reference_quantisers(monkeypatch):
    monkeypatch.delenv(kernels.FORCE_TRITON_ENV, raising=False)
    monkeypatch.setenv("AGACC_CPU_KERNEL", "0")
    assert S._quant_ops(torch.device("cpu")) is Q
    store = make_store(1, 2, 64, 16 * 2 + 16 + 3, tiers=[INT4, EVICTED], bits=[4, 4])
    q = _query(store, 2)
    out, mass = decode.decode_attention(q, store, 0.125)
    ref_out, ref_mass = attend(q, store.attention_entries(q.dtype), 0.125)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(mass, ref_mass, rtol=1e-5, atol=1e-7)


def test_forced_triton_quantises_and_decodes_with_the_kernels(monkeypatch):
    import kernels.quantize as kq
    import kernels.triton_decode as kd

    calls = []
    monkeypatch.setenv(kernels.FORCE_TRITON_ENV, "1")
    monkeypatch.setattr(kd, "decode_parts", lambda *a, **k: calls.append("attn") or decode_parts(*a, **k))
    orig_qk = kq.quantize_keys
    monkeypatch.setattr(kq, "quantize_keys", lambda *a, **k: calls.append("qk") or orig_qk(*a, **k))
    assert S._quant_ops(torch.device("cpu")) is kq
    store = make_store(1, 2, 64, 16 * 2 + 16 + 3, tiers=[INT2, EVICTED], bits=[2, 2])
    q = _query(store, 3)
    out, mass = decode.decode_attention(q, store, 0.125)
    assert calls == ["qk", "attn"]
    ref_out, ref_mass = attend(q, store.attention_entries(q.dtype), 0.125)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-4)
    torch.testing.assert_close(mass, ref_mass, rtol=1e-4, atol=1e-6)
    # with a mask the PyTorch path runs, whatever the backend
    mask = torch.ones(1, 1, 1, store.n_entries, dtype=torch.bool)
    out_m, mass_m = decode.decode_attention(q, store, 0.125, mask)
    assert calls == ["qk", "attn"]
    torch.testing.assert_close(out_m, ref_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(mass_m, ref_mass, rtol=1e-5, atol=1e-7)


def test_decode_rejects_multi_query():
    store = make_store(1, 1, 64, 5)
    with pytest.raises(ValueError):
        decode.decode_attention(torch.randn(1, 1, 2, 64), store, 0.125)
    with pytest.raises(ValueError):
        decode_parts(torch.randn(1, 1, 2, 64), store.parts(), 0.125)


def _spy_launch_keys(monkeypatch, kernels_of):
    """Replace the kernels ``kernels_of`` ({module: names}) with spies that record, per (module, kernel,
    launch constexprs and options), the specialisation key Triton computes for the runtime arguments
    (``native_specialize_impl``, as its launcher does, honouring ``do_not_specialize``); -> that dict."""
    import collections
    import inspect

    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    keys = collections.defaultdict(set)

    def spy(mod, name):
        k = getattr(mod, name)
        args_of = [n for n, p in inspect.signature(k.fn).parameters.items() if "constexpr" not in str(p.annotation)]
        fixed = k.kwargs.get("do_not_specialize") or ()

        class Spy:
            def __getitem__(self, grid):
                def run(*args, **meta):
                    assert len(args) == len(args_of), (name, len(args), len(args_of))
                    keys[(mod.__name__, name, tuple(sorted(meta.items())))].add(tuple(
                        native_specialize_impl(BaseBackend, a, False, n not in fixed, True) for n, a in zip(args_of, args)))
                    return k[grid](*args, **meta)
                return run
        monkeypatch.setattr(mod, name, Spy())

    for mod, names in kernels_of.items():
        for name in names:
            spy(mod, name)
    return keys


def test_softcap_is_a_runtime_value(monkeypatch):
    """The cap is a runtime fp32 argument, not specialised (in each kernel's ``do_not_specialize``), behind
    one constexpr SOFTCAP: decode and chunk launches with caps 1.0 and 3.0 (and none) make one
    specialisation key per constexpr set, SOFTCAP True and False; the value reaches the kernel."""
    import inspect

    import kernels.triton_chunk as kc
    import kernels.triton_decode as kd

    for k in (kd._partial_kernel, kd._sparse_partial_kernel, kc._chunk_kernel, kc._mass_kernel):
        params = inspect.signature(k.fn).parameters
        assert "softcap" in k.kwargs["do_not_specialize"] and "constexpr" not in str(params["softcap"].annotation)
        assert "constexpr" in str(params["SOFTCAP"].annotation)
    keys = _spy_launch_keys(monkeypatch, {kd: ("_partial_kernel", "_sparse_partial_kernel", "_combine_kernel",
                                               "_mass_kernel"), kc: ("_chunk_kernel", "_mass_kernel")})
    store = make_store(1, 2, 64, 16 * 3 + 16 + 3, tiers=[PRUNED, INT4, EVICTED], bits=[2, 4, 4], keep=[16, 64, 64])
    q = _query(store, 2) * 4.0
    outs = [kd.decode_parts(q, store.parts(), 0.125, softcap=c) for c in (1.0, 3.0, None)]
    outs += [kc.chunk_parts(q, store.parts(), 0.125, 1, 1, softcap=c) for c in (1.0, 3.0)]
    assert (outs[0][0] - outs[1][0]).abs().max() > 0.01 and (outs[1][0] - outs[2][0]).abs().max() > 0.01
    torch.testing.assert_close(outs[3][0], outs[0][0], rtol=0, atol=1e-5)
    assert {k: len(v) for k, v in keys.items() if len(v) > 1} == {}
    for name in ("_partial_kernel", "_sparse_partial_kernel", "_chunk_kernel"):
        caps = {dict(m)["SOFTCAP"] for _, n, m in keys if n == name}
        assert caps == ({True, False} if name != "_chunk_kernel" else {True}), (name, caps)


_COMPILE_SOFTCAP = """
import triton
from kernels import aot
from kernels import triton_decode as TD

specs = [TD._aot_partial(128, 4, slots=("q4", "mk", "hot"), softcap=True),
         TD._aot_partial(128, 4, slots=("q4", "mk"), dot=True, softcap=True),
         TD._aot_sparse(128, 4, 3, 96, softcap=True)]
for entry in specs:
    assert entry[3]["SOFTCAP"] is True
    spec = aot._normalise("kernels.triton_decode", entry, triton)
    for cc in (90, 80):
        row = aot.compile_spec(spec, cc)
        assert row.ok, (row.variant, cc, row.error)
        print("ok", row.variant, f"sm_{cc}", row.regs, row.spills, flush=True)
"""


def test_decode_softcap_variants_compile_for_sm90_and_sm80():
    """The SOFTCAP=True decode kernels (not in ``aot_specs``: a softcapped model compiles them on first
    use) go through Triton's GPU pipeline and ptxas (``kernels.aot.compile_spec``) for sm_90 and sm_80: the
    main kernel per-head (a quantised slot, the markers' bias, hot) and in the ``dot`` form, the sparse
    kernel. In a subprocess: the GPU compiler needs TRITON_INTERPRET unset."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _COMPILE_SOFTCAP], cwd=root, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("ok ") == 6


def test_a_generation_compiles_each_kernel_once_per_constexpr_set(monkeypatch):
    """Triton specialises an integer argument on "== 1" and "% 16 == 0" unless the kernel says not to,
    so a generation's changing lengths and offsets compile new variants mid-run (the first H200 run:
    18 compiles in 16 decode steps). Over a forced-Triton generation with a chunked prefill, the key
    Triton computes for every launch of the decode and chunk kernels (``native_specialize_impl``, as
    its launcher does) differs only where the constexprs do. Without ``do_not_specialize`` the decode
    kernel has two keys in these 12 steps (``hot_n``, ``n_total``), the chunk kernel two (``q_len``)."""
    import agacc
    import kernels.triton_chunk as kc
    import kernels.triton_decode as kd
    from agacc import CompressedCache
    from agacc.spec import parse_method
    from tests.helpers import tiny_model

    monkeypatch.setenv(kernels.FORCE_TRITON_ENV, "1")
    keys = _spy_launch_keys(monkeypatch, {kd: ("_partial_kernel", "_sparse_partial_kernel", "_combine_kernel",
                                               "_mass_kernel"), kc: ("_chunk_kernel", "_mass_kernel")})
    model = agacc.enable(tiny_model())
    ids = torch.randint(0, model.config.vocab_size, (1, 150), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model.generate(ids, past_key_values=CompressedCache(model.config, parse_method("agacc@4")), max_new_tokens=12,
                       do_sample=False, prefill_chunk_size=64)
    assert {k[1] for k in keys} >= {"_partial_kernel", "_chunk_kernel", "_combine_kernel", "_mass_kernel"}
    assert {k: len(v) for k, v in keys.items() if len(v) > 1} == {}
