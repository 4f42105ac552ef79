import math

import pytest
import torch

import agacc
from agacc import policy
from agacc import tiers as T
from agacc import methods
from agacc.methods.agacc import thresholds_rule
from agacc.methods.dynacompress import block_uniforms, dynacompress_rule
from agacc.planner import Geometry, fit_threshold_scale, plan_tiers, planned_bytes
from agacc.config import AGACCConfig
from agacc.presets import PRESETS


def fidelity_key(tier, bits, keep):
    """Larger = more fidelity: tier order first, then bits, then kept elements."""
    return (-int(tier), int(bits), int(keep))


def test_thresholds_rule_worked_example():
    """The seed's exact rule: linear position in (tau_l, tau_h], codes of exactly b bits."""
    cfg = AGACCConfig(tau_h=2.0, tau_l=0.5, tau_e=0.1, b_min=2, b_max=8, p_max=0.5, position_norm="power",
                      bit_interp="linear", fill_container=False)
    scores = torch.tensor([3.0, 2.0, 1.25, 0.6, 0.5, 0.25, 0.05])
    tier, bits, keep = thresholds_rule(scores, cfg, head_dim=64)
    # 3.0 > tau_h: full; 2.0: x=1 -> b = 2 + floor(7) -> 8; 1.25: x=0.5 -> 2+3=5 (int8 container);
    # 0.6: x=0.0667 -> 2 (int2); 0.5 = tau_l: p=0 keeps all 64 -> a plain int2 block; 0.25: p=0.25 -> keep 48;
    # 0.05: evicted
    assert tier.tolist() == [T.FULL, T.INT8, T.INT8, T.INT2, T.INT2, T.PRUNED, T.EVICTED]
    assert bits.tolist() == [16, 8, 5, 2, 2, 2, 0]
    assert keep.tolist() == [64, 64, 64, 64, 64, 48, 0]


def test_thresholds_rule_log_position_and_filled_containers():
    """Default: x = log(I/tau_l)/log(tau_h/tau_l), and b raised to its container's width."""
    cfg = AGACCConfig(tau_h=2.0, tau_l=0.5, tau_e=0.1, b_min=2, b_max=8)
    scores = torch.tensor([1.25, 1.0, 0.7, 0.6])
    # x = log(2.5)/log(4) = 0.661 -> 2 + floor(4.63) = 6 -> 8;  log(2)/log(4) = 0.5 -> 2 + 3 = 5 -> 8;
    # log(1.4)/log(4) = 0.243 -> 2 + 1 = 3 (a 3-bit container);  log(1.2)/log(4) = 0.132 -> 2 + 0 = 2
    tier, bits, _ = thresholds_rule(scores, cfg, head_dim=64)
    assert bits.tolist() == [8, 8, 3, 2]
    assert tier.tolist() == [T.INT8, T.INT8, T.INT3, T.INT2]
    tier, bits, _ = thresholds_rule(scores, cfg.with_overrides(fill_container=False), head_dim=64)
    assert bits.tolist() == [6, 5, 3, 2]
    assert tier.tolist() == [T.INT8, T.INT8, T.INT3, T.INT2]  # 6 and 5 bits in the 8-bit container
    tier, bits, _ = thresholds_rule(scores, cfg.with_overrides(b_min=1, b_max=1), head_dim=64)
    assert bits.tolist() == [2, 2, 2, 2] and tier.tolist() == [T.INT2] * 4  # 1 -> 2: the container's width
    _, bits, _ = thresholds_rule(scores, cfg.with_overrides(bit_interp="linear", fill_container=False), head_dim=64)
    assert bits.tolist() == [5, 4, 2, 2]  # x = 0.5, 0.333, 0.133, 0.067
    with pytest.raises(ValueError, match="bit_interp"):
        AGACCConfig(bit_interp="cubic")


def test_dynacompress_corrected_signs():
    """Seed 001 as written gives fewer bits / more pruning to more attention; ours is the intent."""
    cfg = AGACCConfig(rule="dynacompress", b_min=2, b_max=8, gamma=0.75, lam=10, tau_prune=0.3, tau_h=1e9,
                      fill_container=False)
    a_hat = torch.linspace(0, 1, 11)
    tier, bits, _ = dynacompress_rule(a_hat, cfg, 64, layer=0)
    assert bits[-1] == 8 and bits.tolist() == sorted(bits.tolist())  # b = 8 * (1 - 0.75 * (1 - A))
    assert bits.tolist()[5] == math.floor(8 * (1 - 0.75 * 0.5))
    p = torch.sigmoid(cfg.lam * (cfg.tau_prune - a_hat))
    assert p.tolist() == sorted(p.tolist(), reverse=True)  # eviction probability falls with importance
    # the literal seed formula is the opposite:
    literal = torch.clamp(cfg.b_max * (1 - cfg.gamma * a_hat), min=cfg.b_min)
    assert literal[0] > literal[-1]


def _all_presets():
    return sorted(PRESETS)


@pytest.mark.parametrize("name", _all_presets())
def test_importance_is_monotone_with_fidelity(name):
    cfg = AGACCConfig.preset(name)
    if not cfg.compress:
        return
    scores = torch.sort(torch.rand(200) * 4).values  # ascending importance
    if cfg.rule == "dynacompress":
        # eviction is drawn per block: monotone in probability; with equal draws, monotone outright
        tier, bits, _ = dynacompress_rule(scores, cfg, 64, layer=0)
        kept_bits = bits[tier != T.EVICTED].tolist()
        assert kept_bits == sorted(kept_bits)
        u = float(block_uniforms(cfg.seed, 0, 200)[0])
        p = torch.sigmoid(cfg.lam * (cfg.tau_prune - scores / scores.max()))
        evicted = (u < p).tolist()
        assert evicted == sorted(evicted, reverse=True)
        return
    tier, bits, keep = methods.rule(cfg.rule).rule(scores, cfg, 64, 0)
    keys = [fidelity_key(t, b, k) for t, b, k in zip(tier, bits, keep)]
    assert keys == sorted(keys), f"{name}: a more important block got less fidelity"


def test_spill_lends_the_next_block_a_share_of_the_previous_score():
    s = torch.tensor([[5.0, 0.05, 0.05, 0.4, 0.05], [0.1, 0.1, 2.0, 0.1, 0.1]])
    out = policy.spill_scores(s, 0.2)
    assert torch.allclose(out, torch.tensor([[5.0, 1.0, 0.05, 0.4, 0.08], [0.1, 0.1, 2.0, 0.4, 0.1]]))
    assert policy.spill_scores(s, 0.0) is s


def test_eviction_guard_keeps_the_block_after_a_strongly_attended_one():
    """Hand-worked: tau_e = 0.1, rho = 0.2. Block 1 (0.05) follows a 5.0 block: 0.2 * 5 = 1.0 >= tau_e,
    so it is kept at the lowest tier, pruned at its own score's rate; block 2 follows a 0.05 block and
    block 4 a 0.4 block (0.08 < tau_e): both evicted. The block BEFORE a strong one is not guarded."""
    cfg = AGACCConfig(tau_h=10.0, tau_l=0.5, tau_e=0.1, b_min=3, b_max=4, p_max=0.5, spill=0.2)
    scores = torch.tensor([5.0, 0.05, 0.05, 0.4, 0.05])
    tier, bits, keep = thresholds_rule(scores, cfg, 64, spill=cfg.spill)
    # 5.0: x = log(10)/log(20) = 0.77 -> 3 + 1 = 4 bits; 0.05: p = 0.5 * (1 - 0.05/0.5) = 0.45 -> keep
    # 64 - 29 = 35, rounded up to 40 (multiples of 8); 0.4: p = 0.1 -> 58 -> 64: a plain 3-bit block
    assert tier.tolist() == [T.INT4, T.PRUNED, T.EVICTED, T.INT3, T.EVICTED]
    assert keep.tolist() == [64, 40, 0, 64, 0] and bits.tolist() == [4, 3, 0, 3, 0]
    tier0, _, _ = thresholds_rule(scores, cfg, 64)  # no guard: the seed's rule
    assert tier0.tolist() == [T.INT4, T.EVICTED, T.EVICTED, T.INT3, T.EVICTED]
    tier, _, _ = thresholds_rule(torch.tensor([0.05, 5.0]), cfg, 64, spill=0.2)
    assert tier.tolist()[0] == T.EVICTED


def test_eviction_guard_is_monotone():
    """Raising any block's score never lowers any block's fidelity (the fitter relies on it)."""
    cfg = AGACCConfig(tau_h=8.0, tau_l=0.6, tau_e=0.3, p_max=0.5)
    g = torch.Generator().manual_seed(0)
    s = torch.rand(60, generator=g) * torch.rand(60, generator=g) * 4
    base = thresholds_rule(s, cfg, 64, spill=0.2)
    for i in range(60):
        up = s.clone()
        up[i] *= 3
        raised = thresholds_rule(up, cfg, 64, spill=0.2)
        for j in range(60):
            assert fidelity_key(*(x[j] for x in raised)) >= fidelity_key(*(x[j] for x in base)), (i, j)


def test_eviction_guard_applies_at_a_prefill_only():
    """plan_tiers: the guard is on for the re-evaluation that ends a prefill, off during decoding."""
    cfg = AGACCConfig(tau_h=10.0, tau_l=0.5, tau_e=0.1, n_sink=0, spill=0.2)
    geo = Geometry(n_layers=2, heads=1, head_dim=64, batch=1, full_itemsize=2)
    scores = [torch.tensor([5.0, 0.05, 0.05]), torch.tensor([0.05, 5.0, 0.05])]
    pre = plan_tiers(scores, cfg, geo, seq_len=48 + 32, prefill=True)
    dec = plan_tiers(scores, cfg, geo, seq_len=48 + 32)
    assert [p[0].tolist() for p in pre] == [[T.INT4, T.INT3, T.EVICTED], [T.EVICTED, T.INT4, T.INT3]]
    assert [p[0].tolist() for p in dec] == [[T.INT4, T.EVICTED, T.EVICTED], [T.EVICTED, T.INT4, T.EVICTED]]
    assert planned_bytes(pre, cfg, geo, 80) > planned_bytes(dec, cfg, geo, 80)
    off = plan_tiers(scores, cfg.with_overrides(spill=0.0), geo, seq_len=80, prefill=True)
    assert [p[0].tolist() for p in off] == [p[0].tolist() for p in dec]
    with pytest.raises(ValueError, match="spill"):
        AGACCConfig(spill=1.5)


def test_bits_grow_with_importance_inside_the_band():
    cfg = AGACCConfig(tau_h=4.0, tau_l=1.0, tau_e=0.1, b_min=2, b_max=8)
    s = torch.linspace(1.01, 4.0, 50)
    _, bits, _ = thresholds_rule(s, cfg, 64)
    assert bits.tolist() == sorted(bits.tolist()) and bits.min() == 2 and bits.max() == 8


def test_layer_budget_respects_c_max():
    cfg = AGACCConfig(c_max=0.3, rule="thresholds", tau_h=100, tau_l=50, tau_e=0.0, block_size=32)
    n_layers, seq_len, B = 4, 1024, 32
    scores = [torch.rand(30) for _ in range(n_layers)]
    geo = Geometry(n_layers, 2, 64, 1, 2)
    plans = plan_tiers(scores, cfg, geo, seq_len)
    kept_tokens = sum(int((t != T.EVICTED).sum()) * B + (seq_len - 30 * B) for t, _, _ in plans)
    assert kept_tokens <= cfg.c_max * seq_len * n_layers + n_layers * B
    w = policy.layer_weights(cfg, n_layers)
    kept = [int((t != T.EVICTED).sum()) for t, _, _ in plans]
    assert kept == sorted(kept) and w == sorted(w)  # deeper layers keep more (001)
    # the least important blocks are the ones evicted
    t0, s0 = plans[0][0], scores[0]
    assert float(s0[t0 == T.EVICTED].max()) <= float(s0[(t0 != T.EVICTED)][1:].min())


@pytest.mark.parametrize("target", [2.0, 4.0, 6.0])
def test_ratio_fitter_reaches_target(target):
    cfg = AGACCConfig.preset("agacc", block_size=32)  # 126 blocks of 32 ~ 4096 tokens
    geo = Geometry(n_layers=4, heads=2, head_dim=64, batch=1, full_itemsize=2)
    seq_len = 4096
    torch.manual_seed(0)
    scores = [torch.rand(126).pow(3) * 5 for _ in range(4)]
    s = fit_threshold_scale(scores, cfg, geo, seq_len, target)
    got = 2 * 2 * seq_len * 64 * 2 * 4 / planned_bytes(plan_tiers(scores, cfg, geo, seq_len, s), cfg, geo, seq_len)
    assert target * 0.95 <= got <= target * 1.05 + 0.5  # block granularity


@pytest.mark.parametrize("start", [1e-6, 0.05, 1.0, 3.0, 1e5])
def test_ratio_fitter_warm_start_lands_where_the_cold_search_does(start):
    """Walking out from the previous scale finds the same plan boundary as bisecting [-12, 12], unless
    the previous scale's plan already spends 99-100% of the budget: then it is kept as is
    (``test_ratio_fitter_keeps_a_scale_that_still_fills_the_budget``)."""
    cfg = AGACCConfig.preset("agacc", block_size=32)
    geo = Geometry(n_layers=4, heads=2, head_dim=64, batch=1, full_itemsize=2)
    torch.manual_seed(2)
    scores = [torch.rand(126).pow(3) * 5 for _ in range(4)]
    for target in (2.0, 4.0, 6.0, 1e4):  # 1e4: out of reach -> the largest scale
        cold = fit_threshold_scale(scores, cfg, geo, 4096, target)
        warm = fit_threshold_scale(scores, cfg, geo, 4096, target, start=start)
        plan = planned_bytes(plan_tiers(scores, cfg, geo, 4096, warm), cfg, geo, 4096)
        budget = 2 * 2 * 4096 * 64 * 2 * 4 / target
        if not math.isclose(warm, cold, rel_tol=2e-3):
            assert warm == start and 0.99 * budget <= plan <= budget, (target, warm, cold, plan / budget)
        assert target >= 1e4 or plan <= budget


def test_ratio_fitter_uses_the_budget_when_block_scores_are_nearly_equal():
    """Scores within 1.5% of each other (a random-weight model's attention is nearly uniform): a
    0.1% bracket in s flips several percent of the blocks at once, so the fitter refines s until the
    plan spends at least 99% of the budget (and never more than all of it)."""
    cfg = AGACCConfig.preset("agacc")
    geo = Geometry(n_layers=2, heads=2, head_dim=32, batch=1, full_itemsize=2)
    torch.manual_seed(3)
    scores = [1.003 + 0.015 * torch.rand(72) for _ in range(2)]
    budget = 2 * 2 * 1200 * 32 * 2 * 2 / 4.0
    for start in (None, 3.0):
        s = fit_threshold_scale(scores, cfg, geo, 1200, 4.0, start=start)
        plan = planned_bytes(plan_tiers(scores, cfg, geo, 1200, s), cfg, geo, 1200)
        assert 0.99 * budget <= plan <= budget, (start, plan / budget)


def test_ratio_fitter_keeps_a_scale_that_still_fills_the_budget(monkeypatch):
    """A warm start whose plan already uses 99-100% of the budget is returned as is, after one plan
    (stable tiers between re-evaluations); one whose plan is over budget is searched away from."""
    import agacc.planner as C

    cfg = AGACCConfig.preset("agacc", block_size=32)
    geo = Geometry(n_layers=4, heads=2, head_dim=64, batch=1, full_itemsize=2)
    torch.manual_seed(4)
    scores = [torch.rand(126).pow(3) * 5 for _ in range(4)]
    budget = 2 * 2 * 4096 * 64 * 2 * 4 / 4.0
    cold = fit_threshold_scale(scores, cfg, geo, 4096, 4.0)
    assert 0.99 * budget <= planned_bytes(plan_tiers(scores, cfg, geo, 4096, cold), cfg, geo, 4096) <= budget
    calls = []
    monkeypatch.setattr(C, "plan_tiers", lambda *a, **k: calls.append(1) or plan_tiers(*a, **k))
    assert fit_threshold_scale(scores, cfg, geo, 4096, 4.0, start=cold) == cold and len(calls) == 1
    over = cold / 4  # lower thresholds: more blocks keep more bits, over budget
    assert planned_bytes(plan_tiers(scores, cfg, geo, 4096, over), cfg, geo, 4096) > budget
    assert math.isclose(fit_threshold_scale(scores, cfg, geo, 4096, 4.0, start=over), cold, rel_tol=2e-3)


def test_rule_registry_rejects_unknown_rule():
    with pytest.raises(ValueError, match="rule must be one of"):
        AGACCConfig(rule="nope")


def test_fit_thresholds_returns_a_config_that_reaches_the_ratio():
    cfg = AGACCConfig.preset("agacc", block_size=32)  # 60 blocks of 32 ~ 2000 tokens
    geo = Geometry(n_layers=3, heads=2, head_dim=64, batch=1, full_itemsize=2)
    torch.manual_seed(1)
    scores = [torch.rand(60).pow(2) * 4 for _ in range(3)]
    fitted = agacc.fit_thresholds(scores, cfg, geo, 2000, 5.0)
    assert fitted.target_ratio is None and fitted.tau_h > fitted.tau_l > fitted.tau_e
    assert math.isclose(fitted.tau_h / fitted.tau_l, cfg.tau_h / cfg.tau_l, rel_tol=1e-9)  # proportions kept
    got = 2 * 2 * 2000 * 64 * 2 * 3 / planned_bytes(plan_tiers(scores, fitted, geo, 2000), fitted, geo, 2000)
    assert 5.0 * 0.95 <= got <= 5.0 * 1.1
