"""Flash attention of a CHUNK of queries over a layer's held parts, key tiles at a time.

Entry point: ``chunk_parts(query, parts, scaling, n_new, n_obs)``, ``parts`` a list of
``kernels.format.Part`` (``agacc.store.LayerStore.parts()``) whose last ``n_new`` entries are the
chunk's own new tokens; ``agacc.attention.chunk_attention`` calls it when ``kernels.backend`` is
"triton" and is its reference (with ``agacc.attention.attend(..., causal_new=n_new, n_obs=n_obs)``
over the dequantised entries). Never a dequantised copy of the store, never a q x n matrix: the
temporaries are [BLOCK_M, BLOCK_N] tiles in registers, the softmax state (O(g*q x D) fp32 per KV
head) and the mass partials (Bt*H x n fp32).

Rows: the g query heads of one KV head's GQA group times the q queries, flattened (j, i) -> j*q + i
(as ``chunk_attention``), so g is a runtime value, not a specialisation. Query i sees every entry
before the new ones and new entries 0..i (entry e is new entry e - (n - n_new)).

Two kernels, one launch of each per part (K and V read once by the first, K once more by the second):

1. ``_chunk_kernel``, grid (cdiv(g*q, BLOCK_M), Bt*H). A program owns BLOCK_M rows of one KV head's
   group and loops over the part's key tiles (BLOCK_N entries): it reads the part's bytes with the
   row loaders of ``kernels.triton_decode`` (dense rows, packed 8/4/3/2-bit codes, per-token key and
   value scales) and two of its own (per-channel key scales gathered per row, as a tile may span
   several key blocks; sparse bitmap + kept codes with the kept count a runtime value), dequantises in
   registers, and runs an online softmax (``tl.dot`` for Q K^T and P V). Its running state (``m``, ``l``,
   accumulator ``acc``, fp32, [Bt*H, g*q(, D_PAD)]) is read at the start and written back at the end,
   so the launches of successive parts (in stream order) continue one softmax. Rotated parts meet the
   rotated query and keep a state of their own (their accumulator is of V H); the wrapper merges the
   two states and rotates the second back once (``(P V H) H = P V``). Rows of the new tokens stop at
   their last visible entry (the causal tiles past it are skipped).
2. ``_mass_kernel``, grid (cdiv(n_part, BLOCK_N), Bt*H): the attention mass of the last ``n_obs``
   queries, a second pass over the keys only for those g*n_obs rows, with the log-sum-exp per row
   the first pass left: part_mass[bh, e] = sum_rows exp(logit - lse), summed over bh by the wrapper
   and divided by Bt*Hq*n_obs (``chunk_attention``'s normalisation). O(Bt*H x n) floats, no q x n.

All arithmetic is fp32; the two products run as ``tl.dot`` with input precision "tf32x3" (three
TF32 MMAs, about fp32 accurate) -- the interpreter computes them in fp32. Specialisations
(``aot_specs``): D_PAD (head dim rounded up to a power of two) and its tile, the part's format and
container, the dense dtype, a logit bias, keys per token or per channel, the value (and per-token
key) group, logit softcapping (SOFTCAP: Gemma2's c * tanh(z / c) on the scaled logits, before the
bias and the causal mask); GQA group size, kept count of a sparse part, key block size, lengths and the
cap itself are runtime.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.format import DENSE, QUANT, SPARSE, Part, rotate
from kernels.triton_decode import (_cap, _dense_strides, _load_dense, _load_quant_values, _pow2, _unpack_codes,
                                   _unpack_rows)

# FMT codes: 0 dense rows, 1 packed quantised codes, 2 sparse (bitmap + kept codes)
_FMT = {DENSE: 0, QUANT: 1, SPARSE: 2}


# --------------------------------------------------------------------------------------------
# loaders: [BLOCK_N, D_PAD] fp32 rows (zero outside rows < n / d < D)
# --------------------------------------------------------------------------------------------

@triton.jit
def _load_channel_keys(codes_ptr, sc_ptr, zr_ptr, bh, n, rows, rmask, offs_d, dmask, D, B,
                       C: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr):
    """Key rows of packed codes [Bt*H, n, D*C/8] with a per-channel scale/zero per block of B tokens
    [Bt*H, n/B, D]; a tile may span several blocks (B runtime), so each row gathers its block's."""
    u = _unpack_codes(codes_ptr, bh * n + rows, rmask, D, C, BLOCK_N, D_PAD).to(tl.float32)
    sidx = (bh * (n // B) + rows[:, None] // B) * D + offs_d[None, :]
    m = rmask[:, None] & dmask[None, :]
    sc = tl.load(sc_ptr + sidx, mask=m, other=0.0).to(tl.float32)
    zr = tl.load(zr_ptr + sidx, mask=m, other=0.0).to(tl.float32)
    return u * sc + zr


@triton.jit
def _load_sparse_rows(map_ptr, codes_ptr, sc_ptr, zr_ptr, bh, n, rows, rmask, D, keep,
                      C: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr):
    """``triton_decode._load_sparse`` with the kept count ``keep`` a runtime value (one compiled kernel
    for every kept count): bitmap [Bt*H, n, D/8], kept codes [Bt*H, n, keep*C/8] in position order,
    scale/zero [Bt*H, n, 1]; a pruned element is exactly 0."""
    bit = _unpack_rows(map_ptr, (bh * n + rows) * (D // 8), rmask, D // 8, 1, BLOCK_N, D_PAD)
    idx = tl.cumsum(bit, axis=1) - bit  # number of the element among the kept ones
    present = bit != 0
    m = rmask[:, None] & present
    base = codes_ptr + (bh * n + rows[:, None]) * (keep * C // 8)
    if C == 3:  # 2-bit plane (keep/4 bytes), then 1-bit plane
        lo = tl.load(base + idx // 4, mask=m, other=0).to(tl.int32)
        hi = tl.load(base + keep // 4 + idx // 8, mask=m, other=0).to(tl.int32)
        u = (((lo >> ((idx % 4) * 2)) & 3) + ((hi >> (idx % 8)) & 1) * 4).to(tl.float32)
    else:
        PER: tl.constexpr = 8 // C
        MASK: tl.constexpr = (1 << C) - 1
        raw = tl.load(base + idx // PER, mask=m, other=0)
        u = ((raw.to(tl.int32) >> ((idx % PER) * C)) & MASK).to(tl.float32)
    sc = tl.load(sc_ptr + bh * n + rows, mask=rmask, other=0.0).to(tl.float32)
    zr = tl.load(zr_ptr + bh * n + rows, mask=rmask, other=0.0).to(tl.float32)
    return tl.where(present, u * sc[:, None] + zr[:, None], 0.0)


@triton.jit
def _load_k(k_ptr, ks_ptr, kz_ptr, km_ptr, sb, sh, b, h, bh, n, rows, rmask, offs_d, dmask, D, B, keep,
            FMT: tl.constexpr, C: tl.constexpr, KEY_TOKEN: tl.constexpr, KG: tl.constexpr,
            BLOCK_N: tl.constexpr, D_PAD: tl.constexpr):
    """Key rows of one part, any format: [BLOCK_N, D_PAD] fp32."""
    if FMT == 0:
        k = _load_dense(k_ptr, sb, sh, b, h, rows, rmask, offs_d, dmask, D)
    elif FMT == 1:
        if KEY_TOKEN:
            k = _load_quant_values(k_ptr, ks_ptr, kz_ptr, bh, n, rows, rmask, offs_d, dmask, D, KG, C, BLOCK_N, D_PAD)
        else:
            k = _load_channel_keys(k_ptr, ks_ptr, kz_ptr, bh, n, rows, rmask, offs_d, dmask, D, B, C, BLOCK_N, D_PAD)
    else:
        k = _load_sparse_rows(km_ptr, k_ptr, ks_ptr, kz_ptr, bh, n, rows, rmask, D, keep, C, BLOCK_N, D_PAD)
    return k


@triton.jit
def _load_v(v_ptr, vs_ptr, vz_ptr, vm_ptr, sb, sh, b, h, bh, n, rows, rmask, offs_d, dmask, D, keep,
            FMT: tl.constexpr, C: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr):
    """Value rows of one part, any format: [BLOCK_N, D_PAD] fp32."""
    if FMT == 0:
        v = _load_dense(v_ptr, sb, sh, b, h, rows, rmask, offs_d, dmask, D)
    elif FMT == 1:
        v = _load_quant_values(v_ptr, vs_ptr, vz_ptr, bh, n, rows, rmask, offs_d, dmask, D, G, C, BLOCK_N, D_PAD)
    else:
        v = _load_sparse_rows(vm_ptr, v_ptr, vs_ptr, vz_ptr, bh, n, rows, rmask, D, keep, C, BLOCK_N, D_PAD)
    return v


@triton.jit
def _load_q_rows(q_ptr, sqb, sqh, sqi, b, h, g, j, i, rvalid, offs_d, dmask, scaling):
    """Query rows (head h*g + j, query i) of q [Bt, Hq, q, D] fp32 (last dim contiguous), times
    ``scaling``: [BLOCK_M, D_PAD] fp32, zero padding."""
    qp = q_ptr + b * sqb + (h * g + j[:, None]) * sqh + i[:, None] * sqi + offs_d[None, :]
    return tl.load(qp, mask=rvalid[:, None] & dmask[None, :], other=0.0) * scaling


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------

# integer arguments that change from chunk to chunk (query strides and length, part lengths and offsets,
# the strides of parts that grow): not specialised, so a new pattern of "== 1" / "% 16" is no new compile
_CHUNK_RUNTIME = ("sqb", "sqh", "sqi", "q_len", "softcap", "new0", "n", "sb", "sh", "keep")


@triton.jit(do_not_specialize=_CHUNK_RUNTIME)
def _chunk_kernel(
    q_ptr, sqb, sqh, sqi, H, D, g, q_len, scaling, softcap, new0, n,
    k_ptr, ks_ptr, kz_ptr, km_ptr, v_ptr, vs_ptr, vz_ptr, vm_ptr, bias_ptr, sb, sh, B, keep,
    m_ptr, l_ptr, acc_ptr,
    FMT: tl.constexpr, C: tl.constexpr, HAS_BIAS: tl.constexpr, KEY_TOKEN: tl.constexpr, KG: tl.constexpr,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Grid (cdiv(g*q_len, BLOCK_M), Bt*H). Continues the online softmax of rows r = j*q_len + i over
    the ``n`` entries of one part; ``new0`` = the part-local index of new entry 0 (row i sees part rows
    <= new0 + i; >= n when the part holds none). State m, l [Bt*H, g*q_len], acc [Bt*H, g*q_len, D_PAD]
    fp32, updated in place. SOFTCAP: the scaled logits are capped by ``softcap`` before the bias and mask."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    M = g * q_len
    r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    rvalid = r < M
    i = r % q_len
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d < D
    qt = _load_q_rows(q_ptr, sqb, sqh, sqi, b, h, g, r // q_len, i, rvalid, offs_d, dmask, scaling)
    last = new0 + i  # last part row each query row sees
    stop = tl.minimum(n, tl.max(tl.where(rvalid, last, -1), axis=0) + 1)
    sp = bh * M + r
    m_i = tl.load(m_ptr + sp, mask=rvalid, other=float("-inf"))
    l_i = tl.load(l_ptr + sp, mask=rvalid, other=0.0)
    ap = acc_ptr + sp[:, None] * D_PAD + offs_d[None, :]
    acc = tl.load(ap, mask=rvalid[:, None], other=0.0)
    for t in range(0, stop, BLOCK_N):
        rows = t + tl.arange(0, BLOCK_N)
        rmask = rows < n
        k = _load_k(k_ptr, ks_ptr, kz_ptr, km_ptr, sb, sh, b, h, bh, n, rows, rmask, offs_d, dmask, D, B, keep,
                    FMT, C, KEY_TOKEN, KG, BLOCK_N, D_PAD)
        s = tl.dot(qt, tl.trans(k), input_precision="tf32x3")  # [BLOCK_M, BLOCK_N]
        if SOFTCAP:
            s = _cap(s, softcap)
        if HAS_BIAS:
            s += tl.load(bias_ptr + rows, mask=rmask, other=0.0)[None, :]
        s = tl.where(rmask[None, :] & (rows[None, :] <= last[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: no NaN
        alpha = tl.exp(m_i - m_use)
        p = tl.exp(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_v(v_ptr, vs_ptr, vz_ptr, vm_ptr, sb, sh, b, h, bh, n, rows, rmask, offs_d, dmask, D, keep,
                    FMT, C, G, BLOCK_N, D_PAD)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="tf32x3")
        m_i = m_new
    tl.store(m_ptr + sp, m_i, mask=rvalid)
    tl.store(l_ptr + sp, l_i, mask=rvalid)
    tl.store(ap, acc, mask=rvalid[:, None])


@triton.jit(do_not_specialize=_CHUNK_RUNTIME + ("n_obs", "entry0", "n_total"))
def _mass_kernel(
    q_ptr, sqb, sqh, sqi, H, D, g, q_len, n_obs, scaling, softcap, new0, n, entry0, n_total,
    k_ptr, ks_ptr, kz_ptr, km_ptr, bias_ptr, sb, sh, B, keep,
    lse_ptr, mass_ptr,
    FMT: tl.constexpr, C: tl.constexpr, HAS_BIAS: tl.constexpr, KEY_TOKEN: tl.constexpr, KG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Grid (cdiv(n, BLOCK_N), Bt*H). For the part's entries [t, t+BLOCK_N) of one KV head:
    mass[bh, entry0 + e] = sum over the g*n_obs observed rows (j, q_len - n_obs + o) of
    exp(logit - lse[bh, j*q_len + i]), 0 where the row does not see the entry. ``lse`` [Bt*H, g*q_len]
    fp32 (the first pass's), ``mass`` [Bt*H, n_total] fp32."""
    t = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = t + tl.arange(0, BLOCK_N)
    rmask = rows < n
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d < D
    k = _load_k(k_ptr, ks_ptr, kz_ptr, km_ptr, sb, sh, b, h, bh, n, rows, rmask, offs_d, dmask, D, B, keep,
                FMT, C, KEY_TOKEN, KG, BLOCK_N, D_PAD)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows, mask=rmask, other=0.0)
    tot = tl.zeros([BLOCK_N], tl.float32)
    R = g * n_obs
    for r0 in range(0, R, BLOCK_M):
        r = r0 + tl.arange(0, BLOCK_M)
        rvalid = r < R
        j = r // n_obs
        i = q_len - n_obs + r % n_obs
        qt = _load_q_rows(q_ptr, sqb, sqh, sqi, b, h, g, j, i, rvalid, offs_d, dmask, scaling)
        lse = tl.load(lse_ptr + bh * g * q_len + j * q_len + i, mask=rvalid, other=0.0)
        s = tl.dot(qt, tl.trans(k), input_precision="tf32x3")
        if SOFTCAP:
            s = _cap(s, softcap)
        if HAS_BIAS:
            s += bias[None, :]
        seen = rvalid[:, None] & rmask[None, :] & (rows[None, :] <= (new0 + i)[:, None])
        tot += tl.sum(tl.where(seen, tl.exp(s - lse[:, None]), 0.0), axis=0)
    tl.store(mass_ptr + bh * n_total + entry0 + rows, tot, mask=rmask)


# --------------------------------------------------------------------------------------------
# specialisations: what a part compiles to (shared by the wrapper and aot_specs)
# --------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps) per padded head dim, for the main and the mass kernel: chosen from
# ptxas register and spill counts for sm_90 with fp32 tiles and tf32x3 products (no tile with more
# than a few hundred bytes of spills; D 256 spills ~300 bytes), not yet timed on a GPU. Stages:
# the main loop streams K/V tiles (3); the mass pass holds its key tile over a few row tiles, nothing
# worth pipelining (1, which also keeps its shared memory within sm_80's limit).
TILES = {16: ((32, 32, 4), (32, 32, 4)), 32: ((32, 32, 4), (32, 32, 4)), 64: ((32, 32, 4), (32, 32, 4)),
         128: ((32, 32, 8), (16, 32, 4)), 256: ((16, 16, 4), (16, 16, 4))}
STAGES = {"main": 3, "mass": 1}
# Turing (sm_75) gives a block 64 KiB of shared memory; the main kernel's three stages at D 256 take 69,760 B
# there (docs/kernels.md), so below sm_80 it pipelines two.
SMALL_SHARED_BELOW, SMALL_SHARED_STAGES = 80, {256: 2}


def launch_options(kernel: str, d_pad: int, cc: int = 90) -> dict:
    """The launch options of ``kernel`` ("main" | "mass") for a padded head dim on compute capability ``cc``
    (e.g. 75 for sm_75; what aot_specs compiles for that target)."""
    warps = TILES[d_pad][kernel == "mass"][2]
    stages = STAGES[kernel]
    if kernel == "main" and cc < SMALL_SHARED_BELOW:
        stages = SMALL_SHARED_STAGES.get(d_pad, stages)
    return {"num_warps": warps, "num_stages": stages, "enable_fp_fusion": True}


def device_cc(dev: torch.device) -> int:
    """Compute capability of a CUDA device as one number (sm_75 -> 75); 90 elsewhere (the interpreter)."""
    if dev.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(dev)
    return 10 * major + minor


_TORCH_TO_TRITON = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _constexprs(kind: str, d_pad: int, container: int = 8, bias: bool = False, key_token: bool = False,
                key_group: int = 1, value_group: int = 1, softcap: bool = False) -> dict:
    """The constexprs of ``_chunk_kernel`` for a part (canonical values for what a format does not read)."""
    bm, bn, _ = TILES[d_pad][0]
    quant = kind == QUANT
    return dict(FMT=_FMT[kind], C=container if kind != DENSE else 8, HAS_BIAS=bool(bias),
                KEY_TOKEN=bool(quant and key_token), KG=key_group if quant and key_token else 1,
                G=value_group if quant else 1, BLOCK_M=bm, BLOCK_N=bn, D_PAD=d_pad, SOFTCAP=bool(softcap))


def _part_constexprs(p: Part, d_pad: int, softcap: bool = False) -> dict:
    return _constexprs(p.kind, d_pad, p.container, p.bias is not None, p.key_block == 0, p.key_group or 1,
                       p.value_group or 1, softcap)


def _mass_constexprs(main: dict) -> dict:
    """``_mass_kernel``'s from ``_chunk_kernel``'s: no value group, the mass tile."""
    bm, bn, _ = TILES[main["D_PAD"]][1]
    return {**{k: v for k, v in main.items() if k != "G"}, "BLOCK_M": bm, "BLOCK_N": bn}


_SIG_HEAD = {"q_ptr": "*fp32", "sqb": "i32", "sqh": "i32", "sqi": "i32", "H": "i32", "D": "i32", "g": "i32",
             "q_len": "i32"}


def _signatures(kind: str, dtype: str = "fp16") -> tuple[dict, dict]:
    """(signature of ``_chunk_kernel``, of ``_mass_kernel``) for a part of ``kind`` (dense ``dtype``):
    the pointer types the wrapper passes (unused pointers are fp32 workspace)."""
    ptrs = {DENSE: dict(k=dtype, ks="fp32", kz="fp32", km="fp32", v=dtype, vs="fp32", vz="fp32", vm="fp32"),
            QUANT: dict(k="u8", ks="fp16", kz="fp16", km="fp32", v="u8", vs="fp16", vz="fp16", vm="fp32"),
            SPARSE: dict(k="u8", ks="fp16", kz="fp16", km="u8", v="u8", vs="fp16", vz="fp16", vm="u8")}[kind]
    tail = {"bias_ptr": "*fp32", "sb": "i32", "sh": "i32", "B": "i32", "keep": "i32"}
    main = {**_SIG_HEAD, "scaling": "fp32", "softcap": "fp32", "new0": "i32", "n": "i32",
            **{f"{name}_ptr": "*" + t for name, t in ptrs.items()}, **tail,
            "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32"}
    mass = {**_SIG_HEAD, "n_obs": "i32", "scaling": "fp32", "softcap": "fp32", "new0": "i32", "n": "i32",
            "entry0": "i32", "n_total": "i32", **{f"{name}_ptr": "*" + ptrs[name] for name in ("k", "ks", "kz", "km")},
            **tail, "lse_ptr": "*fp32", "mass_ptr": "*fp32"}
    return main, mass


def part_specs(query: torch.Tensor, parts: list[Part], softcap: float | None = None) -> list[tuple[str, dict, dict]]:
    """(kernel name, signature, constexprs) of every launch ``chunk_parts`` makes for these inputs."""
    d_pad = max(16, _pow2(query.shape[-1]))
    out = []
    for p in parts:
        main_sig, mass_sig = _signatures(p.kind, _TORCH_TO_TRITON.get(p.k.dtype, "u8"))
        ce = _part_constexprs(p, d_pad, bool(softcap))
        out += [("_chunk_kernel", main_sig, ce), ("_mass_kernel", mass_sig, _mass_constexprs(ce))]
    return out


AOT_HEAD_DIMS = (64, 96, 128, 256)
AOT_GROUP_SIZES = (32, 64, 128)  # value (and per-token key) group sizes of a config -> gcd with the head dim
AOT_DTYPES = ("fp16", "bf16", "fp32")


def _variant(kind: str, dtype: str, ce: dict) -> str:
    """A readable name of a specialisation, e.g. ``D128,quant,c3,keys=token/64,G=64``."""
    what = {DENSE: f"dense,{dtype}" + (",bias" if ce["HAS_BIAS"] else ""),
            QUANT: f"quant,c{ce['C']},keys=" + (f"token/{ce['KG']}" if ce["KEY_TOKEN"] else "channel")
            + (f",G={ce['G']}" if "G" in ce else ""),
            SPARSE: f"sparse,c{ce['C']}"}[kind]
    return f"D{ce['D_PAD']},{what},M{ce['BLOCK_M']},N{ce['BLOCK_N']}" + (",softcap" if ce.get("SOFTCAP") else "")


def aot_specs() -> list[tuple[str, triton.JITFunction, dict, dict, object]]:
    """Every specialisation ``chunk_parts`` launches for head dims 64/96/128/256 (any GQA group, kept
    count, key block size and length: runtime values): (name, fn, signature, constexprs, options), the
    options a callable of the target's compute capability (``launch_options``), for ``kernels/aot.py``.

    Per padded head dim (its one tile): dense parts in fp16/bf16/fp32, with or without a logit bias;
    quantised parts in containers 8/4/3/2 with keys per channel per block, or per token in groups of
    the value group, value groups gcd(D, s) for s in ``AOT_GROUP_SIZES``; sparse parts in the four
    containers. Each for ``_chunk_kernel`` and ``_mass_kernel`` (which has no value group). Rotation
    needs no specialisation (a rotated part is the same kernel on the rotated query). All without logit
    softcapping (SOFTCAP=False). A config outside this set (key and value groups of different sizes, a
    group of 256, a softcapped model's SOFTCAP=True) compiles on first use."""
    cases = []
    for d in AOT_HEAD_DIMS:
        d_pad = _pow2(d)
        for dt in AOT_DTYPES:
            for bias in (False, True):
                cases.append((DENSE, dt, _constexprs(DENSE, d_pad, bias=bias)))
        for c in (8, 4, 3, 2):
            for s in AOT_GROUP_SIZES:
                grp = math.gcd(d, s)
                cases.append((QUANT, "u8", _constexprs(QUANT, d_pad, c, value_group=grp)))
                cases.append((QUANT, "u8", _constexprs(QUANT, d_pad, c, key_token=True, key_group=grp,
                                                       value_group=grp)))
            cases.append((SPARSE, "u8", _constexprs(SPARSE, d_pad, c)))
    from functools import partial  # (here: an import above the kernels would move their lines, so their cache keys)

    specs, seen = [], set()
    for kind, dt, ce in cases:
        main_sig, mass_sig = _signatures(kind, dt)
        mass_ce, d_pad = _mass_constexprs(ce), ce["D_PAD"]
        for name, fn, sig, cx, opts in (
                (f"chunk.main[{_variant(kind, dt, ce)}]", _chunk_kernel, main_sig, ce,
                 partial(launch_options, "main", d_pad)),
                (f"chunk.mass[{_variant(kind, dt, mass_ce)}]", _mass_kernel, mass_sig, mass_ce,
                 partial(launch_options, "mass", d_pad))):
            if name not in seen:
                seen.add(name)
                specs.append((name, fn, sig, cx, opts))
    return specs


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------

def _part_args(p: Part, dev, dummy):
    """(k, ks, kz, km, v, vs, vz, vm, bias, sb, sh, B, keep) of a part, contiguous where the loaders
    index [Bt*H, n, ...] rows; unused pointers are ``dummy`` (fp32)."""
    bias = dummy if p.bias is None else p.bias.to(device=dev, dtype=torch.float32).contiguous()
    if p.kind == DENSE:
        k, v, sb, sh = _dense_strides(p.k, p.v)
        return k, dummy, dummy, dummy, v, dummy, dummy, dummy, bias, sb, sh, 1, 0
    ts = [t.contiguous() for t in (p.k, p.k_scale, p.k_zero, p.v, p.v_scale, p.v_zero)]
    if p.kind == QUANT:
        return ts[0], ts[1], ts[2], dummy, ts[3], ts[4], ts[5], dummy, bias, 0, 0, p.key_block or 1, 0
    km, vm = p.k_map.contiguous(), p.v_map.contiguous()
    return ts[0], ts[1], ts[2], km, ts[3], ts[4], ts[5], vm, bias, 0, 0, 1, p.keep


def chunk_parts(query: torch.Tensor, parts: list[Part], scaling: float, n_new: int, n_obs: int,
                softcap: float | None = None):
    """Triton attention of a chunk of q queries over a layer's ``parts`` (``kernels.format.Part``,
    attention order), the last ``n_new`` entries being the chunk's own tokens (causal among them).

    query [Bt, Hq, q, D] (any float dtype; math in fp32). Returns (out [Bt, q, Hq, D] in query.dtype,
    mass [n_entries] fp32) like ``agacc.attention.chunk_attention``: mass is the softmax probability
    each entry received from the last ``n_obs`` queries (at most q), summed over query heads and those
    queries, averaged over batch, divided by Hq * n_obs. ``softcap`` (None / 0: none): logit softcapping
    c * tanh(z / c) of the scaled logits z, before the parts' bias and the causal mask (as
    ``chunk_attention``'s ``softcap``), in the output and the mass alike."""
    bt, hq, q_len, d = query.shape
    parts = [p for p in parts if p.n]
    if not parts:
        raise ValueError("chunk_parts: no entries to attend over")
    if any(p.basis is not None for p in parts):
        raise ValueError("chunk_parts does not read keys held in a basis; agacc.attention.chunk_attention runs the "
                         "PyTorch path for them")
    h = parts[0].heads
    if hq % h:
        raise ValueError(f"query heads {hq} not a multiple of KV heads {h}")
    g, bh = hq // h, bt * parts[0].heads
    dev = query.device
    n_total = sum(p.n for p in parts)
    new_first = n_total - n_new  # entry index of new entry 0
    d_pad = max(16, _pow2(d))
    block_m, block_n = TILES[d_pad][0][0], TILES[d_pad][1][1]  # the main kernel's rows, the mass kernel's keys
    cc = device_cc(dev)
    M = g * q_len

    qf = query.to(torch.float32)
    if qf.stride(-1) != 1:
        qf = qf.contiguous()
    rot = any(p.kind == QUANT and p.rotated for p in parts)
    qr = rotate(qf).contiguous() if rot else qf  # the rotated parts hold K H, V H
    states = {}  # rotated? -> (m, l, acc): one online softmax per basis

    def state(rotated):
        if rotated not in states:
            states[rotated] = (torch.full((bh, M), float("-inf"), device=dev), torch.zeros(bh, M, device=dev),
                               torch.zeros(bh, M, d_pad, device=dev))
        return states[rotated]

    launches, e0 = [], 0
    dummy = torch.empty(1, dtype=torch.float32, device=dev)
    sc = (float(scaling), float(softcap or 0.0))
    for p in parts:
        rotated = p.kind == QUANT and p.rotated
        qq = qr if rotated else qf
        qa = (qq, qq.stride(0), qq.stride(1), qq.stride(2), h, d, g, q_len)
        pa = _part_args(p, dev, dummy)
        ce = _part_constexprs(p, d_pad, bool(softcap))
        new0 = new_first - e0
        launches.append((qa, new0, e0, p.n, pa, ce))
        _chunk_kernel[(triton.cdiv(M, block_m), bh)](*qa, *sc, new0, p.n, *pa, *state(rotated),
                                                     **ce, **launch_options("main", d_pad, cc))
        e0 += p.n

    m, l, acc = states.get(False, (None, None, None))
    if True in states:  # merge the rotated softmax in and rotate its accumulator back
        mr, lr, accr = states[True]
        if m is None:
            m, l, acc = mr, lr, rotate(accr[..., :d])
        else:
            mx = torch.maximum(m, mr)
            wa, wr = torch.exp(m - mx), torch.exp(mr - mx)
            l = l * wa + lr * wr
            acc = acc[..., :d] * wa[..., None] + rotate(accr[..., :d] * wr[..., None])
            m = mx
    out = (acc[..., :d] / l[..., None]).reshape(bt, hq, q_len, d).transpose(1, 2).to(query.dtype).contiguous()

    n_obs = min(n_obs, q_len)
    if n_obs <= 0:
        return out, torch.zeros(n_total, dtype=torch.float32, device=dev)
    lse = (m + torch.log(l)).contiguous()  # [Bt*H, g*q]
    part_mass = torch.empty(bh, n_total, dtype=torch.float32, device=dev)
    for qa, new0, e0, n, pa, ce in launches:
        _mass_kernel[(triton.cdiv(n, block_n), bh)](*qa, n_obs, *sc, new0, n, e0, n_total,
                                                   *pa[:4], *pa[8:], lse, part_mass, **_mass_constexprs(ce),
                                                   **launch_options("mass", d_pad, cc))
    return out, part_mass.sum(0) / (bt * hq * n_obs)
