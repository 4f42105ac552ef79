"""Runner: every preset on the same samples, one prefill per sample shared by all presets.

Why one prefill is enough: a ``CompressedCache`` prefill is a normal causal forward (its output
does not depend on the preset); compression happens after it, from the K/V and the attention of the
last N_q prompt queries. So the runner does one forward per sample, keeps every layer's K/V and
last queries (``capture_prefill``), and builds each preset's cache from them exactly as the
cache's own prefill would (``cache_from_capture``: same ``update``, same ``observe_prefill``, same
re-evaluation). ``tests/test_eval.py`` checks this against a real prefill.

After the prefill:
* ``answer`` samples: ``match`` scoring teacher-forces the reference answer in one chunk and checks
  that the argmax at every position is the next answer token, i.e. that greedy decoding would
  produce the answer as its first tokens (exactly; no re-evaluation falls inside an answer shorter
  than N_r); ``generate`` scoring decodes greedily token by token and applies the task's metric.
* ``lm`` samples: the continuation is teacher-forced through the cache in chunks; the cache's
  re-evaluation schedule is kept in decode steps (a chunk of c tokens counts as c steps; a
  re-evaluation runs when a multiple of N_r is crossed), so with chunk | N_r the tiers change at the
  same steps as in token-by-token decoding (``chunk=1`` is token-by-token). The full-cache
  reference logits come from the same forward as the capture.

Memory is ``cache.memory()`` at the end of each sample (bytes held vs a 16-bit cache of the same tokens).

Protocols (``evaluate_sample(protocol=...)``, ``run(protocol=...)``): "query-aware" is the above (the
question is part of the prompt the cache compresses); "query-agnostic" (``evaluate_group``) compresses
the context alone, then appends the question uncompressed (``ask``) and scores the answer; samples
sharing a context (``Sample.group``) answer from one compressed context, each on its own copy
(``fork_cache``). External methods (``agacc.eval.external``: transformers' QuantizedCache;
``agacc.eval.kvpress_adapter``: kvpress in its own environment) run beside the presets; one that
cannot run here yields "skipped" rows.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch

from agacc.attention import observe_prefill
from agacc.cache import CompressedCache
from agacc.planner import text_config
from agacc.probe import REPEAT, lookahead, reconstruct
from agacc.config import AGACCConfig, forecasts
from agacc.eval import ruler
from agacc.eval.metrics import lm_stats, perplexity, wilson_interval
from agacc.eval.scoring import text_score
from agacc.eval.tasks import Sample

CAPTURE = "agacc_capture"
TIMING_KEYS = ("tokens_per_s", "seconds", "build_s", "decode_s", "prefill_s", "prefill_tokens_per_s")


@dataclass
class Capture:
    ids: list                   # the n prompt token ids (a config's repeat reads them again: agacc.probe)
    keys: list                  # per layer [Bt, H, n, D] (after RoPE)
    values: list
    queries: list               # per layer [Bt, Hq, m, D]: the last m prompt queries
    scaling: list
    logits: torch.Tensor        # [T+1, V]: prediction after the prompt and after each extra token
    seconds: float

    @property
    def n(self) -> int:
        """Prompt tokens."""
        return len(self.ids)


_STATE: dict = {}


def _capture_fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n, m = _STATE["n"], _STATE["m"]
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    _STATE["layers"][module.layer_idx] = (key[:, :, :n].clone(), value[:, :, :n].clone(),
                                          query[:, :, max(0, n - m):n].clone(), scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _register_capture():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(CAPTURE, _capture_fn)
    ALL_MASK_ATTENTION_FUNCTIONS.register(CAPTURE, sdpa_mask)


@torch.inference_mode()
def capture_prefill(model, prompt_ids: list[int], extra_ids: list[int] | None = None, n_obs: int = 64) -> Capture:
    """One causal forward over ``prompt_ids + extra_ids`` with a plain (SDPA) attention; keeps each
    layer's K/V of the prompt and its last ``n_obs`` queries, and the logits from the last prompt
    position on (the full-cache reference for teacher-forced ``extra_ids``)."""
    _register_capture()
    extra = list(extra_ids or [])
    ids = torch.tensor([list(prompt_ids) + extra], device=model.device)
    n = len(prompt_ids)
    _STATE.update(n=n, m=n_obs, layers={})
    old = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE)
    t0 = time.perf_counter()
    try:
        out = model(input_ids=ids, use_cache=False, logits_to_keep=len(extra) + 1)
    finally:
        model.set_attn_implementation(old)
    secs = time.perf_counter() - t0
    layers = _STATE.pop("layers")
    _STATE.clear()
    n_layers = text_config(model.config).num_hidden_layers
    missing = [i for i in range(n_layers) if i not in layers]
    if missing:
        raise RuntimeError(f"capture saw no attention call for layers {missing[:5]}")
    ks, vs, qs, sc = zip(*(layers[i] for i in range(n_layers)))
    return Capture(list(prompt_ids), list(ks), list(vs), list(qs), list(sc), out.logits[0].float(), secs)


@torch.inference_mode()
def cache_from_capture(model, cap: Capture, cfg: AGACCConfig, before_end=None) -> CompressedCache:
    """The cache a real prefill of the captured prompt would leave, built without a forward.
    ``before_end(cache, logits)``: runs after the prompt (``logits``: its last position's [V]), before its held
    evictions happen (a context probe); then the config's ``lookahead`` (``_end_prompt``)."""
    cache = CompressedCache(model.config, cfg)
    for i, layer in enumerate(cache.layers):
        k, v, q_last = cap.keys[i], cap.values[i], cap.queries[i]
        layer.update(k.clone(), v.clone())
        if cfg.n_q > q_last.shape[2] and q_last.shape[2] < cap.n:
            raise ValueError(f"n_q={cfg.n_q} exceeds the {q_last.shape[2]} captured queries; capture with n_obs >= n_q")
        layer.tracker.init_prefill(observe_prefill(q_last, k, cap.scaling[i], cfg.n_q))  # the last queries
    cache._step_done(cap.n)  # the end-of-prefill re-evaluation, as after a real prefill
    _end_prompt(model, cache, cap.logits[0], before_end, cap.ids)
    return cache


def _end_prompt(model, cache: CompressedCache, logits: torch.Tensor, before_end=None, prompt_ids=None) -> None:
    """After a prompt (``prompt_ids``): ``before_end(cache, logits)`` (a context probe), the config's forecasts
    (``agacc.probe.lookahead``: the prompt read again, greedy pseudo tokens from ``logits``, the last prompt
    position's [V]), then the held evictions happen (as at a first decode step) and teacher-forced chunks from
    here on count as decode steps."""
    if before_end is not None:
        before_end(cache, logits)
    if forecasts(cache.cfg):  # the prompt re-planned by what the model reads next (agacc.probe)
        lookahead(model, cache, int(logits.argmax()), prompt_ids=prompt_ids)
    cache.end_prefill()
    cache.teacher_forcing()


@torch.inference_mode()
def teacher_force(model, cache, ids: list[int], chunk: int = 8) -> torch.Tensor:
    """Feed ``ids`` through the cache in chunks; -> logits [len(ids), V] (fp32)."""
    out = []
    for lo in range(0, len(ids), max(1, chunk)):
        x = torch.tensor([ids[lo: lo + chunk]], device=model.device)
        out.append(model(input_ids=x, past_key_values=cache, use_cache=True).logits[0].float())
    return torch.cat(out) if out else torch.empty(0)


@torch.inference_mode()
def greedy(model, cache, first_logits: torch.Tensor, max_new_tokens: int, eos=(), stop=None) -> list[int]:
    """Greedy decoding token by token from the logits after the prompt; ``stop(tokens)`` may end early."""
    toks = [int(first_logits.argmax())]
    while len(toks) < max_new_tokens and toks[-1] not in eos and not (stop and stop(toks)):
        x = torch.tensor([[toks[-1]]], device=model.device)
        toks.append(int(model(input_ids=x, past_key_values=cache, use_cache=True).logits[0, -1].argmax()))
    return toks


def preset_configs(presets: list[str], ratio: float | None, sets: dict | None = None) -> list[tuple[str, AGACCConfig]]:
    """(name, config) per preset; ``ratio`` becomes ``target_ratio`` of every compressed preset whose
    ratio can move (not ``full``, not the fixed-bit uniform presets)."""
    from agacc.presets import FIXED_RATIO, UNAVAILABLE

    out = []
    for p in presets:
        if p in UNAVAILABLE:
            raise ValueError(f"preset {p!r} is not available: {UNAVAILABLE[p]}")
        cfg = AGACCConfig.preset(p, **(sets or {}))
        if ratio is not None and p not in FIXED_RATIO and cfg.compress:
            cfg = cfg.with_overrides(target_ratio=float(ratio))
        out.append((p, cfg))
    return out


@torch.inference_mode()
def chunked_prefill(model, cfg: AGACCConfig, prompt_ids: list[int], prefill_chunk: int, before_end=None):
    """A real prefill of ``prompt_ids`` through a new cache, ``prefill_chunk`` tokens a forward (as
    ``generate(prefill_chunk_size=...)``: the cache compresses after every chunk) -> (cache, logits of
    the last prompt position [V] fp32); afterwards teacher-forced chunks count as decode steps.
    ``before_end(cache, logits)``: as in ``cache_from_capture``."""
    if prefill_chunk < 1:
        raise ValueError(f"prefill chunk must be >= 1 token, got {prefill_chunk}")
    cache = CompressedCache(model.config, cfg)
    for lo in range(0, len(prompt_ids), prefill_chunk):
        x = torch.tensor([prompt_ids[lo: lo + prefill_chunk]], device=model.device)
        out = model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1)
    logits = out.logits[0, -1].float()
    _end_prompt(model, cache, logits, before_end, prompt_ids)
    return cache, logits


PROTOCOLS = ("query-aware", "query-agnostic")


def is_external(cfg) -> bool:
    """A method outside the ``CompressedCache`` presets (``agacc.eval.external``: hf-quantized, kvpress,
    kv-distill)."""
    return not isinstance(cfg, AGACCConfig)


def _n_obs(configs) -> int:
    return max([cfg.n_q for _, cfg in configs if not is_external(cfg)] or [1])


def _memory(cfg, cache) -> dict:
    return cfg.memory(cache) if is_external(cfg) else cache.memory()


@torch.inference_mode()
def plain_prefill(model, cache, ids: list[int], prefill_chunk: int | None = None) -> torch.Tensor:
    """``ids`` through any cache (a transformers ``Cache``), ``prefill_chunk`` tokens a forward (all at
    once when None) -> the logits of the last position [V] (fp32)."""
    step = prefill_chunk or max(1, len(ids))
    for lo in range(0, len(ids), step):
        x = torch.tensor([ids[lo: lo + step]], device=model.device)
        out = model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1].float()


@torch.inference_mode()
def ask(model, cache, question_ids: list[int], prefill_chunk: int | None = None) -> torch.Tensor:
    """The query-agnostic protocol's second step: ``question_ids`` go into a cache that already holds the
    compressed context, appended as they are (the hot region, full precision), with no re-evaluation:
    the plan stays the one made from the context alone. -> the logits after the last question token [V].
    Decoding afterwards follows the cache's own schedule (a re-evaluation every N_r steps)."""
    if not isinstance(cache, CompressedCache):
        return plain_prefill(model, cache, question_ids, prefill_chunk)
    cache.end_prefill()  # the context's held plan (a chunked prefill) is applied before the question
    with cache.no_reevaluation():  # stored hot and observed, the tiers as the context alone planned them
        return plain_prefill(model, cache, question_ids, prefill_chunk)


def fork_cache(cache):
    """An independent copy of a cache (``copy.deepcopy``): a question asked on the copy leaves the
    original as it was (the copy keeps its decode schedule, ``teacher_forcing``). A transformers
    ``QuantizedCache``'s quantised tensors (quanto's subclasses cannot be deep-copied) are shared: its
    ``update`` replaces them, never writes into them."""
    memo = {}
    for layer in getattr(cache, "layers", []):  # QuantizedCache: its quantised tensors are replaced, never
        for attr in ("_quantized_keys", "_quantized_values"):  # written in place: the copy may share them
            q = getattr(layer, attr, None)
            if q is not None:
                memo[id(q)] = q
    with torch.inference_mode():
        return copy.deepcopy(cache, memo)


def _build(model, cfg, cap: Capture | None, ids: list[int], prefill_chunk: int | None, before_end=None):
    """A fresh cache of method ``cfg`` holding ``ids`` (prefilled, compressed, held evictions applied;
    ``before_end(cache, logits)`` and the config's ``lookahead`` before they are) -> (cache, logits after the
    last id)."""
    if hasattr(cfg, "build"):  # a method that prefills its own way (kv-distill)
        return cfg.build(model, ids, prefill_chunk)
    if is_external(cfg):
        cache = cfg.new_cache(model)
        return cache, plain_prefill(model, cache, ids, prefill_chunk if prefill_chunk and len(ids) > prefill_chunk else None)
    if prefill_chunk and len(ids) > prefill_chunk:
        return chunked_prefill(model, cfg, ids, prefill_chunk, before_end)
    return cache_from_capture(model, cap, cfg, before_end), cap.logits[0]


def _score(model, tok, s: Sample, cache, first: torch.Tensor, scoring: str, chunk: int, r: dict) -> int:
    """Score answer sample ``s`` from the cache after its prompt (``first``: the logits there) into ``r``;
    -> the tokens processed after the prompt."""
    if scoring == "match":
        ans = s.answer_ids
        logits = torch.cat([first[None], teacher_force(model, cache, ans[:-1], chunk=max(1, len(ans)))])
        pred = logits.argmax(-1).tolist()
        ok = pred == list(ans)
        # what greedy decoding yields up to its first deviation from the answer
        first_bad = next((i for i, (a, b) in enumerate(zip(pred, ans)) if a != b), len(ans))
        r["prediction"] = tok.decode(pred[: first_bad + 1])
        r["score"] = 1.0 if ok else 0.0
        return len(ans) - 1
    eos = {t for t in (getattr(tok, "eos_token_id", None),) if t is not None}
    stop = None
    if s.metric == "contains":
        stop = lambda t: any(a in tok.decode(t) for a in s.answers)
    elif s.metric in ruler.METRICS:  # every answer found: nothing more to decode
        stop = lambda t: ruler.score(s, tok.decode(t)) >= 1.0
    toks = greedy(model, cache, first, s.max_new_tokens, eos, stop)
    r["prediction"], r["score"] = text_score(s, tok.decode(toks, skip_special_tokens=True))
    return len(toks) - 1


def _failed(cfg, e: Exception) -> str:
    """An external method that raised on this sample: said in its row, not a failed run."""
    return f"skipped: {cfg.name} raised {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _skipped(s: Sample, name: str, reason: str, protocol: str | None = None) -> dict:
    r = {"index": s.index, "preset": name, **s.meta, "skipped": reason}
    if protocol is not None:
        r["protocol"] = protocol
    return r


def evaluate_sample(model, tok, s: Sample, configs, scoring: str = "match", chunk: int = 8, log=None,
                    prefill_chunk: int | None = None, protocol: str = "query-aware") -> list[dict]:
    """One sample, every preset -> one result dict per preset (deterministic fields + timings).
    ``log(result)`` is called after each preset. ``prefill_chunk``: a prompt longer than this goes
    into each preset's cache through a chunked prefill that compresses as it goes (what a user's
    ``generate(prefill_chunk_size=...)`` does); otherwise (None, or a shorter prompt) the cache is
    built from one full-precision prefill shared by the presets, compressed once at its end. The
    full-cache reference (ppl, KL) always comes from the one-shot prefill.
    ``protocol``: "query-aware" (the whole prompt, question included, is prefilled and compressed) or
    "query-agnostic" (``evaluate_group``: the context is compressed first, the question follows)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "query-agnostic":
        return evaluate_group(model, tok, [s], configs, scoring=scoring, chunk=chunk, log=log, prefill_chunk=prefill_chunk)
    configs, remote = _local_and_worker(configs)
    if remote:
        from agacc.eval.kvpress_adapter import run_worker

        local = evaluate_sample(model, tok, s, configs, scoring, chunk, log, prefill_chunk) if configs else []
        return local + run_worker(model, tok, [s], remote, protocol, scoring)
    extra = s.target_ids if s.kind == "lm" else (s.answer_ids[:-1] if scoring == "match" else [])
    cap = capture_prefill(model, s.prompt_ids, extra, n_obs=_n_obs(configs))
    results = []
    for name, cfg in configs:
        why = cfg.unavailable(model) if is_external(cfg) else None
        if why:
            results.append(_skipped(s, name, why))
            continue
        t0 = time.perf_counter()
        r = {"index": s.index, "preset": name, **s.meta}
        try:
            cache, first = _build(model, cfg, cap, s.prompt_ids, prefill_chunk)
            t1 = time.perf_counter()
            if s.kind == "lm":
                logits = torch.cat([first[None], teacher_force(model, cache, s.target_ids[:-1], chunk)])
                st = lm_stats(logits, cap.logits[: len(s.target_ids)], torch.tensor(s.target_ids))
                r.update(st)
                r["score"] = min(1.0, math.exp((st["nll_full"] - st["nll"]) / st["tokens"]))
                processed = len(s.target_ids) - 1
            else:
                processed = _score(model, tok, s, cache, first, scoring, chunk, r)
        except Exception as e:
            if not is_external(cfg):
                raise
            results.append(_skipped(s, name, _failed(cfg, e)))
            continue
        t2 = time.perf_counter()
        mem = _memory(cfg, cache)
        r.update(kv_bytes=int(mem["bytes"]), kv_bytes_fp16=int(mem["bytes_fp16"]),
                 ratio=mem["bytes_fp16"] / mem["bytes"] if mem["bytes"] else 1.0,
                 host_bytes=int(mem["host_bytes"]), decoded_tokens=processed,
                 build_s=t1 - t0, decode_s=t2 - t1, prefill_s=cap.seconds, prompt_tokens=cap.n)
        results.append(r)
        if log is not None:
            log(r)
        del cache
    return results


def evaluate_group(model, tok, group: list[Sample], configs, scoring: str = "match", chunk: int = 8, log=None,
                   prefill_chunk: int | None = None) -> list[dict]:
    """The query-agnostic protocol: samples sharing one context (``context_ids``; one sample, or the
    questions of ``tasks.needle_reuse``). Per method, the context is prefilled and compressed once
    (``end_prefill``: a chunked prefill's held plan is applied); each question is then asked on its own
    copy of that cache (``fork_cache``; the last question on the cache itself), appended uncompressed
    (``ask``), and its answer scored. Results as ``evaluate_sample``'s, with ``protocol``,
    ``question_tokens`` and ``reuse`` (questions answered from this one compressed context); ``kv_bytes``
    / ``kv_bytes_fp16`` / ``ratio`` are those of the compressed context (what is kept for the questions),
    ``kv_bytes_end`` / ``kv_bytes_fp16_end`` those held after the question and the answer."""
    if not group:
        return []
    for s in group:
        if s.kind != "answer" or not s.has_split:
            raise ValueError(f"the query-agnostic protocol needs answer samples with a context / question split; "
                             f"sample {s.index} has none (ppl has no question; use --protocol query-aware)")
        if s.context_ids != group[0].context_ids:
            raise ValueError(f"samples {group[0].index} and {s.index} do not share their context")
    configs, remote = _local_and_worker(configs)
    if remote:
        from agacc.eval.kvpress_adapter import run_worker

        local = evaluate_group(model, tok, group, configs, scoring, chunk, log, prefill_chunk) if configs else []
        return local + run_worker(model, tok, group, remote, "query-agnostic", scoring)
    ctx = group[0].context_ids
    cap = capture_prefill(model, ctx, [], n_obs=_n_obs(configs))
    results = []
    for name, cfg in configs:
        why = cfg.unavailable(model) if is_external(cfg) else None
        if why:
            results += [_skipped(s, name, why, "query-agnostic") for s in group]
            continue
        t0 = time.perf_counter()
        probe = None
        if not is_external(cfg) and cfg.context_probe == "reconstruct":  # scored by repeating it (agacc.probe)
            rep = tok(REPEAT, add_special_tokens=False)["input_ids"]
            probe = lambda c, _: reconstruct(model, c, ctx, rep, prefill_chunk or len(ctx))
        try:
            base, _ = _build(model, cfg, cap, ctx, prefill_chunk, before_end=probe)
        except Exception as e:
            if not is_external(cfg):
                raise
            results += [_skipped(s, name, _failed(cfg, e), "query-agnostic") for s in group]
            continue
        if isinstance(base, CompressedCache):
            base.end_prefill()
        build_s = time.perf_counter() - t0
        held = _memory(cfg, base)  # the compressed context, what is kept and reused across questions
        for j, s in enumerate(group):
            t1 = time.perf_counter()
            r = {"index": s.index, "preset": name, **s.meta, "protocol": "query-agnostic", "reuse": len(group)}
            try:
                cache = base if j == len(group) - 1 else fork_cache(base)
                first = ask(model, cache, s.question_ids, prefill_chunk)
                processed = _score(model, tok, s, cache, first, scoring, chunk, r)
            except Exception as e:
                if not is_external(cfg):
                    raise
                results.append(_skipped(s, name, _failed(cfg, e), "query-agnostic"))
                continue
            t2 = time.perf_counter()
            mem = _memory(cfg, cache)
            r.update(kv_bytes=int(held["bytes"]), kv_bytes_fp16=int(held["bytes_fp16"]),
                     ratio=held["bytes_fp16"] / held["bytes"] if held["bytes"] else 1.0,
                     kv_bytes_end=int(mem["bytes"]), kv_bytes_fp16_end=int(mem["bytes_fp16"]),
                     host_bytes=int(mem["host_bytes"]), decoded_tokens=processed + len(s.question_ids),
                     build_s=build_s / len(group), decode_s=t2 - t1, prefill_s=cap.seconds / len(group),
                     prompt_tokens=cap.n + len(s.question_ids))
            results.append(r)
            if log is not None:
                log(r)
            del cache
        del base
    return results


def aggregate(task: str, per_sample: list[dict], configs, ratio_target, scoring: str) -> list[dict]:
    """Per-sample results (any order, any shards) -> one record per (preset, context length), in
    preset order then length. Sums are taken in sample order, so shards merge bit-exactly."""
    per_sample = sorted(per_sample, key=lambda r: (r["index"], r.get("context_tokens") or 0))
    out = []
    lengths = sorted({r.get("context_tokens") or 0 for r in per_sample})
    for name, cfg in configs:
        for n in lengths:
            rs = [r for r in per_sample if r["preset"] == name and (r.get("context_tokens") or 0) == n]
            if not rs:
                continue
            k = len(rs)
            if any("skipped" in r for r in rs):  # a method that cannot run here: said, never a failed run
                out.append({"task": task, "preset": name, "samples": k, "context_tokens": n or None,
                            "skipped": next(r["skipped"] for r in rs if "skipped" in r), "score": None,
                            "ratio_requested": ratio_target, "config": cfg.to_dict(),
                            **({"protocol": rs[0]["protocol"]} if "protocol" in rs[0] else {})})
                continue
            kv = sum(r["kv_bytes"] for r in rs)
            kv16 = sum(r["kv_bytes_fp16"] for r in rs)
            dec = sum(r["decoded_tokens"] for r in rs)
            dec_s = sum(r["decode_s"] for r in rs)
            rec = {
                "task": task, "preset": name, "samples": k, "context_tokens": n or None,
                "ratio_target": cfg.target_ratio if cfg.target_ratio is not None else None,
                "ratio_requested": ratio_target,
                "score": sum(r["score"] for r in rs) / k,
                "ratio": kv16 / kv if kv else 1.0,
                "kv_bytes": kv // k, "kv_bytes_fp16": kv16 // k, "kv_mb": round(kv / k / 1e6, 4),
                "kv_mb_fp16": round(kv16 / k / 1e6, 4),
                "prompt_tokens": sum(r["prompt_tokens"] for r in rs) // k,
                "tokens_per_s": dec / dec_s if dec_s > 0 else None,
                "build_s": sum(r["build_s"] for r in rs) / k,
                "prefill_s": sum(r["prefill_s"] for r in rs) / k,
                "prefill_tokens_per_s": sum(r["prompt_tokens"] for r in rs) / max(1e-9, sum(r["prefill_s"] for r in rs)),
                "scoring": scoring if rs[0].get("tokens") is None else "teacher-forced",
            }
            if "nll" in rs[0]:
                toks = sum(r["tokens"] for r in rs)
                nll, nll_full = sum(r["nll"] for r in rs), sum(r["nll_full"] for r in rs)
                rec.update(ppl=perplexity(nll, toks), ppl_full=perplexity(nll_full, toks),
                           top1_agreement=sum(r["top1"] for r in rs) / toks, kl=sum(r["kl"] for r in rs) / toks,
                           score=min(1.0, math.exp((nll_full - nll) / toks)), tokens=toks)
            else:  # a score per sample: its 95% interval (ppl's score is one ratio over the pooled tokens)
                rec["ci95"] = list(wilson_interval([r["score"] for r in rs]))
            if "protocol" in rs[0]:
                rec["protocol"] = rs[0]["protocol"]
                rec["reuse"] = rs[0].get("reuse", 1)
            rec["per_sample"] = [{kk: r.get(kk) for kk in ("index", "depth", "context_tokens", "score", "ratio",
                                                           "kv_bytes", "prediction", "dataset", "id", "offset",
                                                           "context", "question", "key")
                                  if r.get(kk) is not None} for r in rs]
            rec["config"] = cfg.to_dict()
            out.append(rec)
    return out


def run(model, tok, task: str, samples: list[Sample], configs, ratio=None, scoring: str = "match", chunk: int = 8,
        rank: int = 0, world: int = 1, progress: bool = True, prefill_chunk: int | None = None,
        protocol: str = "query-aware") -> list[dict]:
    """This process's share of the samples (``samples[rank::world]``) -> per-sample results
    (``prefill_chunk``, ``protocol``: see ``evaluate_sample``). Query-agnostic: the samples sharing a
    context (``Sample.group``) are one unit, evaluated on one compressed context (``evaluate_group``)
    and sharded together."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    configs, remote = _local_and_worker(configs)
    if protocol == "query-agnostic":
        units: dict = {}
        for s in samples:
            units.setdefault(("g", s.group) if s.group is not None else ("s", s.index), []).append(s)
        mine_units = list(units.values())[rank::world]
    else:
        mine_units = [[s] for s in samples[rank::world]]
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(u) for u in mine_units) * (len(configs) + len(remote)), desc=f"{task}", unit="run", dynamic_ncols=True)
    out = []
    for unit in mine_units if configs else []:
        if protocol == "query-agnostic":
            out += evaluate_group(model, tok, unit, configs, scoring=scoring, chunk=chunk, prefill_chunk=prefill_chunk)
        else:
            out += evaluate_sample(model, tok, unit[0], configs, scoring=scoring, chunk=chunk, prefill_chunk=prefill_chunk)
        if bar is not None:
            bar.update(len(unit) * len(configs))
            bar.set_postfix(sample=unit[0].index, ctx=unit[0].meta.get("context_tokens"))
    if remote:  # kvpress: every sample of this process through one worker process
        from agacc.eval.kvpress_adapter import run_worker

        out += run_worker(model, tok, [s for u in mine_units for s in u], remote, protocol, scoring)
        if bar is not None:
            bar.update(sum(len(u) for u in mine_units) * len(remote))
    if bar is not None:
        bar.close()
    return out


def _local_and_worker(configs):
    """(methods run in this process, methods run by a worker process: kvpress)."""
    return ([(n, c) for n, c in configs if not getattr(c, "in_worker", False)],
            [(n, c) for n, c in configs if getattr(c, "in_worker", False)])
