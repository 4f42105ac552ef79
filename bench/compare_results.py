"""Two results pages' JSON, cell by cell: did a change move any cell beyond noise?

Only cells the new JSON re-ran are compared (records that differ). Noise comes from the repeats each cell already has (ppl windows, retrieval samples): the paired
difference per sample d_k (retrieval: score new - score old, 0/1 per sample; ppl: the window's
log-perplexity old - new, so a positive d is better), its mean and its standard error
std(d) / sqrt(k). A cell moved beyond noise if |mean| > 2 SE (about a 95% interval; with identical
differences on every sample SE = 0 and any move counts, down to ``RESOLUTION``: a perplexity change under
0.01% is float rounding). On 5 retrieval samples one or two samples
flipped are within noise; three flipped the same way are not.

    git show ed35754:docs/results.json > /tmp/one_prefill.json
    python bench/compare_results.py /tmp/one_prefill.json docs/results.json --out docs/results_chunked_vs_one.md
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from bench.pareto import PROTOCOL_DEFAULT, protocol_of


# below this a paired difference is float rounding, not a change: 0.01% of perplexity (log-ppl per token)
RESOLUTION = {"ppl": 1e-4}


def records(data: dict) -> dict:
    """(task, length, preset label) -> {sample index: result record}; a query-agnostic result's label
    carries its protocol (``agacc@4 (query-agnostic)``), so the two protocols never mix."""
    out: dict = {}
    for s in data["samples"]:
        for r in s["results"]:
            label = r["preset"] + ("" if protocol_of(r) == PROTOCOL_DEFAULT else f" ({protocol_of(r)})")
            out.setdefault((s["task"], s["context_tokens"], label), {})[s["sample"]] = r
    return out


def quality(r: dict) -> float:
    """A record's quality, higher is better: the retrieval score, or ppl's log-perplexity negated."""
    return -r["nll"] / r["tokens"] if "nll" in r else r["score"]


def paired(old: dict, new: dict) -> tuple[float, float, int]:
    """Mean paired difference (new - old) over the samples both hold, its standard error, the count."""
    d = [new[k] - old[k] for k in sorted(set(old) & set(new))]
    k = len(d)
    if k == 0:
        return float("nan"), float("nan"), 0
    mean = sum(d) / k
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (k - 1) / k) if k > 1 else float("inf")
    return mean, se, k


def compare(old_data: dict, new_data: dict) -> list[dict]:
    """One row per cell that ``new`` re-ran: the samples whose record differs from ``old``'s (a re-run
    differs at least in its timings; a record carried over unchanged, e.g. by ``make_results --redo``
    of other presets, is not a repeat and is left out)."""
    old, new = records(old_data), records(new_data)
    rows = []
    for key in sorted(set(old) & set(new), key=str):
        both = [i for i in set(old[key]) & set(new[key]) if old[key][i] != new[key][i]]
        if not both:
            continue
        mean, se, k = paired({i: quality(old[key][i]) for i in both}, {i: quality(new[key][i]) for i in both})
        task, n, preset = key
        rows.append({"task": task, "length": n, "preset": preset, "mean": mean, "se": se, "k": k,
                     "beyond_noise": bool(k > 1 and abs(mean) > max(2 * se, RESOLUTION.get(task, 0.0)))})
    return rows


def render(rows: list[dict], old_name: str, new_name: str) -> str:
    L = [f"# {new_name} vs {old_name}, cell by cell\n",
         "Produced by `bench/compare_results.py`. Δ = new - old, paired per sample: retrieval score "
         "(each sample 0 or 1), ppl: the window's perplexity change in % (negative is better). "
         "Noise: 2 standard errors of the paired differences; **bold** = beyond noise.\n",
         "| task | tokens | method | Δ | 2 SE | samples |", "|---|---|---|---|---|---|"]
    worse = better = 0
    for r in rows:
        if r["task"] == "ppl":  # log-ppl difference -> % perplexity change (new / old - 1)
            delta, noise = 100 * (math.exp(-r["mean"]) - 1), 200 * r["se"]
            fmt = f"{delta:+.2f}%"
            hurt = r["mean"] < 0
        else:
            delta, noise = r["mean"], 2 * r["se"]
            fmt = f"{delta:+.2f}"
            hurt = r["mean"] < 0
        if r["beyond_noise"]:
            fmt = f"**{fmt}**"
            worse += hurt
            better += not hurt
        L.append(f"| {r['task']} | {r['length']} | {r['preset']} | {fmt} | {noise:.2f}{'%' if r['task'] == 'ppl' else ''} "
                 f"| {r['k']} |")
    L.append(f"\n{len(rows)} cells; beyond noise: {worse} worse, {better} better.\n")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--out", default=None, help="write the markdown here (default: print it)")
    args = p.parse_args(argv)
    rows = compare(json.loads(Path(args.old).read_text()), json.loads(Path(args.new).read_text()))
    md = render(rows, Path(args.old).name, Path(args.new).name)
    if args.out:
        Path(args.out).write_text(md)
        print(md.splitlines()[-1])
    else:
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
