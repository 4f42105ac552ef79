"""bench/make_results.py's choice of what to run on a held sample (``to_run``): a whole sample when
nothing is held; with --redo only those presets; with --redo-missing-only also skipping what this
prefill chunk already produced, so a --redo run cut by its time budget continues instead of starting
over. Hand-worked cases."""
from __future__ import annotations

import pytest

from bench.make_results import main, merge, to_run

CONFIGS = [("full", None), ("h2o@2", None), ("h2o@4", None), ("snapkv@2", None), ("agacc@2", None)]


def held(*results):
    return {"results": [{"preset": p, "prefill_chunk": c} if c is not None else {"preset": p} for p, c in results]}


def names(todo):
    return [n for n, _ in todo]


def test_nothing_held_runs_everything():
    assert names(to_run(CONFIGS, None, ["h2o"])) == names(CONFIGS)


def test_redo_reruns_only_its_presets_at_every_ratio():
    h = held(("full", 512), ("h2o@2", 512), ("h2o@4", None), ("snapkv@2", None), ("agacc@2", 512))
    assert names(to_run(CONFIGS, h, ["h2o", "snapkv"])) == ["h2o@2", "h2o@4", "snapkv@2"]
    assert names(to_run(CONFIGS, h, [])) == []


def test_missing_only_skips_what_this_prefill_already_made():
    # a cut run: h2o@2 redone with chunks of 512, h2o@4 still from the one-prefill run (no record = 0)
    h = held(("full", 512), ("h2o@2", 512), ("h2o@4", None), ("snapkv@2", 0), ("agacc@2", 512))
    assert names(to_run(CONFIGS, h, ["h2o", "snapkv"], same_prefill=512)) == ["h2o@4", "snapkv@2"]
    assert names(to_run(CONFIGS, h, ["h2o", "snapkv"], same_prefill=0)) == ["h2o@2"]


def test_missing_only_needs_redo(capsys):
    with pytest.raises(SystemExit):
        main(["--resume", "--redo-missing-only"])
    assert "--redo-missing-only goes with --redo" in capsys.readouterr().err


def test_merge_takes_only_the_redo_presets_at_the_tasks_and_lengths_asked():
    """A split run's share: h2o's 4K passkey results come over, its 1K ones, snapkv's and the needle
    sample stay as held; the share's run is added once."""
    def sample(task, n, i, **scores):
        return {"task": task, "context_tokens": n, "sample": i,
                "results": [{"preset": p.replace("_", "@"), "score": v} for p, v in scores.items()]}
    done = {"meta": {"runs": [{"command": "a"}]}, "samples": [
        sample("passkey", 4096, 0, h2o_2=0.0, snapkv_2=0.0), sample("passkey", 1024, 0, h2o_2=0.0),
        sample("needle", 4096, 0, h2o_2=0.0)]}
    src = {"meta": {"runs": [{"command": "a"}, {"command": "b"}]}, "samples": [
        sample("passkey", 4096, 0, h2o_2=1.0, snapkv_2=1.0), sample("passkey", 1024, 0, h2o_2=1.0),
        sample("needle", 4096, 0, h2o_2=1.0), sample("passkey", 4096, 9, h2o_2=1.0)]}
    assert merge(done, src, ["h2o"], ["passkey"], [4096]) == 1
    scores = {(s["task"], s["context_tokens"], r["preset"]): r["score"] for s in done["samples"] for r in s["results"]}
    assert scores == {("passkey", 4096, "h2o@2"): 1.0, ("passkey", 4096, "snapkv@2"): 0.0,
                      ("passkey", 1024, "h2o@2"): 0.0, ("needle", 4096, "h2o@2"): 0.0}
    assert done["meta"]["runs"] == [{"command": "a"}, {"command": "b"}]


def test_merge_needs_redo(capsys):
    with pytest.raises(SystemExit):
        main(["--merge", "x.json"])
    assert "--merge goes with --redo" in capsys.readouterr().err


def test_another_protocol_runs_the_whole_sample_or_its_redo_presets():
    """Query-aware results held: a query-agnostic run of that sample runs everything (nothing of its
    protocol is held) or, with --redo, those presets; --redo-missing-only looks at its own protocol."""
    h = held(("full", 512), ("h2o@2", 512), ("h2o@4", 512), ("snapkv@2", 512), ("agacc@2", 512))
    assert names(to_run(CONFIGS, h, [], protocol="query-agnostic")) == names(CONFIGS)
    assert names(to_run(CONFIGS, h, ["h2o"], same_prefill=512, protocol="query-agnostic")) == ["h2o@2", "h2o@4"]
    h["results"].append({"preset": "h2o@2", "prefill_chunk": 512, "protocol": "query-agnostic"})
    assert names(to_run(CONFIGS, h, ["h2o"], same_prefill=512, protocol="query-agnostic")) == ["h2o@4"]
    assert names(to_run(CONFIGS, h, [], protocol="query-agnostic")) == []


def test_replace_keeps_the_other_protocol():
    from bench.make_results import replace

    h = {"results": [{"preset": "agacc@4", "score": 0.0}, {"preset": "agacc@4", "score": 0.0, "protocol": "query-agnostic"}]}
    replace(h, [{"preset": "agacc@4", "score": 1.0, "protocol": "query-agnostic"}])
    assert sorted((r.get("protocol", "-"), r["score"]) for r in h["results"]) == [("-", 0.0), ("query-agnostic", 1.0)]


def _page():
    """A hand-made page: needle at 1K, 4 samples; agacc@4 finds 4, kvpress:snapkv@4 2 (the same two also
    found by agacc), hf-quantized:quanto-4 misses the ratio (2.4x); query-agnostic: agacc@4 1 of 4,
    kvpress:tova@4 3 of 4; kvpress on ppl skipped."""
    def r(preset, score, ratio=4.0, **kw):
        return {"preset": preset, "score": score, "kv_bytes": 100, "kv_bytes_fp16": int(100 * ratio), "decoded_tokens": 1,
                "decode_s": 1.0, "build_s": 1.0, **kw}
    qa = "query-agnostic"
    samples = []
    for i in range(4):
        samples.append({"task": "needle", "context_tokens": 1024, "sample": i, "results": [
            r("full", 1.0, 0.5), r("agacc@4", 1.0), r("snapkv@4", 0.0), r("kvpress:snapkv@4", float(i < 2)),
            r("hf-quantized:quanto-4", 1.0, 2.4),
            r("agacc@4", float(i == 0), protocol=qa), r("kvpress:tova@4", float(i > 0), protocol=qa),
            {"preset": "kvpress:knorm@4", "skipped": "skipped: run bash scripts/setup_kvpress.sh", "protocol": qa}]})
    return {"meta": {"runs": [], "depths": [0.5], "decode_tokens": 64}, "samples": samples}


def test_cells_and_skips_per_protocol():
    from bench.make_results import cells, skips

    data = _page()
    aware, agnostic = cells(data), cells(data, "query-agnostic")
    assert aware[("needle", 1024, "agacc", 4.0)]["score"] == 1.0
    assert agnostic[("needle", 1024, "agacc", 4.0)]["score"] == 0.25
    assert agnostic[("needle", 1024, "kvpress:tova", 4.0)]["by_sample"] == {0: 0.0, 1: 1.0, 2: 1.0, 3: 1.0}
    assert ("needle", 1024, "kvpress:tova", 4.0) not in aware
    assert skips(data, "query-agnostic") == {("needle", 1024, "kvpress:knorm", 4.0): "skipped: run bash scripts/setup_kvpress.sh"}
    assert skips(data) == {}


def test_render_compares_agacc_with_the_external_methods_per_protocol():
    """Query-aware: against kvpress:snapkv@4 (quanto-4 holds more memory: not at equal bytes) the paired
    difference is +0.50 +- 1.96 * sd / 2 with sd of [0, 0, 1, 1] = 0.577 -> +-0.57: 'yes' (holds 0).
    Query-agnostic: agacc@4 against kvpress:tova@4: differences [1, -1, -1, -1], mean -0.50, sd 1.0 ->
    +-0.98: 'yes'. The skipped press is a row saying why."""
    from bench.make_results import render

    md = render(_page(), [4], [1024], ["needle"])
    assert "### needle @ 1024 tokens, query-agnostic" in md
    assert "| kvpress:knorm | skipped: run bash scripts/setup_kvpress.sh |" in md
    rows = [l for l in md.splitlines() if l.startswith("| needle | 1024 | 4 |")]
    assert len(rows) == 2
    assert "kvpress:snapkv: 0.500 (4.00x) | +0.50 ± 0.57 (4 samples): yes |" in rows[0]
    assert "kvpress:tova: 0.750 (4.00x) | -0.50 ± 0.98 (4 samples): yes |" in rows[1]
    assert "Against the best external method at equal memory: at least as good in 1 of 1 cells" in md


def test_an_external_method_holding_more_memory_is_beaten_or_set_aside():
    """Only kvpress:snapkv@4 ran, at 3.5x (it missed the ratio): agacc@4 ahead of it counts as 'yes';
    behind it is 'behind it, not at equal memory' and not counted."""
    from bench.make_results import cells, _vs_external
    from agacc.eval.metrics import paired_difference

    def page(agacc, snap):
        return {"meta": {}, "samples": [{"task": "needle", "context_tokens": 1024, "sample": i, "results": [
            {"preset": "agacc@4", "score": a, "kv_bytes": 100, "kv_bytes_fp16": 400, "decoded_tokens": 1, "decode_s": 1, "build_s": 1},
            {"preset": "kvpress:snapkv@4", "score": b, "kv_bytes": 100, "kv_bytes_fp16": 350, "decoded_tokens": 1,
             "decode_s": 1, "build_s": 1}]} for i, (a, b) in enumerate(zip(agacc, snap))]}

    for agacc, snap, key, said in [([1, 1, 1], [0, 1, 1], "yes", "yes"), ([0, 0, 0], [1, 1, 1], "", "behind it, not at equal memory")]:
        cs = cells(page(agacc, snap))
        best, v, text = _vs_external(cs, cs[("needle", 1024, "agacc", 4.0)], "needle", 1024, 4, paired_difference)
        assert v == key and text.endswith(said) and "holding more memory (3.50x)" in best
