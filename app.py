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
import math
import os
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr
import torch

from agacc.planner import text_config
from agacc.presets import PRESETS
from agacc.session import GenerationSession, SessionError
from agacc.trace import Trace, policy_changes, replay_frames
from components import controls, plots
from components.layout import ASSETS, build_layout, example_text, plot_value
from components.state import EMBEDDED_CHOICE, EMBEDDED_LABEL, HUB_CHOICES, Models, Sessions, UserState, hub_reachable
from components.text import MIB, compare_md, final_stats, model_line, snippet, stats_md
from components.token_view import css as token_css
from components.token_view import render_token_view

SKIP = gr.skip


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


DRAW_INTERVAL = float(os.environ.get("AGACC_DRAW_INTERVAL", 0.3))
# the heatmaps and the token view change only at a re-evaluation (every N_r tokens): at most this often
MAP_INTERVAL = float(os.environ.get("AGACC_MAP_INTERVAL", 1.0))
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

class AgaccApp:
    """Handlers + the Blocks. ``models`` is shared by all sessions; ``sessions`` holds their state.

    The handlers take their inputs by name, as one dict: ``generate(request, **values)`` with values
    {prompt, model, trust_remote_code, preset, max_new_tokens, temperature, seed, compare, chat_template}
    and the knobs ``controls.FIELDS`` (gradio passes them through ``inputs_kwargs``, which also names the
    API endpoints' parameters); a direct call may leave out any of them (``GEN_DEFAULTS``; a knob left
    out takes the preset's value)."""

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
            self.model_line = model_line(name, model, EMBEDDED_LABEL)
            self.n_layers = text_config(model.config).num_hidden_layers
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
    def _values(self, values: dict) -> dict:
        """A handler's named inputs with the generation settings a direct call left out."""
        return {**GEN_DEFAULTS, "model": self.default_model, **values}

    def _cfg(self, values: dict):
        """The config of ``values["preset"]`` with the knob values of ``values`` applied."""
        try:
            return controls.config_from_values(values.get("preset") or "agacc", values)
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
            snap = dict(frames_r[tr.history_for_frame(k)])
            snap["token_importance"] = frame.get("token_importance")
            shown_cfg = cfg_now
            # the library's bytes: the plan + the tracker and bookkeeping the run recorded
            replayed = [{"step": r["step"], "bytes": r["held_bytes"]} for r in frames_r]
            rec = (frame.get("memory") or {}).get("bytes")
            recorded = f" vs {rec / MIB:.2f} MiB recorded" if rec is not None else ""
            changes = ", ".join(f"{f}={getattr(cfg_now, f)}" for f in replayable)
            note.append(f"**Replayed** with {changes}: tiers, bits and bytes recomputed from the recorded importance "
                        f"(no generation): {snap['held_bytes'] / MIB:.2f} MiB held{recorded} "
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
        return figs + [tv, "\n\n".join(note), snippet(tr, cfg_now)]

    # ---- handlers -------------------------------------------------------------------------------
    def generate(self, request: gr.Request = None, **values):
        """Stream a generation with the compressed cache; yields every output several times a second.
        ``values``: the generation settings and the knobs by name (see the class)."""
        v = self._values(values)
        us = self.sessions.get(_hash(request))
        prompt = v["prompt"]
        if not str(prompt or "").strip():
            raise gr.Error("The prompt is empty: type a prompt or pick an example.", title="Empty prompt")
        cfg = self._cfg(v)
        try:
            seed = int(v["seed"] if v["seed"] is not None else 0)
        except (TypeError, ValueError):
            raise gr.Error(f"seed must be an integer, got {v['seed']!r}")
        trust, compare = bool(v["trust_remote_code"]), bool(v["compare"])
        us.stop_running()  # a new run in this session ends the previous one
        try:
            name, mdl, tok = self.models.get(v["model"], trust)
        except ValueError as e:
            raise gr.Error(str(e), title="Model not available")
        cancel = threading.Event()
        try:
            s = GenerationSession(mdl, tok, prompt, cfg, max_new_tokens=int(v["max_new_tokens"]),
                                  temperature=float(v["temperature"]), seed=seed, compare=compare,
                                  chat_template=bool(v["chat_template"]), cancel=cancel, max_context=self.max_context,
                                  model_name=name or EMBEDDED_LABEL)
        except SessionError as e:
            raise gr.Error(str(e), title="Cannot generate")
        s.trace.meta.update(model_arg=name, trust_remote_code=trust and name is not None)
        with us.lock:
            us.cancel, us.session, us.trace, us.model_choice = cancel, s, s.trace, v["model"]
            us.replay_cache.clear()
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
        # the first token draws at once (perf_counter counts from an arbitrary point: the boot on Linux)
        last_draw, last_map, frame, frame_dirty = -math.inf, -math.inf, None, False
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

    def rerun(self, request: gr.Request = None, **values):
        """Generate again with the current settings and the full-cache comparison on (quality check)."""
        yield from self.generate(request, **{**values, "compare": True})

    def stop(self, request: gr.Request = None):
        us = self.sessions.get(_hash(request))
        s = us.session
        if s is None or s.finished.is_set():
            return [SKIP()] * len(self.gen_outputs)
        if not us.stop_running(timeout=15.0):  # inside a long forward (a prefill): it ends right after it
            out = [SKIP()] * len(self.gen_outputs)
            out[self.gen_outputs.index(self.ui.stats)] = (
                f"**Stopping**: the current forward pass ({s.n_prompt} prompt tokens) finishes first; the run "
                "ends and frees its cache right after it.")
            return out
        return self._final(us, s.tokenizer, state="Stopped")

    def view(self, request: gr.Request = None, **values):
        """Show recorded frame ``values["replay"]`` (token view of layer ``values["token_layer"]``); if only
        policy knobs changed, replay them on the recorded importance. ``values``: those two, the preset
        and the knobs by name."""
        us = self.sessions.get(_hash(request))
        n = len(self.view_outputs)
        if us.trace is None or not us.trace.frames:
            return [SKIP()] * n
        if us.session is not None and us.session.trace is us.trace and us.running():
            return [SKIP()] * (n - 2) + ["Generating: tuning applies to the recorded run when it ends.", SKIP()]
        cfg = self._cfg(values)
        return self._view(us, int(values.get("replay") or 0), cfg, values.get("token_layer"))

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
                                       show_progress="minimal")
            rerun_ev = ui.rerun.click(self.rerun, inputs_kwargs=gen_inputs, outputs=self.gen_outputs, api_name="rerun",
                                      concurrency_id="generate", concurrency_limit=CONCURRENCY, show_progress="minimal")
            ui.stop.click(self.stop, None, self.gen_outputs, api_name="stop", cancels=[gen_ev, rerun_ev],
                          concurrency_limit=None, show_progress="hidden")
            gr.on([k.change for k in knobs] + [ui.replay.change, ui.token_layer.change], self.view,
                  inputs_kwargs=view_inputs, outputs=self.view_outputs, api_name="view",
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
