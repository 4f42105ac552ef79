"""bench/bounds.py: the oracle's scores by hand, and the K3V2 simulation's codes and prices."""
import torch

import agacc.importance as importance
import agacc.store as store
from agacc import planner, quant
from agacc import tiers as T
from agacc.config import AGACCConfig
from bench import bounds


def test_oracle_scores_are_the_later_queries_attention_by_hand():
    """Four tokens, one layer: at a cache of 2 tokens, queries 2 and 3 are to come; token 0 gets
    (0.5, 0.1) from them, token 1 (0.3, 0.6): max -> (0.5, 0.6), mean -> (0.3, 0.45), each divided by its
    mean over the one ready token (token 0). At the full length the last query stands in."""
    attn = torch.tensor([[[1.0, 0, 0, 0], [0.4, 0.6, 0, 0], [0.5, 0.3, 0.2, 0], [0.1, 0.6, 0.2, 0.1]]])
    torch.testing.assert_close(bounds.oracle_scores(attn, 2, 1, "max"), torch.tensor([[1.0, 0.6 / 0.5]]))
    torch.testing.assert_close(bounds.oracle_scores(attn, 2, 1, "mean"), torch.tensor([[1.0, 0.45 / 0.3]]))
    torch.testing.assert_close(bounds.oracle_scores(attn, 4, 0, "max"), attn[:, 3] / attn[:, 3].mean())
    # the past queries (0 and 1) instead: token 0 (1.0, 0.4), token 1 (0, 0.6)
    torch.testing.assert_close(bounds.oracle_scores(attn, 2, 1, "max", "past"), torch.tensor([[1.0, 0.6]]))


def test_values_2bit_prices_and_holds_2bit_values_in_3bit_blocks(monkeypatch):
    monkeypatch.setattr(planner, "block_cost_bytes", planner.block_cost_bytes)  # restored after the test
    monkeypatch.setattr(store.QuantSegment, "quantize", store.QuantSegment.quantize)
    monkeypatch.setattr(importance, "scores_all", importance.scores_all)
    cfg = AGACCConfig(block_size=16)
    kw = dict(batch=1, heads=3, head_dim=64, block_size=16, full_itemsize=2, value_group_size=64, b_min=3,
              sparse_threshold=0.25, key_quant="channel", key_group_size=64)
    before = {t: planner.block_cost_bytes(t, b, 64, **kw) for t, b in ((T.INT3, 3), (T.INT4, 4), (T.FULL, 16))}
    torch.manual_seed(0)
    k, v = torch.randn(1, 3, 32, 64), torch.randn(1, 3, 32, 64)
    seg = store.QuantSegment(16, "cpu", 3, cfg)
    k3 = seg.quantize(k, v, 3)
    bounds.install_values_2bit()
    after = {t: planner.block_cost_bytes(t, b, 64, **kw) for t, b in ((T.INT3, 3), (T.INT4, 4), (T.FULL, 16))}
    assert before[T.INT3] - after[T.INT3] == 3 * 16 * 64 // 8 and after[T.INT4] == before[T.INT4]
    assert after[T.FULL] == before[T.FULL]
    pk, ks, kz, pv, vs, vz = seg.quantize(k, v, 3)
    assert torch.equal(pk, k3[0]) and pv.shape == k3[3].shape  # keys as before; values in the 3-bit container
    codes = quant.unpack(pv, 3)
    assert int(codes.max()) == 3  # 2-bit codes
    v2 = quant.quantize_values(v, 2, 64)
    torch.testing.assert_close(quant.dequantize_values(pv, vs, vz, 3), quant.dequantize_values(*v2, 2))
