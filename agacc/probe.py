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

``lookahead`` forecasts the coming queries instead (Lookahead Q-Cache, 2025): after the prompt the model
writes K greedy tokens through the compressed cache (its held plan: the prompt at >= b_min bits, nothing
evicted yet); what those pseudo queries pay each prompt token joins the prompt's evidence, the tokens are
cropped off and the plan re-made. The cache cannot run it itself (it does not hold the model): a model
switched by ``agacc.enable`` runs it before its first decode step after a prompt (``first_step``), so
``generate()`` and any loop of forwards get it; a caller that ends the prompt itself (``end_prefill()``:
the eval harness, the app) calls ``lookahead`` first. docs/tuning.md rounds 26-27 measure it.
Before the pseudo tokens, ``lookahead`` can read the prompt once more (``repeat_weight``, the agacc preset's
above 4x): KVzip's signal, the mean attention of a second reading, joined to the prompt's evidence instead of
replacing it (docs/tuning.md round 32). Its token ids come from the caller or from ``first_step``, which records
them as the prompt goes in.
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from agacc.cache import CompressedCache
from agacc.config import forecasts, repeat_weight

REPEAT = "\n\nRepeat the previous context exactly.\n\n"
REPEAT_CHUNK = 128  # prompt tokens a forward of the repeat (``lookahead``): 128 at full precision beside the
# held prompt stay under a 512-token prefill chunk's peak (docs/tuning.md round 32: 512 raised it 15% at 2K tokens)


class Probe:
    """Per layer, the most (``reduce="max"``) or the sum (``"sum"``) over the probe's forwards of the attention
    their queries paid each of the first ``n`` tokens (fp32 [n]); within a forward of several queries, the most
    any head of any query paid (``queries="max"``) or the mean over heads and queries (``"mean"``). ``n_obs``: the
    queries of each probe forward that count (its last ones: the repeated context)."""

    def __init__(self, n: int, n_obs: int, reduce: str = "max", queries: str = "max"):
        self.n, self.n_obs, self.reduce, self.queries = n, n_obs, reduce, queries
        self.scores: dict[int, torch.Tensor] = {}

    def observe(self, layer: int, token_mass: torch.Tensor) -> None:
        m = token_mass[: self.n].float()
        old = self.scores.get(layer)
        if old is not None:
            m = torch.maximum(old, m) if self.reduce == "max" else old + m
        self.scores[layer] = m


def _read_again(model, cache, probe: Probe, ids: torch.Tensor, prefix: list[int], chunk: int, stop=None) -> bool:
    """Forward ``prefix`` + each ``chunk`` of ``ids`` [Bt, m] through the cache after what it holds, each cropped
    off again, their queries' attention into ``probe`` (the prefix's not counted). False if ``stop()`` ended it."""
    device = next(model.parameters()).device
    for lo in range(0, ids.shape[1], chunk):
        if stop is not None and stop():
            return False
        part = ids[:, lo: lo + chunk].to(device)
        if prefix:
            part = torch.cat([torch.tensor([prefix], device=device).expand(part.shape[0], -1), part], 1)
        probe.n_obs = part.shape[1] - len(prefix)  # the repeated tokens' queries, not the instruction's
        with _probing(cache, probe):
            model(input_ids=part, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return True


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
    n = _check_one_prompt(cache, "reconstruct")
    if chunk < 1:
        raise ValueError(f"probe chunk must be >= 1 token, got {chunk}")
    if n != len(context_ids):
        raise ValueError(f"the cache holds {n} tokens, the context has {len(context_ids)}: probe the cache right after "
                         "its context's prefill, before anything else goes in")
    if not prompt_ids:
        raise ValueError("reconstruct() needs the repeat instruction's token ids (prompt_ids)")
    if not cache.cfg.compress:
        return []  # the lossless preset keeps everything: nothing to plan
    probe = Probe(n, n_obs=0)
    _read_again(model, cache, probe, torch.tensor([list(context_ids)]), list(prompt_ids), chunk)
    scores = [probe.scores[i] for i in sorted(probe.scores)]
    cache.rescore_prompt(scores)
    return scores


@contextlib.contextmanager
def _probing(cache, probe: Probe):
    """Tokens forwarded inside go in hot and unplanned (no re-evaluation), their attention into ``probe``
    instead of the trackers; on the way out they are cropped off, the cache holding what it held before."""
    n = cache.seq_len
    cache.probe = probe
    try:
        with cache.no_reevaluation():
            yield
    finally:
        cache.probe = None
        cache.crop(-(cache.seq_len - n))


def _check_one_prompt(cache, what: str) -> int:
    """The tokens a probed cache holds (> 0); raises unless it is one sequence's ``CompressedCache``."""
    if not isinstance(cache, CompressedCache):
        raise TypeError(f"{what}() probes a CompressedCache, got {type(cache).__name__}")
    if cache.rows is not None:
        raise ValueError(f"{what}() probes one sequence: a padded batch's rows each have a cache (cache.rows[i]); "
                         "probe one prompt at a time")
    if cache.seq_len == 0:
        raise ValueError(f"{what}() probes a prompt: the cache is empty, prefill it first")
    return cache.seq_len


def lookahead(model, cache, next_token, k: int | None = None, weight: float | None = None,
              stop=None, prompt_ids=None) -> list[torch.Tensor]:
    """Join what the model reads next to the prompt's evidence, then re-plan the prompt: the prompt read once
    more (``cfg.repeat_weight``), then the model's own next ``k`` tokens.

    ``cache``: a ``CompressedCache`` right after its prompt (before ``end_prefill()`` or the first decode
    step); ``next_token``: the first pseudo token (the token about to follow the prompt, or the argmax of
    its last logits), an int, or one per sequence of a batch the cache holds as one (a list or [Bt]);
    ``k``, ``weight``: the config's ``lookahead`` and ``lookahead_weight`` unless given; ``prompt_ids``: the
    latest prompt's token ids (a list, [m] or [Bt, m]) for the repeat, else those ``agacc.enable``'s hook
    recorded as the prompt went in (``CompressedCache.prompt_ids``).
    Repeat (``config.repeat_weight(cfg)`` = w_r > 0): the prompt's tokens go through the cache again,
    ``REPEAT_CHUNK`` a forward after what it holds (stored hot, no re-evaluation, cropped off); each layer sums
    over forwards the mean attention (over query heads and the forward's queries) they pay each held token, R; each token's
    importance becomes max(I_i / mean I, w_r R_i / mean R) x mean I and the plan is re-made. Lookahead: the k
    tokens go in one at a time, greedily, through the cache itself (its held evictions kept waiting); each
    layer sums the attention their queries pay the prompt's tokens (mean over query heads, as the tracker's
    decode evidence), A; they are cropped off, I_i becomes max(I_i / mean I, weight * A_i / mean A) x mean I
    and the plan is re-made. The cache ends holding the prompt alone; its peak counts a repeat forward's
    tokens or the k tokens at full precision. ``stop()``: checked before each forward; True ends it there,
    the plan left as the last finished part made it. Returns the per-layer scores [n] fp32 it last planned
    with ([] when nothing is re-planned: k = 0 and no repeat, lossless, stopped first)."""
    n = _check_one_prompt(cache, "lookahead")
    k = cache.cfg.lookahead if k is None else k
    weight = cache.cfg.lookahead_weight if weight is None else weight
    if k < 0 or not weight > 0:
        raise ValueError(f"lookahead needs k >= 0 pseudo tokens and a weight > 0, got k={k}, weight={weight}")
    cache.looked_ahead = True
    recorded, cache.prompt_ids = cache.prompt_ids, []
    if not cache.cfg.compress:
        return []
    scores: list[torch.Tensor] = []
    with torch.no_grad():  # (not inference mode: generate()'s cache is updated in place afterwards)
        w_r = repeat_weight(cache.cfg)
        if w_r > 0:
            ids = _prompt_ids(prompt_ids, recorded, n)
            if ids is None:
                warnings.warn(f"AGACC: repeat_weight={w_r} did not run: the prompt's token ids are unknown (it went in "
                              "as embeddings, or without agacc.enable); pass prompt_ids to agacc.probe.lookahead")
            else:
                probe = Probe(n, n_obs=0, reduce="sum", queries="mean")
                if not _read_again(model, cache, probe, ids, [], REPEAT_CHUNK, stop):
                    return scores
                scores = _join(cache, probe, w_r, n)
        if k > 0:
            probe = Probe(n, n_obs=1, reduce="sum")
            tok = torch.as_tensor(next_token, device=next(model.parameters()).device).reshape(-1, 1)
            with _probing(cache, probe):
                for _ in range(k):
                    if stop is not None and stop():
                        return scores
                    out = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
                    tok = out.logits[:, -1].argmax(-1, keepdim=True)
            scores = _join(cache, probe, weight, n)
    return scores


def _join(cache, probe: Probe, weight: float, n: int) -> list[torch.Tensor]:
    """Each layer's tracker evidence of the n tokens joined by the probe's (``joined``); the prompt re-planned."""
    layers = [l for l in cache.layers if l.store is not None]
    scores = [joined(l.tracker.raw()[:n].float(), probe.scores[i], weight)
              for i, l in zip(sorted(probe.scores), layers)]
    cache.rescore_prompt(scores)
    return scores


def _prompt_ids(given, recorded, n: int) -> torch.Tensor | None:
    """The latest prompt's ids [Bt, m <= n] (long): ``given``, else what the hook recorded (None: unknown)."""
    given = _recorded(recorded) if given is None else given
    if given is None:
        return None
    ids = torch.as_tensor(given, dtype=torch.long)
    ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
    if not 0 < ids.shape[1] <= n:
        raise ValueError(f"prompt_ids has {ids.shape[1]} tokens; the cache holds {n}: pass the latest prompt's ids")
    return ids


def joined(raw: torch.Tensor, look: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """The tracker's evidence raw [n] joined by the pseudo queries' attention look [n] (``lookahead``), in the
    tracker's units: per token max(raw / mean raw, weight * look / mean look) x mean raw, fp32 on raw's device."""
    mean = raw.mean().clamp_min(1e-12)
    look = look.to(raw.device)
    return torch.maximum(raw / mean, weight * look / look.mean().clamp_min(1e-12)) * mean


def first_step(model, args, kwargs) -> None:
    """A forward pre-hook (``agacc.enable`` installs it) for a ``CompressedCache`` whose config forecasts
    (``config.forecasts``: a ``lookahead``, a ``repeat_weight``). A prompt's forward: its token ids (and padding
    mask) are recorded on the cache (``prompt_ids``: references to the caller's tensors, no copy) for the repeat.
    The first one-token forward after a prompt: ``lookahead`` runs from that token (generated, sampled or
    teacher-forced: the first the cache is given), so ``generate()`` and any loop of forwards get it (a batch,
    beams included, from each sequence's token; a padded batch row by row, each row's cache on its own, its
    prompt without the padding). Changes no input: the probes' tokens are cropped off before the forward."""
    cache = kwargs.get("past_key_values")
    if not isinstance(cache, CompressedCache) or not forecasts(cache.cfg) or cache.probe is not None:
        return None
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None or ids.dim() != 2 or ids.shape[1] != 1 or (cache.rows is None and cache.seq_len == 0):
        if not cache.teacher_forced:  # a prompt's forward
            mask = kwargs.get("attention_mask")
            cache.prompt_ids.append(None if ids is None or ids.dim() != 2 else
                                    (ids, mask[:, -ids.shape[1]:] if mask is not None and mask.dim() == 2 else None))
        return None
    if cache.rows is None:  # one sequence, or a batch planned as one
        if not cache.looked_ahead and cache.seq_len > 0:
            lookahead(model, cache, ids[:, 0])
        return None
    due = [not row.looked_ahead and row.seq_len > 0 for row in cache.rows]
    if not any(due):  # every later decode step: the token ids are not read (no device sync)
        return None
    recorded, cache.prompt_ids = cache.prompt_ids, []
    for r, (row, tok, run) in enumerate(zip(cache.rows, ids[:, 0].tolist(), due)):  # a padded batch: row by row
        if run:
            lookahead(model, row, tok, prompt_ids=_recorded(recorded, r))
    return None


def _recorded(recorded, row: int | None = None) -> torch.Tensor | None:
    """The ids ``first_step`` recorded of a prompt's forwards ([(ids [Bt, q], mask [Bt, q] or None)]): all rows
    [Bt, m], or padded batch row ``row``'s [m] without its padding; None where unknown (nothing recorded, or a
    forward given as embeddings)."""
    if not recorded or any(x is None for x in recorded):
        return None
    if row is None:
        return torch.cat([i for i, _ in recorded], 1)
    return torch.cat([i[row] if m is None else i[row][m[row].bool()] for i, m in recorded])
