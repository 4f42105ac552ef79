"""Record the golden outputs of every preset (run once, before a refactor): python tests/golden/record.py"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# the ``agacc`` preset's fields as its variants below were recorded (before rounds 11-29 changed them)
RECORDED = dict(recent_window=32, sink_bits=16, decode_evidence="ema", n_w=16, lookahead=0, hot_bits=16)


def cases():
    """(label, preset, overrides): every preset, and the variants that reach the other code paths."""
    import agacc
    from agacc.presets import PRESETS

    out = [(name, name, {}) for name in PRESETS]
    out += [("agacc@4", "agacc", dict(target_ratio=4.0)), ("agacc@8", "agacc", dict(target_ratio=8.0)),
            ("h2o@4", "h2o", dict(target_ratio=4.0)), ("snapkv@4", "snapkv", dict(target_ratio=4.0)),
            ("pyramidkv@4", "pyramidkv", dict(target_ratio=4.0)), ("fastkv@4", "fastkv", dict(target_ratio=4.0, tsp_layer=1)),
            ("dynamickv@4", "dynamickv", dict(target_ratio=4.0)), ("dynacompress@4", "dynacompress", dict(target_ratio=4.0)),
            ("agacc-token-pmax", "agacc", dict(RECORDED, key_quant="token", p_max=0.6, tau_l=2.0, rotate=False)),
            ("agacc-host", "agacc", dict(RECORDED, host_copy=True, target_ratio=3.0, position_norm="power", markers=True)),
            ("dynacompress-cmax", "dynacompress", dict(c_max=0.5, block_size=8)),
            ("agacc-share", "agacc", dict(RECORDED, share_across_layers=True, pool_kernel=3, b_min=2, b_max=8,
                                           tau_h=200.0, tau_l=0.6, tau_e=0.3)),  # the thresholds it was recorded with
            ("agacc@4-nohold", "agacc", dict(RECORDED, target_ratio=4.0, hold_evictions=False, markers=True)),
            ("agacc@4-markers", "agacc", dict(RECORDED, target_ratio=4.0, markers=True)),  # the preset before round 8
            ("agacc@4-rw32", "agacc", dict(RECORDED, target_ratio=4.0)),  # before round 11
            ("agacc@4-sink16", "agacc", dict(target_ratio=4.0, sink_bits=16, decode_evidence="ema",
                                             n_w=16, lookahead=0, hot_bits=16)),  # before round 12
            ("agacc@4-ema", "agacc", dict(target_ratio=4.0, decode_evidence="ema", n_w=16,
                                          lookahead=0, hot_bits=16)),  # before round 16
            ("agacc@4-nw16", "agacc", dict(target_ratio=4.0, n_w=16, lookahead=0, hot_bits=16)),  # before round 24
            ("agacc@4-nolook", "agacc", dict(target_ratio=4.0, lookahead=0, hot_bits=16)),  # before round 27
            ("agacc@4-hot16", "agacc", dict(target_ratio=4.0, hot_bits=16)),  # before round 29
            ("agacc@8-norepeat", "agacc", dict(target_ratio=8.0, repeat_weight=0.0))]  # before round 32
    return out


def run_case(preset, overrides, n_new=40):
    import agacc
    from tests.helpers import tiny_model

    model = tiny_model(layers=2, seed=0)
    torch.manual_seed(1)
    ids = torch.randint(3, 256, (1, 300))
    cfg = agacc.AGACCConfig.preset(preset, **overrides)
    cache = agacc.CompressedCache(model.config, cfg, record_history=True)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=n_new,
                             do_sample=False, min_new_tokens=n_new, pad_token_id=0)
    mem = cache.memory()
    snap = cache.snapshot()
    return {"tokens": out[0, ids.shape[1]:].tolist(), "bytes": mem["bytes"], "by_tier": mem["by_tier"],
            "entries": mem["entries"], "tier": snap["tier"], "bits": snap["bits"], "keep": snap["keep"],
            "markers": snap["markers"], "reevaluations": snap["reevaluations"]}


def record() -> dict:
    return {label: run_case(p, o) for label, p, o in cases()}


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent.parent))
    res = record()
    (HERE / "presets.json").write_text(json.dumps(res, sort_keys=True))
    print(f"recorded {len(res)} cases")
