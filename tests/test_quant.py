import pytest
import torch

from agacc import quant


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_pack_roundtrip_and_size(bits):
    codes = torch.randint(0, 1 << bits, (3, 5, 64), dtype=torch.uint8)
    packed = quant.pack(codes, bits)
    assert packed.shape == (3, 5, 64 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(quant.unpack(packed, bits), codes)


def test_pack_layout_is_little_endian():
    # hand-worked: codes [1, 2, 3, 0] at 2 bits -> 1 | 2<<2 | 3<<4 | 0<<6 = 57
    assert quant.pack(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [57]
    assert quant.pack(torch.tensor([0xA, 0x5], dtype=torch.uint8), 4).tolist() == [0x5A]
    # 3 bits: low-two-bit plane [0,1,2,3,0,1,2,3] -> 0|1<<2|2<<4|3<<6 = 228 (twice), then the high
    # bits [0,0,0,0,1,1,1,1] -> 0b11110000 = 240
    assert quant.pack(torch.arange(8, dtype=torch.uint8), 3).tolist() == [228, 228, 240]
    assert [quant.container_bits(b) for b in range(1, 9)] == [2, 2, 3, 4, 8, 8, 8, 8]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_minmax_error_bound(bits):
    x = torch.randn(4, 2, 64, 64) * 3
    codes, scale, zero = quant.quantize(x, bits, dim=-1, method="minmax")
    assert int(codes.max()) <= (1 << bits) - 1
    err = (quant.dequantize(codes, scale, zero) - x).abs()
    assert bool((err <= scale.float() / 2 + 1e-5).all())


def test_nested_codes_hold_the_codes_of_one_bit_fewer_by_hand():
    """min 0, max 14 at 4 bits nested: step 14 / 14 = 1, zero -0.5, codes round(x + 0.5); their top 3 bits are
    the 3-bit min-max codes round(x / 2) (step 2, zero 0), and quantised again at 3 bits they come back."""
    x = torch.tensor([[[[0.0, 0.8, 2.9, 3.1, 5.2, 7.2, 10.4, 14.0]]]])
    p, s, z = quant.quantize_values(x, 4, 8, "nested")
    assert float(s) == 1.0 and float(z) == -0.5
    assert quant.unpack(p, 4).flatten().tolist() == [0, 1, 3, 4, 6, 8, 11, 14]
    assert bool(((quant.dequantize_values(p, s, z, 4) - x).abs() <= 0.5).all())
    p3, s3, z3 = quant.narrow_values(p, s, z, 4, torch.tensor([True]))
    assert quant.unpack(p3, 4).flatten().tolist() == [0, 0, 1, 2, 3, 4, 5, 7]
    assert float(s3) == 2.0 and float(z3) == 0.0
    fresh = quant.quantize_values(x, 3, 8, "minmax")
    assert quant.unpack(fresh[0], 3).flatten().tolist() == [0, 0, 1, 2, 3, 4, 5, 7]
    again = quant.quantize_values(quant.dequantize_values(p3, s3, z3, 4), 3, 8, "minmax")
    assert quant.unpack(again[0], 3).flatten().tolist() == [0, 0, 1, 2, 3, 4, 5, 7]
    # rows not narrowed stay as they are
    kept = quant.narrow_values(p, s, z, 4, torch.tensor([False]))
    assert torch.equal(kept[0], p) and torch.equal(kept[1], s) and torch.equal(kept[2], z)


@pytest.mark.parametrize("bits", [3, 4])
def test_nested_codes_narrow_to_what_min_max_gives_one_bit_fewer(bits):
    """Random groups: the error bound holds; narrowed codes equal the (b-1)-bit min-max codes except at
    near-ties (fp16 scales and zeros place the two grids' boundaries a rounding apart); min-max at b-1 bits
    gives the narrowed values back exactly (the move to one bit fewer loses nothing more)."""
    torch.manual_seed(bits)
    x = torch.randn(2, 3, 40, 64) * 2 + 0.3
    p, s, z = quant.quantize_values(x, bits, 32, "nested")
    assert bool(((quant.dequantize_values(p, s, z, bits) - x).abs() <= s.float().repeat_interleave(32, -1) / 2
                 + 1e-5).all())
    c = quant.container_bits(bits)
    p1, s1, z1 = quant.narrow_values(p, s, z, c, torch.ones(40, dtype=torch.bool))
    fresh = quant.quantize_values(x, bits - 1, 32, "minmax")
    diff = (quant.unpack(p1, c).int() - quant.unpack(fresh[0], quant.container_bits(bits - 1)).int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.005
    y = quant.dequantize_values(p1, s1, z1, bits)
    again = quant.quantize_values(y, bits - 1, 32, "minmax")
    assert torch.equal(quant.dequantize_values(*again, bits - 1), y)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_meanstd_error_bound_and_clipping(bits):
    x = torch.randn(8, 256)
    s = 2.0
    codes, scale, zero = quant.quantize(x, bits, dim=-1, method="meanstd", s=s)
    y = quant.dequantize(codes, scale, zero)
    mu, sigma = x.mean(-1, keepdim=True), x.std(-1, keepdim=True, unbiased=False)
    inside = (x - mu).abs() <= s * sigma * 0.999
    assert bool(((y - x).abs()[inside] <= (scale.float() / 2 + 1e-4).expand_as(x)[inside]).all())
    # outliers saturate at mu +- s*sigma (within one step)
    assert bool(((y - mu).abs() <= s * sigma + scale.float()).all())
    # the seed's formula, literally
    half = 2 ** (bits - 1) - 1
    seed = torch.round((x - mu) / sigma * half / s).clamp(-half, half) * s * sigma / half + mu
    diff = (y - seed).abs()
    step = float(scale.max())
    # equal up to fp16 rounding of scale/zero, which can move a tie by one step on rare elements
    assert bool((diff <= step * 1.01).all())
    assert float(diff.mean()) < 0.15 * step


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_error_shrinks_with_bits(bits):
    x = torch.randn(2, 3, 64, 64)
    p, s, z = quant.quantize_keys(x, bits, 32)
    e = (quant.dequantize_keys(p, s, z, bits, 32) - x).abs().mean()
    p8, s8, z8 = quant.quantize_keys(x, 8, 32)
    e8 = (quant.dequantize_keys(p8, s8, z8, 8, 32) - x).abs().mean()
    assert e8 <= e + 1e-7


def test_keys_per_channel_values_per_token_shapes():
    x = torch.randn(1, 3, 64, 64)
    pk, ks, kz = quant.quantize_keys(x, 4, 16)
    assert pk.shape == (1, 3, 64, 32) and ks.shape == (1, 3, 4, 64)
    pv, vs, vz = quant.quantize_values(x, 4, 32)
    assert pv.shape == (1, 3, 64, 32) and vs.shape == (1, 3, 64, 2)
    # an outlier channel only widens its own channel's key scale
    x2 = x.clone()
    x2[..., 5] *= 100
    _, ks2, _ = quant.quantize_keys(x2, 4, 16)
    assert torch.equal(ks2[..., :5], ks[..., :5]) and bool((ks2[..., 5] > ks[..., 5]).all())


@pytest.mark.parametrize("rate", [0.25, 0.5, 0.75])
def test_magnitude_pruning_rate_and_sparse_roundtrip(rate):
    x = torch.randn(2, 3, 16, 64)
    keep = quant.kept_count(64, rate)
    assert keep == 64 - round(rate * 64)  # multiples of 8 here: exact
    bitmap, packed, scale, zero = quant.sparse_encode(x, keep, 4)
    assert bitmap.shape == (2, 3, 16, 8) and packed.shape == (2, 3, 16, keep // 2)
    y = quant.sparse_decode(bitmap, packed, scale, zero, 4)
    mask = quant.unpack_bitmap(bitmap)
    assert bool((mask.sum(-1) == keep).all())
    assert bool((y[~mask] == 0).all())  # pruned elements are exactly zero
    # kept = the largest magnitudes
    kth = x.abs().topk(keep, dim=-1).values[..., -1:]
    assert bool((x.abs()[mask] >= kth.expand_as(x)[mask]).all())
    err = (y - x)[mask].abs().reshape(2, 3, 16, keep)
    assert bool((err <= scale.float() / 2 + 1e-5).all())


def test_kept_count_rounds_up_to_multiple_of_8():
    assert quant.kept_count(64, 0.3) == 48  # 64 - 19 = 45 -> 48
    assert quant.kept_count(64, 0.99) == 8
    assert quant.kept_count(64, 0.0) == 64


def test_hadamard_rotation_is_orthonormal_and_its_own_inverse():
    h = quant.hadamard(4)
    # hand-worked Sylvester construction: [[1,1,1,1],[1,-1,1,-1],[1,1,-1,-1],[1,-1,-1,1]] / 2
    assert torch.equal(h * 2, torch.tensor([[1., 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]))
    assert torch.allclose(quant.hadamard(64) @ quant.hadamard(64), torch.eye(64), atol=1e-6)
    assert quant.rotation_size(64) == 64 and quant.rotation_size(96) == 32 and quant.rotation_size(80) == 16
    x = torch.randn(2, 3, 5, 96)
    y = quant.rotate(x)
    assert torch.allclose(quant.rotate(y), x, atol=1e-5)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)  # norms (and dot products) kept
    q = torch.randn(96)
    assert torch.allclose(y @ quant.rotate(q), x @ q, atol=1e-4)
    with pytest.raises(ValueError, match="power of two"):
        quant.hadamard(12)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rotation_shrinks_per_token_error_with_outlier_channels(bits):
    """Keys with a few large channels (as real keys have): per-token groups lose the small channels
    to the outliers' range; rotated first, the error (same in both spaces: H is orthonormal) drops."""
    torch.manual_seed(bits)
    x = torch.randn(1, 2, 256, 64)
    x[..., [3, 40]] *= 20
    plain = quant.dequantize_values(*quant.quantize_values(x, bits, 64), bits)
    rotated = quant.rotate(quant.dequantize_values(*quant.quantize_values(quant.rotate(x), bits, 64), bits))
    e_plain, e_rot = (plain - x).norm(), (rotated - x).norm()
    assert e_rot < 0.6 * e_plain, (e_rot, e_plain)


def test_bad_bits():
    with pytest.raises(ValueError):
        quant.quantize(torch.randn(4), 9, dim=0)
    with pytest.raises(ValueError):
        quant.container_bits(0)


def test_bench_pre_rope_keys_quantise_the_unrotated_keys():
    """bench_quant_error's pre-RoPE format (KVQuant): keys whose pre-RoPE channels are constant over
    positions come back exactly at 2 bits (each channel's range is 0), while quantising the same keys
    after RoPE errs (RoPE spreads each channel over the block), and so do they with only the rotation
    within each block undone; the identity format returns the keys; so do the allocated format before RoPE and
    the keys in a basis before RoPE. RoPE itself by transformers' ``apply_rotary_pos_emb``, not the bench's
    inverse."""
    from bench.bench_quant_error import allocated_pre_rope, greedy_widths, in_basis, per_channel, pre_rope
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    n, d = 32, 8
    inv = 1.0 / (100.0 ** (torch.arange(0, d, 2).float() / d))
    ang = torch.arange(n).float()[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos()[None, None], torch.cat([ang, ang], -1).sin()[None, None]
    pre = torch.randn(1, 2, 1, d).expand(1, 2, n, d)
    k, _ = apply_rotary_pos_emb(pre, pre, cos[:, 0], sin[:, 0])  # RoPE at positions 0..n-1
    assert torch.allclose(pre_rope(lambda x, b: x, cos, sin)(k, 2), k, atol=1e-6)
    assert (pre_rope(per_channel, cos, sin)(k, 2) - k).abs().max() < 5e-3  # (the fp16 zero point)
    # within each 16-token block: key t in block b is R(16 b) pre after its offset is undone, constant too
    assert (pre_rope(per_channel, cos, sin, block=16)(k, 2) - k).abs().max() < 5e-3
    # the allocated format before RoPE (the queries' RoPE undone at their positions 28..31) alike
    q = torch.randn(1, 2, 4, d)
    assert (allocated_pre_rope(cos, sin)(k, 2, {"queries": q, "q_end": n}) - k).abs().max() < 5e-3
    # and the keys in a basis before RoPE (here the identity, every coefficient coded at 8 bits an element)
    ident = {"w": torch.ones(2, d), "V": torch.eye(d).expand(2, d, d), "energy": torch.ones(2, d),
             "range_sq": torch.ones(2, d)}
    assert (in_basis([ident], cos, sin, greedy_widths(2.0))(k, 8, {"layer": 0}) - k).abs().max() < 5e-3
    assert (per_channel(k, 2) - k).abs().max() > 0.05


def test_bench_lloyd_max_values_by_hand():
    """bench_quant_error's Lloyd-Max rows (round 28): a group's levels at mean + std x the Gaussian centroids, each
    element to the nearest. A group of 64 of +-1 (mean 0, std 1) at 1 bit reads back +-0.7979; at 2 bits 1 is
    nearer 1.5104 (0.5104 away) than 0.4528 (0.5472 away)."""
    from bench.bench_quant_error import _value_groups, lloyd_max

    x = torch.tensor([1.0, -1.0] * 32).reshape(1, 1, 1, 64)
    torch.testing.assert_close(lloyd_max(_value_groups)(x, 1), x * 0.7979, atol=1e-3, rtol=0)
    torch.testing.assert_close(lloyd_max(_value_groups)(x, 2), x * 1.5104, atol=1e-3, rtol=0)
    # the mean moves the levels: a group of 3 and 1 (mean 2, std 1) at 2 bits reads back 2 +- 1.5104
    z = torch.tensor([3.0, 1.0] * 32).reshape(1, 1, 1, 64)
    torch.testing.assert_close(lloyd_max(_value_groups)(z, 2), 2 + (z - 2) * 1.5104, atol=2e-3, rtol=0)
