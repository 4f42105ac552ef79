"""What the bench scripts share: methods in one grammar, the model and a text, threads, output.

* Methods: ``NAME[@RATIO][,key=value]...`` (``agacc.spec``): ``agacc``, ``agacc@4``,
  ``h2o@4,recent_window=32``, ``agacc,tau_h=6,markers=false``; ``plain`` where a script allows it is
  the model's own ``DynamicCache`` (the uncompressed reference).
* The model: ``agacc.load_model`` (default: the embedded SmolLM2-135M-Instruct).
* Text: a file (``--text``), default a licence text of the OS (as ``agacc.eval.tasks.read_text``).
* Output: ``write_json`` (the script's records) and ``print_table`` (a plain-text table).

Scripts import this as ``bench.common``: ``pip install -e .`` (scripts/setup.sh) puts the repo root
on ``sys.path``, so ``python bench/NAME.py`` and ``python -m bench.NAME`` both work.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAIN = "plain"
METHOD_HELP = ("NAME[@RATIO][,key=value]...: a preset, its target ratio, AGACCConfig fields "
               "(agacc, agacc@4, h2o@4,recent_window=32, agacc,tau_h=6,markers=false)")


# --- methods ------------------------------------------------------------------------------------
def parse_methods(specs, allow_plain: bool = False) -> list[tuple[str, object]]:
    """``[(label, AGACCConfig)]`` per spec (``agacc.spec``); ``plain`` -> ``("plain", None)`` when allowed.
    A bad spec ends the script with the grammar's message (before any model is loaded)."""
    from agacc.spec import method_label, parse_method

    out, seen = [], set()
    for spec in specs:
        try:
            if allow_plain and spec.strip() == PLAIN:
                label, cfg = PLAIN, None
            else:
                label, cfg = method_label(spec), parse_method(spec)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        if label in seen:
            raise SystemExit(f"error: method {label!r} is given twice")
        seen.add(label)
        out.append((label, cfg))
    return out


def method_overrides(spec: str) -> dict:
    """The settings a spec adds to its preset (``{"target_ratio": 4.0, ...}``), for the JSON records."""
    from agacc.spec import split_method

    return split_method(spec)[1] if spec != PLAIN else {}


def make_cache(model, cfg):
    """``CompressedCache`` for a config; ``None`` (the ``plain`` method) -> the model's ``DynamicCache``."""
    if cfg is None:
        from transformers import DynamicCache

        return DynamicCache(config=model.config)
    from agacc import CompressedCache

    return CompressedCache(model.config, cfg)


# --- model, text, threads -----------------------------------------------------------------------
def add_model_args(ap: argparse.ArgumentParser, text: str | None = None, threads: bool = True, model: bool = True) -> None:
    """The flags every script that loads the model has: --text (default ``text``), --threads, --model."""
    if text is not None:
        ap.add_argument("--text", default=text, help=f"a text file (default: {text})")
    if threads:
        ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    if model:
        ap.add_argument("--model", default=None, help="hub id or local path (default: the embedded SmolLM2-135M-Instruct)")


def set_threads(n: int | None) -> int:
    """Set torch's intra-op threads when ``n`` is given; -> the number in force."""
    import torch

    if n:
        torch.set_num_threads(int(n))
    return torch.get_num_threads()


def load_model(name: str | None = None, **kwargs):
    """-> (model, tokenizer): ``agacc.load_model`` (None = the embedded model)."""
    import agacc

    return agacc.load_model(name, **kwargs)


def greedy_continuation(model, prompt, k: int):
    """``prompt`` [1, t] followed by the model's own greedy continuation of it, exactly k tokens -> [1, t + k]
    (``generate``, argmax, no stop at <eos>): lookahead's pseudo queries, bench/evict_sim.py and bench/bounds.py."""
    import torch

    with torch.inference_mode():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=k, min_new_tokens=k,
                              do_sample=False)


def read_text(path: str | None) -> str:
    """The text of ``path``; None = the default licence text of the OS (``agacc.eval.tasks``)."""
    from agacc.eval.tasks import read_text as _read

    try:
        return _read(path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


def text_ids(tok, path: str | None, n: int, need: int | None = None):
    """The first ``n`` tokens of the text -> LongTensor [1, <=n]; fewer than ``need`` (default n) ends the script."""
    ids = tok(read_text(path), return_tensors="pt").input_ids[:, :n]
    need = n if need is None else need
    if ids.shape[1] < need:
        raise SystemExit(f"error: {path or 'the default text'} has {ids.shape[1]} tokens, {need} needed")
    return ids


# --- output -------------------------------------------------------------------------------------
def write_json(path: str | Path | None, obj, indent: int = 2) -> None:
    """Write ``obj`` to ``path`` (its folder created); nothing when ``path`` is None."""
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=indent))


def format_table(head: list[str], rows: list[list[str]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    w = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]

    def line(cells):
        return "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(cells))

    return "\n".join([line(head), line(["-" * x for x in w])] + [line(r) for r in rows])


def print_table(head: list[str], rows: list[list[str]]) -> None:
    print(format_table(head, [[str(c) for c in r] for r in rows]), flush=True)
