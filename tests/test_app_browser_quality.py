"""Real browser (headless Chromium) checks of issue 21's teaching and tuning views against ``python app.py``,
each against the library's own numbers for the same run (the trace the page exports):

- block drill-down: a real mouse click on a cell of the tier map opens the panel (``block-panel``) with
  that block's tokens, importance at every frame, tier history and bytes, equal to the trace's frames and
  to ``agacc.planner.block_cost_bytes``; the typed fallback ("layer, block" + Enter) does the same; bad
  input gives one clean message;
- the quality-vs-memory curve (``quality-curve``): its points equal ``agacc.trace.replay_frames`` called
  here at each target ratio, with the attention-mass shares computed here from the history;
- Measure quality (``measure-quality``): the KL and top-1 the page shows equal ``agacc.eval.runner.
  evaluate_sample`` run here on the same tokens and setting (its full-cache reference comes from one
  forward over the whole text, an independent path), and the curve marks the measured point.

Screenshots of the intro, the drill-down and the curve go to out/ (``AGACC_DOC_SHOTS=1``: to docs/, as
small PNGs, for docs/app.md).
"""
from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_app_browser import ROOT, Page, make_driver

OUT = ROOT / "out"
DOCS = ROOT / "docs"
SHOTS = DOCS if os.environ.get("AGACC_DOC_SHOTS") == "1" else OUT
RATIOS = (1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)

JS_CELL = """
const gd = document.querySelector('#' + arguments[0] + ' .js-plotly-plot');
const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
const r = gd.querySelector('.nsewdrag').getBoundingClientRect();
return [r.left + xa.l2p(arguments[2]), r.top + ya.l2p(arguments[1])];"""
JS_DATA = """
const gd = document.querySelector('#' + arguments[0] + ' .js-plotly-plot');
return gd && gd.data ? JSON.stringify(gd.data.map(t => ({name: t.name, x: t.x, y: t.y, text: t.text}))) : null;"""


def _shot(el_or_driver, name: str) -> Path:
    """A PNG of an element (or the window), at most 1200 px wide, palette-quantised to keep it small."""
    from PIL import Image

    SHOTS.mkdir(exist_ok=True)
    path = SHOTS / name
    if hasattr(el_or_driver, "save_screenshot"):
        el_or_driver.save_screenshot(str(path))
    else:
        el_or_driver.screenshot(str(path))
    im = Image.open(path).convert("RGB")
    if im.width > 1200:
        im = im.resize((1200, round(im.height * 1200 / im.width)), Image.LANCZOS)
    im.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    return path


def _data(p: Page, elem_id: str):
    s = p.d.execute_script(JS_DATA, elem_id)
    return json.loads(s) if s else None


def _click_cell(p: Page, elem_id: str, layer: int, block: int) -> None:
    """A real mouse click (pointer actions) on cell (layer, block) of a Plotly heatmap."""
    from selenium.webdriver.common.action_chains import ActionChains

    el = p.css(f"#{elem_id}")
    p.d.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
    time.sleep(0.5)
    x, y = p.d.execute_script(JS_CELL, elem_id, layer, block)
    ac = ActionChains(p.d)
    ac.w3c_actions.pointer_action.move_to_location(int(round(x)), int(round(y)))
    ac.w3c_actions.pointer_action.click()
    ac.perform()


def _export_trace(p: Page, url: str):
    """The session's run as the library recorded it: Export, then download the trace the page offers."""
    from agacc.trace import Trace

    def links():
        return [h for h in (a.get_attribute("href") or "" for a in p.d.find_elements("css selector", "#export-files a"))
                if h.endswith(".json")]

    before = set(links())  # an earlier export's link stays on the page until the new one replaces it
    p.d.execute_script("document.querySelector('#export').click();")
    link = p.wait(lambda: [h for h in links() if h not in before], 60, "the new exported trace link")[0]
    with urllib.request.urlopen(link, timeout=30) as r:
        return Trace.from_json(r.read())


@pytest.fixture(scope="module")
def run(app_url):
    """One browser page after a run of the document example (24 new tokens), and that run's trace."""
    url, proc, log = app_url
    d = make_driver(1200, 2400)
    p = Page(d)
    try:
        p.open(url)
        # the intro, opened, for docs/app.md
        d.execute_script("document.querySelector('#intro-box').open = true;")
        time.sleep(0.5)
        _shot(p.css("#intro"), "app_intro.png")
        d.execute_script("document.querySelector('#intro-box').open = false;")
        p.click("ex-document")
        p.wait(lambda: "leak" in (p.css("#prompt textarea").get_attribute("value") or ""), 30, "the document prompt")
        p.set_number("max-new-tokens", 24)
        p.js_click("generate")
        p.wait(lambda: "Done" in p.stats(), 400, "the run", poll=0.5)
        p.wait(lambda: (_data(p, "quality-curve") or [{}])[0].get("x"), 120, "the quality-vs-memory curve")
        p.open_accordion("Export / import")
        tr = _export_trace(p, url)
        yield p, tr, log
    except Exception:
        d.save_screenshot(str(OUT / "test_app_quality_failed.png"))
        print(Path(log).read_text()[-4000:])
        raise
    finally:
        d.quit()


def _block_checks(p: Page, tr, layer: int, block: int) -> None:
    """The panel shows block (layer, block) of ``tr`` exactly as the library recorded it."""
    from agacc import planner
    from agacc.tiers import HOT, NAMES

    p.wait(lambda: f"Layer {layer}, block {block}" in p.css("#block-info").text, 60, f"the panel of {layer}, {block}")
    B = tr.config.block_size
    # its tokens, decoded
    want = "".join(tr.tokens[block * B:(block + 1) * B])
    got = p.d.execute_script("return [...document.querySelectorAll('#block-tokens .bp-tok')].map(e => e.textContent)"
                             ".join('')")
    assert got == want, (got, want)
    # its tier and importance at every frame that holds it
    frames = [(k, f) for k, f in enumerate(tr.frames) if block < len(f["tier"][layer])]
    rows = p.d.execute_script("return [...document.querySelectorAll('#block-tiers tbody tr')].map("
                              "r => [...r.children].map(c => c.innerText.trim()))")
    assert len(rows) == len(frames), (rows, len(frames))
    for row, (k, f) in zip(rows, frames):
        t = f["tier"][layer][block]
        assert row[0] == str(k + 1) and row[1] == str(f["step"]), (row, k, f["step"])
        assert row[3] == ("hot" if t == HOT else NAMES[t]) and row[4] == str(f["bits"][layer][block]), (row, t)
    p.wait(lambda: (_data(p, "block-importance") or [{}])[0].get("y") is not None, 30, "the block's importance line")
    line = _data(p, "block-importance")[0]
    assert line["x"] == [f["step"] for _, f in frames]
    assert line["y"] == [f["importance"][layer][block] for _, f in frames]
    # its bytes now: the planner's cost model for its tier in the last frame
    last = tr.frames[-1]
    t = last["tier"][layer][block]
    geo, cfg = tr.geometry, tr.config
    if t == HOT:
        want_bytes = 2 * geo.heads * min(B, last["seq_len"] - block * B) * geo.head_dim * geo.full_itemsize
    else:
        want_bytes = planner.block_cost_bytes(t, last["bits"][layer][block], last["keep"][layer][block], batch=1,
                                              heads=geo.heads, head_dim=geo.head_dim, block_size=B,
                                              full_itemsize=geo.full_itemsize, value_group_size=cfg.value_group_size,
                                              b_min=cfg.b_min, sparse_threshold=cfg.sparse_threshold,
                                              key_quant=cfg.key_quant, key_group_size=cfg.key_group_size)
    assert int(p.css("#block-bytes").get_attribute("data-bytes")) == want_bytes


def test_block_drill_down_click_and_keyboard(run):
    from selenium.webdriver.common.keys import Keys

    from agacc.tiers import EVICTED, FULL, HOT

    p, tr, log = run
    last = tr.frames[-1]
    # a block that changed tier during the run if there is one (else a quantised one), not hot at the end
    layer, block = 3, None
    for b in range(len(last["tier"][layer])):
        tiers = {f["tier"][layer][b] for f in tr.frames if b < len(f["tier"][layer])}
        if last["tier"][layer][b] not in (HOT, FULL, EVICTED) and (len(tiers) > 1 or block is None):
            block = b
            if len(tiers) > 1:
                break
    assert block is not None, last["tier"][layer]
    p.wait(lambda: p.d.execute_script("const g = document.querySelector('#tier-map .js-plotly-plot');"
                                      "return !!(g && g.__agaccEv);"), 30, "the click hook on the tier map")
    _click_cell(p, "tier-map", layer, block)
    p.wait(lambda: p.css("#block-panel").is_displayed(), 60, "the drill-down panel")
    _block_checks(p, tr, layer, block)
    assert p.css("#block-pick textarea, #block-pick input").get_attribute("value").replace(" ", "") == f"{layer},{block}"
    time.sleep(1.0)
    _shot(p.css("#block-panel"), "app_block.png")
    # the importance heatmap and the bits map open it too
    _click_cell(p, "importance-heatmap", 7, 2)
    _block_checks(p, tr, 7, 2)
    _click_cell(p, "bits-map", 12, 10)
    _block_checks(p, tr, 12, 10)
    # the keyboard: type "layer, block" and press Enter
    box = p.css("#block-pick textarea, #block-pick input")
    p.d.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys("5, 1")
    box.send_keys(Keys.ENTER)
    _block_checks(p, tr, 5, 1)
    # bad input: one clean message, no traceback in the page
    for bad in ("five, one", "99, 1"):
        box.click()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(bad)
        box.send_keys(Keys.ENTER)
        want = "two whole numbers" if bad.startswith("five") else "layers 0-29"
        p.wait(lambda: "Pick a block" in p.css("#block-info").text and want in p.css("#block-info").text, 30,
               f"the message for {bad!r}")
        text = p.css("#block-info").text
        assert "Traceback" not in text and "Error" not in text, text
    assert "Traceback" not in Path(log).read_text()


def _shares(scores, tiers) -> dict:
    """The attention-mass shares, computed here (not with agacc.trace.mass_shares)."""
    from agacc.tiers import FULL, HOT, PRUNED, EVICTED

    tot = {"full": 0.0, "quantised": 0.0, "pruned": 0.0, "evicted": 0.0}
    for srow, trow in zip(scores, tiers):
        for s, t in zip(srow, trow):
            if t == HOT:
                continue
            k = "full" if t == FULL else "pruned" if t == PRUNED else "evicted" if t == EVICTED else "quantised"
            tot[k] += max(0.0, s)
    z = sum(tot.values())
    return {k: v / z for k, v in tot.items()}


def test_quality_curve_equals_replay_and_measure_equals_library(run):
    import torch

    import agacc
    from agacc.eval.runner import evaluate_sample
    from agacc.eval.tasks import Sample
    from agacc.trace import replay_frames

    p, tr, log = run
    curve = {t["name"]: t for t in _data(p, "quality-curve")}
    full, quant, ev = (curve["attention mass on 16-bit blocks"], curve["on quantised blocks"],
                       curve["on evicted blocks"])
    assert len(full["x"]) == len(RATIOS)
    for i, r in enumerate(RATIOS):
        frames = replay_frames(tr.history, tr.config.with_overrides(target_ratio=r), tr.geometry)
        assert full["x"][i] == pytest.approx(frames[-1]["ratio"], abs=1e-4)
        per = [_shares(h["scores"], f["tier"]) for h, f in zip(tr.history, frames) if h["n_ready"] > 0]
        for trace, key in ((full, "full"), (quant, "quantised"), (ev, "evicted")):
            assert trace["y"][i] == pytest.approx(100 * sum(s[key] for s in per) / len(per), abs=1e-3), (r, key)
    # the more memory is saved, the less attention mass stays at 16 bits
    assert full["y"][0] > full["y"][-1] and ev["y"][-1] >= ev["y"][0]

    # Measure quality with the run's own setting
    p.d.execute_script("document.querySelector('#measure-quality').scrollIntoView({block: 'center'});"
                       "document.querySelector('#measure-quality').click();")
    el = p.wait(lambda: p.css("#measured-kl"), 300, "the measured numbers", poll=0.5)
    kl_page = float(el.get_attribute("data-kl"))
    top1_page = int(p.css("#measured-top1").get_attribute("data-top1"))
    n_page = int(p.css("#measured-top1").get_attribute("data-tokens"))
    # the library, here: the same tokens and setting through evaluate_sample (its own full-cache reference)
    torch.set_num_threads(1)
    model, tok = agacc.load_model(packed_weights=True)
    ids = tr.token_ids
    s = Sample(index=0, kind="lm", prompt_ids=ids[:tr.n_prompt], target_ids=ids[tr.n_prompt:])
    ref = evaluate_sample(model, tok, s, [("setting", tr.config)], chunk=1, prefill_chunk=512)[0]
    print(f"measure: page KL {kl_page:.6f} top-1 {top1_page}/{n_page}; library KL {ref['kl'] / ref['tokens']:.6f} "
          f"top-1 {ref['top1']}/{ref['tokens']}")
    assert n_page == ref["tokens"] == len(ids) - tr.n_prompt
    assert kl_page == pytest.approx(ref["kl"] / ref["tokens"], rel=2e-3, abs=2e-5)
    assert top1_page == ref["top1"]
    # the curve marks the measured point at the setting's ratio
    p.wait(lambda: any("measured KL" in (t["name"] or "") for t in _data(p, "quality-curve")), 30, "the measured point")
    pts = next(t for t in _data(p, "quality-curve") if "measured KL" in t["name"])
    assert pts["y"][-1] == pytest.approx(kl_page, rel=1e-9)
    assert pts["x"][-1] == pytest.approx(ref["ratio"], rel=0.02)  # the same cache, counted by memory()
    assert re.search(r"top-1 agreement [\d.]+%", p.css("#measure-result").text)


def test_rerun_compare_and_a_second_setting_are_marked_on_the_curve(run):
    """Re-run + compare puts its lockstep KL and top-1 on the curve (== the exported trace's comparison);
    Measure quality with a target ratio of 6 adds a second point (== the numbers it reports)."""
    p, _, log = run
    p.js_click("rerun")
    p.wait(lambda: "Generating" in p.stats() or "Prefilling" in p.stats(), 60, "the re-run")
    p.wait(lambda: "Done" in p.stats(), 400, "the re-run to end", poll=0.5)
    # the lockstep point itself (the curve redraws after the run; until then it shows the last run's points)
    p.wait(lambda: any("measured KL" in (t["name"] or "") and any("lockstep" in s for s in t.get("text") or [])
                       for t in _data(p, "quality-curve")), 120, "the lockstep point on the curve")
    p.open_accordion("Export / import")
    tr = _export_trace(p, None)
    assert tr.compare and tr.compare["mean_kl"] is not None
    mem = tr.meta["memory"]
    kl_pts = next(t for t in _data(p, "quality-curve") if "measured KL" in t["name"])
    top_pts = next(t for t in _data(p, "quality-curve") if "top-1" in t["name"])
    assert len(kl_pts["x"]) == 1  # the new run's measurements only
    assert kl_pts["x"][0] == pytest.approx(mem["bytes_fp16"] / mem["bytes"], abs=1e-4)  # (4 decimals in the plot)
    assert kl_pts["y"][0] == pytest.approx(tr.compare["mean_kl"], rel=1e-9)
    assert top_pts["y"][0] == pytest.approx(1 - tr.compare["agreement"], rel=1e-9)
    # a second setting: a target ratio of 6, measured on the same text
    box = p.css("#knob-use-target input[type=checkbox]")
    p.d.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
    if not box.is_selected():
        box.click()
    p.set_number("knob-target-ratio", 6)
    time.sleep(2.0)
    p.d.execute_script("document.querySelector('#measure-quality').scrollIntoView({block: 'center'});"
                       "document.querySelector('#measure-quality').click();")
    p.wait(lambda: "agacc@6" in p.css("#measure-result").text, 300, "the measurement at 6x", poll=0.5)
    kl6 = float(p.css("#measured-kl").get_attribute("data-kl"))
    p.wait(lambda: len(next(t for t in _data(p, "quality-curve") if "measured KL" in t["name"])["x"]) == 2, 30,
           "the second measured point")
    kl_pts = next(t for t in _data(p, "quality-curve") if "measured KL" in t["name"])
    assert kl_pts["y"][1] == pytest.approx(kl6, rel=1e-9) and kl_pts["x"][1] > kl_pts["x"][0]
    time.sleep(1.5)
    _shot(p.css("#quality-panel"), "app_quality.png")
    assert "Traceback" not in Path(log).read_text()
