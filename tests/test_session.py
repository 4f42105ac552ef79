"""Streaming sessions, traces and the policy replay, on the embedded model.

References: the streamed tokens equal ``model.generate`` with the same cache; the lockstep full
cache equals plain generation; replayed tiers equal the real run's at every re-evaluation."""
from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest
import torch

import agacc
from agacc import tiers as T
from agacc.session import GenerationSession, SessionError, encode_prompt, generate
from agacc.tiers import evicted_runs
from agacc.trace import Trace, config_snippet, policy_changes, replay, replay_frames
from tests.helpers import PROMPT

# small blocks and window so a short prompt has blocks to tier, frequent re-evaluation; no pseudo tokens after
# the prompt (the preset's lookahead has tests of its own below: one frame, and forward, per step here)
SMALL = dict(block_size=16, recent_window=32, n_r=4, n_w=8, lookahead=0)


@pytest.fixture(scope="module")
def mt():
    # one intra-op thread: on a small shared CPU, two spinning OpenMP threads per process can make a
    # decode step 10x slower under load; restored after the module
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield agacc.load_model(device="cpu")
    torch.set_num_threads(old)


def _run(mt, cfg, n=12, **kw):
    model, tok = mt
    s = GenerationSession(model, tok, PROMPT, cfg, max_new_tokens=n, **kw)
    events = list(s.stream())
    return s, events


@pytest.fixture(scope="module")
def run_floor(mt):
    """A run without host copy (blocks only lose fidelity), with evictions (behind markers) and pruning."""
    cfg = agacc.AGACCConfig.preset("agacc", tau_h=1.6, tau_l=0.9, tau_e=0.5, markers=True, **SMALL)
    return cfg, *_run(mt, cfg, n=14)


@pytest.fixture(scope="module")
def run_host(mt):
    cfg = agacc.AGACCConfig.preset("agacc", tau_h=1.6, tau_l=0.9, tau_e=0.5, host_copy=True, **SMALL)
    return cfg, *_run(mt, cfg, n=10)


def test_stream_equals_model_generate(mt, run_floor):
    model, tok = mt
    cfg, s, events = run_floor
    ids = encode_prompt(tok, PROMPT)
    cache = agacc.CompressedCache(model.config, cfg)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                             max_new_tokens=14, do_sample=False)
    ref = out[0, ids.shape[1]:].tolist()
    got = [e.token_id for e in events]
    n = len(got)
    assert got == ref[:n] and n >= 1
    assert s.result()["text"] == tok.decode(got, skip_special_tokens=True)
    assert "".join(e.token_text for e in events) == s.text
    # the final memory equals what the same cache holds after generate (same tokens in it)
    assert s.stop_reason in ("eos", "max_new_tokens")


def test_events_frames_and_timing(run_floor):
    cfg, s, events = run_floor
    assert events[-1].done and events[-1].stop_reason == s.stop_reason
    assert all(e.ttft > 0 for e in events) and events[-1].tokens_per_s > 0
    assert [e.index for e in events] == list(range(len(events)))
    assert all(e.seq_len == s.n_prompt + e.index for e in events)
    tr = s.trace
    assert len(tr.steps) == len(events)
    # one frame per re-evaluation (prefill, then every n_r decode steps) and one at the end
    reeval_frames = [f for f in tr.frames[:len(tr.history)]]
    assert [f["step"] for f in reeval_frames] == [h["step"] for h in tr.history]
    assert all(h["step"] % cfg.n_r == 0 for h in tr.history)
    assert tr.frames[0]["step"] == 0 and tr.frames[0]["seq_len"] == s.n_prompt
    assert events[0].frame is tr.frames[0]
    assert tr.frames[-1]["seq_len"] == s.n_prompt + len(events) - 1
    # memory per step is what the cache reported, and it compresses
    assert all(st["bytes"] == e.memory["bytes"] for st, e in zip(tr.steps, events))
    last = tr.frames[-1]["memory"]
    assert last["bytes"] < last["bytes_fp16"]
    assert len(tr.tokens) == s.n_prompt + len(events) == len(tr.token_ids)


def test_trace_json_roundtrip(run_floor, tmp_path):
    cfg, s, _ = run_floor
    tr = s.trace
    path = tr.save(tmp_path / "t.json")
    back = Trace.load(path)
    assert back.to_dict() == Trace.from_json(tr.to_json()).to_dict()
    assert back.frames[-1]["tier"] == tr.frames[-1]["tier"]
    assert back.config == cfg
    assert back.geometry == s.trace.geometry
    assert back.text == s.text and back.tokens == tr.tokens
    with pytest.raises(ValueError, match="not an AGACC trace"):
        Trace.from_json('{"hello": 1}')
    with pytest.raises(ValueError, match="not valid JSON"):
        Trace.from_json("{nope")
    # a version-1 trace (no int3 tier): its codes are renamed to today's by tier name
    d = tr.to_dict()
    d["version"] = 1
    d["frames"] = [dict(d["frames"][-1], tier=[[-1, 0, 1, 2, 3, 4, 5]],
                        tier_names=["full", "int8", "int4", "int2", "pruned", "evicted"])]
    old = Trace.from_dict(d).frames[0]
    assert old["tier"] == [[T.HOT, T.FULL, T.INT8, T.INT4, T.INT2, T.PRUNED, T.EVICTED]]
    assert old["tier_names"] == list(T.NAMES)


def _assert_replay_matches(tr: Trace, cfg):
    frames_r = replay_frames(tr.history, cfg, tr.geometry)
    assert len(frames_r) == len(tr.history)
    for j, rep in enumerate(frames_r):
        real = tr.frames[j]  # the frame taken right after re-evaluation j
        assert real["step"] == rep["step"] and real["seq_len"] == rep["seq_len"]
        assert rep["tier"] == real["tier"], f"tiers differ at re-evaluation {j}"
        assert rep["bits"] == real["bits"], f"bits differ at re-evaluation {j}"
        assert rep["keep"] == real["keep"], f"kept elements differ at re-evaluation {j}"
        assert rep["markers"] == real["markers"]
        # bytes: the plan's cost model vs the bytes the store really held (tracker and bookkeeping apart)
        mem = real["memory"]
        store = mem["bytes"] - mem["by_tier"]["tracker"]
        assert abs(rep["planned_bytes"] - store) <= 0.02 * store
    return frames_r


def test_replay_equals_real_run_host_copy(run_host):
    cfg, s, _ = run_host
    frames_r = _assert_replay_matches(s.trace, cfg)
    tiers = {t for row in frames_r[-1]["tier"] for t in row}
    assert {T.FULL, T.EVICTED} <= tiers  # the run has full and evicted blocks: the comparison is not trivial


def test_replay_equals_real_run_without_host_copy(run_floor):
    cfg, s, _ = run_floor
    frames_r = _assert_replay_matches(s.trace, cfg)
    assert len(frames_r) >= 3


def test_replay_equals_real_run_with_target_ratio(mt):
    """The ratio fitter (floored plans, headroom for the next N_r tokens) replays exactly too."""
    cfg = agacc.AGACCConfig.preset("agacc", target_ratio=1.6, **SMALL)  # fp32 window: a short prompt reaches ~2x at most
    s, _ = _run(mt, cfg, n=10)
    frames_r = _assert_replay_matches(s.trace, cfg)
    assert len(frames_r) >= 3 and len({f["threshold_scale"] for f in frames_r}) > 1  # the fitter moved


def test_a_lookahead_session_equals_generate_and_replays(mt):
    """``lookahead`` in the config: the session re-plans the prompt by the model's next tokens (agacc.probe), as
    ``generate()`` does (its first decode step), token for token; the trace holds the prompt's plan before
    and after it, and replays both."""
    model, tok = mt
    cfg = agacc.AGACCConfig.preset("agacc", target_ratio=1.6, **{**SMALL, "lookahead": 4})
    s, events = _run(mt, cfg, n=10)
    ids = encode_prompt(tok, PROMPT)
    cache = agacc.CompressedCache(model.config, cfg)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                             max_new_tokens=10, do_sample=False)
    got = [e.token_id for e in events]
    assert got == out[0, ids.shape[1]:].tolist()[:len(got)] and len(got) >= 1
    assert cache.looked_ahead
    tr = s.trace
    assert [h["prefill"] for h in tr.history[:2]] == [True, True] and tr.history[0]["step"] == tr.history[1]["step"]
    assert tr.history[0]["scores"] != tr.history[1]["scores"]
    _assert_replay_matches(tr, cfg)


def test_replay_under_new_thresholds(run_floor):
    cfg, s, _ = run_floor
    tr = s.trace
    series = []
    for scale in (0.5, 1.0, 2.0, 4.0):
        c = cfg.with_overrides(tau_h=cfg.tau_h * scale, tau_l=cfg.tau_l * scale, tau_e=cfg.tau_e * scale)
        series.append(replay(tr.history, c, tr.geometry)["planned_bytes"])
    assert series == sorted(series, reverse=True) and series[0] > series[-1]
    c = cfg.with_overrides(tau_e=0.85)
    r = replay(tr.history, c, tr.geometry)
    assert r["tier"] != tr.frames[len(tr.history) - 1]["tier"]
    assert r["markers"] == [[list(x) for x in evicted_runs(torch.tensor(row))] for row in r["tier"]]
    assert policy_changes(cfg, c) == (["tau_e"], [])
    bare = replay(tr.history, c.with_overrides(markers=False), tr.geometry)  # the preset's default: no markers
    assert bare["tier"] == r["tier"] and bare["markers"] == [[] for _ in r["tier"]]
    assert bare["planned_bytes"] < r["planned_bytes"]
    assert policy_changes(cfg, cfg.with_overrides(alpha=0.3)) == ([], ["alpha"])
    # a run whose cache resolved its layer calibration, against the preset the app's controls build
    ran = cfg.with_overrides(layer_calibration="auto", layer_scale=(0.5, 2.0))
    assert policy_changes(ran, cfg.with_overrides(layer_calibration="auto")) == ([], [])
    assert policy_changes(ran, cfg.with_overrides(layer_calibration="auto", layer_scale=(1.0, 1.0))) == (["layer_scale"], [])


def test_replay_target_ratio_equals_real_run(mt):
    cfg = agacc.AGACCConfig.preset("agacc", target_ratio=2.5, host_copy=True, **SMALL)
    s, _ = _run(mt, cfg, n=1)  # the ratio fitter is slow (bisection in Python): one re-evaluation
    _assert_replay_matches(s.trace, cfg)
    rep = replay(s.trace.history, cfg, s.trace.geometry)
    assert rep["threshold_scale"] == pytest.approx(s.trace.frames[len(s.trace.history) - 1]["threshold_scale"])


def test_compare_lockstep_matches_plain_generation(mt):
    model, tok = mt
    cfg = agacc.AGACCConfig.preset("agacc", tau_h=1.2, tau_l=1.0, tau_e=0.9, **SMALL)  # aggressive: diverges
    s, events = _run(mt, cfg, n=12, compare=True)
    ids = encode_prompt(tok, PROMPT)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    plain = out[0, ids.shape[1]:].tolist()
    res = s.result()["compare"]
    assert res["ref_token_ids"] == plain[:len(res["ref_token_ids"])]
    got = [e.token_id for e in events]
    first = next((i for i, (a, b) in enumerate(zip(got, plain)) if a != b), None)
    assert res["diverged_at"] == first
    for e in events:
        assert e.compare["kl"] >= 0
        if first is None or e.index <= first:  # same context: agreement means the same greedy token
            assert e.compare["agree"] == (e.token_id == plain[e.index])
    assert 0 <= res["agreement"] <= 1 and res["mean_kl"] >= 0


def test_compare_full_preset_agrees(mt):
    s, events = _run(mt, agacc.AGACCConfig.preset("full"), n=6, compare=True)
    res = s.result()["compare"]
    assert res["diverged_at"] is None and res["agreement"] == 1.0
    assert max(e.compare["kl"] for e in events) < 1e-3
    assert res["ref_text"] == s.text


def test_cancel_ends_and_frees_cache(mt):
    model, tok = mt
    s = GenerationSession(model, tok, PROMPT, agacc.AGACCConfig.preset("agacc", **SMALL), max_new_tokens=50)
    got = []
    ref = None
    for ev in s.stream():
        got.append(ev)
        if ref is None:
            ref = weakref.ref(s.cache)
        if len(got) == 3:
            s.stop()
    assert len(got) == 3 and s.stop_reason == "cancelled"
    assert s.cache is None and s.finished.is_set()
    gc.collect()
    assert ref() is None, "the compressed cache is still referenced after cancel"
    assert s.trace.frames and s.trace.meta["stop_reason"] == "cancelled"


def test_cancel_from_another_thread_is_prompt(mt):
    model, tok = mt
    s = GenerationSession(model, tok, PROMPT, agacc.AGACCConfig.preset("agacc", **SMALL), max_new_tokens=400)
    it = s.stream()
    next(it)
    t0 = time.perf_counter()
    threading.Timer(0.3, s.stop).start()
    n = sum(1 for _ in it)
    assert time.perf_counter() - t0 < 10 and n < 399
    assert s.stop_reason == "cancelled" and s.cache is None


@pytest.mark.parametrize("compare,look", [(False, 0), (True, 0), (False, 16)])
def test_stop_during_a_forward_runs_no_further_forward(mt, compare, look):
    """Stop pressed while a forward runs (here: from inside the 5th forward, as another thread would):
    that forward ends, no other starts. With the comparison the 5th is the compressed cache's decode
    step of token 1 (prefill, full prefill, then decode + full decode per token), which the full
    cache's forward follows before the loop looks again: the session itself must refuse it. With the
    preset's lookahead the 5th is its 4th pseudo token: the 12 left are not run."""
    model, tok = mt
    s = GenerationSession(model, tok, PROMPT, agacc.AGACCConfig.preset("agacc", **{**SMALL, "lookahead": look}),
                          max_new_tokens=40, compare=compare)
    calls = []

    def hook(module, args):
        calls.append(s.cancel.is_set())
        if len(calls) == 5:
            s.stop()

    h = model.register_forward_pre_hook(hook)
    try:
        list(s.stream())
    finally:
        h.remove()
    assert s.stop_reason == "cancelled" and len(calls) == 5 and not any(calls)


def test_resumed_on_other_threads(mt):
    """Gradio resumes sync generators on worker threads: no inference mode may leak across."""
    model, tok = mt
    s = GenerationSession(model, tok, PROMPT, agacc.AGACCConfig.preset("agacc", **SMALL), max_new_tokens=4)
    it = s.stream()
    out = []

    def step():
        try:
            out.append(next(it))
        except StopIteration:
            out.append(None)

    for _ in range(5):
        t = threading.Thread(target=step)
        t.start()
        t.join()
    assert out[-1] is None and [e.index for e in out[:-1]] == [0, 1, 2, 3]
    assert not torch.is_inference_mode_enabled()


def test_bad_input_messages(mt):
    model, tok = mt
    with pytest.raises(SessionError, match="empty"):
        GenerationSession(model, tok, "   ", None)
    with pytest.raises(SessionError, match="memory limit"):
        GenerationSession(model, tok, PROMPT, None, max_new_tokens=10, max_context=50)
    with pytest.raises(SessionError, match="context length"):
        GenerationSession(model, tok, "word " * 9000, None, max_new_tokens=10)
    with pytest.raises(ValueError, match="tau_h > tau_l"):
        agacc.AGACCConfig.preset("agacc", tau_l=agacc.AGACCConfig.preset("agacc").tau_h + 1)
    with pytest.raises(SessionError, match="max new tokens"):
        GenerationSession(model, tok, PROMPT, None, max_new_tokens=0)


class _OOMModel(torch.nn.Module):
    """Wraps the model; the second forward (first decode step) runs out of memory."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config, self.generation_config = model.config, model.generation_config
        self.calls = 0

    @property
    def device(self):
        return self.inner.device

    @property
    def dtype(self):
        return self.inner.dtype

    def forward(self, **kw):
        self.calls += 1
        if self.calls == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(**kw)


def test_out_of_memory_is_a_clear_error_and_frees(mt):
    model, tok = mt
    s = GenerationSession(_OOMModel(model), tok, PROMPT, agacc.AGACCConfig.preset("agacc", **SMALL), max_new_tokens=5)
    it = s.stream()
    next(it)
    with pytest.raises(SessionError, match="out of memory during the decode"):
        next(it)
    assert s.cache is None and s.finished.is_set()
    # the preset's lookahead: its first pseudo token is the second forward
    s = GenerationSession(_OOMModel(model), tok, PROMPT, agacc.AGACCConfig.preset("agacc", **{**SMALL, "lookahead": 4}),
                          max_new_tokens=5)
    with pytest.raises(SessionError, match="out of memory during the lookahead"):
        next(s.stream())
    assert s.cache is None and s.finished.is_set()


def test_stream_batches_is_the_stream_on_its_own_thread(mt, run_floor):
    """The batched stream yields the same events (tokens, frames, the trace), produced on another
    thread; a consumer slower than the decode receives several per batch."""
    cfg, ref, ref_events = run_floor
    model, tok = mt
    s = GenerationSession(model, tok, PROMPT, cfg, max_new_tokens=14)
    batches, threads = [], set()
    for batch in s.stream_batches():
        batches.append(batch)
        time.sleep(0.3)  # slower than a decode step: the loop runs ahead meanwhile
    events = [e for b in batches for e in b]
    assert [e.token_id for e in events] == [e.token_id for e in ref_events]
    assert [e.index for e in events] == list(range(len(events)))
    assert [f["step"] for f in s.trace.frames] == [f["step"] for f in ref.trace.frames]
    assert max(len(b) for b in batches) > 1 and s.cache is None and s.stop_reason == ref.stop_reason
    it = GenerationSession(_OOMModel(model), tok, PROMPT, cfg, max_new_tokens=5).stream_batches()
    with pytest.raises(SessionError, match="out of memory during the decode"):
        list(it)  # an error on the loop's thread is raised to the consumer


def test_stream_batches_left_early_cancels_the_loop(mt):
    model, tok = mt
    s = GenerationSession(model, tok, PROMPT, agacc.AGACCConfig.preset("agacc", **SMALL), max_new_tokens=200)
    it = s.stream_batches()
    first = next(it)
    assert first[0].index == 0
    it.close()  # a cancelled request: the loop stops within a step and frees the cache
    assert s.cancel.is_set() and s.finished.is_set() and s.cache is None
    assert s.stop_reason == "cancelled" and len(s.gen_ids) < 200
    assert not any(t.name == "agacc-session" and t.is_alive() for t in threading.enumerate())


def test_sampling_is_seeded(mt):
    cfg = agacc.AGACCConfig.preset("agacc", **SMALL)
    a = [e.token_id for e in _run(mt, cfg, n=6, temperature=0.9, seed=7)[1]]
    b = [e.token_id for e in _run(mt, cfg, n=6, temperature=0.9, seed=7)[1]]
    assert a == b


def test_config_snippet_reproduces_the_run(mt, run_floor):
    cfg, s, _ = run_floor
    code = config_snippet(cfg, prompt=PROMPT, max_new_tokens=14)
    assert "AGACCConfig.preset('agacc'" in code and "tau_e=0.5" in code
    ns = {}
    exec(compile(code.replace("print(", "(lambda *a, **k: None)("), "<snippet>", "exec"), ns)
    assert ns["config"] == cfg.with_overrides(name="agacc")
    assert ns["result"]["text"] == s.text
    assert ns["result"]["token_ids"] == [e["token_id"] for e in s.trace.steps]
    assert not s.trace.meta["packed_weights"] and "packed_weights" not in code
    assert "agacc.load_model(packed_weights=True)" in config_snippet(cfg, packed_weights=True)


def test_generate_helper(mt):
    model, tok = mt
    r = generate(model, tok, PROMPT, agacc.AGACCConfig.preset("agacc", **SMALL), max_new_tokens=3)
    assert r["new_tokens"] == 3 and r["memory"]["bytes"] > 0 and isinstance(r["trace"], Trace)


def test_chunked_prefill_session_lossless_equals_one_forward_and_replays(mt):
    """The session's chunked prefill (the default for long prompts) with the lossless preset gives
    the one-forward run's tokens; with compression, every chunk's re-evaluation is recorded, so the
    replay of the run's own config gives the run's own tiers."""
    full = agacc.AGACCConfig.preset("full")
    one, _ = _run(mt, full, n=8, prefill_chunk=None)
    chunked, _ = _run(mt, full, n=8, prefill_chunk=23)
    assert chunked.gen_ids == one.gen_ids
    cfg = agacc.AGACCConfig.preset("agacc", target_ratio=3.0, **SMALL)
    s, _ = _run(mt, cfg, n=8, prefill_chunk=40)
    prefills = [h for h in s.trace.history if h["prefill"]]
    assert len(prefills) == -(-s.n_prompt // 40)
    last = replay(s.trace.history, cfg, s.trace.geometry)
    final = s.trace.frames[-1]["tier"]
    assert [row for row in last["tier"]] == [row[:len(last["tier"][0])] for row in final]
    assert any(t == T.EVICTED for row in final for t in row)


def test_cancel_during_a_chunked_prefill_stops_at_the_next_chunk(mt):
    model, tok = mt
    cancel = threading.Event()
    s = GenerationSession(model, tok, PROMPT, agacc.AGACCConfig.preset("agacc", **SMALL), max_new_tokens=4,
                          prefill_chunk=16, cancel=cancel)
    calls = []
    orig = model.forward

    def counting(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            cancel.set()  # the user presses Stop while the second chunk runs
        return orig(*a, **k)

    model.forward = counting
    try:
        events = list(s.stream())
    finally:
        del model.forward
    assert events == [] and s.stop_reason == "cancelled" and len(calls) == 2 < -(-s.n_prompt // 16)


def test_prefill_chunk_below_one_is_refused(mt):
    model, tok = mt
    with pytest.raises(SessionError, match="prefill chunk must be >= 1"):
        GenerationSession(model, tok, PROMPT, prefill_chunk=0)
