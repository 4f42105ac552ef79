"""Metric functions against worked examples (LongBench / SCROLLS scorers, LM statistics)."""
import math

import pytest
import torch

from agacc.eval import metrics as M
from agacc.eval import tasks as T


def test_normalize_answer():
    assert M.normalize_answer("The  Cat, sat on a mat!") == "cat sat on mat"


def test_qa_f1_worked_example():
    # pred -> "cat sat on mat" (4 tokens), truth -> "cat on mat" (3): 3 common, P = 3/4, R = 1
    assert M.qa_f1_score("The cat sat on the mat", "a cat on mat") == pytest.approx(2 * 0.75 / 1.75)
    assert M.qa_f1_score("dog", "cat") == 0.0
    assert M.qa_f1_score("Paris", "paris.") == 1.0


def test_exact_match():
    assert M.exact_match_score("The Answer!", "answer") == 1.0
    assert M.exact_match_score("an answer here", "answer") == 0.0


def test_rouge_l_worked_example():
    # LCS("the cat was found under the bed", "the cat was under the bed") = 6: P = 6/7, R = 1, F = 12/13
    assert M.rouge_score("the cat was found under the bed", "the cat was under the bed") == pytest.approx(12 / 13)
    assert M.rouge_score("", "anything") == 0.0


def test_scrolls_rouge_is_geometric_mean():
    assert M.scrolls_rouge("the cat sat", "the cat sat") == pytest.approx(1.0)
    assert M.scrolls_rouge("alpha beta", "gamma delta") == 0.0
    # R1 = R2 = RL: "a b c d" vs "a b x y": R1 F = 0.5, R2 F = 1/3, RL F = 0.5
    assert M.scrolls_rouge("a b c d", "a b x y") == pytest.approx((0.5 * (1 / 3) * 0.5) ** (1 / 3))


def test_classification_retrieval_count_code():
    classes = ["Entity", "Location", "Number"]
    assert M.classification_score("Location and Number", "Location", all_classes=classes) == 0.5
    assert M.classification_score("Number", "Location", all_classes=classes) == 0.0
    assert M.retrieval_score("Paragraph 3 or Paragraph 5", "Paragraph 3") == 0.5
    assert M.count_score("There are 4 unique paragraphs", "4") == 1.0
    assert M.count_score("4 or 5", "4") == 0.5
    assert M.code_sim_score("```\n# comment\nx = f(a, b)\n", "x = f(a, b)") == 1.0


def test_best_score_takes_the_best_reference():
    assert M.best_score("qa_f1", "blue whale", ["whale", "blue whale", "shark"]) == 1.0
    assert M.best_score("contains", "the key is 12345.", ["12345"]) == 1.0
    assert M.best_score("contains", "the key is 1234", ["12345"]) == 0.0


def test_lm_stats_worked_example():
    # two tokens, V = 2; the method is uniform, the full cache is confident in the target
    logits = torch.zeros(2, 2)
    ref = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(3.0)]])   # p_full = (3/4, 1/4) then (1/4, 3/4)
    tgt = torch.tensor([0, 1])
    st = M.lm_stats(logits, ref, tgt)
    assert st["nll"] == pytest.approx(2 * math.log(2))
    assert st["nll_full"] == pytest.approx(-2 * math.log(0.75))
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert st["kl"] == pytest.approx(2 * kl, rel=1e-5)
    assert st["tokens"] == 2
    same = M.lm_stats(ref, ref, tgt)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["top1"] == 2 and same["nll"] == same["nll_full"]
    assert M.perplexity(2 * math.log(2), 2) == pytest.approx(2.0)


def test_dataset_metric_tables():
    assert M.LONGBENCH_METRICS["hotpotqa"] == "qa_f1" and M.LONGBENCH_METRICS["gov_report"] == "rouge"
    assert M.SCROLLS_METRICS["quality"] == "exact_match" and M.SCROLLS_METRICS["qmsum"] == "scrolls_rouge"
    assert set(M.LONGBENCH_METRICS.values()) | set(M.SCROLLS_METRICS.values()) <= set(M.METRICS)


def test_record_formats():
    lb = [{"context": "c", "input": "q", "answers": ["a"], "dataset": "hotpotqa"}]
    assert T.normalise_records(lb)[0]["answers"] == ["a"]
    sc = [{"id": "x", "pid": "x_0", "input": "q\n\ndoc", "output": "a1"},
          {"id": "x", "pid": "x_1", "input": "q\n\ndoc", "output": "a2"},
          {"id": "y", "pid": "y_0", "input": "q2\n\ndoc2", "output": "b"}]
    recs = T.normalise_records(sc)
    assert [r["answers"] for r in recs] == [["a1", "a2"], ["b"]] and recs[0]["context"] == "q\n\ndoc"
    with pytest.raises(ValueError):
        T.normalise_records([{"foo": 1}])


def test_truncate_middle():
    assert T._truncate_middle(list(range(10)), 4) == [0, 1, 8, 9]
    assert T._truncate_middle(list(range(3)), 4) == [0, 1, 2]


def test_wilson_interval_hand_worked():
    from agacc.eval.metrics import wilson_interval

    lo, hi = wilson_interval([1.0] * 10)   # 10 of 10: (1 + z^2/20) / (1 + z^2/10) -/+ ...
    assert abs(lo - 0.7225) < 1e-3 and abs(hi - 1.0) < 1e-12
    lo, hi = wilson_interval([1.0] * 5 + [0.0] * 5)
    assert abs(lo - 0.2366) < 1e-3 and abs(hi - 0.7634) < 1e-3
    assert wilson_interval([]) == (0.0, 1.0)


def test_paired_difference_hand_worked():
    from agacc.eval.metrics import paired_difference

    d, hw = paired_difference([1, 1, 0, 0], [1, 0, 0, 1])  # differences 0, -1, 0, 1: sd sqrt(2/3)
    assert d == 0.0 and abs(hw - 1.959964 * (2 / 3) ** 0.5 / 2) < 1e-9
    assert paired_difference([1, 0, 1], [1, 0, 1]) == (0.0, 0.0)
    with pytest.raises(ValueError, match="equal"):
        paired_difference([1], [1, 0])


def test_the_table_shows_intervals_and_paired_comparisons():
    """Hand-made records: a 95% interval column, and every method paired with the first on the samples
    both ran (beyond noise when the difference exceeds its half-width); skipped rows stay skipped."""
    from agacc.eval.cli import add_paired, format_table

    def rec(name, scores):
        from agacc.eval.metrics import wilson_interval

        return {"preset": name, "context_tokens": 1024, "score": sum(scores) / len(scores), "ratio": 4.0,
                "kv_mb": 1.0, "kv_mb_fp16": 4.0, "tokens_per_s": None, "ci95": list(wilson_interval(scores)),
                "per_sample": [{"index": i, "score": s} for i, s in enumerate(scores)]}

    records = [rec("agacc@4", [1.0] * 8), rec("snapkv@4", [0.0] * 6 + [1.0] * 2), rec("h2o@4", [1.0] * 7 + [0.0]),
               {"preset": "kvpress:tova@4", "context_tokens": 1024, "skipped": "run bash scripts/setup_kvpress.sh"}]
    add_paired(records)
    assert "paired" not in records[0] and records[1]["paired"]["vs"] == "agacc@4"
    assert records[1]["paired"]["diff"] == -0.75 and records[2]["paired"]["diff"] == -0.125
    text = format_table(records)
    assert "95% CI" in text.splitlines()[0] and "0.68-1.00" in text  # 8 of 8
    assert "snapkv@4 -0.750 +- " in text and "(beyond noise)" in text
    assert "h2o@4 -0.125 +- 0.245 (within noise)" in text
    assert "kvpress:tova@4: run bash scripts/setup_kvpress.sh" in text
