"""bench/make_results.py's choice of what to run on a held sample (``to_run``): a whole sample when
nothing is held; with --redo only those presets; with --redo-missing-only also skipping what this
prefill chunk already produced, so a --redo run cut by its time budget continues instead of starting
over. Hand-worked cases."""
from __future__ import annotations

import pytest

from bench.make_results import main, to_run

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
