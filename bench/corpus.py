"""The texts quality is tuned and reported on: five kinds, a tuning and a held-out text each.

Every choice of a default (docs/tuning.md) is made on the ``tuning`` split; every reported number
comes from the ``heldout`` split, which no choice looked at. The kinds differ in what the cache
has to keep: a licence (legal prose, repeated defined terms), documentation prose (Python's own
reference text), code (a Python module), narrative prose (a story), a chat transcript (rendered
through the model's chat template). Sources and licences: ``bench/texts/README.md``.

    from bench import corpus
    for t in corpus.suite("heldout"):
        text = corpus.read(t, tokenizer)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent / "texts"
LICENSES = Path("/usr/share/common-licenses")
SPLITS = ("tuning", "heldout")


@dataclass(frozen=True)
class Text:
    name: str   # "licence-heldout"
    kind: str   # licence | docs | code | narrative | chat
    split: str  # tuning | heldout
    path: Path  # a text file, or a JSON list of {"role", "content"} messages (kind "chat")


def _texts() -> list[Text]:
    out = [Text("licence-tuning", "licence", "tuning", LICENSES / "GPL-3"),
           Text("licence-heldout", "licence", "heldout", LICENSES / "Apache-2.0")]
    for kind, ext in (("docs", ".txt"), ("code", ".py.txt"), ("narrative", ".txt"), ("chat", ".json")):
        out += [Text(f"{kind}-{split}", kind, split, HERE / f"{kind}_{split}{ext}") for split in SPLITS]
    # a second code text to tune on: round 6 found code the kind where eviction costs most
    out.insert(5, Text("code-tuning-b", "code", "tuning", HERE / "code_tuning_b.py.txt"))
    return out


TEXTS = {t.name: t for t in _texts()}


def suite(split: str) -> list[Text]:
    """The texts of a split (``tuning``, ``heldout``; ``all``: both, tuning first), kinds in one order."""
    if split not in (*SPLITS, "all"):
        raise ValueError(f"unknown split {split!r}: one of {', '.join(SPLITS)}, all")
    return [t for s in SPLITS if split in (s, "all") for t in TEXTS.values() if t.split == s]


def read(text: Text, tok=None) -> str:
    """The text as the model reads it: a chat transcript through ``tok``'s chat template (or
    ``role: content`` paragraphs where the tokenizer has none)."""
    raw = text.path.read_text()
    if text.kind != "chat":
        return raw
    messages = json.loads(raw)
    if tok is not None and getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, tokenize=False)
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)
