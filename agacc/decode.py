"""Decode attention (one query step) straight from the packed store, in PyTorch.

This is the CPU path (CUDA uses the Triton kernel; both are checked against the reference
``attention.attend`` over dequantised entries). Packed rows are transposed before they are unpacked
(``_codes_t``: ``[n, bytes]`` -> ``[bytes, n]``, so every shift and mask runs along the n tokens,
not along a row of a few bytes), which yields the codes as ``[D, n]``, the layout ``q @ K^T``
multiplies by. Scales and zero points are applied inside the products, so the only float copy of a
segment is a transient one inside the step, never held:

* keys per token (scale/zero per token per channel group r): q.k_t = sum_r scale_tr (q_r . codes_tr)
  + zero_tr sum(q_r); keys per channel per block: q.k = q . (scale * codes) + q . zero, the zero
  point one bias per block;
* values (scale/zero per token per channel group): p.v = sum_t (p_t*scale_t) codes_t + sum_t p_t*zero_t.

Rotated segments (``cfg.rotate``) meet the rotated query (``q H . k H = q . k``), and their share
of the output is summed apart and rotated back once (``(P V H) H = P V``).

On the CPU the whole step runs in the fused C++ kernel of ``kernels/cpu.py`` when it has been built
(one call per layer instead of a few dozen tensor ops); the PyTorch code here is its reference and
its fallback.

Shapes: query [Bt, Hq, 1, D]; KV heads H, g = Hq / H; scores [Bt, H, g, n].
"""
from __future__ import annotations

import torch

from agacc import quant

try:  # the fused CPU kernel (kernels/ sits beside agacc/ in the repository)
    from kernels import cpu as _cpu_kernel
except ImportError:
    _cpu_kernel = None

_SHIFTS: dict = {}


def _split(packed_t: torch.Tensor, c: int) -> torch.Tensor:
    """uint8 [..., m, n] with 8 // c codes of c in {1, 2, 4} bits per byte -> uint8 [..., m, 8 // c, n]
    (code j of byte i, at bit j * c, is channel i * (8 // c) + j: ``agacc.quant.pack``'s layout)."""
    key = (c, packed_t.device)
    shifts = _SHIFTS.get(key)
    if shifts is None:
        shifts = _SHIFTS[key] = torch.arange(0, 8, c, dtype=torch.uint8, device=packed_t.device).view(-1, 1)
    return (packed_t.unsqueeze(-2) >> shifts) & ((1 << c) - 1)


def _codes_t(packed: torch.Tensor, container: int) -> torch.Tensor:
    """uint8 [..., n, m] packed rows -> float32 codes [..., D, n] (transposed, channels in order).
    The 3-bit container is its two planes (low two bits, then the high bit) unpacked and joined:
    the low plane's [D/4, 4] codes viewed as [D/8, 8] line up with the high plane's bits. 8-bit codes
    have nothing to unpack: they come back as a transposed view of their float copy."""
    if container == 8:
        return packed.float().transpose(-1, -2)
    pt = packed.transpose(-1, -2).contiguous()
    if container == 3:
        lo = pt.shape[-2] * 2 // 3
        high = _split(pt[..., lo:, :], 1)                                     # [..., D/8, 8, n]
        codes = _split(pt[..., :lo, :], 2).view(high.shape) | (high << 2)
    else:
        codes = _split(pt, container)
    return codes.flatten(-3, -2).float()


def _key_scores(qg, seg, B):
    """qg [Bt,H,g,D] fp32 (rotated when the segment is) -> scores [Bt,H,g,n] over a QuantSegment."""
    bt, h, g, d = qg.shape
    codes = _codes_t(seg.k, seg.container)                               # [Bt,H,D,n]
    n = codes.shape[-1]
    if seg.key_per_token:  # q.k_t = sum_r scale_tr (q_r . codes_tr) + zero_tr sum(q_r), r the channel groups
        scale, zero = seg.k_scale.float(), seg.k_zero.float()                # [Bt,H,n,ngrp]
        ngrp = scale.shape[-1]
        if ngrp == 1:
            dots = torch.matmul(qg, codes)                               # [Bt,H,g,n]
            return dots * scale[..., 0].unsqueeze(2) + qg.sum(-1, keepdim=True) * zero[..., 0].unsqueeze(2)
        q_grp = qg.view(bt, h, g, ngrp, d // ngrp)
        dots = torch.einsum("bhgrc,bhrcn->bhgnr", q_grp, codes.view(bt, h, ngrp, d // ngrp, n))
        return (dots * scale.unsqueeze(2)).sum(-1) + torch.matmul(q_grp.sum(-1), zero.transpose(-1, -2))
    nblk = seg.k_scale.shape[2]  # per channel per block: q.k = q . (scale * codes) + q . zero
    k_t = (codes.view(bt, h, d, nblk, B) * seg.k_scale.float().transpose(-1, -2).unsqueeze(-1)).view(bt, h, d, n)
    bias = torch.matmul(qg, seg.k_zero.float().transpose(-1, -2))          # [Bt,H,g,nblk]
    scores = torch.matmul(qg, k_t).view(bt, h, g, nblk, B) + bias.unsqueeze(-1)
    return scores.view(bt, h, g, n)


def _value_out(p, seg):
    """p [Bt,H,g,n] fp32 -> sum_t p_t v_t [Bt,H,g,D] over a QuantSegment."""
    bt, h, g, n = p.shape
    ngrp = seg.v_scale.shape[-1]
    codes = _codes_t(seg.v, seg.container)                               # [Bt,H,D,n]
    d = codes.shape[-2]
    zero = torch.matmul(p, seg.v_zero.float())                           # [Bt,H,g,ngrp]
    if ngrp == 1:
        return torch.matmul(p * seg.v_scale.float()[..., 0].unsqueeze(2), codes.transpose(-1, -2)) + zero
    ps = p.unsqueeze(-1) * seg.v_scale.float()[:, :, None]                # [Bt,H,g,n,ngrp]
    out = torch.einsum("bhgtr,bhret->bhgre", ps, codes.view(bt, h, ngrp, d // ngrp, n))
    return (out + zero.unsqueeze(-1)).reshape(bt, h, g, d)


def _fused_kernel_for(query: torch.Tensor, mask) -> bool:
    """Whether the fused CPU kernel (``kernels.cpu``; built on first use) runs this step."""
    return mask is None and query.device.type == "cpu" and _cpu_kernel is not None and _cpu_kernel.load() is not None


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
    if _fused_kernel_for(query, mask):
        out, mass = _cpu_kernel.decode_layer(qg, store)
        return out.reshape(bt, hq, 1, d).transpose(1, 2).to(query.dtype), mass
    qr = None  # the rotated query, made when a rotated segment needs it (none in the lossless preset)
    B = store.B
    parts = []  # (scores, value_fn, output rotated?)
    for seg in store.segments:
        if not seg.n_blocks:
            continue
        if seg is store.full:
            k, v = seg.k.float(), seg.v.float()
            parts.append((torch.matmul(qg, k.transpose(-1, -2)), lambda p, v=v: torch.matmul(p, v), False))
        elif hasattr(seg, "container"):
            if seg.rotated and qr is None:
                qr = quant.rotate(qg)
            seg_scores = _key_scores(qr if seg.rotated else qg, seg, B)
            parts.append((seg_scores, lambda p, seg=seg: _value_out(p, seg), seg.rotated))
        else:  # sparse (pruned): decoded densely
            k, v = seg.dequantized(torch.float32)
            parts.append((torch.matmul(qg, k.transpose(-1, -2)), lambda p, v=v: torch.matmul(p, v), False))
    m = store.markers
    if m.n:
        k, v = m.k.float(), m.v.float()
        parts.append((torch.matmul(qg, k.transpose(-1, -2)) + m.log_count, lambda p, v=v: torch.matmul(p, v), False))
    if store.hot_k is not None and store.hot_k.shape[2]:
        k, v = store.hot_k.float(), store.hot_v.float()
        parts.append((torch.matmul(qg, k.transpose(-1, -2)), lambda p, v=v: torch.matmul(p, v), False))
    scores = torch.cat([s for s, _, _ in parts], -1)
    if mask is not None:
        m4 = mask[..., -1:, :].reshape(bt, 1, 1, -1)
        scores = scores.masked_fill(~m4, float("-inf")) if m4.dtype == torch.bool else scores + m4.float()
    probs = scores.softmax(-1)
    sums = {False: 0.0, True: 0.0}  # rotated outputs are summed apart and rotated back once
    lo = 0
    for s, value_fn, rotated in parts:
        n = s.shape[-1]
        sums[rotated] = sums[rotated] + value_fn(probs[..., lo:lo + n])
        lo += n
    out = sums[False] + quant.rotate(sums[True]) if torch.is_tensor(sums[True]) else sums[False]
    mass = probs.sum(dim=(1, 2)).mean(0) / hq
    return out.reshape(bt, hq, 1, d).transpose(1, 2).to(query.dtype), mass
