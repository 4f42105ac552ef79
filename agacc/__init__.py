"""AGACC: attention-guided adaptive KV-cache compression for Hugging Face transformers.

The names below load their module on first use, so ``import agacc.trace`` (replay, no model) does not
pull in transformers."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "AGACCConfig": "agacc.config", "CompressedCache": "agacc.cache", "enable": "agacc.models",
    "load_model": "agacc.models", "Geometry": "agacc.planner", "fit_threshold_scale": "agacc.planner",
    "fit_thresholds": "agacc.planner", "plan_tiers": "agacc.planner", "planned_bytes": "agacc.planner",
    "safe_globals": "agacc.cache", "AttentionNotEnabledError": "agacc.cache", "unsupported_reason": "agacc.models",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in ("models", "cache", "config", "planner", "trace", "session", "methods", "presets", "probe"):
        return importlib.import_module(f"agacc.{name}")
    raise AttributeError(f"module 'agacc' has no attribute {name!r}")
