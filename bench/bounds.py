"""What better scores or a cheaper kept format could buy at most (docs/tuning.md round 16).

Runs ``bench/bench_ppl.py`` (token by token) with one part of the method replaced:

    --mode oracle       the planner's token scores are the plain model's own attention from the
                        queries still to come: at a cache of t tokens, token i scores the mean
                        (``--reduce mean``) or the largest (``--reduce max``) attention any later query
                        of the text pays it (averaged over query heads, or their max with
                        ``--heads max``), divided by its mean over the compressible tokens as the
                        tracker's scores are; the tracker is not consulted. What an exact forecast of
                        the attention would give the same tiers, fitter and byte budget. With
                        ``--when past`` the queries are the earlier ones instead (every query's
                        attention, kept exactly: the most a tracker could know).
    --mode values-2bit  3-bit blocks hold their values as 2-bit codes (in the 3-bit container) and
                        the cost model prices the codes at 2 bits, so the fitter plans what a K3V2
                        format would hold at the same bytes. The bytes the run reports are the 3-bit
                        container's: compare KL, not ratios.

    python bench/bounds.py --mode oracle --reduce max --suite tuning --threads 1 --ref-cache out/ref agacc@8
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import agacc.importance as importance  # noqa: E402
import agacc.store as store  # noqa: E402
from agacc import planner, quant  # noqa: E402
from agacc.tiers import INT3  # noqa: E402

MODES = ("oracle", "values-2bit")


def attention_of(model, ids: torch.Tensor, heads: str = "mean") -> torch.Tensor:
    """The plain model's attention over ``ids`` [1, T] -> [L, T (queries), T (keys)] fp32, each layer's
    query heads reduced by ``heads`` (mean or max). One eager forward, no cache."""
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = model(ids, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation(impl)
    return torch.stack([a[0].float().amax(0) if heads == "max" else a[0].float().mean(0) for a in out.attentions])


def oracle_scores(attn: torch.Tensor, seq_len: int, ready_tokens: int, reduce: str = "max",
                  when: str = "future") -> torch.Tensor:
    """Scores [L, seq_len] for a cache of ``seq_len`` tokens from ``attention_of``'s [L, T, T]: each token's
    attention from the queries at positions >= seq_len (the last query when none is left; ``when="past"``:
    from the queries before seq_len instead, all a tracker could have seen), reduced by ``reduce`` (mean
    or max), divided per layer by its mean over the first ``ready_tokens`` tokens."""
    if when == "past":
        later = attn[:, :seq_len, :seq_len]
    else:
        later = attn[:, min(seq_len, attn.shape[1] - 1):, :seq_len]
    s = later.amax(1) if reduce == "max" else later.mean(1)
    ref = s[:, :ready_tokens] if ready_tokens > 0 else s
    return s / ref.mean(1, keepdim=True).clamp_min(1e-12)


def install_oracle(reduce: str, heads: str, when: str = "future") -> None:
    """Every cache's planner reads ``oracle_scores`` of the text ``bench_ppl.measure`` is measuring."""
    import bench_ppl

    seen: dict[str, torch.Tensor] = {}
    measure = bench_ppl.measure

    def patched_measure(model, ids, *a, **kw):
        seen["attn"] = attention_of(model, ids, heads)
        return measure(model, ids, *a, **kw)

    bench_ppl.measure = patched_measure
    importance.scores_all = lambda trackers, seq_len, ready: oracle_scores(seen["attn"], seq_len, ready, reduce, when)


def install_values_2bit() -> None:
    """3-bit blocks: values quantised to 2-bit codes (repacked into the 3-bit container), priced at 2 bits."""
    cost, quantize = planner.block_cost_bytes, store.QuantSegment.quantize

    def block_cost_bytes(tier, bits, keep, **kw):
        saved = kw["batch"] * kw["heads"] * kw["block_size"] * kw["head_dim"] // 8 if tier == INT3 else 0
        return cost(tier, bits, keep, **kw) - saved  # one bit less per value element

    def patched_quantize(self, k, v, b):
        out = quantize(self, k, v, b)
        if self.container != 3:
            return out
        pv, vs, vz = quantize(self, k, v, 2)[3:]
        return (*out[:3], quant.pack(quant.unpack(pv, 2), 3), vs, vz)

    planner.block_cost_bytes = block_cost_bytes
    store.QuantSegment.quantize = patched_quantize


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    ap.add_argument("--mode", choices=MODES, required=True)
    ap.add_argument("--reduce", choices=("mean", "max"), default="max")
    ap.add_argument("--heads", choices=("mean", "max"), default="mean")
    ap.add_argument("--when", choices=("future", "past"), default="future")
    args, rest = ap.parse_known_args(argv)
    if args.mode == "oracle":
        install_oracle(args.reduce, args.heads, args.when)
    else:
        install_values_2bit()
    import bench_ppl
    bench_ppl.main(rest)


if __name__ == "__main__":
    main()
