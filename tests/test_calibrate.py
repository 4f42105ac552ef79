"""Per-layer sensitivity (agacc.calibrate) and the layer_scale it sets (agacc.planner.scale_layers)."""
import pytest
import torch

from agacc import calibrate, planner
from agacc import tiers as T
from agacc.config import AGACCConfig
from tests.helpers import COMMON, build


@pytest.mark.parametrize("key_quant,rotate", [("channel", True), ("channel", False), ("token", True)])
def test_calibration_quantises_as_the_store_does(key_quant, rotate):
    """The K/V a layer is measured with are what the store reads back at the same bits."""
    from agacc.store import LayerStore

    cfg = AGACCConfig(block_size=16, recent_window=16, key_quant=key_quant, rotate=rotate)
    st = LayerStore(cfg, "cpu", torch.float32)
    torch.manual_seed(0)
    k, v = torch.randn(1, 3, 16 * 6, 64), torch.randn(1, 3, 16 * 6, 64) * 2
    st.append(k, v)
    n = st.n_ready_blocks()
    st.apply_tiers(torch.full((n,), T.INT3, dtype=torch.int8), torch.full((n,), 3, dtype=torch.int8),
                   torch.full((n,), 64, dtype=torch.int16), torch.ones(st.seq_len))
    k3, v3 = st.quant[3].read_blocks(torch.arange(n))
    m = n * 16
    assert torch.allclose(calibrate._store_format(k, 3, cfg, keys=True)[:, :, :m], k3, atol=1e-5)
    assert torch.allclose(calibrate._store_format(v, 3, cfg, keys=False)[:, :, :m], v3, atol=1e-5)
    assert not torch.allclose(k3, k[:, :, :m], atol=1e-2)  # (the test can fail: 3 bits is lossy)


def test_layer_sensitivity_falls_with_bits():
    model = build("LlamaConfig", dict(COMMON, num_hidden_layers=3))
    ids = torch.randint(0, model.config.vocab_size, (1, 96))
    s2 = calibrate.layer_sensitivity(model, ids, AGACCConfig(block_size=16), bits=2)
    s8 = calibrate.layer_sensitivity(model, ids, AGACCConfig(block_size=16), bits=8)
    assert len(s2) == 3 and all(a > 10 * b >= 0 for a, b in zip(s2, s8))


def test_eviction_sensitivity_grows_with_the_fraction_evicted():
    model = build("LlamaConfig", dict(COMMON, num_hidden_layers=3))
    before = model.config._attn_implementation
    ids = torch.randint(0, model.config.vocab_size, (1, 192))
    light = calibrate.eviction_sensitivity(model, ids, fraction=0.2, n_obs=16, recent=16)
    heavy = calibrate.eviction_sensitivity(model, ids, fraction=0.9, n_obs=16, recent=16)
    assert len(light) == 3 and all(h > l > 0 for h, l in zip(heavy, light))
    assert model.config._attn_implementation == before  # the probe's attention function is gone
    with pytest.raises(ValueError, match="0 < fraction < 1"):
        calibrate.eviction_sensitivity(model, ids, fraction=1.0)
    swa = build("MistralConfig", dict(COMMON, num_hidden_layers=2, sliding_window=32))
    with pytest.raises(ValueError, match="sliding windows \\(32 tokens\\) are shorter than the 192 tokens"):
        calibrate.eviction_sensitivity(swa, ids, n_obs=16, recent=16)
    gemma2 = build("Gemma2Config", dict(COMMON, num_hidden_layers=2, head_dim=16))  # logit softcapping
    own = gemma2.config._attn_implementation
    with pytest.raises(ValueError, match="softcaps its logits"):
        calibrate.eviction_sensitivity(gemma2, ids, n_obs=16, recent=16)
    assert gemma2.config._attn_implementation == own


def test_layer_scale_by_hand():
    assert calibrate.layer_scale([1.0, 4.0]) == pytest.approx((0.5, 2.0))  # geometric mean 2
    assert calibrate.layer_scale([1.0, 4.0], gamma=0.5) == pytest.approx((2 ** -0.5, 2 ** 0.5))
    assert calibrate.layer_scale([0.0, 1.0], floor=0.01) == pytest.approx((0.1, 10.0))
    assert calibrate.layer_scale([0.0, 0.0]) == (1.0, 1.0)


def test_layer_scale_gives_a_sensitive_layer_more_bits_at_one_threshold_scale():
    cfg = AGACCConfig(n_sink=0, layer_scale=(1.0, 50.0))
    geo = planner.Geometry(2, 1, 64)
    scores = torch.tensor([[0.2, 1.0, 5.0, 300.0], [0.2, 1.0, 5.0, 300.0]])
    tier, bits, _ = planner.plan_tiers(scores, cfg, geo, 80, stacked=True)
    plain = planner.plan_tiers(scores * torch.tensor([[1.0], [50.0]]), cfg.with_overrides(layer_scale=None), geo, 80,
                               stacked=True)
    assert torch.equal(tier, plain[0]) and torch.equal(bits, plain[1])  # the same as scaling the scores by hand
    assert tier[0, 0] == T.EVICTED and tier[1, 0] != T.EVICTED and bits[1, 2] == 16 > bits[0, 2]
    with pytest.raises(ValueError, match="layer_scale has 2 entries, the model has 3 layers"):
        planner.plan_tiers(torch.ones(3, 4), cfg, planner.Geometry(3, 1, 64), 80)


def test_evict_scale_decides_evictions_and_layer_scale_the_bits():
    """Round 10: a layer's eviction factor moves only which blocks go; a block both runs keep has the
    ``layer_scale`` run's tier and bits, one only that run evicts the eviction run's tier."""
    cfg = AGACCConfig(n_sink=0, layer_scale=(1.0, 2.0), evict_scale=(8.0, 0.125))
    geo = planner.Geometry(2, 1, 64)
    scores = torch.tensor([[0.005, 0.02, 0.05, 1.0, 5.0], [0.005, 0.02, 0.05, 1.0, 5.0]])
    tier, bits, keep = planner.plan_tiers(scores, cfg, geo, 80, stacked=True)
    plain = cfg.with_overrides(layer_scale=None, evict_scale=None)
    by_q = planner.plan_tiers(scores * torch.tensor([[1.0], [2.0]]), plain, geo, 80, stacked=True)
    by_e = planner.plan_tiers(scores * torch.tensor([[8.0], [0.125]]), plain, geo, 80, stacked=True)
    ev_q, ev_e = by_q[0] == T.EVICTED, by_e[0] == T.EVICTED
    assert torch.equal(tier == T.EVICTED, ev_e)
    assert (ev_q & ~ev_e).any() and (ev_e & ~ev_q).any()  # the factors moved evictions both ways here
    for got, q, e in zip((tier, bits, keep), by_q, by_e):
        assert torch.equal(got[~ev_q & ~ev_e], q[~ev_q & ~ev_e]) and torch.equal(got[ev_q & ~ev_e], e[ev_q & ~ev_e])
    with pytest.raises(ValueError, match="evict_scale has 2 entries, the model has 3 layers"):
        planner.plan_tiers(torch.ones(3, 4), cfg.with_overrides(layer_scale=None), planner.Geometry(3, 1, 64), 80)


def _llama_config(layers=30, hidden=576, heads=9, kv=3, vocab=49152):
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                       num_key_value_heads=kv, vocab_size=vocab, intermediate_size=64)


def test_auto_calibration_uses_the_shipped_table_for_the_embedded_model(tmp_path, monkeypatch):
    from agacc import CompressedCache

    monkeypatch.setenv("AGACC_CACHE", str(tmp_path))  # no saved calibration here
    config = _llama_config()
    assert calibrate.model_key(config) == "llama/30/576/9/3/49152"
    cache = CompressedCache(config, AGACCConfig(layer_calibration="auto", layer_gamma=0.5))
    assert cache.cfg.layer_scale == pytest.approx(calibrate.layer_scale(list(calibrate.KNOWN[calibrate.model_key(config)]), 0.5))
    # the most sensitive layer of the table (18) gets the largest factor, above 1; the first layers below 1
    assert max(range(30), key=lambda i: cache.cfg.layer_scale[i]) == 18 and cache.cfg.layer_scale[0] < 1
    # eviction: its own table, gamma 1; layer 7 loses most to eviction, layer 25 least
    assert cache.cfg.evict_scale == pytest.approx(calibrate.layer_scale(list(calibrate.KNOWN_EVICT[calibrate.model_key(config)])))
    assert max(range(30), key=lambda i: cache.cfg.evict_scale[i]) == 7 and min(range(30), key=lambda i: cache.cfg.evict_scale[i]) == 25
    explicit = tuple([2.0] * 30)
    assert CompressedCache(config, AGACCConfig(layer_calibration="auto", layer_scale=explicit)).cfg.layer_scale == explicit
    assert CompressedCache(config, AGACCConfig(layer_calibration="none")).cfg.layer_scale is None
    other = _llama_config(layers=2, hidden=64, heads=4, kv=2, vocab=256)  # no calibration known: every layer alike
    assert CompressedCache(other, AGACCConfig(layer_calibration="auto")).cfg.layer_scale is None
    assert CompressedCache(other, AGACCConfig(layer_calibration="auto")).cfg.evict_scale is None


def test_a_saved_calibration_is_found_and_a_wrong_one_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("AGACC_CACHE", str(tmp_path))
    config = _llama_config(layers=2, hidden=64, heads=4, kv=2, vocab=256)
    path = calibrate.save_sensitivity(config, [1.0, 4.0])
    assert path.is_relative_to(tmp_path)
    assert calibrate.resolve(AGACCConfig(layer_calibration="auto", layer_gamma=1.0), config).layer_scale == pytest.approx((0.5, 2.0))
    calibrate.save_sensitivity(config, [1.0, 4.0, 2.0])
    with pytest.raises(ValueError, match="re-run python -m agacc calibrate --save"):
        calibrate.resolve(AGACCConfig(layer_calibration="auto"), config)


def test_default_gamma_is_half_above_4x_and_1_otherwise():
    sens = list(calibrate.KNOWN["llama/30/576/9/3/49152"])
    config = _llama_config()
    for ratio, gamma in ((2.0, 1.0), (4.0, 1.0), (8.0, 0.5), (None, 1.0)):
        cfg = calibrate.resolve(AGACCConfig.preset("agacc", target_ratio=ratio), config)
        assert cfg.layer_scale == pytest.approx(calibrate.layer_scale(sens, gamma)), ratio
    cfg = calibrate.resolve(AGACCConfig.preset("agacc", target_ratio=8.0, layer_gamma=1.0), config)
    assert cfg.layer_scale == pytest.approx(calibrate.layer_scale(sens, 1.0))
    assert AGACCConfig.preset("agacc").layer_calibration == "auto"
    assert AGACCConfig.preset("h2o").layer_calibration == "none"  # baselines stay as published


def test_layer_floor_raises_a_layers_quantised_blocks_and_nothing_else():
    """Round 15: ``layer_floor`` lifts the quantised blocks of a floored layer to its bits (tier of the
    new container), the same plan otherwise; ``floor_trade`` floors the layers whose 3-bit sensitivity
    is at least that many times their eviction sensitivity."""
    geo = planner.Geometry(2, 1, 64)
    scores = torch.tensor([[0.005, 0.2, 0.5, 30.0, 500.0]] * 2)
    cfg = AGACCConfig(n_sink=0, tau_h=100.0, tau_l=0.3, tau_e=0.1, b_min=3, b_max=4)
    plain = planner.plan_tiers(scores, cfg, geo, 80, stacked=True)
    tier, bits, keep = planner.plan_tiers(scores, cfg.with_overrides(layer_floor=(0.0, 4.0)), geo, 80, stacked=True)
    assert torch.equal(tier[0], plain[0][0]) and torch.equal(bits[0], plain[1][0])  # layer 0: no floor
    assert plain[1][1].tolist() == [0, 3, 3, 4, 16]  # evicted, two 3-bit blocks, one 4-bit, one full
    assert bits[1].tolist() == [0, 4, 4, 4, 16] and tier[1].tolist() == [T.EVICTED, T.INT4, T.INT4, T.INT4, T.FULL]
    assert torch.equal(keep, plain[2])
    with pytest.raises(ValueError, match="layer_floor has 2 entries, the model has 3 layers"):
        planner.plan_tiers(torch.ones(3, 4), cfg.with_overrides(layer_floor=(0.0, 4.0)), planner.Geometry(3, 1, 64), 80)
    with pytest.raises(ValueError, match="layer_floor entries"):
        AGACCConfig(layer_floor=(5.0,))
    config = _llama_config()
    key = calibrate.model_key(config)
    b, e = calibrate.KNOWN[key], calibrate.KNOWN_EVICT[key]
    resolved = calibrate.resolve(AGACCConfig(layer_calibration="auto", floor_trade=0.5), config).layer_floor
    assert resolved == tuple(4.0 if b[i] >= 0.5 * e[i] else 0.0 for i in range(30))
    # the default: 0.25 at fitted ratios up to 4, leaving the layers eviction hurts most at 3 bits
    at4 = calibrate.resolve(AGACCConfig(layer_calibration="auto", target_ratio=4.0), config).layer_floor
    assert [i for i in range(30) if at4[i] == 0] == [1, 7, 8, 17]
    for cfg in (AGACCConfig(layer_calibration="auto"), AGACCConfig(layer_calibration="auto", target_ratio=8.0),
                AGACCConfig(layer_calibration="auto", target_ratio=4.0, floor_trade=float("inf")),
                AGACCConfig(layer_calibration="none", target_ratio=4.0)):
        assert calibrate.resolve(cfg, config).layer_floor is None


def test_the_floor_refuses_a_sensitivity_of_another_model(tmp_path, monkeypatch):
    """The floor reads both tables even where layer_scale / evict_scale are given: a wrong-sized one is an error."""
    monkeypatch.setenv("AGACC_CACHE", str(tmp_path))
    config = _llama_config(layers=2, hidden=64, heads=4, kv=2, vocab=256)
    calibrate.save_sensitivity(config, [1.0, 4.0])
    calibrate.save_sensitivity(config, [1.0, 2.0, 3.0], "evict")
    given = AGACCConfig(layer_calibration="auto", target_ratio=4.0, layer_scale=(1.0, 1.0), evict_scale=(1.0, 1.0))
    with pytest.raises(ValueError, match="re-run python -m agacc calibrate --evict 0.5 0.75 --save"):
        calibrate.resolve(given, config)
    assert calibrate.resolve(given.with_overrides(floor_trade=float("inf")), config).layer_floor is None  # not read
    calibrate.save_sensitivity(config, [2.0, 1.0], "evict")
    calibrate.save_sensitivity(config, [1.0, 0.1])  # layer 1: 0.1 < 0.25 x 1, evicting hurts it more
    assert calibrate.resolve(given, config).layer_floor == (4.0, 0.0)  # layer 0: 1 >= 0.25 x 2
