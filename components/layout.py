"""The page: controls on the left, the live view on the right. Creates components only (the
wiring lives in app.py). Every element a test or a user needs has a stable ``elem_id``."""
from __future__ import annotations

import base64
from pathlib import Path
from types import SimpleNamespace

from components import controls, plots
from components.text import COMPARE_HINT
from components.token_view import render_token_view

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EXAMPLES = {  # button label -> file in assets/examples
    "Passkey retrieval": "passkey.txt",
    "Document question": "document.txt",
    "Story": "story.txt",
}


def example_text(label: str) -> str:
    return (ASSETS / "examples" / EXAMPLES[label]).read_text()


def logo_data_uri() -> str:
    return "data:image/svg+xml;base64," + base64.b64encode((ASSETS / "logo.svg").read_bytes()).decode()


def header_html(model_line: str) -> str:
    return (f"<div id='header'><img src='{logo_data_uri()}' alt='AGACC logo'/>"
            "<div><h1>AGACC: attention-guided adaptive KV-cache compression</h1>"
            "<div class='sub'>Watch the cache compress itself while the model writes: importance per layer and block, "
            f"tiers, bits and bytes, live. {model_line}</div></div></div>")


def plot_value(spec: dict):
    """A figure spec as gr.Plot's value without building a plotly Figure (fast path)."""
    from gradio.components.plot import PlotData

    return PlotData(type="plotly", plot=plots.to_json(spec))


def build_layout(model_choices: list[str], default_model: str, model_line: str, default_prompt: str,
                 default_preset: str = "agacc", max_new_tokens: int = 64, n_layers: int = 30) -> SimpleNamespace:
    """Create every component inside the current ``gr.Blocks`` context; returns them by name."""
    import gradio as gr

    ui = SimpleNamespace()
    ui.header = gr.HTML(header_html(model_line), elem_id="header-box")
    with gr.Row(equal_height=False):
        with gr.Column(scale=4, min_width=340, elem_id="controls"):
            ui.prompt = gr.Textbox(value=default_prompt, label="Prompt", lines=7, max_lines=14, elem_id="prompt",
                                   placeholder="Type a prompt or pick an example")
            with gr.Row():
                ui.examples = {label: gr.Button(label, size="sm", elem_id=f"ex-{EXAMPLES[label].split('.')[0]}")
                               for label in EXAMPLES}
            with gr.Row():
                ui.generate = gr.Button("Generate", variant="primary", elem_id="generate")
                ui.stop = gr.Button("Stop", variant="stop", elem_id="stop")
                ui.rerun = gr.Button("Re-run + compare", variant="secondary", elem_id="rerun")
            with gr.Accordion("Model and generation", open=True):
                ui.model = gr.Dropdown(choices=model_choices, value=default_model, allow_custom_value=True,
                                       label="Model (embedded default, or a hub id / local path)", elem_id="model")
                ui.trust = gr.Checkbox(value=False, label="allow trust_remote_code (runs code from the model repo)",
                                       elem_id="trust-remote-code")
                ui.preset = gr.Dropdown(choices=controls.preset_names(), value=default_preset, label="Method preset",
                                        elem_id="preset")
                with gr.Row():
                    ui.max_new = gr.Slider(1, 512, value=max_new_tokens, step=1, label="max new tokens",
                                           elem_id="max-new-tokens")
                    ui.temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0 = greedy)",
                                               elem_id="temperature")
                with gr.Row():
                    ui.seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed", min_width=80)
                    ui.compare = gr.Checkbox(value=False, label="compare with the full cache (lockstep)",
                                             elem_id="compare")
                    ui.chat = gr.Checkbox(value=True, label="chat template", elem_id="chat-template")
            ui.knobs = controls.build_knobs(default_preset)
            with gr.Accordion("Export / import", open=False):
                with gr.Row():
                    ui.export = gr.Button("Export run (trace, figures, script)", elem_id="export")
                ui.files = gr.File(label="Exported files", file_count="multiple", interactive=False,
                                   elem_id="export-files")
                ui.import_file = gr.File(label="Import a trace (.json)", file_types=[".json"], type="filepath",
                                         elem_id="import-trace")
                ui.snippet = gr.Code(value="", language="python", label="Reproduce with the library",
                                     elem_id="snippet", lines=8)
        with gr.Column(scale=8, elem_id="live"):
            ui.stats = gr.Markdown("Ready. Pick an example or type a prompt, then **Generate**.", elem_id="stats")
            ui.output = gr.Textbox(label="Output (compressed cache)", lines=5, max_lines=12, interactive=False,
                                   elem_id="output", autoscroll=True)
            with gr.Row():
                ui.importance = gr.Plot(value=plot_value(plots.importance_heatmap(None)), show_label=False,
                                        elem_id="importance-heatmap")
                ui.tier = gr.Plot(value=plot_value(plots.tier_map(None)), show_label=False, elem_id="tier-map")
            with gr.Row():
                ui.bits = gr.Plot(value=plot_value(plots.bits_map(None)), show_label=False, elem_id="bits-map")
                ui.memory = gr.Plot(value=plot_value(plots.memory_chart(None)), show_label=False, elem_id="memory-chart")
            with gr.Row():
                ui.replay = gr.Slider(0, 1, value=0, step=1, label="Replay: recorded frame (one per re-evaluation)",
                                      elem_id="replay", interactive=True, scale=3)
                ui.token_layer = gr.Slider(-1, n_layers - 1, value=-1, step=1,
                                           label="Token view layer (-1 = most common tier over layers)",
                                           elem_id="token-layer", scale=2)
            ui.replay_note = gr.Markdown("", elem_id="replay-note")
            ui.token_view = gr.HTML(render_token_view([], 0, None), elem_id="token-view", label="Tokens by tier")
            with gr.Accordion("Full cache vs compressed", open=True, elem_id="compare-panel"):
                with gr.Row():
                    ui.output_full = gr.Textbox(label="Output (full cache)", lines=4, max_lines=10, interactive=False,
                                                elem_id="output-full")
                    ui.compare_md = gr.Markdown(COMPARE_HINT, elem_id="compare-stats")
                ui.compare_plot = gr.Plot(value=plot_value(plots.compare_chart(None)), show_label=False,
                                          elem_id="compare-chart")
    return ui
