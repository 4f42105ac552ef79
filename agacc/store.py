"""Per-layer mixed-precision K/V storage: the only owner of K/V bytes.

Tokens are grouped in blocks of B (block j = tokens [jB, (j+1)B)). New tokens append to the *hot*
region (full precision, the recent window and the not-yet-tiered tail). ``apply_tiers`` moves whole
blocks out of the hot region and between segments:

  full     FullSegment        k, v           [Bt, H, n, D]      store dtype
  int8/4/3/2 QuantSegment(c)  k, v codes     [Bt, H, n, D*c/8]  uint8, packed (quant.py)
                              k_scale/zero   [Bt, H, n/B, D]    fp16, per channel per block (key_quant="channel")
                                          or [Bt, H, n, D/Gk]   fp16, per token per group (key_quant="token")
                              v_scale/zero   [Bt, H, n, D/G]    fp16, per token per group
                              with cfg.rotate, the codes are of K H and V H (``quant.rotate``)
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

import math
from dataclasses import dataclass

import torch

import kernels
from agacc import quant
from agacc.quant import DENSE, QUANT, SPARSE, Part
from agacc.policy import fidelity_floor
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


def _rows(block_pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """Row indices of the given block positions inside a segment (B rows per block)."""
    return (block_pos[:, None] * block_size + torch.arange(block_size, device=block_pos.device)).reshape(-1)


@dataclass
class Entries:
    """One stretch of attention entries, as attention reads it.

    k, v: [Bt, H, n, D] in the compute dtype (dequantised); bias: None or [n] fp32 added to logits."""
    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor | None = None


class Segment:
    """Common bookkeeping: block ids in row order and the tensors held."""

    def __init__(self, block_size: int, device):
        self.block_size = block_size
        self.block_ids = torch.empty(0, dtype=torch.int32, device=device)

    def tensors(self) -> list[torch.Tensor]:
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

    def read_blocks(self, block_pos: torch.Tensor):
        raise NotImplementedError

    def select_blocks(self, block_pos: torch.Tensor) -> None:
        raise NotImplementedError

    def map_batch(self, fn) -> None:
        """Apply ``fn`` (batch reorder / repeat) to every batch-dimensioned tensor."""
        for name, t in list(vars(self).items()):
            if isinstance(t, torch.Tensor) and t.dim() == 4:
                setattr(self, name, fn(t))


class FullSegment(Segment):
    def __init__(self, block_size, device, dtype):
        super().__init__(block_size, device)
        self.dtype = dtype
        self.k = self.v = None

    def tensors(self):
        return [self.k, self.v]

    def add(self, block_ids, k, v, **_):
        self.block_ids = torch.cat([self.block_ids, block_ids.to(torch.int32)])
        self.k = _cat(self.k, k.to(self.dtype), 2)
        self.v = _cat(self.v, v.to(self.dtype), 2)

    def read_blocks(self, block_pos):
        r = _rows(block_pos, self.block_size)
        return self.k[:, :, r].float(), self.v[:, :, r].float()

    def select_blocks(self, block_pos):
        r = _rows(block_pos, self.block_size)
        self.block_ids = self.block_ids[block_pos]
        self.k, self.v = (self.k[:, :, r], self.v[:, :, r]) if block_pos.numel() else (None, None)

    def part(self) -> Part:
        return Part(DENSE, self.k, self.v)


class QuantSegment(Segment):
    """Blocks quantised to codes of <= ``container`` bits (per block code bits in ``bits``). Keys are
    grouped per channel per block or per token (``cfg.key_quant == "token"``); with ``cfg.rotate``
    keys and values are stored Hadamard-rotated (``rotated``), and ``read_blocks`` rotates them back."""

    def __init__(self, block_size, device, container, cfg):
        super().__init__(block_size, device)
        self.container = container
        self.cfg = cfg
        self.bits = torch.empty(0, dtype=torch.int8, device=device)
        self.k = self.k_scale = self.k_zero = self.v = self.v_scale = self.v_zero = None

    @property
    def key_per_token(self) -> bool:
        return self.cfg.key_quant == "token"

    @property
    def rotated(self) -> bool:
        return self.cfg.rotate

    def tensors(self):
        return [self.bits, self.k, self.k_scale, self.k_zero, self.v, self.v_scale, self.v_zero]

    def add(self, block_ids, k, v, bits, **_):
        """k, v: [Bt, H, nb*B, D] float; bits: [nb] code bits (<= container)."""
        cfg, B = self.cfg, self.block_size
        ops = _quant_ops(k.device)
        if self.rotated:
            k, v = quant.rotate(k), quant.rotate(v)
        parts = {"k": [], "k_scale": [], "k_zero": [], "v": [], "v_scale": [], "v_zero": []}
        # quantise runs of equal code bits together (usually one or two runs)
        for b in sorted(set(bits.tolist())):
            sel = (bits == b).nonzero().squeeze(1)
            r = _rows(sel, B)
            if self.key_per_token:
                pk, ks, kz = ops.quantize_values(k[:, :, r], b, cfg.key_group_size, cfg.quantizer, cfg.s)
            else:
                pk, ks, kz = ops.quantize_keys(k[:, :, r], b, B, cfg.quantizer, cfg.s)
            pv, vs, vz = ops.quantize_values(v[:, :, r], b, cfg.value_group_size, cfg.quantizer, cfg.s)
            for name, t in zip(parts, (pk, ks, kz, pv, vs, vz)):
                parts[name].append(t)
            block_ids_sel = block_ids[sel]
            self.block_ids = torch.cat([self.block_ids, block_ids_sel.to(torch.int32)])
            self.bits = torch.cat([self.bits, torch.full((sel.numel(),), b, dtype=torch.int8, device=self.bits.device)])
        for name, ts in parts.items():
            setattr(self, name, _cat(getattr(self, name), torch.cat(ts, 2), 2))

    def part(self, block_pos=None) -> Part:
        """The held blocks at ``block_pos`` (None: all) as a quantised ``Part``."""
        if block_pos is None:
            k, ks, kz, v, vs, vz = self.k, self.k_scale, self.k_zero, self.v, self.v_scale, self.v_zero
        else:
            r = _rows(block_pos, self.block_size)
            kmeta = r if self.key_per_token else block_pos
            k, ks, kz = self.k[:, :, r], self.k_scale[:, :, kmeta], self.k_zero[:, :, kmeta]
            v, vs, vz = self.v[:, :, r], self.v_scale[:, :, r], self.v_zero[:, :, r]
        d = v.shape[-1] * 8 // self.container
        return Part(QUANT, k, v, k_scale=ks, k_zero=kz, v_scale=vs, v_zero=vz, container=self.container,
                    key_block=0 if self.key_per_token else self.block_size,
                    key_group=d // ks.shape[-1] if self.key_per_token else 0, value_group=d // vs.shape[-1],
                    rotated=self.rotated)

    def read_blocks(self, block_pos):
        """Dequantised, un-rotated (k, v) fp32 of the given block positions."""
        return quant.dequantize_part(self.part(block_pos))

    def select_blocks(self, block_pos):
        r = _rows(block_pos, self.block_size)
        self.block_ids, self.bits = self.block_ids[block_pos], self.bits[block_pos]
        if block_pos.numel() == 0:
            self.k = self.k_scale = self.k_zero = self.v = self.v_scale = self.v_zero = None
            return
        self.k, self.v = self.k[:, :, r], self.v[:, :, r]
        self.v_scale, self.v_zero = self.v_scale[:, :, r], self.v_zero[:, :, r]
        kmeta = r if self.key_per_token else block_pos
        self.k_scale, self.k_zero = self.k_scale[:, :, kmeta], self.k_zero[:, :, kmeta]


class SparseSegment(Segment):
    """Magnitude-pruned blocks keeping ``keep`` of D elements per vector, kept values at ``bits`` bits."""

    def __init__(self, block_size, device, keep, bits, cfg):
        super().__init__(block_size, device)
        self.keep, self.code_bits, self.cfg = keep, bits, cfg
        self.k_map = self.k = self.k_scale = self.k_zero = None
        self.v_map = self.v = self.v_scale = self.v_zero = None

    def tensors(self):
        return [self.k_map, self.k, self.k_scale, self.k_zero, self.v_map, self.v, self.v_scale, self.v_zero]

    def add(self, block_ids, k, v, **_):
        cfg = self.cfg
        km, kq, ks, kz = quant.sparse_encode(k, self.keep, self.code_bits, cfg.quantizer, cfg.s)
        vm, vq, vs, vz = quant.sparse_encode(v, self.keep, self.code_bits, cfg.quantizer, cfg.s)
        self.block_ids = torch.cat([self.block_ids, block_ids.to(torch.int32)])
        for name, t in zip(("k_map", "k", "k_scale", "k_zero", "v_map", "v", "v_scale", "v_zero"),
                           (km, kq, ks, kz, vm, vq, vs, vz)):
            setattr(self, name, _cat(getattr(self, name), t, 2))

    def part(self, block_pos=None) -> Part:
        """The held blocks at ``block_pos`` (None: all) as a sparse ``Part``."""
        r = None if block_pos is None else _rows(block_pos, self.block_size)
        sel = (lambda t: t) if r is None else (lambda t: t[:, :, r])
        return Part(SPARSE, sel(self.k), sel(self.v), k_scale=sel(self.k_scale), k_zero=sel(self.k_zero),
                    v_scale=sel(self.v_scale), v_zero=sel(self.v_zero), k_map=sel(self.k_map), v_map=sel(self.v_map),
                    container=quant.container_bits(self.code_bits), keep=self.keep, code_bits=self.code_bits)

    def read_blocks(self, block_pos):
        """Decoded (k, v) fp32 of the given block positions, pruned elements zero."""
        return quant.dequantize_part(self.part(block_pos))

    def select_blocks(self, block_pos):
        r = _rows(block_pos, self.block_size)
        self.block_ids = self.block_ids[block_pos]
        for name in ("k_map", "k", "k_scale", "k_zero", "v_map", "v", "v_scale", "v_zero"):
            t = getattr(self, name)
            setattr(self, name, t[:, :, r] if block_pos.numel() else None)


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


def weighted_mean(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor):
    """k, v [Bt, H, n, D], w [n] >= 0 -> (k_mean [Bt,H,D], v_mean, weight sum)."""
    w = w.float().clamp_min(0) + 1e-12
    wn = w / w.sum()
    return (k.float() * wn[:, None]).sum(2), (v.float() * wn[:, None]).sum(2), float(w.sum())


def merge_means(parts):
    """parts: (k [Bt,H,D], v, weight, count) -> merged (k, v, weight, count), weights add."""
    wsum = sum(p[2] for p in parts)
    k = sum(p[0] * (p[2] / wsum) for p in parts)
    v = sum(p[1] * (p[2] / wsum) for p in parts)
    return k, v, wsum, sum(p[3] for p in parts)


class LayerStore:
    """All K/V of one layer. ``seq_len`` is the logical number of tokens seen (for RoPE / positions);
    ``n_entries`` the number of attention entries held."""

    def __init__(self, cfg, device, dtype):
        self.cfg = cfg
        self.B = cfg.block_size
        self.device = device
        self.dtype = dtype  # full-precision storage dtype
        self.seq_len = 0
        self.hot_start = 0  # first token still in the hot region (a multiple of B)
        self.hot_k = self.hot_v = None
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
        self.hot_k = _cat(self.hot_k, k.to(self.dtype), 2)
        self.hot_v = _cat(self.hot_v, v.to(self.dtype), 2)
        self.seq_len += k.shape[2]

    @property
    def n_blocks(self) -> int:
        return int(self.block_tier.numel())

    @property
    def batch(self) -> int:
        return self.hot_k.shape[0] if self.hot_k is not None else 1

    def n_ready_blocks(self) -> int:
        """Blocks that have fully left the recent window (compressible)."""
        return max(0, self.seq_len - self.cfg.recent_window) // self.B

    @property
    def segments(self) -> list[Segment]:
        return [self.full, *self.quant.values(), *(self.sparse[k] for k in sorted(self.sparse))]

    @property
    def n_entries(self) -> int:
        hot = 0 if self.hot_k is None else self.hot_k.shape[2]
        return sum(s.n_blocks for s in self.segments) * self.B + self.markers.n + hot

    # ---- reading -----------------------------------------------------------------------------
    def parts(self) -> list[Part]:
        """Everything held, as it is held, in attention order: full, int8, int4, int3, int2, sparse (by
        keep), markers (dense, with their log-count bias), hot. Empty parts are left out. Every decode
        backend reads this list; entry i of the attention mass is entry i of the parts laid end to end."""
        out = [seg.part() for seg in self.segments if seg.n_blocks]
        if self.markers.n:
            m = self.markers
            out.append(Part(DENSE, m.k, m.v, bias=m.log_count))
        if self.hot_k is not None and self.hot_k.shape[2]:
            out.append(Part(DENSE, self.hot_k, self.hot_v))
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

    def token_mass(self, mass: torch.Tensor) -> torch.Tensor:
        """Entry mass [m <= n_entries] (attention order) -> token mass [seq_len]; a marker's mass is
        shared evenly among the tokens of its span; entries appended since (m < n_entries) get 0."""
        B = self.B
        if mass.numel() < self.n_entries:
            mass = torch.nn.functional.pad(mass, (0, self.n_entries - mass.numel()))
        blocks = self.token_layout().long()
        out = torch.zeros(self.seq_len, dtype=torch.float32, device=mass.device)
        by_block = out[: self.hot_start].view(-1, B)  # [n_ready_blocks, B], a view of out
        n_t = blocks.numel() * B
        if n_t:
            by_block.index_add_(0, blocks, mass[:n_t].float().view(-1, B))
        m = self.markers.n
        if m:
            first, last = self.markers.span[:, 0].long(), self.markers.span[:, 1].long()
            n_blk = last - first + 1
            owner = torch.repeat_interleave(torch.arange(m, device=mass.device), n_blk)   # marker of each spanned block
            offset = torch.arange(owner.numel(), device=mass.device) - (torch.cumsum(n_blk, 0) - n_blk)[owner]
            share = mass[n_t:n_t + m].float()[owner] / (n_blk[owner] * B).float()
            by_block.index_add_(0, first[owner] + offset, share[:, None].expand(-1, B))
        n_hot = self.seq_len - self.hot_start
        if n_hot:
            out[self.hot_start:] += mass[mass.numel() - n_hot:].float()
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
        n_old = self.n_blocks
        if n_old:
            ot, ob, ok = self.block_tier, self.block_bits, self.block_keep
            changed = (tier[:n_old] != ot) | (bits[:n_old] != ob) | ((tier[:n_old] == PRUNED) & (keep[:n_old] != ok))
            changed = torch.cat([changed, torch.ones(nb - n_old, dtype=torch.bool, device=self.device)])
        else:
            changed = torch.ones(nb, dtype=torch.bool, device=self.device)
        moving = changed.nonzero().squeeze(1)
        if moving.numel() == 0:
            return tier, bits, keep
        k, v = self._take_blocks(moving, n_old)
        newly_evicted = []
        for t_code in (FULL, INT8, INT4, INT3, INT2, PRUNED):
            sel = (tier[moving] == t_code).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            r = _rows(sel, self.B)
            ids = moving[sel]
            if t_code == FULL:
                self.full.add(ids, k[:, :, r], v[:, :, r])
            elif t_code in TIER_CONTAINER:
                self.quant[TIER_CONTAINER[t_code]].add(ids, k[:, :, r], v[:, :, r], bits=bits[ids])
            else:
                self._add_pruned(ids, k[:, :, r], v[:, :, r], bits[ids], keep[ids])
        ev = (tier[moving] == EVICTED).nonzero().squeeze(1)
        if ev.numel():
            r = _rows(ev, self.B)
            newly_evicted = [(int(b), k[:, :, r[i * self.B:(i + 1) * self.B]], v[:, :, r[i * self.B:(i + 1) * self.B]])
                             for i, b in enumerate(moving[ev].tolist())]
        self.block_tier, self.block_bits, self.block_keep = tier, bits, keep
        self._rebuild_markers(newly_evicted, token_weight)
        self._layout = None
        return tier, bits, keep

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

    def _take_blocks(self, moving: torch.Tensor, n_old: int):
        """Full-precision-as-possible (k, v) [Bt,H,len(moving)*B,D] fp32 of the moving blocks, removed
        from where they are. New blocks come from the hot region; with a host copy, old blocks come
        from it (exact); otherwise they are dequantised from their current segment."""
        B = self.B
        bt, h, _, d = self.hot_k.shape
        k = torch.empty(bt, h, moving.numel() * B, d, dtype=torch.float32, device=self.device)
        v = torch.empty_like(k)
        slot = {int(b): i for i, b in enumerate(moving.tolist())}
        # 1) old blocks: pull out of their segments
        for seg in self.segments:
            if not seg.n_blocks:
                continue
            ids = [b for b in seg.block_ids.tolist() if b in slot]
            if not ids:
                continue
            kk, vv = seg.remove(torch.tensor(ids, device=self.device))
            for i, b in enumerate(ids):
                k[:, :, slot[b] * B:(slot[b] + 1) * B] = kk[:, :, i * B:(i + 1) * B]
                v[:, :, slot[b] * B:(slot[b] + 1) * B] = vv[:, :, i * B:(i + 1) * B]
        # 2) new blocks: out of the hot region
        new = [b for b in moving.tolist() if b >= n_old]
        if new:
            hot_blocks = max(new) + 1 - self.hot_start // B
            n_tok = hot_blocks * B
            hk, hv = self.hot_k[:, :, :n_tok].float(), self.hot_v[:, :, :n_tok].float()
            for b in new:
                o = b * B - self.hot_start
                k[:, :, slot[b] * B:(slot[b] + 1) * B] = hk[:, :, o:o + B]
                v[:, :, slot[b] * B:(slot[b] + 1) * B] = hv[:, :, o:o + B]
                if self.cfg.host_copy:
                    self.host[b] = (self.hot_k[:, :, o:o + B].to("cpu", copy=True),
                                    self.hot_v[:, :, o:o + B].to("cpu", copy=True))
            self.hot_k, self.hot_v = self.hot_k[:, :, n_tok:], self.hot_v[:, :, n_tok:]
            self.hot_start += n_tok
        # 3) with a host copy every moving block restarts from full precision (exact re-promotion)
        if self.cfg.host_copy:
            for b, i in slot.items():
                hk, hv = self.host[b]
                k[:, :, i * B:(i + 1) * B] = hk.to(self.device).float()
                v[:, :, i * B:(i + 1) * B] = hv.to(self.device).float()
        return k, v

    def _rebuild_markers(self, newly_evicted, token_weight):
        """Recompute the marker runs after evictions (and, with a host copy, un-evictions)."""
        if not self.cfg.markers:
            self.markers.set([])
            return
        ev_blocks = (self.block_tier == EVICTED).nonzero().squeeze(1).tolist()
        if not newly_evicted and len(ev_blocks) == int((self.markers.span[:, 1] - self.markers.span[:, 0] + 1).sum()):
            return  # nothing evicted since, nothing brought back: the same runs
        runs = evicted_runs(self.block_tier)
        old = {(r[0], r[1]): r for r in self.markers.runs()}
        new_data = {b: (kk, vv) for b, kk, vv in newly_evicted}
        B = self.B
        out = []
        for first, last in runs:
            if (first, last) in old:
                out.append(old[(first, last)])
                continue
            parts, covered = [], set()
            for (f, l), r in old.items():
                if first <= f and l <= last:
                    parts.append((r[2], r[3], r[4], r[5]))
                    covered.update(range(f, l + 1))
            for b in range(first, last + 1):
                if b in covered:
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
            km, vm, ws, n = merge_means(parts)
            out.append((first, last, km, vm, ws, n))
        self.markers.set(out)

    # ---- accounting -------------------------------------------------------------------------
    def tensors(self) -> list[torch.Tensor]:
        ts = [self.hot_k, self.hot_v, self.block_tier, self.block_bits, self.block_keep]
        for seg in self.segments:
            ts += seg.tensors() + [seg.block_ids]
        ts += self.markers.tensors()
        if self._layout is not None:
            ts.append(self._layout)
        return [t for t in ts if t is not None]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def host_nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.host.values())

    def bytes_by_tier(self) -> dict[str, int]:
        hot = sum(t.nbytes for t in (self.hot_k, self.hot_v) if t is not None)
        return {
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

    def map_batch(self, fn) -> None:
        """Reorder / repeat the batch dimension of everything held (beam search)."""
        if self.hot_k is not None:
            self.hot_k, self.hot_v = fn(self.hot_k), fn(self.hot_v)
        for seg in self.segments:
            seg.map_batch(fn)
        self.markers.map_batch(fn)
        self.host = {b: (fn(k), fn(v)) for b, (k, v) in self.host.items()}


def _check_containers(tier: torch.Tensor, bits: torch.Tensor, b_min: int) -> None:
    """A quantised tier holds codes of its container's width, a pruned block codes of b_min's."""
    want = torch.where(tier == PRUNED, quant.container_bits(b_min), CONTAINER_OF_TIER[tier.long()])
    bad = (want > 0) & (want != quant.CONTAINER_OF[bits.long().clamp(0, 8)])
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"block {i}: tier {NAMES[int(tier[i])]} holds {int(want[i])}-bit container codes, "
                         f"got {int(bits[i])}-bit codes")
