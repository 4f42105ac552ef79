"""The method grammar: one string names a configured method, everywhere (CLIs, bench scripts).

    NAME[@RATIO][,key=value]...

* ``NAME``: a preset (``AGACCConfig.preset``): ``agacc``, ``h2o``, ``uniform-int4``, ...
* ``@RATIO``: ``target_ratio = RATIO`` (bytes of a 16-bit cache / bytes held, >= 1): the ratio
  fitter sets the thresholds so the cache holds that much less. Fixed-ratio presets (``full``, the
  ``uniform-int*`` ones) are not moved by it.
* ``key=value``: any ``AGACCConfig`` field, typed as the field is (``agacc.config.parse_override``,
  the same as ``--set``): ``tau_h=6``, ``markers=false``, ``c_max=none``. A tuple field takes the
  rest of its comma-separated values: ``agacc,layer_weights=1,2,3,tau_h=6``.

Examples: ``agacc``, ``agacc@4``, ``h2o@4,recent_window=32``, ``agacc,tau_h=6,markers=false``.

    >>> parse_method("h2o@4,recent_window=32") == AGACCConfig.preset("h2o", target_ratio=4.0, recent_window=32)
    True
    >>> method_label(" agacc@4.0 , tau_h = 6 ")
    'agacc@4,tau_h=6'
"""
from __future__ import annotations

from dataclasses import fields

from agacc.config import AGACCConfig, parse_override

_TUPLE_FIELDS = frozenset(f.name for f in fields(AGACCConfig) if "tuple" in str(f.type))


def _split(spec: str) -> tuple[str, str | None, list[tuple[str, str]]]:
    """-> (name, raw ratio or None, [(key, raw value)]) after the syntax checks."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("empty method spec: expected NAME[@RATIO][,key=value]... (e.g. agacc@4,tau_h=6)")
    head, *items = [x.strip() for x in spec.split(",")]
    name, at, ratio = head.partition("@")
    name = name.strip()
    if not name:
        raise ValueError(f"method {spec!r}: no preset name before '@' or ','; expected NAME[@RATIO][,key=value]...")
    if at and not ratio.strip():
        raise ValueError(f"method {spec!r}: '@' needs a ratio after it, e.g. {name}@4")
    pairs: list[tuple[str, str]] = []
    for item in items:
        if "=" in item:
            key, _, raw = item.partition("=")
            pairs.append((key.strip(), raw.strip()))
        elif pairs and pairs[-1][0] in _TUPLE_FIELDS and item:  # layer_weights=1,2,3: more values
            pairs[-1] = (pairs[-1][0], f"{pairs[-1][1]},{item}")
        else:
            raise ValueError(f"method {spec!r}: expected key=value after ',', got {item!r}")
    return name, (ratio.strip() if at else None), pairs


def _ratio(spec: str, raw: str) -> float:
    try:
        r = float(raw)
    except ValueError:
        raise ValueError(f"method {spec!r}: the ratio after '@' must be a number >= 1, got {raw!r}") from None
    if not r >= 1.0 or r == float("inf"):
        raise ValueError(f"method {spec!r}: the ratio after '@' must be a number >= 1 (16-bit bytes / bytes held), got {raw!r}")
    return r


def split_method(spec: str) -> tuple[str, dict]:
    """``"h2o@4,recent_window=32"`` -> ``("h2o", {"target_ratio": 4.0, "recent_window": 32})``: the preset
    name and the typed overrides, without building the config (for callers that add their own on top)."""
    name, ratio, pairs = _split(spec)
    overrides: dict = {}
    if ratio is not None:
        overrides["target_ratio"] = _ratio(spec, ratio)
    for key, raw in pairs:
        try:
            k, v = parse_override(f"{key}={raw}")
        except ValueError as e:
            raise ValueError(f"method {spec!r}: {e}") from None
        if k in overrides:
            what = "the ratio ('@' and target_ratio=)" if k == "target_ratio" else f"{k!r}"
            raise ValueError(f"method {spec!r}: {what} given twice")
        overrides[k] = v
    return name, overrides


def parse_method(spec: str) -> AGACCConfig:
    """``NAME[@RATIO][,key=value]...`` -> the validated ``AGACCConfig`` (``cfg.name`` = the preset's name)."""
    name, overrides = split_method(spec)
    try:
        return AGACCConfig.preset(name, **overrides)
    except ValueError as e:  # unknown preset (the message lists them), unknown field, invalid value
        raise ValueError(f"method {spec!r}: {e}") from None


def method_label(spec: str) -> str:
    """The spec written canonically (no spaces, ratio as ``%g``): the name a method has in tables and JSON.
    A bare preset name is its own label (``agacc`` -> ``agacc``)."""
    name, ratio, pairs = _split(spec)
    label = name if ratio is None else f"{name}@{_ratio(spec, ratio):g}"
    return ",".join([label] + [f"{k}={v}" for k, v in pairs])


def parse_methods(specs) -> list[tuple[str, AGACCConfig]]:
    """Several specs -> ``[(label, config)]`` in order; the same method twice is an error."""
    out, seen = [], set()
    for spec in specs:
        label = method_label(spec)
        if label in seen:
            raise ValueError(f"method {label!r} is given twice")
        seen.add(label)
        out.append((label, parse_method(spec)))
    return out
