"""bench/evict_sim.py: the kept units by hand, the scores by hand, and the masked forward against a
reference (keeping everything is the plain forward; the prompt's own logits never change)."""
import torch
from transformers import AttentionInterface

from bench import evict_sim
from tests.helpers import tiny_model


def test_keep_mask_by_hand():
    t = 64
    s = torch.zeros(1, t)
    s[0, 20], s[0, 41], s[0, 42] = 5.0, 3.0, 4.0  # the first and last 16 are always kept
    m = evict_sim.keep_mask(s, 48 / 64, 16)[0]   # 3 blocks of 16 of 4: the protected two and 16-31 (5 > 4)
    assert m.tolist() == [True] * 32 + [False] * 16 + [True] * 16
    m = evict_sim.keep_mask(s, 35 / 64, 1)[0]    # token level: 32 protected + the 3 best
    assert m.nonzero().squeeze(1).tolist() == list(range(16)) + [20, 41, 42] + list(range(48, 64))
    m = evict_sim.keep_mask(s, 37 / 64, 1, pool=3)[0]  # ranked by the 3-max: 19-21 and 40-43 score > 0
    kept = set(m.nonzero().squeeze(1).tolist()) - set(range(16)) - set(range(48, 64))
    assert len(kept) == 5 and kept <= {19, 20, 21, 40, 41, 42, 43}


def test_scores_by_hand():
    probs = torch.tensor([[[1.0, 0, 0, 0], [0.4, 0.6, 0, 0], [0.5, 0.3, 0.2, 0], [0.1, 0.6, 0.2, 0.1]]])
    q = k = torch.zeros(1, 4, 2)
    torch.testing.assert_close(evict_sim.score_of("oracle", q, k, probs, 2), torch.tensor([[0.5, 0.6]]))
    torch.testing.assert_close(evict_sim.score_of("last2", q, k, probs, 2), torch.tensor([[0.7, 0.3]]))
    torch.testing.assert_close(evict_sim.score_of("last2max", q, k, probs, 2), torch.tensor([[1.0, 0.6]]))
    # expected attention: one query, no spread -> the softmax of its logits
    q = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    k = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    want = (torch.tensor([0.0, 2.0]) * 2 ** -0.5).softmax(-1)[None]
    torch.testing.assert_close(evict_sim.score_of("ea1", q, k, probs, 2), want)


def test_value_aware_scores_by_hand():
    """last2 over rows 0-1 (attention (1, 0) and (0.4, 0.6) on tokens 0-1), values 3 and -4: ``v`` is the mean
    attention x |v| = (0.7 * 3, 0.3 * 4); ``vd`` the mean of attention x |v - that query's output| (outputs 3 and
    -1.2): token 0 (1 * 0 + 0.4 * 4.2) / 2, token 1 (0 * 7 + 0.6 * 2.8) / 2; ``vo`` the same through o_proj (x2)."""
    probs = torch.tensor([[[1.0, 0, 0, 0], [0.4, 0.6, 0, 0], [0.5, 0.3, 0.2, 0], [0.1, 0.6, 0.2, 0.1]]])
    q = k = torch.zeros(1, 4, 1)
    vals = (torch.tensor([[[3.0], [-4.0], [1.0], [1.0]]]), torch.tensor([[2.0]]))
    score = lambda name: evict_sim.score_of(name, q, k, probs, 2, None, vals)  # noqa: E731
    torch.testing.assert_close(score("last2v"), torch.tensor([[2.1, 1.2]]))
    torch.testing.assert_close(score("last2vd"), torch.tensor([[0.84, 0.84]]))
    torch.testing.assert_close(score("last2vo"), torch.tensor([[1.68, 1.68]]))


def test_token_forecasts_by_hand():
    ids = torch.tensor([5, 7, 5, 9, 7, 3])                  # 5 and 7 twice, 9 and 3 once
    assert evict_sim.repeats("self2", ids).tolist() == [1, 1, 1, 0, 1, 0]
    assert evict_sim.repeats("prev2", ids).tolist() == [0, 1, 1, 1, 0, 1]
    ids = torch.tensor([4] * 9 + [6, 6, 1])                # 4 nine times: repeated, but common
    assert evict_sim.repeats("prevfew", ids).tolist() == [0] * 10 + [1, 1]
    assert evict_sim.repeats("prev2", ids).tolist() == [0] + [1] * 11
    # the forecast is added to the base score divided by its mean over the unprotected tokens
    t, T = 40, 41
    probs = torch.rand(1, T, T, generator=torch.Generator().manual_seed(0)).tril()
    q = k = torch.zeros(1, T, 2)
    ids = torch.arange(T) % 30                              # ids 0..10 twice in the first 40
    base = evict_sim.score_of("last4", q, k, probs, t)
    want = base / base[:, 16:24].mean() + 0.5 * evict_sim.repeats("prev2", ids[:t])
    torch.testing.assert_close(evict_sim.score_of("last4+prev2x0.5", q, k, probs, t, ids), want)


def test_masked_forward_keeps_everything_or_hides_the_dropped_tokens_from_decode_only():
    model = tiny_model(layers=2)
    ids = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(0))
    t = 64
    with torch.inference_mode():
        model.set_attn_implementation("sdpa")
        want = model(ids, use_cache=False).logits
        rec = evict_sim.Recorder(t)
        AttentionInterface.register("agacc_evict_sim", rec)
        model.set_attn_implementation("agacc_evict_sim")
        rec.keep = {i: torch.ones(1, t, dtype=torch.bool) for i in range(2)}
        torch.testing.assert_close(model(ids, use_cache=False).logits, want, atol=1e-4, rtol=0)
        keep = torch.ones(2, t, dtype=torch.bool)
        keep[:, 20:40] = False
        rec.keep = {i: keep for i in range(2)}
        got = model(ids, use_cache=False).logits
        # the same forward by hand: the decode tokens alone, over a cache without the dropped tokens
        from transformers import DynamicCache
        model.set_attn_implementation("sdpa")
        cache = DynamicCache(config=model.config)
        model(ids[:, :t], past_key_values=cache)
        for layer in cache.layers:
            layer.keys = torch.cat([layer.keys[:, :, :20], layer.keys[:, :, 40:]], 2)
            layer.values = torch.cat([layer.values[:, :, :20], layer.values[:, :, 40:]], 2)
        pos = torch.arange(t, 96)[None]
        ref = model(ids[:, t:], past_key_values=cache, position_ids=pos,
                    cache_position=torch.arange(t - 20, 96 - 20)).logits
    torch.testing.assert_close(got[:, :t], want[:, :t], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[:, t:], ref, atol=1e-4, rtol=0)
    assert float((got[:, t:] - want[:, t:]).abs().max()) > 1e-2


def test_band_order_by_hand():
    s = torch.tensor([[0.0, 5, 0, 0, 0, 0, 0, 3]])  # max-pooled over 3: 5 5 5 0 0 0 3 3
    assert evict_sim.band_order(s, 2).tolist() == [[0, 1, 2, 6, 3, 4, 5, 7]]  # best four (0, 1, 2, 6), then the rest
    assert evict_sim.band_order(s, 8).tolist() == [[0, 1, 2, 6, 7, 3, 4, 5]]  # one band a token: a full sort (stable)
    assert evict_sim.band_order(s, 1).tolist() == [list(range(8))]


def test_band_mask_keeps_whole_blocks_of_the_band_order():
    t = 64
    s = torch.zeros(1, t)
    s[0, 20], s[0, 30] = 5.0, 4.0   # pooled: 19-21 and 29-31 score; the rest 0
    m = evict_sim.band_mask(s, 48 / 64, 2)[0]   # 32 rows between the protected: bands of 16
    # band 0: the 6 scored tokens and the first 10 zero-scored ones in position order... by the stable sort:
    # ranks 0-5 are 19, 20, 21 (5) and 29, 30, 31 (4); ranks 6-15 the zeros 16, 17, 18, 22, ... 28
    band0 = {19, 20, 21, 29, 30, 31, 16, 17, 18, 22, 23, 24, 25, 26, 27, 28}
    assert set(m.nonzero().squeeze(1).tolist()) == set(range(16)) | band0 | set(range(48, 64))


def test_key_error_grows_when_blocks_mix_distant_rows():
    """Keys drifting slowly with position: blocks of neighbours have narrow per-channel ranges, blocks of
    scattered rows wide ones; 8-bit keys are nearly exact. The order is undone before the attention."""
    torch.manual_seed(0)
    t, d = 256, 64
    k = (torch.linspace(-3, 3, t)[:, None] * torch.randn(1, d) + 0.05 * torch.randn(t, d))[None]
    q = torch.randn(2, t, d)
    contiguous = evict_sim.key_error(q, k, torch.arange(t))
    scattered = evict_sim.key_error(q, k, torch.randperm(t))
    assert scattered > 3 * contiguous
    assert evict_sim.key_error(q, k, torch.randperm(t), bits=8) < 0.05 * scattered
    assert evict_sim.grouping_order("contiguous", torch.rand(t)).tolist() == list(range(t))
    s = torch.rand(t)
    assert sorted(evict_sim.grouping_order("bands4", s).tolist()) == list(range(t))


def test_lookahead_scores_by_hand():
    """``look<K>`` is the mean of the K pseudo queries' attention, ``look<K>max`` its max, ``last<N>look<K>`` the N last
    prompt queries' rows and the K pseudo ones together."""
    probs = torch.tensor([[[1.0, 0, 0, 0], [0.4, 0.6, 0, 0], [0.5, 0.3, 0.2, 0], [0.1, 0.6, 0.2, 0.1]]])
    q = k = torch.zeros(1, 4, 2)
    look = torch.tensor([[[0.2, 0.8], [0.6, 0.2], [0.0, 0.0]]])  # [Hq, 3 pseudo queries, t = 2]
    score = lambda name: evict_sim.score_of(name, q, k, probs, 2, None, None, look)  # noqa: E731
    torch.testing.assert_close(score("look2"), torch.tensor([[0.4, 0.5]]))
    torch.testing.assert_close(score("look2max"), torch.tensor([[0.6, 0.8]]))
    torch.testing.assert_close(score("last1look2"), torch.tensor([[(0.4 + 0.2 + 0.6) / 3, (0.6 + 0.8 + 0.2) / 3]]))


def test_lookahead_is_the_attention_the_greedy_continuation_pays_the_prompt():
    """Against an eager forward over prompt + the model's own greedy tokens: each pseudo query's attention to the
    prompt tokens, per query head; the continuation is what argmax decoding with a cache gives."""
    from bench import common

    model = tiny_model()
    prompt = torch.randint(3, 200, (1, 40), generator=torch.Generator().manual_seed(0))
    ids = common.greedy_continuation(model, prompt, 5)
    with torch.inference_mode():
        want = model.generate(prompt, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert torch.equal(ids, want)
    rec = evict_sim.Recorder(40)
    AttentionInterface.register("agacc_evict_sim_test", rec)
    impl = model.config._attn_implementation
    model.set_attn_implementation("agacc_evict_sim_test")
    try:
        look = evict_sim.lookahead(model, rec, prompt, 5)
    finally:
        model.set_attn_implementation("eager")
    with torch.inference_mode():
        attn = model(ids, output_attentions=True, use_cache=False).attentions
    model.set_attn_implementation(impl)
    for layer, a in enumerate(attn):
        torch.testing.assert_close(look[layer], a[0, :, 40:, :40].float(), rtol=1e-4, atol=1e-5)
