"""Quantisers and magnitude pruning: the PyTorch reference of every storage format.

The format itself -- containers, bit packing, the 3-bit planes, the sparse bitmap, scales and zeros,
the Hadamard rotation, and ``Part``, one stretch of stored entries -- is defined in
``kernels/format.py`` (below the library, so the kernels read it without importing ``agacc``) and
re-exported here: ``quant.container_bits``, ``quant.pack``, ``quant.rotate``, ... are those functions.

Every quantised tensor is stored as unsigned codes ``u`` plus a ``scale`` and ``zero`` per group,
and always dequantises as ``x ~= u * scale + zero`` (both quantisers below), so one dequantiser
and one kernel serve both. Keys are quantised per channel over the tokens of a block
(``quantize_keys``) or, like values, per token over groups of channels (``quantize_values``).
``dequantize_part`` reads any ``Part`` back densely: the reference every decode backend is checked
against.
"""
from __future__ import annotations

import torch

from kernels.format import (  # noqa: F401  (re-exported: agacc.quant's public names)
    CONTAINER_OF, CONTAINERS, DENSE, QUANT, SCALE_DTYPE, SPARSE, Part, axes_reflectors, basis_axes, basis_coeffs,
    basis_keys, container_bits, dequantize, frame, hadamard, pack, pack_bitmap, pack_groups, pack_unit, rotate,
    rotation_size, sparse_decode, unpack, unpack_bitmap, unpack_groups, value_group,
)


def quantize(x: torch.Tensor, bits: int, dim: int, method: str = "minmax", s: float = 3.0):
    """Quantise ``x`` to ``bits``-bit codes with one (scale, zero) per slice reduced over ``dim``.

    method="minmax": asymmetric, scale = (max - min) / (2**bits - 1), zero = min;
        error <= scale / 2 everywhere.
    method="nested": min-max over the range widened by half a step at each end, scale = (max - min) /
        (2 (2**(bits-1) - 1)), zero = min - scale / 2: a code's top bits-1 bits are the (bits-1)-bit
        min-max code of the same values (``narrow_values`` reads them; docs/tuning.md round 31);
        error <= scale / 2 everywhere.
    method="meanstd" (seed 000 §2.4.1): x~ = round((x-mu)/sigma * (2**(b-1)-1)/s) * s*sigma/(2**(b-1)-1) + mu,
        codes clipped to +-(2**(b-1)-1) so values beyond s standard deviations saturate;
        error <= scale / 2 for |x - mu| <= s * sigma.

    Returns ``(codes uint8 like x, scale, zero)`` with ``dim`` kept as size 1, scale/zero float16.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    xf = x.float()
    if method in ("minmax", "nested"):
        if method == "nested" and bits < 2:
            raise ValueError("the nested quantiser needs at least 2 bits")
        lo = xf.amin(dim, keepdim=True)
        hi = xf.amax(dim, keepdim=True)
        levels = (1 << bits) - 1
        steps = levels if method == "minmax" else 2 * ((1 << (bits - 1)) - 1)
        # a tensor divisor: CUDA divides by a Python number as a * (1/b), one ulp off IEEE division
        # (the Triton kernel's div_rn) -- measured on an H200, 1 scale in 1024 differed
        scale = ((hi - lo) / torch.full_like(hi, steps)).clamp_min(1e-6).to(SCALE_DTYPE).float()
        zero = (lo if method == "minmax" else lo - scale * 0.5).to(SCALE_DTYPE).float()
        codes = torch.round((xf - zero) / scale).clamp_(0, levels)
    elif method == "meanstd":
        if bits < 2:
            raise ValueError("meanstd quantiser needs at least 2 bits")
        half = (1 << (bits - 1)) - 1  # symmetric signed levels -half..half
        mu = xf.mean(dim, keepdim=True)
        sigma = xf.std(dim, keepdim=True, unbiased=False)
        scale = (s * sigma / torch.full_like(sigma, half)).clamp_min(1e-6).to(SCALE_DTYPE).float()
        zero = (mu - half * scale).to(SCALE_DTYPE).float()
        codes = torch.round((xf - zero) / scale).clamp_(0, 2 * half)
    else:
        raise ValueError(f"unknown quantiser {method!r}: expected 'minmax', 'nested' or 'meanstd'")
    return codes.to(torch.uint8), scale.to(SCALE_DTYPE), zero.to(SCALE_DTYPE)


# --- keys per channel (over the tokens of a block), values per token (over groups of channels) ---

def quantize_keys(k: torch.Tensor, bits: int, block_size: int, method: str = "minmax", s: float = 3.0):
    """Keys ``[Bt, H, n, D]`` (n a multiple of block_size), one (scale, zero) per channel per block.

    Returns ``(packed [Bt,H,n,D*c//8] uint8, scale [Bt,H,n//B,D], zero [Bt,H,n//B,D])``, c = container.
    """
    bt, h, n, d = k.shape
    blocks = k.reshape(bt, h, n // block_size, block_size, d)
    codes, scale, zero = quantize(blocks, bits, dim=3, method=method, s=s)
    packed = pack(codes.reshape(bt, h, n, d), container_bits(bits))
    return packed, scale.squeeze(3), zero.squeeze(3)


def dequantize_keys(packed, scale, zero, bits: int, block_size: int, dtype=torch.float32):
    """Inverse of ``quantize_keys`` -> ``[Bt, H, n, D]`` in ``dtype``."""
    codes = unpack(packed, container_bits(bits))
    bt, h, n, d = codes.shape
    x = dequantize(codes.reshape(bt, h, n // block_size, block_size, d), scale.unsqueeze(3), zero.unsqueeze(3), dtype)
    return x.reshape(bt, h, n, d)


def quantize_values(v: torch.Tensor, bits: int, group_size: int, method: str = "minmax", s: float = 3.0):
    """Values ``[Bt, H, n, D]``, one (scale, zero) per token per group of ``group_size`` channels.

    Returns ``(packed [Bt,H,n,D*c//8] uint8, scale [Bt,H,n,D//G], zero [Bt,H,n,D//G])``.
    """
    bt, h, n, d = v.shape
    g = value_group(d, group_size)
    codes, scale, zero = quantize(v.reshape(bt, h, n, d // g, g), bits, dim=4, method=method, s=s)
    packed = pack(codes.reshape(bt, h, n, d), container_bits(bits))
    return packed, scale.squeeze(4), zero.squeeze(4)


def narrow_values(packed, scale, zero, container: int, rows: torch.Tensor):
    """Nested values (``quantize_values(..., "nested")``, in ``container``) -> the min-max codes of one bit
    fewer their codes hold, at the entries where ``rows`` [n] bool is set (else as they are): code >> 1, scale
    x 2, zero + scale / 2; the same container. Quantised again at that width (min-max) they come back alike."""
    r, codes = rows[:, None], unpack(packed, container)
    codes = torch.where(r, codes >> 1, codes)
    s = scale.float()
    return (pack(codes, container), torch.where(r, s * 2, s).to(SCALE_DTYPE),
            torch.where(r, zero.float() + s * 0.5, zero.float()).to(SCALE_DTYPE))


def dequantize_values(packed, scale, zero, bits: int, dtype=torch.float32):
    """Inverse of ``quantize_values`` -> ``[Bt, H, n, D]`` in ``dtype``."""
    codes = unpack(packed, container_bits(bits))
    bt, h, n, d = codes.shape
    groups = scale.shape[-1]
    x = dequantize(codes.reshape(bt, h, n, groups, d // groups), scale.unsqueeze(-1), zero.unsqueeze(-1), dtype)
    return x.reshape(bt, h, n, d)


# --- keys in a basis (kernels/format.py): coefficients per block in groups of their own widths ---

def quantize_coeffs(c: torch.Tensor, groups, block_size: int, method: str = "minmax", s: float = 3.0,
                    meta: str = "fp16"):
    """Coefficients ``[Bt, H, n, r]`` -> ``(packed [Bt,H,n,sum(count*width)/8] uint8, scale, zero)``: each group
    ((width, count), ...) of coefficients per coefficient per block at its width (``quantize_keys``), packed by
    ``pack_groups``. ``meta`` "fp16": scale and zero [Bt,H,n/B,r] fp16; "8bit": coded (``_quantize_coeffs_8bit``:
    scale [Bt,H,n/B,r+2] uint8, zero [Bt,H,n/B,r] int8, read back by ``coeff_meta``; min-max whatever ``method``)."""
    if meta == "8bit":
        return _quantize_coeffs_8bit(c, groups, block_size)
    out, at = [], 0
    for w, n in groups:
        out.append(quantize_keys(c[..., at:at + n], w, block_size, method, s))
        at += n
    return tuple(torch.cat(ts, -1) for ts in zip(*out))


META_STEPS = 16  # an 8-bit scale code steps by 2^(1/16) below its block's reference (docs/tuning.md round 30)


def _quantize_coeffs_8bit(c: torch.Tensor, groups, block_size: int):
    """``quantize_coeffs`` with 8-bit metadata: per block, head and coefficient a step s = ref 2^(-e/16) (e uint8;
    ref, one fp16 a block and head, the largest step the block needs) and a zero z s (z int8): min-max where
    the block's range fits 127 steps of its minimum, else the step widened to fit (the zero a whole number of
    steps)."""
    bt, h, n, r = c.shape
    x = c.float().reshape(bt, h, n // block_size, block_size, r)
    lo, hi = x.amin(3), x.amax(3)  # [Bt, H, nb, r]
    levels = torch.cat([torch.full((cnt,), (1 << w) - 1.0, device=c.device) for w, cnt in groups])
    need = torch.maximum((hi - lo) / levels, lo.abs() / 127.0).clamp_min(1e-6)
    top = need.amax(-1, keepdim=True)
    ref = top.to(SCALE_DTYPE)
    ref = torch.where(ref.float() < top, torch.nextafter(ref, torch.full_like(ref, 1e4)), ref)  # fp16 at or above
    e = torch.floor(-META_STEPS * torch.log2(need / ref.float())).clamp_(0, 255).to(torch.uint8)
    scale = _meta_step(e, ref)
    z = torch.round(lo / scale.float()).clamp_(-128, 127).to(torch.int8)
    zero = _meta_zero(z, scale)  # codes are rounded against the step and zero read back (``coeff_meta``)
    codes = torch.round((x - zero.float().unsqueeze(3)) / scale.float().unsqueeze(3))
    codes = torch.minimum(codes.clamp_(min=0), levels).to(torch.uint8).reshape(bt, h, n, r)
    return pack_groups(codes, groups), torch.cat([e, ref.view(torch.uint8)], -1), z


def _meta_step(e: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The fp16 step of scale codes e [..., r] uint8 under ref [..., 1] fp16."""
    return (ref.float() * torch.exp2(-e.float() / META_STEPS)).to(SCALE_DTYPE)


def _meta_zero(z: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The fp16 zero of zero codes z [..., r] int8 in steps ``step`` [..., r] fp16."""
    return (z.float() * step.float()).to(SCALE_DTYPE)


def coeff_meta(k_scale: torch.Tensor, k_zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit coded metadata (``quantize_coeffs(..., meta="8bit")``: scale codes [..., r+2] uint8, the last two
    bytes the block's fp16 reference; zero [..., r] int8) -> (scale, zero) [..., r] fp16, as every reader
    takes them: x = code * scale + zero."""
    ref = k_scale[..., -2:].clone(memory_format=torch.contiguous_format).view(SCALE_DTYPE)  # [..., 1]
    scale = _meta_step(k_scale[..., :-2], ref)
    return scale, _meta_zero(k_zero, scale)


def dequantize_coeffs(part: Part, dtype=torch.float32) -> torch.Tensor:
    """A basis part's coefficients -> ``[Bt, H, n, r]`` in ``dtype`` (inverse of ``quantize_coeffs``)."""
    codes = unpack_groups(part.k, part.key_groups)
    bt, h, n, r = codes.shape
    B = part.key_block
    x = dequantize(codes.reshape(bt, h, n // B, B, r), part.k_scale.unsqueeze(3), part.k_zero.unsqueeze(3), dtype)
    return x.reshape(bt, h, n, r)


# --- magnitude pruning (seed 000 §2.4.2) and its sparse format ---

def kept_count(head_dim: int, rate: float) -> int:
    """Elements kept per vector at pruning rate ``rate``, rounded up to a multiple of 8 so the kept
    codes pack at any container width and blocks of equal rate share one sparse segment."""
    keep = head_dim - int(round(rate * head_dim))
    return max(8, min(head_dim, -(-keep // 8) * 8))


def kept_counts(head_dim: int, rates: torch.Tensor) -> torch.Tensor:
    """``kept_count`` for a tensor of rates -> int16 tensor."""
    keep = head_dim - torch.round(rates.double() * head_dim).long()
    return (torch.div(keep + 7, 8, rounding_mode="floor") * 8).clamp(8, head_dim).to(torch.int16)


def magnitude_prune_mask(x: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool mask ``like x`` keeping the ``keep`` largest-|x| elements of each vector (last dim)."""
    idx = x.abs().topk(keep, dim=-1, sorted=False).indices
    return torch.zeros_like(x, dtype=torch.bool).scatter_(-1, idx, True)


def sparse_encode(x: torch.Tensor, keep: int, bits: int, method: str = "minmax", s: float = 3.0):
    """Magnitude-prune each vector of ``x [..., D]`` to ``keep`` elements and store them sparse.

    Kept values are quantised to ``bits`` bits with one (scale, zero) per vector, in position order.
    Returns ``(bitmap [..., D//8] uint8, packed [..., keep*c//8] uint8, scale [..., 1], zero [..., 1])``.
    """
    mask = magnitude_prune_mask(x, keep)
    kept = x[mask].reshape(*x.shape[:-1], keep)  # row-major: position order within each vector
    codes, scale, zero = quantize(kept, bits, dim=-1, method=method, s=s)
    return pack_bitmap(mask), pack(codes, container_bits(bits)), scale, zero


# --- reading a stored part back ---

def dequantize_part(part: Part, dtype=torch.float32):
    """Any ``Part`` -> dense (k, v) [Bt, H, n, D] in ``dtype``, un-rotated: the reference read of what a
    layer holds (``LayerStore.attention_entries``, the reference of every decode backend)."""
    if part.kind == DENSE:
        return part.k.to(dtype), part.v.to(dtype)
    if part.kind == SPARSE:
        k = sparse_decode(part.k_map, part.k, part.k_scale, part.k_zero, part.code_bits)
        v = sparse_decode(part.v_map, part.v, part.v_scale, part.v_zero, part.code_bits)
        return k.to(dtype), v.to(dtype)
    if part.basis is not None:
        k = dequantize_coeffs(part)
    elif part.key_block:
        k = dequantize_keys(part.k, part.k_scale, part.k_zero, part.container, part.key_block)
    else:
        k = dequantize_values(part.k, part.k_scale, part.k_zero, part.container)
    v = dequantize_values(part.v, part.v_scale, part.v_zero, part.container)
    if part.rotated:
        v = rotate(v)
    if part.basis is not None:  # keys held as coefficients in a basis (never rotated)
        k = basis_keys(k, part.basis, part.inv_freq, part.pos)
    elif part.rotated:
        k = rotate(k)
    return k.to(dtype), v.to(dtype)
