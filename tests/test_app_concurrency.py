"""Several browser sessions at once through gradio_client: outputs are not mixed (each equals the
same prompt/seed run alone through the library), Stop ends only its own session's run and frees
its cache, and bad input gets one clear message in the status line (no exception, no traceback, one
log line) while the app keeps serving."""
from __future__ import annotations

import json
import socket
import time

import pytest
import torch

PROMPTS = [
    "Write one sentence about a lighthouse keeper who hides a brass key before a storm reaches the island.",
    "List three reasons why a city water authority would replace old cast-iron pipes with new ones.",
    "Explain in two sentences what a pass key is and why someone would hide it inside a long text.",
]
KNOBS = dict(tau_h=2.0, tau_l=0.6, tau_e=0.15, use_target=False, target_ratio=4.0, b_min=2, b_max=8, p_max=0.5,
             alpha=0.5, block_size=8, n_r=4, recent_window=32, host_copy=False, rotate=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    import app as A

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    a = A.AgaccApp(offer_hub=False, draw_interval=0.1)
    demo = a.build()
    port = _free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, **A.launch_kwargs())
    yield a, f"http://127.0.0.1:{port}/"
    demo.close()
    torch.set_num_threads(old)


def _reference(a, prompt, seed, temperature, n):
    from agacc.session import generate
    from components import controls

    _, model, tok = a.models.get(None)
    cfg = controls.config_from_values("agacc", KNOBS)
    return generate(model, tok, prompt, cfg, max_new_tokens=n, temperature=temperature, seed=seed)["text"]


def _submit(client, prompt, seed, temperature, n):
    return client.submit(prompt=prompt, preset="agacc", max_new_tokens=n, temperature=temperature, seed=seed,
                         compare=False, chat_template=True, api_name="/generate", **KNOBS)


def test_sessions_do_not_mix(server):
    from gradio_client import Client

    a, url = server
    runs = [(PROMPTS[0], 1, 0.8, 10), (PROMPTS[1], 2, 0.0, 10), (PROMPTS[0], 3, 0.8, 10)]  # same prompt, other seed
    refs = [_reference(a, *r) for r in runs]
    clients = [Client(url, verbose=False) for _ in runs]
    t0 = time.perf_counter()
    jobs = [_submit(c, *r) for c, r in zip(clients, runs)]
    finals = [j.result(timeout=240) for j in jobs]
    wall = time.perf_counter() - t0
    for job, final, ref, (prompt, *_rest) in zip(jobs, finals, refs, runs):
        assert final[0] == ref
        for out in job.outputs():  # every streamed value of this session is a prefix of its own output
            assert isinstance(out[0], str) and ref.startswith(out[0])
        assert len(job.outputs()) > 2  # it streamed
    hashes = {c.session_hash for c in clients}
    assert len(hashes) == 3 and all(h in a.sessions for h in hashes)
    for c, (prompt, *_rest) in zip(clients, runs):  # each session exports its own run
        files, _snippet, _stats = c.predict(api_name="/export")
        trace = json.loads(open(files[0]).read())
        assert trace["meta"]["prompt"] == prompt
    assert wall < 240


def test_stop_ends_only_its_own_session(server):
    from gradio_client import Client

    a, url = server
    ref_b = _reference(a, PROMPTS[2], 0, 0.0, 8)
    ca, cb = Client(url, verbose=False), Client(url, verbose=False)
    job_a = _submit(ca, PROMPTS[1], 0, 0.0, 400)
    deadline = time.time() + 120
    while time.time() < deadline and not any(o[0] for o in job_a.outputs()):
        time.sleep(0.2)
    assert any(o[0] for o in job_a.outputs()), "session A did not start streaming"
    job_b = _submit(cb, PROMPTS[2], 0, 0.0, 8)
    time.sleep(0.5)
    t0 = time.perf_counter()
    stop_out = ca.predict(api_name="/stop")
    assert time.perf_counter() - t0 < 20
    assert "Stopped" in stop_out[1]
    us_a = a.sessions.get(ca.session_hash)
    assert us_a.session.finished.is_set() and us_a.session.cache is None  # the cache was freed
    assert us_a.session.stop_reason == "cancelled" and len(us_a.session.gen_ids) < 400
    assert job_b.result(timeout=240)[0] == ref_b  # the other session ran on, unaffected


def test_bad_input_is_reported_and_the_app_keeps_serving(server, caplog):
    import logging
    import re

    from gradio_client import Client

    a, url = server
    c = Client(url, verbose=False)
    cases = [(dict(prompt="  "), "prompt is empty"),
             (dict(prompt=PROMPTS[0], tau_l=3.0), r"tau_h > tau_l"),
             (dict(prompt="word " * 5000, max_new_tokens=8), "memory limit|context length"),
             (dict(prompt=PROMPTS[0], model="agacc-tests/no-such-model-xyz"), "cannot load model"),
             (dict(prompt=PROMPTS[0], seed=1e30), "seed must be between"),
             (dict(prompt=PROMPTS[0], max_new_tokens=None), "max new tokens is empty"),
             (dict(prompt=PROMPTS[0], tau_l=None), "τ_l is empty")]
    with caplog.at_level(logging.WARNING, logger="agacc.app"):
        for kw, want in cases:
            caplog.clear()
            out = c.predict(api_name="/generate", **{**KNOBS, **kw})
            assert re.search(want, out[1]), (kw, out[1])
            assert "Traceback" not in out[1] and "preprocess" not in out[1]
            assert len([r for r in caplog.records if r.name == "agacc.app"]) == 1, caplog.text  # one log line
    out = c.predict(prompt=PROMPTS[0], max_new_tokens=3, api_name="/generate", **KNOBS)
    assert out[0] and "Done" in out[1]
    # after the run, a threshold change replays the recorded importance (no generation)
    view = c.predict(replay=0, token_layer=-1, preset="agacc", api_name="/view", **dict(KNOBS, tau_e=0.5))
    assert "Replayed" in view[5] and "tau_e=0.5" in view[5]
    # the bytes it shows are the library's (replay_frames' held_bytes), not recomputed by the app
    from agacc.trace import replay_frames
    from components import controls

    tr = a.sessions.get(c.session_hash).trace
    frames = replay_frames(tr.history, controls.config_from_values("agacc", dict(KNOBS, tau_e=0.5)), tr.geometry)
    assert f"{frames[tr.history_for_frame(0)]['held_bytes'] / 2 ** 20:.2f} MiB held" in view[5]
    # a target ratio 8-bit blocks reach replays keep_all (every token at 16, 8 or 4 bits) and says so
    low_knobs = dict(KNOBS, use_target=True, target_ratio=1.5)
    low = c.predict(replay=0, token_layer=-1, preset="agacc", api_name="/view", **low_knobs)
    assert "keeps every token" in low[5] and "keeps every token" not in view[5]
    from agacc import tiers as T

    f_low = replay_frames(tr.history, controls.config_from_values("agacc", low_knobs), tr.geometry)[tr.history_for_frame(0)]
    assert {t for row in f_low["tier"] for t in row} <= {T.FULL, T.INT8, T.INT4, T.HOT}
    assert f"{f_low['held_bytes'] / 2 ** 20:.2f} MiB held" in low[5]


def test_endpoints_take_named_inputs(server):
    """Every knob and setting is a named parameter of /generate, /rerun and /view (the handlers receive
    them as one dict); /rerun is /generate with the full-cache comparison on."""
    from gradio_client import Client

    import app as A
    from components import controls

    a, url = server
    c = Client(url, verbose=False)
    api = c.view_api(return_format="dict", print_info=False)["named_endpoints"]
    names = {e: [p["parameter_name"] for p in api[e]["parameters"]] for e in ("/generate", "/rerun", "/view")}
    assert names["/generate"] == names["/rerun"] == list(A.GEN_DEFAULTS) + controls.FIELDS
    assert names["/view"] == ["replay", "token_layer", "preset"] + controls.FIELDS
    out = c.predict(prompt=PROMPTS[1], max_new_tokens=3, compare=False, api_name="/rerun", **KNOBS)
    tr = a.sessions.get(c.session_hash).trace
    assert tr.meta["compare"] and tr.compare is not None and out[7] == tr.compare["ref_text"] and out[7]


def test_export_then_import_in_another_session(server, tmp_path):
    from gradio_client import Client, handle_file

    a, url = server
    c1, c2 = Client(url, verbose=False), Client(url, verbose=False)
    out = c1.predict(prompt=PROMPTS[2], max_new_tokens=6, api_name="/generate", **KNOBS)
    files, snippet, _stats = c1.predict(api_name="/export")
    assert any(f.endswith(".html") for f in files) and any(f.endswith(".py") for f in files)
    assert "AGACCConfig.preset('agacc'" in snippet and "recent_window=32" in snippet  # a knob off the preset's default (16)
    trace_file = next(f for f in files if f.endswith(".json"))
    imported = c2.predict(handle_file(trace_file), api_name="/import_trace")
    assert imported[0] == out[0]  # the imported run's output, in the other session
    assert "Imported" in imported[1] or "Done" in imported[1]
    assert a.sessions.get(c2.session_hash).trace.meta["prompt"] == PROMPTS[2]
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a trace"}')
    out = c2.predict(handle_file(str(bad)), api_name="/import_trace")
    assert "not an AGACC trace" in out[1] and "Import failed" in out[1]
    assert a.sessions.get(c2.session_hash).trace.meta["prompt"] == PROMPTS[2]  # the imported run stays


def test_stream_resends_unchanged_values_instead_of_skips(server):
    """While tokens stream, every live output carries a value (gradio diffs a value sent again to
    nothing, where a skip makes the server rebuild the component on every update); only the replay
    slider waits for the end. Between redraws the figures are the very objects sent before."""
    import app as A

    a, _ = server
    ui = a.ui
    old, old_update = a.draw_interval, A.UPDATE_INTERVAL
    a.draw_interval = 3600.0  # draw at the first token and at the end only
    A.UPDATE_INTERVAL = 0.0  # an update per batch of tokens
    try:
        ups = list(a.generate(None, prompt=PROMPTS[0], model=a.default_model, trust_remote_code=False,
                              preset="agacc", max_new_tokens=6, temperature=0.0, seed=0, compare=False,
                              chat_template=True, **KNOBS))
    finally:
        a.draw_interval, A.UPDATE_INTERVAL = old, old_update
    outs = a.gen_outputs
    pos = {c: i for i, c in enumerate(outs)}
    stream, final = ups[1:-1], ups[-1]
    assert len(stream) >= 6
    for u in stream:
        skipped = {c for c, v in zip(outs, u) if isinstance(v, dict) and v.get("__type__") == "update"}
        assert skipped == {ui.replay}, [c.elem_id for c in skipped]
    texts = [u[pos[ui.output]] for u in stream]
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1)) and texts[-1] == final[pos[ui.output]]
    middle = stream[1:-1]  # no redraw between the first token and the last
    for c in (ui.importance, ui.tier, ui.bits, ui.memory, ui.token_view):  # (the status line: every STATS_INTERVAL)
        assert all(u[pos[c]] is stream[0][pos[c]] for u in middle), c.elem_id
    assert A.SKIP()["__type__"] == "update"


def test_stream_sends_at_most_one_new_figure_per_update(server):
    """Each figure update is a full Plotly draw on the page's one thread: after the first draw of a run,
    an update carries at most one new figure (so no update blocks the page, and Stop is served), the
    figures at least FIGURE_GAP apart; the last update carries every figure of the final state."""
    import app as A

    a, _ = server
    ui = a.ui
    old = a.draw_interval, a.map_interval
    a.draw_interval, a.map_interval = 0.0, 0.0  # every figure due at every update
    old_update, A.UPDATE_INTERVAL = A.UPDATE_INTERVAL, 0.0
    try:
        ups = list(a.generate(None, prompt=PROMPTS[0], model=a.default_model, trust_remote_code=False,
                              preset="agacc", max_new_tokens=24, temperature=0.0, seed=0, compare=True,
                              chat_template=True, **KNOBS))
    finally:
        a.draw_interval, a.map_interval = old
        A.UPDATE_INTERVAL = old_update
    pos = {c: i for i, c in enumerate(a.gen_outputs)}
    figs = (ui.importance, ui.tier, ui.bits, ui.memory, ui.token_view, ui.compare_plot)
    stream = ups[2:-1]  # after the prefilling update and the first token's (which draws everything)
    assert len(stream) >= 10
    prev = ups[1]
    for u in stream:
        new = [c.elem_id for c in figs if u[pos[c]] is not prev[pos[c]]]
        assert len(new) <= 1, new
        prev = u
    drawn = sum(1 for i in range(1, len(ups) - 1) for c in figs if ups[i + 1][pos[c]] is not ups[i][pos[c]])
    assert drawn >= 1


def test_queue_polls_at_the_app_rate(server):
    """Gradio's queue polls for new events every 1 ms while idle (each wake-up takes the GIL from a
    decode step); the app slows it to QUEUE_POLL. The other tests in this module run on that queue."""
    import app as A

    a, _ = server
    q = a.demo._queue
    assert A.QUEUE_POLL >= 0.001
    assert q.sleep_when_free == max(0.001, A.QUEUE_POLL)
    assert q.progress_update_sleep_when_free == max(0.01, A.QUEUE_POLL)
