"""The trace helpers the app's drill-down and quality-vs-memory curve use (``agacc.trace.block_history``,
``block_bytes``, ``mass_shares``, ``ratio_sweep``), each against the library called directly: the recorded
frames, ``replay_frames`` at every target ratio, and the planner's byte count of the whole plan."""
from __future__ import annotations

import pytest
import torch

import agacc
from agacc import planner
from agacc.importance import WINDOW_ITEMSIZE
from agacc.session import GenerationSession
from agacc.tiers import EVICTED, FULL, HOT, NAMES, PRUNED
from agacc.trace import SWEEP_RATIOS, Trace, block_bytes, block_history, mass_shares, ratio_sweep, replay_frames
from tests.helpers import PROMPT


@pytest.fixture(scope="module")
def trace():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = agacc.load_model(device="cpu")
    cfg = agacc.AGACCConfig.preset("agacc", tau_h=1.6, tau_l=0.9, tau_e=0.5, block_size=16, recent_window=32, n_r=4,
                                   n_w=8)
    s = GenerationSession(model, tok, PROMPT, cfg, max_new_tokens=14)
    for _ in s.stream():
        pass
    torch.set_num_threads(old)
    return Trace.from_json(s.trace.to_json())  # as the app holds it after an export / import


def test_block_history_is_the_recorded_frames(trace):
    tr = trace
    B = tr.config.block_size
    last = tr.frames[-1]
    for layer, block in ((0, 0), (5, 3), (len(last["tier"]) - 1, len(last["tier"][0]) - 1)):
        h = block_history(tr, layer, block)
        # the tokens the cache holds (the last generated token is not in it yet)
        assert h["tokens"] == tr.tokens[block * B:min((block + 1) * B, last["seq_len"])]
        assert h["text"] == "".join(h["tokens"]) and len(tr.tokens) == last["seq_len"] + 1
        holding = [(k, f) for k, f in enumerate(tr.frames) if block < len(f["tier"][layer])]
        assert [r["frame"] for r in h["frames"]] == [k for k, _ in holding]
        for r, (k, f) in zip(h["frames"], holding):
            t = f["tier"][layer][block]
            assert (r["step"], r["tier"], r["bits"], r["importance"]) == (
                f["step"], t, f["bits"][layer][block], f["importance"][layer][block])
            assert r["tier_name"] == ("hot" if t == HOT else NAMES[t])
        assert h["bytes"] == block_bytes(last, layer, block, tr.config, tr.geometry)
    with pytest.raises(ValueError, match="layer 99 is not in this run"):
        block_history(tr, 99, 0)
    with pytest.raises(ValueError, match="block 500 is not in this run"):
        block_history(tr, 0, 500)


def test_block_bytes_add_up_to_the_planned_bytes(trace):
    """Every block's bytes, the markers and the tracker window = ``planner.planned_bytes`` of the plan."""
    tr = trace
    cfg, geo = tr.config, tr.geometry
    for f in replay_frames(tr.history, cfg, geo):  # each frame with its own plan
        if all(t == HOT for row in f["tier"] for t in row):
            continue  # nothing planned yet: planned_bytes is the full-precision cache alone
        B, seq_len = f["block_size"], f["seq_len"]
        n = min(sum(1 for t in row if t != HOT) for row in f["tier"])
        blocks = sum(block_bytes(f, li, b, cfg, geo) for li in range(geo.n_layers) for b in range(len(f["tier"][li])))
        tiers = torch.tensor([row[:n] for row in f["tier"]])
        runs = int(((tiers[:, 1:] == EVICTED) & (tiers[:, :-1] != EVICTED)).sum() + (tiers[:, 0] == EVICTED).sum())
        markers = runs * planner.marker_cost_bytes(batch=1, heads=geo.heads, head_dim=geo.head_dim,
                                                   full_itemsize=geo.full_itemsize) if cfg.markers else 0
        entries = (geo.n_layers * n - int((tiers == EVICTED).sum())) * B + (runs if cfg.markers else 0) \
            + geo.n_layers * (seq_len - n * B)
        assert blocks + markers + WINDOW_ITEMSIZE * entries == f["planned_bytes"]


def _shares_here(scores, tiers) -> dict:
    tot = {"full": 0.0, "quantised": 0.0, "pruned": 0.0, "evicted": 0.0}
    for srow, trow in zip(scores, tiers):
        for s, t in zip(srow, trow):
            if t != HOT:
                tot["full" if t == FULL else "pruned" if t == PRUNED else "evicted" if t == EVICTED
                    else "quantised"] += max(0.0, s)
    z = sum(tot.values())
    return {k: v / z for k, v in tot.items()}


def test_ratio_sweep_equals_replay_frames(trace):
    tr = trace
    sweep = ratio_sweep(tr.history, tr.config, tr.geometry)
    assert [s["target"] for s in sweep] == list(SWEEP_RATIOS)
    for s in sweep:
        frames = replay_frames(tr.history, tr.config.with_overrides(target_ratio=s["target"]), tr.geometry)
        assert s["ratio"] == frames[-1]["ratio"] and s["held_bytes"] == frames[-1]["held_bytes"]
        assert s["bytes_fp16"] == frames[-1]["bytes_fp16"]
        per = [_shares_here(h["scores"], f["tier"]) for h, f in zip(tr.history, frames) if h["n_ready"] > 0]
        for k in ("full", "quantised", "pruned", "evicted"):
            assert s["shares"][k] == pytest.approx(sum(p[k] for p in per) / len(per), abs=1e-12)
            assert s["final_shares"][k] == pytest.approx(per[-1][k], abs=1e-12)
        assert sum(s["shares"].values()) == pytest.approx(1.0)
    # more memory saved: a higher ratio, less attention mass at 16 bits
    assert sweep[0]["ratio"] < sweep[-1]["ratio"]
    assert sweep[0]["shares"]["full"] >= sweep[-1]["shares"]["full"]


def test_mass_shares_and_refusals(trace):
    assert mass_shares([[1.0, 3.0, 0.5, 0.5]], [[FULL, 2, EVICTED, HOT]]) == pytest.approx(
        {"full": 1 / 4.5, "quantised": 3 / 4.5, "pruned": 0.0, "evicted": 0.5 / 4.5})
    with pytest.raises(ValueError, match="does not compress"):
        ratio_sweep(trace.history, agacc.AGACCConfig.preset("full"), trace.geometry)
