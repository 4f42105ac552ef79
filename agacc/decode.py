"""Decode attention (one query step) over everything a layer holds: the one entry point,
``decode_attention(query, store, scaling, mask)``, for every device.

It reads ``store.parts()`` (the held parts in attention order, ``kernels.format.Part``) and branches
once on ``kernels.backend(query.device)``:

    "triton"  the fused Triton kernel (``kernels.triton_decode.decode_parts``)
    "cpp"     the fused C++ kernel (``kernels.cpu.decode_layer``)
    "torch"   the packed PyTorch path below
    with a mask (the lossless preset's padded batches): the PyTorch path, whatever the backend;
    keys held in a basis (``key_quant="basis"``) on Triton: the PyTorch path, with one warning.

All three are checked against ``attention.attend`` over ``store.attention_entries`` (dequantised).

The PyTorch path reads the packed bytes: packed rows are transposed before they are unpacked
(``_codes_t``: ``[n, bytes]`` -> ``[bytes, n]``, so every shift and mask runs along the n tokens,
not along a row of a few bytes), which yields the codes as ``[D, n]``, the layout ``q @ K^T``
multiplies by. Scales and zero points are applied inside the products, so the only float copy of a
part is a transient one inside the step, never held:

* keys per token (scale/zero per token per channel group r): q.k_t = sum_r scale_tr (q_r . codes_tr)
  + zero_tr sum(q_r); keys per channel per block: q.k = q . (scale * codes) + q . zero, the zero
  point one bias per block;
* values (scale/zero per token per channel group): p.v = sum_t (p_t*scale_t) codes_t + sum_t p_t*zero_t.

Keys held in a basis (``Part.basis``) are rebuilt from their dequantised coefficients
(``quant.basis_keys``: a transient [n, D] copy a part) and meet the query as it is.

Rotated parts (``cfg.rotate``) meet the rotated query (``q H . k H = q . k``), and their share
of the output is summed apart and rotated back once (``(P V H) H = P V``).

Shapes: query [Bt, Hq, 1, D]; KV heads H, g = Hq / H; scores [Bt, H, g, n].
"""
from __future__ import annotations

import torch

import kernels
from agacc import quant
from agacc.attention import cap_logits
from agacc.quant import DENSE, QUANT, Part

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
        codes = _split(pt[..., :lo, :], 2).reshape(high.shape) | (high << 2)
    else:
        codes = _split(pt, container)
    return codes.flatten(-3, -2).float()


def _key_scores(qg, seg: Part):
    """qg [Bt,H,g,D] fp32 (rotated when the part is) -> scores [Bt,H,g,n] over a quantised part."""
    bt, h, g, d = qg.shape
    if seg.basis is not None:  # coefficients per block -> keys rebuilt at their positions
        k = quant.basis_keys(quant.dequantize_coeffs(seg), seg.basis, seg.inv_freq, seg.pos)
        return torch.matmul(qg, k.transpose(-1, -2))
    codes = _codes_t(seg.k, seg.container)                               # [Bt,H,D,n]
    n = codes.shape[-1]
    if not seg.key_block:  # keys per token: q.k_t = sum_r scale_tr (q_r . codes_tr) + zero_tr sum(q_r), r the groups
        scale, zero = seg.k_scale.float(), seg.k_zero.float()                # [Bt,H,n,ngrp]
        ngrp = scale.shape[-1]
        if ngrp == 1:
            dots = torch.matmul(qg, codes)                               # [Bt,H,g,n]
            return dots * scale[..., 0].unsqueeze(2) + qg.sum(-1, keepdim=True) * zero[..., 0].unsqueeze(2)
        q_grp = qg.view(bt, h, g, ngrp, d // ngrp)
        dots = torch.einsum("bhgrc,bhrcn->bhgnr", q_grp, codes.view(bt, h, ngrp, d // ngrp, n))
        return (dots * scale.unsqueeze(2)).sum(-1) + torch.matmul(q_grp.sum(-1), zero.transpose(-1, -2))
    nblk, B = seg.k_scale.shape[2], seg.key_block  # per channel per block: q.k = q . (scale * codes) + q . zero
    k_t = (codes.view(bt, h, d, nblk, B) * seg.k_scale.float().transpose(-1, -2).unsqueeze(-1)).view(bt, h, d, n)
    bias = torch.matmul(qg, seg.k_zero.float().transpose(-1, -2))          # [Bt,H,g,nblk]
    scores = torch.matmul(qg, k_t).view(bt, h, g, nblk, B) + bias.unsqueeze(-1)
    return scores.view(bt, h, g, n)


def _value_out(p, seg: Part):
    """p [Bt,H,g,n] fp32 -> sum_t p_t v_t [Bt,H,g,D] over a quantised part."""
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


def decode_attention(query: torch.Tensor, store, scaling: float, mask: torch.Tensor | None = None,
                     softcap: float | None = None):
    """One decode step over everything ``store`` (a ``LayerStore``) holds.

    query [Bt, Hq, 1, D] -> (out [Bt, 1, Hq, D] in query dtype, mass [n_entries] fp32) with entries in
    ``LayerStore.parts`` order and mass normalised as in ``attention.attend`` (probability per entry
    summed over query heads, averaged over batch, / Hq).
    mask: optional [Bt, 1, 1, n_entries] (bool: True = visible, or additive float), for stores whose
    entries are in position order (the lossless preset with padded batches); it runs the PyTorch path.
    softcap: logit softcapping (``attention.cap_logits``: c * tanh(z / c) on the scaled logits, before
    the parts' bias), in every backend."""
    if query.dim() != 4 or query.shape[2] != 1:
        raise ValueError(f"decode_attention expects query [Bt, Hq, 1, D], got {tuple(query.shape)}")
    parts = store.parts()
    backend = "torch" if mask is not None else kernels.backend(query.device)
    if backend == "triton" and any(p.basis is not None for p in parts):
        kernels.warn_once("basis", "AGACC: the Triton kernels do not read keys held in a basis yet; the "
                                   "PyTorch reference runs (key_quant='channel' keeps them)")
        backend = "torch"
    if backend == "triton":
        from kernels.triton_decode import decode_parts

        return decode_parts(query, parts, scaling, softcap=softcap)
    bt, hq, _, d = query.shape
    h = parts[0].heads
    qg = query.reshape(bt, h, hq // h, d).float() * scaling
    if backend == "cpp":
        from kernels import cpu

        out, mass = cpu.decode_layer(qg, parts, softcap=softcap)
    else:
        out, mass = _decode_parts(qg, parts, mask, softcap)
    return out.reshape(bt, hq, 1, d).transpose(1, 2).to(query.dtype), mass


def _decode_parts(qg: torch.Tensor, parts: list[Part], mask: torch.Tensor | None, softcap: float | None = None):
    """The PyTorch path: qg [Bt,H,g,D] fp32 (scaled) -> (out [Bt,H,g,D] fp32, mass [n_entries] fp32);
    ``softcap`` caps each part's logits before its bias."""
    bt, h, g, _ = qg.shape
    qr = None  # the rotated query, made when a rotated part needs it (none in the lossless preset)
    terms = []  # (scores, value_fn, output rotated?)
    for p in parts:
        if p.kind == QUANT:
            turned = p.rotated and p.basis is None  # keys in a basis are never rotated (their values may be)
            if turned and qr is None:
                qr = quant.rotate(qg)
            terms.append((cap_logits(_key_scores(qr if turned else qg, p), softcap), lambda w, p=p: _value_out(w, p),
                          p.rotated))
            continue
        if p.kind == DENSE:
            k, v = p.k.float(), p.v.float()
        else:  # sparse (pruned): decoded densely
            k, v = quant.dequantize_part(p, torch.float32)
        s = cap_logits(torch.matmul(qg, k.transpose(-1, -2)), softcap)
        terms.append((s + p.bias if p.bias is not None else s, lambda w, v=v: torch.matmul(w, v), False))
    scores = torch.cat([s for s, _, _ in terms], -1)
    if mask is not None:
        m4 = mask[..., -1:, :].reshape(bt, 1, 1, -1)
        scores = scores.masked_fill(~m4, float("-inf")) if m4.dtype == torch.bool else scores + m4.float()
    probs = scores.softmax(-1)
    sums = {False: 0.0, True: 0.0}  # rotated outputs are summed apart and rotated back once
    lo = 0
    for s, value_fn, rotated in terms:
        n = s.shape[-1]
        sums[rotated] = sums[rotated] + value_fn(probs[..., lo:lo + n])
        lo += n
    out = sums[False] + quant.rotate(sums[True]) if torch.is_tensor(sums[True]) else sums[False]
    mass = probs.sum(dim=(1, 2)).mean(0) / (h * g)
    return out, mass
