"""Shared test fixtures: a tiny random Llama, tiny random models of any architecture, an independent byte count."""
from __future__ import annotations

import torch

# a short story with a question: every session / trace test's prompt
PROMPT = ("Mara kept the parcel behind the counter for three days. On the fourth day the lighthouse went dark, "
          "the harbour flooded and the fishermen gathered at the post office asking what Tobias had left for them. "
          "She cut the tarred string and unfolded the oilcloth: inside was a brass key, a chart of the reef and a "
          "letter addressed to nobody. The letter said that the lamp had never been electric, that a flame had "
          "burned there for a hundred and forty years, and that whoever held the key must climb the tower before "
          "the tide turned. What did Mara find in the parcel, and what did the letter ask?")


def tiny_model(layers: int = 2, seed: int = 0, vocab_size: int = 256):
    """A random-weight Llama (2 layers, 4 query / 2 KV heads, head dim 32), switched to agacc."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import agacc

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # peaked next-token distributions, so greedy choices are not float-noise ties
        model.lm_head.weight.mul_(40.0)
    return agacc.enable(model)


# the fields every tiny random model of the architecture matrix shares (2 layers, hidden 64, 4 / 2 heads)
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build(cls_name: str, fields: dict, seed: int = 0):
    """A tiny random model from its transformers config class (``cls_name``, ``fields``), eval mode,
    output layer scaled x20 so greedy choices are not float-noise ties."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**fields)).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    return model


def two_chunk_logits(model, ids, split: int = 30, n: int = 8):
    """(got, want): the last ``n`` logits of ``ids`` sent through the lossless preset in two forwards (a
    next turn, assisted decoding's check: the second reads the first through the mask) and through a
    plain cache in one."""
    import agacc
    from transformers import DynamicCache

    with torch.inference_mode():
        want = model(ids, past_key_values=DynamicCache(config=model.config)).logits[:, -n:]
        cache = agacc.CompressedCache(model.config, agacc.AGACCConfig.preset("full"))
        model(ids[:, :split], past_key_values=cache)
        return model(ids[:, split:], past_key_values=cache).logits[:, -n:], want


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


def tier_maps(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer holding a store, a copy of its blocks' (tier, bits) on the CPU: two caches' plans compared."""
    return [(l.store.block_tier.cpu().clone(), l.store.block_bits.cpu().clone()) for l in cache.layers
            if l.store is not None]


def every_part_store(key_quant: str = "channel", rotate: bool = True, *, group: int = 32, keep: int | None = None,
                     bt: int = 1, h: int = 2, d: int = 64, B: int = 16, dtype=torch.float16, tail: int = 20, seed: int = 0):
    """A layer store holding every kind of part: full, int8 (8 and 5 code bits), int4, int3, int2 (2 and
    1), pruned (``keep`` of ``d`` elements kept, default a quarter), evicted (a marker for two blocks)
    and ``tail`` hot tokens; keys with per-channel offsets. ``key_quant="basis"``: a random basis
    (``random_basis``), the 4/3/2-bit blocks' keys held in it."""
    from agacc.config import AGACCConfig
    from agacc.store import LayerStore
    from agacc.tiers import EVICTED, FULL, INT2, INT3, INT4, INT8, PRUNED

    cfg = AGACCConfig(block_size=B, recent_window=B, b_min=1, rotate=rotate, key_quant=key_quant,
                      key_group_size=group, value_group_size=group)
    gen = torch.Generator().manual_seed(seed)
    basis = random_basis(h, d, gen) if key_quant == "basis" else None
    store = LayerStore(cfg, torch.device("cpu"), dtype, key_basis=basis)
    tiers = [FULL, INT8, INT8, INT4, INT3, INT2, INT2, PRUNED, EVICTED, EVICTED]
    n = B * len(tiers) + tail
    k = torch.randn(bt, h, n, d, generator=gen) * 2 + torch.randn(d, generator=gen)
    store.append(k.to(dtype), torch.randn(bt, h, n, d, generator=gen).to(dtype))
    store.apply_tiers(torch.tensor(tiers), torch.tensor([16, 8, 5, 4, 3, 2, 1, 2, 0, 0]),
                      torch.full((len(tiers),), keep if keep is not None else d // 4),
                      torch.rand(store.seq_len, generator=gen) + 0.1)
    return store


def random_basis(h: int, d: int, gen: torch.Generator) -> tuple:
    """A layer's key basis as a store holds it (``agacc.basis.KeyBasis.layer``): w [H, D] fp32 in [0.5, 2],
    V [H, D, D] random orthonormal as int8 reflector codes and scales, inv_freq [D/2] fp32 (RoPE's 10000^(-2i/D))."""
    from agacc.basis import KeyBasis

    w = torch.rand(1, h, d, generator=gen) * 1.5 + 0.5
    V = torch.linalg.qr(torch.randn(1, h, d, d, generator=gen))[0]
    return KeyBasis(w, V, 10000.0 ** (-torch.arange(0, d, 2).float() / d), "random").layer(0, d)
