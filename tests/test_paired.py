"""bench/paired.py: records of two eval runs (one method each) compared on the samples both scored, per
context length and protocol; a hand-worked case."""
from __future__ import annotations

import json

import pytest

from bench.paired import main


def rec(preset, scores, protocol=None, ctx=2048):
    r = {"task": "niah_multikey", "preset": preset, "samples": len(scores), "context_tokens": ctx, "score": sum(scores) / len(scores),
         "ci95": [0.0, 1.0], "ratio": 4.0, "kv_mb": 1.0, "kv_mb_fp16": 4.0, "tokens_per_s": 1.0,
         "per_sample": [{"index": i, "context_tokens": ctx, "score": s} for i, s in enumerate(scores)]}
    if protocol:
        r["protocol"] = protocol
    return r


def test_paired_across_files(tmp_path, capsys):
    """agacc@4 [1, 1, 0, 0] vs kvpress:snapkv@4 [1, 0, 0, 0]: d = [0, -1, 0, 0], mean -0.25, sd 0.5,
    half-width 1.96 * 0.5 / 2 = 0.49; the query-aware record of the same method is another group."""
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps([rec("agacc@4", [1, 1, 0, 0], "query-agnostic"), rec("agacc@4", [1, 1, 1, 1])]))
    b.write_text(json.dumps([rec("kvpress:snapkv@4", [1, 0, 0, 0], "query-agnostic")]))
    assert main([str(a), str(b), "--vs", "agacc@4"]) == 0
    out = capsys.readouterr().out
    assert "paired vs agacc@4 (4 samples, ctx 2048): kvpress:snapkv@4 -0.250 +- 0.490 (within noise)" in out
    assert out.count("paired vs") == 1  # the query-aware agacc@4 has no other method beside it


def test_unknown_reference(tmp_path, capsys):
    a = tmp_path / "a.json"
    a.write_text(json.dumps([rec("agacc@4", [1, 0])]))
    with pytest.raises(SystemExit):
        main([str(a), "--vs", "agacc@8"])
    assert "no records of ['agacc@8']" in capsys.readouterr().err
