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


# --- baselines: presets of the same store (rules in agacc/baselines) ------------------------------
# Shared by the token-selection baselines: evicted tokens are dropped (no markers), importance is the
# raw attention (no position normalisation), small blocks (8 tokens) so selection is close to
# token-level, and a short full-precision recent window. Compress-once methods (SnapKV, PyramidKV,
# FastKV, DynamicKV) select at prefill only: their re-evaluation period is effectively infinite.
_ONCE = 1 << 30
_SELECT = dict(markers=False, position_norm="none", block_size=8)
_PREFILL_SELECT = dict(_SELECT, scoring="sum", n_q=32, pool_kernel=7, recent_window=32, n_sink=0, n_r=_ONCE, n_w=_ONCE)


def _uniform(bits: int, name: str) -> AGACCConfig:
    """KIVI (Liu et al., 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache",
    arXiv:2402.02750): keys quantised per channel over groups of 32 tokens (one block), values per
    token in groups of 32 channels, asymmetric min-max, the newest tokens kept at full precision
    (the paper's residual; here the common 64-token recent window). No rotation (KIVI has none).
    Every other token at ``bits`` bits: the ratio is fixed by the bit width, ``--ratio`` cannot move it."""
    return AGACCConfig(rule="uniform", b_min=bits, b_max=bits, quantizer="minmax", block_size=32,
                       key_quant="channel", rotate=False, value_group_size=32, recent_window=64, n_sink=0, markers=False,
                       scoring="sum", position_norm="none", name=name)


PRESETS.update({
    "uniform-int8": _uniform(8, "uniform-int8"),
    "uniform-int4": _uniform(4, "uniform-int4"),
    "uniform-int2": _uniform(2, "uniform-int2"),
    # H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
    # Language Models", arXiv:2306.14048): accumulated attention of every query so far; the budget is
    # split half heavy hitters, half most recent tokens; evicted tokens are gone for good.
    "h2o": AGACCConfig(rule="h2o", scoring="sum", recent_window=16, n_sink=0, n_r=8, n_w=8,
                       **_SELECT, name="h2o"),
    # StreamingLLM (Xiao et al., 2024, "Efficient Streaming Language Models with Attention Sinks",
    # arXiv:2309.17453): 4 attention-sink tokens + a sliding window of the most recent tokens.
    "streamingllm": AGACCConfig(rule="recent", scoring="sum", recent_window=16, n_sink=4, n_r=8, n_w=8,
                                **_SELECT, name="streamingllm"),
    # SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation",
    # arXiv:2404.14469): the last 32 prompt queries (observation window) vote; votes max-pooled over
    # 7 neighbours; the top-k positions and the window are kept, once, at prefill.
    "snapkv": AGACCConfig(rule="topk", **_PREFILL_SELECT, name="snapkv"),
    # PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
    # Information Funneling", arXiv:2406.02069): SnapKV selection with per-layer budgets falling
    # linearly with depth (more at the bottom, less at the top).
    "pyramidkv": AGACCConfig(rule="keep", c_max=1.0, budget_shape="pyramid", **_PREFILL_SELECT, name="pyramidkv"),
    # FastKV (Jo et al., 2025, "FastKV: KV Cache Compression for Fast Long-Context Processing with
    # Token-Selective Propagation", arXiv:2502.01068): SnapKV-style selection in the early layers;
    # from the TSP layer (15, about half depth) on, every layer keeps only the tokens that layer selected.
    "fastkv": AGACCConfig(rule="topk", tsp_layer=15, **_PREFILL_SELECT, name="fastkv"),
    # DynamicKV (Zhou et al., 2024, "DynamicKV: Task-Aware Adaptive KV Cache Compression for Long
    # Context LLMs", arXiv:2412.14838): per-layer budgets follow each layer's own attention
    # (layers with diffuse importance get more), SnapKV-style selection inside each layer.
    "dynamickv": AGACCConfig(rule="keep", c_max=1.0, budget_shape="dynamic", **_PREFILL_SELECT, name="dynamickv"),
})

# Methods named in the seeds that are not available here, with the reason (shown by the eval CLI).
UNAVAILABLE: dict[str, str] = {
    "kv-distill": ("KV-Distill (Chari et al., 2025, arXiv:2503.10337) needs trained adaptor weights; "
                   "training them is not feasible on this CPU-only setup, so it is not implemented."),
}

BASELINES = ("uniform-int8", "uniform-int4", "uniform-int2", "h2o", "streamingllm", "snapkv", "pyramidkv",
             "fastkv", "dynamickv")
ADAPTIVE = ("agacc", "dynacompress", "attention-sum")
FIXED_RATIO = ("full", "uniform-int8", "uniform-int4", "uniform-int2")
