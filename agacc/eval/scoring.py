"""A generated answer's score, for any task: the runner's methods and the kvpress adapter's (kvpress's
predictions come back as token ids) are scored by this one function."""
from __future__ import annotations

from agacc.eval import ruler
from agacc.eval.metrics import best_score
from agacc.eval.tasks import Sample


def text_score(s: Sample, text: str) -> tuple[str, float]:
    """A generated answer of sample ``s`` -> (the prediction scored, its score): the first line where the
    task asks for it, then the task's metric (RULER's: the share of all answers found)."""
    if s.first_line:
        text = text.lstrip("\n").split("\n")[0]
    if s.metric in ruler.METRICS:
        return text, ruler.score(s, text)
    return text, best_score(s.metric, text, s.answers, all_classes=s.all_classes)
