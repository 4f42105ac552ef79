"""Controls: the knobs a person tunes, and the mapping between their values and an ``AGACCConfig``.

Derived from the config's own field metadata (``agacc.config``): ``ui_fields()`` names the fields
the app shows and ``field_info(name)`` gives each one's type, ``Knob`` (label, range, section, help)
and choices. A bool is a checkbox, a field with choices a radio, an optional number (None = off)
a checkbox that turns it on plus its slider, any other number a slider.

The mapping functions are plain Python (tested without gradio); ``build_knobs`` creates the gradio
components inside the caller's ``gr.Blocks`` context. The config validates itself: a bad
combination (tau_l >= tau_h, b_min > b_max ...) raises ``ValueError`` with a readable message."""
from __future__ import annotations

from agacc.config import AGACCConfig, Knob, field_info, ui_fields
from agacc.presets import PRESETS

# one accordion per Knob section, in this order: section -> (title, open at the start)
SECTIONS = {"thresholds": ("Thresholds (replayed live after a run)", True),
            "bits": ("Bits and pruning", False),
            "tracking": ("Importance tracking and blocks (need a re-run)", False)}
# an optional field (None = off) is a checkbox that turns it on and a slider:
# field -> (the checkbox's value name, its label, the slider's value while the field is off)
SWITCHES = {"target_ratio": ("use_target", "use a target memory ratio instead of fixed thresholds", 4.0)}


def _kind(name: str) -> tuple[str, bool]:
    """(the field's type without None, whether None is allowed)"""
    t = field_info(name)["type"]
    return t.replace(" | None", ""), t.endswith("| None")


def knob(name: str) -> Knob:
    return field_info(name)["ui"]


def switch(name: str) -> tuple[str, str, float]:
    """(value name, label, value while off) of an optional field's checkbox."""
    k = knob(name)
    return SWITCHES.get(name, (f"use_{name}", f"use {k.label}", k.minimum))


def sections() -> dict[str, list[str]]:
    """Knob section -> its fields in display order: the sections in ``SECTIONS`` order (any other after
    them), the fields in declaration order with the checkboxes last."""
    out: dict[str, list[str]] = {s: [] for s in SECTIONS}
    for name in ui_fields():
        out.setdefault(knob(name).section, []).append(name)
    return {s: sorted(names, key=lambda n: _kind(n)[0] == "bool") for s, names in out.items() if names}


def _value_names() -> list[str]:
    names = []
    for fields in sections().values():
        for name in fields:
            names += [switch(name)[0], name] if _kind(name)[1] else [name]
    return names


# the knob values passed around, in display order (the order of the gradio components and of values_list)
FIELDS = _value_names()


def preset_names() -> list[str]:
    return list(PRESETS)


def values_from_config(cfg: AGACCConfig) -> dict:
    """The knob values that show ``cfg`` ({value name: value}, ``FIELDS`` order)."""
    v = {}
    for fields in sections().values():
        for name in fields:
            x = getattr(cfg, name)
            if _kind(name)[1]:
                use, _, off = switch(name)
                v[use], v[name] = x is not None, (x if x is not None else off)
            else:
                v[name] = x
    return {f: v[f] for f in FIELDS}


def preset_values(name: str) -> dict:
    return values_from_config(AGACCConfig.preset(name))


_CAST = {"int": int, "float": float, "bool": bool, "str": str}


def config_from_values(preset: str, values: dict) -> AGACCConfig:
    """The preset with the knob values applied; raises ValueError with a readable message. A value
    that is missing or None (an optional field: its checkbox's) keeps the preset's; other keys are
    ignored (the whole dict of a handler's inputs can be passed). N_w grows with N_r."""
    if preset not in PRESETS:
        raise ValueError(f"unknown method preset {preset!r}; choose from {', '.join(PRESETS)}")
    kw = {}
    for name in ui_fields():
        kind, optional = _kind(name)
        x = values.get(name)
        if optional:
            on = values.get(switch(name)[0])
            if on is None:
                continue  # the preset's
            if not on:
                kw[name] = None
                continue
        elif x is None:
            continue  # the preset's
        try:
            kw[name] = _CAST[kind](x)
        except (TypeError, ValueError) as e:
            raise ValueError(f"a control has an invalid value: {name}={x!r} ({e})") from e
    base = PRESETS[preset]
    kw["n_w"] = max(base.n_w, kw.get("n_r", base.n_r))  # N_w >= N_r: the window grows with the period
    return AGACCConfig.preset(preset, **kw)  # validates: tau_h > tau_l > tau_e, bits, block size ...


def values_list(values: dict) -> list:
    return [values[f] for f in FIELDS]


def values_dict(args) -> dict:
    return dict(zip(FIELDS, args))


# --- thresholds: moving one never leaves tau_h > tau_l > tau_e >= 0 broken ------------------------

THRESHOLDS = ("tau_h", "tau_l", "tau_e")  # high to low: the order the config demands


def _snap(x: float, step: float, lo: float, hi: float, up: bool) -> float:
    import math

    q = x / step
    q = math.ceil(q - 1e-9) if up else math.floor(q + 1e-9)
    return round(min(hi, max(lo, q * step)), 6)


def order_thresholds(moved: str, values: dict) -> dict:
    """The thresholds after the user moved ``moved`` to ``values[moved]``: the other two pushed out of
    the way (the least, on their sliders' steps and within their ranges) so that tau_h > tau_l > tau_e
    >= 0 holds. -> {field: new value} for the fields that change (empty: the order holds, or a box is
    empty). The sliders' ranges are nested (each minimum and maximum below the next threshold's), so a
    valid push always exists."""
    try:
        v = {f: float(values[f]) for f in THRESHOLDS}
    except (TypeError, ValueError, KeyError):
        return {}
    k = {f: knob(f) for f in THRESHOLDS}
    order = list(THRESHOLDS)
    i = order.index(moved)
    for j in range(i - 1, -1, -1):  # the thresholds above the moved one go up
        hi, lo = order[j], order[j + 1]
        if v[hi] <= v[lo]:
            v[hi] = _snap(max(v[lo] * 1.25, v[lo] + k[hi].step), k[hi].step, k[hi].minimum, k[hi].maximum, up=True)
    for j in range(i + 1, len(order)):  # those below it go down
        hi, lo = order[j - 1], order[j]
        if v[lo] >= v[hi]:
            v[lo] = _snap(v[hi] * 0.5, k[lo].step, k[lo].minimum, k[lo].maximum, up=False)
    return {f: v[f] for f in THRESHOLDS if f != moved and v[f] != float(values[f])}


# --- gradio -------------------------------------------------------------------------------------

def _elem_id(name: str) -> str:
    return f"knob-{name.replace('_', '-')}"


def tolerant_slider(**kw):
    """gr.Slider that takes a cleared box (None to the handler) or a number out of range (clamped)."""
    from components.tolerant import TolerantSlider

    return TolerantSlider(**kw)


def tolerant_number(**kw):
    from components.tolerant import TolerantNumber

    return TolerantNumber(**kw)


def _slider(gr, name: str, k: Knob, value):
    return tolerant_slider(minimum=k.minimum, maximum=k.maximum, step=k.step, value=value, label=k.label,
                           info=k.info or None, elem_id=_elem_id(name))


def _components(gr, name: str, values: dict) -> dict:
    """{value name: component} of one field (two for an optional field: its checkbox and slider)."""
    k, info = knob(name), field_info(name)
    kind, optional = _kind(name)
    if kind == "bool":
        return {name: gr.Checkbox(value=values[name], label=k.label, info=k.info or None, elem_id=_elem_id(name))}
    if info["choices"]:
        return {name: gr.Radio(choices=list(info["choices"]), value=values[name], label=k.label, info=k.info or None,
                               elem_id=_elem_id(name))}
    if optional:
        use, label, _ = switch(name)
        return {use: gr.Checkbox(value=values[use], label=label, elem_id=_elem_id(use)),
                name: _slider(gr, name, k, values[name])}
    return {name: _slider(gr, name, k, values[name])}


def build_knobs(default_preset: str = "agacc") -> dict:
    """The cache knobs (inside an open gr.Blocks context) -> {value name: component} in ``FIELDS`` order."""
    import gradio as gr

    v = preset_values(default_preset)
    c = {}
    for section, fields in sections().items():
        title, is_open = SECTIONS.get(section, (section.capitalize(), False))
        with gr.Accordion(title, open=is_open):
            for name in fields:
                c.update(_components(gr, name, v))
    return {f: c[f] for f in FIELDS}
