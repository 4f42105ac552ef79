"""AGACCConfig: every knob of the compressed cache in one validated dataclass.

Each field names the symbol it has in the seed documents (000 = AGACC, 001 = DynaCompress,
002 = the attention-sum variant). Importance scores are in units of the layer's mean: a block
whose normalised importance is 2.0 receives twice the attention of the average compressible
block, so the thresholds mean the same at any context length.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

from agacc import methods
from agacc.tiers import CONTAINER_TIER

PROMPT_EVIDENCE = ("max", "fold", "last")  # how a chunked prefill's windows combine (docs/long_context.md)
DECODE_EVIDENCE = ("ema", "max")               # how decode windows fold into I_i (docs/tuning.md round 16)
CONTEXT_PROBES = ("none", "reconstruct")       # how a context compressed before its question is scored (agacc.probe)
SCORINGS = ("ema", "decay", "sum")             # 000 §2.3 EMA / 001 decay-weighted / 002 attention sum
BIT_INTERPS = ("log", "linear")
POSITION_NORMS = ("none", "power", "log")      # forms of P(t - i), 000 §2.3
QUANTIZERS = ("minmax", "meanstd")
KEY_QUANTS = ("token", "channel", "basis", "auto")
BASIS_METAS = ("fp16", "8bit")
SINK_BITS = (16, 8, 4, 3)                      # the sink blocks: full, or a container's code width
LAYER_CALIBRATIONS = ("none", "auto")         # where layer_scale comes from (agacc.calibrate)
CALIBRATED = ("layer_scale", "evict_scale", "layer_floor")  # what layer_calibration="auto" resolves per model
STORE_DTYPES = ("model", "float16", "bfloat16")
# rule / budget names before every method had its own file (old traces and scripts still use them)
LEGACY_NAMES = {"rule": {"thresholds": "agacc", "topk": "snapkv", "recent": "streamingllm", "keep": "pyramidkv"},
                "budget_shape": {"pyramid": "pyramidkv", "dynamic": "dynamickv"}}


def cache_dir() -> Path:
    """Where agacc files what it computes once (converted models, layer calibrations):
    $AGACC_CACHE or ~/.cache/agacc."""
    return Path(os.environ.get("AGACC_CACHE", Path.home() / ".cache" / "agacc"))


@dataclass(frozen=True)
class Knob:
    """How the app shows a field: label, slider range (None for a checkbox or a choice), section
    ("thresholds", "bits" or "tracking"), help text."""
    label: str
    minimum: float | None
    maximum: float | None
    step: float | None
    section: str
    info: str = ""


def _f(default, group: str, replay: bool = False, ui: tuple | None = None, choices: tuple | None = None):
    """A config field with its metadata: ``group`` (docstring section), ``replay`` (a change can be
    replayed on a recorded importance history: the policy only), ``ui`` (a ``Knob``: the app shows it),
    ``choices`` (the values it may take)."""
    return dataclasses.field(default=default, metadata={"group": group, "replay": replay,
                                                        "ui": Knob(*ui) if ui else None, "choices": choices})


def fitted_ratio(cfg) -> float:
    """The target ratio the fitter holds the cache to, 0.0 without one (thresholds as set): what the rules by
    ratio read (``hot_width``, ``importance.half_life``, ``basis.default_key_quant``, ``calibrate``'s defaults)."""
    return cfg.target_ratio or 0.0


def hot_width(cfg) -> int:
    """The bits a hot token's elements hold between forwards: 16 where the config does not compress, else
    ``cfg.hot_bits``, or where None 8 from a fitted target ratio of 4 on and 16 below it and without one
    (docs/tuning.md round 29: 4x and 8x KL -11% and -12% on the tuning texts, 1.69x and 2.83x higher)."""
    if not cfg.compress:
        return 16
    if cfg.hot_bits is not None:
        return cfg.hot_bits
    return 8 if fitted_ratio(cfg) >= 4.0 else 16


def nested_widths(cfg) -> tuple[int, ...]:
    """The code widths whose values are quantised nested (``quant.quantize``'s "nested": the top b-1 bits of a
    code are the (b-1)-bit min-max code, so a move to one bit fewer loses nothing more; ``store.QuantSegment``):
    3 and 4 where b-1 is a width the config's blocks take (b_min on), if ``cfg.nested_values`` says so, or
    where None from a fitted target ratio above 4 (docs/tuning.md round 31)."""
    on = cfg.nested_values if cfg.nested_values is not None else fitted_ratio(cfg) > 4.0
    if not on or cfg.quantizer != "minmax":
        return ()
    return tuple(b for b in (3, 4) if b - 1 >= cfg.b_min)


def repeat_weight(cfg) -> float:
    """The weight the prompt read once more joins its evidence with (``agacc.probe.lookahead``): 0 where the
    config does not compress, else ``cfg.repeat_weight``, or where None 0.5 from a fitted target ratio above 4
    and 0 up to it (docs/tuning.md round 32)."""
    if not cfg.compress:
        return 0.0
    if cfg.repeat_weight is not None:
        return cfg.repeat_weight
    return 0.5 if fitted_ratio(cfg) > 4.0 else 0.0


def block_state_conflicts(cfg) -> list[str]:
    """What ``block_state`` needs and ``cfg`` lacks, each as the setting to make (empty: none): elsewhere a block's
    score reads its tokens' I_i one by one, not only their largest (and their sum, for the layer's mean)."""
    rules = [(cfg.scoring != "ema", "scoring='ema'"), (cfg.prompt_evidence != "max", "prompt_evidence='max'"),
             (cfg.decode_evidence != "max", "decode_evidence='max'"),
             (cfg.position_norm != "none", "position_norm='none'"), (cfg.value_weight != 0, "value_weight=0"),
             (cfg.markers, "markers=False"), (cfg.host_copy, "host_copy=False"), (cfg.n_w != cfg.n_r, "n_w == n_r"),
             (cfg.share_across_layers, "share_across_layers=False"), (cfg.pool_kernel > 1, "pool_kernel <= 1")]
    return [need for broken, need in rules if broken]


def block_state(cfg) -> bool:
    """Whether the trackers hold a tiered block's importance as its tokens' largest and summed I_i (8 bytes a block,
    ``ImportanceTracker.pack``) instead of one I_i a token (4 bytes): ``cfg.block_state``, or where None from a fitted
    target ratio above 4 where nothing in ``block_state_conflicts`` holds (docs/tuning.md round 34)."""
    if cfg.block_state is None:
        return cfg.compress and fitted_ratio(cfg) > 4.0 and not block_state_conflicts(cfg)
    return cfg.block_state


def forecasts(cfg) -> bool:
    """Whether the prompt's plan waits for ``agacc.probe.lookahead`` (pseudo tokens, the prompt repeated)."""
    return cfg.compress and (cfg.lookahead > 0 or repeat_weight(cfg) > 0)


@dataclass(frozen=True)
class AGACCConfig:
    """Configuration of the attention-guided adaptive KV cache.

    Tracking and importance (seed 000 §2.2-2.3, 001 §2.1):
        n_q: N_q, the observation window: how many of the last prompt queries give the initial S_i at prefill.
        alpha: alpha, EMA weight of the newest attention in I_i(t) = alpha*S_i + (1-alpha)*I_i(t-1).
        scoring: "ema" (000), "decay" (001: A_i = sum_t e^{-beta(T-t)} w_l sum_j alpha_ij / T) or
            "sum" (002: the accumulated attention sum).
        beta: beta > 0, per-step decay of the DynaCompress history.
        prompt_evidence: how the observation windows of a chunked prefill's chunks combine (EMA scoring;
            the first chunk, and a one-shot prefill, start from their window S_i in every rule):
            "max" I_i = max(S_i, (1-alpha) I_i): a token keeps what any chunk's last N_q queries paid it,
            earlier evidence fading by (1-alpha) a chunk, so the question at the end of a prompt still
            decides (docs/long_context.md: needle 8x 0.6 -> 1.0 vs "fold", perplexity equal);
            "fold" I_i = alpha*S_i + (1-alpha)*I_i (the decode-step EMA); "last" I_i = S_i (only the
            latest chunk's window, as a one-shot prefill sees it).
        decode_evidence: how a re-evaluation folds the decode steps' window S_i into I_i (EMA scoring):
            "ema" I_i = alpha*S_i + (1-alpha)*I_i (000 §2.3); "max" I_i = max(S_i, 2^(-k/h) I_i), k the
            window's decode steps, h = ``evidence_half_life``: a token keeps what the strongest recent
            window paid it, fading by half every h steps, instead of halving at every re-evaluation
            (docs/tuning.md round 16: 8x KL -17% on the tuning texts; an exact forecast of the future
            attention, the bound, is -28%).
        evidence_half_life: h, decode steps (> 0; ``inf``: a running maximum), with decode_evidence="max".
            None: 182 up to a fitted target ratio of 4 (and without one), 91 above (``importance.half_life``;
            docs/tuning.md round 28: at 8x the held-out KL -3%, lower or the same on every text).
        layer_weights: w_l, one weight per layer for the DynaCompress aggregation and layer budgets;
            None = linearly rising with depth (001: deeper layers keep more).
        share_across_layers: S_i averaged over all L layers as written in 000 §2.2 (one score per
            token for the whole model) instead of one score per layer.
        attention_sum_beta: beta of seed 002, C_j = alpha*sum_i A_ij + (1-alpha)*beta*sum_i A_ij; the
            attention-sum preset scores with this constant factor (a rescaled attention sum).
        position_norm: form of P(t-i) in I^_i = I_i / P(t-i): "none" (P=1), "power" ((1+d)^-gamma),
            "log" (1/log(e+d)).
        position_gamma: gamma of the power-law P.
        value_weight: v, value-aware importance: I^_i times (||v_i|| / mean ||v||)^v, ||v_i|| the norm
            of token i's value (mean over KV heads) relative to the layer's mean; a token's share of
            the attention output, and of its error, grows with its value's norm. 0: attention alone.
        context_probe: how a context compressed before its question is known is scored (query-agnostic):
            "none" (its chunks' observation windows, as any prompt) or "reconstruct" (``agacc.probe``:
            the most attention any query of a pass that repeats the context pays each token, KVzip's
            signal; one extra pass over the context). Run by ``agacc.probe.reconstruct`` and the eval's
            query-agnostic protocol; a prompt with its question inside (query-aware) is not probed.
        lookahead: K >= 0 pseudo queries: after the prompt the model writes K greedy tokens through the
            cache itself (its held plan, nothing re-evaluated), their mean attention (over query heads and
            the K queries) joins the prompt's evidence, the tokens are cropped off and the prompt's plan is
            re-made (Lookahead Q-Cache's forecast of the coming queries; docs/tuning.md rounds 26-27). It
            needs the model, which the cache does not hold: a model switched by ``agacc.enable`` runs it
            before its first decode step after a prompt (``generate()``, any loop), and a caller that calls
            ``end_prefill()`` itself runs ``agacc.probe.lookahead`` first (the eval harness, the app). 0: off.
        lookahead_weight: w > 0, how the pseudo queries' evidence joins the prompt's: per token
            max(I_i / mean I, w * A_i / mean A) x mean I, A the pseudo queries' attention.
        repeat_weight: w_r >= 0: before the pseudo queries, the prompt's own tokens go through the cache once
            more (its held plan; a chunk at a time after the prompt, no instruction, cropped off: nothing kept),
            and the mean attention their queries pay each token (over query heads and a chunk's queries, summed
            over chunks) joins the prompt's evidence as the lookahead's does: max(I_i / mean I, w_r R_i /
            mean R) x mean I, then the plan is re-made. Reading a text again reads what its later part will
            (the names code defines and reuses), which the last N_q queries and K pseudo tokens do not
            (docs/tuning.md round 32: held-out code at 8x KL -24%). It needs the prompt's token ids: a model
            switched by ``agacc.enable`` records them as they go in; a caller passes ``prompt_ids`` to
            ``agacc.probe.lookahead``. Costs one more pass over the prompt (the time of 1.9 prefills at 1,024
            tokens, 2.4 at 8,000: each of its forwards reads the whole compressed prompt), no bytes after it.
            0: off; None (the ``agacc`` preset): 0.5 above a fitted 4x, else 0 (``config.repeat_weight``).
        block_state: the tracker holds a tiered block's importance as its tokens' largest and summed I_i (fp32,
            8 bytes a block) instead of one fp32 I_i a token: its block score is the same (a decaying maximum's
            block maximum is the block's largest I_i folded so), the layer's mean that normalises the scores is
            approximate (a folded block's tokens are read back as its largest and the rest of its sum shared alike),
            and an evicted block stays so (forgetting it would hold 12 bytes). Needs what
            ``config.block_state_conflicts`` lists (EMA scoring, both evidences "max"; no position norm, value weight,
            markers, host copy, pooling or shared scores; n_w = n_r). None (the ``agacc`` preset): on above a fitted
            4x where those hold (``config.block_state``; docs/tuning.md round 34).
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
            Values are always per token. docs/tuning.md round 4 compares them at equal bytes. "basis": the
            2/3/4-bit blocks hold their keys as coefficients in the model's calibrated basis
            (``agacc.basis``: the query-weighed principal axes of the keys before RoPE, rebuilt and turned
            back at read), per coefficient over a block's B tokens; 8-bit blocks per channel. "auto" (the
            ``agacc`` preset): "basis" at a fitted target ratio above 4 where a key basis is filed for the
            model (shipped for the embedded model), else "channel" (``basis.default_key_quant``;
            docs/tuning.md round 25).
        basis_layout: with key_quant="basis", the coefficients 2-, 3- and 4-bit blocks keep at 8, 4, 3 and 2
            bits (four counts a container, for head dim 64; ``policy.basis_layouts`` scales them to others),
            the widest on the axes of most energy: 1.5, 3.125 and 4.41 bits a key element with the scales
            (docs/tuning.md round 22).
        basis_meta: the scale and zero of each coefficient per block in a basis: "fp16" (2 bits a kept
            coefficient per token over a 16-token block) or "8bit" (a log2 step code and an integer zero, half
            that; ``quant.quantize_coeffs``; the ``agacc`` preset's, docs/tuning.md round 30). Its steps are min-max
            whatever ``quantizer`` says (which then sets the values' and the per-channel keys').
        nested_values: a 4-bit (3-bit) block's values quantised so that each code's top bits are the 3-bit
            (2-bit) min-max code (``quant.quantize`` "nested": the step range/14 instead of range/15, the range
            widened by half a step at each end); a move to one bit fewer reads those codes (``quant.narrow_values``)
            and quantises them again exactly, instead of quantising the 4-bit reconstruction again (its error
            twice). None (the ``agacc`` preset): on at a fitted target ratio above 4 (``nested_widths``;
            docs/tuning.md round 31). Min-max only.
        key_group_size: channels per (scale, zero) group of the per-token key quantiser.
        value_group_size: channels per (scale, zero) group of the per-token value quantiser.
        rotate: store quantised keys and values Hadamard-rotated (``agacc.quant.rotate``): outlier
            channels spread over the vector, so min-max groups lose less (values above all); attention
            rotates the query and the quantised part of the output instead (exact up to rounding).
        p_max: p_max, maximum magnitude-pruning rate, p_i = p_max*(1 - min(1, I^/tau_l)).
        sparse_threshold: pruned blocks are stored sparse (bitmap + kept values) when p_i >= this,
            otherwise dense in the b_min container with the pruned elements zeroed.
        markers: evicted spans leave one marker entry (importance-weighted mean K/V + log(count)
            attention bias) per contiguous run; False drops them outright (the ``agacc`` preset:
            they did not earn their bytes, docs/tuning.md round 8).
        keep_all: at a target ratio up to this (and up to what 4-bit blocks reach, ``policy.keep_all_reach``:
            3.56x at head dim 64 with groups of 64), the thresholds rule keeps every token: each block at
            16 bits (above tau_h), 8, or 4 (below tau_e / 1000), none evicted or pruned, keys per token;
            b_min, b_max, tau_l, p_max and key_quant give way. Where 8-bit blocks reach the target
            (1.88x) that is uniform int8's format with a 16-bit top; above, an 8/4-bit split. 0: never. The
            ``agacc`` preset: 2.5 (docs/tuning.md round 19: below it the 3-4-bit tiers paid for 16-bit blocks
            with evictions, and lost to uniform int8 by 12-45x in KL at its 1.69x).
        layer_scale: one factor per layer multiplying its block scores before the thresholds (and the
            ratio fitter) see them: a layer that is more sensitive to the error of its cache gets
            more bits at the same threshold scale (KVTuner-style, measured once per model:
            ``agacc.calibrate.layer_scale``). None: every layer alike (or the calibration's).
        evict_scale: like ``layer_scale``, for the eviction decision alone: a block is evicted where
            its score times this layer's factor falls below tau_e (bits still follow ``layer_scale``).
            A layer's sensitivity to eviction differs from its sensitivity to quantisation
            (``agacc.calibrate``, docs/tuning.md round 10). None: evictions follow ``layer_scale``.
        layer_floor: one bit width per layer (0: none): a quantised block of that layer below it is held
            at it instead (4: every kept block of the layer at 4 bits or more); the ratio fitter evicts
            what the budget then needs. None: no floor (or the calibration's, with ``floor_trade``).
        floor_trade: with ``layer_calibration="auto"``, the ``layer_floor`` a cache without one takes: b_max
            bits in the layers whose measured 3-bit sensitivity is at least ``floor_trade`` times their
            eviction sensitivity, none elsewhere: the layers eviction hurts most keep their 3-bit
            blocks, the others hold 4 bits and evict what the budget needs (docs/tuning.md round 15).
            None: 0.25 at a fitted target ratio up to 4, no floor otherwise
            (``calibrate.default_floor_trade``); ``inf``: no floor.
        layer_calibration: "auto" (the agacc preset): a cache without ``layer_scale`` takes it from
            the model's measured sensitivity, if there is one (shipped for the embedded model, or
            saved by ``python -m agacc calibrate --save``), as (s_l / geometric mean)^layer_gamma;
            one without ``evict_scale`` from its measured eviction sensitivity the same way, gamma 1
            (``calibrate --evict 0.5 0.75 --save``); "none": no calibration.
        layer_gamma: the exponent of that map; None: 1 at target ratios up to 4, else 0.5 (and
            unfitted): the factors move evictions to the insensitive layers, which pays at 4x
            and costs at 8x unless damped (docs/tuning.md round 6).
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
            "pyramidkv" (falling linearly with depth, PyramidKV), "dynamickv" (proportional to how many
            blocks a layer needs to cover 90% of its importance, DynamicKV): "weights" or a method
            with a budget hook.
    Methods (one file each in agacc/methods):
        rule: the method whose tier rule maps scores to tiers ("agacc" = seed 000's thresholds,
            "dynacompress" = seed 001, plus the baselines').
        pool_kernel: max-pool token scores over this many neighbours before the block max (SnapKV); 0 = off.
        tsp_layer: from this layer on, every layer reuses this layer's scores and tiers (FastKV's
            token-selective propagation); None = off.
    Blocks and re-evaluation (000 §2.5-2.6):
        block_size: B, tokens per block; block importance = max over its tokens.
        n_r: N_r, re-evaluate tiers every N_r decode steps.
        n_w: N_w, S_i at a re-evaluation is the mean attention over the last N_w steps (>= n_r).
        host_copy: keep a full-precision host copy of every compressed block so blocks whose
            importance rose are re-promoted exactly (reported as host_bytes).
        hold_evictions: a block a prompt chunk's re-evaluation would evict is held at the lowest kept
            tier (b_min bits) until the prompt ends (the first decode step, or ``end_prefill()``),
            then evicted if the plan made with the whole prompt's evidence still says so: a chunked
            prefill's later chunks (the question at its end) still read, and can save, the blocks
            earlier chunks ranked low. Off: evictions happen chunk by chunk (fewer bytes at the peak).
        prefill_bits: with hold_evictions, quantised blocks are held at >= this many bits until the
            prompt ends, then cut to their planned bits: a chunked prefill's later chunks do not read
            (and build on) keys and values cut to fewer bits (KIVI's int2 lost +8-11% perplexity so,
            docs/results_chunked_vs_one.md). Costs prefill peak. None: held at their planned bits.
        recent_window: newest tokens always kept out of the tiers, in the hot region (with the block they finish).
        hot_bits: the hot region's width between forwards: 16 (the store dtype) or 8 (each forward's tokens,
            once attended and planned at full precision, held at 8 bits per token per group of
            ``value_group_size`` channels: 1 + 4/G bytes an element instead of 2; ``store.narrow_hot``);
            None: by the fitted target ratio (``hot_width``; the ``agacc`` preset's).
        n_sink: first tokens always kept (their blocks), at ``sink_bits``.
        sink_bits: the sink blocks' precision: 16 (full) or a container's code width (8, 4, 3).
    Defaults (= the ``agacc`` preset) were chosen on the embedded model (docs/tuning.md): position
    normalisation and pruning cost more perplexity than they save there, so both are off by default
    and one setting away (position_norm="power", p_max=0.5).
    Budget and storage:
        target_ratio: if set, thresholds are refitted at every re-evaluation so that the cache holds
            bytes_fp16 / target_ratio bytes (the ratio fitter); the tau_* keep their proportions.
        prefill_ratio: with target_ratio and hold_evictions, what a chunked prefill holds until the prompt
            ends is fitted to this gentler ratio (evictions held at b_min as always); the plan fitted to
            target_ratio with the whole prompt's evidence is applied at the first decode step. Trades the
            prefill's peak (about bytes_fp16 / prefill_ratio + one chunk) for fewer early, irreversible
            bit cuts. None: the held plan is the target's.
        store_dtype: dtype of full-precision entries: "model" (lossless) or a 16-bit type.
        compress: False = keep every entry at full precision (the lossless `full` preset).
    """

    # tracking / importance
    n_q: int = _f(32, "tracking")
    alpha: float = _f(0.5, "tracking", ui=("α: EMA weight of new attention", 0.01, 1.0, 0.01, "tracking"))
    scoring: str = _f("ema", "tracking", choices=SCORINGS)
    beta: float = _f(0.05, "tracking")
    prompt_evidence: str = _f("max", "tracking", choices=PROMPT_EVIDENCE)
    decode_evidence: str = _f("ema", "tracking", choices=DECODE_EVIDENCE)
    evidence_half_life: float | None = _f(None, "tracking")
    layer_weights: tuple[float, ...] | None = _f(None, "tracking")
    share_across_layers: bool = _f(False, "tracking")
    attention_sum_beta: float = _f(1.0, "tracking")
    position_norm: str = _f("none", "tracking", choices=POSITION_NORMS)
    position_gamma: float = _f(0.3, "tracking")
    value_weight: float = _f(0.0, "tracking")
    context_probe: str = _f("none", "tracking", choices=CONTEXT_PROBES)
    lookahead: int = _f(0, "tracking")
    lookahead_weight: float = _f(1.0, "tracking")
    repeat_weight: float | None = _f(0.0, "tracking")
    block_state: bool | None = _f(False, "tracking", choices=(False, True, None))
    # tiers
    tau_h: float = _f(200.0, "tiers", replay=True, ui=(
        "τ_h: full precision above", 0.05, 1000.0, 0.05, "thresholds",
        "normalised importance (1 = layer mean); a heavy tail: top blocks score in the hundreds"))
    tau_l: float = _f(0.6, "tiers", replay=True, ui=("τ_l: quantised above, pruned below", 0.01, 20.0, 0.01, "thresholds",
                                                    "must stay below τ_h"))
    tau_e: float = _f(0.3, "tiers", replay=True, ui=("τ_e: evicted below", 0.0, 10.0, 0.01, "thresholds",
                                                    "must stay below τ_l"))
    b_min: int = _f(3, "tiers", replay=True, ui=("b_min: fewest bits", 1, 8, 1, "bits"))
    b_max: int = _f(4, "tiers", replay=True, ui=("b_max: most bits", 1, 8, 1, "bits"))
    bit_interp: str = _f("log", "tiers", choices=BIT_INTERPS)
    fill_container: bool = _f(True, "tiers")
    quantizer: str = _f("minmax", "tiers", choices=QUANTIZERS)
    s: float = _f(3.0, "tiers")
    key_quant: str = _f("channel", "tiers", replay=True, choices=KEY_QUANTS)
    basis_layout: tuple[float, ...] = _f((0, 4, 8, 8, 2, 6, 16, 16, 3, 14, 24, 12), "tiers", replay=True)
    basis_meta: str = _f("fp16", "tiers", replay=True, choices=BASIS_METAS)
    nested_values: bool | None = _f(False, "tiers", choices=(False, True, None))
    key_group_size: int = _f(64, "tiers", replay=True)
    value_group_size: int = _f(64, "tiers", replay=True)
    rotate: bool = _f(True, "tiers", ui=("store quantised blocks Hadamard-rotated (less error; needs a re-run)",
                                         None, None, None, "bits"))
    p_max: float = _f(0.0, "tiers", replay=True, ui=("p_max: largest pruning rate", 0.0, 0.95, 0.05, "bits"))
    sparse_threshold: float = _f(0.25, "tiers", replay=True)
    markers: bool = _f(True, "tiers", replay=True)
    keep_all: float = _f(0.0, "tiers", replay=True)
    layer_scale: tuple[float, ...] | None = _f(None, "tiers", replay=True)
    evict_scale: tuple[float, ...] | None = _f(None, "tiers", replay=True)
    layer_floor: tuple[float, ...] | None = _f(None, "tiers", replay=True)
    floor_trade: float | None = _f(None, "tiers")
    layer_calibration: str = _f("none", "tiers", choices=LAYER_CALIBRATIONS)
    layer_gamma: float | None = _f(None, "tiers")
    spill: float = _f(0.2, "tiers", replay=True, ui=(
        "ρ: eviction guard after attended blocks", 0.0, 1.0, 0.05, "thresholds",
        "at the prefill, a block below τ_e stays (lowest tier) while ρ × the score of the block before it reaches τ_e"))
    # methods: rules, budgets, hooks (agacc/methods)
    rule: str = _f("agacc", "method", replay=True)
    gamma: float = _f(0.75, "method", replay=True)
    lam: float = _f(10.0, "method", replay=True)
    tau_prune: float = _f(0.1, "method", replay=True)
    c_max: float | None = _f(None, "method", replay=True)
    seed: int = _f(0, "method", replay=True)
    budget_shape: str = _f("weights", "method", replay=True)
    pool_kernel: int = _f(0, "method")
    tsp_layer: int | None = _f(None, "method")
    # blocks / re-evaluation
    block_size: int = _f(16, "blocks", ui=("B: block size (tokens)", None, None, None, "tracking"),
                         choices=(8, 16, 32, 64, 128))
    n_r: int = _f(8, "blocks", ui=("N_r: re-evaluate every N steps", 1, 64, 1, "tracking"))
    n_w: int = _f(16, "blocks")
    host_copy: bool = _f(False, "blocks", replay=True, ui=("keep a host copy (blocks can be re-promoted)",
                                                           None, None, None, "tracking"))
    hold_evictions: bool = _f(True, "blocks", replay=True)
    prefill_bits: int | None = _f(None, "blocks", replay=True)
    recent_window: int = _f(32, "blocks", ui=("recent window (tokens kept out of the tiers)", 0, 512, 16, "tracking"))
    hot_bits: int | None = _f(16, "blocks", choices=(16, 8, None))
    n_sink: int = _f(4, "blocks", replay=True)
    sink_bits: int = _f(16, "blocks", replay=True, choices=SINK_BITS)
    # budget / storage
    target_ratio: float | None = _f(None, "budget", replay=True, ui=(
        "target memory ratio (16-bit bytes / held bytes)", 1.0, 16.0, 0.25, "thresholds",
        "thresholds are scaled to hit this ratio at every re-evaluation"))
    prefill_ratio: float | None = _f(None, "budget", replay=True)
    store_dtype: str = _f("float16", "budget", choices=STORE_DTYPES)
    compress: bool = _f(True, "budget")
    name: str = _f("custom", "budget")

    def __post_init__(self):
        for key, old in LEGACY_NAMES.items():
            if getattr(self, key) in old:
                object.__setattr__(self, key, old[getattr(self, key)])
        self.validate()

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ValueError(f"AGACCConfig: {msg}")

        # every field with a closed set of values; block_size's choices are the app's options (any power
        # of two up to 512 runs, checked below)
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and f.name != "block_size":
                need(getattr(self, f.name) in choices, f"{f.name} must be one of {choices}, got {getattr(self, f.name)!r}")
        need(self.n_q >= 1, f"n_q (N_q) must be >= 1, got {self.n_q}")
        need(0.0 <= self.value_weight <= 4.0, f"value_weight must be in [0, 4], got {self.value_weight}")
        need(0 <= self.lookahead <= 256, f"lookahead must be in 0..256 pseudo tokens, got {self.lookahead}")
        need(self.lookahead_weight > 0, f"lookahead_weight must be > 0, got {self.lookahead_weight}")
        need(self.repeat_weight is None or self.repeat_weight >= 0,
             f"repeat_weight must be >= 0 (0: off) or None (by the fitted ratio), got {self.repeat_weight}")
        need(0.0 < self.alpha <= 1.0, f"alpha must be in (0, 1], got {self.alpha}")
        need(self.evidence_half_life is None or self.evidence_half_life > 0,
             f"evidence_half_life must be > 0 (decode steps) or None, got {self.evidence_half_life}")
        rules, shapes = methods.rule_names(), ("weights", *methods.budget_names())
        need(self.rule in rules, f"rule must be one of {rules}, got {self.rule!r}")
        need(self.budget_shape in shapes, f"budget_shape must be one of {shapes}, got {self.budget_shape!r}")
        need(self.pool_kernel >= 0, f"pool_kernel must be >= 0, got {self.pool_kernel}")
        need(self.tsp_layer is None or self.tsp_layer >= 0, f"tsp_layer must be >= 0 or None, got {self.tsp_layer}")
        need(self.beta > 0, f"beta must be > 0, got {self.beta}")
        need(self.attention_sum_beta > 0, f"attention_sum_beta must be > 0, got {self.attention_sum_beta}")
        need(self.position_gamma >= 0, f"position_gamma must be >= 0, got {self.position_gamma}")
        need(self.tau_h > self.tau_l > self.tau_e >= 0,
             f"thresholds must satisfy tau_h > tau_l > tau_e >= 0, got tau_h={self.tau_h}, tau_l={self.tau_l}, tau_e={self.tau_e}")
        need(1 <= self.b_min <= self.b_max <= 8, f"bits must satisfy 1 <= b_min <= b_max <= 8, got b_min={self.b_min}, b_max={self.b_max}")
        need(not (self.quantizer == "meanstd" and self.b_min < 2), "the meanstd quantiser needs b_min >= 2")
        need(not (self.nested_values and self.quantizer != "minmax"),
             f"nested_values needs quantizer='minmax', got {self.quantizer!r}")
        lacks = block_state_conflicts(self) if self.block_state else []
        need(not lacks, f"block_state needs {', '.join(lacks)} (a block's score would need its tokens' I_i)")
        need(self.s > 0, f"s must be > 0, got {self.s}")
        need(self.key_group_size >= 8 and self.key_group_size % 8 == 0,
             f"key_group_size must be a positive multiple of 8, got {self.key_group_size}")
        need(self.value_group_size >= 8 and self.value_group_size % 8 == 0,
             f"value_group_size must be a positive multiple of 8, got {self.value_group_size}")
        lay = self.basis_layout
        need(len(lay) == 12 and all(n >= 0 and n == int(n) for n in lay)
             and all(0 < sum(lay[i:i + 4]) <= 64 for i in (0, 4, 8)),
             "basis_layout must be 12 whole counts (coefficients at 8, 4, 3, 2 bits for 2-, 3-, 4-bit blocks, "
             f"head dim 64), 1 to 64 a container, got {lay}")
        need(self.keep_all >= 0, f"keep_all must be >= 0 (a target ratio; 0: never), got {self.keep_all}")
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
        need(self.prefill_ratio is None or self.prefill_ratio >= 1.0,
             f"prefill_ratio must be >= 1 or None, got {self.prefill_ratio}")
        need(self.prefill_bits is None or 1 <= self.prefill_bits <= 8,
             f"prefill_bits must be in 1..8 or None, got {self.prefill_bits}")
        if self.layer_weights is not None:
            need(all(w > 0 for w in self.layer_weights), "layer_weights (w_l) must all be > 0")
        for name in ("layer_scale", "evict_scale"):
            if getattr(self, name) is not None:
                need(all(w > 0 for w in getattr(self, name)), f"{name} must all be > 0")
        if self.layer_floor is not None:
            widths = (0, *sorted(CONTAINER_TIER))
            need(all(b in widths for b in self.layer_floor), f"layer_floor entries must be 0 (none) or a container width {widths[1:]}")
        need(self.floor_trade is None or self.floor_trade > 0, f"floor_trade must be > 0 or None, got {self.floor_trade}")
        need(self.layer_gamma is None or 0.0 <= self.layer_gamma <= 4.0,
             f"layer_gamma must be in [0, 4] or None, got {self.layer_gamma}")

    # --- presets ---------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "AGACCConfig":
        """A named preset (``agacc/methods``) with optional field overrides, e.g. ``preset("agacc", tau_h=3.0)``."""
        table = methods.preset_overrides()
        if name not in table:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(table)}")
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown AGACCConfig field(s): {sorted(unknown)}")
        return cls(**{**table[name][1], **overrides, "name": overrides.get("name", name)})

    @property
    def gentle_prefill(self) -> bool:
        """A chunked prefill holds a plan fitted to ``prefill_ratio``, gentler than ``target_ratio``."""
        return self.prefill_ratio is not None and self.target_ratio is not None and self.prefill_ratio < self.target_ratio

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
        for f in fields(cls):  # JSON gives lists where the fields hold tuples
            if str(f.type).startswith("tuple") and d.get(f.name) is not None:
                d[f.name] = tuple(d[f.name])
        return cls(**d)


def field_info(name: str) -> dict:
    """A field's metadata: group, replay, ui (a ``Knob`` or None), choices, plus ``type`` (its
    annotation) and ``default``."""
    f = _FIELDS.get(name)
    if f is None:
        raise ValueError(f"unknown config field {name!r}; fields: {sorted(_FIELDS)}")
    return {**f.metadata, "type": f.type, "default": f.default}


def replayable_fields() -> tuple[str, ...]:
    """Fields whose change a recorded importance history can replay (the policy only); any other
    change (alpha, block size, N_r, recent window, scoring ...) changes the importance itself or the
    block layout and needs a re-run."""
    return tuple(n for n, f in _FIELDS.items() if f.metadata["replay"])


def ui_fields() -> tuple[str, ...]:
    """Fields the app shows as knobs, in declaration order."""
    return tuple(n for n, f in _FIELDS.items() if f.metadata["ui"] is not None)


def parse_value(key: str, raw: str):
    """A field's value from text, typed after its annotation ("none" for optional fields)."""
    info = field_info(key)
    kind, optional = info["type"].replace(" | None", ""), info["type"].endswith("| None")
    raw = raw.strip()
    if optional and raw.lower() == "none":
        return None
    try:
        if kind == "bool":
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"expects true/false, got {raw!r}")
            return raw.lower() in ("true", "1")
        if kind.startswith("tuple"):
            return tuple(float(x) for x in raw.split(","))
        return {"int": int, "float": float, "str": str}[kind](raw)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from e


def parse_override(item: str) -> tuple[str, object]:
    """``"tau_h=3"`` -> ``("tau_h", 3.0)`` typed after the field (CLI ``--set``)."""
    if "=" not in item:
        raise ValueError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    return key.strip(), parse_value(key.strip(), raw)


_FIELDS = {f.name: f for f in fields(AGACCConfig)}
