"""Controls: the knobs a person tunes, and the mapping between their values and an ``AGACCConfig``.

The mapping functions are plain Python (tested without gradio); ``build_*`` create the gradio
components inside the caller's ``gr.Blocks`` context. The config validates itself: a bad
combination (tau_l >= tau_h, b_min > b_max ...) raises ``ValueError`` with a readable message."""
from __future__ import annotations

from dataclasses import dataclass

from agacc.config import AGACCConfig
from agacc.presets import PRESETS

BLOCK_SIZES = [8, 16, 32, 64, 128]


@dataclass(frozen=True)
class Knob:
    field: str
    label: str
    minimum: float
    maximum: float
    step: float
    info: str = ""


# every threshold / knob of the cache a person tunes, in display order
THRESHOLDS = [
    Knob("tau_h", "τ_h: full precision above", 0.05, 1000.0, 0.05, "normalised importance (1 = layer mean); a heavy tail: top blocks score in the hundreds"),
    Knob("tau_l", "τ_l: quantised above, pruned below", 0.01, 20.0, 0.01, "must stay below τ_h"),
    Knob("tau_e", "τ_e: evicted below", 0.0, 10.0, 0.01, "must stay below τ_l"),
    Knob("spill", "ρ: eviction guard after attended blocks", 0.0, 1.0, 0.05,
         "at the prefill, a block below τ_e stays (lowest tier) while ρ × the score of the block before it reaches τ_e"),
]
BUDGET = Knob("target_ratio", "target memory ratio (16-bit bytes / held bytes)", 1.0, 16.0, 0.25,
              "thresholds are scaled to hit this ratio at every re-evaluation")
BITS = [
    Knob("b_min", "b_min: fewest bits", 1, 8, 1),
    Knob("b_max", "b_max: most bits", 1, 8, 1),
    Knob("p_max", "p_max: largest pruning rate", 0.0, 0.95, 0.05),
]
TRACKING = [
    Knob("alpha", "α: EMA weight of new attention", 0.01, 1.0, 0.01),
    Knob("n_r", "N_r: re-evaluate every N steps", 1, 64, 1),
    Knob("recent_window", "recent window (tokens kept 16-bit)", 0, 512, 16),
]
# field order of the values passed around (and of the gradio inputs)
FIELDS = ["tau_h", "tau_l", "tau_e", "use_target", "target_ratio", "b_min", "b_max", "p_max", "alpha", "block_size",
          "n_r", "recent_window", "host_copy", "rotate", "spill"]


def preset_names() -> list[str]:
    return list(PRESETS)


def values_from_config(cfg: AGACCConfig) -> dict:
    return {"tau_h": cfg.tau_h, "tau_l": cfg.tau_l, "tau_e": cfg.tau_e, "use_target": cfg.target_ratio is not None,
            "target_ratio": cfg.target_ratio if cfg.target_ratio is not None else 4.0, "b_min": cfg.b_min,
            "b_max": cfg.b_max, "p_max": cfg.p_max, "alpha": cfg.alpha, "block_size": cfg.block_size,
            "n_r": cfg.n_r, "recent_window": cfg.recent_window, "host_copy": cfg.host_copy, "rotate": cfg.rotate,
            "spill": cfg.spill}


def preset_values(name: str) -> dict:
    return values_from_config(AGACCConfig.preset(name))


def config_from_values(preset: str, values: dict) -> AGACCConfig:
    """The preset with the knob values applied; raises ValueError with a readable message."""
    if preset not in PRESETS:
        raise ValueError(f"unknown method preset {preset!r}; choose from {', '.join(PRESETS)}")
    v = dict(values)
    v.setdefault("spill", None)  # a later knob: value sets without it take the preset's
    missing = [f for f in FIELDS if f not in v]
    if missing:
        raise ValueError(f"missing control values: {missing}")
    try:
        kw = {"tau_h": float(v["tau_h"]), "tau_l": float(v["tau_l"]), "tau_e": float(v["tau_e"]),
              "b_min": int(v["b_min"]), "b_max": int(v["b_max"]), "p_max": float(v["p_max"]),
              "alpha": float(v["alpha"]), "block_size": int(v["block_size"]), "n_r": int(v["n_r"]),
              "recent_window": int(v["recent_window"]), "host_copy": bool(v["host_copy"]), "rotate": bool(v["rotate"]),
              "spill": float(v["spill"]) if v["spill"] is not None else PRESETS[preset].spill,
              "target_ratio": float(v["target_ratio"]) if v["use_target"] else None}
    except (TypeError, ValueError) as e:
        raise ValueError(f"a control has an invalid value: {e}") from e
    base = PRESETS[preset]
    kw["n_w"] = max(base.n_w, kw["n_r"])  # N_w >= N_r: the window grows with the period
    cfg = AGACCConfig.preset(preset, **kw)  # validates: tau_h > tau_l > tau_e, bits, block size ...
    return cfg


def values_list(values: dict) -> list:
    return [values[f] for f in FIELDS]


def values_dict(args) -> dict:
    return dict(zip(FIELDS, args))


# --- gradio -------------------------------------------------------------------------------------

def _slider(gr, k: Knob, value, elem_id: str | None = None):
    return gr.Slider(minimum=k.minimum, maximum=k.maximum, step=k.step, value=value, label=k.label,
                     info=k.info or None, elem_id=elem_id or f"knob-{k.field.replace('_', '-')}")


def build_knobs(default_preset: str = "agacc") -> dict:
    """The cache knobs (inside an open gr.Blocks context) -> {field: component} in ``FIELDS`` order."""
    import gradio as gr

    v = preset_values(default_preset)
    c = {}
    with gr.Accordion("Thresholds (replayed live after a run)", open=True):
        for k in THRESHOLDS:
            c[k.field] = _slider(gr, k, v[k.field])
        c["use_target"] = gr.Checkbox(value=v["use_target"], label="use a target memory ratio instead of fixed thresholds",
                                      elem_id="knob-use-target")
        c["target_ratio"] = _slider(gr, BUDGET, v["target_ratio"])
    with gr.Accordion("Bits and pruning", open=False):
        for k in BITS:
            c[k.field] = _slider(gr, k, v[k.field])
        c["rotate"] = gr.Checkbox(value=v["rotate"], label="store quantised blocks Hadamard-rotated (less error; needs a re-run)",
                                  elem_id="knob-rotate")
    with gr.Accordion("Importance tracking and blocks (need a re-run)", open=False):
        for k in TRACKING[:1]:
            c[k.field] = _slider(gr, k, v[k.field])
        c["block_size"] = gr.Radio(choices=BLOCK_SIZES, value=v["block_size"], label="B: block size (tokens)",
                                   elem_id="knob-block-size")
        for k in TRACKING[1:]:
            c[k.field] = _slider(gr, k, v[k.field])
        c["host_copy"] = gr.Checkbox(value=v["host_copy"], label="keep a host copy (blocks can be re-promoted)",
                                     elem_id="knob-host-copy")
    return {f: c[f] for f in FIELDS}
