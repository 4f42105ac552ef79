"""Named configurations. Every compressed method is a preset of the same store, so bytes are
counted the same way for all of them."""
from __future__ import annotations

from agacc.config import AGACCConfig

PRESETS: dict[str, AGACCConfig] = {
    # lossless: every entry in the model's dtype, no tiers (importance is still tracked for display)
    "full": AGACCConfig(compress=False, store_dtype="model", name="full"),
    # seed 000: EMA importance, position normalisation, thresholds, bits, pruning, markers
    "agacc": AGACCConfig(name="agacc"),
    # seed 001: decay-weighted, layer-weighted importance, corrected bit / eviction rules
    "dynacompress": AGACCConfig(rule="dynacompress", scoring="decay", position_norm="none", name="dynacompress"),
    # seed 002: C_j = alpha*sum A + (1-alpha)*beta*sum A, a scaled attention sum
    "attention-sum": AGACCConfig(scoring="sum", position_norm="none", name="attention-sum"),
}
