"""Context probes: the importance of a context compressed before its question is known.

A prompt's importance comes from the attention its chunks' last N_q queries pay (the seed's
observation window): what the end of the context reads. A context kept for questions not yet asked
(query-agnostic: a document reused by a chat, kvpress's protocol) needs what *any* question could
read. KVzip (Kim et al., 2025) scores each cached entry by the most attention it receives while the
model repeats the context from its cache: a token the reconstruction needs is one some query will.

``reconstruct`` is that signal in one extra pass over the context: the context goes back in, a
chunk at a time, after a repeat instruction, through the compressed cache itself (no second cache,
no dequantised copy: ``chunk_attention`` over the packed store, O(chunk x block) temporaries); each
token keeps the most any head of any chunk query paid it; every chunk is cropped off again. The
scores replace the context's importance and its plan is re-made (``CompressedCache.rescore_prompt``)
before the held evictions are carried out. docs/baselines.md measures it (query-agnostic RULER).
"""
from __future__ import annotations

import torch

from agacc.cache import CompressedCache

REPEAT = "\n\nRepeat the previous context exactly.\n\n"


class Probe:
    """Per layer, the most attention any probe query paid each of the first ``n`` tokens (fp32 [n]).
    ``n_obs``: the queries of each probe chunk that count (its last ones: the repeated context)."""

    def __init__(self, n: int, n_obs: int):
        self.n, self.n_obs = n, n_obs
        self.scores: dict[int, torch.Tensor] = {}

    def observe(self, layer: int, token_mass: torch.Tensor) -> None:
        m = token_mass[: self.n].float()
        old = self.scores.get(layer)
        self.scores[layer] = m if old is None else torch.maximum(old, m)


@torch.inference_mode()
def reconstruct(model, cache, context_ids: list[int], prompt_ids: list[int], chunk: int = 512) -> list[torch.Tensor]:
    """Score the context a ``CompressedCache`` holds by reconstruction, then re-plan it.

    ``cache``: holds exactly ``context_ids`` (prefilled, its held evictions not yet applied: call this
    before ``end_prefill()`` or the first decode step); ``prompt_ids``: the repeat instruction (e.g.
    ``tokenizer(REPEAT, add_special_tokens=False).input_ids``); ``chunk``: context tokens per probe
    forward (>= 1). Each forward is ``prompt_ids`` + the next chunk of the context, at the positions
    after the context; its tokens are stored hot (no re-evaluation) and cropped off afterwards, so
    the cache ends holding the context alone, its peak bytes counting one probe chunk at full
    precision. Returns the per-layer scores [len(context_ids)] fp32 it planned with."""
    if not isinstance(cache, CompressedCache):
        raise TypeError(f"reconstruct() probes a CompressedCache, got {type(cache).__name__}")
    if cache.rows is not None:
        raise ValueError("reconstruct() probes one sequence: a padded batch's rows each have a cache (cache.rows[i]); "
                         "probe one context at a time")
    if chunk < 1:
        raise ValueError(f"probe chunk must be >= 1 token, got {chunk}")
    n = cache.seq_len
    if n != len(context_ids) or n == 0:
        raise ValueError(f"the cache holds {n} tokens, the context has {len(context_ids)}: probe the cache right after "
                         "its context's prefill, before anything else goes in")
    if not prompt_ids:
        raise ValueError("reconstruct() needs the repeat instruction's token ids (prompt_ids)")
    if not cache.cfg.compress:
        return []  # the lossless preset keeps everything: nothing to plan
    device = next(model.parameters()).device
    probe = Probe(n, n_obs=0)
    for lo in range(0, n, chunk):
        part = list(prompt_ids) + list(context_ids[lo: lo + chunk])
        probe.n_obs = len(part) - len(prompt_ids)  # the repeated tokens' queries, not the instruction's
        cache.probe = probe
        try:
            with cache.no_reevaluation():
                model(input_ids=torch.tensor([part], device=device), past_key_values=cache, use_cache=True,
                      logits_to_keep=1)
        finally:
            cache.probe = None
            cache.crop(-(cache.seq_len - n))
    scores = [probe.scores[i] for i in sorted(probe.scores)]
    cache.rescore_prompt(scores)
    return scores
