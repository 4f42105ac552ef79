"""Methods: one file each, registered by name.

A method module holds its preset(s) (``AGACCConfig`` field overrides), its tier rule and hooks, and
its citation, and calls ``register(Method(...))``. Every module in this package is imported by
``load()``, so **adding a method is adding one file**: ``PRESETS`` (``agacc.presets``), the config's
``rule`` / ``budget_shape`` choices, the eval CLI and the test matrix are built from the registry.

A rule maps normalised block scores to tiers:
``rule(scores [n] or [L, n] fp32, cfg, head_dim, layer, scale, spill) -> (tier int8, bits int8, keep int16)``
alike in shape. It must lose fidelity (never gain) as ``scale`` grows (the ratio fitter relies on it);
``spill`` is the eviction guard's rho at a prefill's re-evaluation (0 elsewhere; rules may ignore it).
A rule that is elementwise (``elementwise=True``) is called once on all layers stacked.

A budget hook splits a global budget (``c_max``) over layers:
``budget(cfg, block_scores: list[[n] fp32]) -> weights per layer`` (``cfg.budget_shape`` names it).

This package imports nothing of the library but ``policy`` helpers (pure), so ``agacc.config`` can
validate against it without a cycle.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable

KINDS = ("lossless", "adaptive", "fixed", "baseline")  # display and test order of the presets

# Settings the token-selection baselines share: evicted tokens are dropped (no markers), importance is
# the raw attention (no position normalisation), small blocks (8 tokens) so selection is close to
# token-level. Compress-once methods (SnapKV, PyramidKV, FastKV, DynamicKV) select at prefill only,
# from the last 32 prompt queries with SnapKV's pooling: their re-evaluation period is effectively infinite.
ONCE = 1 << 30
SELECT = dict(markers=False, position_norm="none", block_size=8)
PREFILL_SELECT = dict(SELECT, scoring="sum", n_q=32, pool_kernel=7, recent_window=32, n_sink=0, n_r=ONCE, n_w=ONCE)


@dataclass(frozen=True)
class Method:
    """One method: ``name`` (also its rule's and budget hook's name), ``presets`` {preset name:
    config overrides} (``rule=name`` is added when the method has a rule and the preset names none),
    ``citation``, ``kind`` (one of ``KINDS``: ``fixed`` = the ratio is fixed by the format, a target
    ratio cannot move it), and the optional ``rule`` / ``budget`` hooks described above.
    ``unavailable``: why the method cannot run here (listed by the eval CLI, no preset)."""

    name: str
    presets: dict = field(default_factory=dict)
    citation: str = ""
    kind: str = "baseline"
    rule: Callable | None = None
    elementwise: bool = False
    budget: Callable | None = None
    unavailable: str = ""
    order: int = 100  # position among methods of the same kind


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (its module calls this on import)."""
    if method.kind not in KINDS:
        raise ValueError(f"method {method.name!r}: kind must be one of {KINDS}, got {method.kind!r}")
    old = METHODS.get(method.name)
    if old is not None and old.rule is not method.rule and old.rule is not None:
        raise ValueError(f"method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


_loaded = False


def load() -> dict[str, Method]:
    """Import every module of this package (each registers itself); the registry, sorted by kind."""
    global _loaded
    if not _loaded:
        for mod in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{mod.name}")
        _loaded = True
        ordered = sorted(METHODS.values(), key=lambda m: (KINDS.index(m.kind), m.order, m.name))
        METHODS.clear()
        METHODS.update((m.name, m) for m in ordered)
    return METHODS


def rule_names() -> tuple[str, ...]:
    return tuple(m.name for m in load().values() if m.rule is not None)


def budget_names() -> tuple[str, ...]:
    return tuple(m.name for m in load().values() if m.budget is not None)


def rule(name: str) -> Method:
    m = load().get(name)
    if m is None or m.rule is None:
        raise ValueError(f"unknown tier rule {name!r}; choose from {rule_names()}")
    return m


def preset_overrides() -> dict[str, tuple[Method, dict]]:
    """Preset name -> (its method, its config overrides, ``rule`` included), in registry order."""
    out = {}
    for m in load().values():
        for name, overrides in m.presets.items():
            if name in out:
                raise ValueError(f"preset {name!r} is defined by both {out[name][0].name!r} and {m.name!r}")
            kw = dict(overrides)
            if m.rule is not None:
                kw.setdefault("rule", m.name)
            out[name] = (m, kw)
    return out


def unavailable() -> dict[str, str]:
    """Methods named in the seeds that cannot run here -> why."""
    return {m.name: m.unavailable for m in load().values() if m.unavailable}
