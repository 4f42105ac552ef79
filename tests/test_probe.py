"""The reconstruction probe (``agacc.probe``): a context compressed before its question is known is
scored by the most attention a pass that repeats it pays each token (KVzip's signal), then re-planned.

* the blocked chunk attention's "max" mass equals the dense reference's, over every kind of part;
* the probe's scores equal transformers' eager attention of the same forwards (context, instruction,
  chunk), and the cache ends holding the context alone, its peak counting one probe chunk;
* ``rescore_prompt`` plans with the scores it is given: a constructed case decides which blocks go;
* the eval's query-agnostic protocol runs the probe for ``context_probe=reconstruct`` only, query-aware
  never; bad input is refused with one clear message.

The lookahead (pseudo queries from the model's own greedy continuation, ``cfg.lookahead``):

* its evidence equals transformers' eager attention of the greedy continuation's queries, joined to the
  tracker's by the documented max, and the cache ends holding the prompt alone;
* ``generate()`` (the first decode step runs it: ``agacc.probe.first_step``) equals the loop that calls
  ``lookahead`` itself, token for token and tier for tier, and differs from no lookahead; a prompt whose
  plan is carried out before it runs warns;
* the eval harness runs it where the config asks; bad input is refused with one clear message."""
import warnings

import pytest
import torch

from agacc.attention import attend, chunk_attention
from agacc.cache import CompressedCache
from agacc.config import AGACCConfig
from agacc.probe import lookahead, reconstruct
from agacc.tiers import EVICTED
from tests.helpers import tier_maps, tiny_model as make_tiny
from tests.test_eval import loaded, tiny_model  # noqa: F401 (module-scoped fixtures)
from tests.test_long import H, store_with_every_part


@pytest.mark.parametrize("key_quant,rotate", [("channel", True), ("token", True)])
@pytest.mark.parametrize("groups", [1, 3])
def test_chunk_attention_max_mass_equals_the_reference(key_quant, rotate, groups):
    q = 29
    st = store_with_every_part(key_quant, rotate, q=q)
    query = torch.randn(1, H * groups, q, 64, generator=torch.Generator().manual_seed(7))
    _, want = attend(query, st.attention_entries(torch.float32), 0.125, causal_new=q, n_obs=11, reduce="max")
    _, got = chunk_attention(query, st.parts(), 0.125, n_new=q, n_obs=11, block=16, reduce="max")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    _, mean = chunk_attention(query, st.parts(), 0.125, n_new=q, n_obs=11, block=16)
    assert bool((got >= mean - 1e-7).all()) and float(got.sum()) > 2 * float(mean.sum())  # a max, not a mean
    with pytest.raises(ValueError, match="reduce"):
        chunk_attention(query, st.parts(), 0.125, n_new=q, n_obs=11, reduce="sum")


def _lossless_looking(**kw):
    """Compressing (tiers planned, probes run) but every block above tau_h, the hot region at 16 bits: K/V stay
    exact."""
    return AGACCConfig.preset("agacc", tau_h=1e-9, tau_l=5e-10, tau_e=0.0, sink_bits=16, hot_bits=16, **kw)


def _prefill(model, cfg, ctx, chunk=40):
    cache = CompressedCache(model.config, cfg)
    with torch.inference_mode():
        for a in range(0, len(ctx), chunk):
            model(input_ids=torch.tensor([ctx[a:a + chunk]]), past_key_values=cache, use_cache=True)
    return cache


def test_reconstruct_scores_equal_eager_attention_and_leave_the_context():
    model = make_tiny(layers=2)
    ref = make_tiny(layers=2)  # the same weights (same seed), attending with transformers' eager path
    ref.set_attn_implementation("eager")
    g = torch.Generator().manual_seed(3)
    ctx = torch.randint(3, 256, (100,), generator=g).tolist()
    rep = [7, 8, 9]
    cache = _prefill(model, _lossless_looking(), ctx)
    before = [(l.store.seq_len, l.store.hot_start, l.store.n_entries, l.store.hot_k.clone()) for l in cache.layers]
    held0 = cache.memory()["bytes"]
    scores = reconstruct(model, cache, ctx, rep, chunk=32)
    want = [torch.zeros(100) for _ in range(2)]
    with torch.inference_mode():
        for a in range(0, 100, 32):
            att = ref(input_ids=torch.tensor([ctx + rep + ctx[a:a + 32]]), output_attentions=True).attentions
            for l, w in enumerate(att):  # the chunk's queries (not the instruction's) onto the context
                want[l] = torch.maximum(want[l], w[0, :, 100 + len(rep):, :100].amax((0, 1)))
    for got, w in zip(scores, want):
        torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-6)
    for l, s in zip(cache.layers, scores):
        torch.testing.assert_close(l.tracker.importance[:100], s)  # what the plan was made from
    for l, (n, hot, ent, hk) in zip(cache.layers, before):  # the probe's tokens are gone again
        assert (l.store.seq_len, l.store.hot_start, l.store.n_entries) == (n, hot, ent)
        assert torch.equal(l.store.hot_k, hk)
    # the peak saw the context and one probe forward's tokens (instruction + 32) at full precision, never
    # two chunks at once (each is cropped off before the next); a few hundred bytes of tracker state aside
    kv_token = sum(2 * l.store.hot_k[0, :, 0].nbytes for l in cache.layers)
    probe_peak = held0 + (len(rep) + 32) * kv_token
    assert probe_peak <= cache.memory()["peak_bytes"] <= probe_peak + 512


def test_rescore_prompt_plans_with_the_scores_given():
    """Constructed scores: the first half of the context's blocks attended, the second half not; at 4x
    the held evictions, carried out by end_prefill, all fall in the second half."""
    model = make_tiny(layers=2)
    ctx = torch.randint(3, 256, (320,), generator=torch.Generator().manual_seed(4)).tolist()
    cfg = AGACCConfig.preset("agacc", target_ratio=4.0, n_sink=0, lookahead=0)
    cache = _prefill(model, cfg, ctx, chunk=64)
    n = 320
    s = torch.cat([torch.linspace(1.0, 0.5, n // 2), torch.full((n // 2,), 1e-4)])
    cache.rescore_prompt([s, s])
    cache.end_prefill()
    for l in cache.layers:
        tier = l.store.block_tier
        ev = (tier == EVICTED).nonzero().flatten()
        assert ev.numel() > 0 and int(ev.min()) >= (n // 2) // 16, ev.tolist()
    with pytest.raises(ValueError, match="one score tensor per layer"):
        cache.rescore_prompt([s])


def test_reconstruct_refuses_bad_input():
    model = make_tiny(layers=2)
    ctx = list(range(3, 60))
    cache = _prefill(model, _lossless_looking(), ctx)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        reconstruct(model, cache, ctx, [7], chunk=0)
    with pytest.raises(ValueError, match="the cache holds 57 tokens, the context has 56"):
        reconstruct(model, cache, ctx[:-1], [7])
    with pytest.raises(ValueError, match="repeat instruction"):
        reconstruct(model, cache, ctx, [])
    with pytest.raises(TypeError, match="CompressedCache"):
        reconstruct(model, object(), ctx, [7])
    with pytest.raises(ValueError, match="context_probe must be one of"):
        AGACCConfig.preset("agacc", context_probe="bogus")
    full = _prefill(model, AGACCConfig.preset("full"), ctx)
    assert reconstruct(model, full, ctx, [7]) == [] and full.seq_len == len(ctx)  # lossless: nothing to plan


def test_query_agnostic_eval_runs_the_probe_where_asked(loaded, monkeypatch):
    from agacc.eval import runner as R
    from agacc.eval import tasks as T
    from tests.test_eval import CORPUS

    model, tok = loaded
    calls = []
    real = R.reconstruct
    monkeypatch.setattr(R, "reconstruct", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    (s,) = T.needle(tok, 256, 1, text=CORPUS * 8)
    configs = [("probe", AGACCConfig.preset("agacc", target_ratio=4.0, context_probe="reconstruct")),
               ("none", AGACCConfig.preset("agacc", target_ratio=4.0))]
    out = R.evaluate_group(model, tok, [s], configs, prefill_chunk=64)
    assert calls == [len(s.context_ids)] and [r["preset"] for r in out] == ["probe", "none"]
    assert all(r["ratio"] > 2.5 for r in out)
    calls.clear()
    R.evaluate_sample(model, tok, s, configs, prefill_chunk=64)  # query-aware: the question is in the prompt
    assert calls == []


def _greedy(model, ids: list[int], k: int) -> list[int]:
    """k greedy tokens after ``ids``, each from a full forward (no cache)."""
    out = list(ids)
    with torch.inference_mode():
        for _ in range(k):
            out.append(int(model(input_ids=torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


def test_lookahead_evidence_equals_eager_attention_of_the_greedy_continuation():
    model = make_tiny(layers=2)
    ref = make_tiny(layers=2)  # the same weights (same seed), attending with transformers' eager path
    ref.set_attn_implementation("eager")
    ctx = torch.randint(3, 256, (100,), generator=torch.Generator().manual_seed(5)).tolist()
    cache = _prefill(model, _lossless_looking(lookahead=4), ctx)
    raw = [l.tracker.raw()[:100].clone() for l in cache.layers]
    before = [(l.store.seq_len, l.store.hot_start, l.store.n_entries, l.store.hot_k.clone()) for l in cache.layers]
    held0, reevals = cache.memory()["bytes"], cache.reevaluations
    cont = _greedy(ref, ctx, 4)
    scores = lookahead(model, cache, cont[0])  # k = the config's 4; its next three chosen by the cache's logits
    with torch.inference_mode():
        att = ref(input_ids=torch.tensor([ctx + cont]), output_attentions=True).attentions
    lifted = 0
    for l, (got, r) in enumerate(zip(scores, raw)):
        look = att[l][0, :, 100:, :100].mean(0).sum(0)  # the 4 pseudo queries, mean over query heads
        want = torch.maximum(r / r.mean(), look / look.mean()) * r.mean()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(cache.layers[l].tracker.importance[:100], got)  # what the plan was made from
        lifted += int((look / look.mean() > r / r.mean()).sum())
    assert 0 < lifted < 200  # both sides of the max decide somewhere: the check reads the pseudo queries
    for l, (n, hot, ent, hk) in zip(cache.layers, before):  # the pseudo tokens are gone again
        assert (l.store.seq_len, l.store.hot_start, l.store.n_entries) == (n, hot, ent)
        assert torch.equal(l.store.hot_k, hk)
    assert cache.steps == 0 and cache.reevaluations == reevals + 1  # no decode step counted; one re-plan
    kv_token = sum(2 * l.store.hot_k[0, :, 0].nbytes for l in cache.layers)
    assert held0 + 4 * kv_token <= cache.memory()["peak_bytes"] <= held0 + 4 * kv_token + 512
    # a weight on the pseudo queries' side of the max: 0.5 lifts fewer tokens
    again = _prefill(model, _lossless_looking(lookahead=4, lookahead_weight=0.5), ctx)
    half = lookahead(model, again, cont[0])
    assert all(bool((h <= s + 1e-9).all()) for h, s in zip(half, scores)) and any(
        bool((h < s - 1e-9).any()) for h, s in zip(half, scores))


def test_repeat_evidence_equals_eager_attention_of_the_prompt_read_again(monkeypatch):
    """``repeat_weight``: the prompt's tokens go in again, ``REPEAT_CHUNK`` a forward right after it; each chunk's
    mean attention (over query heads and its queries) to the prompt, summed over chunks, joins the tracker's
    evidence by the documented max; the cache ends holding the prompt alone, its peak counting one chunk."""
    import agacc.probe as P

    monkeypatch.setattr(P, "REPEAT_CHUNK", 40)  # three forwards: 40, 40 and 20 tokens
    model = make_tiny(layers=2)
    ref = make_tiny(layers=2)
    ref.set_attn_implementation("eager")
    ctx = torch.randint(3, 256, (100,), generator=torch.Generator().manual_seed(6)).tolist()
    cache = _prefill(model, _lossless_looking(repeat_weight=0.5, lookahead=0), ctx)
    raw = [l.tracker.raw()[:100].clone() for l in cache.layers]
    held0, reevals = cache.memory()["bytes"], cache.reevaluations
    assert [i.shape[1] for i, _ in cache.prompt_ids] == [40, 40, 20]  # the hook recorded the prompt's forwards
    scores = lookahead(model, cache, 5)  # lookahead=0: the repeat alone
    assert cache.prompt_ids == [] and cache.looked_ahead
    rep = [0, 0]
    with torch.inference_mode():
        for lo in range(0, 100, 40):
            part = ctx[lo:lo + 40]
            att = ref(input_ids=torch.tensor([ctx + part]), output_attentions=True).attentions
            for l in range(2):
                rep[l] = rep[l] + att[l][0, :, 100:, :100].mean(0).mean(0)
    lifted = 0
    for l, (got, r, R) in enumerate(zip(scores, raw, rep)):
        want = torch.maximum(r / r.mean(), 0.5 * R / R.mean()) * r.mean()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(cache.layers[l].tracker.importance[:100], got)
        lifted += int((0.5 * R / R.mean() > r / r.mean()).sum())
    assert 0 < lifted < 200
    assert all(l.store.seq_len == 100 for l in cache.layers) and cache.steps == 0
    assert cache.reevaluations == reevals + 1
    kv_token = sum(2 * l.store.hot_k[0, :, 0].nbytes for l in cache.layers)
    assert held0 + 40 * kv_token <= cache.memory()["peak_bytes"] <= held0 + 40 * kv_token + 2048
    # the ids given equal the ids recorded; a prompt that went in as embeddings warns that the repeat did not run
    again = _prefill(model, _lossless_looking(repeat_weight=0.5, lookahead=0), ctx)
    again.prompt_ids = []
    for a, b in zip(lookahead(model, again, 5, prompt_ids=ctx), scores):
        assert torch.equal(a, b)
    emb = CompressedCache(model.config, _lossless_looking(repeat_weight=0.5, lookahead=0))
    with torch.inference_mode():
        model(inputs_embeds=model.get_input_embeddings()(torch.tensor([ctx])), past_key_values=emb, use_cache=True)
    with pytest.warns(UserWarning, match="repeat_weight=0.5 did not run: the prompt's token ids are unknown"):
        assert lookahead(model, emb, 5) == []
    with pytest.raises(ValueError, match="prompt_ids has 101 tokens; the cache holds 100"):
        lookahead(model, _prefill(model, _lossless_looking(repeat_weight=0.5, lookahead=0), ctx), 5,
                  prompt_ids=ctx + [3])


def test_repeat_weight_follows_the_fitted_ratio():
    from agacc.config import forecasts, repeat_weight

    assert repeat_weight(AGACCConfig.preset("agacc", target_ratio=8.0)) == 0.5
    assert repeat_weight(AGACCConfig.preset("agacc", target_ratio=4.28)) == 0.5  # above 4x
    assert repeat_weight(AGACCConfig.preset("agacc", target_ratio=4.0)) == 0.0
    assert repeat_weight(AGACCConfig.preset("agacc")) == 0.0  # unfitted: thresholds as set
    assert repeat_weight(AGACCConfig.preset("agacc", target_ratio=2.0, repeat_weight=1.5)) == 1.5
    assert repeat_weight(AGACCConfig.preset("full", repeat_weight=1.0)) == 0.0
    assert not forecasts(AGACCConfig.preset("full"))
    assert forecasts(AGACCConfig.preset("agacc", lookahead=0, target_ratio=8.0))
    assert not forecasts(AGACCConfig.preset("agacc", lookahead=0, repeat_weight=0.0, target_ratio=8.0))
    with pytest.raises(ValueError, match="repeat_weight must be >= 0"):
        AGACCConfig.preset("agacc", repeat_weight=-1.0)


@pytest.mark.parametrize("chunk", [None, 64])
def test_generate_runs_the_lookahead_at_its_first_decode_step(chunk):
    """One prefill forward, or generate()'s own chunked prefill (``prefill_chunk_size``): the same tokens, tiers
    and bytes as the loop that calls ``lookahead`` itself, and not those of no lookahead."""
    from agacc.eval.runner import greedy

    model = make_tiny(layers=2)
    ctx = torch.randint(3, 256, (200,), generator=torch.Generator().manual_seed(7)).tolist()
    cfg = AGACCConfig.preset("agacc", target_ratio=5.0, lookahead=3, lookahead_weight=4.0, n_sink=0)
    ids, step = torch.tensor([ctx]), chunk or 200

    def by_hand(look: bool):
        cache = CompressedCache(model.config, cfg)
        with torch.inference_mode():
            for lo in range(0, 200, step):
                first = model(input_ids=ids[:, lo:lo + step], past_key_values=cache, use_cache=True).logits[0, -1]
        if look:
            lookahead(model, cache, int(first.argmax()))
        else:
            cache.looked_ahead = True  # (the first decode step would run it)
        return cache, greedy(model, cache, first, 6)

    mine, want = by_hand(True)
    cache = CompressedCache(model.config, cfg)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=6,
                             min_new_tokens=6, do_sample=False, pad_token_id=0, prefill_chunk_size=chunk)
    assert not [w for w in seen if "lookahead" in str(w.message)]
    assert out[0, 200:].tolist() == want and cache.looked_ahead
    for a, b in zip(tier_maps(mine), tier_maps(cache)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert mine.memory()["bytes"] == cache.memory()["bytes"]
    plain, _ = by_hand(False)
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(tier_maps(plain), tier_maps(cache)))  # it re-planned
    # a prompt whose plan is carried out first (end_prefill) says the lookahead did not run, once a prompt
    late = CompressedCache(model.config, cfg)
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=late, use_cache=True)
    with pytest.warns(UserWarning, match="lookahead=3 and repeat_weight=0.5 did not run"):
        late.end_prefill()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        late.end_prefill()
        with torch.inference_mode():
            model(input_ids=ids[:, :1], past_key_values=late, use_cache=True)  # nor then at the decode step
    assert late.seq_len == 201


def test_a_padded_batch_repeats_each_rows_prompt_without_its_padding():
    """generate() over a left-padded batch: each row's cache repeats that row's own prompt (the hook's record,
    padding dropped) and gets the tokens, tiers and bytes it gets alone."""
    model = make_tiny(layers=2)
    cfg = AGACCConfig.preset("agacc", target_ratio=5.0, lookahead=2, n_sink=0)
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(3, 256, (2, 400), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :64] = 0  # one whole prefill chunk of padding: row 1's chunks are those it has alone
    ids[1, :64] = 0

    def gen(ids, mask, cache):
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=5,
                                  min_new_tokens=5, do_sample=False, pad_token_id=0, prefill_chunk_size=64)

    cache = CompressedCache(model.config, cfg)
    out = gen(ids, mask, cache)
    assert len(cache.rows) == 2 and all(r.looked_ahead for r in cache.rows) and cache.prompt_ids == []
    for r in range(2):
        real = ids[r:r + 1, mask[r].bool()]
        alone = CompressedCache(model.config, cfg)
        assert torch.equal(out[r, -5:], gen(real, torch.ones_like(real), alone)[0, -5:])
        for a, b in zip(tier_maps(cache.rows[r]), tier_maps(alone)):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    off = CompressedCache(model.config, AGACCConfig.preset("agacc", target_ratio=5.0, lookahead=2, n_sink=0,
                                                           repeat_weight=0.0))
    gen(ids[1:, 64:], torch.ones_like(ids[1:, 64:]), off)
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(tier_maps(off), tier_maps(alone)))  # the repeat re-planned


def test_lookahead_refuses_bad_input_and_leaves_the_lossless_preset_alone():
    model = make_tiny(layers=2)
    ctx = list(range(3, 60))
    cache = _prefill(model, _lossless_looking(lookahead=2), ctx)
    with pytest.raises(TypeError, match="CompressedCache"):
        lookahead(model, object(), 5)
    with pytest.raises(ValueError, match="k >= 0 pseudo tokens and a weight > 0"):
        lookahead(model, cache, 5, k=-1)
    with pytest.raises(ValueError, match="k >= 0 pseudo tokens and a weight > 0"):
        lookahead(model, cache, 5, weight=0.0)
    with pytest.raises(ValueError, match="the cache is empty"):
        lookahead(model, CompressedCache(model.config, _lossless_looking()), 5)
    with pytest.raises(ValueError, match="lookahead must be in 0..256"):
        AGACCConfig.preset("agacc", lookahead=-1)
    with pytest.raises(ValueError, match="lookahead_weight must be > 0"):
        AGACCConfig.preset("agacc", lookahead_weight=0.0)
    full = _prefill(model, AGACCConfig.preset("full", lookahead=2), ctx)
    assert lookahead(model, full, 5) == [] and full.seq_len == len(ctx)  # lossless: nothing to plan


def test_the_eval_harness_runs_the_lookahead_where_asked(loaded, monkeypatch):
    """The captured prompt and a chunked prefill: the lookahead runs where the config forecasts, given the prompt's
    ids (the capture holds no forward for the hook to record), and the repeat reads them (no warning)."""
    from agacc.eval import runner as R
    from agacc.eval import tasks as T
    from tests.test_eval import CORPUS

    model, tok = loaded
    calls = []
    real = R.lookahead
    monkeypatch.setattr(R, "lookahead", lambda *a, **k: calls.append((a[1].seq_len, list(k["prompt_ids"])))
                        or real(*a, **k))
    (s,) = T.needle(tok, 256, 1, text=CORPUS * 8)
    configs = [("look", AGACCConfig.preset("agacc", target_ratio=4.0, lookahead=2, repeat_weight=0.5)),
               ("none", AGACCConfig.preset("agacc", target_ratio=4.0, lookahead=0))]
    for prefill_chunk in (None, 64):  # the captured prompt and a chunked prefill
        calls.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = R.evaluate_sample(model, tok, s, configs, prefill_chunk=prefill_chunk)
        assert calls == [(len(s.prompt_ids), list(s.prompt_ids))] and [r["preset"] for r in out] == ["look", "none"]
        assert all(r["ratio"] > 2.5 for r in out)


def test_the_repeat_keeps_the_prefill_peak_and_the_forecast_bench_reports_it(monkeypatch):
    """``bench/bench_forecast.py``: a repeat forward's ``REPEAT_CHUNK`` tokens at full precision beside the held prompt
    stay under a 512-token prefill chunk's peak, so the peak with the repeat is the peak without it; the forecasts
    take time only where the config asks for them."""
    from bench.bench_forecast import measure
    from bench.common import parse_methods

    model = make_tiny(layers=2)
    ids = torch.randint(3, 256, (1, 1024), generator=torch.Generator().manual_seed(4))
    methods = parse_methods(["agacc@8,lookahead=0", "agacc@8,lookahead=0,repeat_weight=0"])
    rep, off = measure(model, ids, methods, 512, 1)
    assert rep["peak_bytes"] == off["peak_bytes"] > 0
    assert len(rep["first_token_s"]) == 1 and rep["forecast_s"][0] > 0 and off["forecast_s"][0] < rep["forecast_s"][0]
    import agacc.probe as P
    from agacc import CompressedCache
    big = CompressedCache(model.config, methods[0][1])  # a 512-token repeat forward would raise it
    with torch.inference_mode():
        for lo in range(0, 1024, 512):
            first = model(input_ids=ids[:, lo:lo + 512], past_key_values=big, use_cache=True).logits[0, -1]
    monkeypatch.setattr(P, "REPEAT_CHUNK", 512)
    lookahead(model, big, int(first.argmax()), prompt_ids=ids)
    assert big.memory()["peak_bytes"] > rep["peak_bytes"]
