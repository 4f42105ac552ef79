"""Per-layer mixed-precision K/V storage: the only owner of K/V bytes.

Tokens are grouped in blocks of B (block j = tokens [jB, (j+1)B)). New tokens append to the *hot*
region (the recent window and the not-yet-tiered tail: full precision, or where ``config.hot_width`` is 8 at 8
bits between forwards, ``narrow_hot``). ``apply_tiers`` moves whole blocks out of the hot region and between segments:

  hot      (fresh)            k, v           [Bt, H, n, D]      store dtype, the tokens of the forward under way
           (narrowed)         codes          [Bt, 2, H, n, D]   uint8, K and V, 8-bit, per token per group of G
                              scale/zero     [Bt, 2, H, n, D/G] fp16 (``narrow_hot``)

  full     FullSegment        k, v           [Bt, H, n, D]      store dtype
  int8/4/3/2 QuantSegment(c)  k, v codes     [Bt, H, n, D*c/8]  uint8, packed (quant.py)
                              k_scale/zero   [Bt, H, n/B, D]    fp16, per channel per block (key_quant="channel")
                                          or [Bt, H, n, D/Gk]   fp16, per token per group (key_quant="token")
                              v_scale/zero   [Bt, H, n, D/G]    fp16, per token per group
                              with cfg.rotate, the codes are of K H and V H (``quant.rotate``)
                              key_quant="basis": 2/3/4-bit keys as r coefficients in the layer's basis
                              (``agacc.basis``) in groups of their own widths (``policy.basis_layouts``):
                              codes [Bt, H, n, sum(count*width)/8], k_scale/zero [Bt, H, n/B, r]
  pruned   SparseSegment(keep)k, v bitmap    [Bt, H, n, D/8]    uint8
                              k, v codes     [Bt, H, n, keep*c/8] uint8 (c = container of b_min)
                              scale/zero     [Bt, H, n, 1]      fp16, per vector
  evicted  Markers            k, v           [Bt, H, m, D]      store dtype, importance-weighted mean
                              log_count      [m]                fp32 attention bias log(#tokens)
                              weight [m] fp32, span [m, 2] int32 (first, last block)

Within a segment, blocks sit in ``block_ids`` order, B rows each. Attention does not depend on
entry order after RoPE, so the store is read in one fixed order, described once by ``LayerStore.parts``
(a list of ``kernels.format.Part``: full, int8, int4, int3, int2, sparse by keep, markers, hot), which
every decode backend and the dequantised reference ``attention_entries`` read.
``nbytes()`` is the sum of ``.nbytes`` of every tensor held; the host copy is counted apart.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import dataclass

import torch

import kernels
from agacc import quant
from agacc.config import nested_widths
from agacc.quant import DENSE, QUANT, SPARSE, Part, value_group
from agacc.policy import basis_layouts, basis_rank, fidelity_floor, key_grouping
from agacc.tiers import CONTAINER_OF_TIER, EVICTED, FULL, INT2, INT3, INT4, INT8, NAMES, PRUNED, TIER_CONTAINER, evicted_runs


def _quant_ops(device) -> object:
    """The quantisers for tensors on ``device``: the Triton kernels (``kernels.quantize``) where
    ``kernels.backend`` picks Triton, else the PyTorch reference ``agacc.quant`` (same signatures)."""
    if kernels.backend(device) == "triton":
        from kernels import quantize

        return quantize
    return quant


def _cat(a: torch.Tensor | None, b: torch.Tensor, dim: int) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], dim=dim)


def _leaving(seg, slot: torch.Tensor):
    """The blocks of ``seg`` that move: (mask over its blocks, their slots, how many), or None.
    ``slot[b]`` is block b's slot among the moving blocks, -1 for a block that stays."""
    if not seg.n_blocks:
        return None
    dest = slot[seg.block_ids]
    mask = dest >= 0
    n = int(mask.sum())
    return (mask, dest[mask], n) if n else None


def _rows(block_pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """Row indices of the given block positions inside a segment (B rows per block)."""
    return (block_pos[:, None] * block_size + torch.arange(block_size, device=block_pos.device)).reshape(-1)


def _blocks(t: torch.Tensor, block_pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """``t[:, :, _rows(block_pos, B)]`` (t [Bt, H, n*B, X]): the same new contiguous tensor, selected
    a block (B*X elements) at a time, many times cheaper than row by row."""
    bt, h, n, x = t.shape
    return t.reshape(bt, h, n // block_size, block_size * x).index_select(2, block_pos).view(bt, h, -1, x)


def _put_blocks(t: torch.Tensor, block_pos: torch.Tensor, src: torch.Tensor, block_size: int) -> None:
    """``t[:, :, _rows(block_pos, B)] = src`` for a contiguous t [Bt, H, n*B, X], a block at a time."""
    bt, h, n, x = t.shape
    t.view(bt, h, n // block_size, block_size * x).index_copy_(2, block_pos, src.reshape(bt, h, -1, block_size * x))


def _runs(block_pos: torch.Tensor) -> list[tuple[int, int]]:
    """Block positions [n] -> maximal runs of consecutive positions as (start, stop), in order."""
    runs: list[list[int]] = []
    for b in block_pos.tolist():
        if runs and runs[-1][1] == b:
            runs[-1][1] = b + 1
        else:
            runs.append([b, b + 1])
    return [(a, b) for a, b in runs]


def _pick(t: torch.Tensor, runs: list[tuple[int, int]], per: int, extra=(),
          pos: torch.Tensor | None = None) -> torch.Tensor:
    """``t[:, :, rows]`` for the rows of the block ``runs`` (``per`` rows a block; dim 2), then the
    tensors ``extra`` appended (dim 2): the same new contiguous tensor as the gather and ``torch.cat``,
    copied a run at a time (a gather by index is many times slower on the CPU) in one pass; with
    ``pos`` (the same blocks' positions), many runs are gathered a block at a time instead."""
    if pos is not None and len(runs) > 4:
        pieces = [_blocks(t, pos, per)]
        if not extra:
            return pieces[0]
    else:
        pieces = [t[:, :, a * per:b * per] for a, b in runs]
    pieces += extra
    if len(pieces) > 1:
        return torch.cat(pieces, 2)
    return (pieces[0] if pieces else t[:, :, :0]).clone(memory_format=torch.contiguous_format)


@dataclass
class Entries:
    """One stretch of attention entries, as attention reads it.

    k, v: [Bt, H, n, D] in the compute dtype (dequantised); bias: None or [n] fp32 added to logits."""
    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor | None = None


class Segment:
    """Common bookkeeping: block ids in row order and the tensors held.

    ``drop_later`` drops blocks at once from the bookkeeping but copies the data once, together
    with the next append (or at ``flush``): a segment that loses and gains blocks in one re-tiering
    is copied once, not twice. Every read flushes first."""

    _keep = None  # (block runs, mask of the blocks dropped) of a pending drop (None: nothing pending)

    def __init__(self, block_size: int, device):
        self.block_size = block_size
        self.block_ids = torch.empty(0, dtype=torch.int32, device=device)

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def _data(self) -> list[tuple[str, int]]:
        """(attribute, rows per block) of every tensor indexed by rows (dim 2)."""
        raise NotImplementedError

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors() if t is not None) + self.block_ids.nbytes

    @property
    def n_blocks(self) -> int:
        return int(self.block_ids.numel())

    def remove(self, block_ids: torch.Tensor):
        """Drop the given blocks; returns their dequantised (k, v) in block_ids order (compute dtype fp32)."""
        pos_of = {int(b): i for i, b in enumerate(self.block_ids.tolist())}
        take = torch.tensor([pos_of[int(b)] for b in block_ids], dtype=torch.long, device=self.block_ids.device)
        keep_mask = torch.ones(self.n_blocks, dtype=torch.bool, device=take.device)
        keep_mask[take] = False
        keep = keep_mask.nonzero().squeeze(1)
        k, v = self.read_blocks(take)
        self.select_blocks(keep)
        return k, v

    def take(self, mask: torch.Tensor, to_bits: torch.Tensor | None = None):
        """Drop the blocks where ``mask`` [n_blocks] bool is set; returns their dequantised (k, v) in
        row order (fp32). ``remove`` for blocks found by a mask: one read, one select. ``to_bits``: the
        code bits each goes to (the plan's: 0 evicted, 16 full; ``QuantSegment`` reads nested values narrowed)."""
        k, v = self.read_blocks(mask.nonzero().squeeze(1))
        self.select_blocks((~mask).nonzero().squeeze(1))
        return k, v

    def read_blocks(self, block_pos: torch.Tensor):
        raise NotImplementedError

    def _select_ids(self, block_pos: torch.Tensor) -> None:
        self.block_ids = self.block_ids[block_pos]

    def select_blocks(self, block_pos: torch.Tensor) -> None:
        """Keep the blocks at ``block_pos`` (in that order), drop the rest."""
        self.flush()
        self._select_ids(block_pos)
        if not block_pos.numel():
            for name, _ in self._data():
                setattr(self, name, None)
            return
        runs = _runs(block_pos)
        for name, per in self._data():
            setattr(self, name, _pick(getattr(self, name), runs, per))

    def drop_later(self, mask: torch.Tensor, taken: list[int]) -> None:
        """Drop the blocks at the positions ``taken`` (ascending; ``mask`` [n_blocks] bool marks them)
        from the bookkeeping now; the data is copied with the next append (or at ``flush``)."""
        runs, a = [], 0
        for t in taken:
            if t > a:
                runs.append((a, t))
            a = t + 1
        if a < self.n_blocks:
            runs.append((a, self.n_blocks))
        if not runs or self._keep is not None:
            self.select_blocks((~mask).nonzero().squeeze(1))
            return
        self._select_ids(~mask)
        self._keep = (runs, mask)

    def flush(self) -> None:
        """Carry out a pending ``drop_later``."""
        if self._keep is not None:
            (runs, mask), self._keep = self._keep, None
            pos = (~mask).nonzero().squeeze(1) if len(runs) > 4 else None
            for name, per in self._data():
                setattr(self, name, _pick(getattr(self, name), runs, per, pos=pos))

    def _extend(self, new: dict, fresh: bool = True) -> None:
        """Append ``new`` {attribute: [tensors]} along dim 2 (after a pending select, in the same copy).
        ``fresh``: a lone tensor may be kept as it is (else an empty segment copies it)."""
        keep, self._keep = self._keep, None
        pos = (~keep[1]).nonzero().squeeze(1) if keep is not None and len(keep[0]) > 4 else None
        for name, per in self._data():
            ts, old = new[name], getattr(self, name)
            if keep is not None:
                t = _pick(old, keep[0], per, extra=ts, pos=pos)
            elif old is not None:
                t = torch.cat([old, *ts], 2)
            elif len(ts) > 1:
                t = torch.cat(ts, 2)
            else:
                t = ts[0] if fresh else ts[0].clone(memory_format=torch.contiguous_format)
            setattr(self, name, t)

    def map_batch(self, fn) -> None:
        """Apply ``fn`` (batch reorder / repeat) to every batch-dimensioned tensor."""
        self.flush()
        for name, t in list(vars(self).items()):
            if isinstance(t, torch.Tensor) and t.dim() == 4:
                setattr(self, name, fn(t))


class FullSegment(Segment):
    def __init__(self, block_size, device, dtype):
        super().__init__(block_size, device)
        self.dtype = dtype
        self.k = self.v = None

    def tensors(self):
        self.flush()
        return [self.k, self.v]

    def _data(self):
        return [("k", self.block_size), ("v", self.block_size)]

    def add(self, block_ids, k, v, fresh: bool = True, **_):
        self.block_ids = torch.cat([self.block_ids, block_ids.to(torch.int32)])
        self._extend({"k": [k.to(self.dtype)], "v": [v.to(self.dtype)]}, fresh)

    def read_blocks(self, block_pos):
        self.flush()
        B = self.block_size
        return _blocks(self.k, block_pos, B).float(), _blocks(self.v, block_pos, B).float()

    def part(self, **_) -> Part:
        self.flush()
        return Part(DENSE, self.k, self.v)


class QuantSegment(Segment):
    """Blocks quantised to codes of <= ``container`` bits (per block code bits in ``bits``). Keys are
    grouped per channel per block or per token (``key_per_token``: ``cfg.key_quant``; a ``LayerStore``
    sets it from the head dim at its first append, per token where ``cfg.keep_all`` applies,
    ``policy.key_grouping``); with ``cfg.rotate``
    keys and values are stored Hadamard-rotated (``rotated``), and ``read_blocks`` rotates them back. ``basis``:
    (w, codes, scales, inv_freq, groups) where the keys are held as coefficients in the layer's basis (its axes as
    Householder reflectors, ``quant.basis_axes``), in ``groups``
    ((width, count), ...; a ``LayerStore`` sets it: key_quant "basis"), never rotated."""

    def __init__(self, block_size, device, container, cfg):
        super().__init__(block_size, device)
        self.container = container
        self.cfg = cfg
        self.bits = torch.empty(0, dtype=torch.int8, device=device)
        self.k = self.k_scale = self.k_zero = self.v = self.v_scale = self.v_zero = None
        self.key_per_token = cfg.key_quant == "token"  # a LayerStore sets it from the head dim (key_grouping)
        self.basis = None

    @property
    def rotated(self) -> bool:
        return self.cfg.rotate

    def _axes(self, axes: torch.Tensor | None = None) -> torch.Tensor:
        """The basis' first r axes [H, r, D] fp32: the first r of ``axes`` (the layer's, made once per read by
        ``LayerStore.parts``), else of the same made here (``quant.basis_axes``), so a block's coefficients are taken
        and read back on the same floats."""
        axes = axes if axes is not None else quant.basis_axes(*self.basis[:3])
        return axes[:, :basis_rank((self.basis[4],))]

    def tensors(self):
        self.flush()
        return [self.bits, self.k, self.k_scale, self.k_zero, self.v, self.v_scale, self.v_zero]

    def _data(self):
        B = self.block_size
        per = B if self.key_per_token else 1  # key scales per token, or per block
        return [("k", B), ("k_scale", per), ("k_zero", per), ("v", B), ("v_scale", B), ("v_zero", B)]

    def _select_ids(self, block_pos):
        self.block_ids, self.bits = self.block_ids[block_pos], self.bits[block_pos]

    def add(self, block_ids, k, v, bits, **_):
        """k, v: [Bt, H, nb*B, D] float; bits: [nb] code bits (<= container)."""
        if self.rotated:
            k, v = k if self.basis is not None else quant.rotate(k), quant.rotate(v)
        # quantise runs of equal code bits together (usually one or two runs)
        groups = sorted(set(bits.tolist()))
        out = []
        for b in groups:
            if len(groups) == 1:  # every block: no selection needed
                kb, vb, ids_b = k, v, block_ids
            else:
                sel = (bits == b).nonzero().squeeze(1)
                r = _rows(sel, self.block_size)
                kb, vb, ids_b = k[:, :, r], v[:, :, r], block_ids[sel]
            out.append((ids_b, b, self.quantize(kb, vb, b, _rows(ids_b.long(), self.block_size))))
        self.append(out)

    def quantize(self, k, v, b: int, pos: torch.Tensor | None = None) -> tuple:
        """(already rotated) k, v [Bt, H, n*B, D] -> the six tensors a group of ``b``-bit blocks holds
        (k codes, k_scale, k_zero, v codes, v_scale, v_zero). Per block / per token: blocks quantise
        alike whichever others share the call. ``pos`` [n*B]: the tokens' positions (keys in a basis)."""
        cfg, B = self.cfg, self.block_size
        ops = _quant_ops(k.device)
        if self.basis is not None:  # the coefficients, per coefficient per block (the PyTorch quantiser: any r)
            k = quant.basis_coeffs(k, torch.linalg.pinv(self._axes()), self.basis[3], pos)
            pk, ks, kz = quant.quantize_coeffs(k, self.basis[4], B, cfg.quantizer, cfg.s, cfg.basis_meta)
        elif self.key_per_token:
            pk, ks, kz = ops.quantize_values(k, b, cfg.key_group_size, cfg.quantizer, cfg.s)
        else:
            pk, ks, kz = ops.quantize_keys(k, b, B, cfg.quantizer, cfg.s)
        method = "nested" if b in nested_widths(cfg) else cfg.quantizer
        pv, vs, vz = ops.quantize_values(v, b, cfg.value_group_size, method, cfg.s)
        return pk, ks, kz, pv, vs, vz

    def append(self, groups, fresh: bool = True) -> None:
        """Append quantised groups [(block_ids, code bits, the six tensors of ``quantize``)], in order.
        ``fresh``: the tensors are the segment's to keep (else an empty segment copies them)."""
        ids, code_bits = [self.block_ids], [self.bits]
        parts = {"k": [], "k_scale": [], "k_zero": [], "v": [], "v_scale": [], "v_zero": []}
        for ids_b, b, ts in groups:
            ids.append(ids_b.to(torch.int32))
            code_bits.append(torch.full((ids_b.numel(),), b, dtype=torch.int8, device=self.bits.device))
            for name, t in zip(parts, ts):
                parts[name].append(t)
        self.block_ids, self.bits = torch.cat(ids), torch.cat(code_bits)
        self._extend(parts, fresh)

    def part(self, block_pos=None, axes: torch.Tensor | None = None, narrow: torch.Tensor | None = None) -> Part:
        """The held blocks at ``block_pos`` (None: all) as a quantised ``Part``; ``axes``: see ``_axes``;
        ``narrow`` [blocks] bool: those blocks' nested values as the codes of one bit fewer they hold
        (``quant.narrow_values``)."""
        self.flush()
        if block_pos is None:
            k, ks, kz, v, vs, vz = self.k, self.k_scale, self.k_zero, self.v, self.v_scale, self.v_zero
        else:  # a few blocks, as a rule: gathered by index, a block at a time
            B = self.block_size
            kb = B if self.key_per_token else 1  # key scales per token, or per block
            k, v = _blocks(self.k, block_pos, B), _blocks(self.v, block_pos, B)
            ks, kz = _blocks(self.k_scale, block_pos, kb), _blocks(self.k_zero, block_pos, kb)
            vs, vz = _blocks(self.v_scale, block_pos, B), _blocks(self.v_zero, block_pos, B)
        if narrow is not None:
            v, vs, vz = quant.narrow_values(v, vs, vz, self.container, narrow.repeat_interleave(self.block_size))
        d = v.shape[-1] * 8 // self.container
        basis = {}
        if self.basis is not None:
            if self.cfg.basis_meta == "8bit":  # read as every reader takes them: fp16 (a layer's, while it is read)
                ks, kz = quant.coeff_meta(ks, kz)
            ids = self.block_ids if block_pos is None else self.block_ids[block_pos]
            basis = dict(basis=self._axes(axes), key_groups=self.basis[4], inv_freq=self.basis[3],
                         pos=_rows(ids.long(), self.block_size).to(torch.int32))
        return Part(QUANT, k, v, k_scale=ks, k_zero=kz, v_scale=vs, v_zero=vz, container=self.container,
                    key_block=0 if self.key_per_token else self.block_size,
                    key_group=d // ks.shape[-1] if self.key_per_token else 0, value_group=d // vs.shape[-1],
                    rotated=self.rotated, **basis)

    def read_blocks(self, block_pos):
        """Dequantised, un-rotated (k, v) fp32 of the given block positions."""
        return quant.dequantize_part(self.part(block_pos))

    def narrowed(self, block_pos: torch.Tensor, to_bits: torch.Tensor | None) -> torch.Tensor | None:
        """Which of the blocks at ``block_pos`` go to one bit fewer from a nested width (``to_bits`` [n]: the
        code bits each goes to, the plan's): [n] bool, None where none (or ``to_bits`` is None)."""
        widths = nested_widths(self.cfg)
        if to_bits is None or not widths:
            return None
        b = self.bits[block_pos]
        nested = torch.tensor(widths, dtype=b.dtype, device=b.device)
        m = (to_bits.to(b.dtype) == b - 1) & torch.isin(b, nested)
        return m if bool(m.any()) else None

    def take(self, mask, to_bits=None):
        """``Segment.take``; a nested block going to one bit fewer is read narrowed (``narrowed``)."""
        pos = mask.nonzero().squeeze(1)
        k, v = quant.dequantize_part(self.part(pos, narrow=self.narrowed(pos, to_bits)))
        self.select_blocks((~mask).nonzero().squeeze(1))
        return k, v


class SparseSegment(Segment):
    """Magnitude-pruned blocks keeping ``keep`` of D elements per vector, kept values at ``bits`` bits."""

    def __init__(self, block_size, device, keep, bits, cfg):
        super().__init__(block_size, device)
        self.keep, self.code_bits, self.cfg = keep, bits, cfg
        self.k_map = self.k = self.k_scale = self.k_zero = None
        self.v_map = self.v = self.v_scale = self.v_zero = None

    def tensors(self):
        self.flush()
        return [self.k_map, self.k, self.k_scale, self.k_zero, self.v_map, self.v, self.v_scale, self.v_zero]

    def _data(self):
        return [(name, self.block_size) for name in ("k_map", "k", "k_scale", "k_zero", "v_map", "v", "v_scale", "v_zero")]

    def add(self, block_ids, k, v, **_):
        cfg = self.cfg
        km, kq, ks, kz = quant.sparse_encode(k, self.keep, self.code_bits, cfg.quantizer, cfg.s)
        vm, vq, vs, vz = quant.sparse_encode(v, self.keep, self.code_bits, cfg.quantizer, cfg.s)
        self.block_ids = torch.cat([self.block_ids, block_ids.to(torch.int32)])
        self._extend({name: [t] for name, t in zip(("k_map", "k", "k_scale", "k_zero", "v_map", "v", "v_scale", "v_zero"),
                                                   (km, kq, ks, kz, vm, vq, vs, vz))})

    def part(self, block_pos=None, **_) -> Part:
        """The held blocks at ``block_pos`` (None: all) as a sparse ``Part``."""
        self.flush()
        sel = (lambda t: t) if block_pos is None else (lambda t: _blocks(t, block_pos, self.block_size))
        return Part(SPARSE, sel(self.k), sel(self.v), k_scale=sel(self.k_scale), k_zero=sel(self.k_zero),
                    v_scale=sel(self.v_scale), v_zero=sel(self.v_zero), k_map=sel(self.k_map), v_map=sel(self.v_map),
                    container=quant.container_bits(self.code_bits), keep=self.keep, code_bits=self.code_bits)

    def read_blocks(self, block_pos):
        """Decoded (k, v) fp32 of the given block positions, pruned elements zero."""
        return quant.dequantize_part(self.part(block_pos))


class Markers:
    """One entry per contiguous run of evicted blocks (000 §2.4.3): the importance-weighted mean of
    the run's keys and values, attended with a log(count) bias so the run keeps its attention share."""

    def __init__(self, device, dtype):
        self.dtype = dtype
        self.k = self.v = None
        self.log_count = torch.empty(0, dtype=torch.float32, device=device)
        self.weight = torch.empty(0, dtype=torch.float32, device=device)
        self.span = torch.empty(0, 2, dtype=torch.int32, device=device)

    def tensors(self):
        return [self.k, self.v, self.log_count, self.weight, self.span]

    def nbytes(self):
        return sum(t.nbytes for t in self.tensors() if t is not None)

    @property
    def n(self) -> int:
        return int(self.span.shape[0])

    def map_batch(self, fn):
        if self.k is not None:
            self.k, self.v = fn(self.k), fn(self.v)

    def set(self, runs: list[tuple[int, int, torch.Tensor, torch.Tensor, float, int]]):
        """runs: (first_block, last_block, k_mean [Bt,H,D], v_mean [Bt,H,D], weight, count), in block order."""
        dev = self.span.device
        if not runs:
            self.__init__(dev, self.dtype)
            return
        self.k = torch.stack([r[2] for r in runs], 2).to(self.dtype)
        self.v = torch.stack([r[3] for r in runs], 2).to(self.dtype)
        self.weight = torch.tensor([r[4] for r in runs], dtype=torch.float32, device=dev)
        self.log_count = torch.tensor([math.log(r[5]) for r in runs], dtype=torch.float32, device=dev)
        self.span = torch.tensor([[r[0], r[1]] for r in runs], dtype=torch.int32, device=dev)

    def runs(self):
        """Existing runs as (first, last, k [Bt,H,D] fp32, v, weight, count)."""
        return [(int(s[0]), int(s[1]), self.k[:, :, i].float(), self.v[:, :, i].float(),
                 float(self.weight[i]), int(round(math.exp(float(self.log_count[i])))))
                for i, s in enumerate(self.span)]

    def run(self, i: int):
        """Run ``i`` as (k [Bt,H,D] fp32, v, weight, count), as ``runs`` gives it."""
        return (self.k[:, :, i].float(), self.v[:, :, i].float(), float(self.weight[i]),
                int(round(math.exp(float(self.log_count[i])))))

    def rebuild(self, spans: list[tuple[int, int]], items: list) -> None:
        """``set`` from runs that are either kept (``items[j]`` an int: the index of an existing run
        with the same span) or new (``items[j]`` = (k_mean, v_mean, weight, count)): the kept runs'
        entries are copied as they are (what ``set(runs())`` would round-trip them to), only the new
        ones are stacked."""
        dev = self.span.device
        if not spans:
            self.__init__(dev, self.dtype)
            return
        old_w, old_lc = self.weight.tolist(), self.log_count.tolist()
        weights, counts, kept_pos, kept_idx, new_pos, new_k, new_v = [], [], [], [], [], [], []
        for j, it in enumerate(items):
            if isinstance(it, int):
                kept_pos.append(j)
                kept_idx.append(it)
                weights.append(old_w[it])
                counts.append(int(round(math.exp(old_lc[it]))))
            else:
                new_pos.append(j)
                new_k.append(it[0])
                new_v.append(it[1])
                weights.append(it[2])
                counts.append(it[3])
        ref = new_k[0] if new_k else self.k
        shape = (ref.shape[0], ref.shape[1], len(spans), ref.shape[-1])
        if kept_pos == list(range(len(spans))) and kept_idx == kept_pos and self.n == len(spans):
            k, v = self.k, self.v  # the same runs
        else:
            k = torch.empty(shape, dtype=self.dtype, device=ref.device)
            v = torch.empty(shape, dtype=self.dtype, device=ref.device)
            if kept_pos:
                kp = torch.tensor(kept_pos, dtype=torch.long, device=ref.device)
                ki = torch.tensor(kept_idx, dtype=torch.long, device=ref.device)
                k[:, :, kp] = self.k[:, :, ki].to(self.dtype)
                v[:, :, kp] = self.v[:, :, ki].to(self.dtype)
            if new_pos:
                npos = torch.tensor(new_pos, dtype=torch.long, device=ref.device)
                k[:, :, npos] = torch.stack(new_k, 2).to(self.dtype)
                v[:, :, npos] = torch.stack(new_v, 2).to(self.dtype)
        self.k, self.v = k, v
        self.weight = torch.tensor(weights, dtype=torch.float32, device=dev)
        self.log_count = torch.tensor([math.log(c) for c in counts], dtype=torch.float32, device=dev)
        self.span = torch.tensor([[f, l] for f, l in spans], dtype=torch.int32, device=dev)


def weighted_mean(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor):
    """k, v [Bt, H, n, D], w [n] >= 0 -> (k_mean [Bt,H,D], v_mean, weight sum)."""
    w = w.float().clamp_min(0) + 1e-12
    wn = w / w.sum()
    return (k.float() * wn[:, None]).sum(2), (v.float() * wn[:, None]).sum(2), float(w.sum())


def weighted_means(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor):
    """``weighted_mean`` of many blocks at once: k, v [Bt, H, n*B, D] (n blocks of B rows), w [n, B]
    -> (k_means [Bt, H, n, D], v_means, [weight sums]). Every block's numbers are its own
    ``weighted_mean``'s: the sums run over the same B elements, a row at a time."""
    bt, h, _, d = k.shape
    n, B = w.shape
    w = w.float().clamp_min(0) + 1e-12
    s = w.sum(1)
    wn = (w / s[:, None])[:, :, None]
    km = (k.float().reshape(bt, h, n, B, d) * wn).sum(3)
    vm = (v.float().reshape(bt, h, n, B, d) * wn).sum(3)
    return km, vm, s.tolist()


def merge_means(parts):
    """parts: (k [Bt,H,D], v, weight, count) -> merged (k, v, weight, count), weights add."""
    wsum = sum(p[2] for p in parts)
    k = sum(p[0] * (p[2] / wsum) for p in parts)
    v = sum(p[1] * (p[2] / wsum) for p in parts)
    return k, v, wsum, sum(p[3] for p in parts)


class LayerStore:
    """All K/V of one layer. ``seq_len`` is the logical number of tokens seen (for RoPE / positions);
    ``n_entries`` the number of attention entries held."""

    def __init__(self, cfg, device, dtype, key_basis: tuple | None = None):
        """``key_basis``: this layer's (w [H, D] fp32, reflector codes [H, P] int8, their scales [H, r] fp16,
        inv_freq [D/2] fp32) (``agacc.basis.KeyBasis.layer``: its first r axes, r at least what a block keeps), held
        (and counted) where keys are grouped "basis"; the axes are made from them once a read (``parts``)."""
        self.cfg = cfg
        self.key_basis = key_basis
        self.B = cfg.block_size
        self.device = device
        self.dtype = dtype  # full-precision storage dtype
        self.seq_len = 0
        self.hot_start = 0  # first token still in the hot region (a multiple of B)
        self._hot: list[torch.Tensor | None] = [None, None]  # fresh hot K, V (the store dtype)
        self._hot8: tuple[torch.Tensor, ...] | None = None  # narrowed hot tokens, before the fresh ones:
        # (codes [Bt, 2, H, n, D], scale, zero [Bt, 2, H, n, D/G]), K at 0 and V at 1 of dim 1 (``narrow_hot``)
        self.full = FullSegment(self.B, device, dtype)
        self.quant = {c: QuantSegment(self.B, device, c, cfg) for c in (8, 4, 3, 2)}
        self.sparse: dict[int, SparseSegment] = {}
        self.markers = Markers(device, dtype)
        self.block_tier = torch.empty(0, dtype=torch.int8, device=device)   # per tiered block
        self.block_bits = torch.empty(0, dtype=torch.int8, device=device)
        self.block_keep = torch.empty(0, dtype=torch.int16, device=device)
        self.host: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._layout = None  # cached token-position layout of the entries

    # ---- appending -------------------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [Bt, H, n, D] new tokens (after RoPE)."""
        if self.seq_len == 0:  # the head dim is known: how keys will be grouped
            self._group_keys(k.shape[1], k.shape[-1])
        self._hot = [_cat(self._hot[0], k.to(self.dtype), 2), _cat(self._hot[1], v.to(self.dtype), 2)]
        self.seq_len += k.shape[2]

    # ---- the hot region ----------------------------------------------------------------------
    @property
    def hot_k(self) -> torch.Tensor | None:
        """The hot region's keys [Bt, H, n_hot, D] in the store's dtype, oldest first: the tensor held, or
        where tokens are narrowed (``narrow_hot``) a new one with them dequantised. None before any token."""
        return self.hot_kv()[0]

    @property
    def hot_v(self) -> torch.Tensor | None:
        """The hot region's values, as ``hot_k``."""
        return self.hot_kv()[1]

    def hot_kv(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(``hot_k``, ``hot_v``): narrowed tokens dequantised once for both (the decode step's read)."""
        fresh_k, fresh_v = self._hot
        if self._hot8 is None:
            return fresh_k, fresh_v
        codes, scale, zero = self._hot8  # [Bt, 2, H, n, D]: the groups of a row dequantised as a [G, D/G] view
        x = quant.dequantize(codes.view(*scale.shape, -1), scale[..., None], zero[..., None]).view(codes.shape)
        x = (quant.rotate(x) if self.cfg.rotate else x).to(self.dtype)
        if fresh_k.shape[2]:
            x = torch.cat([x, torch.stack([fresh_k, fresh_v], 1)], 3)
        return x[:, 0], x[:, 1]

    def _hot_tensors(self) -> list[torch.Tensor]:
        return [t for t in (*self._hot, *(self._hot8 or ())) if t is not None]

    def _slice_hot(self, lo: int, hi: int) -> None:
        """Keep hot tokens ``lo:hi`` (positions in the hot region, oldest first), narrowed or fresh."""
        n8 = 0 if self._hot8 is None else self._hot8[0].shape[3]
        if self._hot8 is not None:
            self._hot8 = tuple(t[:, :, :, lo:min(hi, n8)] for t in self._hot8)
        self._hot = [t[:, :, max(lo - n8, 0):max(hi - n8, 0)] for t in self._hot]

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` tokens (``n >= hot_start``: only hot tokens go)."""
        self._slice_hot(0, n - self.hot_start)
        self.seq_len = n

    def _group_keys(self, heads: int, head_dim: int) -> None:
        grouping = key_grouping(self.cfg, head_dim)
        for seg in self.quant.values():
            seg.key_per_token = grouping == "token"
        if grouping != "basis":
            self.key_basis = None  # not held
            return
        if self.key_basis is None:
            raise ValueError("key_quant='basis' needs the model's key basis (agacc.basis): a CompressedCache loads it; "
                             "a LayerStore on its own takes key_basis=")
        w, codes, scales, inv_freq = self.key_basis
        groups = basis_layouts(self.cfg, head_dim)
        if (tuple(w.shape) != (heads, head_dim) or inv_freq.numel() * 2 != head_dim
                or scales.shape[1] < basis_rank(groups)):
            raise ValueError(f"the key basis holds {scales.shape[1]} axes for {w.shape[0]} KV heads of dim "
                             f"{w.shape[1]}, the layer {heads} of {head_dim}: re-run python -m agacc calibrate "
                             "--key-basis --save")
        for c, g in zip((2, 3, 4), groups):
            self.quant[c].basis = (w, codes, scales, inv_freq, g)

    @property
    def n_blocks(self) -> int:
        return int(self.block_tier.numel())

    @property
    def batch(self) -> int:
        return self._hot[0].shape[0] if self._hot[0] is not None else 1

    def n_ready_blocks(self) -> int:
        """Blocks that have fully left the recent window (compressible)."""
        return max(0, self.seq_len - self.cfg.recent_window) // self.B

    @property
    def segments(self) -> list[Segment]:
        return [self.full, *self.quant.values(), *(self.sparse[k] for k in sorted(self.sparse))]

    @property
    def n_entries(self) -> int:
        hot = self.seq_len - self.hot_start
        return sum(s.n_blocks for s in self.segments) * self.B + self.markers.n + hot

    # ---- reading -----------------------------------------------------------------------------
    def parts(self) -> list[Part]:
        """Everything held, as it is held, in attention order: full, int8, int4, int3, int2, sparse (by
        keep), markers (dense, with their log-count bias), hot. Empty parts are left out. Every decode
        backend reads this list; entry i of the attention mass is entry i of the parts laid end to end."""
        axes = None  # keys in a basis: its axes, made once for every container's part (the decode step reads them)
        if self.quant[2].basis is not None and any(self.quant[c].n_blocks for c in (2, 3, 4)):
            axes = quant.basis_axes(*self.key_basis[:3])
        out = [seg.part(axes=axes) for seg in self.segments if seg.n_blocks]
        if self.markers.n:
            m = self.markers
            out.append(Part(DENSE, m.k, m.v, bias=m.log_count))
        if self.seq_len > self.hot_start:
            out.append(Part(DENSE, *self.hot_kv()))
        return out

    def attention_entries(self, dtype) -> list[Entries]:
        """Every stored entry dequantised to ``dtype`` (un-rotated), one ``Entries`` per part of ``parts``:
        the reference the decode backends are checked against, and what a multi-token step attends."""
        return [Entries(*quant.dequantize_part(p, dtype), p.bias) for p in self.parts()]

    def token_layout(self) -> torch.Tensor:
        """Block ids [n_tiered_blocks] int32 of the tiered entries in attention order (each block is
        B consecutive entries for B consecutive tokens), cached until the tiers change. 4 bytes a
        block: markers map back through their spans, the hot region by position."""
        if self._layout is None:
            segs = [s for s in self.segments if s.n_blocks]
            ids = [s.block_ids for s in segs]
            self._layout = torch.cat(ids).to(torch.int32) if ids else torch.empty(0, dtype=torch.int32, device=self.device)
        return self._layout

    def entry_positions(self) -> torch.Tensor:
        """The token position of every entry, in attention order: int64 [n_entries] (tiered blocks by
        their ids, then the hot region). For stores without markers (a sliding layer's: a marker stands
        for a run of positions)."""
        if self.markers.n:
            raise ValueError("entry_positions: a marker has no single position (sliding layers keep none)")
        tiered = (self.token_layout().long()[:, None] * self.B + torch.arange(self.B, device=self.device)).reshape(-1)
        return torch.cat([tiered, torch.arange(self.hot_start, self.seq_len, device=self.device)])

    def token_mass(self, mass: torch.Tensor) -> torch.Tensor:
        """Entry mass [m <= n_entries] (attention order) -> token mass [seq_len]; a marker's mass is
        shared evenly among the tokens of its span; entries appended since (m < n_entries) get 0."""
        B = self.B
        n_entries = self.n_entries
        if mass.numel() < n_entries:
            mass = torch.nn.functional.pad(mass, (0, n_entries - mass.numel()))
        mass = mass.float()
        blocks = self.token_layout()  # int32: index_add_ takes it as is
        out = torch.zeros(self.seq_len, dtype=torch.float32, device=mass.device)
        by_block = out[: self.hot_start].view(-1, B)  # [n_ready_blocks, B], a view of out
        n_t = blocks.numel() * B
        if n_t:
            by_block.index_add_(0, blocks, mass[:n_t].view(-1, B))
        m = self.markers.n
        if m:  # a marker's mass shared evenly among the tokens of its span
            spans = self.markers.span.tolist()
            dev = mass.device
            n_blk = torch.tensor([l - f + 1 for f, l in spans], device=dev)
            blocks = torch.tensor([b for f, l in spans for b in range(f, l + 1)], device=dev)
            share = (mass[n_t:n_t + m] / (n_blk * B).float()).repeat_interleave(n_blk)  # per spanned block
            by_block.index_add_(0, blocks, share[:, None].expand(-1, B))
        n_hot = self.seq_len - self.hot_start
        if n_hot:
            out[self.hot_start:] += mass[mass.numel() - n_hot:]
        return out

    # ---- re-tiering -------------------------------------------------------------------------
    def apply_tiers(self, tier: torch.Tensor, bits: torch.Tensor, keep: torch.Tensor, token_weight: torch.Tensor):
        """Set the tier of blocks ``0..len(tier)-1`` (all must be ready).

        tier [nb] int8 tier codes; bits [nb] code bits (quantised / pruned tiers); keep [nb] kept
        elements per vector (pruned tier); token_weight [seq_len] >= 0 importance per token, used to
        weight evicted tokens inside their marker. Returns the tiers actually applied."""
        nb = int(tier.numel())
        assert nb <= self.n_ready_blocks(), "apply_tiers got blocks still inside the recent window"
        _check_containers(tier.cpu(), bits.cpu(), self.cfg.b_min)
        tier = tier.to(torch.int8).to(self.device)
        bits = bits.to(torch.int8).to(self.device)
        keep = keep.to(torch.int16).to(self.device)
        if not self.cfg.host_copy:  # without a host copy a block can only lose fidelity
            tier, bits, keep = fidelity_floor((self.block_tier, self.block_bits, self.block_keep), tier, bits, keep)
        moving = _changed(tier, bits, keep, self.block_tier, self.block_bits, self.block_keep).nonzero().squeeze(1)
        if moving.numel():
            self._move(tier, bits, keep, moving, token_weight)
        return tier, bits, keep

    def _move(self, tier, bits, keep, moving, token_weight) -> None:
        """``apply_tiers`` once the tiers are checked and floored: move the ``moving`` blocks (ascending,
        every block whose tier, bits or kept count changed, and every new one) to their segments."""
        B, n_old = self.B, self.n_blocks
        tm = tier[moving]
        k, v = self._take_blocks(moving, n_old, bits[moving])
        present = set(tm.tolist())
        newly_evicted = []
        for t_code in (FULL, INT8, INT4, INT3, INT2, PRUNED):
            if t_code not in present:
                continue
            if len(present) == 1:  # every moving block goes here: no selection needed
                ids, kk, vv = moving, k, v
            else:
                sel = (tm == t_code).nonzero().squeeze(1)
                r = _rows(sel, B)
                ids, kk, vv = moving[sel], k[:, :, r], v[:, :, r]
            if t_code == FULL:
                self.full.add(ids, kk, vv)
            elif t_code in TIER_CONTAINER:
                self.quant[TIER_CONTAINER[t_code]].add(ids, kk, vv, bits=bits[ids])
            else:
                self._add_pruned(ids, kk, vv, bits[ids], keep[ids])
        if EVICTED in present:
            ev = (tm == EVICTED).nonzero().squeeze(1)
            r = _rows(ev, B)
            newly_evicted = [(int(b), k[:, :, r[i * B:(i + 1) * B]], v[:, :, r[i * B:(i + 1) * B]])
                             for i, b in enumerate(moving[ev].tolist())]
        self.block_tier, self.block_bits, self.block_keep = tier, bits, keep
        self._rebuild_markers(newly_evicted, token_weight)
        self._layout = None

    def _add_pruned(self, ids, k, v, bits, keep):
        cfg, D = self.cfg, k.shape[-1]
        for kp in sorted(set(keep.tolist())):
            sel = (keep == kp).nonzero().squeeze(1)
            r = _rows(sel, self.B)
            kk, vv = k[:, :, r], v[:, :, r]
            rate = 1.0 - kp / D
            if kp >= D or rate < cfg.sparse_threshold:
                # dense: zero the pruned elements, store in the b_min container
                if kp < D:
                    kk = kk * quant.magnitude_prune_mask(kk, kp)
                    vv = vv * quant.magnitude_prune_mask(vv, kp)
                self.quant[quant.container_bits(cfg.b_min)].add(ids[sel], kk, vv, bits=bits[sel])
            else:
                seg = self.sparse.get(kp)
                if seg is None:
                    seg = self.sparse[kp] = SparseSegment(self.B, self.device, kp, int(bits[sel[0]]), cfg)
                seg.add(ids[sel], kk, vv)

    def _take_blocks(self, moving: torch.Tensor, n_old: int, to_bits: torch.Tensor | None = None):
        """Full-precision-as-possible (k, v) [Bt,H,len(moving)*B,D] fp32 of the moving blocks (ascending
        block ids), removed from where they are. New blocks come from the hot region; with a host
        copy, old blocks come from it (exact); otherwise they are dequantised from their current segment
        (``to_bits`` [len(moving)]: the code bits each goes to; ``Segment.take``)."""
        B = self.B
        bt, h, _, d = self._hot[0].shape
        n_move = moving.numel()
        k = torch.empty(bt, h, n_move * B, d, dtype=torch.float32, device=self.device)
        v = torch.empty_like(k)
        n_moving_old = int(torch.searchsorted(moving, n_old)) if n_old else 0
        # 1) old blocks: pull out of their segments (one read and one select per segment touched)
        if n_moving_old:
            slot = torch.full((n_old,), -1, dtype=torch.long, device=self.device)
            slot[moving[:n_moving_old]] = torch.arange(n_moving_old, device=self.device)
            found = 0
            for seg in self.segments:
                hit = _leaving(seg, slot)
                if hit is None:
                    continue
                mask, dest, n = hit
                kk, vv = seg.take(mask, None if to_bits is None else to_bits[dest])
                r = _rows(dest, B)
                k[:, :, r] = kk
                v[:, :, r] = vv
                found += n
                if found == n_moving_old:
                    break
        # 2) new blocks: out of the hot region
        new = moving[n_moving_old:].tolist()
        if new:
            self._take_hot(k, v, n_moving_old, new)
        # 3) with a host copy every moving block restarts from full precision (exact re-promotion)
        if self.cfg.host_copy:
            for i, b in enumerate(moving.tolist()):
                hk, hv = self.host[b]
                k[:, :, i * B:(i + 1) * B] = hk.to(self.device).float()
                v[:, :, i * B:(i + 1) * B] = hv.to(self.device).float()
        return k, v

    def _take_hot(self, k: torch.Tensor, v: torch.Tensor, at: int, new: list[int]) -> None:
        """Move the new blocks ``new`` (ascending block ids, all in the hot region) out of it, into
        k, v [Bt, H, rows, D] fp32 from block slot ``at`` on (with a host copy, copied there too)."""
        B = self.B
        hot_blocks = max(new) + 1 - self.hot_start // B
        n_tok = hot_blocks * B
        hk, hv = (x[:, :, :n_tok] for x in self.hot_kv())
        if new == list(range(self.hot_start // B, self.hot_start // B + hot_blocks)):
            k[:, :, at * B:at * B + n_tok] = hk  # the first blocks of the hot region, in order
            v[:, :, at * B:at * B + n_tok] = hv
        else:
            hk, hv = hk.float(), hv.float()
            for i, b in enumerate(new, at):
                o = b * B - self.hot_start
                k[:, :, i * B:(i + 1) * B] = hk[:, :, o:o + B]
                v[:, :, i * B:(i + 1) * B] = hv[:, :, o:o + B]
        if self.cfg.host_copy:
            for b in new:
                o = b * B - self.hot_start
                self.host[b] = (hk[:, :, o:o + B].to("cpu", self.dtype, copy=True),
                                hv[:, :, o:o + B].to("cpu", self.dtype, copy=True))
        self._slice_hot(n_tok, self.seq_len - self.hot_start)
        self.hot_start += n_tok

    def _rebuild_markers(self, newly_evicted, token_weight, means: dict | None = None):
        """Recompute the marker runs after evictions (and, with a host copy, un-evictions). Runs that
        did not change keep their entries; a run that grew merges the runs it swallowed and its new
        blocks. ``means``: {block: (k_mean, v_mean, weight)} of newly evicted blocks, already weighted
        (``weighted_means``), in place of their data and ``token_weight``."""
        if not self.cfg.markers:
            if self.markers.n or self.markers.k is not None:
                self.markers.set([])
            return
        if not newly_evicted:
            if not self.cfg.host_copy:
                return  # without a host copy nothing comes back: nothing evicted since, the same runs
            ev_blocks = int((self.block_tier == EVICTED).sum())
            if ev_blocks == int((self.markers.span[:, 1] - self.markers.span[:, 0] + 1).sum()):
                return  # nothing evicted since, nothing brought back: the same runs
        runs = evicted_runs(self.block_tier)
        old = {(int(f), int(l)): i for i, (f, l) in enumerate(self.markers.span.tolist())}
        new_data = {b: (kk, vv) for b, kk, vv in newly_evicted}
        B = self.B
        items = []
        for first, last in runs:
            if (first, last) in old:
                items.append(old[(first, last)])
                continue
            parts, covered = [], set()
            for (f, l), i in old.items():
                if first <= f and l <= last:
                    parts.append(self.markers.run(i))
                    covered.update(range(f, l + 1))
            for b in range(first, last + 1):
                if b in covered:
                    continue
                if means is not None and b in means:
                    parts.append((*means[b], B))
                    continue
                if b in new_data:
                    kk, vv = new_data[b]
                elif b in self.host:
                    kk, vv = (t.to(self.device).float() for t in self.host[b])
                else:
                    raise RuntimeError(f"evicted block {b} has no data to rebuild its marker from")
                w = token_weight[b * B:(b + 1) * B] if token_weight is not None else torch.ones(B)
                km, vm, ws = weighted_mean(kk, vv, w.to(self.device))
                parts.append((km, vm, ws, B))
            items.append(merge_means(parts))
        self.markers.rebuild(runs, items)

    # ---- accounting -------------------------------------------------------------------------
    def tensors(self) -> list[torch.Tensor]:
        ts = [*self._hot_tensors(), self.block_tier, self.block_bits, self.block_keep]
        for seg in self.segments:
            ts += seg.tensors() + [seg.block_ids]
        ts += self.markers.tensors()
        if self._layout is not None:
            ts.append(self._layout)
        return [t for t in ts if t is not None] + self.basis_tensors()

    def basis_tensors(self) -> list[torch.Tensor]:
        """The layer's key basis where its keys are held in it (counted: read at every step)."""
        return list(self.key_basis) if self.quant[2].basis is not None else []

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def host_nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.host.values())

    def bytes_by_tier(self) -> dict[str, int]:
        """Bytes held by part of the store; "basis" (the key basis) only where keys are held in one."""
        hot = sum(t.nbytes for t in self._hot_tensors())
        out = {
            "hot": hot,
            "full": self.full.nbytes(),
            "int8": self.quant[8].nbytes(),
            "int4": self.quant[4].nbytes(),
            "int3": self.quant[3].nbytes(),
            "int2": self.quant[2].nbytes(),
            "pruned": sum(s.nbytes() for s in self.sparse.values()),
            "markers": self.markers.nbytes(),
            "meta": self.block_tier.nbytes + self.block_bits.nbytes + self.block_keep.nbytes
            + (self._layout.nbytes if self._layout is not None else 0),
        }
        basis = sum(t.nbytes for t in self.basis_tensors())
        return {**out, "basis": basis} if basis else out

    def map_batch(self, fn) -> None:
        """Reorder / repeat the batch dimension of everything held (beam search)."""
        if self._hot[0] is not None:
            self._hot = [fn(t) for t in self._hot]
        if self._hot8 is not None:
            self._hot8 = tuple(fn(t) for t in self._hot8)
        for seg in self.segments:
            seg.map_batch(fn)
        self.markers.map_batch(fn)
        self.host = {b: (fn(k), fn(v)) for b, (k, v) in self.host.items()}


def narrow_hot(stores: list[LayerStore]) -> None:
    """Hold each store's fresh hot tokens at 8 bits (where ``config.hot_width`` is 8 the cache calls it at the end of
    every forward, after its re-evaluation, so a forward's tokens are attended, and a prompt's planned, at full
    precision): keys and values alike, min-max per token per group of ``value_group_size`` channels, fp16 scale
    and zero (``quant.quantize``; with ``cfg.rotate`` of K H and V H, as the quantised blocks): 1 + 4/G bytes an
    element instead of 2. The stores' fresh tokens (alike in shape: one forward's) are quantised in one call, not
    one a layer: a decode step pays one quantisation for every layer."""
    stores = [st for st in stores if st._hot[0] is not None and st._hot[0].shape[2]]
    if len({(st._hot[0].shape, st.cfg.value_group_size, st.cfg.rotate) for st in stores}) > 1:
        for st in stores:  # (not one forward's tokens: one by one)
            narrow_hot([st])
        return
    if not stores:
        return
    cfg = stores[0].cfg
    x = torch.stack([torch.stack(st._hot, 1) for st in stores])  # [L, Bt, 2, H, n, D]
    x = quant.rotate(x) if cfg.rotate else x.float()
    *lead, d = x.shape
    g = value_group(d, cfg.value_group_size)
    codes, scale, zero = quant.quantize(x.view(*lead, d // g, g), 8, dim=-1)
    new = codes.view(x.shape), scale.squeeze(-1), zero.squeeze(-1)
    for i, st in enumerate(stores):
        part = [t[i] for t in new]
        st._hot8 = (tuple(t.clone() for t in part) if st._hot8 is None
                    else tuple(torch.cat([a, b], 3) for a, b in zip(st._hot8, part)))
        st._hot = [t[:, :, :0] for t in st._hot]


def token_mass_all(stores: list[LayerStore], masses: list[torch.Tensor]) -> torch.Tensor:
    """``LayerStore.token_mass`` of every layer, stacked [L, seq_len], the same values: where the layers
    are alike (one cache: the same tokens, block size and hot region, each mass covering its
    entries) one index_add_ maps every layer's tiered entries, one its markers' shares and one add its
    hot region (each token receives one value, onto zero, as in ``token_mass``); else layer by layer."""
    st0 = stores[0]
    B, seq_len, hot = st0.B, st0.seq_len, st0.hot_start
    n_ent = [st.n_entries for st in stores]
    if (any(st.B != B or st.seq_len != seq_len or st.hot_start != hot for st in stores)
            or any(m.numel() != e for m, e in zip(masses, n_ent))):
        return torch.stack([st.token_mass(m) for st, m in zip(stores, masses)])
    L, dev = len(stores), masses[0].device
    flat = torch.cat(masses).float()  # every layer's entries laid end to end
    out = torch.zeros(L * seq_len, dtype=torch.float32, device=dev)
    first = torch.tensor([sum(n_ent[:l]) for l in range(L)], device=dev)  # each layer's first entry in flat
    base = torch.arange(L, device=dev) * seq_len  # each layer's first token in out
    ar = torch.arange(B, device=dev)
    layouts = [st.token_layout() for st in stores]
    n_tiered = torch.tensor([x.numel() for x in layouts], device=dev)
    n_t = int(n_tiered.sum())
    if n_t:  # block i of a layer's layout (block b): entries i*B.. -> tokens b*B..
        start = torch.cumsum(n_tiered, 0) - n_tiered
        i = torch.arange(n_t, device=dev) - torch.repeat_interleave(start, n_tiered, output_size=n_t)
        src = (torch.repeat_interleave(first, n_tiered, output_size=n_t) + i * B)[:, None] + ar
        dst = (torch.repeat_interleave(base, n_tiered, output_size=n_t) + torch.cat(layouts).long() * B)[:, None] + ar
        out.index_add_(0, dst.reshape(-1), flat[src.reshape(-1)])
    n_mark = torch.tensor([st.markers.n for st in stores], device=dev)
    m = int(n_mark.sum())
    if m:  # marker j of a layer (after its tiered entries): its mass shared evenly among its span's tokens
        span = torch.cat([st.markers.span for st in stores]).long()
        j = torch.arange(m, device=dev) - torch.repeat_interleave(torch.cumsum(n_mark, 0) - n_mark, n_mark,
                                                                  output_size=m)
        entry = torch.repeat_interleave(first + n_tiered * B, n_mark, output_size=m) + j
        n_blk = span[:, 1] - span[:, 0] + 1
        n_sp = int(n_blk.sum())
        share = (flat[entry] / (n_blk * B).float()).repeat_interleave(n_blk, output_size=n_sp)  # per spanned block
        shift = span[:, 0] - (torch.cumsum(n_blk, 0) - n_blk)  # first block of the span - its first slot
        blk = torch.arange(n_sp, device=dev) + torch.repeat_interleave(shift, n_blk, output_size=n_sp)
        layer0 = torch.repeat_interleave(base, n_mark, output_size=m)  # each marker's layer's first token
        token0 = torch.repeat_interleave(layer0, n_blk, output_size=n_sp) + blk * B
        out.index_add_(0, (token0[:, None] + ar).reshape(-1), share[:, None].expand(-1, B).reshape(-1))
    out = out.view(L, seq_len)
    n_hot = seq_len - hot
    if n_hot:
        last = first + torch.tensor(n_ent, device=dev)
        out[:, hot:] += flat[(last - n_hot)[:, None] + torch.arange(n_hot, device=dev)]
    return out


def _changed(tier, bits, keep, old_tier, old_bits, old_keep) -> torch.Tensor:
    """Bool [..., nb]: the blocks a plan moves, those whose tier, bits or (pruned) kept count differ from
    the applied ones [..., n_old], and every new block (beyond n_old). [nb] or stacked layers [L, nb]."""
    nb, n_old = tier.shape[-1], old_tier.shape[-1]
    if not n_old:
        return torch.ones(tier.shape, dtype=torch.bool, device=tier.device)
    t = tier[..., :n_old]
    changed = (t != old_tier) | (bits[..., :n_old] != old_bits) | ((t == PRUNED) & (keep[..., :n_old] != old_keep))
    if nb > n_old:
        changed = torch.cat([changed, torch.ones(*tier.shape[:-1], nb - n_old, dtype=torch.bool, device=tier.device)], -1)
    return changed


def apply_plans(stores: list[LayerStore], tier: torch.Tensor, bits: torch.Tensor, keep: torch.Tensor,
                token_weight, floored: bool = False):
    """``LayerStore.apply_tiers`` for every layer at once, with the same result: tier, bits, keep
    [L, nb] the layers' plans stacked (the planner's); ``token_weight(l)`` -> layer l's weights
    [seq_len] (asked for the layers that move blocks). The checks, the fidelity floor and what moves
    are worked out for all layers in one go, and a layer whose tiers do not change is not touched.
    ``floored``: the plans already went through ``fidelity_floor`` against the applied tiers (the
    ratio fitter floors them; flooring again changes nothing). Returns the stacked tiers applied."""
    if not stores:
        return tier, bits, keep
    first = stores[0]
    n_old, cfg, dev = first.n_blocks, first.cfg, first.device
    if any(st.n_blocks != n_old or st.cfg is not cfg or st.device != dev for st in stores):  # not one shape: one by one
        out = [st.apply_tiers(tier[l], bits[l], keep[l], token_weight(l)) for l, st in enumerate(stores)]
        return tuple(torch.stack(x) for x in zip(*out))
    nb = int(tier.shape[-1])
    for st in stores:
        assert nb <= st.n_ready_blocks(), "apply_tiers got blocks still inside the recent window"
    _check_containers(tier.cpu(), bits.cpu(), cfg.b_min)
    tier = tier.to(torch.int8).to(dev)
    bits = bits.to(torch.int8).to(dev)
    keep = keep.to(torch.int16).to(dev)
    prev = tuple(torch.stack(x) for x in zip(*((st.block_tier, st.block_bits, st.block_keep) for st in stores)))
    if not cfg.host_copy and not floored:  # without a host copy a block can only lose fidelity
        tier, bits, keep = fidelity_floor(prev, tier, bits, keep)
    nz = _changed(tier, bits, keep, *prev).nonzero()  # (layer, block) of every moving block, in order
    counts = torch.bincount(nz[:, 0], minlength=len(stores)).tolist()
    moves = [(l, st, moving) for l, (st, moving) in enumerate(zip(stores, nz[:, 1].contiguous().split(counts)))
             if moving.numel()]
    if not _batchable(stores):
        for l, st, moving in moves:
            st._move(tier[l], bits[l], keep[l], moving, token_weight(l))
        return tier, bits, keep
    group, r0, n = [], 0, 0
    for m in moves:  # layers batched up to _BATCH_BLOCKS moving blocks (bounds the temporaries)
        if group and n + m[2].numel() > _BATCH_BLOCKS:
            _move_layers(group, nz[r0:r0 + n], prev[0], tier, bits, keep, token_weight)
            group, r0, n = [], r0 + n, 0
        group.append(m)
        n += m[2].numel()
    if group:
        _move_layers(group, nz[r0:r0 + n], prev[0], tier, bits, keep, token_weight)
    return tier, bits, keep


# most blocks _move_layers moves in one go: bounds its temporaries (K and V in fp32: 12.6 MB for 512 blocks
# of the embedded model), no more than one layer of a single 8K-token prefill moved layer by layer
_BATCH_BLOCKS = 512


def _batchable(stores: list[LayerStore]) -> bool:
    """Whether ``_move_layers`` may move these layers' blocks together: the PyTorch quantisers on the
    CPU (per block and per row, whatever else shares the call: min-max groups, elementwise steps, the
    rotation a product row by row), no host copy, one geometry, keys not in a basis (each layer its own)."""
    st = stores[0]
    cfg = st.cfg
    if (st.quant[2].basis is not None or cfg.host_copy or cfg.quantizer != "minmax" or st.device.type != "cpu"
            or _quant_ops(st.device) is not quant):
        return False
    if st._hot[0] is None:
        return False
    shape = (st._hot[0].shape[0], st._hot[0].shape[1], st._hot[0].shape[3], st.dtype)
    return all(s._hot[0] is not None and (s._hot[0].shape[0], s._hot[0].shape[1], s._hot[0].shape[3], s.dtype) == shape
               for s in stores)


def _cat_parts(parts: list[Part]) -> Part:
    """Quantised parts of one format laid end to end (dim 2) as one part."""
    if len(parts) == 1:
        return parts[0]
    cat = {name: torch.cat([getattr(p, name) for p in parts], 2)
           for name in ("k", "v", "k_scale", "k_zero", "v_scale", "v_zero")}
    return dataclasses.replace(parts[0], **cat)


def _source_segments(st: LayerStore, codes: set) -> list[Segment]:
    """The segments of ``st`` that can hold blocks of these (old) tier codes, in ``segments`` order."""
    if not codes <= {FULL, INT8, INT4, INT3, INT2, PRUNED}:
        return st.segments
    want = {id(st.quant[TIER_CONTAINER[t]]) for t in codes if t in TIER_CONTAINER}
    if FULL in codes:
        want.add(id(st.full))
    if PRUNED in codes:  # dense in the b_min container, or sparse
        want.add(id(st.quant[quant.container_bits(st.cfg.b_min)]))
        want.update(id(s) for s in st.sparse.values())
    return [s for s in st.segments if id(s) in want]


def _move_layers(group, nz, old_tier, tier, bits, keep, token_weight) -> None:
    """``LayerStore._move`` for several layers at once (``group``: (layer, store, moving blocks);
    ``nz``: the same as (layer, block) rows; ``old_tier`` [L, n_old] the tiers applied so far): the
    blocks leaving quantised segments are dequantised in one call per container, those entering one
    are rotated and quantised in one call per container and code width (every step works per block
    or per row, so each block comes out as the layer-by-layer move gives it); the segments'
    bookkeeping stays per layer, in the same order."""
    st0 = group[0][1]
    B, dev, n_old = st0.B, st0.device, st0.n_blocks
    bt, h, _, d = st0._hot[0].shape
    G = len(group)
    counts = [mv.numel() for _, _, mv in group]
    offs = [0]
    for c in counts:
        offs.append(offs[-1] + c)
    k = torch.empty(bt, h, offs[-1] * B, d, dtype=torch.float32, device=dev)
    v = torch.empty_like(k)
    layer_of = torch.repeat_interleave(torch.arange(G, device=dev), torch.tensor(counts, device=dev))
    ids_all = nz[:, 1]
    is_old = ids_all < n_old
    counts_old = torch.bincount(layer_of[is_old], minlength=G).tolist()
    src = old_tier[nz[is_old, 0], ids_all[is_old]].tolist()  # where the old moving blocks are now
    tm, bm = tier[nz[:, 0], ids_all], bits[nz[:, 0], ids_all]
    # 1) take the moving blocks out, layer by layer; quantised ones stay packed until step 2
    leaving: dict[int, list] = {}  # container -> [(packed part, block slots in k)]
    at = 0
    for (l, st, mv), off, n_mo in zip(group, offs, counts_old):
        if n_mo:
            slot = torch.full((n_old,), -1, dtype=torch.long, device=dev)
            slot[mv[:n_mo]] = torch.arange(off, off + n_mo, device=dev)
            found = 0
            first = _source_segments(st, set(src[at:at + n_mo]))
            at += n_mo
            for seg in first + [s for s in st.segments if s not in first]:  # the rest: never, as a rule
                if found == n_mo:
                    break
                hit = _leaving(seg, slot)
                if hit is None:
                    continue
                mask, dest, n = hit
                taken = mask.nonzero().squeeze(1)
                if isinstance(seg, QuantSegment):
                    part = seg.part(taken, narrow=seg.narrowed(taken, bm[dest]))
                    leaving.setdefault(seg.container, []).append((part, dest))
                else:
                    kk, vv = seg.read_blocks(taken)
                    _put_blocks(k, dest, kk, B)
                    _put_blocks(v, dest, vv, B)
                seg.drop_later(mask, taken.tolist())  # the rest copied once, with what step 3 appends
                found += n
        new = mv[n_mo:].tolist()
        if new:
            st._take_hot(k, v, off + n_mo, new)
    # 2) dequantise what left the quantised segments, one call per container
    for parts in leaving.values():
        kk, vv = quant.dequantize_part(_cat_parts([p for p, _ in parts]))
        dest = torch.cat([dest for _, dest in parts])
        _put_blocks(k, dest, kk, B)
        _put_blocks(v, dest, vv, B)
    # 3) into the new segments, tier by tier as _move goes
    present = set(tm.tolist())
    for t_code in (FULL, INT8, INT4, INT3, INT2, PRUNED):
        if t_code not in present:
            continue
        if len(present) == 1:
            kk, vv, ids, cnt, lay, code = k, v, ids_all, counts, layer_of, bm
        else:
            sel = (tm == t_code).nonzero().squeeze(1)
            kk, vv, ids, lay, code = _blocks(k, sel, B), _blocks(v, sel, B), ids_all[sel], layer_of[sel], bm[sel]
            cnt = torch.bincount(lay, minlength=G).tolist()
        ids_l = ids.split(cnt)
        if t_code in TIER_CONTAINER:
            _quantize_into(group, TIER_CONTAINER[t_code], kk, vv, ids, ids_l, cnt, lay, code)
            continue
        rows = [c * B for c in cnt]
        for (l, st, _), i_l, k_l, v_l in zip(group, ids_l, kk.split(rows, 2), vv.split(rows, 2)):
            if not i_l.numel():
                continue
            if t_code == FULL:
                st.full.add(i_l, k_l, v_l, fresh=False)
            else:
                st._add_pruned(i_l, k_l, v_l, bits[l][i_l], keep[l][i_l])
    for _, st, _ in group:
        for seg in st.segments:
            seg.flush()  # a segment that lost blocks and gained none
    # 4) the layers' tiers; the evicted blocks' means and the markers they change, all at once
    for l, st, _ in group:
        st.block_tier, st.block_bits, st.block_keep = tier[l], bits[l], keep[l]
        st._layout = None
    ev = (tm == EVICTED).nonzero().squeeze(1) if EVICTED in present else None
    if ev is None or not st0.cfg.markers:
        for _, st, _ in group:
            st._rebuild_markers([], None)  # no evictions (nothing changes) or no markers
        return
    slots = [bisect.bisect_right(offs, gi) - 1 for gi in ev.tolist()]  # the group slot of each evicted block
    blocks = ids_all[ev].tolist()
    js = sorted(set(slots))
    nb = tier.shape[-1]
    weight = torch.stack([token_weight(group[j][0])[: nb * B] for j in js]).view(len(js), nb, B)
    row = {j: i for i, j in enumerate(js)}
    w = weight[torch.tensor([row[j] for j in slots], device=dev), ids_all[ev]]  # [n_ev, B]
    km, vm, ws = weighted_means(_blocks(k, ev, B), _blocks(v, ev, B), w.to(dev))
    news: dict[int, dict] = {j: {} for j in js}
    for i, (j, b) in enumerate(zip(slots, blocks)):
        news[j][b] = (i, ws[i])
    _rebuild_markers_all([(group[j][1], news[j]) for j in js], km, vm, B)


def _rebuild_markers_all(layers, km: torch.Tensor, vm: torch.Tensor, B: int) -> None:
    """``LayerStore._rebuild_markers`` after evictions, for several layers at once (no host copy, markers
    on): ``layers`` (store, {newly evicted block: (its index in km / vm, its weight)}), km, vm
    [Bt, H, n, D] the new blocks' ``weighted_means``. Every run that changed is ``merge_means`` of
    the runs it swallowed and its new blocks, in the same order: all runs of all layers are summed
    together, part by part (a run with fewer parts adds zeros: the same numbers)."""
    plans, merged, old_sel = [], [], []  # merged: (sources, coefficients) per changed run
    for st, news in layers:
        m = st.markers
        runs = evicted_runs(st.block_tier)
        old = {(f, l): i for i, (f, l) in enumerate(m.span.tolist())}
        old_w, old_lc = m.weight.tolist(), m.log_count.tolist()
        items = []
        for first, last in runs:
            if (first, last) in old:
                items.append(old[(first, last)])
                continue
            srcs, ws, count, covered = [], [], 0, set()
            for (f, l), i in old.items():
                if first <= f and l <= last:  # a run it swallowed (as Markers.run gives it)
                    srcs.append(("old", len(old_sel)))
                    old_sel.append((st, i))
                    ws.append(old_w[i])
                    count += int(round(math.exp(old_lc[i])))
                    covered.update(range(f, l + 1))
            for b in range(first, last + 1):
                if b in covered:
                    continue
                if b not in news:
                    raise RuntimeError(f"evicted block {b} has no data to rebuild its marker from")
                g, w = news[b]
                srcs.append(("new", g))
                ws.append(w)
                count += B
            wsum = sum(ws)
            items.append(("merged", len(merged)))
            merged.append((srcs, [w / wsum for w in ws], wsum, count))
        plans.append((st, runs, items))
    if merged:
        bt, h, _, d = km.shape
        dev = km.device
        srcs_k, srcs_v = [], []
        if old_sel:  # the swallowed runs' entries, fp32 (Markers.run)
            stores = list({id(st): st for st, _ in old_sel}.values())
            base, at = {}, 0
            for st in stores:
                base[id(st)] = at
                at += st.markers.n
            idx = torch.tensor([base[id(st)] + i for st, i in old_sel], device=dev)
            srcs_k.append(torch.cat([st.markers.k for st in stores], 2).index_select(2, idx).float())
            srcs_v.append(torch.cat([st.markers.v for st in stores], 2).index_select(2, idx).float())
        n_old = len(old_sel)
        zero = torch.zeros(bt, h, 1, d, dtype=torch.float32, device=dev)
        src_k = torch.cat([*srcs_k, km.float(), zero], 2)
        src_v = torch.cat([*srcs_v, vm.float(), zero], 2)
        z = src_k.shape[2] - 1
        n_parts = max(len(s) for s, *_ in merged)
        index = [[z] * len(merged) for _ in range(n_parts)]
        coef = [[0.0] * len(merged) for _ in range(n_parts)]
        for r, (srcs, cs, _, _) in enumerate(merged):
            for p, ((kind, g), c) in enumerate(zip(srcs, cs)):
                index[p][r] = g if kind == "old" else n_old + g
                coef[p][r] = c
        index_t = torch.tensor(index, device=dev)
        coef_t = torch.tensor(coef, dtype=torch.float32, device=dev)[:, :, None]
        acc_k = torch.zeros(bt, h, len(merged), d, dtype=torch.float32, device=dev)
        acc_v = torch.zeros_like(acc_k)
        for p in range(n_parts):  # sum(part * (weight / wsum)) from 0, part by part, every run at once
            acc_k = acc_k + src_k.index_select(2, index_t[p]) * coef_t[p]
            acc_v = acc_v + src_v.index_select(2, index_t[p]) * coef_t[p]
    for st, runs, items in plans:  # kept runs by index, changed ones as merged above
        st.markers.rebuild(runs, [it if isinstance(it, int) else
                                  (acc_k[:, :, it[1]], acc_v[:, :, it[1]], merged[it[1]][2], merged[it[1]][3])
                                  for it in items])


def _quantize_into(group, container, k, v, ids, ids_l, cnt, lay, code) -> None:
    """Step 3 of ``_move_layers`` for one quantised tier: k, v [Bt, H, n*B, D] fp32 of the blocks
    ``ids`` (layer by layer, ``cnt`` of each, ``lay`` their layer's slot in ``group``, ``code`` their
    code bits) -> the layers' segments of ``container``, code width by code width as
    ``QuantSegment.add`` adds them."""
    G, seg0 = len(group), group[0][1].quant[container]
    B = seg0.block_size
    if seg0.rotated:
        k, v = quant.rotate(k), quant.rotate(v)
    widths = sorted(set(code.tolist()))
    pieces: list[list] = [[] for _ in group]
    key_rows = B if seg0.key_per_token else 1  # key scales per token, or per block
    for b in widths:
        if len(widths) == 1:
            kb, vb, cnt_b, ids_b = k, v, cnt, ids_l
        else:
            g = (code == b).nonzero().squeeze(1)
            kb, vb = _blocks(k, g, B), _blocks(v, g, B)
            cnt_b = torch.bincount(lay[g], minlength=G).tolist()
            ids_b = ids[g].split(cnt_b)
        ts = seg0.quantize(kb, vb, b)
        rows = (B, key_rows, key_rows, B, B, B)
        split = [t.split([c * per for c in cnt_b], 2) for t, per in zip(ts, rows)]
        for j in range(G):
            if cnt_b[j]:
                pieces[j].append((ids_b[j], b, tuple(x[j] for x in split)))
    for (_, st, _), pc in zip(group, pieces):
        if pc:
            st.quant[container].append(pc, fresh=False)


_BAD_CONTAINER: dict[int, torch.Tensor] = {}


def _check_containers(tier: torch.Tensor, bits: torch.Tensor, b_min: int) -> None:
    """A quantised tier holds codes of its container's width, a pruned block codes of b_min's."""
    bad_of = _BAD_CONTAINER.get(b_min)
    if bad_of is None:  # [tier, min(bits, 8)] -> bad, the test below for every pair
        t = torch.arange(len(NAMES)).repeat_interleave(9)
        b = torch.arange(9).repeat(len(NAMES))
        want = torch.where(t == PRUNED, quant.container_bits(b_min), CONTAINER_OF_TIER[t])
        bad_of = _BAD_CONTAINER[b_min] = ((want > 0) & (want != quant.CONTAINER_OF[b])).view(len(NAMES), 9)
    if not bool(bad_of[tier.long(), bits.long().clamp(0, 8)].any()):
        return
    tier, bits = tier.reshape(-1), bits.reshape(-1)
    want = torch.where(tier == PRUNED, quant.container_bits(b_min), CONTAINER_OF_TIER[tier.long()])
    bad = (want > 0) & (want != quant.CONTAINER_OF[bits.long().clamp(0, 8)])
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"block {i}: tier {NAMES[int(tier[i])]} holds {int(want[i])}-bit container codes, "
                         f"got {int(bits[i])}-bit codes")
