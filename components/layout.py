"""The page: controls on the left, the live view on the right. Creates components only (the
wiring lives in app.py). Every element a test or a user needs has a stable ``elem_id``."""
from __future__ import annotations

import base64
from pathlib import Path
from types import SimpleNamespace

from components import controls, drill, plots
from components.text import COMPARE_HINT
from components.token_view import render_token_view

QUALITY_HINT = ("The lines replay this run's policy at target ratios 1.5-12x on its recorded importance (no "
                "generation). <b>Measure quality</b> checks the current setting for real: KL and top-1 agreement "
                "against the full cache on this run's text; <b>Re-run + compare</b> adds its lockstep numbers.")

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


def header_html(model_line: str, gpu_line: str = "") -> str:
    """The page's header; ``gpu_line``: GPU memory in use and peak (``components.gpu.gpu_line``, CUDA only)."""
    gpu = f"<div class='sub gpu'>{gpu_line}</div>" if gpu_line else ""
    return (f"<div id='header'><img src='{logo_data_uri()}' alt='AGACC logo'/>"
            "<div><h1>AGACC: attention-guided adaptive KV-cache compression</h1>"
            "<div class='sub'>Watch the cache compress itself while the model writes: importance per layer and block, "
            f"tiers, bits and bytes, live. {model_line}</div>{gpu}</div></div>")


# which point the default is (docs/tuning.md rounds 7-12: held-out texts, 2,048 tokens, token by token)
PRESET_INFO = ("agacc, the default: thresholds that held 3.9-4.6x at +0.94% perplexity on average on text they "
               "were not tuned on; tick *use a target memory ratio* for a fixed budget")

# the words the page uses, for the intro and its tooltips (one place)
GLOSSARY = {
    "KV cache": "The keys and values of every token seen so far, per layer: what attention reads at each new "
                "token. It grows with the context; AGACC stores most of it in fewer bits.",
    "importance": "How much attention a block of tokens receives, averaged over recent steps (an EMA), in units "
                  "of the layer's mean: 1 = average, 100 = a block the model keeps reading.",
    "block": "B consecutive tokens (16 by default) that share a tier: the unit the cache compresses.",
    "tier": "How a block is stored: full (16-bit), int8/int4/int3/int2 (quantised), pruned (small values "
            "dropped), evicted (gone; with markers on, a marker keeps their average). hot = the recent window, not yet scored.",
    "τ_h": "Above τ_h a block stays at full precision.",
    "τ_l": "Between τ_l and τ_h a block is quantised (more bits the closer it is to τ_h); below τ_l pruned.",
    "τ_e": "Below τ_e a block is evicted.",
    "re-evaluation": "Every N_r generated tokens the cache scores its blocks again and moves each to its tier "
                     "(a block only loses precision, unless a host copy is kept).",
    "ratio": "Bytes a 16-bit cache would hold / bytes held: 4x = a quarter of the memory.",
}


def _term(word: str, shown: str | None = None) -> str:
    import html

    return f"<abbr class='gloss' title='{html.escape(GLOSSARY[word], quote=True)}'>{html.escape(shown or word)}</abbr>"


def intro_html() -> str:
    """The short introduction for a class: what the cache is, what the plots show, how to read them,
    a guided example; the terms carry their glossary entry as a tooltip."""
    t = _term
    return f"""<details id='intro-box'><summary><b>What am I looking at?</b> A two-minute introduction
(hover the dotted words for their meaning)</summary>
<div class='intro-body'>
<p>While a language model writes, it keeps the {t('KV cache')} of every token it has read. AGACC measures
each {t('block')}'s {t('importance')} from the attention the model pays to it, and stores each block in a
{t('tier')}: the important ones at full precision, the others in fewer bits, the least useful ones evicted.
At every {t('re-evaluation')} the tiers are decided again.</p>
<ul>
<li><b>Importance</b> (layers × blocks): brighter = read more. The colour bar marks the thresholds
{t('τ_h')}, {t('τ_l')}, {t('τ_e')}.</li>
<li><b>Tier</b>: the storage each block got, colour by tier (legend under the plot). <b>Bits</b>: the same as
bits per value (16 = full, 0 = evicted).</li>
<li><b>KV-cache memory</b>: bytes held (blue) against a 16-bit cache (grey); the green gap is what was saved
(the {t('ratio')}).</li>
<li><b>Tokens by tier</b>: the prompt and the output, each token coloured by its block's tier; hover a token
for its importance and bits; ⟪n evicted⟫ marks evicted text.</li>
<li><b>Click a block</b> in any of the three maps (or type <i>layer, block</i> under them): its tokens, its
importance at every {t('re-evaluation')}, the tiers it went through and the bytes it holds now.</li>
<li><b>Quality vs memory</b>: this run's policy replayed at target ratios 1.5-12x: how much of the attention
lands on 16-bit, quantised and evicted blocks at each {t('ratio')}; <i>Measure quality</i> checks a setting for
real (KL and top-1 agreement against the full cache on the run's text).</li>
</ul>
<p><b>Try it in front of a class:</b> press <i>Passkey retrieval</i>, tick <i>compare with the full cache</i>,
Generate. The block holding the pass key stays at 16 bits (blue in the tier map, bold in the token view)
while most of the filler text around it is quantised or evicted; the answer still matches the full cache's.
Then drag τ_l or τ_e after the run: the maps replay the policy at once, without generating.</p>
</div></details>"""


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
    ui.intro = gr.HTML(intro_html(), elem_id="intro")
    with gr.Row(equal_height=False, elem_id="main-row"):
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
                                        info=PRESET_INFO, elem_id="preset")
                with gr.Row():
                    ui.max_new = controls.tolerant_slider(minimum=1, maximum=512, value=max_new_tokens, step=1,
                                                          label="max new tokens", elem_id="max-new-tokens")
                    ui.temperature = controls.tolerant_slider(minimum=0.0, maximum=2.0, value=0.0, step=0.05,
                                                              label="temperature (0 = greedy)", elem_id="temperature")
                with gr.Row():
                    ui.seed = controls.tolerant_number(value=0, precision=0, label="seed", elem_id="seed", min_width=80)
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
            with gr.Row(elem_classes=["plot-row"]):
                ui.importance = gr.Plot(value=plot_value(plots.importance_heatmap(None)), show_label=False,
                                        elem_id="importance-heatmap")
                ui.tier = gr.Plot(value=plot_value(plots.tier_map(None)), show_label=False, elem_id="tier-map")
            with gr.Row(elem_classes=["plot-row"]):
                ui.bits = gr.Plot(value=plot_value(plots.bits_map(None)), show_label=False, elem_id="bits-map")
                ui.memory = gr.Plot(value=plot_value(plots.memory_chart(None)), show_label=False, elem_id="memory-chart")
            with gr.Row():
                ui.replay = gr.Slider(0, 1, value=0, step=1, label="Replay: recorded frame (one per re-evaluation)",
                                      elem_id="replay", interactive=True, scale=3)
                ui.token_layer = gr.Slider(-1, n_layers - 1, value=-1, step=1,
                                           label="Token view layer (-1 = most common tier over layers)",
                                           elem_id="token-layer", scale=2)
            ui.replay_note = gr.Markdown("", elem_id="replay-note")
            with gr.Row(equal_height=True, elem_id="block-pick-row"):
                ui.block_pick = gr.Textbox(label="Block drill-down: click a cell in a map, or type layer, block and "
                                                 "press Enter", placeholder="e.g. 3, 12", lines=1, max_lines=1,
                                           elem_id="block-pick", scale=4)
                ui.block_show = gr.Button("Show block", size="sm", elem_id="block-show", scale=1, min_width=90)
            with gr.Column(visible=False, elem_id="block-panel") as ui.block_panel:
                ui.block_info = gr.HTML("", elem_id="block-info")
                ui.block_plot = gr.Plot(value=plot_value(drill.block_importance_chart(None)), show_label=False,
                                        elem_id="block-importance")
            ui.token_view = gr.HTML(render_token_view([], 0, None), elem_id="token-view", label="Tokens by tier")
            with gr.Accordion("Quality vs memory", open=True, elem_id="quality-panel"):
                ui.quality = gr.Plot(value=plot_value(drill.quality_curve(None)), show_label=False,
                                     elem_id="quality-curve")
                with gr.Row():
                    ui.measure = gr.Button("Measure quality (teacher-force the output through the full cache and "
                                           "this setting)", size="sm", elem_id="measure-quality")
                ui.measure_md = gr.HTML(f"<div class='measure'>{QUALITY_HINT}</div>", elem_id="measure-result")
            with gr.Accordion("Full cache vs compressed", open=True, elem_id="compare-panel"):
                with gr.Row():
                    ui.output_full = gr.Textbox(label="Output (full cache)", lines=4, max_lines=10, interactive=False,
                                                elem_id="output-full")
                    ui.compare_md = gr.Markdown(COMPARE_HINT, elem_id="compare-stats")
                ui.compare_plot = gr.Plot(value=plot_value(plots.compare_chart(None)), show_label=False,
                                          elem_id="compare-chart")
    return ui
