"""Long prompts on bounded memory: chunked prefill through transformers' own ``prefill_chunk_size``,
attention of a chunk over the packed store key slices at a time, and the peak bytes a cache held."""
import pytest
import torch
from transformers import DynamicCache

import agacc
from agacc.attention import attend, chunk_attention
from agacc.config import AGACCConfig
from agacc.importance import STATE_ITEMSIZE
from agacc.store import LayerStore
from tests.helpers import every_part_store, tiny_model

D, H = 64, 2


def store_with_every_part(key_quant, rotate, q=37, seed=0):
    """Every kind of part (``tests.helpers.every_part_store``), then ``q`` new tokens: a chunk's own K/V."""
    st = every_part_store(key_quant, rotate, h=H, d=D, B=8 if key_quant == "token" else 16, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    st.append(torch.randn(1, H, q, D, generator=g).half(), torch.randn(1, H, q, D, generator=g).half())
    return st


@pytest.mark.parametrize("key_quant,rotate", [("channel", True), ("token", True), ("channel", False), ("basis", True)])
@pytest.mark.parametrize("block", [5, 16, 64, 4096])
@pytest.mark.parametrize("groups", [1, 3])
def test_chunk_attention_equals_the_reference(key_quant, rotate, block, groups):
    q = 37
    st = store_with_every_part(key_quant, rotate, q=q)
    kinds = {p.kind for p in st.parts()}
    assert kinds == {"dense", "quant", "sparse"} and st.markers.n > 0
    query = torch.randn(1, H * groups, q, D, generator=torch.Generator().manual_seed(5))
    want, want_mass = attend(query, st.attention_entries(torch.float32), 0.125, causal_new=q, n_obs=16)
    got, mass = chunk_attention(query, st.parts(), 0.125, n_new=q, n_obs=16, block=block)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(mass, want_mass, rtol=1e-5, atol=1e-8)
    assert mass.numel() == st.n_entries


def test_chunk_attention_allocates_nothing_that_grows_with_chunk_times_context():
    """The largest single allocation of the blocked pass is O(chunk x block) (a slice of scores), not
    O(chunk x n): 20 slices of 128 entries against one of 2,560."""
    q, n_old = 64, 2560
    cfg = AGACCConfig.preset("agacc", recent_window=0, markers=False)
    st = LayerStore(cfg, "cpu", torch.float16)
    g = torch.Generator().manual_seed(1)
    st.append(torch.randn(1, H, n_old, D, generator=g), torch.randn(1, H, n_old, D, generator=g))
    nb = n_old // 16
    st.apply_tiers(torch.full((nb,), 2, dtype=torch.int8), torch.full((nb,), 4, dtype=torch.int8),
                   torch.full((nb,), D, dtype=torch.int16), torch.ones(n_old))
    st.append(torch.randn(1, H, q, D, generator=g), torch.randn(1, H, q, D, generator=g))
    query = torch.randn(1, H * 3, q, D, generator=g)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        chunk_attention(query, st.parts(), 0.125, n_new=q, n_obs=16, block=128)
    largest = max(e.cpu_memory_usage for e in prof.events())
    full_scores = 1 * H * 3 * q * (n_old + q) * 4  # what a q x n score matrix would take (fp32)
    assert 0 < largest <= H * 3 * q * 128 * 4 * 2, largest   # one slice of scores (x2: exp)
    assert largest < full_scores / 8


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(layers=2)


def _gen(model, ids, cache=None, chunk=None, n_new=16):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=n_new,
                              min_new_tokens=n_new, do_sample=False, pad_token_id=0, prefill_chunk_size=chunk)


@pytest.mark.parametrize("chunk", [37, 128, 512])
def test_chunked_prefill_with_the_lossless_preset_is_token_identical_to_plain(tiny, chunk):
    ids = torch.randint(3, 256, (1, 700), generator=torch.Generator().manual_seed(0))
    plain = _gen(tiny, ids, DynamicCache(config=tiny.config), chunk=chunk)
    cache = agacc.CompressedCache(tiny.config, AGACCConfig.preset("full"))
    assert torch.equal(_gen(tiny, ids, cache, chunk=chunk), plain)
    assert torch.equal(plain, _gen(tiny, ids))


def test_chunked_prefill_bounds_the_peak(tiny):
    """One-shot prefill holds the whole prompt at full precision before compressing; chunked, the
    peak is the compressed store + one chunk (+ the recent window) at full precision."""
    ids = torch.randint(3, 256, (1, 1200), generator=torch.Generator().manual_seed(1))
    cfg = AGACCConfig.preset("agacc", target_ratio=4.0)
    one = agacc.CompressedCache(tiny.config, cfg)
    _gen(tiny, ids, one)
    chunked = agacc.CompressedCache(tiny.config, cfg)
    _gen(tiny, ids, chunked, chunk=128)
    m1, m2 = one.memory(), chunked.memory()
    geo = chunked._geometry()
    assert m1["peak_bytes"] >= geo.bytes_full(1200)          # the whole prompt, uncompressed
    window = geo.bytes_full(128 + cfg.recent_window + cfg.block_size)
    state = STATE_ITEMSIZE * 1200 * geo.n_layers  # every prompt token's I_i until the prompt ends (then evictions go)
    assert m2["peak_bytes"] <= 1.1 * m2["bytes"] + window + state  # compressed store + one chunk at full precision
    assert m2["peak_bytes"] < m1["peak_bytes"] / 2
    assert 3.5 <= m2["ratio"] and m2["bytes"] <= m2["peak_bytes"]


def test_peak_bytes_are_counted_and_reset(tiny):
    ids = torch.randint(3, 256, (1, 400), generator=torch.Generator().manual_seed(2))
    cache = agacc.CompressedCache(tiny.config, AGACCConfig.preset("agacc", target_ratio=4.0))
    assert cache.memory()["peak_bytes"] == 0
    _gen(tiny, ids, cache, n_new=4)
    mem = cache.memory()
    assert mem["peak_bytes"] > mem["bytes"]                  # the prompt before its first compression
    cache.reset_peak()
    assert cache.memory()["peak_bytes"] == cache.held_bytes() == mem["bytes"]


def _tiers(cache) -> torch.Tensor:
    return torch.stack([l.store.block_tier for l in cache.layers])


@pytest.mark.parametrize("hold,prefill_ratio", [(True, None), (False, None), (True, 2.0)])
def test_a_chunked_prefill_holds_its_evictions_until_the_prompt_ends(tiny, hold, prefill_ratio):
    """With ``hold_evictions`` a chunk's re-evaluation evicts nothing (those blocks wait at b_min
    bits, readable by later chunks); ``end_prefill`` (the first decode step) applies the last
    chunk's plan as made, and replaying the recorded history gives the same tiers. Off: blocks
    go chunk by chunk. ``prefill_ratio``: what is held is fitted to that gentler ratio, the target's plan
    still applied at the end."""
    from agacc.tiers import EVICTED
    from agacc.trace import replay_frames

    ids = torch.randint(3, 256, (1, 640), generator=torch.Generator().manual_seed(3))
    cfg = AGACCConfig.preset("agacc", target_ratio=6.0, hold_evictions=hold, prefill_ratio=prefill_ratio)
    cache = agacc.CompressedCache(tiny.config, cfg, record_history=True)
    evicted_early = False
    with torch.inference_mode():
        for lo in range(0, 640, 128):
            tiny(ids[:, lo:lo + 128], past_key_values=cache, use_cache=True)
            evicted_early |= bool((_tiers(cache) == EVICTED).any())
    assert evicted_early != hold
    if hold:
        planned = cache.held[0].clone()
        assert (planned == EVICTED).any() and not (_tiers(cache) == EVICTED).any()
        before = cache.memory()["bytes"]
        cache.end_prefill()
        assert cache.held is None and torch.equal(_tiers(cache).cpu(), planned.cpu())
        assert cache.memory()["bytes"] < before
        assert cache.memory()["ratio"] > 5.5 and (prefill_ratio is None or before > 2.5 * cache.memory()["bytes"])
    frame = replay_frames(cache.history, cfg, cache._geometry())[-1]
    assert frame["tier"] == cache.snapshot()["tier"]
    cache.end_prefill()  # nothing held: nothing changes
    assert frame["tier"] == cache.snapshot()["tier"]


@pytest.mark.parametrize("prefill_bits", [4, None])
def test_prefill_bits_hold_quantised_blocks_until_the_prompt_ends(tiny, prefill_bits):
    """``uniform-int2`` through a chunked prefill: with ``prefill_bits=4`` (its preset) every ready
    block waits at 4 bits while prompt chunks go in (later chunks read 4-bit keys), then ``end_prefill``
    cuts them to the planned 2 bits; the cache then holds exactly what the same prompt holds without
    the hold, and replaying the history gives the same tiers. None: 2 bits from the first chunk."""
    from agacc.tiers import INT2, INT4
    from agacc.trace import replay_frames

    ids = torch.randint(3, 256, (1, 640), generator=torch.Generator().manual_seed(7))
    cfg = AGACCConfig.preset("uniform-int2", prefill_bits=prefill_bits)
    assert AGACCConfig.preset("uniform-int2").prefill_bits == 4
    cache = agacc.CompressedCache(tiny.config, cfg, record_history=True)
    with torch.inference_mode():
        for lo in range(0, 640, 128):
            tiny(ids[:, lo:lo + 128], past_key_values=cache, use_cache=True)
            bits = torch.stack([l.store.block_bits for l in cache.layers])
            assert bits.numel() and bool((bits == (prefill_bits or 2)).all())
    assert bool((_tiers(cache) == (INT4 if prefill_bits else INT2)).all())
    held_bytes = cache.memory()["bytes"]
    cache.end_prefill()
    assert bool((_tiers(cache) == INT2).all()) and cache.held is None
    bare, int4 = (agacc.CompressedCache(tiny.config, c) for c in (cfg.with_overrides(prefill_bits=None),
                                                                   AGACCConfig.preset("uniform-int4")))
    with torch.inference_mode():
        for lo in range(0, 640, 128):
            tiny(ids[:, lo:lo + 128], past_key_values=bare, use_cache=True)
            tiny(ids[:, lo:lo + 128], past_key_values=int4, use_cache=True)
    assert cache.memory()["bytes"] == bare.memory()["bytes"]  # the same cache once the prompt is in
    if prefill_bits:  # while it went in, it held what uniform-int4 holds
        assert held_bytes == int4.memory()["bytes"] > cache.memory()["bytes"]
    else:
        assert held_bytes == cache.memory()["bytes"]
    frame = replay_frames(cache.history, cfg, cache._geometry())[-1]
    assert frame["tier"] == cache.snapshot()["tier"]


def test_the_first_decode_step_ends_the_prompt(tiny):
    ids = torch.randint(3, 256, (1, 640), generator=torch.Generator().manual_seed(3))
    cache = agacc.CompressedCache(tiny.config, AGACCConfig.preset("agacc", target_ratio=6.0))
    _gen(tiny, ids, cache, chunk=128, n_new=2)
    from agacc.tiers import EVICTED

    assert cache.held is None and (_tiers(cache) == EVICTED).any()


def test_a_replay_refuses_another_block_size(tiny):
    from agacc.trace import replay_frames

    ids = torch.randint(3, 256, (1, 300), generator=torch.Generator().manual_seed(4))
    cfg = AGACCConfig.preset("agacc", target_ratio=4.0)
    cache = agacc.CompressedCache(tiny.config, cfg, record_history=True)
    _gen(tiny, ids, cache, chunk=128, n_new=2)
    for b in (8, 32):
        with pytest.raises(ValueError, match="block size"):
            replay_frames(cache.history, cfg.with_overrides(block_size=b), cache._geometry())


def test_no_reevaluation_keeps_the_plan_while_tokens_go_in(tiny):
    """Inside ``no_reevaluation()`` a forward stores and counts its tokens (hot, peak counted) but the
    tiers stay the context's plan; the same forward outside re-plans with the new queries."""
    ids = torch.randint(3, 256, (1, 640), generator=torch.Generator().manual_seed(5))
    question = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(6))
    cfg = AGACCConfig.preset("agacc", target_ratio=4.0)
    caches = []
    for paused in (True, False):
        cache = agacc.CompressedCache(tiny.config, cfg)
        with torch.inference_mode():
            for lo in range(0, 640, 128):
                tiny(ids[:, lo:lo + 128], past_key_values=cache, use_cache=True)
            cache.end_prefill()
            tiers, n = _tiers(cache).clone(), cache.reevaluations
            if paused:
                with cache.no_reevaluation():
                    tiny(question, past_key_values=cache, use_cache=True)
                assert cache.paused == 0 and cache.reevaluations == n and torch.equal(_tiers(cache)[:, :tiers.shape[1]], tiers)
            else:
                tiny(question, past_key_values=cache, use_cache=True)
                assert cache.reevaluations == n + 1
        assert cache.seq_len == 680 and cache.peak_bytes >= cache.held_bytes()
        caches.append(cache)
    assert not torch.equal(_tiers(caches[0]), _tiers(caches[1]))  # the question's queries moved the plan


def _windowed_reference(query, k, v, kpos, qpos, window, scaling, n_obs):
    """Attention by hand where query i (position qpos[i]) sees keys at positions in (qpos - window, qpos]:
    -> (out [Bt, q, Hq, D], mass of the last n_obs queries [n], normalised as ``attend``)."""
    bt, hq, q, d = query.shape
    h = k.shape[1]
    kk, vv = k.repeat_interleave(hq // h, 1), v.repeat_interleave(hq // h, 1)
    s = torch.matmul(query, kk.transpose(-1, -2)) * scaling                       # [Bt, Hq, q, n]
    hidden = (kpos[None, :] > qpos[:, None]) | (kpos[None, :] <= qpos[:, None] - window)
    p = s.masked_fill(hidden, float("-inf")).softmax(-1)
    out = torch.matmul(p, vv).transpose(1, 2)
    return out, p[:, :, q - n_obs:].sum(dim=(1, 2)).mean(0) / (hq * n_obs)


def test_chunk_attention_and_observe_prefill_with_a_window():
    """A sliding layer past its window: the chunk path masks by entry position (every part kind but
    markers, which sliding layers do not keep) and the prompt's observation masks by window, against
    attention by hand; the window changes the answer."""
    from agacc.attention import observe_prefill
    from agacc.tiers import EVICTED, FULL, INT2, INT4, PRUNED

    cfg = AGACCConfig(block_size=8, recent_window=8, b_min=1, markers=False, key_group_size=8, value_group_size=32)
    st = LayerStore(cfg, "cpu", torch.float16)
    g = torch.Generator().manual_seed(3)
    st.append(torch.randn(1, H, 96, D, generator=g), torch.randn(1, H, 96, D, generator=g))
    tiers = [EVICTED, EVICTED, FULL, INT4, INT2, PRUNED, INT4, FULL, INT2, INT4, FULL]
    st.apply_tiers(torch.tensor(tiers), torch.tensor([0, 0, 16, 4, 2, 2, 4, 16, 1, 4, 16]),
                   torch.tensor([0, 0, D, D, D, 16, D, D, D, D, D]), torch.rand(96))
    q, window = 21, 40
    st.append(torch.randn(1, H, q, D, generator=g), torch.randn(1, H, q, D, generator=g))
    assert {p.kind for p in st.parts()} == {"dense", "quant", "sparse"} and st.markers.n == 0
    query = torch.randn(1, 3 * H, q, D, generator=g)
    pos = st.entry_positions()
    assert sorted(pos.tolist()) == list(range(16, 96 + q))  # every kept token once; blocks 0-1 dropped
    ents = st.attention_entries(torch.float32)
    k, v = torch.cat([e.k for e in ents], 2), torch.cat([e.v for e in ents], 2)
    want, want_mass = _windowed_reference(query, k, v, pos, torch.arange(96, 96 + q), window, 0.125, 8)
    got, mass = chunk_attention(query, st.parts(), 0.125, n_new=q, n_obs=8, block=16, window=window, positions=pos,
                                q_start=96)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(mass, want_mass, rtol=1e-5, atol=1e-8)
    assert (chunk_attention(query, st.parts(), 0.125, n_new=q, n_obs=8)[0] - want).abs().max() > 1e-2

    prompt_q, prompt_k = query, torch.randn(1, H, q, D, generator=g)
    _, want_mass = _windowed_reference(prompt_q, prompt_k, prompt_k, torch.arange(q), torch.arange(q), 6, 0.125, 8)
    torch.testing.assert_close(observe_prefill(prompt_q, prompt_k, 0.125, 8, chunk=5, window=6), want_mass,
                               rtol=1e-5, atol=1e-7)
