"""bench/attribute_loss.py: each mode holds the planned blocks of the other kind at 16 bits, and the
planner decides as it would without the change."""
import pytest
import torch

import agacc
import agacc.store as store
from agacc import planner
from agacc import tiers as T
from agacc.config import AGACCConfig
from bench import attribute_loss
from tests.helpers import tiny_model


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


PATCHED = ((store, "apply_plans"), (planner, "fit_threshold_scale"), (planner, "fit_plans"), (planner, "held_plans"),
           (store.LayerStore, "append"), (store.LayerStore, "parts"), (store.LayerStore, "truncate"))
ORIGINAL = [getattr(mod, name) for mod, name in PATCHED]


def _tiers_after_prefill(model, mode, monkeypatch):
    for (mod, name), fn in zip(PATCHED, ORIGINAL):
        monkeypatch.setattr(mod, name, fn)  # unpatched for this mode; restored after the test
    attribute_loss.install(mode)
    torch.manual_seed(1)
    for n in (900, 600):  # a second cache after another: the shadow plan is each cache's own
        ids = torch.randint(3, 256, (1, n))
        cache = agacc.CompressedCache(model.config, AGACCConfig.preset("agacc", target_ratio=8.0))
        with torch.inference_mode():
            model(ids, past_key_values=cache)
        cache.end_prefill()
    return torch.stack([l.store.block_tier for l in cache.layers]), cache.memory()["ratio"], cache


def test_held_as_by_hand():
    tier = torch.tensor([[T.FULL, T.INT3, T.PRUNED, T.EVICTED, T.INT8]], dtype=torch.int8)
    bits = torch.tensor([[16, 3, 3, 0, 8]], dtype=torch.int8)
    keep = torch.tensor([[64, 64, 40, 0, 64]], dtype=torch.int16)
    t, b, k = attribute_loss.held_as("evictions", tier, bits, keep, 64)
    assert t.tolist() == [[T.FULL, T.FULL, T.FULL, T.EVICTED, T.FULL]]
    assert b.tolist() == [[16, 16, 16, 0, 16]] and k.tolist() == [[64, 64, 64, 0, 64]]
    t, b, k = attribute_loss.held_as("quantised", tier, bits, keep, 64)
    assert t.tolist() == [[T.FULL, T.INT3, T.PRUNED, T.FULL, T.INT8]]
    assert b.tolist() == [[16, 3, 3, 16, 8]] and k.tolist() == [[64, 64, 40, 64, 64]]
    assert attribute_loss.held_as("none", tier, bits, keep, 64) == (tier, bits, keep)


def test_each_mode_keeps_the_plan_of_the_other_kind(tiny, monkeypatch):
    ref, ref_ratio, _ = _tiers_after_prefill(tiny, "none", monkeypatch)
    evicted = ref == T.EVICTED
    quantised = (ref != T.FULL) & ~evicted
    assert evicted.any() and quantised.any() and ref_ratio > 7  # the plan has both kinds to remove
    ev, ev_ratio, _ = _tiers_after_prefill(tiny, "evictions", monkeypatch)
    assert torch.equal(ev == T.EVICTED, evicted) and bool((ev[~evicted] == T.FULL).all())
    q, q_ratio, _ = _tiers_after_prefill(tiny, "quantised", monkeypatch)
    assert torch.equal(q[~evicted], ref[~evicted]) and bool((q[evicted] == T.FULL).all())
    assert ev_ratio < ref_ratio and q_ratio < ref_ratio  # the removed kind is held at 16 bits


@pytest.mark.parametrize("mode", ["keys", "values"])
def test_exact_reads_put_each_tokens_own_key_or_value_in_place(tiny, monkeypatch, mode):
    ref, _, cache = _tiers_after_prefill(tiny, mode, monkeypatch)
    assert ((ref != T.FULL) & (ref != T.EVICTED)).any() and not (ref == T.EVICTED).any()  # quantised, none evicted
    for layer in cache.layers:
        s = layer.store
        pos = s.entry_positions()
        k = torch.cat([p.k for p in s.parts()], 2).float()
        v = torch.cat([p.v for p in s.parts()], 2).float()
        exact_k, exact_v = (x[:, :, pos].to(s.dtype).float() for x in s._exact)  # as the store holds them
        exact, lossy = ((k, exact_k), (v, exact_v)) if mode == "values" else ((v, exact_v), (k, exact_k))
        assert torch.equal(*exact)  # every entry, tiered or hot, is its own token's exact vector
        err = (lossy[0] - lossy[1]).norm() / lossy[1].norm()
        assert 0 < err < 0.3  # the other one quantised (3-8 bits), at its own token's place


def test_exact_copy_follows_a_crop(tiny, monkeypatch):
    """The lookahead crops its pseudo tokens (``CompressedCache.crop``): the exact copy loses them too, so every
    later token reads its own exact vector, not one written 2 tokens before it."""
    _, _, cache = _tiers_after_prefill(tiny, "values", monkeypatch)
    torch.manual_seed(2)
    with torch.inference_mode():
        for _ in range(3):
            tiny(torch.randint(3, 256, (1, 1)), past_key_values=cache)
        cache.crop(-2)
        for _ in range(3):
            tiny(torch.randint(3, 256, (1, 1)), past_key_values=cache)
    for layer in cache.layers:
        s = layer.store
        assert s._exact[0].shape[2] == s.seq_len
        k = torch.cat([p.k for p in s.parts()], 2).float()
        assert torch.equal(k, s._exact[0][:, :, s.entry_positions()].to(s.dtype).float())
