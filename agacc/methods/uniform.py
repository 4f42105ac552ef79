"""KIVI-style uniform quantisation (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit
Quantization for KV Cache", arXiv:2402.02750): keys quantised per channel over groups of 32 tokens
(one block), values per token in groups of 32 channels, asymmetric min-max, the newest tokens kept at
full precision (the paper's residual; here the common 64-token recent window). No rotation (KIVI has
none). KIVI quantises a prompt once, after its whole prefill; through a chunked prefill blocks are
held at >= 4 bits until the prompt ends (``prefill_bits``), so later chunks never build on 2-bit keys. Every other token at ``b_max`` bits: the ratio is fixed by the bit width, a target ratio
cannot move it."""
from __future__ import annotations

import torch

from agacc.methods import Method, register
from agacc.quant import container_bits
from agacc.tiers import CONTAINER_TIER


def uniform_rule(scores, cfg, head_dim, layer=0, scale=1.0, spill=0.0):
    """Every ready block at ``cfg.b_max`` bits, independent of the scores and of ``scale``."""
    n = scores.numel()
    c = container_bits(cfg.b_max)
    return (torch.full((n,), CONTAINER_TIER[c], dtype=torch.int8), torch.full((n,), cfg.b_max, dtype=torch.int8),
            torch.full((n,), head_dim, dtype=torch.int16))


def _kivi(bits: int) -> dict:
    return dict(b_min=bits, b_max=bits, quantizer="minmax", block_size=32, key_quant="channel", rotate=False,
                value_group_size=32, recent_window=64, n_sink=0, markers=False, scoring="sum", position_norm="none",
                prefill_bits=4)


register(Method(
    "uniform", presets={f"uniform-int{b}": _kivi(b) for b in (8, 4, 2)}, kind="fixed", rule=uniform_rule,
    citation="Liu et al., 2024, KIVI, arXiv:2402.02750",
))
