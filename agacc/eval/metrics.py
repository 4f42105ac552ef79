"""Metric functions, written after the official scorers.

LongBench (THUDM/LongBench ``metrics.py``): ``qa_f1_score`` (SQuAD normalisation, token F1),
``rouge_score`` (ROUGE-L F), ``classification_score``, ``retrieval_score``, ``count_score``,
``code_sim_score``; a sample's score is the max over its reference answers.
SCROLLS (tau-nlp/scrolls metrics): ``scrolls_rouge`` (geometric mean of ROUGE-1/2/L F, stemmed),
``qa_f1_score`` (Qasper, NarrativeQA), ``exact_match_score`` (QuALITY, ContractNLI).
Language modelling: ``lm_stats`` (NLL of a method and of the full cache on the same tokens, top-1
agreement, KL(full || method)).
Chinese LongBench metrics (qa_f1_zh, rouge_zh) need jieba and are not provided.
"""
from __future__ import annotations

import difflib
import math
import re
import string
from collections import Counter

import torch


# --- normalisation (SQuAD / LongBench) -------------------------------------------------------------

def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation, articles (a, an, the) and extra whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _f1(pred_tokens: list[str], gt_tokens: list[str]) -> float:
    common = Counter(pred_tokens) & Counter(gt_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    p = same / len(pred_tokens)
    r = same / len(gt_tokens)
    return 2 * p * r / (p + r)


def qa_f1_score(prediction: str, ground_truth: str, **_) -> float:
    """Token-level F1 after ``normalize_answer`` (LongBench / SQuAD / SCROLLS QA)."""
    return _f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def exact_match_score(prediction: str, ground_truth: str, **_) -> float:
    """1.0 if the normalised strings are equal (SCROLLS QuALITY / ContractNLI)."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def _rouge(types, stem: bool):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(types, use_stemmer=stem)


def rouge_score(prediction: str, ground_truth: str, **_) -> float:
    """ROUGE-L F-measure (LongBench summarisation: gov_report, qmsum, multi_news, samsum)."""
    if not prediction.strip() or not ground_truth.strip():
        return 0.0
    return _rouge(["rougeL"], False).score(ground_truth, prediction)["rougeL"].fmeasure


def scrolls_rouge(prediction: str, ground_truth: str, **_) -> float:
    """SCROLLS summarisation score: geometric mean of ROUGE-1, ROUGE-2 and ROUGE-L F (stemmed)."""
    if not prediction.strip() or not ground_truth.strip():
        return 0.0
    s = _rouge(["rouge1", "rouge2", "rougeLsum"], True).score(ground_truth, prediction)
    vals = [s["rouge1"].fmeasure, s["rouge2"].fmeasure, s["rougeLsum"].fmeasure]
    return math.prod(vals) ** (1 / 3) if all(v > 0 for v in vals) else 0.0


def classification_score(prediction: str, ground_truth: str, all_classes=None, **_) -> float:
    """LongBench trec / lsht: the class names found in the prediction; ground truth among them
    scores 1 / (number found), longer names shadow their substrings."""
    all_classes = all_classes or [ground_truth]
    found = [c for c in all_classes if c in prediction]
    found = [c for c in found if not (c in ground_truth and c != ground_truth)]
    return 1.0 / len(found) if ground_truth in found else 0.0


def retrieval_score(prediction: str, ground_truth: str, **_) -> float:
    """LongBench passage_retrieval_en: the paragraph number of the ground truth among the numbers
    in the prediction."""
    m = re.findall(r"Paragraph (\d+)", ground_truth)
    if not m:
        return 0.0
    nums = re.findall(r"\d+", prediction)
    if not nums:
        return 0.0
    return sum(1 for n in nums if n == m[0]) / len(nums)


def count_score(prediction: str, ground_truth: str, **_) -> float:
    """LongBench passage_count: share of the numbers in the prediction equal to the count."""
    nums = re.findall(r"\d+", prediction)
    if not nums:
        return 0.0
    return sum(1 for n in nums if n == str(ground_truth)) / len(nums)


def code_sim_score(prediction: str, ground_truth: str, **_) -> float:
    """LongBench lcc / repobench-p: similarity of the first code line of the prediction (skipping
    comments and fences) with the reference; difflib's ratio stands in for fuzzywuzzy's."""
    line = ""
    for ln in prediction.lstrip("\n").split("\n"):
        if "`" not in ln and "#" not in ln and "//" not in ln:
            line = ln
            break
    return difflib.SequenceMatcher(None, line, ground_truth).ratio()


def contains_score(prediction: str, ground_truth: str, **_) -> float:
    """Passkey / needle: 1.0 if the answer string appears in the prediction."""
    return float(ground_truth.strip() != "" and ground_truth.strip() in prediction)


METRICS = {
    "qa_f1": qa_f1_score, "exact_match": exact_match_score, "rouge": rouge_score,
    "scrolls_rouge": scrolls_rouge, "classification": classification_score, "retrieval": retrieval_score,
    "count": count_score, "code_sim": code_sim_score, "contains": contains_score,
}

# LongBench (English) dataset -> metric, as in LongBench's eval.py
LONGBENCH_METRICS = {
    "narrativeqa": "qa_f1", "qasper": "qa_f1", "multifieldqa_en": "qa_f1", "hotpotqa": "qa_f1",
    "2wikimqa": "qa_f1", "musique": "qa_f1", "gov_report": "rouge", "qmsum": "rouge", "multi_news": "rouge",
    "trec": "classification", "triviaqa": "qa_f1", "samsum": "rouge", "passage_retrieval_en": "retrieval",
    "passage_count": "count", "lcc": "code_sim", "repobench-p": "code_sim",
}
# SCROLLS dataset -> metric (the official SCROLLS metrics)
SCROLLS_METRICS = {
    "gov_report": "scrolls_rouge", "summ_screen_fd": "scrolls_rouge", "qmsum": "scrolls_rouge",
    "qasper": "qa_f1", "narrative_qa": "qa_f1", "quality": "exact_match", "contract_nli": "exact_match",
}


def best_score(metric: str, prediction: str, answers: list[str], **kw) -> float:
    """Max over the references (LongBench and SCROLLS both take the best reference)."""
    fn = METRICS[metric]
    if not answers:
        return 0.0
    return max(fn(prediction, str(a), **kw) for a in answers)


def lm_stats(logits: torch.Tensor, ref_logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Teacher-forced comparison on the same tokens.

    logits, ref_logits [T, V] (method, full cache); targets [T] the next tokens.
    Returns sums over the T positions (so shards and samples add up): nll, nll_full (natural log),
    top1 (positions whose argmax equals the full cache's), kl (KL(full || method), nats), tokens."""
    lp = torch.log_softmax(logits.float(), -1)
    lq = torch.log_softmax(ref_logits.float(), -1)
    idx = targets.long()[:, None]
    nll = -lp.gather(1, idx).sum()
    nll_full = -lq.gather(1, idx).sum()
    top1 = (logits.argmax(-1) == ref_logits.argmax(-1)).sum()
    kl = (lq.exp() * (lq - lp)).sum(-1).clamp_min(0).sum()
    return {"nll": float(nll), "nll_full": float(nll_full), "top1": int(top1), "kl": float(kl), "tokens": int(targets.numel())}


def perplexity(nll_sum: float, tokens: int) -> float:
    return math.exp(nll_sum / tokens) if tokens else float("nan")


Z95 = 1.959964  # two-sided 95% quantile of the normal distribution


def wilson_interval(scores: list[float], z: float = Z95) -> tuple[float, float]:
    """95% interval of a mean score over n samples, each in [0, 1]: the Wilson score interval of p = the
    mean with n trials (exact in form for 0/1 scores such as a needle found or not; for partial scores,
    RULER's string_match_all, an approximation). Never degenerate: 10 of 10 gives [0.72, 1]."""
    n = len(scores)
    if n == 0:
        return 0.0, 1.0
    p = sum(scores) / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(a: list[float], b: list[float], z: float = Z95) -> tuple[float, float]:
    """(mean of b_i - a_i, 95% half-width) over samples scored by two methods (the same samples, in the
    same order): normal approximation, half-width z * sd / sqrt(n) of the differences; 0 when every
    sample gave both the same score."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_difference needs two equal, non-empty lists, got {len(a)} and {len(b)}")
    d = [y - x for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    return mean, z * math.sqrt(var / n)
