"""Pareto plots for docs/results.md: per task, score vs MEASURED bytes ratio of every method.

* ``pareto_front(points, higher_is_better)``: the non-dominated (ratio, score[, ...]) points, in ratio
  order. A point is dominated when another holds at most as much memory (ratio >= its ratio) and scores
  at least as well, one of the two strictly; equal points do not dominate each other (both stay).
* ``task_points(data)``: results.json's per-sample results (bench/make_results.py) pooled per
  (task, length, protocol, method label): ratio = 16-bit bytes / bytes held (summed over the samples),
  score = accuracy for passkey / needle (higher is better) or, for ppl, the perplexity change vs the
  full cache in % over the pooled tokens (lower is better). Skipped rows (external methods that cannot
  run here) are left out; results without a ``protocol`` are query-aware (the runner's default).
* ``plot_task(...)``: one PNG per task, a panel per context length: each method's curve (its points
  at every target ratio; the fixed-bit presets of one family, e.g. uniform-int8/int4/int2, as one
  curve), AGACC highlighted, the external libraries' methods with hollow markers, the front as a step
  line, protocols by line style, the uncompressed reference (``full`` / ``plain``) as a horizontal line.
  matplotlib (requirements-dev.txt), Agg.
* ``render_section(data, tasks, lengths, plot_dir)``: the markdown of the page's "Pareto plots"
  section (writes ``plot_dir/pareto_<task>.png``; without matplotlib it says so and writes no PNG).
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import NamedTuple

REFERENCES = ("full", "plain")  # uncompressed: the horizontal reference line, never on the front
PROTOCOL_DEFAULT = "query-aware"
PROTOCOL_STYLE = {"query-aware": "-", "query-agnostic": "--"}
HIGHLIGHT = "agacc"


def protocol_of(r: dict) -> str:
    """A result's protocol (records without one are query-aware, the runner's default)."""
    return r.get("protocol") or PROTOCOL_DEFAULT


class Point(NamedTuple):
    ratio: float
    score: float
    label: str  # the result's preset label: agacc@4, uniform-int4, kvpress:snapkv@4, hf-quantized:quanto-4
    family: str  # the curve it belongs to: agacc, uniform, kvpress:snapkv, hf-quantized:quanto


def higher_is_better(task: str) -> bool:
    """ppl's score here is a perplexity change (lower is better); the retrieval tasks' an accuracy."""
    return task != "ppl"


def score_name(task: str) -> str:
    return "ppl change vs full (%), lower is better" if task == "ppl" else "accuracy, higher is better"


def pareto_front(points, higher_is_better: bool = True) -> list:
    """The points no other point dominates, sorted by ratio (ascending; equal ratios keep input order).

    ``points``: sequences whose first two items are (ratio, score); anything after rides along.
    Point a dominates b when a.ratio >= b.ratio and a's score is at least as good (>= when higher is
    better, <= otherwise), with at least one of the two strict. Equal points are all kept."""
    pts = list(points)

    def better_eq(a, b):
        return a >= b if higher_is_better else a <= b

    front = [p for i, p in enumerate(pts)
             if not any(q[0] >= p[0] and better_eq(q[1], p[1]) and (q[0] > p[0] or q[1] != p[1])
                        for j, q in enumerate(pts) if j != i)]
    return sorted(front, key=lambda p: p[0])


def family(label: str) -> str:
    """The curve a result belongs to: the label before its ``@ratio`` / ``,key=value`` parts, with the
    bit width of a fixed-bit family dropped (uniform-int4 -> uniform, hf-quantized:quanto-2 ->
    hf-quantized:quanto): each bit width is one point of that family's curve."""
    name = label.partition(",")[0].partition("@")[0]
    if name.startswith("uniform-") or name.startswith("hf-quantized:"):
        name = re.sub(r"-(int)?\d+$", "", name)
    return name


def task_points(data) -> tuple[dict, dict]:
    """``(points, reference)``: points[(task, length, protocol)] -> [Point] of the compressed methods,
    reference[(task, length, protocol)] -> the uncompressed cache's score (same scale)."""
    acc: dict = {}
    for s in data["samples"]:
        for r in s["results"]:
            if "skipped" in r or r.get("score") is None or not r.get("kv_bytes"):
                continue
            key = (s["task"], s["context_tokens"], protocol_of(r), r["preset"])
            acc.setdefault(key, []).append(r)
    points: dict = {}
    reference: dict = {}
    for (task, n, proto, label), rs in acc.items():
        if task == "ppl":
            if not all("nll" in r and "nll_full" in r and r.get("tokens") for r in rs):
                continue
            toks = sum(r["tokens"] for r in rs)
            score = 100.0 * (math.exp((sum(r["nll"] for r in rs) - sum(r["nll_full"] for r in rs)) / toks) - 1.0)
        else:
            score = sum(r["score"] for r in rs) / len(rs)
        ratio = sum(r["kv_bytes_fp16"] for r in rs) / sum(r["kv_bytes"] for r in rs)
        if family(label) in REFERENCES:
            reference[(task, n, proto)] = score
        else:
            points.setdefault((task, n, proto), []).append(Point(ratio, score, label, family(label)))
    for pts in points.values():
        pts.sort(key=lambda p: (p.family, p.ratio))
    return points, reference


def _fmt_score(task: str, score: float) -> str:
    return f"{score:+.2f}%" if task == "ppl" else f"{score:.2f}"


def front_line(task: str, pts: list) -> str:
    """``label (ratio, score), ...`` of the front, in ratio order (from ``pareto_front``)."""
    front = pareto_front(pts, higher_is_better(task))
    return ", ".join(f"{p.label} ({p.ratio:.2f}x, {_fmt_score(task, p.score)})" for p in front)


def _face(family: str, color):
    """Marker face: hollow for the external libraries' methods (``kvpress:*``, ``hf-quantized:*``)."""
    return "white" if ":" in family else color


def _styles(families: list) -> dict:
    """family -> (color, marker); AGACC red with stars, the others from tab10 minus red."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    colors = [cmap(i) for i in range(10) if i != 3]  # 3 = red, AGACC's
    markers = ["o", "s", "^", "v", "D", "P", "X", "<", ">", "h", "p", "d"]
    out, k = {}, 0
    for f in families:
        if f == HIGHLIGHT:
            out[f] = ("tab:red", "*")
        else:
            out[f] = (colors[k % len(colors)], markers[k % len(markers)])
            k += 1
    return out


def plot_task(points: dict, reference: dict, task: str, lengths: list, path) -> None:
    """One PNG: a panel per length in ``lengths``; x = measured ratio (log2), y = the task's score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, NullLocator

    mine = {k: v for k, v in points.items() if k[0] == task}
    protocols = sorted({k[2] for k in mine} | {k[2] for k in reference if k[0] == task},
                       key=lambda p: (p != PROTOCOL_DEFAULT, p))
    families = sorted({p.family for v in mine.values() for p in v}, key=lambda f: (f != HIGHLIGHT, f))
    style = _styles(families)
    all_pts = [p for v in mine.values() for p in v]
    xlo = min([1.0] + [0.9 * p.ratio for p in all_pts])
    xhi = max([10.0] + [1.1 * p.ratio for p in all_pts])
    up = higher_is_better(task)

    width = max(4.3 * len(lengths), 8.6)
    fig, axes = plt.subplots(1, len(lengths), figsize=(width, 4.4), sharey=True, squeeze=False)
    for ax, n in zip(axes[0], lengths):
        ax.set_title(f"{task} @ {n} tokens", fontsize=11)
        ax.set_xscale("log", base=2)
        ax.set_xlim(xlo, xhi)
        ticks = [t for t in (1, 2, 4, 8, 16) if xlo <= t <= xhi]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{t}x" for t in ticks])
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("measured ratio (16-bit bytes / bytes held)")
        if not any((task, n, pr) in mine for pr in protocols):
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes, color="gray")
            continue
        for pr in protocols:
            ls = PROTOCOL_STYLE.get(pr, ":")
            pts = mine.get((task, n, pr), [])
            for f in families:
                fp = sorted((p for p in pts if p.family == f), key=lambda p: p.ratio)
                if not fp:
                    continue
                color, marker = style[f]
                hi = f == HIGHLIGHT
                ax.plot([p.ratio for p in fp], [p.score for p in fp], linestyle=ls, marker=marker, color=color,
                        mfc=_face(f, color), lw=2.6 if hi else 1.1, ms=11 if hi else 5, alpha=1.0 if hi else 0.8,
                        zorder=5 if hi else 3)
                for p in fp:  # a fixed-bit family's points: name the bit width
                    rest = p.label.partition(",")[0].partition("@")[0][len(f):].lstrip("-")
                    if rest:
                        ax.annotate(rest, (p.ratio, p.score), textcoords="offset points", xytext=(3, 4),
                                    fontsize=7, color=color)
            front = pareto_front(pts, up)
            if front:  # best score at ratio >= x: constant left of each front point, from the axis' left edge
                ax.step([xlo] + [p.ratio for p in front], [front[0].score] + [p.score for p in front], where="pre",
                        color="black", linestyle=ls, lw=7, alpha=0.2, zorder=2)
                ax.plot([p.ratio for p in front], [p.score for p in front], linestyle="none", marker="o", ms=9,
                        mfc="none", mec="black", mew=1.0, zorder=6)
            ref = reference.get((task, n, pr))
            if ref is not None:
                ax.axhline(ref, color="black", lw=1.0, linestyle=":", zorder=1)
    axes[0][0].set_ylabel(score_name(task))
    if up:
        axes[0][0].set_ylim(-0.05, 1.08)
    elif all_pts:  # ppl: a few methods reach +50% and more; symlog keeps the region near 0 readable
        ys = [p.score for p in all_pts] + [v for k, v in reference.items() if k[0] == task]
        lo, hi = min(ys + [0.0]), max(ys + [1.0])
        ax0 = axes[0][0]
        ax0.set_yscale("symlog", linthresh=2, linscale=1.0)
        ax0.set_ylim(lo - 0.5 if lo > -2 else lo * 1.4, hi * 1.5 if hi > 2 else hi + 0.5)
        ticks = [t for t in (-50, -20, -10, -5, -2, -1, 0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
                 if lo - 0.5 <= t <= hi * 1.5]
        ax0.yaxis.set_major_locator(FixedLocator(ticks))
        ax0.yaxis.set_minor_locator(NullLocator())
        ax0.set_yticklabels([f"{t:+d}%" if t else "0%" for t in ticks])
    handles = [Line2D([], [], color=style[f][0], marker=style[f][1], mfc=_face(f, style[f][0]), lw=2.6 if f == HIGHLIGHT else 1.1,
                      ms=11 if f == HIGHLIGHT else 5, label=f.upper() if f == HIGHLIGHT else f) for f in families]
    handles.append(Line2D([], [], color="black", lw=7, alpha=0.2, marker="o", ms=9, mfc="none", mec="black",
                          label="Pareto front"))
    handles.append(Line2D([], [], color="black", lw=1.0, linestyle=":", label="full (uncompressed)"))
    if len(protocols) > 1:
        handles += [Line2D([], [], color="gray", linestyle=PROTOCOL_STYLE.get(pr, ":"), label=pr) for pr in protocols]
    fig.suptitle(f"{task}: {score_name(task).split(',')[0]} vs measured KV bytes ratio"
                 + (f" ({protocols[0]})" if len(protocols) == 1 else " (line style = protocol)"), fontsize=12)
    longest = max(len(h.get_label()) for h in handles)  # at fontsize 9: ~0.075 in a character + the marker
    ncol = max(1, min(len(handles), int(width / (0.55 + 0.075 * longest))))
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    rows = math.ceil(len(handles) / ncol)
    fig.set_figheight(4.4 + 0.2 * rows)
    fig.tight_layout(rect=(0, (0.25 + 0.2 * rows) / (4.4 + 0.2 * rows), 1, 1))
    _save_small(fig, path)
    plt.close(fig)


def _save_small(fig, path) -> None:
    """PNG at 100 dpi, reduced to a 256-colour palette (flat plot colours: no visible loss, ~1/3 the bytes)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    buf.seek(0)
    with Image.open(buf) as im:
        im.convert("RGB").quantize(colors=256, dither=Image.Dither.NONE).save(path, optimize=True)


def render_section(data, tasks: list, lengths: list, plot_dir=None) -> list[str]:
    """The markdown lines of the "Pareto plots" section; writes ``plot_dir/pareto_<task>.png`` when
    ``plot_dir`` is given and matplotlib imports (else the section says why there is no plot)."""
    points, reference = task_points(data)
    protocols = sorted({k[2] for k in points}, key=lambda p: (p != PROTOCOL_DEFAULT, p)) or [PROTOCOL_DEFAULT]
    can_plot, why = plot_dir is not None, "no plot directory given"
    if can_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            can_plot, why = False, "matplotlib is not installed: pip install -r requirements-dev.txt"
            print(f"pareto: {why}; no docs/pareto_*.png written (the front lines are)", file=sys.stderr)
    L = ["## Pareto plots\n",
         "Per task, every method's score against its **measured** ratio (16-bit bytes of the same tokens / bytes "
         "held, log2 axis), one panel per context length: ppl = perplexity change vs the full cache in % over the "
         "pooled tokens (lower is better), passkey / needle = accuracy. A method's curve joins its points at the "
         "target ratios (uniform-int8/int4/int2: one curve, points named by bit width); AGACC in red. The gray "
         "step line is the Pareto front (circled points): no other point is at least as good on both measured ratio "
         "and score and better on one; the step is the best score to be had at that ratio or more (`bench/pareto.py`; the uncompressed `full` cache, fp32 at ratio 0.5, is the dotted reference line and "
         "not part of it). "
         + (f"Protocol: {protocols[0]}." if len(protocols) == 1 else
            "Protocols by line style (" + ", ".join(
                f"{ {'-': 'solid', '--': 'dashed'}.get(PROTOCOL_STYLE.get(pr), 'dotted')} = {pr}" for pr in protocols)
            + "), one front each.")
         + " The lines under each plot list the front, computed from the same points.\n"]
    for task in tasks:
        L.append(f"\n### Pareto: {task}\n")
        if can_plot:
            Path(plot_dir).mkdir(parents=True, exist_ok=True)
            plot_task(points, reference, task, lengths, Path(plot_dir) / f"pareto_{task}.png")
            L.append(f"![{task}: {score_name(task).split(',')[0]} vs measured ratio](pareto_{task}.png)\n")
        else:
            L.append(f"(plot not written: {why})\n")
        mine = [pr for pr in protocols if any(k[0] == task and k[2] == pr for k in points)] or protocols[:1]
        for n in lengths:
            for pr in mine:
                pts = points.get((task, n, pr))
                tag = f"{n} tokens" + (f", {pr}" if len(mine) > 1 else "")
                L.append(f"- {tag}: " + (f"on the front: {front_line(task, pts)}" if pts else "not run"))
    return L
