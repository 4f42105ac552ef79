"""Keys held in a calibrated basis (``key_quant="basis"``, ``agacc.basis``, ``kernels.format.basis_keys``):
the frame against transformers' RoPE, the layouts, the coefficient codes by hand, the store's reads against a
recomputation from the exact keys, its bytes against the cost model and an independent walk, the table against
an SVD, and the errors a model without a table or without RoPE meets."""
from __future__ import annotations

import math

import pytest
import torch

from agacc import basis, quant
from agacc.config import AGACCConfig
from agacc.planner import Geometry, block_cost_bytes, cost_settings
from agacc.policy import basis_layouts, basis_rank
from agacc.store import LayerStore
from agacc.tiers import FULL, INT2, INT3, INT4
from kernels.format import (axes_reflectors, basis_axes, basis_coeffs, basis_keys, frame, pack, pack_groups,
                            unpack_groups)
from tests.helpers import random_basis, tiny_model, walk_tensor_bytes

INV_FREQ = 10000.0 ** (-torch.arange(0, 16, 2).float() / 16)


def test_frame_is_the_models_rope_and_undoes_it():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = tiny_model()
    x = torch.randn(1, 2, 7, 32)
    pos = torch.tensor([0, 1, 5, 17, 100, 1000, 4000])
    cos, sin = model.model.rotary_emb(x, pos[None])
    want = apply_rotary_pos_emb(x, x, cos, sin)[0]
    inv_freq = basis.rotary_inv_freq(model)
    torch.testing.assert_close(frame(x, pos, inv_freq, 1), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(frame(frame(x, pos, inv_freq, 1), pos, inv_freq, -1), x, rtol=0, atol=1e-5)


def test_layouts_default_scaled_and_whole_bytes():
    cfg = AGACCConfig(key_quant="basis")
    assert basis_layouts(cfg, 64) == (((4, 4), (3, 8), (2, 8)), ((8, 2), (4, 6), (3, 16), (2, 16)),
                                      ((8, 3), (4, 14), (3, 24), (2, 12)))
    assert basis_layouts(cfg, 128)[1] == ((8, 4), (4, 12), (3, 32), (2, 32))
    # head dim 32: halves, each rounded half up to whole bytes of its width (3-bit: 8 codes, 2-bit: 4,
    # 4-bit: 2), the last cut to the head dim (4-bit blocks: 2 + 8 + 16 of 32 leave 6: one 2-bit byte's 4)
    assert basis_layouts(cfg, 32) == (((4, 2), (3, 8), (2, 4)), ((8, 1), (4, 4), (3, 8), (2, 8)),
                                      ((8, 2), (4, 8), (3, 16), (2, 4)))
    assert basis_layouts(AGACCConfig(key_quant="channel"), 64) == ()
    for lay in basis_layouts(AGACCConfig(key_quant="basis", basis_layout=(64, 0, 0, 0) * 3), 32):
        assert lay == ((8, 32),)  # never more coefficients than the head dim
    with pytest.raises(ValueError, match="basis_layout"):
        AGACCConfig(key_quant="basis", basis_layout=(1, 2, 3))


def test_groups_pack_one_after_another():
    groups = ((8, 3), (4, 6), (3, 8), (2, 4))
    codes = torch.cat([torch.randint(0, 1 << w, (2, 5, n), dtype=torch.uint8) for w, n in groups], -1)
    packed = pack_groups(codes, groups)
    assert packed.shape[-1] == 3 + 3 + 3 + 1
    assert torch.equal(packed[..., 3:6], pack(codes[..., 3:9], 4))
    assert torch.equal(packed[..., 9:], pack(codes[..., 17:], 2))
    assert torch.equal(unpack_groups(packed, groups), codes)


def test_coefficients_quantise_per_coefficient_per_block_at_their_width():
    """Each group's coefficients by hand: min-max over a block's B tokens at the group's width."""
    B, groups = 4, ((8, 2), (3, 8), (2, 4))
    c = torch.randn(1, 2, 3 * B, 14) * torch.linspace(3, 0.1, 14)
    packed, scale, zero = quant.quantize_coeffs(c, groups, B)
    part = quant.Part("quant", packed, packed, k_scale=scale, k_zero=zero, key_block=B, key_groups=groups)
    got = quant.dequantize_coeffs(part)
    widths = torch.tensor([8] * 2 + [3] * 8 + [2] * 4)
    blocks = c.reshape(1, 2, 3, B, 14)
    lo, hi = blocks.amin(3, keepdim=True), blocks.amax(3, keepdim=True)
    step = ((hi - lo) / (2.0 ** widths - 1)).half().float()
    want = (torch.round((blocks - lo.half().float()) / step) * step + lo.half().float()).reshape(c.shape)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-2 * float(step.max()))
    assert float((got - c).abs().amax(2)[..., :2].max()) < float((got - c).abs().amax(2)[..., 2:].max())


def test_8bit_metadata_by_hand():
    """One block of 2 tokens: a 4-bit coefficient over [-4, 3.5] needs a step of 0.5 (the block's reference),
    zero -4 = -8 steps, and reads back exactly; an 8-bit one over [0, 2] takes the first step of 2^(-1/16)
    powers below 0.5 that holds 2 / 255; a constant 0.5 takes the step that holds 0.5 in 127 of them.
    Every element is within half a step, and the metadata is 2 bytes a coefficient plus 2 a block."""
    groups = ((8, 1), (4, 2))
    c = torch.tensor([[0.0, -4.0, 0.5], [2.0, 3.5, 0.5]])[None, None]  # [1, 1, 2 tokens, 3]
    packed, k_scale, k_zero = quant.quantize_coeffs(c, groups, 2, meta="8bit")
    assert k_scale.dtype == torch.uint8 and k_scale.shape[-1] == 3 + 2 and k_zero.dtype == torch.int8
    scale, zero = quant.coeff_meta(k_scale, k_zero)
    e = k_scale[0, 0, 0, :3].tolist()
    assert e[1] == 0 and float(scale[0, 0, 0, 1]) == 0.5 and int(k_zero[0, 0, 0, 1]) == -8
    assert e[0] == math.floor(-16 * math.log2((2 / 255) / 0.5))
    assert e[2] == math.floor(-16 * math.log2((0.5 / 127) / 0.5))
    part = quant.Part("quant", packed, packed, k_scale=scale, k_zero=zero, key_block=2, key_groups=groups)
    got = quant.dequantize_coeffs(part)
    assert got[0, 0, :, 1].tolist() == [-4.0, 3.5]
    assert bool(((got - c).abs() <= scale.float() / 2 + 1e-6).all())
    assert 2 / 255 <= float(scale[0, 0, 0, 0]) < 2 / 255 * 2 ** (1 / 16) * 1.001


def test_8bit_metadata_within_half_a_step_on_random_blocks():
    """Any coefficients: the decoded step holds the block's range in its levels and its minimum in 127 steps,
    within one code step (2^(1/16)) of the least that does, and every element reads back within half a step
    (or one, at the top code, where the zero's rounding pushed the maximum past the last level)."""
    B, groups = 4, ((8, 2), (3, 8), (2, 4))
    c = torch.randn(2, 3, 5 * B, 14) * torch.linspace(3, 0.1, 14) + torch.randn(14)
    packed, k_scale, k_zero = quant.quantize_coeffs(c, groups, B, meta="8bit")
    scale, zero = quant.coeff_meta(k_scale, k_zero)
    blocks = c.reshape(2, 3, 5, B, 14)
    lo, hi = blocks.amin(3), blocks.amax(3)
    levels = torch.tensor([255.0] * 2 + [7.0] * 8 + [3.0] * 4)
    need = torch.maximum((hi - lo) / levels, lo.abs() / 127)
    assert bool((scale.float() >= need * (1 - 1e-3)).all())
    assert bool((scale.float() < need * 2 ** (1 / 16) * 1.002).all())
    part = quant.Part("quant", packed, packed, k_scale=scale, k_zero=zero, key_block=B, key_groups=groups)
    err = (quant.dequantize_coeffs(part).reshape(blocks.shape) - blocks).abs()
    assert bool((err <= scale.float().unsqueeze(3) * 1.001).all())
    assert float((err <= scale.float().unsqueeze(3) / 2 * 1.001).float().mean()) > 0.99


def test_store_with_8bit_metadata_reads_what_its_codes_say():
    """A store holding its coefficients' metadata in 8 bits reads each block as the fp16 store would with the
    decoded steps and zeros: the keys near the fp16 store's, its values the same."""
    st, k, _ = _store("basis", basis_meta="8bit")
    ref, _, _ = _store("basis")
    got = {p.container: p for p in st.parts() if p.kind == "quant"}
    want = {p.container: p for p in ref.parts() if p.kind == "quant"}
    for c in (2, 3, 4):
        p = got[c]
        assert p.k_scale.dtype == torch.float16 and p.k_scale.shape == want[c].k_scale.shape  # read as fp16
        kk, vv = quant.dequantize_part(p)
        k_ref, v_ref = quant.dequantize_part(want[c])
        torch.testing.assert_close(vv, v_ref, rtol=0, atol=0)
        exact = k[:, :, p.pos.long()]
        assert float((kk - exact).norm()) < 1.5 * float((k_ref - exact).norm())


def test_full_basis_gives_the_keys_back_at_any_positions():
    """With every axis, read back from their int8 reflectors as a store holds them, a key comes back exactly: the
    axes are orthonormal whatever the codes' rounding, so the pseudo-inverse the store takes is Q * w."""
    w, codes, scales, inv_freq = random_basis(2, 16, torch.Generator().manual_seed(0))
    k = torch.randn(1, 2, 6, 16)
    pos = torch.tensor([3, 4, 5, 40, 41, 900])
    axes = basis_axes(w, codes, scales, 16)
    back = basis_keys(basis_coeffs(k, torch.linalg.pinv(axes), inv_freq, pos), axes, inv_freq, pos)
    torch.testing.assert_close(back, k, rtol=0, atol=1e-4)
    q = axes.transpose(1, 2) * w[:, :, None]
    torch.testing.assert_close(torch.linalg.pinv(axes), q * w[:, :, None], rtol=0, atol=1e-4)


@pytest.mark.parametrize("d, r", [(16, 16), (64, 53), (32, 9)])
def test_axes_held_as_reflectors(d, r):
    """``axes_reflectors`` then ``basis_axes``: orthonormal to fp32 rounding (a dense int8 table is off by its
    rounding, 100x more), each axis the one it was up to its sign and within the int8 codes' error, the first
    r' of them whatever r' <= r, in r (d - 1) - r (r - 1) / 2 codes a head and one fp16 scale a reflector."""
    gen = torch.Generator().manual_seed(d + r)
    V = torch.linalg.qr(torch.randn(3, d, d, generator=gen))[0][..., :r]
    w = torch.rand(3, d, generator=gen) + 0.5
    codes, scales = axes_reflectors(V)
    assert codes.dtype == torch.int8 and tuple(codes.shape) == (3, r * (d - 1) - r * (r - 1) // 2)
    assert scales.dtype == torch.float16 and tuple(scales.shape) == (3, r)
    q = basis_axes(w, codes, scales, r).transpose(1, 2) * w[:, :, None]  # [H, D, r]
    assert float((q.transpose(1, 2) @ q - torch.eye(r)).abs().max()) < 2e-6
    dense = (V / (V.abs().amax(1, keepdim=True) / 127)).round() * (V.abs().amax(1, keepdim=True) / 127)
    assert float((dense.transpose(1, 2) @ dense - torch.eye(r)).abs().max()) > 100 * 2e-6
    cos = (V * q).sum(1).abs()  # each axis against its own
    assert float(cos.min()) > 0.995
    torch.testing.assert_close(basis_axes(w, codes, scales, r // 2), basis_axes(w, codes, scales, r)[:, :r // 2])


def test_layer_basis_by_hand():
    """w: the rotate_half pairs' averaged query RMS; V: the right singular vectors of the weighed keys."""
    h, d = 2, 8
    q = torch.randn(1, 2 * h, 10, d) * torch.arange(1, d + 1).float()
    k = torch.randn(1, h, 50, d) @ torch.randn(d, d)
    w, V = basis.layer_basis([q], [k])
    e = q.reshape(h, -1, d).pow(2).mean(1)
    torch.testing.assert_close(w, ((e[:, :4] + e[:, 4:]) / 2).repeat(1, 2).sqrt())
    for hh in range(h):
        vh = torch.linalg.svd(k[0, hh] * w[hh])[2].T  # columns by decreasing singular value
        torch.testing.assert_close((V[hh].T @ vh).abs(), torch.eye(d), rtol=0, atol=1e-3)


def _store(key_quant: str, seed: int = 0, basis_meta: str = "fp16"):
    """A store of 4 blocks of 16 tokens (full, int4 at 4 bits, int3, int2) and a hot tail; the exact K/V."""
    gen = torch.Generator().manual_seed(seed)
    h, d, B = 2, 32, 16
    cfg = AGACCConfig(block_size=B, recent_window=B, b_min=2, key_quant=key_quant, rotate=True, basis_meta=basis_meta)
    st = LayerStore(cfg, torch.device("cpu"), torch.float32, key_basis=random_basis(h, d, gen))
    k = torch.randn(1, h, 5 * B + 3, d, generator=gen) * torch.linspace(4, 0.2, d)
    v = torch.randn(1, h, 5 * B + 3, d, generator=gen)
    st.append(k, v)
    st.apply_tiers(torch.tensor([FULL, INT4, INT3, INT2]), torch.tensor([16, 4, 3, 2]),
                   torch.full((4,), d), torch.ones(st.seq_len))
    return st, k, v


def test_store_reads_each_block_from_its_coefficients():
    """Every 4/3/2-bit block's keys = the frame of its exact keys' coefficients, quantised by hand per
    coefficient per block at the layout's widths, and turned back at the block's positions; its values are
    the per-channel store's."""
    st, k, v = _store("basis")
    ref, _, _ = _store("channel")
    w, codes, scales, inv_freq = st.key_basis
    V = basis_axes(w, codes, scales).transpose(1, 2) * w[:, :, None]  # the axes as held
    B = 16
    got = {p.container: p for p in st.parts() if p.kind == "quant"}
    for block, c in ((1, 4), (2, 3), (3, 2)):
        groups = dict(zip((2, 3, 4), basis_layouts(st.cfg, 32)))[c]
        r = sum(n for _, n in groups)
        pos = torch.arange(block * B, (block + 1) * B)
        axes = (V[:, :, :r] / w[:, :, None]).transpose(1, 2)
        coef = frame(k[:, :, pos], pos, inv_freq, -1) @ torch.linalg.pinv(axes)
        lo, hi = coef.amin(2, keepdim=True), coef.amax(2, keepdim=True)
        widths = torch.tensor([b for b, n in groups for _ in range(n)])
        step = ((hi - lo) / (2.0 ** widths - 1)).half().float()
        q = torch.round((coef - lo.half().float()) / step) * step + lo.half().float()
        want = frame(q @ axes, pos, inv_freq, 1)
        kk, vv = quant.dequantize_part(got[c])
        torch.testing.assert_close(kk, want, rtol=0, atol=2e-3)
        assert float((kk - k[:, :, pos]).abs().mean()) < float(k[:, :, pos].abs().mean())  # and near the keys
        ref_part = [p for p in ref.parts() if p.kind == "quant" and p.container == c][0]
        torch.testing.assert_close(vv, quant.dequantize_part(ref_part)[1], rtol=0, atol=0)
        assert got[c].key_groups == groups and torch.equal(got[c].pos, pos.int())


@pytest.mark.parametrize("meta", ["fp16", "8bit"])
def test_bytes_held_are_the_cost_models_and_the_walks(meta):
    st, _, _ = _store("basis", basis_meta=meta)
    ref, _, _ = _store("channel")
    kw = cost_settings(st.cfg, Geometry(n_layers=1, heads=2, head_dim=32, batch=1, full_itemsize=4))
    for tier, c in ((INT4, 4), (INT3, 3), (INT2, 2)):  # one block each; its tier, bits, keep: 4 bytes held apart
        assert st.quant[c].nbytes() + 4 == block_cost_bytes(tier, c, 32, **kw), c
        assert st.quant[c].nbytes() < ref.quant[c].nbytes()  # cheaper keys, the same values
    w, codes, scales, f = st.key_basis
    assert codes.dtype == torch.int8
    assert st.bytes_by_tier()["basis"] == w.nbytes + codes.nbytes + scales.nbytes + f.nbytes
    assert codes.nbytes == 2 * (32 * 31 // 2)  # two heads' reflectors of 32 axes in 32 channels, a byte an entry
    assert st.nbytes() == walk_tensor_bytes(st) == sum(st.bytes_by_tier().values())
    assert "basis" not in ref.bytes_by_tier() and ref.key_basis is None  # not held where keys are per channel
    assert st.quant[8].basis is None
    if meta == "8bit":  # a code and a zero a coefficient and an fp16 reference a block and head, not two fp16s
        fp16, _, _ = _store("basis")
        r = [basis_rank((lay,)) for lay in basis_layouts(st.cfg, 32)]
        for c, rc in zip((2, 3, 4), r):
            assert fp16.quant[c].nbytes() - st.quant[c].nbytes() == 2 * (4 * rc - 2 * rc - 2)


def test_cache_on_a_model_calibrates_saves_and_counts(tmp_path, monkeypatch):
    """End to end on the tiny Llama: a table calibrated and filed, a cache holding its keys in it (every
    decode step through the PyTorch reference and the backend chosen alike), bytes counted once."""
    import agacc
    from agacc import decode
    from agacc.eval.runner import capture_prefill

    monkeypatch.setenv("AGACC_CACHE", str(tmp_path))
    model = tiny_model()
    cfg = AGACCConfig.preset("agacc", target_ratio=3, key_quant="basis")
    with pytest.raises(ValueError, match="python -m agacc calibrate --key-basis"):
        agacc.CompressedCache(model.config, cfg)
    ids = [torch.randint(3, 256, (200,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(2)]
    with torch.inference_mode():
        table = basis.calibrate(model, [capture_prefill(model, i) for i in ids])
    assert table.V.shape == (2, 2, 32, 32) and table.w.shape == (2, 2, 32)
    basis.save(model.config, table)
    loaded = basis.require(model.config)
    torch.testing.assert_close(loaded.V.float(), table.V.float(), rtol=0, atol=1e-3)
    x = torch.randint(3, 256, (1, 580), generator=torch.Generator().manual_seed(9))
    cache = agacc.CompressedCache(model.config, cfg)
    seen = []
    real = decode.decode_attention

    def both(query, store, scaling, mask=None, softcap=None):
        out, mass = real(query, store, scaling, mask, softcap)
        entries = store.attention_entries(torch.float32)
        ref_out, ref_mass = agacc.attention.attend(query.float(), entries, scaling)
        seen.append(any(p.basis is not None for p in store.parts()))
        torch.testing.assert_close(out.float(), ref_out, rtol=0, atol=1e-4)
        torch.testing.assert_close(mass, ref_mass, rtol=1e-4, atol=1e-6)
        return out, mass

    monkeypatch.setattr(agacc.cache, "decode_attention", both)
    with torch.inference_mode():
        model(x[:, :560], past_key_values=cache)
        for i in range(560, 580):
            model(x[:, i:i + 1], past_key_values=cache)
    assert any(seen)
    m = cache.memory()
    r = max(sum(n for _, n in g) for g in basis_layouts(cfg, 32))  # the axes a block may use
    layers, heads, d = table.w.shape
    reflectors = layers * heads * (r * (d - 1) - r * (r - 1) // 2 + 2 * r)  # int8 codes, an fp16 scale a reflector
    assert m["by_tier"]["basis"] == table.w.nbytes + reflectors + 2 * table.inv_freq.nbytes
    assert m["bytes"] == walk_tensor_bytes(cache)
    assert m["by_tier"]["int3"] > 0 and m["ratio"] > 2.9


def test_a_table_for_other_shapes_and_a_model_without_whole_rope_are_refused(tmp_path, monkeypatch):
    import agacc
    from tests.helpers import COMMON, build

    monkeypatch.setenv("AGACC_CACHE", str(tmp_path))
    model = tiny_model()
    basis.save(model.config, basis.KeyBasis(torch.ones(3, 2, 32), torch.eye(32).repeat(3, 2, 1, 1), INV_FREQ, "x"))
    with pytest.raises(ValueError, match="re-run python -m agacc calibrate --key-basis"):
        agacc.CompressedCache(model.config, AGACCConfig.preset("agacc", key_quant="basis"))
    phi = build("PhiConfig", {**COMMON, "partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match="key_quant='channel'"):
        basis.rotary_inv_freq(phi)


def _file_random_table(model, gen: torch.Generator) -> None:
    """File a table for the tiny Llama (2 layers, 2 KV heads, head dim 32): random orthonormal axes and weights."""
    V = torch.linalg.qr(torch.randn(2, 2, 32, 32, generator=gen))[0]
    basis.save(model.config, basis.KeyBasis(torch.rand(2, 2, 32, generator=gen) + 0.5, V, basis.rotary_inv_freq(model),
                                            "tiny"))


def test_auto_holds_keys_in_a_basis_above_4x_where_a_table_is_filed(tmp_path, monkeypatch):
    """``key_quant="auto"`` (the agacc preset; round 25): "basis" at fitted ratios above 4 where a table is filed
    for the model (the embedded model's shipped one included), "channel" otherwise, an explicit format kept; its
    cache is the explicit ``key_quant="basis"`` one logit for logit and byte for byte; unresolved, it groups keys
    per channel; the app's replay takes the run's format for it."""
    import agacc
    from agacc.policy import key_grouping
    from agacc.trace import policy_changes
    from transformers import LlamaConfig

    monkeypatch.setenv("AGACC_CACHE", str(tmp_path))
    model = tiny_model()
    preset = AGACCConfig.preset("agacc")
    assert preset.key_quant == "auto" and key_grouping(preset.with_overrides(target_ratio=8.0), 32) == "channel"

    def resolved(config, ratio, **kw):
        return basis.default_key_quant(preset.with_overrides(target_ratio=ratio, **kw), config)

    assert [resolved(model.config, r) for r in (None, 3.0, 4.0, 6.0, 8.0)] == ["channel"] * 5  # none filed
    embedded = LlamaConfig(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                           vocab_size=49152, intermediate_size=64)
    assert [resolved(embedded, r) for r in (None, 4.0, 4.5, 8.0)] == ["channel", "channel", "basis", "basis"]
    gen = torch.Generator().manual_seed(0)
    _file_random_table(model, gen)
    assert [resolved(model.config, r) for r in (None, 4.0, 4.5, 8.0)] == ["channel", "channel", "basis", "basis"]
    assert resolved(model.config, 8.0, key_quant="channel") == "channel"
    assert resolved(model.config, 8.0, key_quant="token") == "token"

    x = torch.randint(3, 256, (1, 300), generator=torch.Generator().manual_seed(1))
    runs = []
    for kq in ("auto", "basis"):
        cache = agacc.CompressedCache(model.config, preset.with_overrides(target_ratio=6.0, key_quant=kq))
        with torch.inference_mode():
            logits = [model(x[:, :280], past_key_values=cache).logits[:, -1]]
            logits += [model(x[:, i:i + 1], past_key_values=cache).logits[:, -1] for i in range(280, 300)]
        runs.append((cache, torch.cat(logits)))
    (auto, a), (explicit, b) = runs
    assert auto.cfg == explicit.cfg and auto.cfg.key_quant == "basis"
    assert torch.equal(a, b) and auto.memory() == explicit.memory()
    assert auto.memory()["by_tier"]["basis"] > 0 and auto.memory()["bytes"] == walk_tensor_bytes(auto)
    assert policy_changes(auto.cfg, preset.with_overrides(target_ratio=6.0)) == ([], [])


def test_a_layer_holds_its_table_on_its_device_alone(tmp_path, monkeypatch):
    """A layer on another device than the table's (CUDA; here "meta") takes its part of the table there and the
    cache keeps that copy alone: the H200 check (round 26) found the host copy held beside the device's, 0.34 MB
    that memory() did not count and the walk did."""
    import agacc

    monkeypatch.setenv("AGACC_CACHE", str(tmp_path))
    model = tiny_model()
    gen = torch.Generator().manual_seed(0)
    _file_random_table(model, gen)
    cache = agacc.CompressedCache(model.config, AGACCConfig.preset("agacc", target_ratio=6.0))
    assert cache.cfg.key_quant == "basis"
    layer = cache.layers[0]
    k = torch.empty(1, 2, 0, 32, device="meta")
    layer.lazy_initialization(k, k)
    assert [t.device.type for t in cache.key_basis[0]] == ["meta"] * 4
    assert all(a is b for a, b in zip(cache.key_basis[0], layer.store.key_basis))
    assert all(t.device.type == "cpu" for t in cache.key_basis[1])  # a layer not yet started keeps the loaded table


def test_a_padded_batch_counts_the_shared_table_once(tmp_path, monkeypatch):
    """A padded batch's rows share the model's key basis (one table, the same tensors): the batch's bytes are the
    rows' minus the copies they would count of it, and its "basis" bytes those of the table's distinct tensors."""
    import agacc

    monkeypatch.setenv("AGACC_CACHE", str(tmp_path))
    model = tiny_model()
    gen = torch.Generator().manual_seed(0)
    _file_random_table(model, gen)
    cache = agacc.CompressedCache(model.config, AGACCConfig.preset("agacc", target_ratio=6.0))
    x = torch.randint(3, 256, (3, 300), generator=gen)
    mask = torch.ones_like(x)
    mask[1, :40] = mask[2, :90] = 0
    with torch.inference_mode():
        model(x, attention_mask=mask, past_key_values=cache)
    rows = [r.memory() for r in cache.rows]
    table = sum(t.nbytes for l in cache.rows[0].layers if l.store is not None for t in l.store.basis_tensors())
    assert table > 0 and all(r["by_tier"]["basis"] == table for r in rows)
    m = cache.memory()
    assert m["by_tier"]["basis"] == table
    assert m["bytes"] == sum(r["bytes"] for r in rows) - 2 * table
    assert m["ratio"] == m["bytes_fp16"] / m["bytes"]
