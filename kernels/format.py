"""The storage format the kernels read, defined below the library (nothing here imports ``agacc``).

``agacc.quant`` re-exports every name here (its quantisers, the PyTorch references, are built on them),
so ``agacc.quant.container_bits`` and ``kernels.format.container_bits`` are one function.

Codes and containers: every quantised tensor is unsigned codes ``u`` with a ``scale`` and ``zero``
per group and dequantises as ``u * scale + zero`` (``dequantize``). Codes of ``b`` bits live in a
container of ``c`` in {2, 3, 4, 8} bits (``container_bits``): a 1-bit code costs a 2-bit container,
5..7-bit codes an 8-bit one. Scales and zeros are float16 (``SCALE_DTYPE``).

Packing (``pack``/``unpack``) works along the last dim: ``[..., D]`` codes become ``[..., D * c // 8]``
bytes. Containers 2, 4, 8: ``8 // c`` codes per byte, code ``j`` of a byte at bit ``j * c``
(little-endian). Container 3 is two bit planes in one row: the low two bits of every code packed as
container 2 (``D // 4`` bytes), then the high bit of every code one per bit (``D // 8`` bytes) -- no
code straddles a byte, so every kernel unpacks it with its 2-bit and 1-bit rules; D a multiple of 8.

Sparse (magnitude-pruned) vectors: a bitmap of the kept elements (``pack_bitmap``, bit j of byte i
is element 8i + j) and the kept values' codes in position order, one (scale, zero) per vector
(``sparse_decode``).

Rotation (``rotate``): a quantised K or V vector may be stored as ``x @ H``, H the orthonormal
Sylvester-Hadamard matrix on every run of ``rotation_size(D)`` channels (the largest power of two
dividing D). H is symmetric and orthogonal, so ``rotate`` is its own inverse and ``q . k = (q H) . (k H)``:
an attention kernel rotates the query once instead of un-rotating every key (QuaRot, Ashkboos et al.,
2024, arXiv:2404.00456).

Keys in a basis (``key_quant="basis"``, docs/tuning.md rounds 21-22): a quantised key vector may be
held as ``r`` coefficients ``c = frame(k, p, -1) @ proj`` (``proj`` [D, r], its KV head's, calibrated once
per model: the query-weighed principal axes of the keys before RoPE), quantised per coefficient per
block as keys are per channel, in groups of their own widths, the widest first (``key_groups``
((width, count), ...); each group's codes packed as ``pack`` packs them, the groups' bytes one after
the other in a row: ``pack_groups``). ``frame(x, p, sign)`` turns x by the rotary angles ``p * inv_freq`` on
Llama's ``rotate_half`` pairs (channel i with i + D/2): by the model's own ``inv_freq`` it undoes RoPE
(sign -1) and redoes it (+1), and whatever ``inv_freq`` is, redoing undoes undoing exactly, so a key
reads back ``basis_keys(c, axes, inv_freq, p) = frame(c @ axes, p, +1)`` (axes [r, D], proj's
pseudo-inverse) for any positions ``p`` the store gives both ways. A kernel rebuilds each key from its
coefficients before the dot with the query (a position's rotation cannot be moved to the query once). The
axes themselves are held as the Householder reflectors that make them (``axes_reflectors``), read back once
a read (``basis_axes``): orthonormal whatever the rounding, in 58% of a dense table's entries (docs/tuning.md
round 37).

``Part``: one stretch of a layer's attention entries as it is held (``agacc.store.LayerStore.parts``
lists them in attention order); every decode backend reads a list of parts.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

CONTAINERS = (2, 3, 4, 8)
SCALE_DTYPE = torch.float16

DENSE, QUANT, SPARSE = "dense", "quant", "sparse"


def container_bits(bits: int) -> int:
    """Smallest storage container (2, 3, 4 or 8 bits) that holds ``bits``-bit codes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    return next(c for c in CONTAINERS if bits <= c)


CONTAINER_OF = torch.tensor([0] + [container_bits(b) for b in range(1, 9)], dtype=torch.int8)  # code bits -> container


def value_group(head_dim: int, group_size: int) -> int:
    """Channels per value group: ``group_size`` if it divides the head dim, else gcd(head_dim, group_size)
    (e.g. head dim 96 with groups of 64 -> 32)."""
    return math.gcd(head_dim, group_size)


def pack_unit(bits: int) -> int:
    """Codes of a container of ``bits`` (2, 3, 4, 8) that fill whole bytes: ``pack`` needs a multiple of it
    (3 bits: 8, the two planes' bytes)."""
    return 8 // math.gcd(8, bits)


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


def pack_groups(codes: torch.Tensor, groups) -> torch.Tensor:
    """uint8 codes [..., r] in groups ((width, count), ...), r their counts' sum -> each group's ``pack`` at its
    width, joined along the last dim: [..., sum(count * width) / 8]."""
    out, at = [], 0
    for w, n in groups:
        out.append(pack(codes[..., at:at + n], w))
        at += n
    return torch.cat(out, -1)


def unpack_groups(packed: torch.Tensor, groups) -> torch.Tensor:
    """Inverse of ``pack_groups`` -> uint8 codes [..., r]."""
    out, at = [], 0
    for w, n in groups:
        out.append(unpack(packed[..., at:at + n * w // 8], w))
        at += n * w // 8
    return torch.cat(out, -1)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype=torch.float32):
    """``codes * scale + zero`` (broadcast), in ``dtype``."""
    return torch.addcmul(zero.to(dtype), codes.to(dtype), scale.to(dtype))


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


def sparse_decode(bitmap, packed, scale, zero, bits: int, dtype=torch.float32) -> torch.Tensor:
    """Sparse vectors -> dense ``[..., D]`` with pruned elements exactly zero (inverse of
    ``agacc.quant.sparse_encode``): bitmap [..., D/8], kept codes [..., keep*c/8] of ``bits`` bits in
    position order, scale/zero [..., 1]."""
    mask = unpack_bitmap(bitmap)
    vals = dequantize(unpack(packed, container_bits(bits)), scale, zero, dtype)
    out = torch.zeros(mask.shape, dtype=dtype, device=bitmap.device)
    out[mask] = vals.reshape(-1)
    return out


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


def frame(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, sign: int) -> torch.Tensor:
    """x [..., n, D] -> fp32 x turned by the angles ``pos`` [n] x ``inv_freq`` [D/2] on ``rotate_half`` pairs
    (channel i with i + D/2): RoPE applied (``sign`` 1) or undone (-1), each the other's inverse."""
    ang = pos.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]       # [n, D/2]
    cos, sin = ang.cos(), ang.sin() * sign
    x = x.float()
    a, b = x.chunk(2, -1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)


def basis_keys(coeffs: torch.Tensor, axes: torch.Tensor, inv_freq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Keys read back from their coefficients: coeffs [Bt, H, n, r], axes [H, r, D] -> fp32 [Bt, H, n, D]
    (``frame(coeffs @ axes, pos, inv_freq, +1)``)."""
    return frame(coeffs.float() @ axes.float(), pos, inv_freq, 1)


def basis_coeffs(k: torch.Tensor, proj: torch.Tensor, inv_freq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Keys k [Bt, H, n, D] at positions pos [n] -> fp32 coefficients [Bt, H, n, r] (proj [H, D, r]):
    ``frame(k, pos, inv_freq, -1) @ proj``."""
    return frame(k, pos, inv_freq, -1) @ proj.float()


def axes_reflectors(V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Axes V [H, D, r] (orthonormal columns, by decreasing energy) -> the Householder reflectors that make them,
    as a store holds them (``basis_axes`` reads them back): codes [H, P] int8, P = r (D - 1) - r (r - 1) / 2,
    the entries below the diagonal of ``torch.geqrf``'s reflectors in ``torch.tril_indices(D, r, -1)`` order,
    and scales [H, r] fp16, one a reflector (symmetric: entry = code x scale). An orthonormal D x r matrix has
    P degrees of freedom, D r numbers: 58% of them at D = 64, r = 53."""
    h, d, r = V.shape
    a, _ = torch.geqrf(V.float())
    low = torch.tril(a, -1)  # a reflector's entries are at most 1 in magnitude (LAPACK's choice of sign)
    scale = (low.abs().amax(1) / 127).clamp_min(1e-8).to(SCALE_DTYPE)  # [H, r]
    rows, cols = torch.tril_indices(d, r, -1, device=V.device)
    codes = torch.round(low / scale.float()[:, None, :]).clamp_(-127, 127)[:, rows, cols]
    return codes.to(torch.int8), scale


def basis_axes(w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, r: int | None = None) -> torch.Tensor:
    """A basis' first ``r`` axes (None: all R), [H, r, D] fp32 = (Q / w)^T, from the query weights w [H, D] and the
    axes held as Householder reflectors (``axes_reflectors``: codes [H, P] int8, scales [H, R] fp16): Q [H, D, r]
    = H_1 ... H_r I[:, :r], H_j = I - tau_j v_j v_j^T, v_j the j-th reflector read back (its diagonal entry 1)
    and tau_j = 2 / |v_j|^2, so Q is orthonormal to fp32 rounding whatever the codes' rounding (which turns
    the axes a little instead of skewing them). Coefficients are taken with their pseudo-inverse
    ``torch.linalg.pinv(axes)`` [H, D, r] (Q * w only where r = D: below that the least-squares fit in the key's
    own frame, not the query-weighed one), ``basis_coeffs`` then ``basis_keys``: the key projected on the axes'
    span."""
    h, big_r = scale.shape
    d = w.shape[-1]
    rows, cols = torch.tril_indices(d, big_r, -1, device=codes.device)
    v = torch.zeros(h, d * big_r, device=codes.device).scatter_(1, (rows * big_r + cols).expand(h, -1), codes.float())
    v = (v.view(h, d, big_r) * scale.float()[:, None, :])[:, :, :r]
    q = torch.linalg.householder_product(v, 2 / (1 + v.pow(2).sum(1)))
    return (q / w.float()[:, :, None]).transpose(1, 2).contiguous()


@dataclass(frozen=True)
class Part:
    """One stretch of attention entries as it is held; shapes [Bt, H, n, ...], n = ``self.n`` entries.

    kind ``"dense"``: k, v [Bt, H, n, D] in any float dtype; ``bias`` None or [n] fp32 added to the
        logits (the markers' log count).
    kind ``"quant"``: k, v packed codes [Bt, H, n, D*c/8] uint8 in ``container`` c (2, 3, 4, 8);
        k_scale/k_zero fp16 [Bt, H, n/key_block, D] (keys per channel per block of ``key_block`` tokens)
        or, with ``key_block == 0``, [Bt, H, n, D/key_group] (keys per token per group of ``key_group``
        channels); v_scale/v_zero fp16 [Bt, H, n, D/value_group]. ``rotated``: the codes are of K H and
        V H (``rotate``), so a kernel meets them with the rotated query and rotates their share of the
        output back.
    kind ``"sparse"``: k_map, v_map bitmaps [Bt, H, n, D/8]; k, v the ``keep`` kept values per vector as
        ``code_bits``-bit codes in ``container`` c, [Bt, H, n, keep*c/8]; scales/zeros fp16 [Bt, H, n, 1]
        (``sparse_decode``).
    ``basis`` (kind "quant", keys per channel per block): axes [H, r, D] fp32; the key codes and scales
        are of the r coefficients in ``key_groups`` ((width, count), ...; ``pack_groups``: [Bt, H, n,
        sum(count*width)/8]; scales [Bt, H, n/key_block, r]), read back by ``basis_keys`` with ``inv_freq``
        [D/2] fp32 at ``pos`` [n] int32 (the entries' positions); ``rotated`` then means the values alone;
        ``container`` the values'."""

    kind: str
    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor | None = None
    k_scale: torch.Tensor | None = None
    k_zero: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    v_zero: torch.Tensor | None = None
    k_map: torch.Tensor | None = None
    v_map: torch.Tensor | None = None
    container: int = 0
    key_block: int = 0
    key_group: int = 0
    value_group: int = 0
    rotated: bool = False
    keep: int = 0
    code_bits: int = 0
    basis: torch.Tensor | None = None
    key_groups: tuple = ()
    inv_freq: torch.Tensor | None = None
    pos: torch.Tensor | None = None

    @property
    def n(self) -> int:
        """Entries held (tokens, or markers)."""
        return int(self.k.shape[2])

    @property
    def heads(self) -> int:
        return int(self.k.shape[1])

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.k.shape))
        extra = {QUANT: f" container={self.container} key_block={self.key_block} key_group={self.key_group} "
                        f"value_group={self.value_group} rotated={self.rotated}"
                        + ("" if self.basis is None else f" basis={self.key_groups}"),
                 SPARSE: f" container={self.container} keep={self.keep} code_bits={self.code_bits}",
                 DENSE: f" {self.k.dtype} bias={self.bias is not None}"}.get(self.kind, "")
        return f"Part({self.kind} k[{shape}]{extra})"


def slice_part(part: Part, lo: int, hi: int) -> Part:
    """Entries ``lo:hi`` of ``part`` (views, no copy). A part whose keys are grouped per channel per
    block of ``key_block`` tokens is sliced on such blocks (``lo`` a multiple of it)."""
    kb = part.key_block
    if kb and lo % kb:
        raise ValueError(f"slice_part: lo={lo} is not a multiple of the key block {kb}")
    rows = {name: getattr(part, name)[:, :, lo:hi] for name in ("k", "v", "v_scale", "v_zero", "k_map", "v_map")
            if getattr(part, name) is not None}
    if part.pos is not None:
        rows["pos"] = part.pos[lo:hi]
    if part.k_scale is not None:
        kr = slice(lo // kb, -(-hi // kb)) if kb else slice(lo, hi)
        rows.update(k_scale=part.k_scale[:, :, kr], k_zero=part.k_zero[:, :, kr])
    if part.bias is not None:
        rows["bias"] = part.bias[lo:hi]
    return dataclasses.replace(part, **rows)
