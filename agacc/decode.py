"""Decode attention (one query step) straight from the packed store, in PyTorch.

This is the CPU path (CUDA uses the Triton kernel; both are checked against the reference
``attention.attend`` over dequantised entries). It never materialises dequantised K/V:

* codes are split into bit *planes* with float arithmetic (``hi = floor(p / 2^c)``, ``lo = p - 2^c hi``),
  which vectorises, where uint8 shifts do not; plane j holds channels j, j + 8/c, j + 2*8/c, ...
* keys (scale/zero per channel per block): q.k = sum_j q[plane j] . (scale * plane_j) + q.zero,
  one matmul per plane, the zero point one bias per block;
* values (scale/zero per token per channel group): p.v = sum_t (p_t*scale_t) plane_t + sum_t p_t*zero_t.

Shapes: query [Bt, Hq, 1, D]; KV heads H, g = Hq / H; scores [Bt, H, g, n].
"""
from __future__ import annotations

import torch



def _planes(packed: torch.Tensor, container: int) -> list[torch.Tensor]:
    """uint8 [..., m] -> 8//c float32 planes [..., m]; plane j = codes of channels d = i*(8//c) + j."""
    x = packed.float()
    if container == 8:
        return [x]
    base = float(1 << container)
    planes = []
    for _ in range(8 // container - 1):
        hi = torch.floor(x * (1.0 / base))
        planes.append(x - hi * base)
        x = hi
    planes.append(x)
    return planes


def _key_scores(qg, seg, B):
    """qg [Bt,H,g,D] fp32 -> scores [Bt,H,g,n] over a QuantSegment.

    Each plane is scaled by its block's per-channel scale (one broadcast multiply), then one matmul
    per plane; the zero point becomes one bias per (block, query head)."""
    bt, h, g, d = qg.shape
    nblk = seg.k_scale.shape[2]
    per = 8 // seg.container
    scale = seg.k_scale.float()[:, :, :, None, :]                          # [Bt,H,nblk,1,D]
    bias = torch.matmul(qg, seg.k_zero.float().transpose(-1, -2))          # [Bt,H,g,nblk]
    s = bias.repeat_interleave(B, dim=-1)                                   # [Bt,H,g,n]
    for j, plane in enumerate(_planes(seg.k, seg.container)):
        pl = (plane.reshape(bt, h, nblk, B, d // per) * scale[..., j::per]).reshape(bt, h, nblk * B, d // per)
        s = s + torch.matmul(qg[..., j::per], pl.transpose(-1, -2))
    return s


def _value_out(p, seg):
    """p [Bt,H,g,n] fp32 -> sum_t p_t v_t [Bt,H,g,D] over a QuantSegment."""
    bt, h, g, n = p.shape
    per = 8 // seg.container
    ngrp = seg.v_scale.shape[-1]
    ps = p.unsqueeze(-1) * seg.v_scale.float()[:, :, None]              # [Bt,H,g,n,ngrp]
    zero = (p.unsqueeze(-1) * seg.v_zero.float()[:, :, None]).sum(3)    # [Bt,H,g,ngrp]
    outs = []
    for plane in _planes(seg.v, seg.container):
        m = plane.shape[-1]
        if ngrp == 1:
            outs.append(torch.matmul(ps[..., 0], plane))               # [Bt,H,g,m]
        else:
            pl = plane.reshape(bt, h, n, ngrp, m // ngrp)
            outs.append(torch.einsum("bhgtr,bhtre->bhgre", ps, pl).reshape(bt, h, g, m))
    d = per * outs[0].shape[-1]
    out = torch.stack(outs, -1).reshape(bt, h, g, d)                      # interleave planes
    return out + zero.repeat_interleave(d // ngrp, dim=-1)


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
