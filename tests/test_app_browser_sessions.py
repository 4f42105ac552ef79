"""Real browser (headless Chromium) checks of issue 21 against ``python app.py``:

- two browser sessions pressing Re-run + compare at once stay apart and both finish; Stop during one
  Re-run settles that page within 1 s (and only that one: the other runs on); Stop latency measured in the page,
  in decode and during a chunked prefill;
- a preset switch after a run replays sane numbers (held bytes > 0, the recorded block size, a ratio
  within 5% of a real run of that preset);
- user errors (a cleared box, seed 1e30, a bad import) give one message and no red "Error" badges;
- threshold sliders pushed past each other stay ordered, without error toasts;
- the header names the decode kernel that runs;
- the layout at 1600 and 800 px: no overlapping boxes, one column at 800 px, legends and colour bars
  off the plots (screenshots in out/);
- the exported figures page renders with the network off (plotly.js embedded).

The machine these run on may be loaded: every wait is for a condition, with a generous bound.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.test_app_browser import ROOT, Page, make_driver
from tests.test_app_browser_stop import JS_LOG as JS_STATUS_LOG

OUT = ROOT / "out"
LONG_PROMPTS = ["Write a long story about a dragon who learns to bake bread in a small mountain village.",
                "Write a long essay about the history of the bicycle, from the first wooden machines to today."]
JS_ERROR_BADGES = """
return [...document.querySelectorAll('.error, [data-testid=\"status-tracker\"] .error, .status-tracker .error')]
  .filter(e => e.offsetParent !== null && /error/i.test(e.innerText || '')).length;"""
JS_TOASTS = "return [...document.querySelectorAll('.toast-body')].map(t => t.innerText)"


def _ratio(text: str) -> float:
    m = re.search(r"\(([\d.]+)x", text)
    assert m, text
    return float(m.group(1))


def test_two_sessions_rerun_apart_and_stop(app_url):
    url, proc, log = app_url
    drivers = [make_driver(1400, 2000) for _ in range(2)]
    try:
        pages = [Page(d).open(url) for d in drivers]
        for p, prompt in zip(pages, LONG_PROMPTS):
            p.set_prompt(prompt)
            p.set_number("max-new-tokens", 24)
        for p in pages:  # both at once
            p.js_click("rerun")
        for p in pages:
            p.wait(lambda p=p: "Done" in p.stats() or "Stopped" in p.stats(), 400, "both re-runs to finish", poll=0.5)
        for p, prompt in zip(pages, LONG_PROMPTS):
            assert "Done" in p.stats(), p.stats()  # finished, not cancelled by the other session
            full = p.css("#output-full textarea").get_attribute("value")
            assert full and p.output(), "the re-run has no comparison"
            assert "top-1 agreement" in p.css("#compare-stats").text
            # the token view and the frame note are this session's run (not the other's, not an older one)
            p.wait(lambda p=p, prompt=prompt: prompt.split(" who")[0].split(",")[0] in p.css("#token-view").text, 30,
                   "this run's tokens in the token view")
            assert "Frame" in p.css("#replay-note").text
        assert pages[0].output() != pages[1].output()

        # Stop during a Re-run: that page settles at Stopped, the other page's Re-run runs on and finishes
        for p in pages:
            p.set_number("max-new-tokens", 400)
        pages[0].js_click("rerun")
        pages[0].wait(lambda: "Generating" in pages[0].stats() and len(pages[0].output()) > 0, 300, "page 0 streaming")
        pages[1].set_number("max-new-tokens", 40)
        pages[1].js_click("rerun")
        pages[1].wait(lambda: "Generating" in pages[1].stats(), 300, "page 1 streaming")
        time.sleep(1.0)
        drivers[0].execute_script(JS_STATUS_LOG)
        latency = pages[0].stop_and_measure(60)
        status_log = drivers[0].execute_script("return window.__slog")
        print(f"stop latency during a re-run, decode (page clock): {latency:.2f} s")
        text = pages[0].output()
        time.sleep(3.0)
        assert "Stopped" in pages[0].stats() and pages[0].output() == text, "page 0 did not settle"
        assert "Generating" not in pages[0].stats()
        pages[1].wait(lambda: "Done" in pages[1].stats(), 400, "page 1's re-run to finish", poll=0.5)
        assert "Stopped" not in pages[1].stats()
        assert latency < 1.0, status_log  # what the status line said when, from the click on
        drivers[0].save_screenshot(str(OUT / "test_app_rerun_stopped.png"))
    except Exception:
        for i, d in enumerate(drivers):
            d.save_screenshot(str(OUT / f"test_app_sessions_failed_{i}.png"))
        print(Path(log).read_text()[-4000:])
        raise
    finally:
        for d in drivers:
            d.quit()
    assert proc.poll() is None


def test_stop_during_prefill_settles_within_a_chunk(app_url):
    url, proc, log = app_url
    d = make_driver(1400, 2000)
    try:
        p = Page(d).open(url)
        p.click("ex-passkey")  # ~1.8K prompt tokens: four prefill chunks of 512
        p.wait(lambda: len(p.css("#prompt textarea").get_attribute("value") or "") > 5000, 30, "the passkey prompt")
        p.set_number("max-new-tokens", 64)
        p.js_click("generate")
        p.wait(lambda: "Prefilling" in p.stats(), 120, "the prefill", poll=0.05)
        t_click = time.perf_counter()
        latency = p.stop_and_measure(120)
        print(f"stop latency during the prefill (page clock): {latency:.2f} s")
        p.wait(lambda: "Stopped" in p.stats(), 30, "stopped")
        assert " 0 new" in p.stats() or p.output() == "", p.stats()
        # the whole prefill of this prompt takes several chunks: Stop came back well before it would end
        assert time.perf_counter() - t_click < 60
    finally:
        d.quit()


def test_preset_switch_replays_sane_numbers(app_url):
    from selenium.webdriver.support.ui import Select  # noqa: F401

    url, proc, log = app_url
    d = make_driver(1600, 2400)
    try:
        p = Page(d).open(url)
        p.click("ex-document")
        p.wait(lambda: "leak" in (p.css("#prompt textarea").get_attribute("value") or ""), 30, "the document prompt")
        p.set_number("max-new-tokens", 24)
        p.js_click("generate")
        p.wait(lambda: "Done" in p.stats(), 300, "the agacc run", poll=0.5)
        time.sleep(3.0)  # the end of the run moved the replay slider: its replay lands first
        _choose(p, "preset", "uniform-int4")
        # the preset sets a dozen knobs, each a .change: wait for the replay of them all (block size included)
        p.wait(lambda: "Replayed" in p.css("#replay-note").text and "block_size" in p.css("#replay-note").text, 90,
               "the replay after the preset switch")
        time.sleep(2.0)
        note = p.css("#replay-note").text
        held = float(re.search(r"([-\d.]+) MiB held", note).group(1))
        replay_ratio = float(re.search(r"\(([-\d.]+)x vs 16 bits\)", note).group(1))
        assert held > 0 and replay_ratio > 1, note
        assert "block_size" in note  # the note says the block size needs a re-run ...
        xt = d.execute_script("return document.querySelector('#tier-map .js-plotly-plot').layout.xaxis.title.text")
        assert "16 tokens each" in xt, xt  # ... and the frames keep the recorded 16-token blocks
        p.js_click("generate")  # a real run of uniform-int4
        p.wait(lambda: "Generating" in p.stats() or "Prefilling" in p.stats(), 60, "the uniform-int4 run")
        p.wait(lambda: "Done" in p.stats(), 300, "the uniform-int4 run to end", poll=0.5)
        real = _ratio(p.stats())
        print(f"uniform-int4: replayed {replay_ratio:.3f}x, real run {real:.3f}x")
        assert abs(replay_ratio - real) <= 0.05 * real
    finally:
        d.quit()


def _choose(p: Page, elem_id: str, value: str) -> None:
    """Pick ``value`` in a gradio Dropdown (type it, then Enter)."""
    from selenium.webdriver.common.keys import Keys

    box = p.css(f"#{elem_id} input")
    p.d.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(value)
    time.sleep(0.5)
    box.send_keys(Keys.ENTER)
    time.sleep(0.5)


def test_user_errors_thresholds_and_header(app_url, tmp_path):
    from selenium.webdriver.common.keys import Keys

    url, proc, log = app_url
    d = make_driver(1600, 2400)
    try:
        p = Page(d).open(url)
        # the header names the kernel that runs (the C++ kernel on this CPU, once built)
        p.wait(lambda: "decode kernels: fused C++ kernel" in p.css("#header-box").text, 400, "the kernel in the header")
        # a cleared slider box: one clean message, no badge
        box = p.css("#max-new-tokens input[type=number]")
        d.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
        box.click()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)  # (a blur would put the slider's minimum back in the box)
        p.js_click("generate")
        p.wait(lambda: "is empty" in p.stats(), 60, "the empty-box message")
        assert "preprocess" not in p.stats() and d.execute_script(JS_ERROR_BADGES) == 0
        p.set_number("max-new-tokens", 8)
        # seed 1e30: one message, the status line does not stay at Prefilling
        p.set_number("seed", "1e30")
        time.sleep(0.5)  # let the page commit the typed value before the click reads it
        p.js_click("generate")
        try:
            p.wait(lambda: "seed" in p.stats().lower() and "between" in p.stats(), 60, "the seed message")
        except AssertionError as e:
            raise AssertionError(f"{e}; the status line: {p.stats()!r}; the seed box: "
                                 f"{p.css('#seed input').get_attribute('value')!r}") from None
        assert "Overflow" not in p.stats() and d.execute_script(JS_ERROR_BADGES) == 0
        p.set_number("seed", 0)
        # a failed import: a message, no badges over the knobs and plots
        bad = tmp_path / "bad.json"
        bad.write_text('{"not": "a trace"}')
        p.open_accordion("Export / import")
        p.css("#import-trace input[type=file]").send_keys(str(bad))
        p.wait(lambda: "Import failed" in p.stats(), 60, "the import message")
        assert d.execute_script(JS_ERROR_BADGES) == 0
        # a run, then thresholds pushed past each other one at a time: always ordered, no error toast
        p.js_click("generate")
        p.wait(lambda: "Done" in p.stats(), 300, "a run", poll=0.5)
        # a cleared threshold box (gradio's "Could not preprocess input component at index 3" before): the
        # frame note says so, the figures stay, no badge, no toast
        before = list(d.execute_script(JS_TOASTS))  # the import's toast times out on its own: count new ones only
        time.sleep(3.0)  # the end of the run moved the replay slider: its replay lands first
        box = p.css("#knob-tau-h input[type=number]")
        d.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
        box.click()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        p.wait(lambda: "is empty" in p.css("#replay-note").text, 30, "the empty-box note")
        assert d.execute_script(JS_ERROR_BADGES) == 0 and not _new_toasts(d, before)
        p.set_number("knob-tau-h", 200)
        for knob, value in (("knob-tau-l", 19.0), ("knob-tau-h", 0.3), ("knob-tau-e", 5.0), ("knob-tau-h", 2.0)):
            p.set_number(knob, value)
            time.sleep(1.0)
            p.wait(lambda: _thresholds_ordered(p), 30, f"ordered thresholds after {knob}={value}")
        time.sleep(2.0)
        assert not _new_toasts(d, before)
        assert "Inconsistent" not in p.css("#replay-note").text
        p.wait(lambda: "Replayed" in p.css("#replay-note").text, 30, "the replay of the last valid thresholds")
        assert d.execute_script(JS_ERROR_BADGES) == 0
        d.save_screenshot(str(OUT / "test_app_errors_thresholds.png"))
    finally:
        d.quit()
    text = Path(log).read_text()
    assert "Traceback" not in text, text[-3000:]
    assert len(re.findall(r"agacc\.app WARNING", text)) >= 3  # one line per user error


def _new_toasts(d, before: list[str]) -> list[str]:
    """The toasts on the page now that were not there before (each text counted as often as it shows)."""
    rest = list(before)
    new = []
    for t in d.execute_script(JS_TOASTS):
        if t in rest:
            rest.remove(t)
        else:
            new.append(t)
    return new


def _thresholds_ordered(p: Page) -> bool:
    v = [float(p.css(f"#knob-tau-{k} input[type=number]").get_attribute("value")) for k in ("h", "l", "e")]
    return v[0] > v[1] > v[2] >= 0


# --- layout ----------------------------------------------------------------------------------------

JS_BOXES = """
const ids = arguments[0];
const out = {};
for (const id of ids) { const e = document.getElementById(id); if (!e) continue;
  const r = e.getBoundingClientRect(); out[id] = [r.left, r.top, r.right, r.bottom]; }
return out;"""
JS_PLOT_PARTS = """
const gd = document.querySelector('#' + arguments[0] + ' .js-plotly-plot');
const box = s => { const e = gd.querySelector(s); if (!e) return null; const r = e.getBoundingClientRect();
  return r.width > 0 && r.height > 0 ? [r.left, r.top, r.right, r.bottom] : null; };
return {plot: box('.nsewdrag'), title: box('.gtitle'), legend: box('.legend .bg'), colorbar: box('.colorbar'),
        xtitle: box('.xtitle'), cbtitle: box('.cbtitle')};"""
IDS = ["prompt", "generate", "stop", "rerun", "stats", "output", "importance-heatmap", "tier-map", "bits-map",
       "memory-chart", "token-view", "output-full", "compare-chart", "replay"]


def _overlap(a, b, slack=1.0) -> bool:
    return a[0] < b[2] - slack and b[0] < a[2] - slack and a[1] < b[3] - slack and b[1] < a[3] - slack


@pytest.mark.parametrize("width", [1600, 800])
def test_layout_has_no_overlapping_boxes(app_url, width):
    url, proc, log = app_url
    d = make_driver(width, 2600)
    try:
        p = Page(d).open(url)
        p.set_prompt("Name three rivers of Europe and one fact about each.")
        p.set_number("max-new-tokens", 16)
        p.js_click("rerun")
        p.wait(lambda: "Done" in p.stats(), 300, "the run", poll=0.5)
        for pid in ("importance-heatmap", "tier-map", "bits-map", "memory-chart"):
            p.wait(lambda pid=pid: p.points(pid) > 0, 60, f"data in {pid}")
        time.sleep(2.0)
        d.execute_script("window.scrollTo(0, 0);")
        d.save_screenshot(str(OUT / f"test_app_layout_{width}.png"))
        boxes = d.execute_script(JS_BOXES, IDS)
        assert set(boxes) == set(IDS)
        for i, a in enumerate(IDS):
            for b in IDS[i + 1:]:
                assert not _overlap(boxes[a], boxes[b]), (width, a, b, boxes[a], boxes[b])
        doc_w = d.execute_script("return document.documentElement.clientWidth")
        for k, b in boxes.items():  # nothing runs off the page sideways
            assert b[2] <= doc_w + 1, (k, b, doc_w)
        c = d.execute_script(JS_BOXES, ["controls", "live"])
        if width < 1000:  # one column: the controls above the live view, full width
            assert c["controls"][3] <= c["live"][1] + 1, c
            assert boxes["importance-heatmap"][3] <= boxes["tier-map"][1] + 1  # the plots one under the other
        else:
            assert c["controls"][2] <= c["live"][0] + 1, c  # side by side
        for pid in ("importance-heatmap", "tier-map", "bits-map", "memory-chart", "compare-chart"):
            parts = {k: v for k, v in d.execute_script(JS_PLOT_PARTS, pid).items() if v}
            assert "plot" in parts, (pid, parts)
            names = list(parts)
            for i, a in enumerate(names):
                for b in names[i + 1:]:
                    if {a, b} == {"colorbar", "cbtitle"}:
                        continue  # the colour bar's title belongs to it
                    assert not _overlap(parts[a], parts[b]), (width, pid, a, b, parts[a], parts[b])
    finally:
        d.quit()


# --- export ----------------------------------------------------------------------------------------

def test_exported_figures_render_offline(app_url, tmp_path):
    from gradio_client import Client

    url, proc, log = app_url
    c = Client(url, verbose=False)
    c.predict(prompt="Say hello to the class in one sentence.", max_new_tokens=8, api_name="/generate")
    files, _snippet, _stats = c.predict(api_name="/export")
    page = Path(next(f for f in files if f.endswith(".html")))
    text = page.read_text()
    assert "<script src=" not in text and "plotly-2.35.2.min.js" not in text  # nothing loaded from elsewhere
    d = make_driver(1200, 1600)
    try:
        d.execute_cdp_cmd("Network.enable", {})
        d.execute_cdp_cmd("Network.emulateNetworkConditions", {"offline": True, "latency": 0, "downloadThroughput": 0,
                                                               "uploadThroughput": 0})
        d.get(page.as_uri())
        p = Page(d)
        p.wait(lambda: d.execute_script("return typeof Plotly !== 'undefined' && "
                                        "document.querySelectorAll('.js-plotly-plot .main-svg').length >= 5"),
               60, "five figures drawn offline")
        d.save_screenshot(str(OUT / "test_app_export_offline.png"))
    finally:
        d.quit()
