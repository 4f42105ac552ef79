"""The kvpress adapter without kvpress's environment: the worker's byte accounting on tensors shaped as
a pruned kvpress cache, its run on the tiny Llama with a stand-in press (kvpress's hook contract: prune
each layer's cache after the prefill), the JSON request and the scoring of recorded worker lines, the
"skipped" row when the venv is missing. A live run through .venv-kvpress when it exists."""
import json
import math
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tests.test_eval import CORPUS, loaded, tiny_model  # noqa: F401 (module-scoped fixtures)

# the tiny Llama: 2 layers, 2 KV heads, head dim 16, fp32
LAYERS, HEADS, HEAD_DIM = 2, 2, 16


def test_worker_counts_the_kv_bytes_a_pruned_cache_holds():
    from agacc.eval.kvpress_worker import cache_bytes, fp16_bytes

    # as a press leaves a 256-token context at compression_ratio 0.875: 32 tokens per layer, fp32
    kv = [(torch.randn(1, HEADS, 32, HEAD_DIM), torch.randn(1, HEADS, 32, HEAD_DIM)) for _ in range(LAYERS)]
    assert cache_bytes(kv) == LAYERS * 2 * (HEADS * 32 * HEAD_DIM * 4) == 16384
    assert fp16_bytes(kv, 256) == LAYERS * 2 * (HEADS * 256 * HEAD_DIM * 2) == 65536  # 4x
    big = torch.randn(1, HEADS, 64, HEAD_DIM)  # a view holds its whole storage, counted once
    assert cache_bytes([(big[:, :, :32], big[:, :, 32:]), (big, None)]) == HEADS * 64 * HEAD_DIM * 4
    assert cache_bytes([(torch.zeros(0), torch.zeros(0))]) == 0


def test_compression_ratio_for_equal_bytes():
    from agacc.eval.kvpress_adapter import parse_kvpress

    _, m = parse_kvpress("kvpress:snapkv@4")
    assert m.compression_for(4) == 0.875 and m.compression_for(2) == 0.75  # fp32 / 16-bit K/V
    _, m = parse_kvpress("kvpress:tova,compression_ratio=0.5,window_size=8")
    assert m.compression_for(4) == 0.5 and dict(m.kwargs) == {"window_size": 8}
    with pytest.raises(ValueError, match="ratio must be >= 0.5"):
        parse_kvpress("kvpress:knorm@0.4")[1].compression_for(4)
    with pytest.raises(ValueError, match="choose from"):
        parse_kvpress("kvpress:qfilter@4")  # downloads its filters from a hub: not offered
    with pytest.raises(ValueError, match="not both"):
        parse_kvpress("kvpress:knorm@4,compression_ratio=0.5")


def _fake_kvpress(monkeypatch, seen):
    """A stand-in ``kvpress`` module: a press that, like kvpress's, hooks every attention layer and during
    the prefill keeps the last (1 - compression_ratio) of each layer's cached tokens."""

    class KeepLastPress:
        def __init__(self, compression_ratio=0.0, **kw):
            self.compression_ratio = compression_ratio
            seen.append((compression_ratio, kw))

        @contextmanager
        def __call__(self, model):
            def hook(module, args, kwargs, output):
                layer = kwargs["past_key_values"].layers[module.layer_idx]
                n = layer.keys.shape[2]
                keep = n - int(n * self.compression_ratio)
                layer.keys, layer.values = layer.keys[:, :, n - keep:].clone(), layer.values[:, :, n - keep:].clone()
                return output

            hooks = [l.self_attn.register_forward_hook(hook, with_kwargs=True) for l in model.model.layers]
            try:
                yield
            finally:
                for h in hooks:
                    h.remove()

    fake = types.ModuleType("kvpress")
    for cls in ("SnapKVPress", "KnormPress"):
        setattr(fake, cls, KeepLastPress)
    monkeypatch.setitem(sys.modules, "kvpress", fake)


@pytest.mark.parametrize("protocol", ["query-aware", "query-agnostic"])
def test_worker_and_adapter_on_the_tiny_model(loaded, tiny_model, tmp_path, monkeypatch, protocol):
    """The worker in this process with the stand-in press: compression 0 predicts what the plain model
    predicts (the answer positions after the whole prompt); @2 removes 75% of the context
    (query-agnostic: half a 16-bit cache of the context) or, query-aware, enough that the cache holds half
    a 16-bit cache once the answer's tokens joined it (hand count); later tokens take the uncompressed
    positions."""
    from agacc.eval import kvpress_worker as W
    from agacc.eval import tasks as T
    from agacc.eval.kvpress_adapter import make_request, parse_kvpress, results_from_lines

    model, tok = loaded
    seen = []
    _fake_kvpress(monkeypatch, seen)
    samples = T.needle(tok, 256, 2, text=CORPUS * 8)
    methods = [parse_kvpress("kvpress:snapkv,compression_ratio=0"), parse_kvpress("kvpress:knorm@2,window_size=4")]
    req = make_request(samples, methods, protocol, "match", tiny_model, itemsize=4, eos={tok.eos_token_id})
    assert [m["compression_ratio"] for m in req["methods"]] == [0.0, 0.75]
    assert req["samples"][0]["context_ids"] + req["samples"][0]["question_ids"] == samples[0].prompt_ids
    rq, rs = tmp_path / "rq.json", tmp_path / "rs.jsonl"
    rq.write_text(json.dumps(req))
    assert W.main([str(rq), str(rs)]) == 0
    lines = rs.read_text().splitlines()
    assert len(lines) == 4 and seen[1][1] == {"window_size": 4}
    a0 = len(samples[0].answer_ids) - 1
    assert seen[1][0] == (0.75 if protocol == "query-agnostic" else  # fitted: 1/2 of a 16-bit cache at the end
                          1 - (0.25 * (len(samples[0].prompt_ids) + a0) - a0) / len(samples[0].prompt_ids))
    res = results_from_lines(lines, samples, methods, tok, protocol, "match")
    for s in samples:
        with torch.inference_mode():
            ref = model(torch.tensor([s.prompt_ids + s.answer_ids[:-1]])).logits[0, len(s.prompt_ids) - 1:].argmax(-1)
        lossless = next(r for r in res if r["index"] == s.index and r["preset"] == methods[0][0])
        w = next(json.loads(x) for x in lines if json.loads(x)["index"] == s.index and json.loads(x)["label"] == methods[0][0])
        assert w["pred_ids"] == ref.tolist() and lossless["score"] == float(ref.tolist() == s.answer_ids)
        pressed = next(r for r in res if r["index"] == s.index and r["preset"] == methods[1][0])
        n = len(s.context_ids) if protocol == "query-agnostic" else len(s.prompt_ids)
        a = 0 if protocol == "query-agnostic" else len(s.answer_ids) - 1  # teacher-forced after the prefill
        keep = n - int(n * (1 - (0.25 * (n + a) - a) / n))
        if protocol == "query-agnostic":  # the compressed context
            assert pressed["kv_bytes"] == LAYERS * 2 * HEADS * keep * HEAD_DIM * 4
            assert pressed["kv_bytes_fp16"] == LAYERS * 2 * HEADS * n * HEAD_DIM * 2
            assert pressed["protocol"] == "query-agnostic"
        end = keep + (len(s.question_ids) if protocol == "query-agnostic" else 0) + len(s.answer_ids) - 1
        assert pressed["kv_bytes_end"] == LAYERS * 2 * HEADS * end * HEAD_DIM * 4
        assert pressed["kept_tokens"] == keep
        assert pressed["ratio"] == pressed["kv_bytes_fp16"] / pressed["kv_bytes"]
        assert pressed["ratio"] == pytest.approx(2.0, rel=0.03)  # equal bytes (@2) where counted, to a token


def test_worker_perplexity_against_the_full_cache(loaded, tiny_model, tmp_path, monkeypatch):
    """ppl through the worker (stand-in press): compression 0 gives the full cache's NLL and KL 0 (the
    same model, teacher-forced in chunks of 8 after the prefill); @2 holds half a 16-bit cache at the end
    (in fp32, the forced tokens included: the press fitted to them) and scores the same tokens worse.
    The adapter turns the lines into the runner's ppl fields (score = ppl_full / ppl, capped at 1)."""
    from agacc.eval import kvpress_worker as W
    from agacc.eval import tasks as T
    from agacc.eval.kvpress_adapter import full_logits, make_request, parse_kvpress, results_from_lines

    model, tok = loaded
    _fake_kvpress(monkeypatch, [])
    (s,) = T.ppl(tok, 256, 1, text=CORPUS * 8, decode_tokens=24)
    methods = [parse_kvpress("kvpress:snapkv,compression_ratio=0"), parse_kvpress("kvpress:knorm@2")]
    ref = full_logits(model, s)
    assert ref.shape == (len(s.target_ids), model.config.vocab_size)
    torch.save(ref, tmp_path / "ref.pt")
    req = make_request([s], methods, "query-aware", "match", tiny_model, itemsize=4, refs={s.index: tmp_path / "ref.pt"})
    assert req["samples"][0]["target_ids"] == s.target_ids and "answer_ids" not in req["samples"][0]
    rq, rs = tmp_path / "rq.json", tmp_path / "rs.jsonl"
    rq.write_text(json.dumps(req))
    assert W.main([str(rq), str(rs)]) == 0
    zero, pressed = results_from_lines(rs.read_text().splitlines(), [s], methods, tok, "query-aware", "match")
    assert zero["tokens"] == pressed["tokens"] == len(s.target_ids) == 24
    assert zero["kl"] < 1e-5 and zero["nll"] == pytest.approx(zero["nll_full"], rel=1e-5)
    assert zero["score"] == pytest.approx(1.0) and zero["top1"] == 24
    assert pressed["kl"] > 1e-3 and pressed["nll_full"] == pytest.approx(zero["nll_full"], rel=1e-6)
    assert pressed["score"] == min(1.0, math.exp((pressed["nll_full"] - pressed["nll"]) / 24))
    n = len(s.prompt_ids)
    assert pressed["kept_tokens"] == n - int(n * (1 - (0.25 * (n + 23) - 23) / n))  # fitted for the 23 forced tokens
    assert pressed["kv_bytes"] == LAYERS * 2 * HEADS * (pressed["kept_tokens"] + 23) * HEAD_DIM * 4
    assert pressed["kv_bytes_fp16"] == LAYERS * 2 * HEADS * (n + 23) * HEAD_DIM * 2
    assert pressed["ratio"] == pytest.approx(2.0, rel=0.03)  # @2: equal bytes at the end, to a token


def test_recorded_lines_are_scored_with_the_task_metric(loaded):
    from agacc.eval import tasks as T
    from agacc.eval.kvpress_adapter import parse_kvpress, results_from_lines

    _, tok = loaded
    (s,) = T.passkey(tok, 256, 1)
    methods = [parse_kvpress("kvpress:tova@4")]
    good = {"index": 0, "label": "kvpress:tova@4", "pred_ids": list(s.answer_ids), "kv_bytes": 1000, "kv_bytes_fp16": 4000,
            "kv_bytes_end": 1200, "kv_bytes_fp16_end": 4100, "kept_tokens": 60, "prompt_tokens": 250, "build_s": 0.1,
            "decode_s": 0.2, "decoded_tokens": 3}
    bad = dict(good, pred_ids=[s.answer_ids[0], s.answer_ids[0] + 1] + list(s.answer_ids[2:]))
    err = {"index": 0, "label": "kvpress:tova@4", "error": "RuntimeError: boom"}
    (g,) = results_from_lines([json.dumps(good)], [s], methods, tok, "query-aware", "match")
    assert g["score"] == 1.0 and g["ratio"] == 4.0 and g["kv_bytes"] == 1000 and g["depth"] == s.meta["depth"]
    (b,) = results_from_lines([json.dumps(bad)], [s], methods, tok, "query-aware", "match")
    assert b["score"] == 0.0 and b["prediction"] == tok.decode(bad["pred_ids"][:2])
    (e,) = results_from_lines([json.dumps(err)], [s], methods, tok, "query-aware", "match")
    assert e["skipped"] == "skipped: kvpress:tova raised RuntimeError: boom"
    gen = dict(good, pred_ids=tok(" the key " + s.answers[0], add_special_tokens=False)["input_ids"])
    (t,) = results_from_lines([json.dumps(gen)], [s], methods, tok, "query-aware", "generate")
    assert t["score"] == 1.0 and s.answers[0] in t["prediction"]


def test_ruler_lines_are_scored_and_stopped_as_the_runner_does(loaded):
    """RULER samples through the adapter: the share of all answers found (case-insensitive), as
    runner._score gives; the request tells the worker to stop once every answer is in the text."""
    from agacc.eval import ruler
    from agacc.eval.kvpress_adapter import make_request, parse_kvpress, results_from_lines
    from agacc.eval.kvpress_worker import answered

    _, tok = loaded
    (s,) = ruler.niah_multivalue(tok, 512, 1, values=4)
    a = list(s.answers)
    assert len(a) == 4 and s.metric == "string_match_all"
    methods = [parse_kvpress("kvpress:snapkv@4")]
    text = f"They are {a[0]}, {a[2].upper()} and more."
    line = {"index": s.index, "label": "kvpress:snapkv@4", "pred_ids": tok(text, add_special_tokens=False)["input_ids"],
            "kv_bytes": 1000, "kv_bytes_fp16": 4000, "kv_bytes_end": 1000, "kv_bytes_fp16_end": 4000,
            "kept_tokens": 60, "prompt_tokens": 500, "build_s": 0.1, "decode_s": 0.2, "decoded_tokens": 9}
    (r,) = results_from_lines([json.dumps(line)], [s], methods, tok, "query-agnostic", "generate")
    assert r["score"] == 0.5 == ruler.score(s, text)
    (req,) = make_request([s], methods, "query-agnostic", "generate", "m", 4)["samples"]
    assert req["answers"] == a and req["stop_all"] is True
    assert not answered(text, req) and answered(" ".join(x.upper() for x in a), req)
    assert answered("x " + a[1], dict(req, stop_all=False)) and not answered("x", dict(req, stop_all=False))


def test_missing_venv_is_a_skipped_row(tiny_model, tmp_path, capsys, monkeypatch):
    from agacc.eval.cli import main

    monkeypatch.setenv("AGACC_KVPRESS_VENV", str(tmp_path / "nowhere"))
    out = tmp_path / "o.json"
    assert main(["passkey", "--model", tiny_model, "--preset", "full", "kvpress:snapkv", "kvpress:knorm@8", "--ratio", "4",
                 "--context-tokens", "256", "--samples", "1", "--json", str(out), "--no-progress"]) == 0
    full, snap, knorm = json.loads(out.read_text())
    assert full["score"] is not None
    for r in (snap, knorm):
        assert r["score"] is None and r["skipped"].startswith("skipped: run bash scripts/setup_kvpress.sh")
    assert snap["config"]["ratio"] == 4.0 and knorm["config"]["ratio"] == 8.0
    assert "skipped: run bash scripts/setup_kvpress.sh" in capsys.readouterr().out
    assert main(["passkey", "--model", tiny_model, "--preset", "kvpress:snapkv"]) == 2  # no ratio
    assert "needs a ratio" in capsys.readouterr().err


@pytest.mark.skipif(not (Path(__file__).resolve().parents[1] / ".venv-kvpress" / "bin" / "python").exists(),
                    reason="no .venv-kvpress (bash scripts/setup_kvpress.sh)")
def test_live_kvpress_keeps_everything_at_compression_zero(tiny_model, tmp_path):
    """Through the real venv and kvpress: a press removing nothing predicts what the full cache predicts,
    and holds the fp32 K/V of every context token; at @4 it holds a quarter of a 16-bit cache."""
    from agacc.eval.cli import main

    out = tmp_path / "live.json"
    assert main(["needle", "--model", tiny_model, "--preset", "full", "kvpress:knorm,compression_ratio=0",
                 "kvpress:snapkv@4", "--context-tokens", "256", "--samples", "2", "--protocol", "query-agnostic",
                 "--json", str(out), "--no-progress"]) == 0
    full, zero, snap = json.loads(out.read_text())
    assert [s["prediction"] for s in zero["per_sample"]] == [s["prediction"] for s in full["per_sample"]]
    assert zero["ratio"] == pytest.approx(0.5)
    assert snap["ratio"] == pytest.approx(4.0, rel=0.05)
    assert main(["ppl", "--model", tiny_model, "--preset", "kvpress:knorm,compression_ratio=0", "--context-tokens",
                 "256", "--samples", "1", "--decode-tokens", "16", "--json", str(out), "--no-progress"]) == 0
    (zero,) = json.loads(out.read_text())
    assert zero["kl"] < 1e-6 and zero["ppl"] == pytest.approx(zero["ppl_full"], rel=1e-5)  # nothing removed


def test_worker_ends_when_its_parent_is_killed(tmp_path):
    """An evaluation killed mid-run leaves no worker behind: a process that starts a watched child and
    dies at once (as a killed adapter) -> the child, asleep for a minute, is gone within seconds."""
    import os
    import subprocess
    import time

    worker = Path(__file__).resolve().parents[1] / "agacc" / "eval" / "kvpress_worker.py"
    child = ("import importlib.util, time; spec = importlib.util.spec_from_file_location('w', {w!r}); "
             "w = importlib.util.module_from_spec(spec); spec.loader.exec_module(w); "  # as the worker runs: no agacc
             "w.exit_with_parent(0.05); print('watching', flush=True); time.sleep(60)").format(w=str(worker))
    parent = (f"import subprocess, sys, os; p = subprocess.Popen([sys.executable, '-c', {child!r}], stdout=subprocess.PIPE, "
              "stderr=subprocess.DEVNULL); p.stdout.readline(); print(p.pid, flush=True); os._exit(0)")
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=30)
    pid = int(out.stdout.split()[0])
    deadline = time.time() + 15
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # a zombie (exited, not yet reaped by init) counts as gone
        try:
            if open(f"/proc/{pid}/stat").read().split()[2] == "Z":
                return
        except FileNotFoundError:
            return
        time.sleep(0.1)
    os.kill(pid, 9)
    raise AssertionError("the worker outlived its parent")
