"""Sliders and number boxes that take a cleared box or a number typed out of range without gradio's
"Could not preprocess input component ..." error (a traceback in the server log and a red badge on
the page): an empty box reaches the handler as None (the handlers say which setting is empty), a
number out of range is clamped to the range. Same frontend as gr.Slider / gr.Number.

Subclasses, not a patched instance: gradio rebuilds a component from its class whenever a handler
sends it an update (``gr.update`` / ``gr.skip``), which would drop an instance's patch. (gradio writes
``tolerant.pyi`` beside this file for type checkers, as for any component class.)"""
from __future__ import annotations

import gradio as gr


def _tolerant(self, payload):
    if payload is None or payload == "":
        return None
    try:
        x = float(payload)
    except (TypeError, ValueError):
        return None
    if x != x:  # NaN
        return None
    if self.minimum is not None:
        x = max(x, self.minimum)
    if self.maximum is not None:
        x = min(x, self.maximum)
    return self.round_to_precision(x, self.precision) if getattr(self, "precision", None) is not None else x


class TolerantSlider(gr.Slider):
    def get_block_name(self) -> str:
        return "slider"

    def preprocess(self, payload):
        return _tolerant(self, payload)


class TolerantNumber(gr.Number):
    def get_block_name(self) -> str:
        return "number"

    def preprocess(self, payload):
        return _tolerant(self, payload)
