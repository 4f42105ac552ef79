"""Plotly figure builders: pure functions from snapshot dicts (``CompressedCache.snapshot()``, a
trace frame or ``agacc.trace.replay``) to Plotly figure specs.

They return plain dicts in Plotly's JSON schema (``{"data": [...], "layout": {...}}``): valid input
for ``plotly.graph_objects.Figure(spec)`` (``to_figure``) and cheap to send. Building a
``go.Figure`` validates every attribute and costs ~40 ms per heatmap on a small CPU; the dict and
``json.dumps`` cost ~1 ms, which is what keeps the plots live while tokens stream.
"""
from __future__ import annotations

import json
import math

from agacc.tiers import PRUNED, TIER_CONTAINER
from components.theme import TIER_COLORS, TIER_LABELS

MIB = 2 ** 20
HEIGHT = 300
_MARGIN = {"l": 56, "r": 16, "t": 40, "b": 40}
_FONT = {"family": "Inter, system-ui, sans-serif", "size": 12}


def _layout(title: str, **kw) -> dict:
    lay = {"title": {"text": title, "x": 0.01, "xanchor": "left", "font": {"size": 14}}, "height": HEIGHT,
           "margin": dict(_MARGIN), "font": _FONT, "template": "plotly_white", "uirevision": title.split(" ")[0]}
    lay.update(kw)
    return lay


def _empty(title: str, message: str = "generate to see the cache") -> dict:
    return {"data": [], "layout": _layout(title, xaxis={"visible": False}, yaxis={"visible": False},
                                          annotations=[{"text": message, "showarrow": False, "x": 0.5, "y": 0.5,
                                                        "xref": "paper", "yref": "paper", "font": {"size": 13, "color": "#64748b"}}])}


def _block_axis(snap: dict) -> tuple[list[int], dict, dict]:
    nb = len(snap["tier"][0]) if snap.get("tier") else 0
    x = list(range(nb))
    xaxis = {"title": {"text": f"block ({snap.get('block_size', '?')} tokens each)"}, "zeroline": False}
    yaxis = {"title": {"text": "layer"}, "autorange": "reversed", "zeroline": False}
    return x, xaxis, yaxis


def importance_heatmap(snap: dict | None, config: dict | None = None) -> dict:
    """Layers x blocks of normalised block importance (log colour scale; blank = hot, not yet scored).
    The colour bar marks the thresholds tau_e, tau_l, tau_h of ``config`` (times the fitted scale)."""
    title = "Importance (normalised block score)"
    if not snap or not snap.get("importance") or not snap["importance"][0]:
        return _empty(title)
    imp = snap["importance"]
    z, text = [], []
    for row in imp:
        z.append([math.log10(max(v, 1e-4)) if v is not None else None for v in row])
        text.append([f"{v:.3g}" if v is not None else "hot" for v in row])
    x, xaxis, yaxis = _block_axis(snap)
    flat = [v for row in z for v in row if v is not None]
    lo, hi = (min(flat), max(flat)) if flat else (-1.0, 1.0)
    ticks = {}
    for v in (0.01, 0.1, 1, 10, 100, 1000):
        if lo - 0.5 <= math.log10(v) <= hi + 0.5:
            ticks[math.log10(v)] = f"{v:g}"
    if config:
        scale = snap.get("threshold_scale") or 1.0
        span = max(1.0, hi - lo)
        marks = []  # (log10 position, label), labels of thresholds too close to each other merged
        for key, sym in (("tau_e", "τe"), ("tau_l", "τl"), ("tau_h", "τh")):
            t = config.get(key)
            if t and t * scale > 0:
                lt, label = math.log10(t * scale), f"{sym} {t * scale:.3g}"
                if marks and lt - marks[-1][0] < 0.08 * span:
                    marks[-1] = ((marks[-1][0] + lt) / 2, f"{marks[-1][1]}, {label}")
                else:
                    marks.append((lt, label))
        for lt, _ in marks:
            for d in [d for d in ticks if abs(d - lt) < 0.2 * span]:
                del ticks[d]  # a decade label too close to a threshold label would overlap it
        ticks.update(dict(marks))
    trace = {"type": "heatmap", "z": z, "x": x, "y": list(range(len(z))), "text": text,
             "colorscale": "Viridis", "zmin": lo, "zmax": hi if hi > lo else lo + 1, "hoverongaps": False,
             "colorbar": {"title": {"text": "score", "side": "right"}, "tickvals": list(ticks),
                          "ticktext": list(ticks.values()), "thickness": 12, "len": 1, "y": 0.5, "yanchor": "middle"},
             "hovertemplate": "layer %{y}, block %{x}<br>importance %{text}<extra></extra>"}
    return {"data": [trace], "layout": _layout(title, xaxis=xaxis, yaxis=yaxis)}


def _tier_colorscale() -> list:
    """Discrete colour scale for codes -1..5 mapped to z = code + 1 in [0, 6]."""
    n = len(TIER_COLORS)
    scale = []
    for i, code in enumerate(sorted(TIER_COLORS)):
        c = TIER_COLORS[code][1]
        scale.append([i / n, c])
        scale.append([(i + 1) / n, c])
    return scale


def tier_map(snap: dict | None) -> dict:
    """Layers x blocks of tiers, categorical colours, with a legend
    (hot / full / int8 / int4 / int3 / int2 / pruned / evicted)."""
    title = "Tier per layer and block"
    if not snap or not snap.get("tier") or not snap["tier"][0]:
        return _empty(title)
    tiers, bits = snap["tier"], snap.get("bits")
    keep = snap.get("keep")
    x, xaxis, yaxis = _block_axis(snap)
    z = [[int(t) + 1 for t in row] for row in tiers]
    text = []
    for li, row in enumerate(tiers):
        r = []
        for b, t in enumerate(row):
            s = TIER_COLORS[int(t)][0]
            if bits is not None and int(t) in TIER_CONTAINER:
                s += f", {bits[li][b]} bits"
            elif keep is not None and int(t) == PRUNED:
                s += f", {bits[li][b] if bits else '?'} bits, keeps {keep[li][b]}"
            r.append(s)
        text.append(r)
    data = [{"type": "heatmap", "z": z, "x": x, "y": list(range(len(z))), "text": text,
             "colorscale": _tier_colorscale(), "zmin": 0, "zmax": len(TIER_COLORS), "showscale": False,
             "xgap": 1 if len(x) <= 96 else 0, "ygap": 1,
             "hovertemplate": "layer %{y}, block %{x}<br>%{text}<extra></extra>"}]
    for code in sorted(TIER_COLORS):  # legend entries: one square marker per tier, no data
        data.append({"type": "scatter", "x": [None], "y": [None], "mode": "markers", "name": TIER_LABELS[code],
                     "marker": {"symbol": "square", "size": 12, "color": TIER_COLORS[code][1]},
                     "showlegend": True, "hoverinfo": "skip"})
    # the legend under the plot, never beside it: at a narrow width a side legend takes the plot's room
    # (or covers it); Plotly grows the bottom margin to fit it (margin.autoexpand)
    lay = _layout(title, xaxis=xaxis, yaxis=yaxis, height=HEIGHT + 80,
                  legend={"orientation": "h", "x": 0, "xanchor": "left", "yref": "container", "y": 0, "yanchor": "bottom",
                          "font": {"size": 11}, "itemclick": False, "itemdoubleclick": False})
    lay["margin"] = dict(_MARGIN, b=120)
    return {"data": data, "layout": lay}


def bits_map(snap: dict | None) -> dict:
    """Layers x blocks of code bits (16 = full precision / hot, 0 = evicted)."""
    title = "Bits per element"
    if not snap or not snap.get("bits") or not snap["bits"][0]:
        return _empty(title)
    bits = snap["bits"]
    tiers = snap.get("tier")
    x, xaxis, yaxis = _block_axis(snap)
    z = [[int(b) for b in row] for row in bits]
    text = [[TIER_COLORS[int(t)][0] for t in row] for row in tiers] if tiers else None
    trace = {"type": "heatmap", "z": z, "x": x, "y": list(range(len(z))),
             "colorscale": [[0, "#7f1d1d"], [0.0625, "#f59e0b"], [0.25, "#a3e635"], [0.5, "#22c55e"], [1, "#1e3a8a"]],
             "zmin": 0, "zmax": 16, "xgap": 1 if len(x) <= 96 else 0, "ygap": 1,
             "colorbar": {"title": {"text": "bits", "side": "right"}, "tickvals": [0, 2, 4, 8, 16], "thickness": 12,
                          "len": 1, "y": 0.5, "yanchor": "middle"},
             "hovertemplate": "layer %{y}, block %{x}<br>%{z} bits (%{text})<extra></extra>"}
    if text is not None:
        trace["text"] = text
    return {"data": [trace], "layout": _layout(title, xaxis=xaxis, yaxis=yaxis)}


def memory_chart(steps: list[dict] | None, replayed: list[dict] | None = None, marker_step: int | None = None) -> dict:
    """KV bytes held vs a 16-bit cache of the same tokens over the decode steps; the gap is the
    bytes saved. ``steps``: per-step records {i, bytes, bytes_fp16[, host_bytes]}; ``replayed``:
    {step, bytes, bytes_fp16} of a policy replay (dashed); ``marker_step``: a vertical line (replay)."""
    title = "KV-cache memory"
    if not steps:
        return _empty(title)
    x = [s["i"] for s in steps]
    held = [s["bytes"] / MIB for s in steps]
    fp16 = [s["bytes_fp16"] / MIB for s in steps]
    last = steps[-1]
    saved = (last["bytes_fp16"] - last["bytes"]) / MIB
    ratio = last["bytes_fp16"] / max(1, last["bytes"])
    data = [
        {"type": "scatter", "x": x, "y": held, "name": "held (AGACC)", "mode": "lines",
         "line": {"color": "#2563eb", "width": 2.5}, "hovertemplate": "step %{x}: %{y:.3f} MiB<extra>held</extra>"},
        {"type": "scatter", "x": x, "y": fp16, "name": "16-bit cache", "mode": "lines", "fill": "tonexty",
         "fillcolor": "rgba(34,197,94,0.15)", "line": {"color": "#64748b", "width": 1.5, "dash": "dot"},
         "hovertemplate": "step %{x}: %{y:.3f} MiB<extra>16-bit</extra>"},
    ]
    host = [s.get("host_bytes", 0) / MIB for s in steps]
    if any(host):
        data.append({"type": "scatter", "x": x, "y": host, "name": "host copy", "mode": "lines",
                     "line": {"color": "#a855f7", "width": 1, "dash": "dash"}})
    if replayed:
        data.append({"type": "scatter", "x": [r["step"] for r in replayed], "y": [r["bytes"] / MIB for r in replayed],
                     "name": "replayed policy", "mode": "lines+markers", "line": {"color": "#f97316", "dash": "dash"},
                     "marker": {"size": 5}, "hovertemplate": "step %{x}: %{y:.3f} MiB<extra>replayed</extra>"})
    sub = (f"{last['bytes'] / MIB:.2f} MiB held vs {last['bytes_fp16'] / MIB:.2f} MiB at 16 bits: "
           + (f"{saved:.2f} MiB saved" if saved >= 0 else f"{-saved:.2f} MiB more") + f" ({ratio:.2f}x)")
    lay = _layout(f"{title}<br><sup>{sub}</sup>", xaxis={"title": {"text": "generated tokens"}},
                  yaxis={"title": {"text": "MiB"}, "rangemode": "tozero"},
                  legend={"orientation": "h", "x": 0, "yref": "container", "y": 0, "yanchor": "bottom"})
    lay["margin"] = dict(_MARGIN, b=100, t=56)
    if marker_step is not None:
        lay["shapes"] = [{"type": "line", "x0": marker_step, "x1": marker_step, "y0": 0, "y1": 1, "yref": "paper",
                          "line": {"color": "#0f172a", "width": 1, "dash": "dot"}}]
    return {"data": data, "layout": lay}


def compare_chart(steps: list[dict] | None, diverged_at: int | None = None) -> dict:
    """Per-step KL(full || compressed) and top-1 agreement of the lockstep comparison."""
    title = "Full cache vs compressed, per step"
    steps = [s for s in (steps or []) if "kl" in s]
    if not steps:
        return _empty(title, "tick 'compare with full cache' and generate")
    x = [s["i"] for s in steps]
    agree = [1 if s["agree"] else 0 for s in steps]
    data = [
        {"type": "bar", "x": x, "y": [s["kl"] for s in steps], "name": "KL (nats)", "marker": {"color": "#6366f1"},
         "hovertemplate": "step %{x}: KL %{y:.4f}<extra></extra>"},
        {"type": "scatter", "x": x, "y": agree, "name": "top-1 agrees", "mode": "markers", "yaxis": "y2",
         "marker": {"color": ["#16a34a" if a else "#dc2626" for a in agree], "size": 7, "symbol": "diamond"},
         "hovertemplate": "step %{x}: %{y}<extra>agree</extra>"},
    ]
    rate = sum(agree) / len(agree)
    kls = [s["kl"] for s in steps]
    sub = f"top-1 agreement {100 * rate:.0f}%, mean KL {sum(kls) / len(kls):.4f} nats"
    lay = _layout(f"{title}<br><sup>{sub}</sup>", xaxis={"title": {"text": "generated tokens"}},
                  yaxis={"title": {"text": "KL (nats)"}, "rangemode": "tozero"},
                  yaxis2={"overlaying": "y", "side": "right", "range": [-0.2, 1.2], "tickvals": [0, 1],
                          "ticktext": ["no", "yes"], "showgrid": False},
                  legend={"orientation": "h", "x": 0, "yref": "container", "y": 0, "yanchor": "bottom"})
    lay["margin"] = dict(_MARGIN, b=100, r=40, t=56)
    if diverged_at is not None:
        lay["shapes"] = [{"type": "line", "x0": diverged_at, "x1": diverged_at, "y0": 0, "y1": 1, "yref": "paper",
                          "line": {"color": "#dc2626", "width": 1.5, "dash": "dash"}}]
        lay["annotations"] = [{"x": diverged_at, "y": 1, "yref": "paper", "text": "first divergence",
                               "showarrow": False, "yanchor": "bottom", "font": {"color": "#dc2626", "size": 11}}]
    return {"data": data, "layout": lay}


def to_figure(spec: dict):
    """The spec as a validated ``plotly.graph_objects.Figure`` (exports, tests)."""
    import plotly.graph_objects as go

    return go.Figure(spec)


def to_json(spec: dict) -> str:
    return json.dumps(spec, allow_nan=False, separators=(",", ":"))


def plotly_js() -> str:
    """plotly.js itself (from the plotly package, about 4.8 MB), to embed in a page that must work offline."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def figures_html(specs: dict[str, dict], extra_html: str = "", title: str = "AGACC run") -> str:
    """One standalone HTML page with every figure and optional extra HTML. plotly.js is embedded in the
    page (no CDN): it opens offline, in a classroom or on a laptop."""
    import html as _html

    title = _html.escape(title)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>",
             f"<script>{plotly_js()}</script></head><body style='font-family:sans-serif'>",
             f"<h2>{title}</h2>"]
    for i, (name, spec) in enumerate(specs.items()):
        parts.append(f"<div id='fig{i}' style='max-width:1100px'></div>")
        parts.append(f"<script>(function(f){{Plotly.newPlot('fig{i}', f.data, f.layout);}})({to_json(spec)});</script>")
    parts.append(extra_html)
    parts.append("</body></html>")
    return "\n".join(parts)
