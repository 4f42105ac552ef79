"""Decode attention (one query step) straight from the packed store, in PyTorch.

This is the CPU path (CUDA uses the Triton kernel; both are checked against the reference
``attention.attend`` over dequantised entries). Packed bytes are unpacked a 32-bit word at a time
(``_codes``: little-endian, so the codes come out in channel order); scales and
zero points are applied inside the products, so the only float copy of a segment is a transient
one inside the step, never held:

* keys (scale/zero per channel per block): q.k = q . (scale * codes) + q . zero, the zero point one
  bias per block;
* values (scale/zero per token per channel group): p.v = sum_t (p_t*scale_t) codes_t + sum_t p_t*zero_t.

Shapes: query [Bt, Hq, 1, D]; KV heads H, g = Hq / H; scores [Bt, H, g, n].
"""
from __future__ import annotations

import sys

import torch

_LUT: dict = {}
_SHIFTS: dict = {}


def _codes(packed: torch.Tensor, container: int) -> torch.Tensor:
    """uint8 [..., m] -> float32 codes [..., m * 8 // c] in channel order (``agacc.quant.pack``'s layout).
    The 3-bit container is its two planes (low two bits, then the high bit) unpacked and joined."""
    if container == 8:
        return packed.float()
    if container == 3:
        lo = packed.shape[-1] * 2 // 3
        return (_plane(packed[..., :lo], 2) | (_plane(packed[..., lo:], 1) << 2)).float()
    return _plane(packed, container).float()


def _plane(packed: torch.Tensor, c: int) -> torch.Tensor:
    """uint8 [..., m] with 8 // c codes of c in {1, 2, 4} bits per byte (code j of byte i is channel
    i * (8 // c) + j) -> integer codes [..., m * 8 // c]. Four bytes at a time as one little-endian int32
    (code k at bit k * c) where the row is a whole number of words, else one lookup per byte in a
    [256, 8 // c] table."""
    mask = (1 << c) - 1
    key = (c, packed.device)
    if packed.shape[-1] % 4 == 0 and packed.stride(-1) == 1 and packed.storage_offset() % 4 == 0 \
            and all(st % 4 == 0 for st in packed.stride()[:-1]) and sys.byteorder == "little":
        shifts = _SHIFTS.get(key)
        if shifts is None:
            shifts = _SHIFTS[key] = torch.arange(0, 32, c, dtype=torch.int32, device=packed.device)
        words = packed.view(torch.int32).unsqueeze(-1)
        return ((words >> shifts) & mask).flatten(-2)
    lut = _LUT.get(key)
    if lut is None:
        per = 8 // c
        b = torch.arange(256)
        lut = _LUT[key] = torch.stack([(b >> (j * c)) & mask for j in range(per)], -1).to(torch.int32).to(packed.device)
    return lut[packed.long()].flatten(-2)


def _key_scores(qg, seg, B):
    """qg [Bt,H,g,D] fp32 -> scores [Bt,H,g,n] over a QuantSegment."""
    bt, h, g, d = qg.shape
    nblk = seg.k_scale.shape[2]
    codes = _codes(seg.k, seg.container).view(bt, h, nblk, B, d)
    k = (codes * seg.k_scale.float()[:, :, :, None, :]).view(bt, h, nblk * B, d)
    bias = torch.matmul(qg, seg.k_zero.float().transpose(-1, -2))          # [Bt,H,g,nblk]
    scores = torch.matmul(qg, k.transpose(-1, -2)).view(bt, h, g, nblk, B) + bias.unsqueeze(-1)
    return scores.view(bt, h, g, nblk * B)


def _value_out(p, seg):
    """p [Bt,H,g,n] fp32 -> sum_t p_t v_t [Bt,H,g,D] over a QuantSegment."""
    bt, h, g, n = p.shape
    ngrp = seg.v_scale.shape[-1]
    codes = _codes(seg.v, seg.container)                                 # [Bt,H,n,D]
    d = codes.shape[-1]
    zero = torch.matmul(p, seg.v_zero.float())                           # [Bt,H,g,ngrp]
    if ngrp == 1:
        return torch.matmul(p * seg.v_scale.float()[..., 0].unsqueeze(2), codes) + zero
    ps = p.unsqueeze(-1) * seg.v_scale.float()[:, :, None]                # [Bt,H,g,n,ngrp]
    out = torch.einsum("bhgtr,bhtre->bhgre", ps, codes.view(bt, h, n, ngrp, d // ngrp))
    return (out + zero.unsqueeze(-1)).reshape(bt, h, g, d)


def decode_attention(query: torch.Tensor, store, scaling: float, mask: torch.Tensor | None = None):
    """One decode step over everything ``store`` holds.

    query [Bt, Hq, 1, D] -> (out [Bt, 1, Hq, D] in query dtype, mass [n_entries] fp32) with entries in
    ``LayerStore.attention_entries`` order and mass normalised as in ``attention.attend``.
    mask: optional [Bt, 1, 1, n_entries] (bool: True = visible, or additive float), for stores whose
    entries are in position order (the lossless preset with padded batches)."""
    bt, hq, _, d = query.shape
    h = store.hot_k.shape[1] if store.hot_k is not None else store.full.k.shape[1]
    g = hq // h
    qg = query.reshape(bt, h, g, d).float() * scaling
    B = store.B
    parts = []  # (scores, value_fn)
    for seg in store.segments:
        if not seg.n_blocks:
            continue
        if seg is store.full:
            k, v = seg.k.float(), seg.v.float()
            parts.append((torch.matmul(qg, k.transpose(-1, -2)), lambda p, v=v: torch.matmul(p, v)))
        elif hasattr(seg, "container"):
            parts.append((_key_scores(qg, seg, B), lambda p, seg=seg: _value_out(p, seg)))
        else:  # sparse (pruned): decoded densely
            k, v = seg.dequantized(torch.float32)
            parts.append((torch.matmul(qg, k.transpose(-1, -2)), lambda p, v=v: torch.matmul(p, v)))
    m = store.markers
    if m.n:
        k, v = m.k.float(), m.v.float()
        parts.append((torch.matmul(qg, k.transpose(-1, -2)) + m.log_count, lambda p, v=v: torch.matmul(p, v)))
    if store.hot_k is not None and store.hot_k.shape[2]:
        k, v = store.hot_k.float(), store.hot_v.float()
        parts.append((torch.matmul(qg, k.transpose(-1, -2)), lambda p, v=v: torch.matmul(p, v)))
    scores = torch.cat([s for s, _ in parts], -1)
    if mask is not None:
        m4 = mask[..., -1:, :].reshape(bt, 1, 1, -1)
        scores = scores.masked_fill(~m4, float("-inf")) if m4.dtype == torch.bool else scores + m4.float()
    probs = scores.softmax(-1)
    out = None
    lo = 0
    for s, value_fn in parts:
        n = s.shape[-1]
        o = value_fn(probs[..., lo:lo + n])
        out = o if out is None else out + o
        lo += n
    mass = probs.sum(dim=(1, 2)).mean(0) / hq
    return out.reshape(bt, hq, 1, d).transpose(1, 2).to(query.dtype), mass
