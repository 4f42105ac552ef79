"""AGACCConfig: every knob of the compressed cache in one validated dataclass.

Each field names the symbol it has in the seed documents (000 = AGACC, 001 = DynaCompress,
002 = the attention-sum variant). Importance scores are in units of the layer's mean: a block
whose normalised importance is 2.0 receives twice the attention of the average compressible
block, so the thresholds mean the same at any context length.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields, replace

SCORINGS = ("ema", "decay", "sum")             # 000 §2.3 EMA / 001 decay-weighted / 002 attention sum
BUDGET_SHAPES = ("weights", "pyramid", "dynamic")  # per-layer budgets: 001 w_l / PyramidKV / DynamicKV
BIT_INTERPS = ("log", "linear")
POSITION_NORMS = ("none", "power", "log")      # forms of P(t - i), 000 §2.3
QUANTIZERS = ("minmax", "meanstd")
KEY_QUANTS = ("token", "channel")
STORE_DTYPES = ("model", "float16", "bfloat16")


@dataclass(frozen=True)
class AGACCConfig:
    """Configuration of the attention-guided adaptive KV cache.

    Tracking and importance (seed 000 §2.2-2.3, 001 §2.1):
        n_q: N_q, the observation window: how many of the last prompt queries give the initial S_i at prefill.
        alpha: alpha, EMA weight of the newest attention in I_i(t) = alpha*S_i + (1-alpha)*I_i(t-1).
        scoring: "ema" (000), "decay" (001: A_i = sum_t e^{-beta(T-t)} w_l sum_j alpha_ij / T) or
            "sum" (002: the accumulated attention sum).
        beta: beta > 0, per-step decay of the DynaCompress history.
        layer_weights: w_l, one weight per layer for the DynaCompress aggregation and layer budgets;
            None = linearly rising with depth (001: deeper layers keep more).
        share_across_layers: S_i averaged over all L layers as written in 000 §2.2 (one score per
            token for the whole model) instead of one score per layer.
        attention_sum_beta: beta of seed 002, C_j = alpha*sum_i A_ij + (1-alpha)*beta*sum_i A_ij; the
            attention-sum preset scores with this constant factor (a rescaled attention sum).
        position_norm: form of P(t-i) in I^_i = I_i / P(t-i): "none" (P=1), "power" ((1+d)^-gamma),
            "log" (1/log(e+d)).
        position_gamma: gamma of the power-law P.
    Tiers, bits, pruning, eviction (000 §2.4):
        tau_h, tau_l, tau_e: thresholds on normalised block importance; tau_h > tau_l > tau_e >= 0.
            > tau_h: full precision; (tau_l, tau_h]: quantised; [tau_e, tau_l]: pruned; < tau_e: evicted.
        b_min, b_max: bit range; medium-tier bits b = b_min + floor(x*(b_max-b_min+1)), x the position
            of I^ inside (tau_l, tau_h]; stored in 2/3/4/8-bit containers. Default 3..4: with a real
            3-bit container, 3 bits beat 2 bits + more eviction at equal bytes (docs/tuning.md round 3).
        bit_interp: how x is measured: "linear" (the seed's (I^ - tau_l)/(tau_h - tau_l)) or "log"
            (log(I^/tau_l)/log(tau_h/tau_l), the default: block importance spans orders of magnitude,
            so the linear form puts almost every block in the lowest bit width; docs/tuning.md).
        fill_container: raise every code width to its container's (1 -> 2, 5..7 -> 8): a 6-bit code
            costs an 8-bit container's bytes anyway, so the extra bits are free precision. False keeps
            the seed's exact b (to study b's error, not to save bytes).
        quantizer: "minmax" (asymmetric, one scale and zero per group) or "meanstd" (seed formula).
        s: outlier scale s of the mean/std quantiser.
        key_quant: how keys are grouped: "channel" (KIVI, the default: one (scale, zero) per channel
            over a block's B tokens) or "token" (one per token per group of key_group_size channels).
            Values are always per token. docs/tuning.md round 4 compares them at equal bytes.
        key_group_size: channels per (scale, zero) group of the per-token key quantiser.
        value_group_size: channels per (scale, zero) group of the per-token value quantiser.
        rotate: store quantised keys and values Hadamard-rotated (``agacc.quant.rotate``): outlier
            channels spread over the vector, so min-max groups lose less (values above all); attention
            rotates the query and the quantised part of the output instead (exact up to rounding).
        p_max: p_max, maximum magnitude-pruning rate, p_i = p_max*(1 - min(1, I^/tau_l)).
        sparse_threshold: pruned blocks are stored sparse (bitmap + kept values) when p_i >= this,
            otherwise dense in the b_min container with the pruned elements zeroed.
        markers: evicted spans leave one marker entry (importance-weighted mean K/V + log(count)
            attention bias) per contiguous run; False drops them outright.
        spill: rho in [0, 1], eviction guard of the thresholds rule at the re-evaluation that ends a
            prefill: a block below tau_e is kept (at the lowest kept tier) while rho * the score of
            the block before it reaches tau_e. The prompt's importance comes from the last N_q
            queries only, which attend to where a span starts (a question to the words before a
            number), while the answer will read the span on, token by token: the block after a
            strongly attended one is kept for that read. During decoding the tracker observes the
            reads as they happen, so the guard is off there. Bits follow the block's own score.
            0 = off. docs/tuning.md round 5.
    DynaCompress rules (001 §2.2, sign inversions corrected, see docs/seeds.md):
        gamma: gamma, bits b = max(b_min, floor(b_max*(1 - gamma*(1 - A^)))), A^ = A / max A.
        lam, tau_prune: lambda and tau of p_evict = sigmoid(lambda*(tau - A^)) (seeded RNG).
        c_max: C_max as a fraction of the entries of a full cache (sum_l L): per-layer budgets
            ceil(L/kappa_l) proportional to w_l with sum <= C_max; blocks beyond it are evicted. None = off.
        seed: RNG seed of the probabilistic pruning.
        budget_shape: how C_max is split over layers: "weights" (proportional to w_l, 001),
            "pyramid" (falling linearly with depth, PyramidKV), "dynamic" (proportional to how many
            blocks a layer needs to cover 90% of its importance, DynamicKV).
    Baseline hooks (see agacc/baselines):
        rule: name of the tier rule in ``agacc.policy.RULES`` ("thresholds" = seed 000, "dynacompress"
            = seed 001, plus the baselines' rules).
        pool_kernel: max-pool token scores over this many neighbours before the block max (SnapKV); 0 = off.
        tsp_layer: from this layer on, every layer reuses this layer's scores and tiers (FastKV's
            token-selective propagation); None = off.
    Blocks and re-evaluation (000 §2.5-2.6):
        block_size: B, tokens per block; block importance = max over its tokens.
        n_r: N_r, re-evaluate tiers every N_r decode steps.
        n_w: N_w, S_i at a re-evaluation is the mean attention over the last N_w steps (>= n_r).
        host_copy: keep a full-precision host copy of every compressed block so blocks whose
            importance rose are re-promoted exactly (reported as host_bytes).
        recent_window: newest tokens always kept at full precision.
        n_sink: first tokens always kept at full precision (their blocks).
    Defaults (= the ``agacc`` preset) were chosen on the embedded model (docs/tuning.md): position
    normalisation and pruning cost more perplexity than they save there, so both are off by default
    and one setting away (position_norm="power", p_max=0.5).
    Budget and storage:
        target_ratio: if set, thresholds are refitted at every re-evaluation so that the cache holds
            bytes_fp16 / target_ratio bytes (the ratio fitter); the tau_* keep their proportions.
        store_dtype: dtype of full-precision entries: "model" (lossless) or a 16-bit type.
        compress: False = keep every entry at full precision (the lossless `full` preset).
    """

    # tracking / importance
    n_q: int = 32
    alpha: float = 0.5
    scoring: str = "ema"
    beta: float = 0.05
    layer_weights: tuple[float, ...] | None = None
    share_across_layers: bool = False
    attention_sum_beta: float = 1.0
    position_norm: str = "none"
    position_gamma: float = 0.3
    # tiers
    tau_h: float = 200.0
    tau_l: float = 0.6
    tau_e: float = 0.3
    b_min: int = 3
    b_max: int = 4
    bit_interp: str = "log"
    fill_container: bool = True
    quantizer: str = "minmax"
    s: float = 3.0
    key_quant: str = "channel"
    key_group_size: int = 64
    value_group_size: int = 64
    rotate: bool = True
    p_max: float = 0.0
    sparse_threshold: float = 0.25
    markers: bool = True
    spill: float = 0.2
    # DynaCompress
    rule: str = "thresholds"
    gamma: float = 0.75
    lam: float = 10.0
    tau_prune: float = 0.1
    c_max: float | None = None
    seed: int = 0
    budget_shape: str = "weights"
    pool_kernel: int = 0
    tsp_layer: int | None = None
    # blocks / re-evaluation
    block_size: int = 16
    n_r: int = 8
    n_w: int = 16
    host_copy: bool = False
    recent_window: int = 32
    n_sink: int = 4
    # budget / storage
    target_ratio: float | None = None
    store_dtype: str = "float16"
    compress: bool = True
    name: str = "custom"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ValueError(f"AGACCConfig: {msg}")

        need(self.n_q >= 1, f"n_q (N_q) must be >= 1, got {self.n_q}")
        need(0.0 < self.alpha <= 1.0, f"alpha must be in (0, 1], got {self.alpha}")
        need(self.scoring in SCORINGS, f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        from agacc.policy import rule_names

        need(self.rule in rule_names(), f"rule must be one of {rule_names()}, got {self.rule!r}")
        need(self.budget_shape in BUDGET_SHAPES, f"budget_shape must be one of {BUDGET_SHAPES}, got {self.budget_shape!r}")
        need(self.pool_kernel >= 0, f"pool_kernel must be >= 0, got {self.pool_kernel}")
        need(self.tsp_layer is None or self.tsp_layer >= 0, f"tsp_layer must be >= 0 or None, got {self.tsp_layer}")
        need(self.beta > 0, f"beta must be > 0, got {self.beta}")
        need(self.attention_sum_beta > 0, f"attention_sum_beta must be > 0, got {self.attention_sum_beta}")
        need(self.position_norm in POSITION_NORMS, f"position_norm must be one of {POSITION_NORMS}, got {self.position_norm!r}")
        need(self.position_gamma >= 0, f"position_gamma must be >= 0, got {self.position_gamma}")
        need(self.tau_h > self.tau_l > self.tau_e >= 0,
             f"thresholds must satisfy tau_h > tau_l > tau_e >= 0, got tau_h={self.tau_h}, tau_l={self.tau_l}, tau_e={self.tau_e}")
        need(self.bit_interp in BIT_INTERPS, f"bit_interp must be one of {BIT_INTERPS}, got {self.bit_interp!r}")
        need(1 <= self.b_min <= self.b_max <= 8, f"bits must satisfy 1 <= b_min <= b_max <= 8, got b_min={self.b_min}, b_max={self.b_max}")
        need(self.quantizer in QUANTIZERS, f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        need(not (self.quantizer == "meanstd" and self.b_min < 2), "the meanstd quantiser needs b_min >= 2")
        need(self.s > 0, f"s must be > 0, got {self.s}")
        need(self.key_quant in KEY_QUANTS, f"key_quant must be one of {KEY_QUANTS}, got {self.key_quant!r}")
        need(self.key_group_size >= 8 and self.key_group_size % 8 == 0,
             f"key_group_size must be a positive multiple of 8, got {self.key_group_size}")
        need(self.value_group_size >= 8 and self.value_group_size % 8 == 0,
             f"value_group_size must be a positive multiple of 8, got {self.value_group_size}")
        need(0.0 <= self.p_max < 1.0, f"p_max must be in [0, 1), got {self.p_max}")
        need(0.0 <= self.spill <= 1.0, f"spill (rho) must be in [0, 1], got {self.spill}")
        need(0.0 <= self.sparse_threshold <= 1.0, f"sparse_threshold must be in [0, 1], got {self.sparse_threshold}")
        need(0.0 <= self.gamma <= 1.0, f"gamma must be in [0, 1], got {self.gamma}")
        need(self.lam > 0, f"lam (lambda) must be > 0, got {self.lam}")
        need(self.c_max is None or 0.0 < self.c_max <= 1.0, f"c_max must be in (0, 1] or None, got {self.c_max}")
        need(self.block_size >= 1 and self.block_size & (self.block_size - 1) == 0 and self.block_size <= 512,
             f"block_size (B) must be a power of two <= 512, got {self.block_size}")
        need(self.n_r >= 1, f"n_r (N_r) must be >= 1, got {self.n_r}")
        need(self.n_w >= self.n_r, f"n_w (N_w) must be >= n_r, got n_w={self.n_w}, n_r={self.n_r}")
        need(self.recent_window >= 0, f"recent_window must be >= 0, got {self.recent_window}")
        need(self.n_sink >= 0, f"n_sink must be >= 0, got {self.n_sink}")
        need(self.target_ratio is None or self.target_ratio >= 1.0, f"target_ratio must be >= 1 or None, got {self.target_ratio}")
        need(self.store_dtype in STORE_DTYPES, f"store_dtype must be one of {STORE_DTYPES}, got {self.store_dtype!r}")
        if self.layer_weights is not None:
            need(all(w > 0 for w in self.layer_weights), "layer_weights (w_l) must all be > 0")

    # --- presets ---------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "AGACCConfig":
        """A named preset with optional field overrides, e.g. ``preset("agacc", tau_h=3.0)``."""
        from agacc.presets import PRESETS  # the registry lives with the baselines

        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown AGACCConfig field(s): {sorted(unknown)}")
        return replace(PRESETS[name], **overrides, name=overrides.get("name", name))

    def with_overrides(self, **overrides) -> "AGACCConfig":
        unknown = set(overrides) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown AGACCConfig field(s): {sorted(unknown)}")
        return replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AGACCConfig":
        d = dict(d)
        if d.get("layer_weights") is not None:
            d["layer_weights"] = tuple(d["layer_weights"])
        return cls(**d)


def parse_override(item: str) -> tuple[str, object]:
    """``"tau_h=3"`` -> ``("tau_h", 3.0)`` typed after the field (CLI ``--set``)."""
    if "=" not in item:
        raise ValueError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    by_name = {f.name: f for f in fields(AGACCConfig)}
    if key not in by_name:
        raise ValueError(f"unknown config field {key!r}; fields: {sorted(by_name)}")
    default = getattr(AGACCConfig(), key)
    raw = raw.strip()
    if raw.lower() == "none" and (default is None or by_name[key].type.endswith("None")):
        return key, None
    if isinstance(default, bool):
        if raw.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{key} expects true/false, got {raw!r}")
        return key, raw.lower() in ("true", "1")
    if key == "tsp_layer":
        return key, int(raw)
    if key == "layer_weights":
        return key, tuple(float(x) for x in raw.split(","))
    if isinstance(default, int):
        return key, int(raw)
    if isinstance(default, float) or default is None:
        return key, float(raw)
    return key, raw
