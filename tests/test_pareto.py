"""bench/pareto.py: the Pareto front (hand-worked cases, both directions, ties, a method with one
point), the pooling of results.json into (measured ratio, score) points, and the results page's
"Pareto plots" section rendered by ``bench.make_results --render-only`` from a tiny hand-made JSON:
the PNGs are written and each front line names exactly the hand-computed front."""
from __future__ import annotations

import json
import math
import re
import sys

import pytest

from bench.make_results import main
from bench.pareto import Point, family, front_line, pareto_front, render_section, task_points


# --- pareto_front ---------------------------------------------------------------------------------
def test_dominated_points_dropped_higher_is_better():
    pts = [(2, 0.8, "a"), (4, 0.8, "b"), (4, 0.6, "c"), (8, 0.2, "d"), (3, 0.9, "e")]
    # a: b holds less memory at the same score (and e beats it in both); c: b, same ratio, better score
    assert pareto_front(pts) == [(3, 0.9, "e"), (4, 0.8, "b"), (8, 0.2, "d")]


def test_direction_lower_is_better_and_reversed():
    pts = [(2, 0.5), (2, -0.3), (4, 1.0), (4, 3.0), (8, 14.0), (6, 20.0)]
    # ppl change in %: lower is better
    assert pareto_front(pts, higher_is_better=False) == [(2, -0.3), (4, 1.0), (8, 14.0)]
    # the same points read as "higher is better": (6, 20) beats everything at ratio <= 6
    assert pareto_front(pts, higher_is_better=True) == [(6, 20.0), (8, 14.0)]


def test_ties_all_kept_but_equal_score_at_less_memory_dropped():
    pts = [(4, 1.0, "x"), (4, 1.0, "y"), (4, 0.8, "z"), (2, 1.0, "w")]
    assert pareto_front(pts) == [(4, 1.0, "x"), (4, 1.0, "y")]
    assert pareto_front([(4, 1.0, "x"), (4, 1.0, "y")], higher_is_better=False) == [(4, 1.0, "x"), (4, 1.0, "y")]


def test_single_point_and_empty():
    assert pareto_front([(3.3, 0.4, "only")]) == [(3.3, 0.4, "only")]
    assert pareto_front([]) == []


def test_method_with_a_single_point_on_the_front():
    # uniform-int4 (one point, a fixed bit width) sits between two points of a curve and beats its left one
    pts = [Point(2.0, 1.0, "agacc@2", "agacc"), Point(4.0, 0.5, "agacc@4", "agacc"),
           Point(3.0, 1.0, "uniform-int4", "uniform"), Point(3.5, 0.2, "h2o@4", "h2o")]
    assert [p.label for p in pareto_front(pts)] == ["uniform-int4", "agacc@4"]
    assert front_line("needle", pts) == "uniform-int4 (3.00x, 1.00), agacc@4 (4.00x, 0.50)"


def test_family():
    assert family("agacc@8") == "agacc"
    assert family("h2o@4,recent_window=32") == "h2o"
    assert family("uniform-int4") == "uniform"
    assert family("hf-quantized:quanto-2") == "hf-quantized:quanto"
    assert family("kvpress:snapkv@4,window_size=32") == "kvpress:snapkv"
    assert family("full") == "full"


# --- a tiny results.json --------------------------------------------------------------------------
KV16 = 1000


def _res(preset, kv, score, **extra):
    return {"preset": preset, "kv_bytes": kv, "kv_bytes_fp16": KV16, "score": score, "decoded_tokens": 5,
            "decode_s": 0.5, "build_s": 0.1, "prefill_chunk": 512, **extra}


def _ppl(preset, kv, nll):
    return _res(preset, kv, min(1.0, math.exp((20.0 - nll) / 10)), nll=nll, nll_full=20.0, tokens=10,
                top1=0.9, kl=0.01)


def tiny_results() -> dict:
    # needle, two samples: (bytes held, score) per sample -> pooled ratio 2000 / sum(bytes), mean score
    needle = {"full": [(2000, 1), (2000, 1)], "agacc@2": [(500, 1), (500, 1)],
              "agacc@4": [(200, 1), (300, 0)],  # 4.00x pooled (per-sample ratios 5 and 3.33 would average 4.17)
              "h2o@2": [(400, 1), (400, 0)], "h2o@4": [(200, 0), (200, 0)], "uniform-int4": [(300, 1), (300, 1)]}
    samples = [{"task": "needle", "context_tokens": 1024, "sample": i, "seconds": 1.0,
                "results": [_res(p, v[i][0], float(v[i][1]), depth=0.5) for p, v in needle.items()]} for i in range(2)]
    # ppl, one window of 10 tokens, nll_full 20: change = 100 * (exp((nll - 20) / 10) - 1)
    ppl = {"full": (2000, 20.0), "agacc@2": (500, 20.0), "agacc@4": (250, 21.0), "h2o@2": (400, 20.5),
           "h2o@4": (200, 23.0), "uniform-int4": (300, 22.0)}
    samples.append({"task": "ppl", "context_tokens": 1024, "sample": 0, "seconds": 1.0,
                    "results": [_ppl(p, kv, nll) for p, (kv, nll) in ppl.items()]})
    meta = {"text": "t", "decode_tokens": 64, "ppl_windows": 1, "depths": [0.5], "ratios": [2, 4],
            "runs": [{"command": "test", "lengths": [1024], "prefill_chunk": 512, "torch_threads": 1,
                      "started": "x", "finished": "y", "minutes": 0.1}]}
    return {"meta": meta, "samples": samples}


# hand-computed: needle 1024
#   agacc@2 2.00x 1.0 | h2o@2 2.50x 0.5 | uniform-int4 3.33x 1.0 | agacc@4 4.00x 0.5 | h2o@4 5.00x 0.0
#   uniform-int4 beats agacc@2 (more compression, same score); agacc@4 beats h2o@2 (same score)
NEEDLE_FRONT = ["uniform-int4 (3.33x, 1.00)", "agacc@4 (4.00x, 0.50)", "h2o@4 (5.00x, 0.00)"]
# ppl 1024 (lower is better): agacc@2 2.00x +0.00% | h2o@2 2.50x +5.13% | uniform-int4 3.33x +22.14%
#   | agacc@4 4.00x +10.52% | h2o@4 5.00x +34.99%; uniform-int4 is beaten by agacc@4
PPL_FRONT = ["agacc@2 (2.00x, +0.00%)", "h2o@2 (2.50x, +5.13%)", "agacc@4 (4.00x, +10.52%)", "h2o@4 (5.00x, +34.99%)"]


def test_task_points_pools_bytes_and_scores():
    points, reference = task_points(tiny_results())
    needle = {p.label: (round(p.ratio, 4), p.score) for p in points[("needle", 1024, "query-aware")]}
    assert needle == {"agacc@2": (2.0, 1.0), "agacc@4": (4.0, 0.5), "h2o@2": (2.5, 0.5), "h2o@4": (5.0, 0.0),
                      "uniform-int4": (3.3333, 1.0)}
    ppl = {p.label: round(p.score, 2) for p in points[("ppl", 1024, "query-aware")]}
    assert ppl == {"agacc@2": 0.0, "agacc@4": 10.52, "h2o@2": 5.13, "h2o@4": 34.99, "uniform-int4": 22.14}
    assert reference == {("needle", 1024, "query-aware"): 1.0, ("ppl", 1024, "query-aware"): 0.0}


def _front_lines(md: str, task: str) -> dict:
    """'- <length>: on the front: a (1.00x, 0.50), b (...)' under '### Pareto: <task>' -> {length: [items]}."""
    sec = md.split(f"### Pareto: {task}\n", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    return {m.group(1): [x.strip() for x in re.findall(r"[^,()]+ \([^)]*\)", m.group(2))]
            for m in re.finditer(r"^- (.+?): on the front: (.*)$", sec, re.M)}


def test_render_writes_pngs_and_names_the_hand_computed_front(tmp_path):
    pytest.importorskip("matplotlib")
    src = tmp_path / "results.json"
    src.write_text(json.dumps(tiny_results()))
    out = tmp_path / "docs" / "results.md"
    out.parent.mkdir()
    assert main(["--render-only", "--json", str(src), "--out", str(out), "--lengths", "1024",
                 "--tasks", "ppl", "needle", "--ratios", "2", "4"]) == 0
    md = out.read_text()
    for task in ("ppl", "needle"):
        png = out.parent / f"pareto_{task}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert 5_000 < png.stat().st_size < 150_000
        assert f"](pareto_{task}.png)" in md
    assert not (out.parent / "pareto_passkey.png").exists()  # not asked for
    assert md.index("## Pareto plots") < md.index("\n## ppl\n")
    assert _front_lines(md, "needle") == {"1024 tokens": NEEDLE_FRONT}
    assert _front_lines(md, "ppl") == {"1024 tokens": PPL_FRONT}


def test_two_protocols_one_front_each_and_skipped_rows_ignored(tmp_path):
    data = tiny_results()
    # query-agnostic re-run of the needle samples: only agacc@4 recovers (1.0 at 4x); a skipped external row
    for i in range(2):
        res = [_res(p, kv, sc, protocol="query-agnostic") for p, kv, sc in
               [("full", 2000, 1.0), ("agacc@4", 250, 1.0), ("h2o@4", 200, 0.0), ("kvpress:snapkv@4", 240, 0.0)]]
        res.append({"preset": "hf-quantized:quanto-4", "protocol": "query-agnostic", "score": None,
                    "skipped": "skipped: optimum-quanto is not installed"})
        data["samples"].append({"task": "needle", "context_tokens": 1024, "sample": 10 + i, "results": res})
    md = "\n".join(render_section(data, ["needle"], [1024], plot_dir=None))
    lines = _front_lines(md, "needle")
    assert lines == {"1024 tokens, query-aware": NEEDLE_FRONT,
                     "1024 tokens, query-agnostic": ["agacc@4 (4.00x, 1.00)", "h2o@4 (5.00x, 0.00)"]}
    if pytest.importorskip("matplotlib"):
        render_section(data, ["needle"], [1024, 2048], plot_dir=tmp_path)  # both line styles, a 'not run' panel
        assert (tmp_path / "pareto_needle.png").stat().st_size > 5_000


def test_without_matplotlib_no_png_but_the_front_lines(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    md = "\n".join(render_section(tiny_results(), ["needle"], [1024], plot_dir=tmp_path))
    assert not list(tmp_path.iterdir())
    assert "(plot not written: matplotlib is not installed" in md
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert _front_lines(md, "needle") == {"1024 tokens": NEEDLE_FRONT}
