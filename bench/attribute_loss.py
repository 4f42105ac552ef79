"""Where a compressed cache's loss comes from: the evictions or the quantised blocks.

Runs ``bench/bench_ppl.py`` (token by token) with the store's applied plan changed after the planner
made it, so one kind of loss is removed and the other kept exactly as planned:

    --mode evictions  every quantised, pruned or 8-bit block is held at 16 bits instead (and a hot
                      region held at 8 bits reads exact); the evictions are the planned ones (only the
                      evictions' loss remains)
    --mode quantised  every evicted block is held at 16 bits instead; the quantised blocks are the
                      planned ones (only the quantisation's loss remains)
    --mode keys       as ``quantised``, and every quantised block's (and 8-bit hot token's) values
                      read exact: only the quantised keys' loss remains
    --mode values     as ``quantised``, and every quantised block's (and 8-bit hot token's) keys
                      read exact: only the quantised values' loss remains
    --mode none       the plan as made (the method itself: the reference row)

The planner, its ratio fitter and the fidelity floor see the plan as made (a shadow of the planned
tiers stands in for the store's applied ones), so every mode makes the same decisions up to what the
changed attention observes afterwards. A block whose eviction a prompt chunk holds until the prompt
ends (it waits at the lowest kept tier) waits at 16 bits in the modes without evictions. The bytes a
run reports are the changed store's, not the method's: compare KL between modes, not ratios.
(docs/tuning.md round 14.)

    python bench/attribute_loss.py --mode evictions --suite tuning --threads 1 --ref-cache out/ref agacc@4 agacc@8
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import agacc.store as store  # noqa: E402
from agacc import planner, quant  # noqa: E402
from agacc.policy import fidelity_floor  # noqa: E402
from agacc.tiers import EVICTED, FULL  # noqa: E402
from kernels.format import DENSE, QUANT, Part  # noqa: E402

MODES = ("none", "evictions", "quantised", "keys", "values")


def held_as(mode: str, tier: torch.Tensor, bits: torch.Tensor, keep: torch.Tensor, head_dim: int):
    """The plan (tier, bits, keep [L, n]) with one kind of loss removed: those blocks at 16 bits."""
    if mode == "none":
        return tier, bits, keep
    to_full = (tier != FULL) & (tier != EVICTED) if mode == "evictions" else tier == EVICTED
    return (torch.where(to_full, torch.full_like(tier, FULL), tier), torch.where(to_full, torch.full_like(bits, 16), bits),
            torch.where(to_full, torch.full_like(keep, head_dim), keep))


def install(mode: str) -> None:
    """Patch the store's ``apply_plans``, the fitter's view of the applied tiers and, for ``keys`` /
    ``values``, the store's reads (one live cache at a time, as bench_ppl runs them)."""
    if mode == "none":
        return
    shadow: dict[str, object] = {}
    apply_plans, fit_scale, fit_plans = store.apply_plans, planner.fit_threshold_scale, planner.fit_plans
    held_plans = planner.held_plans

    def current(stores_tiers) -> tuple | None:
        """The shadow plan if it is this cache's: as many blocks as the store has tiered (else a new cache)."""
        s = shadow.get("plan")
        if s is None or s[0].shape != stores_tiers:
            return None
        return s

    def planned(prev):
        s = None if prev is None else current(torch.Size([len(prev), prev[0][0].numel()]))
        return prev if s is None else [tuple(x[l] for x in s) for l in range(s[0].shape[0])]

    def patched_apply(stores, tier, bits, keep, token_weight, floored=False):
        if not stores:
            return tier, bits, keep
        tier, bits, keep = (x.to(torch.int8 if i < 2 else torch.int16).cpu() for i, x in enumerate((tier, bits, keep)))
        tier, bits, keep = fidelity_floor(current(torch.Size([len(stores), stores[0].block_tier.numel()])), tier, bits, keep)
        shadow["plan"] = (tier, bits, keep)
        waiting = shadow.pop("waiting", None)  # set by the prompt chunk's held_plans just before
        as_planned = tier  # no evictions: a block waiting for its eviction waits at 16 bits
        if mode != "evictions" and waiting is not None:
            as_planned = torch.where(waiting, torch.full_like(tier, EVICTED), tier)
        head_dim = int(keep.max())  # a plan keeps head_dim elements of every block it does not evict
        apply_plans(stores, *held_as(mode, as_planned, bits, keep, head_dim), token_weight)
        return tier, bits, keep

    def patched_fit_scale(*a, prev=None, **kw):
        return fit_scale(*a, prev=planned(prev), **kw)

    def patched_fit_plans(block_scores, cfg, geo, seq_len, ratio, overhead_bytes=0, prev=None, *a, **kw):
        return fit_plans(block_scores, cfg, geo, seq_len, ratio, overhead_bytes, planned(prev), *a, **kw)

    def patched_held_plans(tier, bits, keep, *a, **kw):
        out = held_plans(tier, bits, keep, *a, **kw)
        shadow["waiting"] = ((tier == EVICTED) & (out[0] != EVICTED)).cpu()
        return out

    store.apply_plans = patched_apply
    planner.fit_threshold_scale, planner.fit_plans = patched_fit_scale, patched_fit_plans
    planner.held_plans = patched_held_plans
    if mode == "evictions":  # a hot region held at 8 bits (round 29) is quantised too: read exact instead
        substitute_reads(lambda *a: None, lambda store_, part, exact_k, exact_v: Part(DENSE, exact_k, exact_v))
    if mode in ("keys", "values"):
        exact_reads(keys=mode == "values")


def exact_reads(keys: bool) -> None:
    """Every attention read (``LayerStore.parts``: decode, prompt chunks, the tracker's mass) sees the
    quantised blocks dequantised, with their keys (``keys``) or values exact."""
    def read(store_, part, exact_k, exact_v, where):
        if part.kind != QUANT:
            return None
        k, v = quant.dequantize_part(part, store_.dtype)
        return Part(DENSE, exact_k.to(store_.dtype), v) if keys else Part(DENSE, k, exact_v.to(store_.dtype))

    def read_hot(store_, part, exact_k, exact_v):
        return Part(DENSE, exact_k, part.v) if keys else Part(DENSE, part.k, exact_v)

    substitute_reads(read, read_hot)


def substitute_reads(read, read_hot=None) -> None:
    """Every attention read (``LayerStore.parts``) sees ``read(store, part, exact_k, exact_v, where)`` in place
    of each tiered part it returns a ``Part`` for (``None``: the part as held): exact_k / exact_v fp32 [Bt, H,
    n, D] the part's tokens' own K/V, which the store keeps beside its own from every append, ``where`` [n]
    their positions. The stand-ins are built once per layout (the store's ``token_layout`` changes whenever
    blocks move) and reused by every step until then. ``read_hot(store, part, exact_k, exact_v)``: the same for the
    hot region's dense part (read exact it is what a 16-bit hot region holds; ``narrow_hot``), every step."""
    append, parts, truncate = store.LayerStore.append, store.LayerStore.parts, store.LayerStore.truncate

    def patched_append(self, k, v):
        old = getattr(self, "_exact", None)
        self._exact = (k.float(), v.float()) if old is None else (torch.cat([old[0], k.float()], 2),
                                                                  torch.cat([old[1], v.float()], 2))
        append(self, k, v)

    def patched_truncate(self, n):  # a crop (the lookahead's pseudo tokens) leaves the exact copy too
        if getattr(self, "_exact", None) is not None:
            self._exact = (self._exact[0][:, :, :n], self._exact[1][:, :, :n])
        truncate(self, n)

    def patched_parts(self):
        out = parts(self)
        layout = self.token_layout()
        cached = getattr(self, "_substituted", None)
        if cached is None or cached[0] is not layout:
            pos, at, new = self.entry_positions(), 0, {}
            for i, seg in enumerate(seg for seg in self.segments if seg.n_blocks):  # parts() lists these first
                where = pos[at:at + seg.n_blocks * self.B]
                part = read(self, out[i], self._exact[0][:, :, where], self._exact[1][:, :, where], where)
                if part is not None:
                    new[i] = part
                at += len(where)
            self._substituted = cached = (layout, new)
        for i, p in cached[1].items():
            out[i] = p
        if read_hot is not None and self.seq_len > self.hot_start:  # the last part: the hot region
            where = torch.arange(self.hot_start, self.seq_len, device=self.device)
            out[-1] = read_hot(self, out[-1], self._exact[0][:, :, where].to(self.dtype),
                               self._exact[1][:, :, where].to(self.dtype))
        return out

    store.LayerStore.append, store.LayerStore.parts = patched_append, patched_parts
    store.LayerStore.truncate = patched_truncate


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    ap.add_argument("--mode", choices=MODES, required=True)
    args, rest = ap.parse_known_args(argv)
    install(args.mode)
    import bench_ppl
    bench_ppl.main(rest)


if __name__ == "__main__":
    main()
