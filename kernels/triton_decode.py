"""Fused split-K (flash-decoding) attention for ONE query step over a layer's held parts.

Entry point: ``decode_parts(query, parts, scaling)``, ``parts`` a list of ``kernels.format.Part``
(``agacc.store.LayerStore.parts()``); ``agacc.decode.decode_attention`` calls it when
``kernels.backend`` is "triton". Reference: ``agacc.attention.attend(query,
store.attention_entries(dtype), scaling)`` with q = 1.

Three launches (+1 per sparse part); K and V are read exactly once:

1. ``_partial_kernel``, grid (n_splits, Bt*H). A program owns one split (``split`` consecutive
   entries of one part) of one KV head and all ``g`` query heads of its GQA group. It reads
   the part's bytes directly -- fp16/bf16/fp32 rows, or packed 8/4/3/2-bit codes with their
   per-channel-per-block (or per-token-per-group, KEY_TOKEN) key scales and per-token-per-group
   value scales -- dequantises in registers, and keeps an online softmax (max ``m``, sum ``l``,
   accumulator ``acc`` [g, D]). Quantised slots stored Hadamard-rotated (ROT) meet the rotated
   query and leave rotated accumulators.
   It writes the partials and every entry's raw logit ``q.k * scaling + bias`` (fp32,
   [Bt*H*g, n]; with logit softcapping, SOFTCAP, ``c * tanh(q.k * scaling / c) + bias``). Parts are
   slots of the one launch (a dense "full" slot, int8, int4, int3, int2, a dense slot with a logit
   bias "markers", a dense "hot" slot); a program picks its slot by comparing its split index with the
   slot starts, and writes its logits at its part's entry offset.
   ``_sparse_partial_kernel`` does the same for one sparse part (bitmap + kept codes), one
   launch per part, into the same workspace.
2. ``_combine_kernel``, grid (Bt*H,): merges the splits -> output and log-sum-exp per query head;
   with ROT the rotated splits sum into a second output that the wrapper rotates back and adds.
3. ``_mass_kernel``, grid (cdiv(n, BLOCK_E),): mass[i] = sum_{b,h,j} exp(logit - lse) / (Bt*Hq),
   a pass over n*Bt*Hq floats, never over K.

Entry order (for the mass) is the order of ``parts`` (``LayerStore.parts``: full, int8, int4, int3,
int2, sparse by keep, markers, hot). Scores use elementwise multiply + ``tl.sum``
(no ``tl.dot``: q = 1, and ``tl.dot`` needs K >= 16 on the GPU). All arithmetic is fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.format import QUANT, SPARSE, Part, rotate

# FMT codes of _split_partial: 0 dense rows, 1 packed quantised codes, 2 sparse (bitmap + kept codes)


def _pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


@triton.jit
def _tanh(x):
    """tanh in fp32 from ``tl.exp`` only (the interpreter and sm_80 / sm_90 alike), within a few ulp of
    ``torch.tanh``: an odd Taylor polynomial to x^9 for |x| < 0.25 (its remainder < 1e-8 relative), else
    (1 - e) / (1 + e) with e = exp(-2|x|) in (0, 1] (no overflow, no cancellation worse than 1/2)."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    x2 = x * x
    p = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (-0.05396825396825397
                                                                                 + x2 * 0.021869488536155203))))
    return tl.where(a < 0.25, p, tl.where(x < 0, -t, t))


@triton.jit
def _cap(s, softcap):
    """Logit softcapping (Gemma2's ``attn_logit_softcapping``) of scaled logits: c * tanh(s / c), as
    ``agacc.attention.cap_logits``; the wrappers apply it (SOFTCAP) before a part's bias and the mask."""
    return softcap * _tanh(s / softcap)


# --------------------------------------------------------------------------------------------
# row loaders: [BLOCK_N, D_PAD] fp32 (zero outside rows < n / d < D)
# --------------------------------------------------------------------------------------------

@triton.jit
def _load_dense(ptr, sb, sh, b, h, rows, rmask, offs_d, dmask, D):
    """Rows of a [Bt, H, n, D] tensor (inner dims contiguous, batch/head strides sb/sh)."""
    p = ptr + b * sb + h * sh + rows[:, None] * D + offs_d[None, :]
    return tl.load(p, mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _unpack_rows(codes_ptr, row0, rmask, DB, C: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr):
    """[BLOCK_N, D_PAD] int32 codes of rows whose packed bytes start at ``codes_ptr + row0`` (DB bytes
    per row): contiguous byte loads, then the 8/C codes of a byte split out along a new axis."""
    PER: tl.constexpr = 8 // C
    MASK: tl.constexpr = (1 << C) - 1
    DB_PAD: tl.constexpr = D_PAD // PER
    offs_b = tl.arange(0, DB_PAD)
    raw = tl.load(codes_ptr + row0[:, None] + offs_b[None, :], mask=rmask[:, None] & (offs_b[None, :] < DB), other=0)
    raw = raw.to(tl.int32)
    if PER == 1:
        return raw
    shifts = tl.arange(0, PER) * C
    return tl.reshape((raw[:, :, None] >> shifts[None, None, :]) & MASK, [BLOCK_N, D_PAD])


@triton.jit
def _unpack_codes(codes_ptr, vec, rmask, D, C: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr):
    """[BLOCK_N, D_PAD] int32 codes of packed vectors ``vec`` ([BLOCK_N] indices, D*C/8 bytes each) in
    ``kernels.format.pack``'s layout; C = 3 is a 2-bit plane (D/4 bytes) then a 1-bit plane (D/8)."""
    if C == 3:
        row0 = vec * (D * 3 // 8)
        lo = _unpack_rows(codes_ptr, row0, rmask, D // 4, 2, BLOCK_N, D_PAD)
        hi = _unpack_rows(codes_ptr + D // 4, row0, rmask, D // 8, 1, BLOCK_N, D_PAD)
        return lo + hi * 4
    else:
        PER: tl.constexpr = 8 // C
        return _unpack_rows(codes_ptr, vec * (D // PER), rmask, D // PER, C, BLOCK_N, D_PAD)


@triton.jit
def _load_quant_keys(codes_ptr, sc_ptr, zr_ptr, bh, n, t, rows, rmask, offs_d, dmask, D, B,
                     C: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr):
    """Key rows [t, t+BLOCK_N) of packed codes [Bt*H, n, D*C/8], all inside block t // B, dequantised
    with that block's per-channel scale/zero [Bt*H, n/B, D] (loaded once as [D] vectors)."""
    u = _unpack_codes(codes_ptr, bh * n + rows, rmask, D, C, BLOCK_N, D_PAD).to(tl.float32)
    sidx = (bh * (n // B) + t // B) * D + offs_d
    sc = tl.load(sc_ptr + sidx, mask=dmask, other=0.0).to(tl.float32)
    zr = tl.load(zr_ptr + sidx, mask=dmask, other=0.0).to(tl.float32)
    return u * sc[None, :] + zr[None, :]


@triton.jit
def _load_quant_values(codes_ptr, sc_ptr, zr_ptr, bh, n, rows, rmask, offs_d, dmask, D, G: tl.constexpr,
                       C: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr):
    """Value rows of packed codes [Bt*H, n, D*C/8] with per-token per-group scale/zero
    [Bt*H, n, D/G]. A power-of-two G loads [BLOCK_N, D/G] scales and broadcasts them over the
    group; another G gathers one scale per element."""
    u = _unpack_codes(codes_ptr, bh * n + rows, rmask, D, C, BLOCK_N, D_PAD).to(tl.float32)
    NG = D // G
    if (G & (G - 1)) == 0:
        NG_PAD: tl.constexpr = D_PAD // G
        offs_s = tl.arange(0, NG_PAD)
        sidx = (bh * n + rows[:, None]) * NG + offs_s[None, :]
        m = rmask[:, None] & (offs_s[None, :] < NG)
        sc = tl.load(sc_ptr + sidx, mask=m, other=0.0).to(tl.float32)
        zr = tl.load(zr_ptr + sidx, mask=m, other=0.0).to(tl.float32)
        sc = tl.reshape(tl.broadcast_to(sc[:, :, None], [BLOCK_N, NG_PAD, G]), [BLOCK_N, D_PAD])
        zr = tl.reshape(tl.broadcast_to(zr[:, :, None], [BLOCK_N, NG_PAD, G]), [BLOCK_N, D_PAD])
    else:
        sidx = (bh * n + rows[:, None]) * NG + offs_d[None, :] // G
        m = rmask[:, None] & dmask[None, :]
        sc = tl.load(sc_ptr + sidx, mask=m, other=0.0).to(tl.float32)
        zr = tl.load(zr_ptr + sidx, mask=m, other=0.0).to(tl.float32)
    return u * sc + zr


@triton.jit
def _load_sparse(map_ptr, codes_ptr, sc_ptr, zr_ptr, bh, n, rows, rmask, offs_d, dmask, D,
                 KEEP: tl.constexpr, C: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr):
    """Rows of the sparse format: bitmap [Bt*H, n, D/8], kept codes in position order
    [Bt*H, n, KEEP*C/8], scale/zero [Bt*H, n, 1]. Element d present -> its code is number
    (#present before d) among the kept ones; absent -> exactly 0."""
    KB: tl.constexpr = KEEP * C // 8
    bit = _unpack_rows(map_ptr, (bh * n + rows) * (D // 8), rmask, D // 8, 1, BLOCK_N, D_PAD)
    idx = tl.cumsum(bit, axis=1) - bit
    present = bit != 0
    m = rmask[:, None] & present
    base = codes_ptr + (bh * n + rows[:, None]) * KB
    if C == 3:  # 2-bit plane (KEEP/4 bytes), then 1-bit plane
        lo = tl.load(base + idx // 4, mask=m, other=0).to(tl.int32)
        hi = tl.load(base + KEEP // 4 + idx // 8, mask=m, other=0).to(tl.int32)
        u = (((lo >> ((idx % 4) * 2)) & 3) + ((hi >> (idx % 8)) & 1) * 4).to(tl.float32)
    else:
        PER: tl.constexpr = 8 // C
        MASK: tl.constexpr = (1 << C) - 1
        raw = tl.load(base + idx // PER, mask=m, other=0)
        u = ((raw.to(tl.int32) >> ((idx % PER) * C)) & MASK).to(tl.float32)
    sc = tl.load(sc_ptr + bh * n + rows, mask=rmask, other=0.0).to(tl.float32)
    zr = tl.load(zr_ptr + bh * n + rows, mask=rmask, other=0.0).to(tl.float32)
    return tl.where(present, u * sc[:, None] + zr[:, None], 0.0)


# --------------------------------------------------------------------------------------------
# one split of one part
# --------------------------------------------------------------------------------------------

@triton.jit
def _split_partial(
    q, offs_g, gmask, offs_d, dmask, b, h, bh, D, g, scaling, softcap, split, local_split, ws_split,
    n, entry0, n_total, S_total,
    k_ptr, ks_ptr, kz_ptr, km_ptr, v_ptr, vs_ptr, vz_ptr, vm_ptr, bias_ptr, sb, sh, B: tl.constexpr, G: tl.constexpr,
    logit_ptr, m_ptr, l_ptr, acc_ptr,
    FMT: tl.constexpr, C: tl.constexpr, KEEP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr, PER_HEAD: tl.constexpr,
    KEY_TOKEN: tl.constexpr, KG: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Online softmax over entries [local_split*split, +split) of one part for the g query heads
    q [G_PAD, D_PAD]; writes raw logits and the split's (m, l, acc) at workspace index ws_split.
    SOFTCAP: the scaled logits are capped (``_cap``, by ``softcap``) before the bias."""
    start = local_split * split
    stop = tl.minimum(start + split, n)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for t in range(start, stop, BLOCK_N):
        rows = t + tl.arange(0, BLOCK_N)
        rmask = rows < stop
        if FMT == 0:
            k = _load_dense(k_ptr, sb, sh, b, h, rows, rmask, offs_d, dmask, D)
        elif FMT == 1:
            if KEY_TOKEN:
                k = _load_quant_values(k_ptr, ks_ptr, kz_ptr, bh, n, rows, rmask, offs_d, dmask, D, KG, C, BLOCK_N, D_PAD)
            else:
                k = _load_quant_keys(k_ptr, ks_ptr, kz_ptr, bh, n, t, rows, rmask, offs_d, dmask, D, B, C, BLOCK_N, D_PAD)
        else:
            k = _load_sparse(km_ptr, k_ptr, ks_ptr, kz_ptr, bh, n, rows, rmask, offs_d, dmask, D, KEEP, C, BLOCK_N, D_PAD)
        if PER_HEAD == 2:  # tensor cores (G_PAD, BLOCK_N >= 16); three TF32 products, about fp32 exact
            s = tl.dot(q, tl.trans(k), input_precision="tf32x3") * scaling
        elif PER_HEAD:
            s = tl.zeros([G_PAD, BLOCK_N], tl.float32)
            for j in tl.static_range(G_PAD):
                qj = tl.sum(tl.where(offs_g[:, None] == j, q, 0.0), axis=0)  # [D_PAD]
                sj = tl.sum(k * qj[None, :], axis=1)  # [BLOCK_N]
                s = tl.where(offs_g[:, None] == j, sj[None, :], s)
            s = s * scaling
        else:
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scaling  # [G_PAD, BLOCK_N]
        if SOFTCAP:
            s = _cap(s, softcap)
        if HAS_BIAS:
            s += tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[None, :]
        s = tl.where(rmask[None, :], s, float("-inf"))
        lp = logit_ptr + (bh * g + offs_g[:, None]) * n_total + entry0 + rows[None, :]
        tl.store(lp, s, mask=gmask[:, None] & rmask[None, :])
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if FMT == 0:
            v = _load_dense(v_ptr, sb, sh, b, h, rows, rmask, offs_d, dmask, D)
        elif FMT == 1:
            v = _load_quant_values(v_ptr, vs_ptr, vz_ptr, bh, n, rows, rmask, offs_d, dmask, D, G, C, BLOCK_N, D_PAD)
        else:
            v = _load_sparse(vm_ptr, v_ptr, vs_ptr, vz_ptr, bh, n, rows, rmask, offs_d, dmask, D, KEEP, C, BLOCK_N, D_PAD)
        acc = acc * alpha[:, None]
        if PER_HEAD == 2:
            acc = acc + tl.dot(p, v, input_precision="tf32x3")
        elif PER_HEAD:
            for j in tl.static_range(G_PAD):
                pj = tl.sum(tl.where(offs_g[:, None] == j, p, 0.0), axis=0)  # [BLOCK_N]
                oj = tl.sum(pj[:, None] * v, axis=0)  # [D_PAD]
                acc = tl.where(offs_g[:, None] == j, acc + oj[None, :], acc)
        else:
            acc = acc + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
    w = bh * S_total + ws_split
    tl.store(m_ptr + w * G_PAD + offs_g, m_i)
    tl.store(l_ptr + w * G_PAD + offs_g, l_i)
    tl.store(acc_ptr + (w * G_PAD + offs_g[:, None]) * D_PAD + offs_d[None, :], acc)


@triton.jit
def _load_q(q_ptr, sqb, sqh, b, h, g, offs_g, offs_d, D):
    """The g query heads of KV head h: [G_PAD, D_PAD] fp32 (zero padding)."""
    qp = q_ptr + b * sqb + (h * g + offs_g[:, None]) * sqh + offs_d[None, :]
    return tl.load(qp, mask=(offs_g[:, None] < g) & (offs_d[None, :] < D), other=0.0).to(tl.float32)


# Integer arguments that change from step to step (lengths, offsets, split starts, the strides of
# parts that grow): Triton would specialise each on "== 1" and "% 16 == 0", and every new pattern is
# a compile in the middle of a generation (the first H200 run: 18 compiles in 16 decode steps).
# Not specialised, a cache config compiles once per set of slots it holds.
_PARTIAL_RUNTIME = ("softcap", "split", "n_total", "S_total", "s_q8", "s_q4", "s_q3", "s_q2", "s_mk", "s_hot",
                    "e_full", "e_q8", "e_q4", "e_q3", "e_q2", "e_mk", "e_hot", "f_sb", "f_sh", "f_n",
                    "q8_n", "q4_n", "q3_n", "q2_n", "mk_sb", "mk_sh", "mk_n", "hot_sb", "hot_sh", "hot_n")


@triton.jit(do_not_specialize=_PARTIAL_RUNTIME)
def _partial_kernel(
    q_ptr, qr_ptr, sqb, sqh, H, D, g, scaling, softcap, split, n_total, S_total,
    logit_ptr, m_ptr, l_ptr, acc_ptr,
    # first split (workspace index) and first entry of each slot; the full slot starts at split 0
    s_q8, s_q4, s_q3, s_q2, s_mk, s_hot,
    e_full, e_q8, e_q4, e_q3, e_q2, e_mk, e_hot,
    f_k, f_v, f_sb, f_sh, f_n,
    q8_k, q8_ks, q8_kz, q8_v, q8_vs, q8_vz, q8_n,
    q4_k, q4_ks, q4_kz, q4_v, q4_vs, q4_vz, q4_n,
    q3_k, q3_ks, q3_kz, q3_v, q3_vs, q3_vz, q3_n,
    q2_k, q2_ks, q2_kz, q2_v, q2_vs, q2_vz, q2_n,
    mk_k, mk_v, mk_bias, mk_sb, mk_sh, mk_n,
    hot_k, hot_v, hot_sb, hot_sh, hot_n,
    HAS_FULL: tl.constexpr, HAS_Q8: tl.constexpr, HAS_Q4: tl.constexpr, HAS_Q3: tl.constexpr, HAS_Q2: tl.constexpr,
    HAS_MK: tl.constexpr, HAS_HOT: tl.constexpr, B: tl.constexpr, G: tl.constexpr,
    BLOCK_N: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr, PER_HEAD: tl.constexpr,
    KEY_TOKEN: tl.constexpr, KG: tl.constexpr, ROT: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Grid (splits of the full, int8, int4, int3, int2, marker and hot slots, Bt*H): a program finds its
    slot by comparing its split index with the slot starts. Quantised slots meet the rotated query
    ``qr`` when ROT (their keys are stored rotated; their accumulators come out rotated too)."""
    sid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    gmask = offs_g < g
    dmask = offs_d < D
    q = _load_q(q_ptr, sqb, sqh, b, h, g, offs_g, offs_d, D)
    if ROT:
        qq = _load_q(qr_ptr, sqb, sqh, b, h, g, offs_g, offs_d, D)
    else:
        qq = q
    if sid < s_q8:
        if HAS_FULL:
            _split_partial(q, offs_g, gmask, offs_d, dmask, b, h, bh, D, g, scaling, softcap, split, sid, sid,
                           f_n, e_full, n_total, S_total,
                           f_k, f_k, f_k, f_k, f_v, f_v, f_v, f_v, f_k, f_sb, f_sh, B, G,
                           logit_ptr, m_ptr, l_ptr, acc_ptr,
                           0, 8, 8, False, BLOCK_N, G_PAD, D_PAD, PER_HEAD, False, 1, SOFTCAP)
    elif sid < s_q4:
        if HAS_Q8:
            _split_partial(qq, offs_g, gmask, offs_d, dmask, b, h, bh, D, g, scaling, softcap, split, sid - s_q8, sid,
                           q8_n, e_q8, n_total, S_total,
                           q8_k, q8_ks, q8_kz, q8_k, q8_v, q8_vs, q8_vz, q8_v, q8_k, 0, 0, B, G,
                           logit_ptr, m_ptr, l_ptr, acc_ptr,
                           1, 8, 8, False, BLOCK_N, G_PAD, D_PAD, PER_HEAD, KEY_TOKEN, KG, SOFTCAP)
    elif sid < s_q3:
        if HAS_Q4:
            _split_partial(qq, offs_g, gmask, offs_d, dmask, b, h, bh, D, g, scaling, softcap, split, sid - s_q4, sid,
                           q4_n, e_q4, n_total, S_total,
                           q4_k, q4_ks, q4_kz, q4_k, q4_v, q4_vs, q4_vz, q4_v, q4_k, 0, 0, B, G,
                           logit_ptr, m_ptr, l_ptr, acc_ptr,
                           1, 4, 8, False, BLOCK_N, G_PAD, D_PAD, PER_HEAD, KEY_TOKEN, KG, SOFTCAP)
    elif sid < s_q2:
        if HAS_Q3:
            _split_partial(qq, offs_g, gmask, offs_d, dmask, b, h, bh, D, g, scaling, softcap, split, sid - s_q3, sid,
                           q3_n, e_q3, n_total, S_total,
                           q3_k, q3_ks, q3_kz, q3_k, q3_v, q3_vs, q3_vz, q3_v, q3_k, 0, 0, B, G,
                           logit_ptr, m_ptr, l_ptr, acc_ptr,
                           1, 3, 8, False, BLOCK_N, G_PAD, D_PAD, PER_HEAD, KEY_TOKEN, KG, SOFTCAP)
    elif sid < s_mk:
        if HAS_Q2:
            _split_partial(qq, offs_g, gmask, offs_d, dmask, b, h, bh, D, g, scaling, softcap, split, sid - s_q2, sid,
                           q2_n, e_q2, n_total, S_total,
                           q2_k, q2_ks, q2_kz, q2_k, q2_v, q2_vs, q2_vz, q2_v, q2_k, 0, 0, B, G,
                           logit_ptr, m_ptr, l_ptr, acc_ptr,
                           1, 2, 8, False, BLOCK_N, G_PAD, D_PAD, PER_HEAD, KEY_TOKEN, KG, SOFTCAP)
    elif sid < s_hot:
        if HAS_MK:
            _split_partial(q, offs_g, gmask, offs_d, dmask, b, h, bh, D, g, scaling, softcap, split, sid - s_mk, sid,
                           mk_n, e_mk, n_total, S_total,
                           mk_k, mk_k, mk_k, mk_k, mk_v, mk_v, mk_v, mk_v, mk_bias, mk_sb, mk_sh, B, G,
                           logit_ptr, m_ptr, l_ptr, acc_ptr,
                           0, 8, 8, True, BLOCK_N, G_PAD, D_PAD, PER_HEAD, False, 1, SOFTCAP)
    else:
        if HAS_HOT:
            _split_partial(q, offs_g, gmask, offs_d, dmask, b, h, bh, D, g, scaling, softcap, split, sid - s_hot, sid,
                           hot_n, e_hot, n_total, S_total,
                           hot_k, hot_k, hot_k, hot_k, hot_v, hot_v, hot_v, hot_v, hot_k, hot_sb, hot_sh, B, G,
                           logit_ptr, m_ptr, l_ptr, acc_ptr,
                           0, 8, 8, False, BLOCK_N, G_PAD, D_PAD, PER_HEAD, False, 1, SOFTCAP)


@triton.jit(do_not_specialize=("softcap", "split", "n_total", "S_total", "ws0", "e0", "n"))
def _sparse_partial_kernel(
    q_ptr, sqb, sqh, H, D, g, scaling, softcap, split, n_total, S_total, ws0, e0,
    logit_ptr, m_ptr, l_ptr, acc_ptr,
    km, k, ks, kz, vm, v, vs, vz, n,
    KEEP: tl.constexpr, C: tl.constexpr,
    BLOCK_N: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr, PER_HEAD: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """Grid (splits of one sparse part, Bt*H); workspace split = ws0 + program_id(0), entries from e0.
    A kernel of its own: the bitmap prefix count costs registers the other formats should not pay."""
    sid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    q = _load_q(q_ptr, sqb, sqh, b, h, g, offs_g, offs_d, D)
    _split_partial(q, offs_g, offs_g < g, offs_d, offs_d < D, b, h, bh, D, g, scaling, softcap, split, sid, ws0 + sid,
                   n, e0, n_total, S_total,
                   k, ks, kz, km, v, vs, vz, vm, k, 0, 0, 1, 1,
                   logit_ptr, m_ptr, l_ptr, acc_ptr,
                   2, C, KEEP, False, BLOCK_N, G_PAD, D_PAD, PER_HEAD, False, 1, SOFTCAP)


# --------------------------------------------------------------------------------------------
# combine splits, then attention mass per entry
# --------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=("S", "R0", "R1"))
def _combine_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr, out_rot_ptr, lse_ptr, S, H, D, g, sob, soh, R0, R1,
    SB: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr, ROT: tl.constexpr,
):
    """Grid (Bt*H,). out[b, 0, h*g+j, :] = sum_s e^{m_s-M} acc_s / sum_s e^{m_s-M} l_s; lse = M + log L.
    With ROT the splits R0 <= s < R1 (rotated accumulators) sum into ``out_rot`` (same layout) instead."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    M = tl.full([G_PAD], float("-inf"), tl.float32)
    L = tl.zeros([G_PAD], tl.float32)
    ACC = tl.zeros([G_PAD, D_PAD], tl.float32)
    ACCR = tl.zeros([G_PAD, D_PAD], tl.float32)
    for s0 in range(0, S, SB):
        sidx = s0 + tl.arange(0, SB)
        smask = sidx < S
        w = bh * S + sidx
        mt = tl.load(m_ptr + w[:, None] * G_PAD + offs_g[None, :], mask=smask[:, None], other=float("-inf"))
        lt = tl.load(l_ptr + w[:, None] * G_PAD + offs_g[None, :], mask=smask[:, None], other=0.0)
        at = tl.load(acc_ptr + (w[:, None, None] * G_PAD + offs_g[None, :, None]) * D_PAD + offs_d[None, None, :],
                     mask=smask[:, None, None], other=0.0)
        M_new = tl.maximum(M, tl.max(mt, axis=0))
        alpha = tl.exp(M - M_new)
        wt = tl.exp(mt - M_new[None, :])  # [SB, G_PAD]
        L = L * alpha + tl.sum(lt * wt, axis=0)
        aw = at * wt[:, :, None]
        if ROT:
            rot = ((sidx >= R0) & (sidx < R1))[:, None, None]
            ACC = ACC * alpha[:, None] + tl.sum(tl.where(rot, 0.0, aw), axis=0)
            ACCR = ACCR * alpha[:, None] + tl.sum(tl.where(rot, aw, 0.0), axis=0)
        else:
            ACC = ACC * alpha[:, None] + tl.sum(aw, axis=0)
        M = M_new
    out = ACC / L[:, None]
    gmask = offs_g < g
    omask = gmask[:, None] & (offs_d[None, :] < D)
    op = out_ptr + b * sob + (h * g + offs_g[:, None]) * soh + offs_d[None, :]
    tl.store(op, out.to(out_ptr.dtype.element_ty), mask=omask)
    if ROT:
        rp = out_rot_ptr + b * sob + (h * g + offs_g[:, None]) * soh + offs_d[None, :]
        tl.store(rp, ACCR / L[:, None], mask=omask)
    tl.store(lse_ptr + bh * G_PAD + offs_g, M + tl.log(L))


@triton.jit(do_not_specialize=("n_total",))
def _mass_kernel(logit_ptr, lse_ptr, mass_ptr, n_total, BH, g, inv_norm,
                 BLOCK_E: tl.constexpr, G_PAD: tl.constexpr):
    """Grid (cdiv(n, BLOCK_E),). mass[i] = inv_norm * sum_{bh, j<g} exp(logit[bh*g+j, i] - lse[bh, j])."""
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    emask = e < n_total
    offs_g = tl.arange(0, G_PAD)
    gmask = offs_g < g
    tot = tl.zeros([BLOCK_E], tl.float32)
    for bh in range(0, BH):
        lse = tl.load(lse_ptr + bh * G_PAD + offs_g)
        lg = tl.load(logit_ptr + (bh * g + offs_g[:, None]) * n_total + e[None, :],
                     mask=gmask[:, None] & emask[None, :], other=float("-inf"))
        tot += tl.sum(tl.exp(lg - lse[:, None]), axis=0)
    tl.store(mass_ptr + e, tot * inv_norm, mask=emask)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------

QUANT_SLOTS = {8: "q8", 4: "q4", 3: "q3", 2: "q2"}  # container -> slot of the main launch
_QUANT_NAMES = tuple(QUANT_SLOTS.values())


def _dense_strides(k, v):
    """(k, v, batch stride, head stride) with rows of D contiguous (hot slices keep that)."""
    d = k.shape[-1]
    if k.stride(-1) != 1 or k.stride(-2) != d or k.stride() != v.stride():
        k, v = k.contiguous(), v.contiguous()
    return k, v, k.stride(0), k.stride(1)


def default_split(n_total: int, bh: int, block_n: int, device) -> int:
    """Entries per split: about 4 programs per SM on CUDA (at most 4096 entries); 256 elsewhere."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        split = triton.cdiv(n_total, max(1, (4 * sms) // max(bh, 1)))
    else:
        split = 256
    return min(max(split, 2 * block_n), 4096)


def default_tile(g_pad: int, d_pad: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps). Chosen from ptxas register counts for sm_90 (not yet timed on a GPU):
    D = 128, g = 4 with per-head loops uses ~141 registers/thread at BLOCK_N 16 / 4 warps (3 CTAs
    per SM), ~188 at 32 / 8 warps (1 CTA), and spills at 64. A starting point for GPU tuning."""
    return max(8, min(16, 2048 // d_pad)), 4


def _slots(parts: list[Part]):
    """Parts -> (slots {name: part} of the main launch, sparse parts, first entry of each part by name,
    the parts' (rotated, key block, key group, value group) shared by the quantised slots).

    The main launch has a dense slot "full", four quantised slots by container, a dense slot with a
    logit bias "markers" and a dense slot "hot"; every sparse part is a launch of its own. Entries keep
    the order of ``parts`` (each slot is told where its entries start), so the slots are only
    containers: a dense part without bias takes "full", then "hot"."""
    slots, sparse, entry0, e = {}, [], {}, 0
    for p in parts:
        if p.kind == QUANT:
            name = QUANT_SLOTS[p.container]
        elif p.kind == SPARSE:
            name = f"sparse{len(sparse)}"
            sparse.append(p)
        elif p.bias is not None:
            name = "markers"
        else:
            name = "full" if "full" not in slots else "hot"
        if name in slots:
            raise ValueError(f"decode_parts: two parts for the {name!r} slot (one part per container, "
                             "at most one biased and two unbiased dense parts)")
        if not name.startswith("sparse"):
            slots[name] = p
        entry0[name], e = e, e + p.n
    quant = [p for p in parts if p.kind == QUANT]
    shared = {(p.rotated, p.key_block, p.key_group, p.value_group) for p in quant}
    if len(shared) > 1:
        raise ValueError(f"decode_parts: the quantised parts differ in (rotated, key block, key group, "
                         f"value group): {sorted(shared)}")
    return slots, sparse, entry0, e, (shared.pop() if shared else (False, 0, 0, 0))


def decode_parts(query: torch.Tensor, parts: list[Part], scaling: float, split: int | None = None,
                 block_n: int | None = None, num_warps: int | None = None, per_head: bool = True,
                 return_lse: bool = False, dot: bool = False, softcap: float | None = None):
    """Triton decode attention over a layer's ``parts`` (``kernels.format.Part``, attention order) for
    one query step.

    query [Bt, Hq, 1, D] (any float dtype; math in fp32). Returns (out [Bt, 1, Hq, D] in
    query.dtype, mass [n_entries] fp32) like ``agacc.attention.attend``, entries in ``parts`` order,
    and with ``return_lse`` also the log-sum-exp [Bt, Hq] of the scaled logits. ``softcap`` (None / 0:
    none): logit softcapping c * tanh(z / c) of the scaled logits z, before a part's bias (``attend``'s
    ``softcap``); out, mass and lse all see the capped logits. Tuning knobs:
    ``split`` entries per split (rounded up to a multiple of the tile), ``block_n`` entries per tile
    (at most the key block, so a tile never straddles two key blocks), ``num_warps``, ``per_head``
    (loop over the g query heads on [BLOCK_N, D] tiles instead of one [g, BLOCK_N, D] product: fewer
    registers), ``dot`` (scores and the value product as ``tl.dot`` on tensor cores, the g query heads
    padded to 16 rows, tiles of at least 16 entries, TF32x3 -- about fp32 exact; needs a key block of
    >= 16 entries and sm_80+; an experiment for the GPU: the elementwise form ran at 0-4% of an H200's
    bandwidth, docs/kernels.md)."""
    bt, hq, qlen, d = query.shape
    if qlen != 1:
        raise ValueError(f"decode_parts handles one query step, got q={qlen}")
    if not parts:
        raise ValueError("decode_parts: no entries to attend over")
    if any(p.basis is not None for p in parts):
        raise ValueError("decode_parts does not read keys held in a basis; agacc.decode.decode_attention runs the "
                         "PyTorch path for them")
    dev = query.device
    slots, sparse, entry0, n_total, (rot, key_block, key_group, val_group) = _slots(parts)
    key_token = key_block == 0 and any(name in slots for name in _QUANT_NAMES)
    h = parts[0].heads
    if hq % h:
        raise ValueError(f"query heads {hq} not a multiple of KV heads {h}")
    g = hq // h
    bh = bt * h
    g_pad, d_pad = _pow2(g), _pow2(d)
    auto_n, auto_w = default_tile(g_pad, d_pad)
    if dot:
        if key_block and key_block < 16:
            raise ValueError(f"decode_parts(dot=True) needs tiles of >= 16 entries; the key block is {key_block}")
        g_pad, auto_n = max(16, g_pad), max(32, auto_n)
    block_n = _pow2(block_n or auto_n)
    if key_block:
        block_n = min(block_n, key_block)  # block_n | key block | split: one key block per tile
    if dot:
        block_n = max(16, block_n)
    num_warps = num_warps or auto_w

    # the split ranges: main launch first (full, int8, int4, int3, int2, markers, hot), then each sparse part
    rows = {name: slots[name].n if name in slots else 0 for name in ("full", *_QUANT_NAMES, "markers", "hot")}
    rows.update({f"sparse{i}": p.n for i, p in enumerate(sparse)})
    split = triton.cdiv(split or default_split(n_total, bh, block_n, dev), block_n) * block_n
    split0, s = {}, 0
    for name in rows:
        split0[name], s = s, s + triton.cdiv(rows[name], split)
    S_total, s_main = s, split0["sparse0"] if sparse else s

    qc = query.reshape(bt, hq, d)
    if qc.stride(-1) != 1:
        qc = qc.contiguous()
    if rot:  # the quantised slots hold K H, V H: the fp32 rotated query, same element strides as qc
        qc = qc.contiguous()
        qr = rotate(qc).contiguous()
    else:
        qr = qc
    out = torch.empty(bt, 1, hq, d, dtype=torch.float32 if rot else query.dtype, device=dev)
    out_rot = torch.empty_like(out) if rot else out
    logits = torch.empty(bh * g, n_total, dtype=torch.float32, device=dev)
    m_ws = torch.empty(bh, S_total, g_pad, dtype=torch.float32, device=dev)
    l_ws = torch.empty_like(m_ws)
    acc_ws = torch.empty(bh, S_total, g_pad, d_pad, dtype=torch.float32, device=dev)
    lse = torch.empty(bh, g_pad, dtype=torch.float32, device=dev)
    mass = torch.empty(n_total, dtype=torch.float32, device=dev)
    common = (qc, qc.stride(0), qc.stride(1), h, d, g, float(scaling), float(softcap or 0.0), split, n_total,
              S_total)
    meta = dict(BLOCK_N=block_n, G_PAD=g_pad, D_PAD=d_pad, PER_HEAD=2 if dot else per_head, SOFTCAP=bool(softcap),
                num_warps=num_warps, enable_fp_fusion=True)
    dummy = logits  # pointer for absent slots: their code is compiled out
    for name in ("full", *_QUANT_NAMES, "markers", "hot"):
        entry0.setdefault(name, 0)  # absent slots: any start (compiled out)

    if s_main:
        args = [qc, qr, *common[1:], logits, m_ws, l_ws, acc_ws]
        args += [split0[n] for n in (*_QUANT_NAMES, "markers", "hot")]
        args += [entry0[n] for n in ("full", *_QUANT_NAMES, "markers", "hot")]
        full = slots.get("full")
        if full is not None:
            fk, fv, fsb, fsh = _dense_strides(full.k, full.v)
            args += [fk, fv, fsb, fsh, rows["full"]]
        else:
            args += [dummy, dummy, 0, 0, 0]
        for name in _QUANT_NAMES:
            p = slots.get(name)
            if p is None:
                args += [dummy] * 6 + [0]
            else:
                args += [t.contiguous() for t in (p.k, p.k_scale, p.k_zero, p.v, p.v_scale, p.v_zero)]
                args += [rows[name]]
        mk = slots.get("markers")
        if mk is not None:
            mkk, mkv, msb, msh = _dense_strides(mk.k, mk.v)
            args += [mkk, mkv, mk.bias.to(device=dev, dtype=torch.float32).contiguous(), msb, msh, rows["markers"]]
        else:
            args += [dummy, dummy, dummy, 0, 0, 0]
        hot = slots.get("hot")
        if hot is not None:
            hk, hv, hsb, hsh = _dense_strides(hot.k, hot.v)
            args += [hk, hv, hsb, hsh, rows["hot"]]
        else:
            args += [dummy, dummy, 0, 0, 0]
        _partial_kernel[(s_main, bh)](
            *args, HAS_FULL="full" in slots, HAS_Q8="q8" in slots, HAS_Q4="q4" in slots,
            HAS_Q3="q3" in slots, HAS_Q2="q2" in slots, HAS_MK=mk is not None, HAS_HOT=hot is not None,
            B=key_block or block_n, G=val_group or 1, KEY_TOKEN=key_token, KG=key_group or 1, ROT=rot, **meta)
    for i, p in enumerate(sparse):
        name = f"sparse{i}"
        ts = [t.contiguous() for t in (p.k_map, p.k, p.k_scale, p.k_zero, p.v_map, p.v, p.v_scale, p.v_zero)]
        _sparse_partial_kernel[(triton.cdiv(rows[name], split), bh)](
            *common, split0[name], entry0[name], logits, m_ws, l_ws, acc_ws, *ts, rows[name],
            KEEP=p.keep, C=p.container, **meta)

    sb = max(1, min(_pow2(S_total), 4096 // (g_pad * d_pad)))
    _combine_kernel[(bh,)](m_ws, l_ws, acc_ws, out, out_rot, lse, S_total, h, d, g, out.stride(0), out.stride(2),
                           split0["q8"], split0["markers"], SB=sb, G_PAD=g_pad, D_PAD=d_pad, ROT=rot,
                           enable_fp_fusion=True)
    if rot:  # (P V H) H = P V: the quantised slots' share of the output, rotated back once
        out = (out + rotate(out_rot)).to(query.dtype)
    block_e = min(1024, _pow2(n_total))
    _mass_kernel[(triton.cdiv(n_total, block_e),)](logits, lse, mass, n_total, bh, g, 1.0 / (bt * hq),
                                                  BLOCK_E=block_e, G_PAD=g_pad, enable_fp_fusion=True)
    if return_lse:
        return out, mass, lse[:, :g].reshape(bt, hq)
    return out, mass


# --------------------------------------------------------------------------------------------
# ahead-of-time compilation (kernels/aot.py): the variants decode_parts can launch
# --------------------------------------------------------------------------------------------

AOT_HEAD_DIMS = (64, 96, 128, 256)
AOT_GQA = (1, 2, 4, 8)  # g = Hq / H; g = 3, 5, 6, 7 pad to G_PAD 4 / 8, the same code as 4 / 8
AOT_BLOCK_SIZES = (8, 16, 32, 64, 128)  # AGACCConfig.block_size choices (the key block)
_PTR = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
_AOT_SLOTS = ("full", "q8", "q4", "q3", "q2", "mk", "hot")  # the main launch's slots (HAS_FULL, HAS_Q8, ...)
_AOT_DEFAULT_SLOTS = ("full", "q4", "q3", "mk", "hot")  # the default agacc preset: 3..4-bit codes, markers


def _aot_tile(d: int, g: int, key_block: int, dot: bool = False) -> tuple[int, int, int]:
    """(G_PAD, D_PAD, BLOCK_N) as ``decode_parts`` derives them (default tile, capped at the key block;
    ``dot``: g padded to 16 rows, tiles of 32 capped at the key block, at least 16)."""
    g_pad, d_pad = _pow2(g), _pow2(d)
    block_n = _pow2(default_tile(g_pad, d_pad)[0])
    if dot:
        g_pad, block_n = max(16, g_pad), max(32, block_n)
    block_n = min(block_n, key_block) if key_block else block_n
    return g_pad, d_pad, max(16, block_n) if dot else block_n


def _aot_partial(d, g, *, key_block=16, rot=True, key_group=64, value_group=64, q="fp16", kv="fp16",
                 slots=_AOT_SLOTS, dot=False, softcap=False):
    """``_partial_kernel`` with the ``slots`` present (default all: full, q8, q4, q3, q2, mk, hot, the
    union of the code any subset of slots compiles; an absent slot's branch is compiled out). A
    format as ``LayerStore.parts()`` holds it: key_block 0 = per-token keys (groups of ``key_group``
    channels), else per-channel keys over blocks of ``key_block`` tokens; ``rot`` Hadamard-rotated
    codes; ``q`` the query (model) dtype, ``kv`` the dense parts' (store) dtype; ``softcap`` the SOFTCAP
    variant (logit softcapping: not in ``aot_specs``, which compiles the models without it)."""
    from kernels.format import value_group as vgroup

    g_pad, d_pad, block_n = _aot_tile(d, g, key_block, dot)
    key_token = key_block == 0
    sig = {"q_ptr": _PTR[q], "qr_ptr": "*fp32" if rot else _PTR[q], "scaling": "fp32", "softcap": "fp32",
           "logit_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "mk_bias": "*fp32"}
    for p in _partial_kernel.params:
        n = p.name
        if p.is_constexpr or n in sig:
            continue
        if n in ("f_k", "f_v", "mk_k", "mk_v", "hot_k", "hot_v"):
            sig[n] = _PTR[kv]
        elif n.endswith(("_k", "_v")):
            sig[n] = "*u8"
        elif n.endswith(("_ks", "_kz", "_vs", "_vz")):
            sig[n] = "*fp16"
        else:
            sig[n] = "i32"
    consts = {f"HAS_{s.upper()}": s in slots for s in _AOT_SLOTS}
    consts.update(B=key_block or block_n, G=vgroup(d, value_group), BLOCK_N=block_n, G_PAD=g_pad, D_PAD=d_pad,
                  PER_HEAD=2 if dot else True, KEY_TOKEN=key_token, KG=vgroup(d, key_group) if key_token else 1,
                  ROT=rot, SOFTCAP=softcap)
    keys = f"token/{consts['KG']}" if key_token else f"B{key_block}"
    which = "all" if set(slots) == set(_AOT_SLOTS) else "+".join(s for s in _AOT_SLOTS if s in slots)
    name = (f"decode.partial[D={d},g={g},keys={keys},G={consts['G']},{'rot' if rot else 'plain'},"
            f"q={q},kv={kv},slots={which}{',dot' if dot else ''}{',softcap' if softcap else ''}]")
    return name, _partial_kernel, sig, consts, {"num_warps": 4, "enable_fp_fusion": True}


def _aot_sparse(d, g, c, keep, *, key_block=16, q="fp16", dot=False, softcap=False):
    g_pad, d_pad, block_n = _aot_tile(d, g, key_block, dot)
    sig = {n: "*u8" for n in ("km", "k", "vm", "v")}
    sig.update({n: "*fp16" for n in ("ks", "kz", "vs", "vz")})
    sig.update({"q_ptr": _PTR[q], "scaling": "fp32", "softcap": "fp32", "logit_ptr": "*fp32", "m_ptr": "*fp32",
                "l_ptr": "*fp32", "acc_ptr": "*fp32"})
    sig.update({n: "i32" for n in ("sqb", "sqh", "H", "D", "g", "split", "n_total", "S_total", "ws0", "e0", "n")})
    consts = dict(KEEP=keep, C=c, BLOCK_N=block_n, G_PAD=g_pad, D_PAD=d_pad, PER_HEAD=2 if dot else True,
                  SOFTCAP=softcap)
    name = f"decode.sparse[D={d},g={g},c={c},keep={keep},N={block_n},q={q}{',dot' if dot else ''}" \
           f"{',softcap' if softcap else ''}]"
    return name, _sparse_partial_kernel, sig, consts, {"num_warps": 4, "enable_fp_fusion": True}


def _aot_combine(d, g, sb, rot, out="fp16"):
    g_pad, d_pad = _pow2(g), _pow2(d)
    out_t = "*fp32" if rot else _PTR[out]  # with ROT the wrapper's out is fp32 (rotated back after)
    sig = {"m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "out_ptr": out_t, "out_rot_ptr": out_t,
           "lse_ptr": "*fp32"}
    sig.update({n: "i32" for n in ("S", "H", "D", "g", "sob", "soh", "R0", "R1")})
    consts = dict(SB=sb, G_PAD=g_pad, D_PAD=d_pad, ROT=rot)
    name = f"decode.combine[D={d},g={g},SB={sb},{'rot' if rot else 'plain'},out={'fp32' if rot else out}]"
    return name, _combine_kernel, sig, consts, {"num_warps": 4, "enable_fp_fusion": True}


def _aot_mass(g, block_e):
    sig = {"logit_ptr": "*fp32", "lse_ptr": "*fp32", "mass_ptr": "*fp32", "n_total": "i32", "BH": "i32",
           "g": "i32", "inv_norm": "fp32"}
    consts = dict(BLOCK_E=block_e, G_PAD=_pow2(g))
    return f"decode.mass[g={g},E={block_e}]", _mass_kernel, sig, consts, {"num_warps": 4, "enable_fp_fusion": True}


def aot_specs() -> list:
    """Every variant ``decode_parts`` can launch, as (name, kernel, signature, constexprs, options)
    for ``kernels/aot.py``. The constexprs follow the wrapper's own derivations (``default_tile``,
    the cap at the key block, ``value_group``, the SB / BLOCK_E formulas), so a change there moves
    these too. Every variant is compiled without logit softcapping (SOFTCAP=False; a softcapped model's
    variants, ``softcap=True`` of ``_aot_partial`` / ``_aot_sparse``, compile on first use). Coverage:

    * main kernel, every slot compiled in (the union of any slot subset): head dim x GQA group at
      the default format (key block 16, rotated, per-channel keys, value groups of 64, fp16); the
      other formats at g = 8 (the most registers) for D = 128 and 256 (96 shares 128's tile): not
      rotated, per-token keys; the default preset's slots alone at D = 128, g = 4; every key block size (8 moves the tile to 8 rows) at D = 128, g = 4 (Llama-3-8B);
      non-power-of-two value / key groups (D = 96, groups of 24: the gather path); bf16 model with
      the fp16 store, bf16 store, fp32 model.
    * sparse kernel: every container (2, 3, 4, 8 bits) x head dim at g = 4 with the fewest and the
      most kept elements (8 and 3/4 of D: KEEP only moves byte offsets); every GQA group at D = 128.
    * combine: every head dim x GQA group, rotated or not, at the largest split tile SB (long
      contexts) and SB = 1; every SB (1 .. 4096 / (G_PAD * D_PAD)) at D = 128, g = 4.
    * mass: every BLOCK_E (min(1024, pow2(n)): 1 .. 1024) at g = 4, the largest at every GQA group.
    """
    specs = []
    for d in AOT_HEAD_DIMS:
        for g in AOT_GQA:
            specs.append(_aot_partial(d, g))
    for d in (128, 256):  # the two tile widths (D_PAD) that hold the most registers; 96 is D_PAD 128
        specs.append(_aot_partial(d, 8, rot=False))
        specs.append(_aot_partial(d, 8, key_block=0))
    specs.append(_aot_partial(128, 4, slots=_AOT_DEFAULT_SLOTS))
    for kb in AOT_BLOCK_SIZES:
        if kb != 16:
            specs.append(_aot_partial(128, 4, key_block=kb))
    specs.append(_aot_partial(96, 4, value_group=24))
    specs.append(_aot_partial(96, 4, key_block=0, key_group=24, value_group=24))
    specs.append(_aot_partial(128, 4, q="bf16"))
    specs.append(_aot_partial(128, 4, q="bf16", kv="bf16"))
    specs.append(_aot_partial(128, 4, q="fp32", kv="fp32", rot=False))
    # dot=True (tensor cores, G_PAD 16): the experiment's shapes (key blocks 16 / 32, D 128 / 64)
    specs.append(_aot_partial(128, 4, dot=True))
    specs.append(_aot_partial(128, 4, key_block=32, dot=True))
    specs.append(_aot_partial(64, 4, key_block=32, q="bf16", kv="bf16", dot=True))

    for c in (2, 3, 4, 8):
        for d in AOT_HEAD_DIMS:
            for keep in sorted({8, d * 3 // 4 // 8 * 8}):
                specs.append(_aot_sparse(d, 4, c, keep))
    for g in AOT_GQA:
        if g != 4:
            specs.append(_aot_sparse(128, g, 4, 64))
    specs.append(_aot_sparse(128, 4, 2, 8, key_block=32, dot=True))

    def sb_max(d, g):
        return max(1, 4096 // (_pow2(g) * _pow2(d)))

    for d in AOT_HEAD_DIMS:
        for g in AOT_GQA:
            for rot in (True, False):
                for sb in sorted({1, sb_max(d, g)}):
                    specs.append(_aot_combine(d, g, sb, rot))
    sb = 2
    while sb < sb_max(128, 4):
        specs.append(_aot_combine(128, 4, sb, False))
        sb *= 2
    specs.append(_aot_combine(128, 4, sb_max(128, 4), False, out="bf16"))
    for rot in (True, False):  # dot=True pads g to 16: G_PAD 16 (named g=16)
        specs.append(_aot_combine(128, 16, sb_max(128, 16), rot))

    for e in (1 << i for i in range(11)):
        specs.append(_aot_mass(4, e))
    for g in AOT_GQA:
        if g != 4:
            specs.append(_aot_mass(g, 1024))
    specs.append(_aot_mass(16, 1024))  # dot=True's G_PAD
    return specs
