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
