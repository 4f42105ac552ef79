"""The reconstruction probe (``agacc.probe``): a context compressed before its question is known is
scored by the most attention a pass that repeats it pays each token (KVzip's signal), then re-planned.

* the blocked chunk attention's "max" mass equals the dense reference's, over every kind of part;
* the probe's scores equal transformers' eager attention of the same forwards (context, instruction,
  chunk), and the cache ends holding the context alone, its peak counting one probe chunk;
* ``rescore_prompt`` plans with the scores it is given: a constructed case decides which blocks go;
* the eval's query-agnostic protocol runs the probe for ``context_probe=reconstruct`` only, query-aware
  never; bad input is refused with one clear message."""
import pytest
import torch

from agacc.attention import attend, chunk_attention
from agacc.cache import CompressedCache
from agacc.config import AGACCConfig
from agacc.probe import reconstruct
from agacc.tiers import EVICTED
from tests.helpers import tiny_model as make_tiny
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
    """Compressing (tiers planned, probes run) but every block above tau_h: K/V stay exact."""
    return AGACCConfig.preset("agacc", tau_h=1e-9, tau_l=5e-10, tau_e=0.0, sink_bits=16, **kw)


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
    cfg = AGACCConfig.preset("agacc", target_ratio=4.0, n_sink=0)
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

