"""``keep_all``: at a target ratio up to 2.5 the agacc preset keeps every token at 16, 8 or 4 bits with keys
per token (docs/tuning.md round 19), in the rule, the store, the cost model and the replay."""
import pytest
import torch
from transformers import DynamicCache

import agacc
from agacc import tiers as T
from agacc.config import AGACCConfig
from agacc.eval.metrics import lm_stats
from agacc.eval.runner import teacher_force
from agacc.methods.agacc import thresholds_rule
from agacc.planner import block_cost_bytes, planned_bytes
from agacc.policy import KEEP_ALL_LOW, keep_all_reach, keep_all_upto, key_grouping, keeps_all
from agacc.trace import replay_frames
from tests.helpers import tiny_model, walk_tensor_bytes


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(layers=2)  # head dim 32


def test_keep_all_reach_by_hand():
    cfg = AGACCConfig.preset("agacc")
    assert cfg.keep_all == 2.5
    # per element: the code bits + a 16-bit scale and zero per group, keys and values alike; 16 + 16 bits at fp16
    assert keep_all_reach(cfg, 64) == pytest.approx(32 / (2 * (4 + 32 / 64)))  # 3.56
    assert keep_all_reach(cfg, 64, bits=8) == pytest.approx(32 / (2 * (8 + 32 / 64)))  # 1.88
    assert keep_all_reach(cfg, 96, bits=8) == pytest.approx(32 / (2 * (8 + 32 / 32)))  # groups of gcd(96, 64) = 32
    assert keep_all_reach(cfg.with_overrides(key_group_size=32), 64) == pytest.approx(32 / (4 + 1 + 4 + 0.5))
    # the store's cost model agrees (a block of 4096 tokens: its 9 bytes of metadata do not count)
    kw = dict(batch=1, heads=1, head_dim=64, block_size=4096, full_itemsize=2, value_group_size=64, b_min=3,
              sparse_threshold=0.25, key_quant="token", key_group_size=64)
    for bits, tier in ((4, T.INT4), (8, T.INT8)):
        priced = block_cost_bytes(T.FULL, 16, 64, **kw) / block_cost_bytes(tier, bits, 64, **kw)
        assert keep_all_reach(cfg, 64, bits=bits) == pytest.approx(priced, rel=1e-3)
    assert keeps_all(cfg.with_overrides(target_ratio=2.5), 64) and not keeps_all(cfg.with_overrides(target_ratio=2.51), 64)
    assert not keeps_all(cfg, 64)  # no target: thresholds as set
    assert not keeps_all(cfg.with_overrides(target_ratio=1.5, keep_all=0.0), 64)
    # never beyond what 4-bit blocks reach: head dim 16 (groups of 16: 4 + 2 bits) reaches 2.67x
    assert keep_all_upto(cfg.with_overrides(keep_all=3.0), 16) == pytest.approx(32 / 12)
    assert keeps_all(cfg.with_overrides(target_ratio=2.6, keep_all=3.0), 16)
    assert not keeps_all(cfg.with_overrides(target_ratio=2.7, keep_all=3.0), 16)
    assert key_grouping(cfg.with_overrides(target_ratio=1.5), 64) == "token"
    assert key_grouping(cfg.with_overrides(target_ratio=4.0), 64) == "channel"  # "auto", unresolved: per channel
    with pytest.raises(ValueError, match="keep_all"):
        cfg.with_overrides(keep_all=-1.0)


def test_keep_all_rule_by_hand():
    cfg = AGACCConfig.preset("agacc", target_ratio=1.7, p_max=0.5)  # tau_h 50, tau_l 0.15, tau_e 0.075
    scores = torch.tensor([100.0, 50.0, 10.0, 0.15, 0.05, 1e-4, 1e-5])
    tier, bits, keep = thresholds_rule(scores, cfg, head_dim=64)
    # > tau_h: 16 bits; 8 bits down to tau_e / 1000 = 7.5e-5, 4 bits below; nothing pruned or evicted
    assert tier.tolist() == [T.FULL] + [T.INT8] * 5 + [T.INT4]
    assert bits.tolist() == [16] + [8] * 5 + [4]
    assert keep.tolist() == [64] * 7
    assert KEEP_ALL_LOW * cfg.tau_e == pytest.approx(7.5e-5)
    # the scale moves both thresholds: at 2x tau_h is 100 (not exceeded) and tau_e / 1000 1.5e-4
    tier, _, _ = thresholds_rule(scores, cfg, head_dim=64, scale=2.0)
    assert tier.tolist() == [T.INT8] * 5 + [T.INT4] * 2
    # above keep_all, or with it off: the 3-4-bit tiers, pruning, tau_e as set
    for other in (cfg.with_overrides(target_ratio=2.6), cfg.with_overrides(keep_all=0.0)):
        tier, bits, keep = thresholds_rule(scores, other, head_dim=64)
        assert tier.tolist() == [T.FULL, T.INT4, T.INT4, T.INT3, T.EVICTED, T.EVICTED, T.EVICTED]
        assert bits.tolist() == [16, 4, 4, 3, 0, 0, 0]


def test_keep_all_fidelity_is_monotone_in_importance():
    cfg = AGACCConfig.preset("agacc", target_ratio=1.7)
    scores = torch.sort(torch.rand(300).pow(4) * 80).values
    for scale in (0.05, 1.0, 30.0, 3e4):
        tier, bits, keep = thresholds_rule(scores, cfg, 64, scale=scale)
        keys = [(-int(t), int(b), int(k)) for t, b, k in zip(tier, bits, keep)]
        assert keys == sorted(keys)
        assert set(bits.tolist()) <= {4, 8, 16} and (keep == 64).all()


def _unheld(cache) -> int:
    """What the planner prices and the store does not hold (as test_cache's pricing test): 4 bytes a ready
    block reserved for the attention-order layout and an evicted block's id, less the layout held."""
    reserved = sum(4 * l.store.n_ready_blocks() for l in cache.layers)
    reserved += sum(4 * int((l.store.block_tier == T.EVICTED).sum()) for l in cache.layers)
    return reserved - sum(l.store._layout.nbytes for l in cache.layers if l.store._layout is not None)


def _tiered(cache):
    return torch.cat([l.store.block_tier.cpu() for l in cache.layers])


@pytest.mark.parametrize("target", [1.6, 1.75, 2.2])
def test_keep_all_cache_holds_what_it_plans_and_reaches_the_ratio(tiny, target):
    """A cache fitted to a ratio up to keep_all (head dim 32: 8-bit blocks reach 1.78x): every tiered block at
    16, 8 or 4 bits, keys per token in the store and in the cost model, what is held equal to an independent walk
    and to the planner's price, and the ratio reached. At 1.6x 8-bit blocks leave room for 16-bit ones; at 1.75x
    the 16-bit hot tail of a 900-token run leaves 8-bit blocks everywhere over the budget, and at 2.2x they cannot
    reach it: some blocks go to 4 bits (4-bit keys per token too), none is evicted."""
    cfg = AGACCConfig.preset("agacc", target_ratio=target)
    cache = agacc.CompressedCache(tiny.config, cfg)
    ids = torch.randint(0, 256, (1, 900), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        teacher_force(tiny, cache, ids[0, :800].tolist(), chunk=800)
        teacher_force(tiny, cache, ids[0, 800:].tolist(), chunk=1)
    cache.reevaluate()
    tiers = set(_tiered(cache).tolist())
    assert tiers <= {T.FULL, T.INT8, T.INT4} and T.INT8 in tiers
    assert (T.FULL in tiers and T.INT4 not in tiers) if target == 1.6 else T.INT4 in tiers
    assert torch.cat([l.store.block_keep for l in cache.layers]).eq(cache.head_dim).all()  # nothing pruned
    segs = [l.store.quant[c] for l in cache.layers for c in (8, 4) if l.store.quant[c].k is not None]
    assert segs and all(s.key_per_token and s.k_scale.shape[2] == s.k.shape[2] for s in segs)  # a scale row a token
    mem = cache.memory()
    assert mem["bytes"] == walk_tensor_bytes(cache.layers)
    plans = [(l.store.block_tier.cpu(), l.store.block_bits.cpu(), l.store.block_keep.cpu()) for l in cache.layers]
    geo = cache._geometry()
    planned = planned_bytes(plans, cfg, geo, cache.seq_len, cache.tracker_prices())
    assert planned + cache.unplanned_bytes() - _unheld(cache) == mem["bytes"]
    ratio = geo.bytes_fp16(cache.seq_len) / mem["bytes"]
    assert target <= ratio <= target * 1.03


def _kl_at(tiny, cfg, ids, prefill):
    """Teacher-forced KL (nats per token) of a compressed cache against the plain cache."""
    out = []
    for cache in (DynamicCache(config=tiny.config), agacc.CompressedCache(tiny.config, cfg)):
        with torch.inference_mode():
            teacher_force(tiny, cache, ids[:prefill], chunk=prefill)
            out.append(teacher_force(tiny, cache, ids[prefill:-1], chunk=1))
    st = lm_stats(out[1], out[0], torch.tensor(ids[prefill + 1:]))
    return float(st["kl"]) / int(st["tokens"])


@pytest.mark.parametrize("target", [1.7, 2.2])
def test_keep_all_is_closer_to_the_plain_cache_than_the_3_4_bit_tiers_at_the_same_ratio(tiny, target):
    ids = torch.randint(0, 256, (700,), generator=torch.Generator().manual_seed(5)).tolist()
    cfg = AGACCConfig.preset("agacc", target_ratio=target)
    kl_all = _kl_at(tiny, cfg, ids, 600)
    kl_tiers = _kl_at(tiny, cfg.with_overrides(keep_all=0.0), ids, 600)
    # the random-weight model attends to every token alike: no eviction is cheap, and 4-bit keys per token are
    # about as good as the tiers' per-channel ones (docs/tuning.md round 19 has the embedded model's numbers)
    assert 0 < kl_all < kl_tiers * (0.25 if target < 1.78 else 0.9)


def _recorded(tiny, target):
    """A run of 700 tokens (600 prefilled, 100 teacher-forced) at ``target``, history recorded, re-evaluated at the end."""
    cfg = AGACCConfig.preset("agacc", target_ratio=target)
    cache = agacc.CompressedCache(tiny.config, cfg, record_history=True)
    ids = torch.randint(0, 256, (700,), generator=torch.Generator().manual_seed(7)).tolist()
    with torch.inference_mode():
        teacher_force(tiny, cache, ids[:600], chunk=600)
        teacher_force(tiny, cache, ids[600:], chunk=1)
    cache.reevaluate()
    return cfg, cache


@pytest.mark.parametrize("target", [1.7, 2.2])
def test_replay_of_a_keep_all_run_is_the_run(tiny, target):
    """The app's replay of a run that kept every token gives the cache's own tiers, bits and kept elements,
    and its bytes (keys priced per token, as the store holds them) are what the cache holds."""
    cfg, cache = _recorded(tiny, target)
    rep = replay_frames(cache.history, cfg, cache._geometry())[-1]
    snap = cache.snapshot()
    assert (rep["tier"], rep["bits"], rep["keep"]) == (snap["tier"], snap["bits"], snap["keep"])
    assert {t for row in snap["tier"] for t in row} <= {T.FULL, T.INT8, T.INT4, T.HOT}
    assert rep["held_bytes"] - _unheld(cache) == cache.memory()["bytes"]


def test_replay_at_a_low_ratio_of_a_run_at_4x(tiny):
    """The app's what-if: a run recorded at 4x replayed at 1.7x plans every block at 16, 8 or 4 bits;
    replayed at 4x it is the run itself."""
    cfg, cache = _recorded(tiny, 4.0)
    geo = cache._geometry()
    back = replay_frames(cache.history, cfg, geo)[-1]
    assert back["tier"] == cache.snapshot()["tier"]
    per_token, per_evicted = cache.tracker_prices()  # a block evicted at the last re-evaluation: not yet forgotten
    pending = sum(len(l.tracker.pending) for l in cache.layers) * (per_token * cfg.block_size - per_evicted)
    assert back["held_bytes"] - _unheld(cache) + pending == cache.memory()["bytes"]
    assert {t for row in back["tier"] for t in row} & {T.INT3, T.EVICTED}  # the tiers: 3 bits, evictions
    low = replay_frames(cache.history, cfg.with_overrides(target_ratio=1.7), geo)[-1]
    tiers = {t for row in low["tier"] for t in row}
    assert tiers <= {T.FULL, T.INT8, T.INT4, T.HOT} and T.INT8 in tiers
