"""The lockstep comparison with a full cache: how far a compressed run strays from an uncompressed one.

A plain full cache (transformers' ``DynamicCache``) runs the same prompt in lockstep with the compressed
run and samples its own tokens with the same sampler and seed: its output, and the first step where
the two outputs differ. At every step the compressed run's next-token distribution is compared with
the full cache's on the *compressed run's* context: top-1 agreement and KL(full || compressed). Until
the outputs diverge that context is the full run's own; from the divergence on a second full cache,
a copy of the first taken there, is teacher-forced on the compressed run's tokens, so the numbers keep
measuring the cache and not the difference of two texts.

    ref = FullCacheComparison(model, forward, tokenizer, eos, temperature=0.0, seed=0)
    ref.prefill(input_ids)
    for each step i:  record = ref.step(i, token, logits)   # {ref_token_id, ref_text, agree, kl, diverged_at}
                      ... the compressed run's next forward ...
                      ref.advance(token)                      # the full caches' forwards
    ref.summary()      # {ref_text, ref_token_ids, diverged_at, agreement, mean_kl}

``agacc.session.GenerationSession(compare=True)`` drives it. ``measure_quality`` is the same question
after a run, for any setting: the run's text teacher-forced through a full cache and a cache of that
setting (the app's Measure quality). No gradio here.
"""
from __future__ import annotations

import copy
import threading
from typing import Callable

import torch


def sample(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> int:
    """The next token: the argmax at temperature 0, else a draw from softmax(logits / temperature) with
    ``gen`` (the compressed run and the full cache sample with this one function)."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / temperature, -1)
    return int(torch.multinomial(probs, 1, generator=gen))


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """KL(p || q) in nats between the softmax distributions of two logit vectors."""
    lp = torch.log_softmax(p_logits.float(), -1)
    lq = torch.log_softmax(q_logits.float(), -1)
    return max(0.0, float((lp.exp() * (lp - lq)).sum()))


def _copy_cache(cache):
    with torch.inference_mode():
        return copy.deepcopy(cache)


class FullCacheComparison:
    """A full cache in lockstep with a compressed run (batch size 1).

    Args:
        model: the model both runs share.
        forward: ``forward(cache, token_ids [1, n], what) -> logits of the last position`` (the
            session's, which turns an out-of-memory error into a readable one; ``what`` names the pass).
        tokenizer: decodes the full cache's output.
        eos: token ids that end the full cache's own output.
        temperature, seed: the sampling of the compressed run (the full cache draws from its own
            generator seeded alike).
    """

    def __init__(self, model, forward: Callable, tokenizer, eos: set[int], *, temperature: float = 0.0, seed: int = 0):
        from transformers import DynamicCache

        self.forward, self.tokenizer, self.eos = forward, tokenizer, set(eos)
        self.temperature = float(temperature)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.lock = threading.Lock()
        self.ref = DynamicCache(config=model.config)  # the full cache, its own tokens
        self.tf = None                                # a full cache teacher-forced on the compressed tokens
        self.ref_logits: torch.Tensor | None = None
        self.tf_logits: torch.Tensor | None = None
        self.ref_ids: list[int] = []
        self.ref_text = ""
        self.ref_done = False                         # the full cache's output ended (eos)
        self.last_ref: int | None = None              # the full cache's token of the latest step
        self.diverged_at: int | None = None
        self.agree: list[bool] = []
        self.kls: list[float] = []

    def prefill(self, input_ids: torch.Tensor) -> None:
        self.ref_logits = self.forward(self.ref, input_ids, "full-cache prefill")

    def step(self, i: int, token: int, logits: torch.Tensor) -> dict:
        """Step ``i`` of the compressed run, which chose ``token`` from ``logits``: the full cache samples
        its own token (until its eos), the first divergence is noted, and the two next-token
        distributions on the compressed run's context are compared.
        -> {ref_token_id (None after the full output ended), ref_text, agree, kl, diverged_at}."""
        target = self.tf_logits if self.tf_logits is not None else self.ref_logits
        agree = int(target.argmax()) == int(logits.argmax())
        d = kl(target, logits)
        ref_tok = None
        if not self.ref_done:
            ref_tok = sample(self.ref_logits, self.temperature, self.gen)
            self.ref_ids.append(ref_tok)
            self.ref_text = self.tokenizer.decode(self.ref_ids, skip_special_tokens=True)
            self.ref_done = ref_tok in self.eos
        self.last_ref = ref_tok
        if self.diverged_at is None and ref_tok != token:
            self.diverged_at = i
            with self.lock:
                if self.ref is not None:
                    self.tf = _copy_cache(self.ref)
        self.agree.append(bool(agree))
        self.kls.append(round(d, 6))
        return {"ref_token_id": ref_tok, "ref_text": self.ref_text, "agree": bool(agree), "kl": d,
                "diverged_at": self.diverged_at}

    def advance(self, token: int) -> None:
        """The full caches' forwards after step ``step()``: the full cache on its own token, the
        teacher-forced one (after the divergence) on the compressed run's ``token``."""
        ref, tf = self.ref, self.tf
        if ref is not None and not self.ref_done:
            self.ref_logits = self.forward(ref, torch.tensor([[self.last_ref]]), "full-cache decode")
        if tf is not None:
            self.tf_logits = self.forward(tf, torch.tensor([[token]]), "full-cache decode")

    def summary(self) -> dict:
        """{ref_text, ref_token_ids, diverged_at, agreement (top-1, fraction of steps), mean_kl (nats)}."""
        return {"ref_text": self.ref_text, "ref_token_ids": list(self.ref_ids), "diverged_at": self.diverged_at,
                "agreement": sum(self.agree) / len(self.agree) if self.agree else None,
                "mean_kl": sum(self.kls) / len(self.kls) if self.kls else None}

    def close(self) -> bool:
        """Drop the full caches (any thread; the output and the statistics stay). True if it held any."""
        with self.lock:
            had = self.ref is not None or self.tf is not None
            self.ref = self.tf = None
        return had


def measure_quality(model, prompt_ids: list[int], gen_ids: list[int], cfg, prefill_chunk: int = 512,
                    label: str = "") -> dict:
    """Teacher-force ``gen_ids`` (a run's output) after ``prompt_ids`` through a full cache (transformers'
    ``DynamicCache``) and through a ``CompressedCache`` of ``cfg`` built as the app's run builds it (the
    prompt in chunks of ``prefill_chunk``, ``agacc.eval.runner.chunked_prefill``; then token by token,
    ``teacher_force``) and compare the next-token distributions with ``agacc.eval.metrics.lm_stats``.

    -> {label, tokens, kl (mean KL(full || setting), nats/token), top1 (share), top1_count, ppl, ppl_full,
    ratio, bytes, bytes_fp16, seconds}. ValueError when there is nothing to measure."""
    import time

    import torch
    from transformers import DynamicCache

    from agacc.eval.metrics import lm_stats, perplexity
    from agacc.eval.runner import chunked_prefill, teacher_force

    if not prompt_ids or not gen_ids:
        raise ValueError("the run has no generated tokens to measure")
    if not cfg.compress:
        raise ValueError(f"the {cfg.name!r} preset does not compress: it equals the full cache")
    t0 = time.perf_counter()
    chunk = max(1, min(int(prefill_chunk or len(prompt_ids)), len(prompt_ids)))
    with torch.inference_mode():
        full = DynamicCache(config=model.config)
        for lo in range(0, len(prompt_ids), chunk):
            x = torch.tensor([prompt_ids[lo: lo + chunk]], device=model.device)
            first_full = model(input_ids=x, past_key_values=full, use_cache=True, logits_to_keep=1).logits[0, -1].float()
        ref = torch.cat([first_full[None], teacher_force(model, full, list(gen_ids[:-1]), chunk=64)])
        del full
        cache, first = chunked_prefill(model, cfg, list(prompt_ids), chunk)
        logits = torch.cat([first[None], teacher_force(model, cache, list(gen_ids[:-1]), chunk=1)])
        st = lm_stats(logits, ref, torch.tensor(list(gen_ids)))
        mem = cache.memory()
        del cache
    n = st["tokens"]
    return {"label": label or cfg.name, "tokens": n, "kl": st["kl"] / n, "top1": st["top1"] / n,
            "top1_count": st["top1"], "ppl": perplexity(st["nll"], n), "ppl_full": perplexity(st["nll_full"], n),
            "ratio": mem["bytes_fp16"] / max(1, mem["bytes"]), "bytes": int(mem["bytes"]),
            "bytes_fp16": int(mem["bytes_fp16"]), "seconds": time.perf_counter() - t0}
