"""Plotly figures for eval results: the score-vs-memory Pareto chart and the needle heatmap."""
from __future__ import annotations


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated (less or equal memory and higher or equal score, one strictly)."""
    front = []
    for i, (m, s) in enumerate(points):
        dominated = any((m2 <= m and s2 >= s) and (m2 < m or s2 > s) for j, (m2, s2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def pareto_figure(records: list[dict], title: str | None = None):
    """Score (y) vs KV memory in MB (x, log) per record; the Pareto front as a line."""
    import plotly.graph_objects as go

    fig = go.Figure()
    pts = [(r["kv_mb"], r["score"]) for r in records]
    by_preset: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_preset.setdefault(r["preset"], []).append(i)
    for p, idx in by_preset.items():
        fig.add_trace(go.Scatter(
            x=[records[i]["kv_mb"] for i in idx], y=[records[i]["score"] for i in idx], mode="markers", name=p,
            marker=dict(size=11, symbol="star" if p == "agacc" else "circle"),
            text=[f"{p}<br>ctx {records[i].get('context_tokens')}<br>ratio {records[i]['ratio']:.2f}x" for i in idx],
            hoverinfo="text+y"))
    front = sorted(pareto_front(pts), key=lambda i: pts[i][0])
    if front:
        fig.add_trace(go.Scatter(x=[pts[i][0] for i in front], y=[pts[i][1] for i in front], mode="lines",
                                 name="Pareto front", line=dict(dash="dot", color="gray")))
    task = records[0]["task"] if records else ""
    fig.update_layout(title=title or f"{task}: score vs KV-cache memory", xaxis_title="KV cache (MB, held)",
                      yaxis_title="score", xaxis_type="log", template="plotly_white")
    return fig


def needle_heatmap(records: list[dict], preset: str):
    """Score by context length (x) and needle depth (y) for one preset (needle / passkey grids)."""
    import plotly.graph_objects as go

    cells: dict[tuple[int, float], list[float]] = {}
    for r in records:
        if r["preset"] != preset:
            continue
        for s in r.get("per_sample", []):
            if "depth" in s:
                cells.setdefault((s.get("context_tokens") or r.get("context_tokens"), s["depth"]), []).append(s["score"])
    lengths = sorted({k[0] for k in cells})
    depths = sorted({k[1] for k in cells})
    z = [[(sum(cells[(n, d)]) / len(cells[(n, d)])) if (n, d) in cells else None for n in lengths] for d in depths]
    fig = go.Figure(go.Heatmap(z=z, x=[str(n) for n in lengths], y=[f"{100 * d:.0f}%" for d in depths],
                               zmin=0, zmax=1, colorscale="RdYlGn", colorbar=dict(title="score")))
    fig.update_layout(title=f"{preset}: needle retrieval by context length and depth", xaxis_title="context tokens",
                      yaxis_title="needle depth", template="plotly_white")
    return fig


def write_plot(records: list[dict], path: str) -> None:
    """HTML: the Pareto chart, then one heatmap per preset when the records have depths.
    PNG: the Pareto chart (needs kaleido)."""
    fig = pareto_figure(records)
    if path.lower().endswith(".html"):
        parts = [fig.to_html(full_html=False, include_plotlyjs=True)]
        if any("depth" in s for r in records for s in r.get("per_sample", [])):
            for p in dict.fromkeys(r["preset"] for r in records):
                parts.append(needle_heatmap(records, p).to_html(full_html=False, include_plotlyjs=False))
        with open(path, "w", encoding="utf-8") as f:
            f.write("<html><head><meta charset='utf-8'></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
        return
    try:
        fig.write_image(path)
    except Exception as e:  # kaleido missing or broken
        raise ValueError(f"cannot write {path} ({type(e).__name__}: {e}); use an .html path, or install kaleido for images") from e
