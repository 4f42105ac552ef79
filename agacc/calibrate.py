"""How sensitive each layer of a model is to the error of its KV cache, measured once per model
(KVTuner-style) -> ``AGACCConfig.layer_scale`` (bits) and ``AGACCConfig.evict_scale`` (eviction).

    sens = layer_sensitivity(model, ids)          # [n_layers] KL per token (nats), one layer at 3 bits
    cfg = AGACCConfig.preset("agacc", target_ratio=4, layer_scale=layer_scale(sens))
    save_sensitivity(model.config, sens)          # what layer_calibration="auto" finds from now on
    ev = eviction_sensitivity(model, ids, 0.5)    # one layer losing half its blocks
    save_sensitivity(model.config, ev, "evict")

``resolve(cfg, model_config)``: the ``layer_scale``, ``evict_scale`` and ``layer_floor`` a cache uses:
the config's own, or with ``layer_calibration="auto"`` the model's measured sensitivities (files
``save_sensitivity`` wrote, else ``KNOWN`` / ``KNOWN_EVICT``, measured for the embedded model) ->
``layer_scale(sens, gamma)``, and b_max bits as the floor of the layers whose 3-bit sensitivity is at
least ``floor_trade`` times their eviction sensitivity; none known: every layer alike.

``layer_sensitivity``: one prefill of the first ``prefix`` tokens into the model's own cache; then,
for one layer at a time, that layer's cached keys and values are replaced by what the store would
hold at ``bits`` (the config's format: keys per channel over blocks, values per token over groups,
Hadamard-rotated when ``cfg.rotate``), the rest of ``ids`` is scored over that cache, and the KL
from the exact cache's next-token distributions is the layer's sensitivity. One forward per layer
over the scored tokens. On the embedded SmolLM2-135M the layers differ by 40x (docs/tuning.md).
``eviction_sensitivity`` does the same with a fraction of one layer's blocks hidden instead.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch

from agacc import quant
from agacc.config import cache_dir, fitted_ratio
from agacc.planner import sliding_windows, text_config
from agacc.policy import key_grouping

# Measured with ``python -m agacc calibrate --text /usr/share/common-licenses/GPL-3
# bench/texts/narrative_tuning.txt bench/texts/code_tuning.py.txt`` (three tuning texts, the first 1536
# tokens each, 1280 cached, 3 bits; docs/tuning.md round 6): KL per token per layer, nats.
KNOWN: dict[str, tuple[float, ...]] = {
    "llama/30/576/9/3/49152": (  # SmolLM2-135M(-Instruct), the embedded model
        3.06e-05, 3.62e-05, 6.14e-05, 5.37e-05, 4.44e-05, 8.16e-05, 3.97e-05, 0.00024, 0.00031, 6.67e-05,
        0.000336, 3.73e-05, 0.000449, 0.000525, 0.000562, 0.00039, 0.000304, 0.000625, 0.00127, 0.000519,
        0.0006, 0.000263, 0.00019, 0.000815, 0.000506, 0.000183, 0.000251, 0.000195, 0.000177, 7.32e-05),
}
# Measured with ``python -m agacc calibrate --evict 0.5 0.75`` on the same three texts (docs/tuning.md
# round 10): KL per token per layer when that layer loses half / three quarters of its cached blocks
# (the least attended), geometric mean of the two. It orders the layers differently: the middle
# layers that 3 bits hurt most lose little to eviction (13, 16, 25: 1-3e-5), layer 7 the most (4.5e-3).
KNOWN_EVICT: dict[str, tuple[float, ...]] = {
    "llama/30/576/9/3/49152": (
        0.000122, 0.000194, 0.000229, 9e-05, 0.000109, 0.000125, 0.000141, 0.00453, 0.00131, 9.64e-05,
        0.000149, 0.000105, 7.08e-05, 2.43e-05, 0.000776, 0.000497, 3.23e-05, 0.00267, 0.00207, 0.000407,
        0.00214, 0.000664, 0.000284, 0.00307, 0.000975, 1.14e-05, 0.000247, 4.03e-05, 0.000444, 9.5e-05),
}
KINDS = {"bits": KNOWN, "evict": KNOWN_EVICT}  # what a sensitivity measures -> the shipped tables


def _store_format(x: torch.Tensor, bits: int, cfg, keys: bool) -> torch.Tensor:
    """K or V [B, H, n, D] -> what the store gives back at ``bits`` (the first n // block_size blocks
    for keys; the rest exact)."""
    x32 = quant.rotate(x.float()) if cfg.rotate else x.float()
    if keys and key_grouping(cfg, x.shape[-1]) == "token":
        q = quant.dequantize_values(*quant.quantize_values(x32, bits, cfg.key_group_size, cfg.quantizer, cfg.s), bits)
    elif keys:
        n = x.shape[2] // cfg.block_size * cfg.block_size
        q = quant.dequantize_keys(*quant.quantize_keys(x32[:, :, :n], bits, cfg.block_size, cfg.quantizer, cfg.s),
                                  bits, cfg.block_size)
        q = torch.cat([q, x32[:, :, n:]], 2)
    else:
        q = quant.dequantize_values(*quant.quantize_values(x32, bits, cfg.value_group_size, cfg.quantizer, cfg.s), bits)
    return (quant.rotate(q) if cfg.rotate else q).to(x.dtype)


@torch.inference_mode()
def layer_sensitivity(model, ids: torch.Tensor, cfg=None, bits: int | None = None, prefix: int | None = None) -> list[float]:
    """ids [1, T] (T >= 2) -> per layer the KL(exact || that layer's cache at ``bits``) per scored
    token, nats: the first ``prefix`` tokens (default 5/6 of T) cached, the rest scored. ``cfg``:
    the store format (default the ``agacc`` preset); ``bits``: default ``cfg.b_min``."""
    from transformers import DynamicCache

    from agacc.config import AGACCConfig

    cfg = cfg or AGACCConfig.preset("agacc")
    bits = bits or cfg.b_min
    T = ids.shape[1]
    prefix = prefix or T * 5 // 6
    if not 0 < prefix < T:
        raise ValueError(f"need 0 < prefix < {T} tokens, got {prefix}")
    ids = ids.to(model.device)
    cache = DynamicCache(config=model.config)
    model(ids[:, :prefix], past_key_values=cache, use_cache=True)
    rest = ids[:, prefix:]

    def scored(c):
        return model(rest, past_key_values=c, use_cache=True).logits[0].float().log_softmax(-1)

    ref = scored(copy.deepcopy(cache))
    out = []
    for layer in range(len(cache.layers)):
        c = copy.deepcopy(cache)
        lay = c.layers[layer]
        lay.keys = _store_format(lay.keys, bits, cfg, keys=True)
        lay.values = _store_format(lay.values, bits, cfg, keys=False)
        lp = scored(c)
        out.append(float((ref.exp() * (ref - lp)).sum(-1).clamp_min(0).mean()))
    return out


_PROBE = "agacc-calibrate"  # the attention function eviction_sensitivity runs the model with
_probe: dict = {}          # what it does in the forward at hand: {"capture": {layer: mass}} or {"layer", "keep"}


def _probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA, plus what ``eviction_sensitivity`` asks of the forward at hand: the attention mass each
    key gets from the queries (summed over heads and queries), or one layer's keys hidden."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if kwargs.get("softcap") or kwargs.get("s_aux") is not None:
        raise ValueError(f"{type(module).__name__} softcaps its logits or adds attention sinks, which the SDPA path "
                         "eviction_sensitivity measures through does not: calibrate --evict cannot measure this model "
                         "(layer_scale alone, calibrate without --evict, still applies)")
    layer, (q, n) = module.layer_idx, (query.shape[-2], key.shape[-2])
    causal = torch.arange(n, device=query.device)[None, :] <= torch.arange(n - q, n, device=query.device)[:, None]
    if "capture" in _probe:
        g = query.shape[1] // key.shape[1]
        s = torch.matmul(query.float(), key.float().repeat_interleave(g, 1).transpose(-1, -2)) * scaling
        _probe["capture"][layer] = s.masked_fill(~causal, float("-inf")).softmax(-1).sum((0, 1, 2))
    elif _probe.get("layer") == layer:
        keep = torch.ones(n, dtype=torch.bool, device=query.device)
        keep[:_probe["keep"].numel()] = _probe["keep"]
        attention_mask = (causal & keep)[None, None]
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


@torch.inference_mode()
def eviction_sensitivity(model, ids: torch.Tensor, fraction: float = 0.5, block_size: int = 16, n_obs: int = 64,
                         recent: int = 64, prefix: int | None = None) -> list[float]:
    """ids [1, T] -> per layer the KL(exact || that layer without ``fraction`` of its cached blocks)
    per scored token, nats (docs/tuning.md round 10: it orders the layers differently from
    ``layer_sensitivity``'s bits). The first ``prefix`` tokens (default 5/6 of T) are cached; a
    block's importance is the attention the last ``n_obs`` cached positions pay its tokens (summed
    over heads and those queries, averaged over the block); the least attended blocks between the
    first one (the sinks) and the last ``recent`` tokens are hidden from that layer's attention,
    every other layer exact. One forward per layer over the scored tokens. The model runs SDPA with
    these two hooks meanwhile (its attention implementation is restored after)."""
    from transformers import AttentionInterface, DynamicCache
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    T = ids.shape[1]
    prefix = prefix or T * 5 // 6
    nb = prefix // block_size
    if not 0 < fraction < 1 or not n_obs < prefix < T or nb < 2 + -(-recent // block_size):
        raise ValueError(f"need 0 < fraction < 1 and {n_obs} < prefix < {T} with blocks to evict, got fraction "
                         f"{fraction}, prefix {prefix}")
    short = [w for w in sliding_windows(model.config) if w is not None and w < T]
    if short:
        raise ValueError(f"the model's sliding windows ({min(short)} tokens) are shorter than the {T} tokens "
                         "measured, which the masks eviction_sensitivity builds do not apply: measure fewer tokens "
                         f"(--tokens {min(short)})")
    AttentionInterface.register(_PROBE, _probe_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(_PROBE, sdpa_mask)
    before = model.config._attn_implementation
    model.set_attn_implementation(_PROBE)
    ids = ids.to(model.device)
    try:
        cache = DynamicCache(config=model.config)
        model(ids[:, :prefix - n_obs], past_key_values=cache, use_cache=True)
        _probe.update(capture={})
        model(ids[:, prefix - n_obs:prefix], past_key_values=cache, use_cache=True)
        mass = _probe.pop("capture")
        rest = ids[:, prefix:]

        def scored():
            return model(rest, past_key_values=copy.deepcopy(cache), use_cache=True).logits[0].float().log_softmax(-1)

        ref, out = scored(), []
        candidates = torch.arange(1, nb - -(-recent // block_size))
        k = round(fraction * candidates.numel())
        for layer in range(len(cache.layers)):
            m = mass[layer][:nb * block_size].reshape(nb, block_size).mean(1).cpu()
            keep = torch.ones(nb, dtype=torch.bool)
            keep[candidates[m[candidates].argsort()[:k]]] = False
            _probe.update(layer=layer, keep=keep.repeat_interleave(block_size).to(model.device))
            lp = scored()
            out.append(float((ref.exp() * (ref - lp)).sum(-1).clamp_min(0).mean()))
    finally:
        _probe.clear()
        model.set_attn_implementation(before)
    return out


def layer_scale(sensitivity: list[float], gamma: float = 1.0, floor: float = 1e-3) -> tuple[float, ...]:
    """Per-layer factors (s_l / geometric mean of s)^gamma, every s_l floored at ``floor`` x the
    largest (a layer measured at zero still gets a finite factor)."""
    top = max(sensitivity)
    if not top > 0:
        return tuple(1.0 for _ in sensitivity)
    s = [max(x, floor * top) for x in sensitivity]
    mean_log = sum(math.log(x) for x in s) / len(s)
    return tuple(math.exp(gamma * (math.log(x) - mean_log)) for x in s)


def model_key(model_config) -> str:
    """What a calibration is filed under: model type / layers / hidden size / query heads / KV heads /
    vocabulary (the shapes of one model family and size, e.g. ``llama/30/576/9/3/49152``)."""
    tc = text_config(model_config)
    heads = tc.num_attention_heads
    return "/".join(str(x) for x in (tc.model_type, tc.num_hidden_layers, tc.hidden_size, heads,
                                     getattr(tc, "num_key_value_heads", None) or heads, tc.vocab_size))


def _saved_path(model_config, kind: str = "bits") -> Path:
    name = model_key(model_config).replace("/", "_") + ("" if kind == "bits" else f".{kind}")
    return cache_dir() / "layer_sensitivity" / (name + ".json")


def save_sensitivity(model_config, sensitivity: list[float], kind: str = "bits") -> Path:
    """File a measured sensitivity (``kind``: "bits", ``layer_sensitivity``; "evict",
    ``eviction_sensitivity``) where ``layer_calibration="auto"`` looks first; -> its path."""
    path = _saved_path(model_config, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": model_key(model_config), "kind": kind, "sensitivity": list(sensitivity)}))
    return path


def known_sensitivity(model_config, kind: str = "bits") -> tuple[float, ...] | None:
    """The model's saved sensitivity of this kind, else the shipped one (``KINDS``), else None."""
    path = _saved_path(model_config, kind)
    if path.exists():
        return tuple(json.loads(path.read_text())["sensitivity"])
    return KINDS[kind].get(model_key(model_config))


def resolve(cfg, model_config):
    """``cfg`` with the ``layer_scale``, ``evict_scale`` and ``layer_floor`` its cache uses (see the module
    docstring): with ``layer_calibration="auto"`` each one the config leaves None is made from the
    model's measured sensitivities, bits as (s_l / geometric mean)^``default_gamma``, eviction with
    gamma 1 (docs/tuning.md round 10), the floor from both (``default_floor_trade``, round 15); none
    known: left None."""
    if cfg.layer_calibration != "auto":
        return cfg
    n_layers = text_config(model_config).num_hidden_layers
    trade = default_floor_trade(cfg) if cfg.layer_floor is None else None
    wanted = {"bits": cfg.layer_scale is None or trade is not None, "evict": cfg.evict_scale is None or trade is not None}
    tables = {kind: _sensitivity_of(model_config, kind, n_layers) for kind, want in wanted.items() if want}
    found = {}
    for field, kind, gamma in (("layer_scale", "bits", default_gamma(cfg)), ("evict_scale", "evict", 1.0)):
        if getattr(cfg, field) is None and tables.get(kind) is not None:
            found[field] = layer_scale(list(tables[kind]), gamma)
    if trade is not None and tables["bits"] is not None and tables["evict"] is not None:
        top = float(quant.container_bits(cfg.b_max))  # the widest code the preset uses, as stored
        found["layer_floor"] = tuple(top if b >= trade * e else 0.0 for b, e in zip(tables["bits"], tables["evict"]))
    return cfg.with_overrides(**found) if found else cfg


def _sensitivity_of(model_config, kind: str, n_layers: int) -> tuple[float, ...] | None:
    """``known_sensitivity``, refused when it was measured on another number of layers."""
    sens = known_sensitivity(model_config, kind)
    if sens is not None and len(sens) != n_layers:
        flag = "" if kind == "bits" else " --evict 0.5 0.75"
        raise ValueError(f"the saved layer sensitivity ({kind}) has {len(sens)} layers, the model {n_layers}: "
                         f"re-run python -m agacc calibrate{flag} --save")
    return sens


def default_floor_trade(cfg) -> float | None:
    """``cfg.floor_trade``, or when None 0.25 at a fitted target ratio up to 4 and no floor otherwise
    (docs/tuning.md round 15: at 4x the floor cut the held-out KL on every text, at 8x, where the
    evictions are the loss, it cost a little; the default's unfitted thresholds were not measured
    with it). ``inf``: no floor at any ratio."""
    if cfg.floor_trade is not None:
        return None if math.isinf(cfg.floor_trade) else cfg.floor_trade
    return 0.25 if 0.0 < fitted_ratio(cfg) <= 4.0 else None


def default_gamma(cfg) -> float:
    """``cfg.layer_gamma``, or when None 0.5 at target ratios above 4 and 1.0 otherwise (up to 4, and
    for thresholds as set: the preset's sit near 4x): measured on the tuning texts (docs/tuning.md
    rounds 6-7), gamma 1 gave the best 4x and the worst 8x."""
    if cfg.layer_gamma is not None:
        return cfg.layer_gamma
    return 0.5 if fitted_ratio(cfg) > 4.0 else 1.0
