"""bench/compare_results.py: paired differences and the noise rule on hand-worked cases."""
import math

from bench.compare_results import compare, render


def _data(task, scores, nll=None, run=0):
    """A results JSON of one cell; ``run`` tags the records (a re-run's records differ at least so)."""
    samples = []
    for k, s in enumerate(scores):
        r = {"preset": "agacc@4", "score": s, "build_s": float(run)}
        if nll is not None:
            r.update(nll=nll[k], tokens=10)
        samples.append({"task": task, "context_tokens": 1024, "sample": k, "results": [r]})
    return {"samples": samples}


def test_retrieval_flips_one_and_three():
    old = _data("needle", [1, 1, 1, 1, 1])
    one = compare(old, _data("needle", [1, 0, 1, 1, 1], run=1))[0]
    # d = [0,-1,0,0,0]: mean -0.2, std sqrt(0.2) = 0.447, SE 0.2 -> |mean| = 1 SE: noise
    assert math.isclose(one["mean"], -0.2) and math.isclose(one["se"], 0.2) and not one["beyond_noise"]
    three = compare(old, _data("needle", [0, 0, 1, 0, 1], run=1))[0]
    # d = [-1,-1,0,-1,0]: mean -0.6, std sqrt(0.3) = 0.548, SE 0.245 -> 2.45 SE: beyond
    assert math.isclose(three["mean"], -0.6) and math.isclose(three["se"], math.sqrt(0.3 / 5)) and three["beyond_noise"]
    assert "1 worse, 0 better" in render([three], "a", "b")


def test_ppl_is_paired_log_ppl_and_reported_in_percent():
    old = _data("ppl", [1, 1, 1], nll=[30.0, 31.0, 32.0])
    new = _data("ppl", [1, 1, 1], nll=[30.1, 31.1, 32.1], run=1)  # every window +0.01 nats/token: same shift, SE 0
    r = compare(old, new)[0]
    assert math.isclose(r["mean"], -0.01) and r["se"] < 1e-12 and r["beyond_noise"]
    md = render([r], "a", "b")
    assert f"+{100 * (math.exp(0.01) - 1):.2f}%" in md and "1 worse" in md
    assert compare(old, old) == []  # nothing re-ran: no row
    rerun = _data("ppl", [1, 1, 1], nll=[30.0, 31.0, 32.0], run=1)  # re-run with the same quality
    same = compare(old, rerun)[0]
    assert same["mean"] == 0 and not same["beyond_noise"] and same["k"] == 3
    half = _data("ppl", [1, 1, 1], nll=[30.3, 31.0, 32.0])  # only window 0 re-ran (and moved)
    r = compare(old, half)[0]
    assert r["k"] == 1 and math.isclose(r["mean"], -0.03)


def test_float_rounding_is_not_a_change():
    old = _data("ppl", [1, 1, 1], nll=[30.0, 31.0, 32.0])
    new = _data("ppl", [1, 1, 1], nll=[30.00001, 31.00001, 32.00001], run=1)  # 1e-6 nats/token, SE 0
    assert not compare(old, new)[0]["beyond_noise"]


def test_protocols_are_kept_apart():
    """A query-agnostic result of the same label is another record, never the query-aware one's."""
    from bench.compare_results import records

    data = {"samples": [{"task": "needle", "context_tokens": 1024, "sample": 0, "results": [
        {"preset": "agacc@4", "score": 1.0}, {"preset": "agacc@4", "score": 0.0, "protocol": "query-agnostic"}]}]}
    recs = records(data)
    assert recs[("needle", 1024, "agacc@4")][0]["score"] == 1.0
    assert recs[("needle", 1024, "agacc@4 (query-agnostic)")][0]["score"] == 0.0
