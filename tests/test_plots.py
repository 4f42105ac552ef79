"""Figure builders, the token view and the control mapping: the figures hold the snapshot's numbers."""
from __future__ import annotations

import html
import json
import math
import re

import plotly.graph_objects as go
import pytest
import torch

import agacc
from agacc.presets import PRESETS
from components import controls, plots
from components.theme import TIER_COLORS
from components.token_view import block_consensus, css, render_token_view, token_codes


def _snap():
    """A synthetic snapshot: 3 layers x 5 blocks of 4 tokens, last block hot, one evicted run."""
    return {
        "step": 8, "seq_len": 19, "block_size": 4, "n_layers": 3, "reevaluations": 3, "threshold_scale": 1.0,
        "importance": [[5.0, 1.5, 0.05, 0.08, None], [3.0, 0.7, 0.3, 0.02, None], [2.5, 0.9, 0.1, 0.01, None]],
        "tier": [[0, 1, 6, 6, -1], [0, 4, 5, 6, -1], [0, 2, 6, 6, -1]],
        "bits": [[16, 8, 0, 0, 16], [16, 2, 2, 0, 16], [16, 4, 0, 0, 16]],
        "keep": [[64, 64, 0, 0, 64], [64, 64, 40, 0, 64], [64, 64, 0, 0, 64]],
        "markers": [[[2, 3]], [[3, 3]], [[2, 3]]],
        "token_importance": [float(i) / 10 for i in range(19)],
        "tier_names": ["full", "int8", "int4", "int3", "int2", "pruned", "evicted"],
        "memory": {"bytes": 1000, "bytes_fp16": 3000, "ratio": 3.0, "host_bytes": 0, "by_tier": {}},
    }


@pytest.fixture(scope="module")
def real_snapshot():
    """A snapshot of a real CompressedCache after one prefill of the embedded model."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = agacc.load_model(device="cpu")
    cfg = agacc.AGACCConfig.preset("agacc", block_size=16, recent_window=32, tau_e=0.5, tau_l=0.9, tau_h=1.6)
    text = "The lighthouse keeper left a parcel at the post office before the storm. " * 8
    ids = tok(text, return_tensors="pt")["input_ids"]
    cache = agacc.CompressedCache(model.config, cfg)
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    torch.set_num_threads(old)
    return cache.snapshot(), [tok.decode([i]) for i in ids[0].tolist()]


def _valid(spec):
    fig = go.Figure(spec)  # raises on anything Plotly does not accept
    json.loads(plots.to_json(spec))
    return fig


@pytest.mark.parametrize("which", ["synthetic", "real"])
def test_importance_heatmap_holds_the_scores(which, real_snapshot):
    snap = _snap() if which == "synthetic" else real_snapshot[0]
    spec = plots.importance_heatmap(snap, snap.get("config") or {"tau_h": 2.0, "tau_l": 0.6, "tau_e": 0.15})
    fig = _valid(spec)
    hm = fig.data[0]
    for row_z, row_t, row_i in zip(hm.z, hm.text, snap["importance"]):
        for z, t, v in zip(row_z, row_t, row_i):
            if v is None:
                assert z is None and t == "hot"
            else:
                assert z == pytest.approx(math.log10(max(v, 1e-4)))
                assert float(t) == pytest.approx(v, rel=1e-2)
    ticks = " ".join(hm.colorbar.ticktext)
    assert "τh" in ticks and "τl" in ticks and "τe" in ticks


@pytest.mark.parametrize("which", ["synthetic", "real"])
def test_tier_map_is_categorical_with_legend(which, real_snapshot):
    snap = _snap() if which == "synthetic" else real_snapshot[0]
    fig = _valid(plots.tier_map(snap))
    hm = fig.data[0]
    assert [list(r) for r in hm.z] == [[t + 1 for t in row] for row in snap["tier"]]
    names = [d.name for d in fig.data[1:]]
    for want in ("full", "int8", "int4", "int3", "int2", "pruned", "evicted", "hot"):
        assert any(n.startswith(want) for n in names), want
    # each category's z maps to its own colour in the discrete scale
    scale = [tuple(x) for x in hm.colorscale]
    n = len(TIER_COLORS)
    for i, code in enumerate(sorted(TIER_COLORS)):
        mid = (i + 0.5) / n
        col = next(c for (lo, c), (hi, _) in zip(scale, scale[1:]) if lo <= mid <= hi)
        assert col == TIER_COLORS[code][1]
    assert hm.zmin == 0 and hm.zmax == n and not hm.showscale
    if which == "synthetic":
        assert "int2, 2 bits" in hm.text[1][1] and "keeps 40" in hm.text[1][2]


def test_bits_map_holds_the_bits(real_snapshot):
    for snap in (_snap(), real_snapshot[0]):
        fig = _valid(plots.bits_map(snap))
        assert [list(r) for r in fig.data[0].z] == snap["bits"]


def test_memory_chart_holds_the_bytes():
    steps = [{"i": i, "bytes": 1000 * (i + 1), "bytes_fp16": 3000 * (i + 1), "host_bytes": 0} for i in range(5)]
    replayed = [{"step": 0, "bytes": 800}, {"step": 4, "bytes": 4000}]
    fig = _valid(plots.memory_chart(steps, replayed, marker_step=2))
    held, fp16, rep = fig.data[0], fig.data[1], fig.data[2]
    assert list(held.y) == pytest.approx([s["bytes"] / 2 ** 20 for s in steps])
    assert list(fp16.y) == pytest.approx([s["bytes_fp16"] / 2 ** 20 for s in steps])
    assert fp16.fill == "tonexty"  # the shaded gap = bytes saved
    assert list(rep.x) == [0, 4] and rep.y[1] == pytest.approx(4000 / 2 ** 20)
    saved = (15000 - 5000) / 2 ** 20
    assert f"{saved:.2f} MiB saved" in fig.layout.title.text and "(3.00x)" in fig.layout.title.text
    assert fig.layout.shapes[0].x0 == 2


def test_compare_chart():
    steps = [{"i": 0, "kl": 0.0, "agree": True}, {"i": 1, "kl": 0.5, "agree": False}, {"i": 2}]
    fig = _valid(plots.compare_chart(steps, diverged_at=1))
    assert list(fig.data[0].y) == [0.0, 0.5] and list(fig.data[1].y) == [1, 0]
    assert "agreement 50%" in fig.layout.title.text and fig.layout.shapes[0].x0 == 1


def test_empty_figures_are_valid():
    for spec in (plots.importance_heatmap(None), plots.tier_map(None), plots.bits_map(None), plots.memory_chart([]),
                 plots.compare_chart(None)):
        _valid(spec)
        assert spec["layout"]["annotations"]


def test_figures_html_embeds_every_figure():
    specs = {"a": plots.tier_map(_snap()), "b": plots.memory_chart([{"i": 0, "bytes": 1, "bytes_fp16": 2}])}
    page = plots.figures_html(specs, "<p>tokens</p>")
    assert page.count("Plotly.newPlot") == 2 and plots.to_json(specs["a"]) in page and "<p>tokens</p>" in page


def test_token_view_colours_and_markers():
    snap = _snap()
    tokens = [f"t{i}" for i in range(19)] + ["<out>", "x"]
    page = render_token_view(tokens, 15, snap, layer=0)
    # layer 0: blocks 2-3 (tokens 8-15) evicted: one marker for 8..14 (the prompt ends at 15), one for 15
    assert "⟪7 evicted⟫" in page and "⟪1 evicted⟫" in page
    assert "t9" not in re.sub(r"title='[^']*'", "", page)  # evicted text only in the marker's hover
    assert "▸ output" in page and "&lt;out&gt;" in page
    spans = re.findall(r"<span class='tv-t tier-(\w+)[^']*' title='([^']*)'>([^<]*)</span>", page)
    by_text = {t: (tier, html.unescape(title)) for tier, title, t in spans}
    assert by_text["t0"][0] == "full" and by_text["t5"][0] == "int8"
    assert "token importance" not in by_text["t5"][1] and "block importance 1.5" in by_text["t5"][1]
    assert by_text["t17"][0] == "hot"
    assert by_text["x"][0] == "hot" and "new" in by_text["x"][1]  # past the snapshot: generated since
    # all layers: the most common tier per block, the split on hover, token importance on hover
    page_all = render_token_view(tokens, 15, snap, layer=None)
    spans = re.findall(r"<span class='tv-t tier-(\w+)[^']*' title='([^']*)'>([^<]*)</span>", page_all)
    by_text = {t: (tier, html.unescape(title)) for tier, title, t in spans}
    assert "layers: int8 1 · int4 1 · int2 1" in by_text["t5"][1]
    assert "token importance 0.5" in by_text["t5"][1]
    assert [c for c, _, _ in block_consensus(snap)] == [0, 4, 6, 6, -1]
    assert token_codes(snap, 21)[8:16] == [6] * 8
    assert ".tier-evicted" in css() and ".tier-hot" in css()


def test_token_view_real_snapshot(real_snapshot):
    snap, tokens = real_snapshot
    page = render_token_view(tokens, len(tokens), snap)
    n_spans = len(re.findall(r"class='tv-t ", page))
    evicted = sum(int(n) for n in re.findall(r"⟪(\d+) evicted⟫", page))
    assert n_spans + evicted == len(tokens)
    assert render_token_view([], 0, None).startswith("<div class='tv tv-empty'>")


def test_controls_map_to_configs():
    for name in controls.preset_names():
        cfg = agacc.AGACCConfig.preset(name)
        back = controls.config_from_values(name, controls.preset_values(name))
        assert back == cfg.with_overrides(n_w=max(cfg.n_w, cfg.n_r))
    v = controls.preset_values("agacc")
    v.update(use_target=True, target_ratio=3.0, n_r=32)
    cfg = controls.config_from_values("agacc", v)
    assert cfg.target_ratio == 3.0 and cfg.n_w >= 32
    v = controls.preset_values("agacc")
    v["tau_l"] = v["tau_h"] + 1
    with pytest.raises(ValueError, match="tau_h > tau_l > tau_e"):
        controls.config_from_values("agacc", v)
    v = controls.preset_values("agacc")
    v["block_size"] = 24
    with pytest.raises(ValueError, match="power of two"):
        controls.config_from_values("agacc", v)
    with pytest.raises(ValueError, match="unknown method preset"):
        controls.config_from_values("nope", controls.preset_values("agacc"))
    assert controls.values_dict(controls.values_list(v)) == v
    v = controls.preset_values("agacc")
    assert controls.config_from_values("agacc", dict(v, spill=0.5)).spill == 0.5
    assert controls.config_from_values("agacc", dict(v, spill=None)).spill == agacc.AGACCConfig.preset("agacc").spill
    assert controls.config_from_values("h2o", {k: x for k, x in v.items() if k != "spill"}).spill == PRESETS["h2o"].spill
    with pytest.raises(ValueError, match="spill"):
        controls.config_from_values("agacc", dict(v, spill=1.5))


def test_controls_follow_the_config_metadata():
    """The knobs are the config's ui fields (target_ratio as a checkbox + slider), in today's display order
    and with today's element ids; a value left out keeps the preset's."""
    import gradio as gr

    from agacc.config import field_info, ui_fields

    assert set(controls.FIELDS) == set(ui_fields()) | {"use_target"}
    assert controls.FIELDS == ["tau_h", "tau_l", "tau_e", "spill", "use_target", "target_ratio", "b_min", "b_max",
                               "p_max", "rotate", "alpha", "block_size", "n_r", "recent_window", "host_copy"]
    v = controls.values_from_config(agacc.AGACCConfig.preset("agacc", target_ratio=3.0))
    assert v["use_target"] is True and v["target_ratio"] == 3.0
    assert controls.config_from_values("agacc", dict(v, use_target=False)).target_ratio is None
    base = agacc.AGACCConfig.preset("h2o")
    assert controls.config_from_values("h2o", {}) == base.with_overrides(n_w=max(base.n_w, base.n_r))
    with pytest.raises(ValueError, match="invalid value: b_min"):
        controls.config_from_values("agacc", {"b_min": "many"})
    with gr.Blocks():
        knobs = controls.build_knobs("agacc")
    assert list(knobs) == controls.FIELDS
    for name, comp in knobs.items():
        assert comp.elem_id == f"knob-{name.replace('_', '-')}"
        kind = field_info(name)["type"] if name in ui_fields() else "bool"
        want = gr.Checkbox if kind == "bool" else gr.Radio if name == "block_size" else gr.Slider
        assert isinstance(comp, want), name
    assert knobs["block_size"].choices == [(str(b), b) for b in field_info("block_size")["choices"]]
    assert knobs["tau_h"].label == field_info("tau_h")["ui"].label and knobs["tau_h"].maximum == 1000.0
