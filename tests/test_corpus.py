"""The tuning / held-out texts (bench/corpus.py) and the suite tables of bench/bench_ppl.py."""
import pytest

from bench import bench_ppl, corpus


def test_every_kind_has_a_tuning_and_a_heldout_text():
    kinds = {t.kind for t in corpus.TEXTS.values()}
    assert kinds == {"licence", "docs", "code", "narrative", "chat"}
    for kind in kinds:
        splits = [t.split for t in corpus.TEXTS.values() if t.kind == kind]
        assert splits.count("heldout") == 1 and splits.count("tuning") == (2 if kind == "code" else 1)
    assert [t.split for t in corpus.suite("all")] == ["tuning"] * 6 + ["heldout"] * 5
    assert {t.name for t in corpus.suite("heldout")} == {f"{k}-heldout" for k in kinds}
    with pytest.raises(ValueError, match="unknown split"):
        corpus.suite("test")


def test_heldout_texts_share_no_passage_with_their_tuning_text():
    heldout = {t.kind: corpus.read(t) for t in corpus.suite("heldout")}
    for t in corpus.suite("tuning"):
        a, b = corpus.read(t), heldout[t.kind]
        grams = {a[i:i + 120] for i in range(0, len(a) - 120, 7)}
        assert not any(b[i:i + 120] in grams for i in range(len(b) - 120)), t.name


def test_every_text_has_the_2k_tokens_the_protocol_needs():
    import agacc

    _, tok = agacc.load_model()
    for t in corpus.TEXTS.values():
        text = corpus.read(t, tok)
        assert len(tok(text).input_ids) >= 2048, t.name
    chat = corpus.read(corpus.TEXTS["chat-heldout"], tok)
    assert chat.count("<|im_start|>assistant") >= 5  # the model's own chat format
    plain = corpus.read(corpus.TEXTS["chat-heldout"])  # no tokenizer: role: content paragraphs
    assert plain.startswith("user: ")


def _row(preset, dppl, kl, ratio, target):
    return {"preset": preset, "ppl_rel": 1 + dppl / 100, "kl": kl, "ratio": ratio, "target_ratio": target}


def test_suite_tables_mean_and_worst_text_by_hand(capsys):
    plain = {"preset": bench_ppl.PLAIN, "ppl_rel": 1.0, "kl": 0.0, "ratio": None}
    texts = [{"name": "a", "split": "heldout", "rows": [plain, _row("m@4", 1.0, 0.01, 4.0, 4.0), _row("u", 0.5, 0.005, 2.8, None)]},
             {"name": "b", "split": "heldout", "rows": [plain, _row("m@4", 3.0, 0.03, 4.2, 4.0), _row("u", 1.5, 0.007, 2.8, None)]}]
    summary = bench_ppl.suite_tables(texts)
    by = {s["method"]: s for s in summary}
    assert by["m@4"]["mean_dppl"] == pytest.approx(2.0) and by["m@4"]["max_dppl"] == pytest.approx(3.0)
    assert by["m@4"]["mean_kl"] == pytest.approx(0.02) and by["m@4"]["mean_ratio"] == pytest.approx(4.1)
    assert by["u"]["mean_dppl"] == pytest.approx(1.0) and by["u"]["target_ratio"] is None
    out = capsys.readouterr().out
    assert "heldout texts, fitted to 4x" in out and "unfitted" in out
    assert "+3.00% (0.0300, 4.20x)" in out


def test_bench_ppl_suite_end_to_end_against_one_plain_forward(tmp_path):
    """The suite mode on two texts: the plain row's perplexity is the one a single forward over the
    same tokens gives (teacher forcing through the cache = one pass), and the JSON holds every row."""
    import json
    import math

    import torch

    import agacc

    out = tmp_path / "ppl.json"
    bench_ppl.main(["--suite", "heldout", "--texts", "chat-heldout", "narrative-heldout", "--tokens", "48",
                    "--prefill", "32", "--threads", "1", "--json", str(out), "--ref-cache", str(tmp_path / "ref"),
                    "agacc@4", "uniform-int4"])
    rec = json.loads(out.read_text())
    assert [t["name"] for t in rec["texts"]] == ["narrative-heldout", "chat-heldout"]
    model, tok = agacc.load_model()
    for t in rec["texts"]:
        ids = tok(corpus.read(corpus.TEXTS[t["name"]], tok), return_tensors="pt").input_ids[:, :48]
        with torch.inference_mode():
            logits = model(ids).logits[0, 31:-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 32:])
        plain = t["rows"][0]
        assert plain["preset"] == bench_ppl.PLAIN and plain["ppl"] == pytest.approx(math.exp(float(nll)), rel=1e-3)
        assert [r["preset"] for r in t["rows"][1:]] == ["agacc@4", "uniform-int4"]
    assert {(s["method"], s["split"]) for s in rec["summary"]} == {("agacc@4", "heldout"), ("uniform-int4", "heldout")}
    assert len(list((tmp_path / "ref").glob("ref_*.pt"))) == 2  # the plain runs kept for the next sweep


def test_bench_ppl_runs_transformers_quantized_cache_in_the_same_loop(tmp_path):
    """``hf-quantized:*`` in bench_ppl: the row's bytes are the byte walk of a QuantizedCache fed the same
    tokens by hand, its error is real (2 bits lose more than 4, neither is the plain cache), and methods
    with a prefill of their own are refused naming the harness that runs them."""
    import json

    import torch

    import agacc
    from agacc.eval.external import parse_external

    out = tmp_path / "ppl.json"
    bench_ppl.main(["--suite", "heldout", "--texts", "narrative-heldout", "--tokens", "64", "--prefill", "40",
                    "--threads", "1", "--json", str(out), "hf-quantized:quanto-4,residual_length=16",
                    "hf-quantized:quanto-2,residual_length=16"])
    rows = {r["preset"]: r for r in json.loads(out.read_text())["texts"][0]["rows"]}
    q4, q2 = rows["hf-quantized:quanto-4,residual_length=16"], rows["hf-quantized:quanto-2,residual_length=16"]
    assert 0 < q4["kl"] < q2["kl"] and q4["target_ratio"] is None and q4["by_tier"] is None
    model, tok = agacc.load_model()
    ids = tok(corpus.read(corpus.TEXTS["narrative-heldout"], tok), return_tensors="pt").input_ids[:, :64]
    _, method = parse_external("hf-quantized:quanto-4,residual_length=16")
    cache = method.new_cache(model)
    with torch.inference_mode():
        model(ids[:, :40], past_key_values=cache)
        for i in range(40, 63):
            model(ids[:, i:i + 1], past_key_values=cache)
    mem = method.memory(cache)
    assert (q4["bytes"], q4["bytes_fp16"]) == (mem["bytes"], mem["bytes_fp16"])
    assert q4["ratio"] == pytest.approx(mem["bytes_fp16"] / mem["bytes"])
    for spec in ("kvpress:snapkv@4", "kv-distill@4"):
        with pytest.raises(SystemExit, match="agacc eval ppl"):
            bench_ppl.parse_methods([spec])
    with pytest.raises(SystemExit, match="given twice"):
        bench_ppl.parse_methods(["hf-quantized:quanto-4", "hf-quantized:quanto-4"])


def test_perturbed_embeddings_carry_the_seeds_noise_and_nothing_after():
    """``bench_ppl.perturbed``: inside it the input embeddings are the plain ones times (1 + eps z), z the seed's
    normal draws (the same seed, the same noise; another seed, other noise); seed None and leaving it change nothing."""
    import torch

    emb = torch.nn.Embedding(10, 8)

    class Model(torch.nn.Module):
        def get_input_embeddings(self):
            return emb

    ids = torch.tensor([[1, 2, 3]])
    plain = emb(ids)
    with bench_ppl.perturbed(Model(), None):
        assert torch.equal(emb(ids), plain)
    with bench_ppl.perturbed(Model(), 7, eps=1e-3):
        noisy = emb(ids)
    z = torch.randn(plain.shape, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(noisy, plain * (1 + 1e-3 * z), rtol=0, atol=1e-7)
    with bench_ppl.perturbed(Model(), 8, eps=1e-3):
        assert not torch.allclose(emb(ids), noisy, rtol=0, atol=1e-6)
    assert torch.equal(emb(ids), plain) and not emb._forward_hooks


def test_bench_ppl_perturb_runs_each_method_once_per_seed(tmp_path):
    """``--perturb 1 2``: a row per method and seed, labelled and recorded with its seed; the noise moves a
    compressed run's logits (the seeds' rows differ) by far less than the compression does."""
    import json

    out = tmp_path / "ppl.json"
    bench_ppl.main(["--suite", "heldout", "--texts", "chat-heldout", "--tokens", "120", "--prefill", "100",
                    "--threads", "1", "--json", str(out), "uniform-int2", "--perturb", "1", "2"])
    rows = json.loads(out.read_text())["texts"][0]["rows"][1:]
    assert [(r["preset"], r["seed"]) for r in rows] == [("uniform-int2~1", 1), ("uniform-int2~2", 2)]
    assert rows[0]["kl"] != rows[1]["kl"] and abs(rows[0]["kl"] - rows[1]["kl"]) < 0.01 * rows[0]["kl"]
