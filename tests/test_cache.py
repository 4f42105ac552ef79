import pytest
import torch
from transformers import DynamicCache

import agacc
from agacc import tiers as T
from agacc.attention import observe_prefill
from agacc.config import AGACCConfig
from agacc.planner import planned_bytes
from agacc.presets import FIXED_RATIO, PRESETS
from tests.helpers import tiny_model, walk_tensor_bytes


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(layers=2)


def tokens(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, n), generator=g)


def greedy(model, ids, cache, n_new):
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                              max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0)


def test_enabled_model_with_dynamic_cache_is_unchanged(tiny):
    ids = tokens(50)
    with torch.inference_mode():
        a = tiny(ids, past_key_values=DynamicCache(config=tiny.config)).logits
        tiny.set_attn_implementation("sdpa")
        b = tiny(ids, past_key_values=DynamicCache(config=tiny.config)).logits
        agacc.enable(tiny)
    assert torch.equal(a, b)


def teacher_forced_logits(model, ids, cache, prefill):
    with torch.inference_mode():
        rows = [model(ids[:, :prefill], past_key_values=cache).logits[:, -1]]
        for t in range(prefill, ids.shape[1]):
            rows.append(model(ids[:, t:t + 1], past_key_values=cache).logits[:, -1])
    return torch.stack(rows, 1)


def test_full_preset_matches_plain_logits_on_tiny(tiny):
    """Random weights make near-ties, so compare logits (greedy equality is tested on the real model)."""
    ids = tokens(340)
    ref = teacher_forced_logits(tiny, ids, DynamicCache(config=tiny.config), 300)
    out = teacher_forced_logits(tiny, ids, agacc.CompressedCache(tiny.config, AGACCConfig.preset("full")), 300)
    assert torch.allclose(ref, out, atol=1e-4, rtol=0)


def test_compressed_cache_holds_fewer_bytes_and_memory_is_honest(tiny):
    ids = tokens(600)
    cfg = AGACCConfig.preset("agacc", block_size=16, recent_window=32, n_r=4)
    cache = agacc.CompressedCache(tiny.config, cfg)
    greedy(tiny, ids, cache, 20)
    mem = cache.memory()
    assert mem["bytes"] == walk_tensor_bytes(cache.layers)  # every tensor the cache holds, counted once
    assert mem["bytes_fp16"] == 2 * 2 * 2 * 619 * 32 * 2  # layers x K/V x heads x tokens x dim x 2 bytes
    assert mem["ratio"] > 1.5
    assert sum(mem["by_tier"].values()) == mem["bytes"]
    # generation stays coherent with the model's positions
    assert cache.get_seq_length() == 619 and cache.layers[0].store.n_entries <= 619


def test_prefill_then_decode_logits_close_to_full_at_8_bits(tiny):
    ids = tokens(400)
    cfg = AGACCConfig.preset("agacc", tau_h=1e6, tau_l=1e-6, tau_e=0.0, b_min=8, b_max=8, block_size=16,
                             recent_window=16)
    with torch.inference_mode():
        ref_cache, cache = DynamicCache(config=tiny.config), agacc.CompressedCache(tiny.config, cfg)
        tiny(ids[:, :300], past_key_values=ref_cache)
        tiny(ids[:, :300], past_key_values=cache)
        assert int((cache.layers[0].store.block_tier == T.INT8).sum()) == (300 - 16) // 16 - 1  # - sink block
        for t in range(300, 320):
            a = tiny(ids[:, t:t + 1], past_key_values=ref_cache).logits
            b = tiny(ids[:, t:t + 1], past_key_values=cache).logits
            # 8-bit codes: logits within 0.3% of their range (the lm_head of the tiny model is scaled x40)
            assert float((a - b).abs().max()) < 3e-3 * float(a.abs().max()), (t, (a - b).abs().max())


def test_chunked_prefill_attends_over_stored_entries(tiny):
    """A second prompt chunk goes through the general path; with the full preset it equals one prefill."""
    ids = tokens(200)
    with torch.inference_mode():
        ref = tiny(ids, past_key_values=DynamicCache(config=tiny.config)).logits[:, -1]
        cache = agacc.CompressedCache(tiny.config, AGACCConfig.preset("full"))
        tiny(ids[:, :120], past_key_values=cache)
        out = tiny(ids[:, 120:], past_key_values=cache).logits[:, -1]
    assert torch.allclose(ref, out, atol=1e-4)


def test_observation_window_importance_equals_direct_softmax():
    torch.manual_seed(0)
    q = torch.randn(1, 6, 300, 32)
    k = torch.randn(1, 2, 300, 32)
    mass = observe_prefill(q, k, 32 ** -0.5, n_obs=16, chunk=64)
    kk = k.repeat_interleave(3, dim=1)
    s = (q @ kk.transpose(-1, -2)) * 32 ** -0.5
    s = s.masked_fill(torch.ones(300, 300, dtype=torch.bool).triu(1), float("-inf"))
    direct = s.softmax(-1)[:, :, -16:].sum(dim=(1, 2)).mean(0) / (6 * 16)
    assert torch.allclose(mass, direct, atol=1e-6)


def test_target_ratio_is_reached(tiny):
    ids = tokens(1200)
    cfg = AGACCConfig.preset("agacc", target_ratio=4.0, block_size=16, recent_window=32)
    cache = agacc.CompressedCache(tiny.config, cfg)
    with torch.inference_mode():
        tiny(ids, past_key_values=cache)
    got = cache.memory()["ratio"]
    assert 4.0 * 0.95 <= got <= 4.0 * 1.15, got  # tracker bytes and block granularity on top of the plan


def test_snapshot_describes_every_block(tiny):
    ids = tokens(500)
    cache = agacc.CompressedCache(tiny.config, AGACCConfig.preset("agacc", block_size=16, recent_window=32),
                                  record_history=True)
    greedy(tiny, ids, cache, 16)
    snap = cache.snapshot()
    nb = -(-515 // 16)  # 500 prompt + 15 fed-back tokens
    assert len(snap["tier"]) == 2 and all(len(r) == nb for r in snap["tier"])
    st = cache.layers[1].store
    assert snap["tier"][1][: st.n_blocks] == st.block_tier.tolist()
    assert snap["tier"][1][-1] == T.HOT and snap["importance"][1][-1] is None
    assert len(snap["token_importance"]) == 515 and snap["memory"]["bytes"] == cache.memory()["bytes"]
    assert len(cache.history) == cache.reevaluations and cache.history[0]["step"] == 0


def test_padded_batch_is_refused_with_a_clear_error(tiny):
    ids = tokens(64).repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    with pytest.raises(ValueError, match="padded batches"):
        with torch.inference_mode():
            tiny(ids, attention_mask=mask, past_key_values=agacc.CompressedCache(tiny.config))


def test_full_preset_honours_padding(tiny):
    ids = torch.cat([tokens(60, 1), tokens(60, 2)])
    mask = torch.ones_like(ids)
    mask[1, :12] = 0  # left padding
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    with torch.inference_mode():
        ref = tiny.generate(input_ids=ids, past_key_values=DynamicCache(config=tiny.config), **kw)
        out = tiny.generate(input_ids=ids, past_key_values=agacc.CompressedCache(tiny.config, AGACCConfig.preset("full")), **kw)
    for a, b in zip(ref.scores, out.scores):
        assert torch.allclose(a, b, atol=1e-3), (a - b).abs().max()


def test_equal_length_batch(tiny):
    ids = torch.cat([tokens(220, 1), tokens(220, 2)])
    ref = teacher_forced_logits(tiny, ids, DynamicCache(config=tiny.config), 200)
    out = teacher_forced_logits(tiny, ids, agacc.CompressedCache(tiny.config, AGACCConfig.preset("full")), 200)
    assert torch.allclose(ref, out, atol=1e-4, rtol=0)
    cfg = AGACCConfig.preset("agacc", block_size=16, recent_window=16)
    both = teacher_forced_logits(tiny, ids, agacc.CompressedCache(tiny.config, cfg), 200)
    one = teacher_forced_logits(tiny, ids[:1], agacc.CompressedCache(tiny.config, cfg), 200)
    assert both.shape == (2, 21, 256) and bool(torch.isfinite(both).all())
    assert ((both[:1] - ref[:1]).abs().mean() < 0.5 * (ref[:1] - ref[1:]).abs().mean())
    assert one.shape == (1, 21, 256)


def test_host_copy_reports_host_bytes(tiny):
    cache = agacc.CompressedCache(tiny.config, AGACCConfig.preset("agacc", host_copy=True, block_size=16,
                                                                   recent_window=16))
    with torch.inference_mode():
        tiny(tokens(300), past_key_values=cache)
    mem = cache.memory()
    n_tiered = cache.layers[0].store.n_blocks * 16
    assert mem["host_bytes"] == 2 * 2 * 2 * n_tiered * 32 * 2  # layers x K/V x heads x tokens x dim x fp16


def test_layer_sharing_and_pooling_hooks(tiny):
    cfg = AGACCConfig.preset("agacc", share_across_layers=True, pool_kernel=3, block_size=16, recent_window=16)
    cache = agacc.CompressedCache(tiny.config, cfg)
    with torch.inference_mode():
        tiny(tokens(300), past_key_values=cache)
    assert torch.equal(cache.layers[0].scores, cache.layers[1].scores)
    assert torch.equal(cache.layers[0].store.block_tier, cache.layers[1].store.block_tier)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_counts_what_it_holds_and_the_planner_prices_it(tiny, preset):
    """For every registered method: memory() equals an independent walk over the cache's tensors, and
    right after a re-evaluation the planner's price of the applied tiers plus the bytes it does not
    plan (tracker, scores, the block layout) is what is held, which is what the trace replay reports
    as held bytes."""
    cfg = AGACCConfig.preset(preset, **({} if preset in FIXED_RATIO else {"target_ratio": 4.0}))
    cache = agacc.CompressedCache(tiny.config, cfg)
    greedy(tiny, tokens(400, seed=2), cache, 12)
    cache.reevaluate()
    mem = cache.memory()
    assert mem["bytes"] == walk_tensor_bytes(cache.layers)
    if not cfg.compress:
        return
    plans = [(l.store.block_tier.cpu(), l.store.block_bits.cpu(), l.store.block_keep.cpu()) for l in cache.layers]
    geo = cache._geometry()
    # the planner reserves 4 bytes a ready block for the attention-order layout (held: 4 a kept block, when
    # built) and prices an evicted block's id (4 bytes) that no segment holds: conservative by those bytes
    reserved = sum(4 * l.store.n_ready_blocks() for l in cache.layers)
    reserved += sum(4 * int((l.store.block_tier == T.EVICTED).sum()) for l in cache.layers)
    layout = sum(l.store._layout.nbytes for l in cache.layers if l.store._layout is not None)
    assert planned_bytes(plans, cfg, geo, cache.seq_len) + cache.unplanned_bytes() - reserved + layout == mem["bytes"]
