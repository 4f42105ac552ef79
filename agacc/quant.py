"""Quantisers, bit packing and magnitude pruning: the PyTorch reference of every storage format.

Every quantised tensor is stored as unsigned codes ``u`` plus a ``scale`` and ``zero`` per group,
and always dequantises as ``x ~= u * scale + zero`` (both quantisers below), so one dequantiser
and one kernel serve both. Codes of ``b`` bits live in a container of ``c`` in {2, 3, 4, 8} bits
(``container_bits``); a 1-bit code costs a 2-bit container, 5..7-bit codes an 8-bit one.

Packing (``pack``/``unpack``) works along the last dim, so ``[..., D]`` uint8 codes become
``[..., D * c // 8]`` bytes. Containers 2, 4, 8: ``8 // c`` codes per byte, code ``j`` of a byte at
bit offset ``j * c`` (little-endian). Container 3 is two bit planes in one row: the low two bits
of every code packed as container 2 (``D // 4`` bytes), then the high bit of every code one per
bit (``D // 8`` bytes) -- no code straddles a byte, so every kernel unpacks it with the 2-bit and
1-bit rules it already has; D must be a multiple of 8.

Scales and zeros are float16 (2 bytes each).

Rotation (``rotate``): a quantised K or V vector may be stored as ``x @ H`` with ``H`` the
orthonormal Sylvester-Hadamard matrix applied to every run of R channels (R the largest power of
two dividing D, so one 64 x 64 block for head dim 64). H is symmetric and orthogonal, so the same
call undoes it, and ``q . k = (q H) . (k H)``: an attention kernel rotates the query once instead
of un-rotating every key. Rotation spreads the few outlier channels of a vector over all of its
channels, so a per-token min-max group loses far less to them (QuaRot, Ashkboos et al., 2024,
arXiv:2404.00456).
"""
from __future__ import annotations

import math

import torch

CONTAINERS = (2, 3, 4, 8)
SCALE_DTYPE = torch.float16


def container_bits(bits: int) -> int:
    """Smallest storage container (2, 3, 4 or 8 bits) that holds ``bits``-bit codes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    return next(c for c in CONTAINERS if bits <= c)


CONTAINER_OF = torch.tensor([0] + [container_bits(b) for b in range(1, 9)], dtype=torch.int8)  # code bits -> container


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``[..., D]`` (values < 2**bits) into ``[..., D * bits // 8]`` bytes."""
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    if bits == 3:  # low-two-bit plane, then high-bit plane
        c = codes.to(torch.uint8)
        return torch.cat([pack(c & 3, 2), pack(c >> 2, 1)], -1)
    per_byte = 8 // bits
    d = codes.shape[-1]
    if d % per_byte:
        raise ValueError(f"last dim {d} is not a multiple of {per_byte} for {bits}-bit packing")
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], d // per_byte, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (c << shifts).sum(-1, dtype=torch.uint8)  # disjoint bit fields: sum == bitwise or


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack``: ``[..., n]`` bytes -> ``[..., n * 8 // bits]`` uint8 codes."""
    if bits == 8:
        return packed
    if bits == 3:
        lo = packed.shape[-1] * 2 // 3  # D // 4 bytes of the low plane, then D // 8 of the high one
        return unpack(packed[..., :lo], 2) | (unpack(packed[..., lo:], 1) << 2)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    codes = (packed.unsqueeze(-1) >> shifts) & mask
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * (8 // bits))


def quantize(x: torch.Tensor, bits: int, dim: int, method: str = "minmax", s: float = 3.0):
    """Quantise ``x`` to ``bits``-bit codes with one (scale, zero) per slice reduced over ``dim``.

    method="minmax": asymmetric, scale = (max - min) / (2**bits - 1), zero = min;
        error <= scale / 2 everywhere.
    method="meanstd" (seed 000 §2.4.1): x~ = round((x-mu)/sigma * (2**(b-1)-1)/s) * s*sigma/(2**(b-1)-1) + mu,
        codes clipped to +-(2**(b-1)-1) so values beyond s standard deviations saturate;
        error <= scale / 2 for |x - mu| <= s * sigma.

    Returns ``(codes uint8 like x, scale, zero)`` with ``dim`` kept as size 1, scale/zero float16.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    xf = x.float()
    if method == "minmax":
        lo = xf.amin(dim, keepdim=True)
        hi = xf.amax(dim, keepdim=True)
        levels = (1 << bits) - 1
        scale = ((hi - lo) / levels).clamp_min(1e-6).to(SCALE_DTYPE).float()
        zero = lo.to(SCALE_DTYPE).float()
        codes = torch.round((xf - zero) / scale).clamp_(0, levels)
    elif method == "meanstd":
        if bits < 2:
            raise ValueError("meanstd quantiser needs at least 2 bits")
        half = (1 << (bits - 1)) - 1  # symmetric signed levels -half..half
        mu = xf.mean(dim, keepdim=True)
        sigma = xf.std(dim, keepdim=True, unbiased=False)
        scale = (s * sigma / half).clamp_min(1e-6).to(SCALE_DTYPE).float()
        zero = (mu - half * scale).to(SCALE_DTYPE).float()
        codes = torch.round((xf - zero) / scale).clamp_(0, 2 * half)
    else:
        raise ValueError(f"unknown quantiser {method!r}: expected 'minmax' or 'meanstd'")
    return codes.to(torch.uint8), scale.to(SCALE_DTYPE), zero.to(SCALE_DTYPE)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype=torch.float32):
    """``codes * scale + zero`` (broadcast), in ``dtype``."""
    return torch.addcmul(zero.to(dtype), codes.to(dtype), scale.to(dtype))


_HADAMARD: dict = {}


def rotation_size(head_dim: int) -> int:
    """Channels per Hadamard block: the largest power of two dividing ``head_dim``."""
    return head_dim & -head_dim


def hadamard(n: int, device=None) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix [n, n] fp32 (n a power of two), symmetric: H @ H = I."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    key = (n, torch.device(device) if device is not None else torch.device("cpu"))
    h = _HADAMARD.get(key)
    if h is None:
        h = torch.ones(1, 1)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        h = _HADAMARD[key] = (h / math.sqrt(n)).to(key[1])
    return h


def rotate(x: torch.Tensor) -> torch.Tensor:
    """``x [..., D]`` -> fp32 ``x`` with every run of ``rotation_size(D)`` channels multiplied by the
    Hadamard matrix; its own inverse (``rotate(rotate(x)) == x`` up to rounding)."""
    d = x.shape[-1]
    r = rotation_size(d)
    h = hadamard(r, x.device)
    return (x.float().reshape(*x.shape[:-1], d // r, r) @ h).reshape(x.shape)


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


def value_group(head_dim: int, group_size: int) -> int:
    """Channels per value group: ``group_size`` if it divides the head dim, else gcd(head_dim, group_size)
    (e.g. head dim 96 with groups of 64 -> 32)."""
    return math.gcd(head_dim, group_size)


def dequantize_values(packed, scale, zero, bits: int, dtype=torch.float32):
    """Inverse of ``quantize_values`` -> ``[Bt, H, n, D]`` in ``dtype``."""
    codes = unpack(packed, container_bits(bits))
    bt, h, n, d = codes.shape
    groups = scale.shape[-1]
    x = dequantize(codes.reshape(bt, h, n, groups, d // groups), scale.unsqueeze(-1), zero.unsqueeze(-1), dtype)
    return x.reshape(bt, h, n, d)


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


def pack_bitmap(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``[..., D]`` -> uint8 ``[..., D // 8]`` (bit j of byte i is element 8i + j)."""
    d = mask.shape[-1]
    m = mask.to(torch.uint8).reshape(*mask.shape[:-1], d // 8, 8)
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    return (m << shifts).sum(-1, dtype=torch.uint8)


def unpack_bitmap(bitmap: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_bitmap`` -> bool ``[..., 8 * n]``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmap.device)
    bits = (bitmap.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*bitmap.shape[:-1], bitmap.shape[-1] * 8).bool()


def sparse_encode(x: torch.Tensor, keep: int, bits: int, method: str = "minmax", s: float = 3.0):
    """Magnitude-prune each vector of ``x [..., D]`` to ``keep`` elements and store them sparse.

    Kept values are quantised to ``bits`` bits with one (scale, zero) per vector, in position order.
    Returns ``(bitmap [..., D//8] uint8, packed [..., keep*c//8] uint8, scale [..., 1], zero [..., 1])``.
    """
    mask = magnitude_prune_mask(x, keep)
    kept = x[mask].reshape(*x.shape[:-1], keep)  # row-major: position order within each vector
    codes, scale, zero = quantize(kept, bits, dim=-1, method=method, s=s)
    return pack_bitmap(mask), pack(codes, container_bits(bits)), scale, zero


def sparse_decode(bitmap, packed, scale, zero, bits: int, dtype=torch.float32) -> torch.Tensor:
    """Inverse of ``sparse_encode``: dense ``[..., D]`` with pruned elements exactly zero."""
    mask = unpack_bitmap(bitmap)
    vals = dequantize(unpack(packed, container_bits(bits)), scale, zero, dtype)
    out = torch.zeros(mask.shape, dtype=dtype, device=bitmap.device)
    out[mask] = vals.reshape(-1)
    return out
