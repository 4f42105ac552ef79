"""Streaming generation with the compressed cache: one event per generated token.

    session = GenerationSession(model, tokenizer, prompt, AGACCConfig.preset("agacc"), max_new_tokens=64)
    for ev in session.stream():          # ev.token_text, ev.text, ev.memory, ev.frame, ev.compare ...
        ...
    session.result()                     # text, stop reason, timing, memory, the recorded Trace

The decode loop calls the model itself (``model(input_ids=..., past_key_values=cache)``), so it
can hand out every token as soon as it exists; the cache re-evaluates its tiers every N_r steps
and a snapshot of it (a *frame*) rides along with the event of that step. With ``compare=True`` a
plain full cache runs in lockstep on the same prompt (``agacc.compare.FullCacheComparison``): its own
output, the first diverging token, and per step the top-1 agreement and KL(full || compressed) of the
next-token distributions on the compressed run's context (teacher-forced after the outputs diverge).

Cancellation: set the ``cancel`` event (any thread); the loop ends before its next forward and
drops the caches. Errors a user can cause (empty prompt, too long, out of memory) raise
``SessionError`` (a ``ValueError``) with a readable message.

``stream_batches()`` runs the same loop on a thread of its own and hands out the events in batches
at the consumer's pace (the app uses it: sending an update must not hold up the next token).

No gradio here: the app consumes this generator.
"""
from __future__ import annotations

import gc
import inspect
import queue
import threading
import time
from dataclasses import asdict, dataclass

import torch

from agacc.cache import CompressedCache
from agacc.compare import FullCacheComparison, sample
from agacc.config import AGACCConfig, forecasts
from agacc.planner import text_config
from agacc.probe import lookahead
from agacc.trace import Trace


_END = object()  # stream_batches: the loop ended
# prompt tokens a prefill forward takes (chunked prefill): a chunk's full-precision K/V and activations are
# what a long prompt adds to the compressed store's bytes at the peak
PREFILL_CHUNK = 512


class SessionError(ValueError):
    """A problem the user can fix (bad prompt, too long, out of memory): the message says how."""


@dataclass
class StepEvent:
    index: int                 # 0-based index of the generated token
    token_id: int
    token_text: str            # text this token added to the output (may be "" mid-character)
    text: str                  # the whole output so far
    seq_len: int               # tokens in the cache after this token's forward is queued (prompt + index)
    elapsed: float             # seconds since the start of stream()
    ttft: float                # time to first token
    tokens_per_s: float        # decode rate so far (tokens after the first / time since the first)
    memory: dict               # CompressedCache.memory() after the latest forward
    frame: dict | None         # a cache snapshot when the tiers were re-evaluated at this step, else None
    done: bool                 # last event of the run (eos / max_new_tokens)
    stop_reason: str | None
    compare: dict | None       # {ref_token_id, ref_text, agree, kl, diverged_at} when compare=True

    def to_dict(self) -> dict:
        return asdict(self)


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    gc_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for x in (gc_eos if isinstance(gc_eos, (list, tuple)) else [gc_eos]):
        if x is not None:
            ids.add(int(x))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def encode_prompt(tokenizer, prompt: str, chat_template: bool = True) -> torch.Tensor:
    """-> input ids [1, n]: the chat template (one user turn, generation prompt) when the tokenizer
    has one and ``chat_template``, else the raw text."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        return enc["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def context_limit(model) -> int | None:
    cfg = text_config(model.config)
    return getattr(cfg, "max_position_embeddings", None)


class GenerationSession:
    """One streaming generation (batch size 1) with a ``CompressedCache``.

    Args:
        model, tokenizer: from ``agacc.load_model`` (shared and read-only: one session = one cache).
        prompt: the user text; ``chat_template`` wraps it as one user turn.
        config: an ``AGACCConfig``.
        max_new_tokens, temperature (0 = greedy), seed (sampling RNG).
        compare: run a full cache in lockstep (2-3x the compute).
        cancel: a ``threading.Event``; setting it ends the stream before the next forward (a long
            prompt goes in chunk by chunk, so within a prefill too).
        prefill_chunk: a prompt longer than this goes in ``prefill_chunk`` tokens a forward, the cache
            compressing after each (``generate(prefill_chunk_size=...)``): the peak is the compressed
            store + one chunk at full precision, not the whole prompt. None: one forward.
        max_context: the largest prompt + new tokens allowed (a memory limit); the model's own
            ``max_position_embeddings`` always applies.
        model_name: recorded in the trace.
    """

    def __init__(self, model, tokenizer, prompt: str, config: AGACCConfig | None = None, *, max_new_tokens: int = 64,
                 temperature: float = 0.0, seed: int = 0, compare: bool = False, chat_template: bool = True,
                 cancel: threading.Event | None = None, max_context: int | None = None, model_name: str | None = None,
                 prefill_chunk: int | None = PREFILL_CHUNK):
        if prompt is None or not str(prompt).strip():
            raise SessionError("the prompt is empty: type a prompt or pick an example")
        config = config if config is not None else AGACCConfig.preset("agacc")
        if not isinstance(config, AGACCConfig):
            raise TypeError("config must be an AGACCConfig")
        max_new_tokens = int(max_new_tokens)
        if max_new_tokens < 1:
            raise SessionError(f"max new tokens must be >= 1, got {max_new_tokens}")
        if temperature is None or float(temperature) < 0:
            raise SessionError(f"temperature must be >= 0, got {temperature}")
        if prefill_chunk is not None and int(prefill_chunk) < 1:
            raise SessionError(f"the prefill chunk must be >= 1 token (or None: one forward), got {prefill_chunk}")
        self.prefill_chunk = None if prefill_chunk is None else int(prefill_chunk)
        self.model, self.tokenizer, self.cfg = model, tokenizer, config
        # only the last position's logits are used: a prefill that computed all of them would run the
        # vocabulary projection over the whole prompt (as generate() avoids with logits_to_keep)
        self._last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        self.prompt = str(prompt)
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, float(temperature), int(seed)
        self.compare, self.chat_template = bool(compare), bool(chat_template)
        self.cancel = cancel if cancel is not None else threading.Event()
        self.model_name = model_name
        self.input_ids = encode_prompt(tokenizer, self.prompt, chat_template)
        self.n_prompt = int(self.input_ids.shape[1])
        limits = []
        if context_limit(model):
            limits.append((context_limit(model), "the model's context length"))
        if max_context:
            limits.append((int(max_context), "this server's memory limit"))
        for limit, what in limits:
            if self.n_prompt + max_new_tokens > limit:
                raise SessionError(
                    f"the prompt has {self.n_prompt} tokens; with {max_new_tokens} new tokens that exceeds "
                    f"{what} ({limit} tokens): shorten the prompt or lower max new tokens")
        self.cache: CompressedCache | None = None
        self.reference: FullCacheComparison | None = None  # compare=True: the full cache in lockstep
        self.lock = threading.RLock()
        self.eos = eos_ids(model, tokenizer)
        self.trace = Trace(meta={
            "model": model_name or getattr(model.config, "_name_or_path", None) or "model",
            "prompt": self.prompt, "max_new_tokens": max_new_tokens, "temperature": self.temperature,
            "seed": self.seed, "compare": self.compare, "chat_template": self.chat_template,
            "config": config.to_dict(), "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
            "packed_weights": bool(getattr(model, "agacc_packed_layers", 0)),  # load_model(packed_weights=True)
        })
        ids = self.input_ids[0].tolist()
        self.trace.token_ids = list(ids)
        self.trace.tokens = [tokenizer.decode([i]) for i in ids]
        self.trace.n_prompt = self.n_prompt
        self.gen_ids: list[int] = []
        self.text = ""
        self.stop_reason: str | None = None
        self.ttft: float | None = None
        self.t_first = self.t_last = None
        self.last_memory: dict | None = None
        self.finished = threading.Event()
        self._t0 = None

    # --- public ------------------------------------------------------------------------------
    def stream(self):
        """Yield a ``StepEvent`` per generated token; always frees the caches at the end."""
        try:
            yield from self._run()
        finally:
            self.close()

    def __iter__(self):
        return self.stream()

    def stream_batches(self):
        """``stream()`` run on a thread of its own: yields, each time the consumer asks, the list of
        every ``StepEvent`` produced since (at least one), so a slow consumer (a server sending
        updates to a browser) never holds up the decode; it just receives more events at a time.
        Errors of the loop are raised here. Leaving early (``close()`` of this generator, e.g. a
        cancelled request) cancels the loop and waits for its current forward to end."""
        events: queue.SimpleQueue = queue.SimpleQueue()

        def run():
            try:
                for ev in self.stream():
                    events.put(ev)
            except BaseException as e:  # handed to the consumer
                events.put(e)
            events.put(_END)

        worker = threading.Thread(target=run, name="agacc-session", daemon=True)
        worker.start()
        try:
            while True:
                got = [events.get()]
                while not events.empty():
                    got.append(events.get())
                steps = [e for e in got if isinstance(e, StepEvent)]
                if steps:
                    yield steps
                for e in got:
                    if isinstance(e, BaseException):
                        raise e
                if got[-1] is _END:
                    return
        finally:
            if worker.is_alive():
                self.cancel.set()
                worker.join()

    def close(self) -> None:
        """Drop the caches (idempotent, any thread); the trace stays."""
        with self.lock:
            if self.cache is not None:
                try:
                    self._final_frame(self.cache)
                except Exception:  # a cache broken by an error mid-forward: keep the frames we have
                    pass
            had = self.cache is not None
            self.cache = None
            if self.reference is not None:
                had = self.reference.close() or had
        if had and gc is not None:  # (None while the interpreter shuts down)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if self.stop_reason is None:
            self.stop_reason = "cancelled" if self.cancel.is_set() else "closed"
        self._finish_trace()
        self.finished.set()

    def stop(self) -> None:
        self.cancel.set()

    def result(self) -> dict:
        """Summary of the run so far (after the stream ended: of the whole run)."""
        out = {"text": self.text, "token_ids": list(self.gen_ids), "stop_reason": self.stop_reason,
               "prompt_tokens": self.n_prompt, "new_tokens": len(self.gen_ids), "ttft": self.ttft,
               "tokens_per_s": self._rate(), "seconds": (self.t_last - self._t0) if self.t_last else None,
               "memory": self.last_memory, "trace": self.trace}
        if self.compare:
            out["compare"] = (self.reference.summary() if self.reference is not None else
                              {"ref_text": "", "ref_token_ids": [], "diverged_at": None, "agreement": None,
                               "mean_kl": None})
        return out

    # --- the loop ----------------------------------------------------------------------------
    def _forward(self, cache, token_ids: torch.Tensor, what: str) -> torch.Tensor | None:
        """The last position's logits after feeding ``token_ids`` (a prompt longer than the prefill
        chunk goes in chunk by chunk); None when ``cancel`` is set before a forward (any forward: the
        prompt's chunks, a decode step, the full-cache comparison's), so Stop waits for one forward."""
        step = self.prefill_chunk or token_ids.shape[1]

        def run():
            for lo in range(0, token_ids.shape[1], step):
                if self.cancel.is_set():
                    return None
                out = self.model(input_ids=token_ids[:, lo:lo + step].to(self.model.device), past_key_values=cache,
                                 use_cache=True, **self._last_logits_only)
            return out.logits[0, -1]

        return self._guarded(what, run)

    def _guarded(self, what: str, fn):
        """``fn()`` in inference mode, per call, never across a yield (the consumer may resume the generator
        on another thread, as gradio does, and grad mode is thread-local); out of memory frees the caches and
        becomes one clear ``SessionError``."""
        try:
            with torch.inference_mode():
                return fn()
        except Exception as e:
            if _is_oom(e):
                self.close()
                raise SessionError(
                    f"out of memory during the {what} at {self.n_prompt + len(self.gen_ids)} tokens: "
                    "shorten the prompt, lower max new tokens or turn off the full-cache comparison") from e
            raise

    def _run(self):
        self._t0 = t0 = time.perf_counter()
        if self.cancel.is_set():
            self.stop_reason = "cancelled"
            return
        with self.lock:
            self.cache = CompressedCache(self.model.config, self.cfg, record_history=True)
            if self.compare:
                self.reference = FullCacheComparison(self.model, self._forward, self.tokenizer, self.eos,
                                                     temperature=self.temperature, seed=self.seed)
        tr = self.trace
        tr.meta["geometry"] = None
        gen = torch.Generator().manual_seed(self.seed)
        logits = self._forward(self.cache, self.input_ids, "prefill")
        if logits is not None and self.reference is not None:
            self.reference.prefill(self.input_ids)
        if logits is None or (self.reference is not None and self.reference.ref_logits is None):
            self.stop_reason = "cancelled"  # during the prefill, between two chunks
            return
        n_seen_reeval = 0
        with self.lock:  # the prompt re-planned by what the model reads next (agacc.probe: the prompt again, pseudo
            cache = self.cache  # tokens); Stop ends it after the forward in flight, the plan as the last part left it
            if forecasts(self.cfg) and cache is not None:
                self._maybe_frame(cache, 0)  # the prompt's plan before it: a frame of the trace
                n_seen_reeval = cache.reevaluations
                self._guarded("lookahead", lambda: lookahead(self.model, cache, int(logits.argmax()),
                                                              stop=self.cancel.is_set, prompt_ids=self.input_ids))
        if self.cache is None:
            self.stop_reason = "cancelled"
            return
        self.cache.end_prefill()  # the prompt is in: the evictions its chunks held are decided now
        for i in range(self.max_new_tokens):
            cache = self.cache
            if cache is None or self.cancel.is_set():
                self.stop_reason = "cancelled"
                return
            frame = self._maybe_frame(cache, n_seen_reeval)
            n_seen_reeval = cache.reevaluations
            mem = cache.memory()
            self.last_memory = mem
            tok = sample(logits, self.temperature, gen)
            now = time.perf_counter()
            if self.ttft is None:
                self.ttft, self.t_first = now - t0, now
            self.t_last = now
            self.gen_ids.append(tok)
            prev = self.text
            self.text = self.tokenizer.decode(self.gen_ids, skip_special_tokens=True)
            piece = self.text[len(prev):] if self.text.startswith(prev) else self.text
            step = {"i": i, "token_id": tok, "t": round(now - t0, 4), "bytes": mem["bytes"],
                    "bytes_fp16": mem["bytes_fp16"], "host_bytes": mem["host_bytes"],
                    "reevaluations": cache.reevaluations}
            cmp = None
            if self.reference is not None:
                cmp = self.reference.step(i, tok, logits)
                step.update(agree=cmp["agree"], kl=round(cmp["kl"], 6), ref_token_id=cmp["ref_token_id"])
            tr.steps.append(step)
            tr.token_ids.append(tok)
            tr.tokens.append(self.tokenizer.decode([tok]))
            done, reason = False, None
            if tok in self.eos:
                done, reason = True, "eos"
            elif i == self.max_new_tokens - 1:
                done, reason = True, "max_new_tokens"
            if done:
                self.stop_reason = reason
            yield StepEvent(index=i, token_id=tok, token_text=piece, text=self.text,
                            seq_len=self.n_prompt + i, elapsed=now - t0, ttft=self.ttft,
                            tokens_per_s=self._rate(), memory=mem, frame=frame, done=done,
                            stop_reason=reason, compare=cmp)
            if done:
                return
            if self.cancel.is_set() or self.cache is None:
                self.stop_reason = "cancelled"
                return
            nxt = torch.tensor([[tok]])
            logits = self._forward(self.cache, nxt, "decode")
            if self.reference is not None:
                self.reference.advance(tok)

    def _maybe_frame(self, cache: CompressedCache, n_seen: int) -> dict | None:
        """A snapshot (and the new history entries) when the cache re-evaluated since the last look."""
        if cache.reevaluations == n_seen:
            return None
        tr = self.trace
        if tr.meta.get("geometry") is None and cache.layers[0].store is not None:
            geo = cache._geometry()
            tr.meta["geometry"] = {"n_layers": geo.n_layers, "heads": geo.heads, "head_dim": geo.head_dim,
                                   "batch": geo.batch, "full_itemsize": geo.full_itemsize}
        tr.add_history(cache.history[len(tr.history):], overhead=cache.unplanned_bytes())
        return tr.add_frame(cache.snapshot())

    def _final_frame(self, cache: CompressedCache) -> None:
        """The cache's state at the end of the run (unless the last frame already shows it)."""
        if cache.layers[0].store is None:
            return
        frames = self.trace.frames
        if frames and frames[-1]["step"] == cache.steps and frames[-1]["seq_len"] == cache.seq_len:
            return
        self._maybe_frame(cache, -1)

    def _rate(self) -> float:
        n = len(self.gen_ids)
        if n < 2 or self.t_last is None or self.t_last <= self.t_first:
            return 0.0
        return (n - 1) / (self.t_last - self.t_first)

    def _finish_trace(self) -> None:
        tr = self.trace
        tr.meta.update(text=self.text, stop_reason=self.stop_reason, ttft=self.ttft, tokens_per_s=self._rate(),
                       new_tokens=len(self.gen_ids), memory=self.last_memory)
        if self.compare:
            r = self.result()["compare"]
            tr.compare = {k: v for k, v in r.items()}
        else:
            tr.compare = None


def generate(model, tokenizer, prompt: str, config: AGACCConfig | None = None, **kwargs) -> dict:
    """Run a whole session and return ``GenerationSession.result()`` (text, memory, trace, ...)."""
    s = GenerationSession(model, tokenizer, prompt, config, **kwargs)
    for _ in s.stream():
        pass
    return s.result()
