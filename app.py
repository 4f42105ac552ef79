"""AGACC app: stream generation with the compressed KV cache and watch what it does, live.

    python app.py            # http://localhost:7860 (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT respected)

The model is loaded once per process and shared read-only; every browser session gets its own
cache, cancel event and recorded trace (server side, keyed by the session hash; gr.State stays
out of it because it must be deep-copyable). Generation runs through the library
(``agacc.session.GenerationSession``); the UI only draws what it yields and replays the policy
with ``agacc.trace.replay_frames``: it computes no compression itself.

Environment: AGACC_MODEL (hub id / path to load at start instead of the embedded model),
AGACC_DEVICE, AGACC_CONCURRENCY (generations at once, default 2), AGACC_MAX_CONTEXT (prompt + new
tokens allowed; default 4096 on CPU, 32768 on CUDA), AGACC_DRAW_INTERVAL (seconds between redraws of
the memory chart and statistics while streaming, default 0.3), AGACC_MAP_INTERVAL (the heatmaps and
token view, default 1.0), AGACC_THREADS (torch CPU threads), AGACC_PRELOAD=0 (load
the model on the first request instead of at start), AGACC_PACKED_WEIGHTS=0 (the embedded model's
dequantised fp32 weights instead of its GGUF blocks), AGACC_QUEUE_POLL (how often, in seconds, Gradio's
idle queue looks for new events; default 0.02).
"""
from __future__ import annotations

import functools
import html
import importlib.util
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

import gradio as gr
import torch

import agacc
from agacc.session import GenerationSession, SessionError
from agacc.trace import Trace, config_snippet, policy_changes, replay_frames
from components import controls, plots
from components.layout import ASSETS, build_layout, example_text, plot_value
from components.token_view import css as token_css
from components.token_view import render_token_view

EMBEDDED_CHOICE = "embedded: SmolLM2-135M-Instruct"
HUB_CHOICES = ["HuggingFaceTB/SmolLM2-360M-Instruct", "HuggingFaceTB/SmolLM2-1.7B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct",
               "meta-llama/Llama-3.2-1B-Instruct"]
MIB = 2 ** 20
SKIP = gr.skip


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


DRAW_INTERVAL = float(os.environ.get("AGACC_DRAW_INTERVAL", 0.3))
# the heatmaps and the token view change only at a re-evaluation (every N_r tokens): at most this often
MAP_INTERVAL = float(os.environ.get("AGACC_MAP_INTERVAL", 1.0))
# the embedded model multiplies by its GGUF file's 4-bit blocks on the CPU (agacc.load_model's packed_weights)
PACKED_WEIGHTS = os.environ.get("AGACC_PACKED_WEIGHTS", "1") != "0"
CONCURRENCY = max(1, _env_int("AGACC_CONCURRENCY", 2))
# Gradio's queue looks for new events every 1 ms (progress every 10 ms) on the server's event loop, even
# when idle; every wake-up takes the GIL from a decode thread in the middle of its torch ops (~1,500
# context switches a second). Polling every 20 ms delays the start of a queued event by at most that.
QUEUE_POLL = float(os.environ.get("AGACC_QUEUE_POLL", 0.02))


def hub_reachable(timeout: float = 1.5) -> bool:
    """True when huggingface.co answers on 443 (hub ids are then offered in the model list)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or os.environ.get("AGACC_OFFLINE"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_cached(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:
        return False


def model_arg(choice: str | None) -> str | None:
    """Dropdown value -> load_model name (None = embedded)."""
    c = (choice or "").strip()
    if not c or c == EMBEDDED_CHOICE or c.lower() in ("embedded", "default", agacc.models.EMBEDDED_NAME.lower()):
        return None
    return c


class Models:
    """Loaded models, shared read-only by all sessions (at most ``keep`` at once, LRU)."""

    def __init__(self, device: str | None = None, keep: int = 2):
        self.device = device
        self.keep = keep
        self._models: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._hub = None

    def get(self, choice: str | None, trust_remote_code: bool = False):
        name = model_arg(choice)
        key = (name, bool(trust_remote_code) if name else False)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            if name is not None and not Path(name).exists() and not self.hub_ok() and not _hub_cached(name):
                raise ValueError(f"cannot load model {name!r}: it is not a local path, not in the local hub cache, "
                                 "and the Hugging Face hub is not reachable from this server")
            try:
                model, tok = agacc.load_model(name, device=self.device, trust_remote_code=bool(trust_remote_code),
                                              packed_weights=PACKED_WEIGHTS)
            except ValueError:
                raise
            except RuntimeError as e:
                if "out of memory" in str(e).lower():
                    raise ValueError(f"not enough memory to load {name!r}") from e
                raise ValueError(f"cannot load model {name or EMBEDDED_CHOICE!r}: {e}") from e
            except Exception as e:  # remote code refused, bad config ...
                raise ValueError(f"cannot load model {name or EMBEDDED_CHOICE!r}: {type(e).__name__}: {e}") from e
            self._models[key] = (name, model, tok)
            while len(self._models) > self.keep:
                self._models.popitem(last=False)
            return self._models[key]

    def hub_ok(self) -> bool:
        if self._hub is None or time.time() - self._hub[1] > 300:
            self._hub = (hub_reachable(), time.time())
        return self._hub[0]


def _model_line(name: str | None, model) -> str:
    dev = str(model.device)
    triton = dev.startswith("cuda") and importlib.util.find_spec("triton") is not None
    return (f"Model: <b>{html.escape(name or 'SmolLM2-135M-Instruct (embedded)')}</b> on {dev}, "
            f"{str(model.dtype).replace('torch.', '')}; decode kernels: {'Triton' if triton else 'PyTorch reference'}.")


class UserState:
    """Everything one browser session owns (server side)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.cancel = threading.Event()
        self.session: GenerationSession | None = None
        self.trace: Trace | None = None
        self.model_choice: str | None = None
        self.replay_cache: OrderedDict = OrderedDict()
        self.tmpdir: str | None = None
        self.touched = time.time()

    def stop_running(self, timeout: float = 10.0) -> bool:
        s = self.session
        self.cancel.set()
        if s is not None:
            return s.finished.wait(timeout)
        return True

    def cleanup(self):
        self.stop_running(timeout=2.0)
        self.session = None
        self.trace = None
        self.replay_cache.clear()
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None


class Sessions:
    """session_hash -> UserState (bounded: the least recently used idle state goes first)."""

    def __init__(self, limit: int = 256):
        self.limit = limit
        self._d: OrderedDict[str, UserState] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str | None) -> UserState:
        key = key or "default"
        with self._lock:
            us = self._d.get(key)
            if us is None:
                us = self._d[key] = UserState()
            self._d.move_to_end(key)
            us.touched = time.time()
            while len(self._d) > self.limit:
                old_key, old = next(iter(self._d.items()))
                if old.session is not None and not old.session.finished.is_set():
                    break
                self._d.pop(old_key)
                old.cleanup()
            return us

    def drop(self, key: str | None) -> None:
        with self._lock:
            us = self._d.pop(key or "default", None)
        if us is not None:
            us.cleanup()

    def __len__(self):
        return len(self._d)

    def __contains__(self, key):
        return key in self._d


def _hash(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "default"


# --- text blocks -------------------------------------------------------------------------------

def mem_text(mem: dict | None) -> str:
    if not mem:
        return ""
    saved = (mem["bytes_fp16"] - mem["bytes"]) / MIB
    out = (f"KV {mem['bytes'] / MIB:.2f} MiB held vs {mem['bytes_fp16'] / MIB:.2f} MiB at 16 bits: "
           f"{saved:.2f} MiB saved ({mem['ratio']:.2f}x)")
    if mem.get("host_bytes"):
        out += f" + host copy {mem['host_bytes'] / MIB:.2f} MiB"
    return out


def stats_md(state: str, s: GenerationSession | None = None, mem: dict | None = None, reevals: int | None = None,
             extra: str = "") -> str:
    parts = [f"**{state}**"]
    if s is not None:
        parts += [f"prompt {s.n_prompt} tokens", f"{len(s.gen_ids)} new"]
        if s.ttft is not None:
            parts.append(f"time to first token {s.ttft:.2f} s")
        rate = s._rate()
        if rate:
            parts.append(f"{rate:.1f} tokens/s")
    if mem:
        parts.append(mem_text(mem))
    if reevals is not None:
        parts.append(f"{reevals} re-evaluations")
    return " · ".join(parts) + (f"\n\n{extra}" if extra else "")


def final_stats(tr: Trace, label: str, mem: dict | None, reevals) -> str:
    m = tr.meta
    parts = [f"**{label}**", f"prompt {tr.n_prompt} tokens", f"{m.get('new_tokens', len(tr.steps))} new"]
    if m.get("ttft") is not None:
        parts.append(f"time to first token {m['ttft']:.2f} s")
    if m.get("tokens_per_s"):
        parts.append(f"{m['tokens_per_s']:.1f} tokens/s")
    if mem:
        parts.append(mem_text(mem))
    if reevals is not None:
        parts.append(f"{reevals} re-evaluations")
    return " · ".join(parts)


def _snippet(tr: Trace, cfg) -> str:
    """The Python snippet that reproduces run ``tr`` with settings ``cfg``."""
    m = tr.meta
    return config_snippet(cfg, model=m.get("model_arg"), prompt=m.get("prompt", ""),
                          max_new_tokens=m.get("max_new_tokens", 64), temperature=m.get("temperature", 0.0),
                          seed=m.get("seed", 0), chat_template=m.get("chat_template", True),
                          compare=m.get("compare", False), trust_remote_code=m.get("trust_remote_code", False),
                          packed_weights=m.get("packed_weights", False))


def compare_md(summary: dict | None, tokenizer=None, trace: Trace | None = None) -> str:
    if not summary:
        return "Tick *compare with the full cache* (or press **Re-run + compare**) to run a full cache in lockstep."
    d = summary.get("diverged_at")
    agree, kl = summary.get("agreement"), summary.get("mean_kl")
    parts = []
    if d is None:
        parts.append("**Outputs identical** so far")
    else:
        comp_tok = ref_tok = None
        if trace is not None and d < len(trace.steps):
            comp_tok = trace.tokens[trace.n_prompt + d] if trace.n_prompt + d < len(trace.tokens) else None
            rid = trace.steps[d].get("ref_token_id")
            if rid is not None and tokenizer is not None:
                ref_tok = tokenizer.decode([rid])
        what = f" (compressed {comp_tok!r} vs full {ref_tok!r})" if comp_tok is not None and ref_tok is not None else ""
        parts.append(f"**First divergence at token {d}**{what}")
    if agree is not None:
        parts.append(f"top-1 agreement {100 * agree:.1f}%")
    if kl is not None:
        parts.append(f"mean KL(full‖compressed) {kl:.4f} nats")
    return " · ".join(parts) + ("\n\nAgreement and KL compare the next-token distributions on the compressed "
                                "run's context (the full cache is teacher-forced after the outputs diverge).")


# --- the app ----------------------------------------------------------------------------------

class AgaccApp:
    """Handlers + the Blocks. ``models`` is shared by all sessions; ``sessions`` holds their state."""

    def __init__(self, models: Models | None = None, preload: bool = True, max_context: int | None = None,
                 draw_interval: float = DRAW_INTERVAL, map_interval: float = MAP_INTERVAL,
                 default_prompt: str | None = None, offer_hub: bool | None = None):
        self.models = models or Models(os.environ.get("AGACC_DEVICE") or None)
        self.sessions = Sessions()
        self.draw_interval = draw_interval
        self.map_interval = map_interval
        default_model = os.environ.get("AGACC_MODEL") or EMBEDDED_CHOICE
        self.default_model = default_model
        self.model_line = ""
        if preload:
            name, model, _ = self.models.get(default_model)
            self.model_line = _model_line(name, model)
            self.n_layers = (model.config.get_text_config() if hasattr(model.config, "get_text_config")
                             else model.config).num_hidden_layers
        else:
            self.n_layers = 64
        cuda = torch.cuda.is_available()
        self.max_context = max_context or _env_int("AGACC_MAX_CONTEXT", 32768 if cuda else 4096)
        offer_hub = hub_reachable() if offer_hub is None else offer_hub
        self.model_choices = [EMBEDDED_CHOICE] + (HUB_CHOICES if offer_hub else [])
        if default_model not in self.model_choices:
            self.model_choices.append(default_model)
        self.default_prompt = default_prompt if default_prompt is not None else example_text("Document question")

    # ---- helpers --------------------------------------------------------------------------------
    def _cfg(self, preset, *knobs):
        """The config of ``preset`` with the knob values in ``controls.FIELDS`` order (the handlers' order)."""
        try:
            return controls.config_from_values(preset, controls.values_dict(knobs))
        except ValueError as e:
            raise gr.Error(f"Inconsistent settings: {e}", title="Check the settings")

    def _final(self, us: UserState, tokenizer=None, state: str = "Done") -> list:
        """Every generation output for the end of a run (or a stop / an import)."""
        tr = us.trace
        if tr is None or not tr.frames:
            return [SKIP()] * len(self.gen_outputs)
        k = len(tr.frames) - 1
        frame = tr.frames[k]
        run_cfg = tr.config
        view = self._view(us, k, run_cfg, None)
        mem = tr.meta.get("memory") or frame.get("memory")
        reason = tr.meta.get("stop_reason")
        label = {"eos": "Done (end of text)", "max_new_tokens": "Done (max new tokens)",
                 "cancelled": "Stopped: generation ended and the cache was freed"}.get(reason, state)
        stats = final_stats(tr, label, mem, frame.get("reevaluations"))
        cmp = tr.compare
        cmp_plot = plot_value(plots.compare_chart(tr.steps, cmp.get("diverged_at") if cmp else None))
        return [tr.text, stats, *view[:5],
                (cmp or {}).get("ref_text", ""), compare_md(cmp, tokenizer, tr), cmp_plot,
                gr.update(minimum=0, maximum=max(1, k), value=k, step=1), view[5], view[6]]

    def _view(self, us: UserState, k: int, cfg_now, layer) -> list:
        """[importance, tier, bits, memory, token view, note, snippet] for frame k under cfg_now."""
        tr = us.trace
        k = max(0, min(int(k), len(tr.frames) - 1))
        frame = tr.frames[k]
        run_cfg = tr.config
        cfg_now = cfg_now or run_cfg
        replayable, rerun = policy_changes(run_cfg, cfg_now)
        layer = None if layer is None or int(layer) < 0 else int(layer)
        n_frames = len(tr.frames)
        final = k == n_frames - 1
        snap, shown_cfg, replayed = frame, run_cfg, None
        note = [f"Frame {k + 1}/{n_frames}: after {frame['step']} decode steps, {frame['seq_len']} tokens in the cache, "
                f"{frame.get('reevaluations', '?')} re-evaluations."]
        if replayable and tr.history and cfg_now.compress:
            key = json.dumps(cfg_now.to_dict(), sort_keys=True)
            frames_r = us.replay_cache.get(key)
            if frames_r is None:
                frames_r = replay_frames(tr.history, cfg_now, tr.geometry)
                us.replay_cache[key] = frames_r
                while len(us.replay_cache) > 8:
                    us.replay_cache.popitem(last=False)
            h = tr.history_for_frame(k)
            snap = dict(frames_r[h])
            snap["token_importance"] = frame.get("token_importance")
            shown_cfg = cfg_now
            overhead = {}
            for f in tr.frames:
                bt = (f.get("memory") or {}).get("by_tier", {})
                overhead[f["step"]] = bt.get("tracker", 0) + bt.get("meta", 0)
            replayed = [{"step": r["step"], "bytes": r["planned_bytes"] + overhead.get(r["step"], 0)} for r in frames_r]
            rec = (frame.get("memory") or {}).get("bytes")
            held = snap["planned_bytes"] + overhead.get(snap["step"], 0)
            changes = ", ".join(f"{f}={getattr(cfg_now, f)}" for f in replayable)
            note.append(f"**Replayed** with {changes}: tiers, bits and bytes recomputed from the recorded importance "
                        f"(no generation): {held / MIB:.2f} MiB held vs {rec / MIB:.2f} MiB recorded "
                        f"({snap['ratio']:.2f}x vs 16 bits). Press **Re-run + compare** to check the quality.")
        if rerun:
            note.append(f"Changed {', '.join(rerun)}: these change the importance itself; press **Generate** or "
                        "**Re-run + compare** to apply them.")
        figs = [plot_value(plots.importance_heatmap(snap, shown_cfg.to_dict())), plot_value(plots.tier_map(snap)),
                plot_value(plots.bits_map(snap)),
                plot_value(plots.memory_chart(tr.steps, replayed, marker_step=None if final else frame["step"]))]
        n_tok = len(tr.tokens) if final else min(len(tr.tokens), frame["seq_len"])
        tv = render_token_view(tr.tokens[:n_tok], tr.n_prompt, snap, layer,
                               caption=("replayed tiers" if replayed else "recorded tiers")
                               + (f", layer {layer}" if layer is not None else ", most common tier over layers"))
        return figs + [tv, "\n\n".join(note), _snippet(tr, cfg_now)]

    # ---- handlers -------------------------------------------------------------------------------
    def generate(self, prompt, model, trust_remote_code, preset, max_new_tokens, temperature, seed, compare,
                 chat_template, tau_h, tau_l, tau_e, use_target, target_ratio, b_min, b_max, p_max, alpha, block_size,
                 n_r, recent_window, host_copy, rotate=True, spill=None, request: gr.Request = None):
        """Stream a generation with the compressed cache; yields every output several times a second."""
        us = self.sessions.get(_hash(request))
        if not str(prompt or "").strip():
            raise gr.Error("The prompt is empty: type a prompt or pick an example.", title="Empty prompt")
        cfg = self._cfg(preset, tau_h, tau_l, tau_e, use_target, target_ratio, b_min, b_max, p_max, alpha, block_size,
                        n_r, recent_window, host_copy, rotate, spill)
        try:
            seed = int(seed if seed is not None else 0)
        except (TypeError, ValueError):
            raise gr.Error(f"seed must be an integer, got {seed!r}")
        us.stop_running()  # a new run in this session ends the previous one
        try:
            name, mdl, tok = self.models.get(model, bool(trust_remote_code))
        except ValueError as e:
            raise gr.Error(str(e), title="Model not available")
        cancel = threading.Event()
        try:
            s = GenerationSession(mdl, tok, prompt, cfg, max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                                  seed=seed, compare=bool(compare), chat_template=bool(chat_template), cancel=cancel,
                                  max_context=self.max_context, model_name=name or "SmolLM2-135M-Instruct (embedded)")
        except SessionError as e:
            raise gr.Error(str(e), title="Cannot generate")
        s.trace.meta.update(model_arg=name, trust_remote_code=bool(trust_remote_code) and name is not None)
        with us.lock:
            us.cancel, us.session, us.trace, us.model_choice = cancel, s, s.trace, model
            us.replay_cache.clear()
        ui = self.ui
        # the value last sent per output, sent again while it holds: gradio diffs an unchanged value to
        # nothing, where a skip makes it rebuild the component (about 1 ms each, per update, on the
        # thread that serves every session)
        live = {ui.output: "", ui.output_full: "", ui.replay_note: "Recording: scrub the frames and tune the "
                "thresholds on them when the run ends.", ui.snippet: _snippet(s.trace, cfg),
                ui.stats: stats_md(f"Prefilling {s.n_prompt} prompt tokens", None, None, None, extra=_model_line(name, mdl))}
        if not compare:
            live[ui.compare_md] = compare_md(None)
            live[ui.compare_plot] = plot_value(plots.compare_chart([], None))

        def update():
            return [live.get(c, SKIP()) for c in self.gen_outputs]

        yield update()
        last_draw, last_map, frame, frame_dirty = 0.0, 0.0, None, False
        batches = s.stream_batches()  # the decode runs ahead on its own thread while an update is sent
        try:
            for batch in batches:
                ev = batch[-1]
                live[ui.output] = ev.text
                for e in batch:
                    if e.frame is not None:
                        frame, frame_dirty = e.frame, True
                now = time.perf_counter()
                if now - last_draw >= self.draw_interval or ev.done:
                    last_draw = now
                    tr = s.trace  # the decode thread appends to it: draw the steps up to ev's
                    steps, tokens = tr.steps[:ev.index + 1], tr.tokens[:tr.n_prompt + ev.index + 1]
                    live[ui.stats] = stats_md("Generating", s, ev.memory, s.cache.reevaluations if s.cache else None)
                    live[ui.memory] = plot_value(plots.memory_chart(steps))
                    if frame_dirty and frame is not None and (now - last_map >= self.map_interval or ev.done):
                        frame_dirty, last_map = False, now
                        live[ui.importance] = plot_value(plots.importance_heatmap(frame, cfg.to_dict()))
                        live[ui.tier] = plot_value(plots.tier_map(frame))
                        live[ui.bits] = plot_value(plots.bits_map(frame))
                        live[ui.token_view] = render_token_view(tokens, tr.n_prompt, frame, None,
                                                                caption="live: most common tier over layers")
                    if ev.compare is not None:
                        live[ui.output_full] = ev.compare["ref_text"]
                        live[ui.compare_plot] = plot_value(plots.compare_chart(steps, ev.compare["diverged_at"]))
                        live[ui.compare_md] = compare_md(s.result()["compare"], tok, tr)
                yield update()
        except SessionError as e:
            raise gr.Error(str(e), title="Generation failed")
        finally:
            batches.close()  # stops the decode thread (cancelled request) before the caches go
            s.close()
        yield self._final(us, tok)

    def rerun(self, *args, request: gr.Request = None):
        """Generate again with the current settings and the full-cache comparison on (quality check)."""
        args = list(args)
        args[7] = True  # compare
        yield from self.generate(*args, request=request)

    def stop(self, request: gr.Request = None):
        us = self.sessions.get(_hash(request))
        s = us.session
        if s is None or s.finished.is_set():
            return [SKIP()] * (len(self.gen_outputs) - 1) + [SKIP()]
        if not us.stop_running(timeout=15.0):  # inside a long forward (a prefill): it ends right after it
            out = [SKIP()] * len(self.gen_outputs)
            out[1] = (f"**Stopping**: the current forward pass ({s.n_prompt} prompt tokens) finishes first; the run "
                      "ends and frees its cache right after it.")
            return out
        return self._final(us, s.tokenizer, state="Stopped")

    def view(self, replay, token_layer, preset, tau_h, tau_l, tau_e, use_target, target_ratio, b_min, b_max, p_max, alpha,
             block_size, n_r, recent_window, host_copy, rotate=True, spill=None, request: gr.Request = None):
        """Show recorded frame ``replay``; if only policy knobs changed, replay them on the recorded importance."""
        us = self.sessions.get(_hash(request))
        n = len(self.view_outputs)
        if us.trace is None or not us.trace.frames:
            return [SKIP()] * n
        if us.session is not None and us.session.trace is us.trace and not us.session.finished.is_set():
            return [SKIP()] * (n - 2) + ["Generating: tuning applies to the recorded run when it ends.", SKIP()]
        cfg = self._cfg(preset, tau_h, tau_l, tau_e, use_target, target_ratio, b_min, b_max, p_max, alpha, block_size,
                        n_r, recent_window, host_copy, rotate, spill)
        return self._view(us, int(replay or 0), cfg, token_layer)

    def apply_preset(self, preset):
        try:
            v = controls.preset_values(preset)
        except ValueError as e:
            raise gr.Error(str(e))
        return controls.values_list(v)

    def export(self, request: gr.Request = None):
        us = self.sessions.get(_hash(request))
        tr = us.trace
        if tr is None:
            raise gr.Error("Nothing to export yet: generate (or import a trace) first.", title="No run")
        if us.tmpdir is None:
            us.tmpdir = tempfile.mkdtemp(prefix="agacc-export-")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        d = Path(us.tmpdir)
        trace_path = tr.save(d / f"agacc-trace-{stamp}.json")
        k = len(tr.frames) - 1
        view = self._view(us, k, tr.config, None) if tr.frames else None
        frame = tr.frames[k] if tr.frames else None
        specs = {"importance": plots.importance_heatmap(frame, tr.meta["config"]), "tiers": plots.tier_map(frame),
                 "bits": plots.bits_map(frame), "memory": plots.memory_chart(tr.steps),
                 "compare": plots.compare_chart(tr.steps, (tr.compare or {}).get("diverged_at"))}
        tv = render_token_view(tr.tokens, tr.n_prompt, frame, None)
        style = f"<style>{(ASSETS / 'app.css').read_text()}\n{token_css()}</style>"
        fig_path = d / f"agacc-figures-{stamp}.html"
        fig_path.write_text(plots.figures_html(specs, style + tv, title=f"AGACC run: {tr.meta.get('model')}"))
        py_path = d / f"agacc-reproduce-{stamp}.py"
        py_path.write_text(view[6] if view else "")
        return [str(trace_path), str(fig_path), str(py_path)], view[6] if view else SKIP()

    def import_trace(self, path, request: gr.Request = None):
        if not path:
            return [SKIP()] * (len(self.gen_outputs) + 2 + len(controls.FIELDS))
        us = self.sessions.get(_hash(request))
        try:
            tr = Trace.load(path)
        except (ValueError, OSError, KeyError, TypeError) as e:
            raise gr.Error(f"Cannot import this file: {e}", title="Import failed")
        if not tr.frames:
            raise gr.Error("This trace has no frames to show.", title="Import failed")
        us.stop_running()
        with us.lock:
            us.session, us.trace = None, tr
            us.replay_cache.clear()
        cfg = tr.config
        from agacc.presets import PRESETS

        preset = cfg.name if cfg.name in PRESETS else "agacc"
        final = self._final(us, None, state="Imported trace")
        return final + [preset, gr.update(value=-1)] + controls.values_list(controls.values_from_config(cfg))

    def unload(self, request: gr.Request = None):
        self.sessions.drop(_hash(request))

    # ---- the page -------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        with gr.Blocks(title="AGACC: live KV-cache compression", analytics_enabled=False) as demo:
            ui = self.ui = build_layout(self.model_choices, self.default_model, self.model_line, self.default_prompt,
                                        n_layers=self.n_layers)
            knobs = list(ui.knobs.values())
            gen_inputs = [ui.prompt, ui.model, ui.trust, ui.preset, ui.max_new, ui.temperature, ui.seed, ui.compare,
                          ui.chat] + knobs
            self.gen_outputs = [ui.output, ui.stats, ui.importance, ui.tier, ui.bits, ui.memory, ui.token_view,
                                ui.output_full, ui.compare_md, ui.compare_plot, ui.replay, ui.replay_note, ui.snippet]
            self.view_outputs = [ui.importance, ui.tier, ui.bits, ui.memory, ui.token_view, ui.replay_note, ui.snippet]
            gen_ev = ui.generate.click(self.generate, gen_inputs, self.gen_outputs, api_name="generate",
                                       concurrency_id="generate", concurrency_limit=CONCURRENCY,
                                       show_progress="minimal")
            rerun_ev = ui.rerun.click(self.rerun, gen_inputs, self.gen_outputs, api_name="rerun",
                                      concurrency_id="generate", concurrency_limit=CONCURRENCY, show_progress="minimal")
            ui.stop.click(self.stop, None, self.gen_outputs, api_name="stop", cancels=[gen_ev, rerun_ev],
                          concurrency_limit=None, show_progress="hidden")
            gr.on([k.change for k in knobs] + [ui.replay.change, ui.token_layer.change], self.view,
                  [ui.replay, ui.token_layer, ui.preset] + knobs, self.view_outputs, api_name="view",
                  trigger_mode="always_last", show_progress="hidden", concurrency_limit=None)
            ui.preset.input(self.apply_preset, ui.preset, knobs, api_name="preset", show_progress="hidden")
            for label, btn in ui.examples.items():
                btn.click(functools.partial(example_text, label), None, ui.prompt, api_visibility="private",
                          show_progress="hidden")
            ui.export.click(self.export, None, [ui.files, ui.snippet], api_name="export")
            ui.import_file.upload(self.import_trace, ui.import_file,
                                  self.gen_outputs + [ui.preset, ui.token_layer] + knobs, api_name="import_trace")
            demo.unload(self.unload)
        demo.queue(default_concurrency_limit=CONCURRENCY, max_size=64)
        slow_queue_polling(demo, QUEUE_POLL)
        self.demo = demo
        return demo


def slow_queue_polling(demo: gr.Blocks, seconds: float) -> None:
    """Set how often Gradio's queue polls for new events and progress while idle (private attributes of
    gradio 6.31's ``Queue``, pinned in requirements.txt; left as they are if they are not there)."""
    q = getattr(demo, "_queue", None)
    for name in ("sleep_when_free", "progress_update_sleep_when_free"):
        if q is not None and isinstance(getattr(q, name, None), float):
            setattr(q, name, max(getattr(q, name), seconds))


def launch_kwargs() -> dict:
    """theme / css / head go to launch() in Gradio 6."""
    css = (ASSETS / "app.css").read_text() + "\n" + token_css()
    return {"theme": gr.themes.Soft(primary_hue="blue", neutral_hue="slate"), "css": css,
            "head": "<meta name='description' content='AGACC: attention-guided adaptive KV-cache compression, live'>"}


def build_demo(**kw) -> gr.Blocks:
    return AgaccApp(**kw).build()


def set_threads() -> int:
    """CPU threads per process: AGACC_THREADS, else the cores shared by the concurrent generations
    (on a small CPU, more spinning OpenMP threads than cores makes every decode step far slower)."""
    threads = os.environ.get("AGACC_THREADS")
    if threads:
        torch.set_num_threads(max(1, int(threads)))
    elif not torch.cuda.is_available():
        torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // CONCURRENCY)))
    return torch.get_num_threads()


def main():
    set_threads()
    if not torch.cuda.is_available():
        from kernels import cpu

        cpu.load_in_background()  # the fused CPU decode kernel: built once per machine (about a minute)
    app = AgaccApp(preload=os.environ.get("AGACC_PRELOAD", "1") != "0")
    demo = app.build()
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                server_port=int(os.environ.get("GRADIO_SERVER_PORT", 7860)), show_error=True, **launch_kwargs())


if __name__ == "__main__":
    main()
