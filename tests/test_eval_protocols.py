"""The two protocols of the retrieval tasks (``--protocol query-aware|query-agnostic``) and the reuse
case (one compressed context, several questions), on the tiny random Llama of tests/test_eval.py:

* the task samples carry an exact context / question split of the prompt;
* query-agnostic with the lossless preset gives the plain ``DynamicCache``'s logits (context, then
  question, then answer through the same cache);
* on a constructed case where the question changes what a query-aware method keeps, the
  query-agnostic cache is the same for two different questions and the query-aware one is not;
* a question asked on a fork of a compressed context leaves the context as it was: the second
  question's logits equal those of a freshly built context;
* the CLI: records of both protocols, the reuse run, and clean errors."""
import json

import pytest
import torch

from tests.test_eval import CORPUS, loaded, tiny_model  # noqa: F401 (module-scoped fixtures)


def _tiers(cache):
    return [(l.store.block_tier.clone(), l.store.block_bits.clone(), l.store.n_entries) for l in cache.layers]


def _same(a, b):
    return all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2] for x, y in zip(a, b))


def test_samples_split_context_and_question(loaded):
    from agacc.eval import tasks as T

    _, tok = loaded
    text = CORPUS * 8
    for s in T.needle(tok, 256, 3, text=text) + T.passkey(tok, 256, 2):
        assert s.has_split and s.meta["split_exact"]
        assert s.context_ids + s.question_ids == s.prompt_ids  # the very tokens of the query-aware prompt
        assert "What is" in tok.decode(s.question_ids) and s.answers[0] in tok.decode(s.context_ids)
        assert s.answers[0] not in tok.decode(s.question_ids)
    group = T.needle_reuse(tok, 300, 2, 3, text=text)
    assert len(group) == 6 and [s.group for s in group] == [0, 0, 0, 1, 1, 1]
    for c in (0, 1):
        gs = [s for s in group if s.group == c]
        assert all(s.context_ids is gs[0].context_ids for s in gs)  # one context, shared
        ctx = tok.decode(gs[0].context_ids)
        assert all(s.answers[0] in ctx and s.meta["key"] in tok.decode(s.question_ids) for s in gs)
        assert len({s.meta["key"] for s in gs}) == 3 and [s.meta["depth"] for s in gs] == [0.0, 0.5, 1.0]
        assert all(s.context_ids + s.question_ids == s.prompt_ids for s in gs)
    rows = [{"context": "The code is 7291. " + CORPUS, "input": "What is the code?", "answers": ["7291"]}]
    (rec,) = T.records_task(tok, rows, "needle", None, None, limit=100_000)
    assert rec.has_split and rec.context_ids + rec.question_ids == rec.prompt_ids
    assert tok.decode(rec.question_ids) == "\n\nQuestion: What is the code?\nAnswer:"


@pytest.mark.parametrize("chunked", [False, True])
def test_query_agnostic_full_equals_the_plain_cache(loaded, chunked):
    """Lossless preset, query-agnostic: context (one forward, or chunks of 64), then the question, then the
    answer, through a CompressedCache == the same through a DynamicCache (fp32: within 1e-5, same argmax)."""
    from transformers import DynamicCache

    from agacc import AGACCConfig
    from agacc.eval import runner as R
    from agacc.eval import tasks as T

    model, tok = loaded
    (s,) = T.needle(tok, 300, 1, depths=[0.5], text=CORPUS * 8)
    cfg = AGACCConfig.preset("full")
    with torch.inference_mode():
        cap = R.capture_prefill(model, s.context_ids, [], n_obs=64)
        cache, _ = R._build(model, cfg, cap, s.context_ids, 64 if chunked else None)
        first = R.ask(model, cache, s.question_ids)
        got = torch.cat([first[None], R.teacher_force(model, cache, s.answer_ids[:-1], chunk=len(s.answer_ids))])
        plain = DynamicCache(config=model.config)
        model(torch.tensor([s.context_ids]), past_key_values=plain)
        f = model(torch.tensor([s.question_ids]), past_key_values=plain).logits[0, -1].float()
        want = torch.cat([f[None], model(torch.tensor([s.answer_ids[:-1]]), past_key_values=plain).logits[0].float()])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert cache.seq_len == len(s.prompt_ids) + len(s.answer_ids) - 1


@pytest.mark.parametrize("method", ["snapkv@4", "h2o@4", "agacc@4"])
def test_question_changes_query_aware_not_query_agnostic(loaded, method):
    """Constructed case: one random 256-token context, two different random 40-token questions. Query-aware
    (question in the prefill) keeps different context blocks for the two (snapkv, h2o; agacc on this
    random model keeps the same tiers but scores the blocks differently); query-agnostic keeps the same,
    scores and tiers (those of the context compressed alone)."""
    from agacc.eval import runner as R
    from agacc.spec import parse_method

    model, tok = loaded
    cfg = parse_method(method)
    g = torch.Generator().manual_seed(3)
    ctx = torch.randint(3, len(tok), (256,), generator=g).tolist()
    q1, q2 = (torch.randint(3, len(tok), (40,), generator=g).tolist() for _ in range(2))
    n_ctx_blocks = 256 // cfg.block_size

    aware = []
    for q in (q1, q2):
        cap = R.capture_prefill(model, ctx + q, [], n_obs=64)
        c = R.cache_from_capture(model, cap, cfg)
        aware.append([(l.store.block_tier[:n_ctx_blocks].clone(), l.scores[:n_ctx_blocks].clone()) for l in c.layers])
    what = 1 if method.startswith("agacc") else 0  # agacc: the block scores; the others: the tiers
    assert any(not torch.equal(a[what], b[what]) for a, b in zip(*aware)), "the question should change query-aware"

    cap = R.capture_prefill(model, ctx, [], n_obs=64)
    base = R.cache_from_capture(model, cap, cfg)
    before = _tiers(base)
    agnostic = []
    for q in (q1, q2):
        c = R.fork_cache(base)
        R.ask(model, c, q)
        agnostic.append(_tiers(c))
        assert all(torch.equal(a.scores, b.scores) for a, b in zip(c.layers, base.layers))
        assert c.seq_len == 256 + 40 and c.reevaluations == base.reevaluations  # the question re-evaluates nothing
    assert _same(agnostic[0], agnostic[1])
    # the context's blocks as compressed alone; the question's 40 tokens added as they are (hot entries)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2] + 40
               for a, b in zip(agnostic[0], before))
    # and the context is held compressed: as many bytes as a cache built from the context alone
    assert base.memory()["bytes"] == R.cache_from_capture(model, cap, cfg).memory()["bytes"]


@pytest.mark.parametrize("method", ["agacc@4", "hf-quantized:quanto-4", "hf-quantized:hqq-2"])
def test_reuse_second_question_is_unaffected_by_the_first(loaded, method):
    """One compressed context; question A asked on a fork and decoded for 20 tokens (re-evaluations on the
    fork), then question B on the original: B's logits equal B asked on a freshly built context."""
    from agacc.eval import runner as R
    from agacc.eval.cli import method_configs

    ((_, cfg),) = method_configs([method], None)
    assert not (R.is_external(cfg) and cfg.unavailable()), cfg.unavailable()  # dev requirements: installed
    model, tok = loaded
    g = torch.Generator().manual_seed(5)
    ctx = torch.randint(3, len(tok), (300,), generator=g).tolist()
    qa, qb = (torch.randint(3, len(tok), (24,), generator=g).tolist() for _ in range(2))

    def fresh():
        cap = R.capture_prefill(model, ctx, [], n_obs=64)
        return R._build(model, cfg, cap, ctx, None)[0]

    def answer(cache, q):
        first = R.ask(model, cache, q)
        return torch.cat([first[None], R.teacher_force(model, cache, qa[:12], chunk=1)])

    base = fresh()
    before = R._memory(cfg, base)["bytes"]
    reevals = getattr(base, "reevaluations", None)
    fork = R.fork_cache(base)
    answer(fork, qa)
    R.greedy(model, fork, torch.zeros(len(tok)), 20)
    if reevals is not None:
        assert fork.reevaluations > reevals and base.reevaluations == reevals  # the fork re-evaluates itself
    assert R._memory(cfg, base)["bytes"] == before and base.get_seq_length() == 300
    got = answer(base, qb)
    want = answer(fresh(), qb)
    assert torch.equal(got, want)


def test_cli_protocols_and_reuse(tiny_model, tmp_path, capsys):
    """Lossless preset: both protocols predict the same tokens on the same samples (the prompt tokens
    are identical, the cache lossless); the reuse run answers 3 questions per context from one
    compressed context; agacc@4 holds its context at about 4x."""
    from agacc.eval.cli import main

    text = tmp_path / "t.txt"
    text.write_text(CORPUS * 8)
    out = {}
    for proto in ("query-aware", "query-agnostic"):
        p = tmp_path / f"{proto}.json"
        assert main(["needle", "--model", tiny_model, "--preset", "full", "agacc@4", "--context-tokens", "640",
                     "--samples", "2", "--text", str(text), "--protocol", proto, "--json", str(p), "--no-progress"]) == 0
        out[proto] = {r["preset"]: r for r in json.loads(p.read_text())}
    aware, agn = out["query-aware"], out["query-agnostic"]
    assert "protocol" not in aware["full"] and agn["full"]["protocol"] == "query-agnostic"
    assert [s["prediction"] for s in aware["full"]["per_sample"]] == [s["prediction"] for s in agn["full"]["per_sample"]]
    assert agn["agacc@4"]["ratio"] >= 0.95 * 4  # the compressed context, what is kept

    p = tmp_path / "reuse.json"
    assert main(["needle", "--model", tiny_model, "--preset", "full", "agacc@4", "--context-tokens", "300",
                 "--samples", "2", "--reuse-questions", "3", "--text", str(text), "--protocol", "query-agnostic",
                 "--json", str(p), "--no-progress"]) == 0
    recs = json.loads(p.read_text())
    for r in recs:
        assert r["samples"] == 6 and r["reuse"] == 3 and r["protocol"] == "query-agnostic"
        assert [(s["context"], s["question"]) for s in r["per_sample"]] == [(c, q) for c in (0, 1) for q in (0, 1, 2)]
        # one compressed context per (method, context): the same bytes for its three questions
        assert len({s["kv_bytes"] for s in r["per_sample"] if s["context"] == 0}) == 1
    capsys.readouterr()
    assert main(["ppl", "--model", tiny_model, "--preset", "full", "--protocol", "query-agnostic", "--text", str(text)]) == 2
    assert "needs a question" in capsys.readouterr().err
    assert main(["passkey", "--model", tiny_model, "--reuse-questions", "3"]) == 2
    assert "--reuse-questions" in capsys.readouterr().err
