"""How sensitive each layer of a model is to the error of its KV cache, measured once per model
(KVTuner-style) -> ``AGACCConfig.layer_scale``.

    sens = layer_sensitivity(model, ids)          # [n_layers] KL per token (nats)
    cfg = AGACCConfig.preset("agacc", target_ratio=4, layer_scale=layer_scale(sens))
    save_sensitivity(model.config, sens)          # what layer_calibration="auto" finds from now on

``resolve(cfg, model_config)``: the ``layer_scale`` a cache uses: the config's own, or with
``layer_calibration="auto"`` the model's measured sensitivity (a file ``save_sensitivity`` wrote, else
``KNOWN``, measured for the embedded model) -> ``layer_scale(sens, default_gamma(cfg))``; none known:
every layer alike.

``layer_sensitivity``: one prefill of the first ``prefix`` tokens into the model's own cache; then,
for one layer at a time, that layer's cached keys and values are replaced by what the store would
hold at ``bits`` (the config's format: keys per channel over blocks, values per token over groups,
Hadamard-rotated when ``cfg.rotate``), the rest of ``ids`` is scored over that cache, and the KL
from the exact cache's next-token distributions is the layer's sensitivity. One forward per layer
over the scored tokens. On the embedded SmolLM2-135M the layers differ by 40x (docs/tuning.md).
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch

from agacc import quant
from agacc.config import cache_dir

# Measured with ``python -m agacc calibrate --text /usr/share/common-licenses/GPL-3
# bench/texts/narrative_tuning.txt bench/texts/code_tuning.py.txt`` (three tuning texts, the first 1536
# tokens each, 1280 cached, 3 bits; docs/tuning.md round 6): KL per token per layer, nats.
KNOWN: dict[str, tuple[float, ...]] = {
    "llama/30/576/9/3/49152": (  # SmolLM2-135M(-Instruct), the embedded model
        3.06e-05, 3.62e-05, 6.14e-05, 5.37e-05, 4.44e-05, 8.16e-05, 3.97e-05, 0.00024, 0.00031, 6.67e-05,
        0.000336, 3.73e-05, 0.000449, 0.000525, 0.000562, 0.00039, 0.000304, 0.000625, 0.00127, 0.000519,
        0.0006, 0.000263, 0.00019, 0.000815, 0.000506, 0.000183, 0.000251, 0.000195, 0.000177, 7.32e-05),
}


def _store_format(x: torch.Tensor, bits: int, cfg, keys: bool) -> torch.Tensor:
    """K or V [B, H, n, D] -> what the store gives back at ``bits`` (the first n // block_size blocks
    for keys; the rest exact)."""
    x32 = quant.rotate(x.float()) if cfg.rotate else x.float()
    if keys and cfg.key_quant == "token":
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
    from agacc.planner import text_config

    tc = text_config(model_config)
    heads = tc.num_attention_heads
    return "/".join(str(x) for x in (tc.model_type, tc.num_hidden_layers, tc.hidden_size, heads,
                                     getattr(tc, "num_key_value_heads", None) or heads, tc.vocab_size))


def _saved_path(model_config) -> Path:
    return cache_dir() / "layer_sensitivity" / (model_key(model_config).replace("/", "_") + ".json")


def save_sensitivity(model_config, sensitivity: list[float]) -> Path:
    """File a measured sensitivity where ``layer_calibration="auto"`` looks first; -> its path."""
    path = _saved_path(model_config)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": model_key(model_config), "sensitivity": list(sensitivity)}))
    return path


def known_sensitivity(model_config) -> tuple[float, ...] | None:
    """The model's saved sensitivity, else the shipped one (``KNOWN``), else None."""
    path = _saved_path(model_config)
    if path.exists():
        return tuple(json.loads(path.read_text())["sensitivity"])
    return KNOWN.get(model_key(model_config))


def resolve(cfg, model_config):
    """``cfg`` with the ``layer_scale`` its cache uses (see the module docstring)."""
    if cfg.layer_scale is not None or cfg.layer_calibration != "auto":
        return cfg
    sens = known_sensitivity(model_config)
    if sens is None:
        return cfg
    from agacc.planner import text_config

    if len(sens) != text_config(model_config).num_hidden_layers:
        raise ValueError(f"the saved layer sensitivity has {len(sens)} layers, the model "
                         f"{text_config(model_config).num_hidden_layers}: re-run python -m agacc calibrate --save")
    return cfg.with_overrides(layer_scale=layer_scale(list(sens), default_gamma(cfg)))


def default_gamma(cfg) -> float:
    """``cfg.layer_gamma``, or when None 0.5 at target ratios above 4 and 1.0 otherwise (up to 4, and
    for thresholds as set: the preset's sit near 4x): measured on the tuning texts (docs/tuning.md
    rounds 6-7), gamma 1 gave the best 4x and the worst 8x."""
    if cfg.layer_gamma is not None:
        return cfg.layer_gamma
    return 0.5 if cfg.target_ratio is not None and cfg.target_ratio > 4.0 else 1.0
