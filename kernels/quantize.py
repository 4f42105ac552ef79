"""Triton quantise + bit-pack and unpack + dequantise kernels for the cache's K/V format.

The format is ``kernels.format``; the PyTorch reference is ``agacc.quant`` (``quantize_keys``,
``quantize_values``, ``dequantize_keys``, ``dequantize_values``, same signatures). ``agacc.store``
quantises with these where ``kernels.backend`` is "triton". They produce the same tensors:

  keys    codes [Bt, H, n, D*c/8] uint8, scale/zero [Bt, H, n/B, D] fp16  (per channel per block of B)
  values  codes [Bt, H, n, D*c/8] uint8, scale/zero [Bt, H, n, D/G] fp16  (per token per group of G)

``c`` is the container (2, 3, 4 or 8 bits) of ``bits``-bit codes; code ``j`` of a byte sits at bit
``j*c``. Dequantisation is always ``u * scale + zero``. The 3-bit container is two bit planes
(``kernels.format.pack``): for it the kernels run with one code per byte and ``format.pack`` /
``format.unpack`` split / join the planes on the device (one extra pass over D bytes per vector, at re-evaluation only --
the decode kernel reads the planes directly).

Bit-exactness: the kernels are compiled without FMA contraction (``enable_fp_fusion=False``), so
products and sums round like torch's separate elementwise ops; scale/zero are computed in fp32
with correctly rounded division / square root (``tl.div_rn`` / ``tl.sqrt_rn``) and rounded to
fp16 like the reference; codes use round half to even like ``torch.round``. With ``minmax`` and ``nested`` (min/max
are exact) codes, scales and zeros equal the reference bit for bit. With ``meanstd`` the mean / std are sums whose
order differs from torch's, so a scale can differ in its last fp16 bit and a code by one where ``(x - zero) /
scale`` sits at a rounding tie; the error bound ``|x - x~| <= scale / 2`` (inside s standard deviations) holds.

Each kernel reads its input once and writes packed bytes directly: a code never exists unpacked
in memory (except the 3-bit planes' one-byte-per-code intermediate above).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.format import SCALE_DTYPE, container_bits, pack, unpack, value_group

METHODS = {"minmax": 0, "meanstd": 1, "nested": 2}  # nested: min-max widened (agacc.quant.quantize)


def _pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


# --------------------------------------------------------------------------------------------
# shared device helpers
# --------------------------------------------------------------------------------------------

@triton.jit
def _rint(x):
    """Round half to even (``torch.round``), exact for any fp32 ``x`` (no ``x + 0.5`` rounding)."""
    f = tl.floor(x)
    d = x - f  # exact
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _minmax_params(lo, hi, BITS: tl.constexpr, METHOD: tl.constexpr):
    """(scale, zero) fp32 holding fp16-rounded values: scale = max((hi-lo)/(2^b-1), 1e-6), zero = lo; nested
    (METHOD 2): scale = max((hi-lo)/(2(2^(b-1)-1)), 1e-6), zero = lo - scale/2."""
    if METHOD == 2:
        steps = 2 * ((1 << (BITS - 1)) - 1)
    else:
        steps = (1 << BITS) - 1
    scale = tl.maximum(tl.div_rn(hi - lo, steps * 1.0), 1e-6)
    scale = scale.to(tl.float16).to(tl.float32)
    if METHOD == 2:
        zero = (lo - scale * 0.5).to(tl.float16).to(tl.float32)
    else:
        zero = lo.to(tl.float16).to(tl.float32)
    return scale, zero


@triton.jit
def _meanstd_params(mu, sigma, s_outlier, BITS: tl.constexpr):
    """Seed 000 quantiser: scale = max(s*sigma/half, 1e-6), zero = mu - half*scale (fp16-rounded)."""
    half = (1 << (BITS - 1)) - 1
    scale = tl.maximum(tl.div_rn(s_outlier * sigma, half * 1.0), 1e-6)
    scale = scale.to(tl.float16).to(tl.float32)
    zero = (mu - half * scale).to(tl.float16).to(tl.float32)
    return scale, zero


@triton.jit
def _encode(x, scale, zero, BITS: tl.constexpr, METHOD: tl.constexpr):
    """Codes ``clamp(round((x - zero) / scale), 0, top)`` as int32 (top = 2^b-1, or 2*half for meanstd)."""
    if METHOD != 1:
        top = (1 << BITS) - 1
    else:
        top = 2 * ((1 << (BITS - 1)) - 1)
    u = _rint(tl.div_rn(x - zero, scale))
    u = tl.minimum(tl.maximum(u, 0.0), top * 1.0)
    return u.to(tl.int32)


# --------------------------------------------------------------------------------------------
# keys: one (scale, zero) per channel per block of B tokens
# --------------------------------------------------------------------------------------------

@triton.jit
def _quantize_keys_kernel(
    x_ptr, codes_ptr, scale_ptr, zero_ptr,
    H, n, D, sxb, sxh, sxn, s_outlier,
    B: tl.constexpr, COLS: tl.constexpr, BITS: tl.constexpr, C: tl.constexpr, METHOD: tl.constexpr,
):
    """Grid (n/B, Bt*H, cdiv(D*C/8, COLS)): one block of B tokens x COLS output bytes per program."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    PER: tl.constexpr = 8 // C
    b = bh // H
    h = bh % H
    DB = D // PER
    rows = blk * B + tl.arange(0, B)
    byte = tl.program_id(2) * COLS + tl.arange(0, COLS)
    bmask = byte < DB
    x_base = x_ptr + b * sxb + h * sxh
    nblk = n // B
    packed = tl.zeros([B, COLS], dtype=tl.int32)
    for j in tl.static_range(PER):
        col = byte * PER + j
        x = tl.load(x_base + rows[:, None] * sxn + col[None, :], mask=bmask[None, :], other=0.0).to(tl.float32)
        if METHOD != 1:
            scale, zero = _minmax_params(tl.min(x, axis=0), tl.max(x, axis=0), BITS, METHOD)
        else:
            mu = tl.div_rn(tl.sum(x, axis=0), B * 1.0)
            dev = x - mu[None, :]
            sigma = tl.sqrt_rn(tl.div_rn(tl.sum(dev * dev, axis=0), B * 1.0))
            scale, zero = _meanstd_params(mu, sigma, s_outlier, BITS)
        u = _encode(x, scale[None, :], zero[None, :], BITS, METHOD)
        packed = packed | (u << (j * C))
        sz = (bh * nblk + blk) * D + col
        tl.store(scale_ptr + sz, scale.to(tl.float16), mask=bmask)
        tl.store(zero_ptr + sz, zero.to(tl.float16), mask=bmask)
    out = codes_ptr + (bh * n + rows[:, None]) * DB + byte[None, :]
    tl.store(out, packed.to(tl.uint8), mask=bmask[None, :])


def quantize_keys(k: torch.Tensor, bits: int, block_size: int, method: str = "minmax", s: float = 3.0):
    """Triton ``agacc.quant.quantize_keys``: k [Bt, H, n, D] (n a multiple of block_size, any float dtype)
    -> (packed [Bt,H,n,D*c//8] uint8, scale [Bt,H,n//B,D] fp16, zero [Bt,H,n//B,D] fp16)."""
    _check_bits(bits, method)
    return _in_container(_quantize_keys, k, bits, block_size, method, s)


def _in_container(quantise, x, bits, *args):
    """``quantise(x, bits, *args, c)`` packed in the container c of ``bits``; for the 3-bit container
    the kernel writes one code per byte and ``format.pack`` splits the planes."""
    c = container_bits(bits)
    if c != 3:
        return quantise(x, bits, *args, c)
    codes, scale, zero = quantise(x, bits, *args, 8)
    return pack(codes, 3), scale, zero


def _quantize_keys(k, bits, block_size, method, s, c):
    bt, h, n, d = k.shape
    per = 8 // c
    if n % block_size or d % per:
        raise ValueError(f"keys [.., {n}, {d}]: n must be a multiple of {block_size}, D of {per}")
    if k.stride(-1) != 1:
        k = k.contiguous()
    codes = torch.empty(bt, h, n, d // per, dtype=torch.uint8, device=k.device)
    scale = torch.empty(bt, h, n // block_size, d, dtype=SCALE_DTYPE, device=k.device)
    zero = torch.empty_like(scale)
    if n == 0 or bt * h == 0:
        return codes, scale, zero
    cols = min(_pow2(d // per), max(1, 4096 // block_size))
    grid = (n // block_size, bt * h, triton.cdiv(d // per, cols))
    _quantize_keys_kernel[grid](
        k, codes, scale, zero, h, n, d, k.stride(0), k.stride(1), k.stride(2), float(s),
        B=block_size, COLS=cols, BITS=bits, C=c, METHOD=METHODS[method], enable_fp_fusion=False,
    )
    return codes, scale, zero


# --------------------------------------------------------------------------------------------
# values: one (scale, zero) per token per group of G channels
# --------------------------------------------------------------------------------------------

@triton.jit
def _quantize_values_kernel(
    x_ptr, codes_ptr, scale_ptr, zero_ptr,
    H, n, D, G, sxb, sxh, sxn, s_outlier,
    ROWS: tl.constexpr, NG_PAD: tl.constexpr, GB_PAD: tl.constexpr,
    BITS: tl.constexpr, C: tl.constexpr, METHOD: tl.constexpr,
):
    """Grid (cdiv(n, ROWS), Bt*H): ROWS tokens x all groups; tile [ROWS, groups, bytes per group]."""
    bh = tl.program_id(1)
    PER: tl.constexpr = 8 // C
    b = bh // H
    h = bh % H
    NG = D // G
    GB = G // PER
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    grp = tl.arange(0, NG_PAD)
    gb = tl.arange(0, GB_PAD)
    r3 = rows[:, None, None]
    g3 = grp[None, :, None]
    b3 = gb[None, None, :]
    mask = (r3 < n) & (g3 < NG) & (b3 < GB)
    x_base = x_ptr + b * sxb + h * sxh + r3 * sxn + g3 * G + b3 * PER
    # pass 1: min/max or sum over the group (its channels are spread over the PER sub-positions)
    if METHOD != 1:
        lo = tl.full([ROWS, NG_PAD], float("inf"), tl.float32)
        hi = tl.full([ROWS, NG_PAD], float("-inf"), tl.float32)
        for j in tl.static_range(PER):
            x = tl.load(x_base + j, mask=mask, other=0.0).to(tl.float32)
            lo = tl.minimum(lo, tl.min(tl.where(mask, x, float("inf")), axis=2))
            hi = tl.maximum(hi, tl.max(tl.where(mask, x, float("-inf")), axis=2))
        ok = hi >= lo  # rows past n saw no element: keep their (unstored) params finite
        scale, zero = _minmax_params(tl.where(ok, lo, 0.0), tl.where(ok, hi, 0.0), BITS, METHOD)
    else:
        tot = tl.zeros([ROWS, NG_PAD], tl.float32)
        for j in tl.static_range(PER):
            tot += tl.sum(tl.load(x_base + j, mask=mask, other=0.0).to(tl.float32), axis=2)
        mu = tl.div_rn(tot, G * 1.0)
        sq = tl.zeros([ROWS, NG_PAD], tl.float32)
        for j in tl.static_range(PER):
            x = tl.load(x_base + j, mask=mask, other=0.0).to(tl.float32)
            dev = tl.where(mask, x - mu[:, :, None], 0.0)
            sq += tl.sum(dev * dev, axis=2)
        sigma = tl.sqrt_rn(tl.div_rn(sq, G * 1.0))
        scale, zero = _meanstd_params(mu, sigma, s_outlier, BITS)
    # pass 2: codes, packed in registers
    packed = tl.zeros([ROWS, NG_PAD, GB_PAD], dtype=tl.int32)
    for j in tl.static_range(PER):
        x = tl.load(x_base + j, mask=mask, other=0.0).to(tl.float32)
        u = _encode(x, scale[:, :, None], zero[:, :, None], BITS, METHOD)
        packed = packed | (u << (j * C))
    tl.store(codes_ptr + (bh * n + r3) * (D // PER) + g3 * GB + b3, packed.to(tl.uint8), mask=mask)
    smask = (rows[:, None] < n) & (grp[None, :] < NG)
    sz = (bh * n + rows[:, None]) * NG + grp[None, :]
    tl.store(scale_ptr + sz, scale.to(tl.float16), mask=smask)
    tl.store(zero_ptr + sz, zero.to(tl.float16), mask=smask)


def quantize_values(v: torch.Tensor, bits: int, group_size: int, method: str = "minmax", s: float = 3.0):
    """Triton ``agacc.quant.quantize_values``: v [Bt, H, n, D] -> (packed [Bt,H,n,D*c//8] uint8,
    scale [Bt,H,n,D//G] fp16, zero [Bt,H,n,D//G] fp16), G = ``value_group(D, group_size)`` as the reference."""
    _check_bits(bits, method)
    return _in_container(_quantize_values, v, bits, group_size, method, s)


def _quantize_values(v, bits, group_size, method, s, c):
    bt, h, n, d = v.shape
    g = value_group(d, group_size)
    per = 8 // c
    if d % g or g % per:
        raise ValueError(f"values [.., {d}]: D must be a multiple of G={g}, G of {per}")
    if v.stride(-1) != 1:
        v = v.contiguous()
    codes = torch.empty(bt, h, n, d // per, dtype=torch.uint8, device=v.device)
    scale = torch.empty(bt, h, n, d // g, dtype=SCALE_DTYPE, device=v.device)
    zero = torch.empty_like(scale)
    if n == 0 or bt * h == 0:
        return codes, scale, zero
    ng_pad, gb_pad = _pow2(d // g), _pow2(g // per)
    rows = max(1, min(_pow2(n), 4096 // (ng_pad * gb_pad)))
    grid = (triton.cdiv(n, rows), bt * h)
    _quantize_values_kernel[grid](
        v, codes, scale, zero, h, n, d, g, v.stride(0), v.stride(1), v.stride(2), float(s),
        ROWS=rows, NG_PAD=ng_pad, GB_PAD=gb_pad, BITS=bits, C=c, METHOD=METHODS[method], enable_fp_fusion=False,
    )
    return codes, scale, zero


# --------------------------------------------------------------------------------------------
# unpack + dequantise (keys and values share one kernel: a scale covers ROW_DIV rows x COL_DIV cols)
# --------------------------------------------------------------------------------------------

@triton.jit
def _dequantize_kernel(
    codes_ptr, scale_ptr, zero_ptr, out_ptr,
    n, D, ROW_DIV, COL_DIV,
    ROWS: tl.constexpr, DB_PAD: tl.constexpr, C: tl.constexpr,
):
    """Grid (cdiv(n, ROWS), Bt*H). out[row, col] = u * scale[row//ROW_DIV, col//COL_DIV] + zero[...]."""
    bh = tl.program_id(1)
    PER: tl.constexpr = 8 // C
    MASK: tl.constexpr = (1 << C) - 1
    DB = D // PER
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    byte = tl.arange(0, DB_PAD)
    mask = (rows[:, None] < n) & (byte[None, :] < DB)
    raw = tl.load(codes_ptr + (bh * n + rows[:, None]) * DB + byte[None, :], mask=mask, other=0).to(tl.int32)
    n_sr = tl.cdiv(n, ROW_DIV)  # scale rows per head
    n_sc = D // COL_DIV         # scale cols
    srow = (bh * n_sr + rows[:, None] // ROW_DIV) * n_sc
    for j in tl.static_range(PER):
        col = byte[None, :] * PER + j
        u = ((raw >> (j * C)) & MASK).to(tl.float32)
        sidx = srow + col // COL_DIV
        sc = tl.load(scale_ptr + sidx, mask=mask, other=0.0).to(tl.float32)
        zr = tl.load(zero_ptr + sidx, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + (bh * n + rows[:, None]) * D + col, (u * sc + zr).to(out_ptr.dtype.element_ty), mask=mask)


def _dequantize(packed, scale, zero, bits, row_div, col_div, dtype):
    c = container_bits(bits)
    if c == 3:
        packed, c = unpack(packed, 3), 8
    bt, h, n, db = packed.shape
    d = db * (8 // c)
    out = torch.empty(bt, h, n, d, dtype=dtype, device=packed.device)
    if n == 0 or bt * h == 0:
        return out
    db_pad = _pow2(db)
    rows = max(1, min(_pow2(n), 4096 // db_pad))
    grid = (triton.cdiv(n, rows), bt * h)
    _dequantize_kernel[grid](
        packed.contiguous(), scale.contiguous(), zero.contiguous(), out, n, d, row_div, col_div,
        ROWS=rows, DB_PAD=db_pad, C=c, enable_fp_fusion=False,
    )
    return out


def dequantize_keys(packed, scale, zero, bits: int, block_size: int, dtype=torch.float32):
    """Triton ``agacc.quant.dequantize_keys`` -> [Bt, H, n, D] in ``dtype`` (computed in fp32)."""
    return _dequantize(packed, scale, zero, bits, block_size, 1, dtype)


def dequantize_values(packed, scale, zero, bits: int, dtype=torch.float32):
    """Triton ``agacc.quant.dequantize_values`` -> [Bt, H, n, D] in ``dtype`` (computed in fp32)."""
    d = packed.shape[-1] * 8 // container_bits(bits)
    return _dequantize(packed, scale, zero, bits, 1, d // scale.shape[-1], dtype)


def _check_bits(bits: int, method: str) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if method not in METHODS:
        raise ValueError(f"unknown quantiser {method!r}: expected 'minmax', 'nested' or 'meanstd'")
    if method != "minmax" and bits < 2:
        raise ValueError(f"the {method} quantiser needs at least 2 bits")


# --------------------------------------------------------------------------------------------
# ahead-of-time compilation (kernels/aot.py): the variants the wrappers above can launch
# --------------------------------------------------------------------------------------------

AOT_HEAD_DIMS = (64, 96, 128, 256)
AOT_BLOCK_SIZES = (8, 16, 32, 64, 128)  # AGACCConfig.block_size choices: the key quantiser's B
AOT_GROUP_SIZES = (8, 24, 64, 128)      # value / per-token key group sizes (multiples of 8; 64 the default)
_PTR = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
_OPTS = {"num_warps": 4, "enable_fp_fusion": False}  # as launched: no FMA contraction (bit-exactness)


def _kernel_c(bits: int) -> int:
    """The container a kernel packs into for ``bits``-bit codes: 3 runs as one code per byte."""
    c = container_bits(bits)
    return 8 if c == 3 else c


def _aot_keys(d, block, bits, method="minmax", x="fp32"):
    """``_quantize_keys_kernel`` as ``_quantize_keys`` launches it for k [.., n, d] (``x``: its dtype;
    rotated keys and re-tiered blocks arrive as fp32)."""
    c = _kernel_c(bits)
    cols = min(_pow2(d // (8 // c)), max(1, 4096 // block))
    sig = {"x_ptr": _PTR[x], "codes_ptr": "*u8", "scale_ptr": "*fp16", "zero_ptr": "*fp16", "s_outlier": "fp32"}
    sig.update({n: "i32" for n in ("H", "n", "D", "sxb", "sxh", "sxn")})
    consts = dict(B=block, COLS=cols, BITS=bits, C=c, METHOD=METHODS[method])
    return (f"quantize.keys[D={d},B={block},bits={bits},{method},x={x}]", _quantize_keys_kernel, sig, consts, _OPTS)


def _aot_values(d, group_size, bits, method="minmax", x="fp32", n=None):
    """``_quantize_values_kernel`` as ``_quantize_values`` launches it; ``n`` tokens in the call (None:
    enough for the largest ROWS tile)."""
    c = _kernel_c(bits)
    g = value_group(d, group_size)
    ng_pad, gb_pad = _pow2(d // g), _pow2(g // (8 // c))
    cap = 4096 // (ng_pad * gb_pad)
    rows = max(1, min(_pow2(n), cap)) if n else max(1, cap)
    sig = {"x_ptr": _PTR[x], "codes_ptr": "*u8", "scale_ptr": "*fp16", "zero_ptr": "*fp16", "s_outlier": "fp32"}
    sig.update({k: "i32" for k in ("H", "n", "D", "G", "sxb", "sxh", "sxn")})
    consts = dict(ROWS=rows, NG_PAD=ng_pad, GB_PAD=gb_pad, BITS=bits, C=c, METHOD=METHODS[method])
    return (f"quantize.values[D={d},G={g},bits={bits},{method},rows={rows},x={x}]", _quantize_values_kernel,
            sig, consts, _OPTS)


def _aot_dequant(d, bits, out="fp32"):
    """``_dequantize_kernel`` at the largest ROWS tile, as ``_dequantize`` launches it."""
    c = _kernel_c(bits)
    db_pad = _pow2(d // (8 // c))
    sig = {"codes_ptr": "*u8", "scale_ptr": "*fp16", "zero_ptr": "*fp16", "out_ptr": _PTR[out]}
    sig.update({k: "i32" for k in ("n", "D", "ROW_DIV", "COL_DIV")})
    consts = dict(ROWS=max(1, 4096 // db_pad), DB_PAD=db_pad, C=c)
    return f"quantize.dequant[D={d},c={c},out={out}]", _dequantize_kernel, sig, consts, _OPTS


def aot_specs() -> list:
    """Every variant the wrappers launch, for ``kernels/aot.py``: (name, kernel, signature,
    constexprs, options). Constexprs follow the wrappers' own formulas (COLS, ROWS, NG_PAD,
    GB_PAD, the container of a code width). Coverage:

    * keys: every code width 1..8 (both quantisers; meanstd from 2) at D = 128, B = 16; every head
      dim x key block size at 4 bits; fp16 / bf16 input.
    * values (and per-token keys): every code width x quantiser at D = 128, groups of 64; every
      head dim x group size (8, 24, 64, 128 -> G = gcd) x container (2, 4, 8) at the largest row
      tile; small row tiles (calls on 1 and 8 tokens); fp16 / bf16 input; "nested" at 3 and 4 bits, every
      head dim, groups of 64.
    * dequantise: every container x head dim into fp32; fp16 / bf16 output.
    """
    specs = []
    for method, lo in (("minmax", 1), ("meanstd", 2)):
        for bits in range(lo, 9):
            specs.append(_aot_keys(128, 16, bits, method))
            specs.append(_aot_values(128, 64, bits, method))
    for d in AOT_HEAD_DIMS:
        for block in AOT_BLOCK_SIZES:
            if (d, block) != (128, 16):
                specs.append(_aot_keys(d, block, 4))
    for x in ("fp16", "bf16"):
        specs.append(_aot_keys(128, 16, 4, x=x))
        specs.append(_aot_values(128, 64, 4, x=x))
    seen = {(128, 64, bits) for bits in range(1, 9)}  # the code-width sweep above
    for d in AOT_HEAD_DIMS:
        for gs in AOT_GROUP_SIZES:
            for bits in (2, 4, 8):
                key = (d, value_group(d, gs), bits)
                if key not in seen:
                    seen.add(key)
                    specs.append(_aot_values(d, gs, bits))
    for n in (1, 8):
        specs.append(_aot_values(128, 64, 4, n=n))
    for d in AOT_HEAD_DIMS:  # nested values (the widths a move narrows by a bit)
        for bits in (3, 4):
            specs.append(_aot_values(d, 64, bits, "nested"))
    for d in AOT_HEAD_DIMS:
        for bits in (2, 4, 8):
            specs.append(_aot_dequant(d, bits))
    for out in ("fp16", "bf16"):
        specs.append(_aot_dequant(128, 4, out))
    return specs
