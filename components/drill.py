"""Block drill-down and the quality-vs-memory curve: what the page shows of one block over a run, and
of the run's policy replayed at a sweep of target ratios. Everything here draws what the library
computed (``agacc.trace.block_history``, ``agacc.trace.ratio_sweep``, the measured KL / top-1): no
compression is computed in the UI.

``CLICK_JS`` goes into the page's ``<head>``: it hooks Plotly's ``plotly_click`` on the three maps and
writes "layer, block" into the ``block-pick`` box, then presses ``block-show`` (the same path as a
keyboard user who types the pair and presses Enter or the button)."""
from __future__ import annotations

import html
import math
import re

from agacc.trace import MASS_CLASSES
from components.theme import TIER_COLORS

MIB = 2 ** 20
MAPS = ("importance-heatmap", "tier-map", "bits-map")

# hooked again whenever Plotly replaced a map's event emitter (a new plot of the same div)
CLICK_JS = """
<script>
(function () {
  const MAPS = %s;
  function pick(layer, block) {
    const box = document.querySelector('#block-pick textarea, #block-pick input');
    const btn = document.querySelector('#block-show');
    if (!box || !btn) return;
    box.value = layer + ', ' + block;
    box.dispatchEvent(new Event('input', {bubbles: true}));
    setTimeout(() => btn.click(), 30);
  }
  function hook() {
    for (const id of MAPS) {
      const gd = document.querySelector('#' + id + ' .js-plotly-plot');
      if (!gd || !gd.on || !gd._ev || gd.__agaccEv === gd._ev) continue;
      gd.__agaccEv = gd._ev;
      gd.on('plotly_click', (ev) => {
        const p = ev && ev.points && ev.points.find(q => q.data && q.data.type === 'heatmap');
        if (!p || p.x === null || p.y === null || p.x === undefined) return;
        pick(Math.round(p.y), Math.round(p.x));
      });
    }
  }
  setInterval(hook, 400);
})();
</script>""" % (list(MAPS),)


def parse_pick(text: str | None) -> tuple[int, int]:
    """"layer, block" (any separator: comma, space, slash, colon) -> (layer, block); ValueError saying
    what is expected."""
    nums = re.findall(r"-?\d+", str(text or ""))
    if len(nums) != 2 or re.search(r"[^\d\s,;:/()\[\]-]", str(text or "")):
        raise ValueError(f"type a layer and a block as two whole numbers, e.g. '3, 12' (got {str(text or '')!r})")
    return int(nums[0]), int(nums[1])


def _tier_chip(name: str, code: int) -> str:
    label, color = TIER_COLORS[int(code)][0], TIER_COLORS[int(code)][1]
    fg = "#fff" if int(code) in (0, 5, 6) else "#0f172a"
    return f"<span class='bp-chip' style='background:{color};color:{fg}'>{html.escape(label or name)}</span>"


def block_panel_html(h: dict) -> str:
    """The panel's text: the block's tokens, its tier history (one row per frame) and its bytes now.
    ``h``: ``agacc.trace.block_history``."""
    toks = "".join(f"<span class='bp-tok'>{html.escape(t)}</span>" for t in h["tokens"]) or "<i>(no tokens)</i>"
    rows = []
    for r in h["frames"]:
        imp = "hot (not scored yet)" if r["importance"] is None else f"{r['importance']:.4g}"
        rows.append(f"<tr><td>{r['frame'] + 1}</td><td>{r['step']}</td><td>{imp}</td>"
                    f"<td>{_tier_chip(r['tier_name'], r['tier'])}</td><td>{r['bits']}</td></tr>")
    last = h["frames"][-1] if h["frames"] else None
    now = f"{_tier_chip(last['tier_name'], last['tier'])} {last['bits']} bits" if last else "?"
    return (f"<div class='bp'><div class='bp-head'><b>Layer {h['layer']}, block {h['block']}</b>: tokens "
            f"{h['first']}-{h['last']} ({h['block_size']} a block) · now {now} · "
            f"<span id='block-bytes' data-bytes='{h['bytes']}'><b>{h['bytes']:,} bytes</b> held</span> "
            f"<span class='bp-note'>(K and V of every KV head, the planner's cost model; an evicted block's "
            f"marker, with markers on, is shared by its run)</span></div>"
            f"<div class='bp-tokens' id='block-tokens'>{toks}</div>"
            "<table class='bp-table' id='block-tiers'><thead><tr><th>frame</th><th>after decode step</th>"
            "<th>importance</th><th>tier</th><th>bits</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>")


def block_importance_chart(h: dict | None) -> dict:
    """The block's importance at every frame (a small line; each point coloured by its tier then)."""
    from components.plots import _empty, _layout

    title = "Block importance over the run"
    if not h or not h["frames"]:
        return _empty(title, "click a block in a map (or type layer, block)")
    fr = h["frames"]
    x = [r["step"] for r in fr]
    y = [r["importance"] for r in fr]
    colors = [TIER_COLORS[r["tier"]][1] for r in fr]
    text = [f"frame {r['frame'] + 1}: {r['tier_name']}, {r['bits']} bits" for r in fr]
    data = [{"type": "scatter", "x": x, "y": y, "mode": "lines+markers", "name": "importance", "text": text,
             "line": {"color": "#334155", "width": 1.5}, "marker": {"color": colors, "size": 9,
                                                                     "line": {"color": "#0f172a", "width": 0.5}},
             "connectgaps": False, "hovertemplate": "step %{x}: %{y:.4g}<br>%{text}<extra></extra>"}]
    lay = _layout(f"{title}<br><sup>layer {h['layer']}, block {h['block']} (1 = the layer's mean; markers coloured "
                  "by tier)</sup>", height=230, xaxis={"title": {"text": "decode step of the frame"}},
                  yaxis={"title": {"text": "importance"}, "rangemode": "tozero"}, showlegend=False)
    lay["margin"] = {"l": 56, "r": 16, "t": 56, "b": 44}
    return {"data": data, "layout": lay}


QUALITY_TITLE = "Quality vs memory (replayed at target ratios 1.5-12x)"
SHARE_NAMES = {"full": "attention mass on 16-bit blocks", "quantised": "on quantised blocks",
               "pruned": "on pruned blocks", "evicted": "on evicted blocks"}
SHARE_COLORS = {"full": "#1e3a8a", "quantised": "#22c55e", "pruned": "#f59e0b", "evicted": "#dc2626"}


def quality_curve(sweep: list[dict] | None, measured: list[dict] | None = None, run_ratio: float | None = None,
                  message: str = "generate to see the curve") -> dict:
    """x = ratio vs a 16-bit cache; y (left) = share of the recorded attention mass on blocks at 16 bits /
    quantised / pruned / evicted under the policy replayed at each target ratio (``ratio_sweep``); y
    (right) = measured KL(full || compressed) and 1 - top-1 agreement of real runs (``measured``: [{ratio,
    kl, top1, label}]). ``run_ratio``: the recorded run's own ratio (a vertical line)."""
    from components.plots import _empty, _layout

    if not sweep:
        return _empty(QUALITY_TITLE, message)
    x = [round(s["ratio"], 4) for s in sweep]
    data = []
    for c in MASS_CLASSES:
        y = [round(100 * s["shares"][c], 4) for s in sweep]
        if c == "pruned" and not any(y):
            continue
        data.append({"type": "scatter", "x": x, "y": y, "mode": "lines+markers", "name": SHARE_NAMES[c],
                     "line": {"color": SHARE_COLORS[c], "width": 2}, "marker": {"size": 6},
                     "customdata": [[s["target"], s["held_bytes"] / MIB] for s in sweep],
                     "hovertemplate": "target %{customdata[0]}x → %{x:.2f}x, %{customdata[1]:.2f} MiB held<br>"
                                      "%{y:.1f}% of the attention mass<extra>" + c + "</extra>"})
    if measured:
        mx = [round(m["ratio"], 4) for m in measured]
        labels = [m.get("label", "") for m in measured]
        data.append({"type": "scatter", "x": mx, "y": [m["kl"] for m in measured], "yaxis": "y2", "mode": "markers",
                     "name": "measured KL(full‖compressed), nats/token", "text": labels,
                     "marker": {"symbol": "diamond", "size": 12, "color": "#7c3aed", "line": {"color": "#fff", "width": 1}},
                     "hovertemplate": "%{text}: %{x:.2f}x, KL %{y:.4f}<extra></extra>"})
        data.append({"type": "scatter", "x": mx, "y": [1 - m["top1"] for m in measured], "yaxis": "y2",
                     "mode": "markers", "name": "measured 1 − top-1 agreement", "text": labels,
                     "marker": {"symbol": "x", "size": 11, "color": "#db2777"},
                     "hovertemplate": "%{text}: %{x:.2f}x, top-1 %{customdata:.1%}<extra></extra>",
                     "customdata": [m["top1"] for m in measured]})
    sub = "lines: % of the recorded attention mass by tier (replayed policy)<br>◆ ✕: measured vs the full cache"
    lay = _layout(f"{QUALITY_TITLE}<br><sup>{sub}</sup>", height=400,
                  xaxis={"title": {"text": "ratio vs a 16-bit cache (higher = less memory)", "standoff": 8}, "type": "log",
                         "automargin": True,
                         "range": [math.log10(1.2), math.log10(16)], "tickvals": [1.5, 2, 3, 4, 6, 8, 12, 16],
                         "ticktext": ["1.5x", "2x", "3x", "4x", "6x", "8x", "12x", "16x"], "tickangle": 0,
                         "ticks": "outside"},
                  yaxis={"title": {"text": "% of the attention mass"}, "range": [-4, 104], "zeroline": False},
                  legend={"orientation": "h", "x": 0, "yref": "container", "y": 0, "yanchor": "bottom", "font": {"size": 11}})
    lay["title"]["font"] = {"size": 13}
    if measured:
        top = max([0.05] + [m["kl"] for m in measured] + [1 - m["top1"] for m in measured])
        lay["yaxis2"] = {"overlaying": "y", "side": "right", "title": {"text": "KL (nats) · 1 − top-1"},
                         "range": [0, 1.15 * top], "showgrid": False, "rangemode": "tozero"}
    lay["margin"] = {"l": 56, "r": 64 if measured else 16, "t": 78, "b": 130}
    if max(x) < 1.01 * min(x):  # a fixed-bit policy (uniform-int4 ...): the target ratio does not move it
        lay.setdefault("annotations", []).append(
            {"x": 0.5, "y": 0.5, "xref": "paper", "yref": "paper", "showarrow": False, "font": {"size": 11},
             "text": f"this policy's ratio does not follow a target: {min(x):.2f}x at every target",
             "bgcolor": "rgba(255,255,255,0.85)"})
    if run_ratio:
        lay["shapes"] = [{"type": "line", "x0": run_ratio, "x1": run_ratio, "y0": 0, "y1": 1, "yref": "paper",
                          "line": {"color": "#0f172a", "width": 1, "dash": "dot"}}]
        lay.setdefault("annotations", []).append({"x": math.log10(run_ratio), "y": 0.99, "yref": "paper", "text": f" this run {run_ratio:.2f}x",
                               "showarrow": False, "yanchor": "top", "xanchor": "left", "font": {"size": 10},
                               "bgcolor": "rgba(255,255,255,0.8)"})
    return {"data": data, "layout": lay}


def measured_md(m: dict | None) -> str:
    """The result of Measure quality in one paragraph."""
    if not m:
        return ""
    return (f"<div class='measure'><b>Measured</b> ({html.escape(m['label'])}, {m['tokens']} generated tokens teacher-forced through a full "
            f"cache and through this setting's cache): <span id='measured-kl' data-kl='{m['kl']!r}'>mean "
            f"KL(full‖setting) {m['kl']:.5f}</span> nats/token · <span id='measured-top1' data-top1='{m['top1_count']}' "
            f"data-tokens='{m['tokens']}'>top-1 agreement {100 * m['top1']:.2f}%</span> "
            f"({m['top1_count']}/{m['tokens']}) · ratio {m['ratio']:.2f}x · ppl {m['ppl']:.3f} vs {m['ppl_full']:.3f} "
            f"with the full cache ({m['seconds']:.1f} s)</div>")


