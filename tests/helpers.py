"""Shared test fixtures: a tiny random Llama and an independent byte count."""
from __future__ import annotations

import torch


def tiny_model(layers: int = 2, seed: int = 0):
    """A random-weight Llama (2 layers, 4 query / 2 KV heads, head dim 32), switched to agacc."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import agacc

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # peaked next-token distributions, so greedy choices are not float-noise ties
        model.lm_head.weight.mul_(40.0)
    return agacc.enable(model)


def walk_tensor_bytes(obj, seen=None) -> int:
    """Sum ``nbytes`` of every distinct tensor reachable from ``obj`` through attributes, dicts,
    lists and tuples: an independent count to check ``memory()`` against."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(walk_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(walk_tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("agacc"):
        return sum(walk_tensor_bytes(v, seen) for k, v in vars(obj).items() if k not in ("cache", "cfg", "host"))
    return 0
