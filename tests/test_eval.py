"""Eval runner and CLI on a tiny random Llama (made on the fly): the shared-prefill cache equals a
real prefill, the CLI writes the promised records, --data reads LongBench / SCROLLS JSONL, and
``accelerate launch`` over two CPU processes writes the same JSON as one process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agacc.presets import FIXED_RATIO, PRESETS

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
TIMING = ("tokens_per_s", "build_s", "prefill_s", "prefill_tokens_per_s", "world_size")
CORPUS = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
          "The pass key is 12345. Remember it. What is the pass key? The special magic number for apple is: 7654321. "
          "0 1 2 3 4 5 6 7 8 9 Question: Answer: Summary: Paragraph ") * 4


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-layer Llama with random weights and a small byte-level BPE tokenizer, saved to a tmp dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def loaded(tiny_model):
    import agacc

    return agacc.load_model(tiny_model, device="cpu")


def _strip(records):
    out = []
    for r in records:
        out.append({k: v for k, v in r.items() if k not in TIMING})
    return out


@pytest.mark.parametrize("preset", list(PRESETS))
def test_cache_from_capture_equals_a_real_prefill(loaded, preset):
    from agacc import AGACCConfig, CompressedCache
    from agacc.eval.runner import cache_from_capture, capture_prefill

    model, tok = loaded
    cfg = AGACCConfig.preset(preset, **({} if preset in FIXED_RATIO else {"target_ratio": 3.0}))
    ids = torch.randint(3, len(tok), (1, 300), generator=torch.Generator().manual_seed(1))
    nxt = torch.tensor([[5]])
    with torch.inference_mode():
        real = CompressedCache(model.config, cfg)
        model(ids, past_key_values=real, use_cache=True)
        want = model(nxt, past_key_values=real, use_cache=True).logits
        cap = capture_prefill(model, ids[0].tolist(), n_obs=64)
        built = cache_from_capture(model, cap, cfg)
        got = model(nxt, past_key_values=built, use_cache=True).logits
    for a, b in zip(real.layers, built.layers):
        assert torch.equal(a.store.block_tier, b.store.block_tier)
        assert a.store.n_entries == b.store.n_entries
    assert real.memory()["bytes"] == built.memory()["bytes"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_cli_writes_records_table_and_plot(tiny_model, tmp_path, capsys):
    from agacc.eval.cli import main

    out, plot = tmp_path / "pk.json", tmp_path / "pk.html"
    rc = main(["passkey", "--model", tiny_model, "--preset", "full", "agacc", "h2o", "uniform-int2", "--ratio", "4",
               "--context-tokens", "256", "384", "--samples", "2", "--json", str(out), "--plot", str(plot), "--no-progress"])
    assert rc == 0
    recs = json.loads(out.read_text())
    assert [(r["preset"], r["context_tokens"]) for r in recs] == [(p, n) for p in ("full", "agacc", "h2o", "uniform-int2")
                                                                  for n in (256, 384)]
    for r in recs:
        for k in ("task", "preset", "samples", "score", "ratio", "kv_bytes", "kv_bytes_fp16", "tokens_per_s"):
            assert k in r
        assert 0.0 <= r["score"] <= 1.0 and r["samples"] == 2
        assert r["ratio"] == pytest.approx(r["kv_bytes_fp16"] / r["kv_bytes"], rel=1e-3)
        assert {s["depth"] for s in r["per_sample"]} == {0.0, 1.0}
    h2o = [r for r in recs if r["preset"] == "h2o" and r["context_tokens"] == 384][0]
    assert h2o["ratio"] >= 0.95 * 4
    assert "preset" in capsys.readouterr().out  # the table
    assert "plotly" in plot.read_text().lower()


def test_cli_ppl_and_data_formats(tiny_model, tmp_path):
    from agacc.eval.cli import main

    text = tmp_path / "t.txt"
    text.write_text(CORPUS * 3)
    out = tmp_path / "ppl.json"
    assert main(["ppl", "--model", tiny_model, "--preset", "full", "snapkv", "--ratio", "2", "--context-tokens", "200",
                 "--decode-tokens", "24", "--text", str(text), "--json", str(out), "--no-progress"]) == 0
    full, snap = json.loads(out.read_text())
    assert full["ppl"] == pytest.approx(full["ppl_full"], rel=1e-3) and full["top1_agreement"] == 1.0
    assert snap["ppl_full"] == pytest.approx(full["ppl_full"], rel=1e-6) and snap["tokens"] == 24
    for task, fx in (("longbench", "longbench_tiny.jsonl"), ("scrolls", "scrolls_tiny.jsonl")):
        out = tmp_path / f"{task}.json"
        assert main([task, "--model", tiny_model, "--preset", "full", "--data", str(FIXTURES / fx), "--max-new-tokens", "3",
                     "--json", str(out), "--no-progress"]) == 0
        (rec,) = json.loads(out.read_text())
        assert rec["samples"] == (3 if task == "longbench" else 2) and rec["task"] == task
    assert main(["passkey", "--model", tiny_model, "--preset", "kv-distill"]) == 2  # no ratio: says how to give one


def test_cli_kv_distill_trains_and_evaluates(tiny_model, tmp_path, monkeypatch, capsys):
    """``python -m agacc distill`` builds weights; ``eval --preset kv-distill@4`` runs on them (its bytes
    ratio at the context's end is 4), and reports "skipped: ..." where there are none."""
    from agacc.cli import main as agacc_main
    from agacc.eval.cli import main

    monkeypatch.setenv("AGACC_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "t.txt"
    text.write_text(CORPUS * 3)
    out = tmp_path / "none.json"
    assert main(["passkey", "--model", tiny_model, "--preset", "full", "kv-distill@4", "--context-tokens", "256",
                 "--samples", "1", "--json", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())[1]["skipped"].startswith("skipped: no trained KV-Distill weights")
    assert agacc_main(["distill", "--model", tiny_model, "--text", str(text), "--steps", "3", "--context", "64",
                       "--continuation", "8", "--threads", "1"]) == 0  # filed under $AGACC_CACHE
    assert "saved" in capsys.readouterr().out
    for protocol in ("query-aware", "query-agnostic"):
        out = tmp_path / f"{protocol}.json"
        assert main(["passkey", "--model", tiny_model, "--preset", "full", "kv-distill@4", "--context-tokens", "256",
                     "--samples", "2", "--protocol", protocol, "--json", str(out), "--no-progress"]) == 0
        full, kvd = json.loads(out.read_text())
        assert not kvd.get("skipped") and kvd["preset"] == "kv-distill@4" and 0.0 <= kvd["score"] <= 1.0
        # query-agnostic: the ratio of the compressed context alone; query-aware: after the answer too
        assert (kvd["ratio"] == pytest.approx(4.0, rel=0.02)) if protocol == "query-agnostic" else (2.5 < kvd["ratio"] < 4.0)


def test_accelerate_two_processes_equal_one(tiny_model, tmp_path):
    args = ["eval", "needle", "--model", tiny_model, "--preset", "full", "agacc", "snapkv", "--ratio", "3",
            "--context-tokens", "256", "--samples", "3", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    single, sharded = tmp_path / "single.json", tmp_path / "sharded.json"
    from agacc.eval.cli import main

    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched processes (OMP_NUM_THREADS=1): same kernels, same floats
    try:
        assert main(args[1:] + ["--json", str(single)]) == 0
    finally:
        torch.set_num_threads(torch_threads)
    # accelerate 1.15: `--cpu --num_processes 2` starts ONE process (multi-CPU needs MPI); the torchrun
    # launcher (`--multi_gpu`) starts two, and on a machine without GPUs they run on CPU with gloo.
    r2 = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                         "--main_process_port", "29533", "-m", "agacc", *args, "--json", str(sharded)], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = json.loads(single.read_text()), json.loads(sharded.read_text())
    assert b[0]["world_size"] == 2 and a[0]["world_size"] == 1
    assert _strip(a) == _strip(b)


def test_records_are_cut_only_when_asked_or_to_fit_the_model(loaded):
    """A needle record of ~1,500 tokens stays whole by default (it fits the model's 4,096 positions);
    --context-tokens cuts it in the middle and the summary says whether the answer survived; a record
    longer than the model is cut to fit, its answer budget kept."""
    from agacc.eval import tasks as T
    from agacc.eval.cli import cut_summary

    _, tok = loaded
    filler = CORPUS * 6
    rows = [{"context": "The code is 7291. " + filler, "input": "What is the code?", "answers": ["7291"]},
            {"context": filler + " The code is 5550.", "input": "What is the code?", "answers": ["5550"]}]
    whole = T.records_task(tok, rows, "needle", None, None, limit=100_000)
    n = [s.meta["record_tokens"] for s in whole]
    assert min(n) > 1200 and not any(s.meta["truncated"] for s in whole) and cut_summary(whole) is None
    assert [len(s.prompt_ids) for s in whole] == [len(T._bos(tok)) + k for k in n]
    cut = T.records_task(tok, rows, "needle", 512, None, limit=100_000)
    assert all(s.meta["truncated"] and len(s.prompt_ids) <= 512 + 1 for s in cut)
    assert [s.meta["answer_in_prompt"] for s in cut] == [True, True]  # start and end survive a middle cut
    mid = [{"context": filler + " The code is 8123. " + filler, "input": "What is the code?", "answers": ["8123"]}]
    (gone,) = T.records_task(tok, mid, "needle", 512, None)
    assert gone.meta["answer_in_prompt"] is False
    assert cut_summary(cut + [gone]) == "records cut (middle truncation): 3 of 3; the answer survived the cut in 2 of 3"
    (fit,) = T.records_task(tok, mid, "needle", None, None, limit=1000)
    assert fit.meta["truncated"] and len(fit.prompt_ids) + fit.max_new_tokens <= 1000


def test_cli_calibrate_evict_measures_and_files_the_eviction_table(tiny_model, tmp_path, monkeypatch, capsys):
    """``python -m agacc calibrate --evict``: one sensitivity a layer (the geometric mean over the
    fractions of the mean over the texts) and the evict_scale it gives; --save files it where
    layer_calibration=auto finds it (bits table and eviction table apart)."""
    from transformers import AutoConfig

    from agacc import calibrate
    from agacc.cli import main as agacc_main
    from agacc.config import AGACCConfig

    monkeypatch.setenv("AGACC_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "t.txt"
    text.write_text(CORPUS * 20)
    assert agacc_main(["calibrate", "--model", tiny_model, "--text", str(text), "--tokens", "192",
                       "--evict", "0.25", "0.75", "--json", "--save"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert len(rec["sensitivity"]) == len(rec["evict_scale"]) == 2 and all(s > 0 for s in rec["sensitivity"])
    assert rec["evict_scale"] == pytest.approx(calibrate.layer_scale(rec["sensitivity"], 1.0))
    config = AutoConfig.from_pretrained(tiny_model)
    assert calibrate.known_sensitivity(config, "evict") == pytest.approx(rec["sensitivity"])
    assert calibrate.known_sensitivity(config) is None  # the bits table was not measured
    cfg = calibrate.resolve(AGACCConfig(layer_calibration="auto"), config)
    assert cfg.evict_scale == pytest.approx(rec["evict_scale"]) and cfg.layer_scale is None
    assert agacc_main(["calibrate", "--model", tiny_model, "--text", str(text), "--tokens", "192", "--bits", "2",
                       "--json", "--save"]) == 0  # the bits table, filed apart
    bits = json.loads(capsys.readouterr().out)
    assert bits["bits"] == 2 and len(bits["layer_scale"]) == 2
    assert calibrate.known_sensitivity(config) == pytest.approx(bits["sensitivity"])
    assert calibrate.known_sensitivity(config, "evict") == pytest.approx(rec["sensitivity"])


def test_cli_calibrate_key_basis_files_the_table_a_basis_cache_reads(tiny_model, tmp_path, monkeypatch, capsys):
    """``python -m agacc calibrate --key-basis --save``: the table ``agacc.basis.calibrate`` makes from the same
    texts' first tokens and every query of them, filed where a cache with key_quant="basis" finds it (before: a
    clear error)."""
    import torch
    from transformers import AutoConfig

    import agacc
    from agacc import basis
    from agacc.cli import main as agacc_main
    from agacc.config import AGACCConfig
    from agacc.eval.runner import capture_prefill

    monkeypatch.setenv("AGACC_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "t.txt"
    text.write_text(CORPUS * 20)
    config = AutoConfig.from_pretrained(tiny_model)
    cfg = AGACCConfig.preset("agacc", target_ratio=4, key_quant="basis")
    with pytest.raises(ValueError, match="calibrate --key-basis"):
        agacc.CompressedCache(config, cfg)
    assert agacc_main(["calibrate", "--model", tiny_model, "--text", str(text), "--tokens", "192", "--key-basis",
                       "--json", "--save"]) == 0
    rec = json.loads(capsys.readouterr().out)
    from agacc.policy import basis_layouts

    d = config.head_dim
    assert rec["tokens"] == [192] and rec["layouts"]["3"] == [list(g) for g in basis_layouts(cfg, d)[1]]
    model, tok = agacc.load_model(tiny_model, device="cpu")
    with torch.inference_mode():
        want = basis.calibrate(model, [capture_prefill(model, tok(CORPUS * 20).input_ids[:192], n_obs=192)])
    got = basis.require(config)
    torch.testing.assert_close(got.w, want.w)
    torch.testing.assert_close(got.V.float(), want.V.half().float())
    assert agacc.CompressedCache(config, cfg).key_basis is not None


def test_the_embedded_model_ships_its_key_basis(tmp_path, monkeypatch):
    from transformers import LlamaConfig

    from agacc import basis

    monkeypatch.setenv("AGACC_CACHE", str(tmp_path))  # nothing saved: the shipped table
    config = LlamaConfig(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64)
    table = basis.require(config)
    assert table.model == "llama/30/576/9/3/49152" and table.V.shape == (30, 3, 64, 64) and table.w.shape == (30, 3, 64)
    V = table.V.float()
    assert (V.transpose(-1, -2) @ V - torch.eye(64)).abs().max() < 5e-3  # orthonormal axes, fp16
    assert (table.inv_freq[0], table.inv_freq.numel()) == (1.0, 32)
