"""AGACC app: stream generation with the compressed KV cache and watch what it does, live.

    python app.py            # http://localhost:7860 (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT respected)

The model is loaded once per process and shared read-only; every browser session gets its own
cache, cancel event and recorded trace (server side, keyed by the session hash: ``components/state.py``).
Generation runs through the library (``agacc.session.GenerationSession``); the UI only draws what it
yields and replays the policy with ``agacc.trace.replay_frames``: it computes no compression itself.
This file holds the handlers (``AgaccApp``), their wiring (``build``) and ``main``; the page's pieces
are in ``components/`` (layout, knobs, figures, token view, text).

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
import json
import logging
import math
import os
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr
import torch

from agacc.compare import measure_quality
from agacc.planner import text_config
from agacc.policy import keep_all_upto, keeps_all
from agacc.presets import PRESETS
from agacc.session import PREFILL_CHUNK, GenerationSession, SessionError
from agacc.trace import Trace, block_history, policy_changes, ratio_sweep, replay_frames
from components import controls, drill, gpu, plots
from components.layout import ASSETS, build_layout, example_text, header_html, plot_value
from components.state import (EMBEDDED_CHOICE, EMBEDDED_LABEL, HUB_CHOICES, Models, Run, Sessions,
                              UserState, freeze_gc, hub_reachable)
from components.text import MIB, compare_md, final_stats, kernel_building, model_line, snippet, stats_md
from components.token_view import css as token_css
from components.token_view import render_token_view

SKIP = gr.skip
log = logging.getLogger("agacc.app")


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


# the memory chart (and the comparison chart) while streaming: at most this often
DRAW_INTERVAL = float(os.environ.get("AGACC_DRAW_INTERVAL", 1.0))
# the heatmaps and the token view change only at a re-evaluation (every N_r tokens): at most this often
MAP_INTERVAL = float(os.environ.get("AGACC_MAP_INTERVAL", 2.0))
# the status line while streaming (cheap for the page: a line of text)
STATS_INTERVAL = 0.25
# updates a second while streaming, at most: each costs the page a few ms even when only the text changed
# (gradio's status bookkeeping for every output), tens of ms on a loaded CPU
UPDATE_INTERVAL = float(os.environ.get("AGACC_UPDATE_INTERVAL", 0.15))
# after the first draw of a run, figures go out one per update and at least this far apart: each is a
# full Plotly draw on the page's one thread (see AgaccApp._stream)
FIGURE_GAP = float(os.environ.get("AGACC_FIGURE_GAP", 0.25))
# how long Stop waits for the run to end (a decode step, or the prefill chunk under way)
STOP_WAIT = 60.0
CONCURRENCY = max(1, _env_int("AGACC_CONCURRENCY", 2))
# Gradio's queue looks for new events every 1 ms (progress every 10 ms) on the server's event loop, even
# when idle; every wake-up takes the GIL from a decode thread in the middle of its torch ops (~1,500
# context switches a second). Polling every 20 ms delays the start of a queued event by at most that.
QUEUE_POLL = float(os.environ.get("AGACC_QUEUE_POLL", 0.02))
# the generation settings besides the knobs (``controls.FIELDS``): the named inputs of generate / rerun,
# with the values a direct call (no browser) leaves out
GEN_DEFAULTS = {"prompt": "", "model": None, "trust_remote_code": False, "preset": "agacc", "max_new_tokens": 64,
                "temperature": 0.0, "seed": 0, "compare": False, "chat_template": True}


def _hash(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "default"


# --- the app ----------------------------------------------------------------------------------

class UserError(Exception):
    """A problem the person at the page can fix: shown as one message (a toast and the status line),
    logged as one line, never a traceback, never gradio's red "Error" badges over the outputs."""

    def __init__(self, message: str, title: str = "Check the settings"):
        super().__init__(message)
        self.message, self.title = message, title


def _esc(text: str) -> str:
    """Text for a Markdown output: no HTML tags from it (what the page shows stays readable over the API)."""
    return str(text).replace("<", "&lt;")


def _label(field: str) -> str:
    """A setting's name as the page shows it."""
    try:
        return controls.knob(field).label.split(":")[0]
    except Exception:
        return field.replace("_", " ")


class AgaccApp:
    """Handlers + the Blocks. ``models`` is shared by all sessions; ``sessions`` holds their state.

    The handlers take their inputs by name, as one dict: ``generate(request, **values)`` with values
    {prompt, model, trust_remote_code, preset, max_new_tokens, temperature, seed, compare, chat_template}
    and the knobs ``controls.FIELDS`` (gradio passes them through ``inputs_kwargs``, which also names the
    API endpoints' parameters); a direct call may leave out any of them (``GEN_DEFAULTS``; a knob left
    out takes the preset's value).

    Every run belongs to the browser session that started it (``components.state.UserState``, keyed
    by gradio's session hash): its cancel event, its trace, replay cache and exports. User errors are
    ``UserError``s: one message, no traceback (``_error``).

    ``preload``: True loads the default model now; "background" on a thread (the server answers at
    once; a Generate that comes first waits for it); False on the first request."""

    def __init__(self, models: Models | None = None, preload: bool | str = True, max_context: int | None = None,
                 draw_interval: float = DRAW_INTERVAL, map_interval: float = MAP_INTERVAL,
                 default_prompt: str | None = None, offer_hub: bool | None = None):
        self.models = models or Models(os.environ.get("AGACC_DEVICE") or None)
        self.sessions = Sessions()
        self.draw_interval = draw_interval
        self.map_interval = map_interval
        default_model = os.environ.get("AGACC_MODEL") or EMBEDDED_CHOICE
        self.default_model = default_model
        self.model_line = ""
        self.n_layers = 64
        self.load_error: str | None = None
        if preload == "background":
            threading.Thread(target=self._preload, name="agacc-preload", daemon=True).start()
        elif preload:
            self._preload(raise_errors=True)
        cuda = torch.cuda.is_available()
        self.max_context = max_context or _env_int("AGACC_MAX_CONTEXT", 32768 if cuda else 4096)
        offer_hub = hub_reachable() if offer_hub is None else offer_hub
        # on CUDA the hub models sized for the GPU (components.gpu), on the CPU a few small ones
        self.model_choices = [EMBEDDED_CHOICE] + ((gpu.gpu_models() if cuda else HUB_CHOICES) if offer_hub else [])
        if default_model not in self.model_choices:
            self.model_choices.append(default_model)
        self.default_prompt = default_prompt if default_prompt is not None else example_text("Document question")

    def _preload(self, raise_errors: bool = False) -> None:
        t0 = time.perf_counter()
        try:
            name, model, _ = self.models.get(self.default_model)
        except ValueError as e:
            self.load_error = str(e)
            if raise_errors:
                raise
            log.warning("could not load the default model: %s", e)
            return
        self.n_layers = text_config(model.config).num_hidden_layers
        self.model_line = model_line(name, model, EMBEDDED_LABEL)
        if time.perf_counter() - t0 > 5:
            log.info("model %s ready after %.0f s", name or EMBEDDED_LABEL, time.perf_counter() - t0)

    # ---- helpers --------------------------------------------------------------------------------
    def _values(self, values: dict) -> dict:
        """A handler's named inputs with the generation settings a direct call left out."""
        return {**GEN_DEFAULTS, "model": self.default_model, **values}

    def _cfg(self, values: dict):
        """The config of ``values["preset"]`` with the knob values of ``values`` applied (UserError)."""
        empty = [f for f in controls.FIELDS if f in values and values[f] is None and not f.startswith("use_")]
        if empty:
            raise UserError(f"the box of {', '.join(_label(f) for f in empty)} is empty: type a number or move "
                            "the slider", title="Empty setting")
        try:
            return controls.config_from_values(values.get("preset") or "agacc", values)
        except ValueError as e:
            raise UserError(str(e).replace("AGACCConfig: ", ""), title="Inconsistent settings") from None

    def _error(self, e: UserError, outputs: list, where=None) -> list:
        """The outputs for a user error: the message in the status line (``where``, default ``ui.stats``)
        and as a toast, every other output left as it is; one log line."""
        log.warning("%s: %s", e.title, e.message)
        try:
            gr.Warning(e.message, title=e.title)
        except Exception:  # outside a request (a direct call): the status line says it
            pass
        where = self.ui.stats if where is None else where
        out = [SKIP()] * len(outputs)
        if where in outputs:
            out[outputs.index(where)] = f"<span class='agacc-error'>{_esc(e.title)}</span>: {_esc(e.message)}"
        return out

    def _check(self, v: dict) -> tuple:
        """Validate the generation settings -> (cfg, max_new_tokens, temperature, seed); UserError."""
        if not str(v["prompt"] or "").strip():
            raise UserError("The prompt is empty: type a prompt or pick an example.", title="Empty prompt")
        for key, what in (("max_new_tokens", "max new tokens"), ("temperature", "temperature")):
            if v[key] is None:
                raise UserError(f"the box of {what} is empty: type a number or move the slider", title="Empty setting")
        cfg = self._cfg(v)
        seed = v["seed"] if v["seed"] is not None else 0
        try:
            seed_f = float(seed)
            if not seed_f.is_integer():
                raise ValueError
            seed = int(seed_f)
        except (TypeError, ValueError, OverflowError):
            raise UserError(f"the seed must be a whole number, got {seed!r}", title="Check the seed") from None
        if not 0 <= seed < 2 ** 63:
            raise UserError(f"the seed must be between 0 and 2^63 - 1, got {seed_f:.3g}", title="Check the seed")
        try:
            max_new, temp = int(v["max_new_tokens"]), float(v["temperature"])
        except (TypeError, ValueError):
            raise UserError("max new tokens and temperature must be numbers", title="Check the settings") from None
        return cfg, max_new, temp, seed

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
        """[importance, tier, bits, memory, token view, note, snippet] for frame k under cfg_now.

        Only the policy of cfg_now can be replayed on the recorded importance: the replay runs with the
        run's own config and cfg_now's replayable fields (a preset switch also changes the block size,
        the recent window or the scoring, which only a re-run can apply: the note says which)."""
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
        replay_cfg = None
        if replayable and tr.history and cfg_now.compress:
            try:
                replay_cfg = run_cfg.with_overrides(**{f: getattr(cfg_now, f) for f in replayable})
            except ValueError as e:
                note.append(f"Cannot replay this combination on the recorded run: {_esc(e)}.")
        if replay_cfg is not None:
            key = json.dumps(replay_cfg.to_dict(), sort_keys=True)
            frames_r = us.replay_cache.get(key)
            if frames_r is None:
                frames_r = replay_frames(tr.history, replay_cfg, tr.geometry)
                us.replay_cache[key] = frames_r
                while len(us.replay_cache) > 8:
                    us.replay_cache.popitem(last=False)
            snap = dict(frames_r[tr.history_for_frame(k)])
            snap["token_importance"] = frame.get("token_importance")
            shown_cfg = replay_cfg
            # the library's bytes: the plan + the tracker and bookkeeping the run recorded
            replayed = [{"step": r["step"], "bytes": r["held_bytes"]} for r in frames_r]
            rec = (frame.get("memory") or {}).get("bytes")
            recorded = f" vs {rec / MIB:.2f} MiB recorded" if rec is not None else ""
            changes = ", ".join(f"{f}={getattr(cfg_now, f)}" for f in replayable)
            note.append(f"**Replayed** with {changes}: tiers, bits and bytes recomputed from the recorded importance "
                        f"(no generation): {snap['held_bytes'] / MIB:.2f} MiB held{recorded} "
                        f"({snap['ratio']:.2f}x vs 16 bits). Press **Re-run + compare** to check the quality.")
        if shown_cfg.compress and keeps_all(shown_cfg, tr.geometry.head_dim):
            upto = keep_all_upto(shown_cfg, tr.geometry.head_dim)
            note.append(f"At a target ratio up to {upto:.2f}x the preset keeps every token (`keep_all`): blocks at 16, "
                        "8 or 4 bits, keys per token, none evicted; b_min, b_max, τ_l and p_max do not apply there.")
        if rerun:
            kept = ", ".join(f"{f}={getattr(run_cfg, f)}" for f in rerun)
            note.append(f"Changed {', '.join(rerun)}: these change the importance itself or the block layout, so the "
                        f"frames keep the run's ({kept}); press **Generate** or **Re-run + compare** to apply them.")
        figs = [plot_value(plots.importance_heatmap(snap, shown_cfg.to_dict())), plot_value(plots.tier_map(snap)),
                plot_value(plots.bits_map(snap)),
                plot_value(plots.memory_chart(tr.steps, replayed, marker_step=None if final else frame["step"]))]
        n_tok = len(tr.tokens) if final else min(len(tr.tokens), frame["seq_len"])
        tv = render_token_view(tr.tokens[:n_tok], tr.n_prompt, snap, layer,
                               caption=("replayed tiers" if replayed else "recorded tiers")
                               + (f", layer {layer}" if layer is not None else ", most common tier over layers"))
        return figs + [tv, "\n\n".join(note), snippet(tr, cfg_now)]

    # ---- handlers -------------------------------------------------------------------------------
    def generate(self, request: gr.Request = None, **values):
        """Stream a generation with the compressed cache; yields every output several times a second.
        ``values``: the generation settings and the knobs by name (see the class)."""
        v = self._values(values)
        us = self.sessions.get(_hash(request))
        cancel = threading.Event()
        try:
            cfg, max_new, temp, seed = self._check(v)
            trust, compare = bool(v["trust_remote_code"]), bool(v["compare"])
            try:
                name, mdl, tok = self.models.get(v["model"], trust)
            except ValueError as e:
                raise UserError(str(e), title="Model not available") from None
            try:
                s = GenerationSession(mdl, tok, v["prompt"], cfg, max_new_tokens=max_new, temperature=temp, seed=seed,
                                      compare=compare, chat_template=bool(v["chat_template"]), cancel=cancel,
                                      max_context=self.max_context, model_name=name or EMBEDDED_LABEL)
            except SessionError as e:
                raise UserError(str(e), title="Cannot generate") from None
        except UserError as e:
            yield self._error(e, self.gen_outputs)
            return
        s.trace.meta.update(model_arg=name, trust_remote_code=trust and name is not None)
        # a new run in this session ends the previous one, and waits until its handler has sent its last
        # update (nothing of it may reach the page after this run's first)
        prev = us.run
        us.stop_running()
        if prev is not None:
            prev.done.wait(5.0)
        run = Run(s)
        with us.lock:
            us.cancel, us.session, us.trace, us.model_choice, us.run = cancel, s, s.trace, v["model"], run
            us.replay_cache.clear()
        try:
            yield from self._stream(us, run, s, cfg, name, mdl, tok, compare)
        finally:
            run.done.set()

    def _stream(self, us: UserState, run: Run, s: GenerationSession, cfg, name, mdl, tok, compare: bool):
        ui = self.ui
        # the value last sent per output, sent again while it holds: gradio diffs an unchanged value to
        # nothing, where a skip makes it rebuild the component (about 1 ms each, per update, on the
        # thread that serves every session)
        live = {ui.output: "", ui.output_full: "", ui.replay_note: "Recording: scrub the frames and tune the "
                "thresholds on them when the run ends.", ui.snippet: snippet(s.trace, cfg),
                ui.stats: stats_md(f"Prefilling {s.n_prompt} prompt tokens", None, None, None,
                                   extra=model_line(name, mdl, EMBEDDED_LABEL))}
        if not compare:
            live[ui.compare_md] = compare_md(None)
            live[ui.compare_plot] = plot_value(plots.compare_chart([], None))

        def update():
            return [live.get(c, SKIP()) for c in self.gen_outputs]

        yield update()
        # What the browser draws costs more than what the server sends: every figure update is a full
        # Plotly draw (react + resize) on the page's one thread, 0.1-0.5 s on a loaded CPU without a GPU. More
        # draws a second than the page can do make it fall behind without bound (the Stop click then waits
        # behind them). So: the text on every update, the status line at most every STATS_INTERVAL, the
        # memory (and comparison) chart every draw_interval, the three maps and the token view when a new
        # snapshot exists and map_interval has passed, and after the first draw at most one figure per
        # update (FIGURE_GAP apart), so no update blocks the page for long.
        last_stats = last_mem = last_map = last_fig = -math.inf  # perf_counter counts from an arbitrary point
        frame, frame_dirty, pending, first = None, False, [], True
        error, last_update = None, -math.inf
        batches = s.stream_batches()  # the decode runs ahead on its own thread while an update is sent
        try:
            for batch in batches:
                ev = batch[-1]
                live[ui.output] = ev.text
                if s.cancel.is_set():
                    continue  # Stopped: Stop paints the page from here on (no "Generating" after its "Stopped")
                for e in batch:
                    if e.frame is not None:
                        frame, frame_dirty = e.frame, True
                now = time.perf_counter()
                if now - last_update < UPDATE_INTERVAL and not ev.done:
                    continue  # the next batch brings this one's text along
                last_update = now
                tr = s.trace  # the decode thread appends to it: draw the steps up to ev's
                steps = tr.steps[:ev.index + 1]
                if now - last_stats >= STATS_INTERVAL:
                    last_stats = now
                    live[ui.stats] = stats_md("Generating", s, ev.memory, s.cache.reevaluations if s.cache else None)
                if now - last_mem >= self.draw_interval:
                    last_mem = now
                    for c in (ui.memory,) + ((ui.compare_plot,) if ev.compare is not None else ()):
                        if c not in pending:
                            pending.append(c)
                if frame_dirty and frame is not None and now - last_map >= self.map_interval:
                    frame_dirty, last_map = False, now
                    map_frame, map_tokens = frame, tr.tokens[:tr.n_prompt + ev.index + 1]
                    pending = [c for c in pending if c not in (ui.importance, ui.tier, ui.bits, ui.token_view)]
                    pending += [ui.importance, ui.tier, ui.bits, ui.token_view]
                if ev.compare is not None:
                    live[ui.output_full] = ev.compare["ref_text"]
                    live[ui.compare_md] = compare_md(s.result()["compare"], tok, tr)
                while pending and (first or now - last_fig >= FIGURE_GAP):
                    c = pending.pop(0)
                    last_fig = now
                    if c is ui.memory:
                        live[c] = plot_value(plots.memory_chart(steps))
                    elif c is ui.compare_plot:
                        live[c] = plot_value(plots.compare_chart(steps, ev.compare["diverged_at"] if ev.compare else None))
                    elif c is ui.importance:
                        live[c] = plot_value(plots.importance_heatmap(map_frame, cfg.to_dict()))
                    elif c is ui.tier:
                        live[c] = plot_value(plots.tier_map(map_frame))
                    elif c is ui.bits:
                        live[c] = plot_value(plots.bits_map(map_frame))
                    elif c is ui.token_view:
                        live[c] = render_token_view(map_tokens, tr.n_prompt, map_frame, None,
                                                    caption="live: most common tier over layers")
                first = False
                yield update()
        except SessionError as e:
            error = UserError(str(e), title="Generation failed")
        except Exception as e:  # a bug: the traceback goes to the server log, one line to the page
            log.exception("generation failed")
            error = UserError(f"{type(e).__name__}: {e} (details in the server log)", title="Internal error")
        finally:
            batches.close()  # stops the decode thread (cancelled request) before the caches go
            s.close()
        final = self._final(us, tok)
        if error is not None:
            msg = self._error(error, self.gen_outputs)
            i = self.gen_outputs.index(ui.stats)
            final[i] = msg[i] + ("\n\n" + final[i] if isinstance(final[i], str) else "")
        yield final
        run.painted = True

    def rerun(self, request: gr.Request = None, **values):
        """Generate again with the current settings and the full-cache comparison on (quality check)."""
        yield from self.generate(request, **{**values, "compare": True})

    def stop(self, request: gr.Request = None):
        """End this session's run (only this session's). The page's Stop also cancels the streaming
        event (gradio ``cancels``); this waits until the run's handler has ended, so its final state is
        the last thing the page receives."""
        us = self.sessions.get(_hash(request))
        run = us.run
        n = len(self.gen_outputs)
        if run is None or run.session is None:
            yield [SKIP()] * n
            return
        s = run.session
        was_running = not s.finished.is_set()
        if not was_running and run.painted:
            yield [SKIP()] * n  # it ended before the click and painted its final state
            return
        t_stop = time.perf_counter()
        us.cancel.set()
        s.cancel.set()
        # the loop ends before its next forward (the session checks Stop before every forward, the
        # full-cache comparison's included); then the session frees its caches (a last frame, a
        # garbage collection: ~1 ms after freeze_gc, 0.3-0.7 s before). The page hears
        # "Stopped" as soon as the loop has ended, the final figures once the caches are gone.
        deadline = time.monotonic() + STOP_WAIT
        while s.stop_reason is None and not s.finished.is_set() and time.monotonic() < deadline:
            s.finished.wait(0.005)
        if s.stop_reason is not None and not s.finished.is_set():
            quick = [SKIP()] * n
            c = s.cache
            quick[self.gen_outputs.index(self.ui.output)] = s.text
            quick[self.gen_outputs.index(self.ui.stats)] = stats_md(
                "Stopped: generation ended, freeing the cache", s, s.last_memory,
                c.reevaluations if c is not None else None)
            yield quick
        if not s.finished.wait(STOP_WAIT):  # inside a long forward: it ends right after it
            out = [SKIP()] * n
            out[self.gen_outputs.index(self.ui.stats)] = (
                f"**Stopping**: the current forward pass finishes first ({s.n_prompt} prompt tokens go in chunks of "
                f"{s.prefill_chunk or s.n_prompt}); the run ends and frees its cache right after it.")
            yield out
            return
        run.done.wait(5.0)  # the streaming handler ended (cancelled by the page, or it painted its own final)
        final = self._final(us, s.tokenizer, state="Stopped")
        log.info("stop: the run ended and freed its caches %.3f s after Stop", time.perf_counter() - t_stop)
        # the status line and the text first, alone: the page shows "Stopped" at once, before the
        # final figures' Plotly draws (the next update) take its thread
        quick = [SKIP()] * n
        for c in (self.ui.output, self.ui.stats):
            quick[self.gen_outputs.index(c)] = final[self.gen_outputs.index(c)]
        yield quick
        yield final

    def view(self, request: gr.Request = None, **values):
        """Show recorded frame ``values["replay"]`` (token view of layer ``values["token_layer"]``); if only
        policy knobs changed, replay them on the recorded importance. ``values``: those two, the preset
        and the knobs by name. Settings that do not form a valid config (an empty box, thresholds out of
        order while a slider moves) leave the figures and say so in the note: no toast."""
        us = self.sessions.get(_hash(request))
        n = len(self.view_outputs)
        if us.trace is None or not us.trace.frames:
            return [SKIP()] * n
        if us.session is not None and us.session.trace is us.trace and us.running():
            return [SKIP()] * (n - 2) + ["Generating: tuning applies to the recorded run when it ends.", SKIP()]
        try:
            cfg = self._cfg(values)
        except UserError as e:
            return [SKIP()] * (n - 2) + [f"<span class='agacc-error'>{_esc(e.title)}</span>: "
                                         f"{_esc(e.message)} (the figures show the last valid setting)", SKIP()]
        return self._view(us, int(values.get("replay") or 0), cfg, values.get("token_layer"))

    def order_thresholds(self, moved: str, *values):
        """A threshold slider moved by the user: push the other two so that tau_h > tau_l > tau_e holds."""
        vals = dict(zip(controls.THRESHOLDS, values))
        new = controls.order_thresholds(moved, vals)
        return [gr.update(value=new[f]) if f in new else SKIP() for f in controls.THRESHOLDS if f != moved]

    def apply_preset(self, preset):
        try:
            v = controls.preset_values(preset)
        except ValueError as e:
            log.warning("preset: %s", e)
            return [SKIP()] * len(controls.FIELDS)
        return controls.values_list(v)

    def page_load(self, request: gr.Request = None):
        """The header as it is now (the model may have loaded and the CPU kernel built since the page was
        made), the token-view layer slider's range, and the header's timer: it ticks (this handler again,
        once a second) while the model loads or the CPU kernel builds, and stops once both are settled."""
        line, settled = self.model_line, True
        try:
            if self.models.loaded(self.default_model):
                name, model, _ = self.models.get(self.default_model)
                line = self.model_line = model_line(name, model, EMBEDDED_LABEL)
                self.n_layers = text_config(model.config).num_hidden_layers
                settled = not kernel_building(model.device)
            elif self.load_error:
                line = f"<span class='agacc-error'>The default model did not load</span>: {_esc(self.load_error)}"
            else:
                line = "Loading the model (a first start converts it and builds the CPU kernels: a few minutes)…"
                settled = False
        except ValueError:
            pass
        return (header_html(line, self._gpu_line(request)), gr.update(maximum=self.n_layers - 1),
                gr.Timer(active=not settled))

    def _gpu_line(self, request: gr.Request = None) -> str:
        """GPU memory in use and peak beside this session's KV-cache bytes (CUDA only, else "")."""
        us = self.sessions.get(_hash(request))
        mem = (us.trace.meta.get("memory") or {}) if us.trace is not None else {}
        return gpu.gpu_line(mem.get("bytes"))

    def header(self, request: gr.Request = None):
        """The header with the GPU memory now (after a run; CUDA only)."""
        if not torch.cuda.is_available():
            return SKIP()
        return header_html(self.model_line, self._gpu_line(request))

    # ---- block drill-down, quality vs memory ------------------------------------------------------
    def block(self, pick: str | None = None, request: gr.Request = None):
        """The drill-down panel of block "layer, block" of this session's run: its tokens, importance over
        the run, tier history and bytes now, all from the recorded frames (``agacc.trace.block_history``)."""
        us = self.sessions.get(_hash(request))
        outputs = [self.ui.block_panel, self.ui.block_info, self.ui.block_plot]
        try:
            tr = us.trace
            if tr is None or not tr.frames:
                raise UserError("Generate (or import a trace) first: the drill-down shows a block of a recorded run.",
                                title="No run")
            try:
                layer, blk = drill.parse_pick(pick)
                h = block_history(tr, layer, blk)
            except ValueError as e:
                raise UserError(str(e), title="Pick a block") from None
        except UserError as e:
            out = self._error(e, outputs, where=self.ui.block_info)
            out[0] = gr.update(visible=True)
            return out
        return gr.update(visible=True), drill.block_panel_html(h), plot_value(drill.block_importance_chart(h))

    def _curve(self, us: UserState):
        """The quality-vs-memory figure of this session's run (the sweep cached per trace)."""
        tr = us.trace
        if tr is None or not tr.frames:
            return plot_value(drill.quality_curve(None))
        if us.running():
            return SKIP()
        if not any(int(h.get("n_ready", 0)) for h in tr.history):
            return plot_value(drill.quality_curve(None, message="nothing to sweep: no block of this run left the recent "
                                                  "window (a longer prompt has blocks to tier)"))
        curve = us.curve  # read once: a cleanup clears it from another thread (state.py)
        if curve is None or curve[0] is not tr:
            try:
                sweep = ratio_sweep(tr.history, tr.config, tr.geometry)
            except ValueError as e:
                return plot_value(drill.quality_curve(None, message=_esc(e)))
            curve = us.curve = (tr, sweep)
        measured = []
        cmp, mem = tr.compare, tr.meta.get("memory") or {}
        if cmp and cmp.get("mean_kl") is not None and mem.get("bytes"):
            measured.append({"ratio": mem["bytes_fp16"] / mem["bytes"], "kl": cmp["mean_kl"], "top1": cmp["agreement"],
                             "label": f"Re-run + compare ({tr.config.name}, lockstep)"})
        measured += us.measured_points()
        run_ratio = mem["bytes_fp16"] / mem["bytes"] if mem.get("bytes") else None
        return plot_value(drill.quality_curve(curve[1], measured, run_ratio))

    def after_run(self, request: gr.Request = None):
        """After a run (or a stop, an import): the quality-vs-memory curve and the header's GPU memory."""
        us = self.sessions.get(_hash(request))
        return self._curve(us), self.header(request)

    def measure(self, request: gr.Request = None, **values):
        """Measure quality: the run's output teacher-forced through a full cache and through a cache of the
        current setting (preset + knobs): KL(full || setting) and top-1 agreement (``agacc.compare.measure_quality``:
        the library's ``chunked_prefill``, ``teacher_force`` and ``lm_stats``)."""
        us = self.sessions.get(_hash(request))
        outputs = [self.ui.measure_md, self.ui.quality]
        try:
            tr = us.trace
            if tr is None or not tr.frames:
                raise UserError("Generate (or import a trace) first: Measure quality checks a run's output.",
                                title="No run")
            if us.running():
                raise UserError("A run is going on: measure when it ends (or press Stop).", title="Still generating")
            cfg = self._cfg(values)
            ids = list(tr.token_ids)
            if len(ids) <= tr.n_prompt:
                raise UserError("The run generated no token to measure.", title="Nothing to measure")
            try:
                name, mdl, _ = self.models.get(tr.meta.get("model_arg"), bool(tr.meta.get("trust_remote_code")))
            except ValueError as e:
                raise UserError(str(e), title="Model not available") from None
            label = f"{cfg.name}" + (f"@{cfg.target_ratio:g}" if cfg.target_ratio else "")
            try:
                m = measure_quality(mdl, ids[:tr.n_prompt], ids[tr.n_prompt:], cfg, PREFILL_CHUNK, label=label)
            except ValueError as e:
                raise UserError(str(e), title="Cannot measure") from None
        except UserError as e:
            return self._error(e, outputs, where=self.ui.measure_md)
        us.measured_points().append(m)
        log.info("measured %s on %d tokens: KL %.5f, top-1 %.4f, %.2fx", label, m["tokens"], m["kl"], m["top1"],
                 m["ratio"])
        return drill.measured_md(m), self._curve(us)

    def export(self, request: gr.Request = None):
        us = self.sessions.get(_hash(request))
        tr = us.trace
        try:
            if tr is None:
                raise UserError("Nothing to export yet: generate (or import a trace) first.", title="No run")
            if us.running():
                raise UserError("A run is going on: export when it ends (or press Stop).", title="Still generating")
        except UserError as e:
            return self._error(e, [self.ui.files, self.ui.snippet, self.ui.stats])
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
        return [str(trace_path), str(fig_path), str(py_path)], view[6] if view else SKIP(), SKIP()

    def import_trace(self, path, request: gr.Request = None):
        n = len(self.gen_outputs) + 2 + len(controls.FIELDS)
        if not path:
            return [SKIP()] * n
        us = self.sessions.get(_hash(request))
        outputs = self.gen_outputs + [None] * (n - len(self.gen_outputs))
        try:
            try:
                tr = Trace.load(path)
            except (ValueError, OSError, KeyError, TypeError) as e:
                raise UserError(f"Cannot import this file: {e}", title="Import failed") from None
            if not tr.frames:
                raise UserError("This trace has no frames to show.", title="Import failed")
        except UserError as e:
            return self._error(e, outputs)
        prev = us.run
        us.stop_running()
        if prev is not None:
            prev.done.wait(5.0)
        with us.lock:
            us.session, us.trace, us.run = None, tr, None
            us.replay_cache.clear()
        cfg = tr.config
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
            # the handlers' named inputs (``inputs_kwargs``: one keyword argument each, the API parameters' names)
            gen_inputs = {"prompt": ui.prompt, "model": ui.model, "trust_remote_code": ui.trust, "preset": ui.preset,
                          "max_new_tokens": ui.max_new, "temperature": ui.temperature, "seed": ui.seed,
                          "compare": ui.compare, "chat_template": ui.chat, **ui.knobs}
            view_inputs = {"replay": ui.replay, "token_layer": ui.token_layer, "preset": ui.preset, **ui.knobs}
            self.gen_outputs = [ui.output, ui.stats, ui.importance, ui.tier, ui.bits, ui.memory, ui.token_view,
                                ui.output_full, ui.compare_md, ui.compare_plot, ui.replay, ui.replay_note, ui.snippet]
            self.view_outputs = [ui.importance, ui.tier, ui.bits, ui.memory, ui.token_view, ui.replay_note, ui.snippet]
            gen_ev = ui.generate.click(self.generate, inputs_kwargs=gen_inputs, outputs=self.gen_outputs,
                                       api_name="generate", concurrency_id="generate", concurrency_limit=CONCURRENCY,
                                       show_progress="hidden")  # the status line says it (a spinner per output costs the page)
            rerun_ev = ui.rerun.click(self.rerun, inputs_kwargs=gen_inputs, outputs=self.gen_outputs, api_name="rerun",
                                      concurrency_id="generate", concurrency_limit=CONCURRENCY, show_progress="hidden")
            stop_ev = ui.stop.click(self.stop, None, self.gen_outputs, api_name="stop", cancels=[gen_ev, rerun_ev],
                                    concurrency_limit=None, show_progress="hidden")
            # the end of a run: the quality-vs-memory curve and the header's GPU memory
            for ev in (gen_ev, rerun_ev, stop_ev):
                ev.then(self.after_run, None, [ui.quality, ui.header], api_visibility="private", show_progress="hidden")
            block_out = [ui.block_panel, ui.block_info, ui.block_plot]
            ui.block_show.click(self.block, ui.block_pick, block_out, api_name="block", show_progress="hidden",
                                concurrency_limit=None, trigger_mode="always_last")
            ui.block_pick.submit(self.block, ui.block_pick, block_out, api_visibility="private", show_progress="hidden",
                                 concurrency_limit=None, trigger_mode="always_last")
            ui.measure.click(self.measure, inputs_kwargs={"preset": ui.preset, **ui.knobs},
                             outputs=[ui.measure_md, ui.quality], api_name="measure", concurrency_id="generate",
                             concurrency_limit=CONCURRENCY)
            gr.on([k.change for k in knobs] + [ui.replay.change, ui.token_layer.change], self.view,
                  inputs_kwargs=view_inputs, outputs=self.view_outputs, api_name="view",
                  trigger_mode="always_last", show_progress="hidden", concurrency_limit=None)
            ui.preset.input(self.apply_preset, ui.preset, knobs, api_name="preset", show_progress="hidden")
            for label, btn in ui.examples.items():
                btn.click(functools.partial(example_text, label), None, ui.prompt, api_visibility="private",
                          show_progress="hidden")
            # a threshold moved by hand pushes the other two out of its way (tau_h > tau_l > tau_e always
            # holds; their .change then replays once, trigger_mode always_last)
            ths = [ui.knobs[f] for f in controls.THRESHOLDS]
            for f in controls.THRESHOLDS:
                ui.knobs[f].input(functools.partial(self.order_thresholds, f), ths,
                                  [ui.knobs[g] for g in controls.THRESHOLDS if g != f], api_visibility="private",
                                  show_progress="hidden", concurrency_limit=None, trigger_mode="always_last")
            ui.export.click(self.export, None, [ui.files, ui.snippet, ui.stats], api_name="export")
            header_timer = gr.Timer(1.0, active=False)  # page_load starts it while the model loads
            demo.load(self.page_load, None, [ui.header, ui.token_layer, header_timer], api_visibility="private",
                      show_progress="hidden")
            header_timer.tick(self.page_load, None, [ui.header, ui.token_layer, header_timer], api_visibility="private",
                              show_progress="hidden", concurrency_limit=None)
            ui.import_file.upload(self.import_trace, ui.import_file,
                                  self.gen_outputs + [ui.preset, ui.token_layer] + knobs, api_name="import_trace"
                                  ).then(self.after_run, None, [ui.quality, ui.header], api_visibility="private",
                                         show_progress="hidden")
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
            "head": "<meta name='description' content='AGACC: attention-guided adaptive KV-cache compression, live'>"
                    + drill.CLICK_JS}


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
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    # the server answers at once; the model loads (and the CPU kernel builds) on threads meanwhile
    app = AgaccApp(preload="background" if os.environ.get("AGACC_PRELOAD", "1") != "0" else False)
    demo = app.build()
    freeze_gc()  # the imports and the page: out of the garbage collector's way (the model: when it loads)
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                server_port=int(os.environ.get("GRADIO_SERVER_PORT", 7860)), show_error=True, **launch_kwargs())


if __name__ == "__main__":
    main()
