"""Named configurations, built from the method registry (``agacc/methods``: one file per method).
Every compressed method is a preset of the same store, so bytes are counted the same way for all."""
from __future__ import annotations

from agacc import methods
from agacc.config import AGACCConfig

PRESETS: dict[str, AGACCConfig] = {name: AGACCConfig.preset(name) for name in methods.preset_overrides()}
KIND: dict[str, str] = {name: m.kind for name, (m, _) in methods.preset_overrides().items()}
# methods named in the seeds that are not available here, with the reason (shown by the eval CLI)
UNAVAILABLE: dict[str, str] = methods.unavailable()

ADAPTIVE = tuple(n for n, k in KIND.items() if k == "adaptive")
BASELINES = tuple(n for n, k in KIND.items() if k in ("fixed", "baseline"))
# the format fixes the ratio (a target ratio cannot move it)
FIXED_RATIO = tuple(n for n, k in KIND.items() if k in ("lossless", "fixed"))
