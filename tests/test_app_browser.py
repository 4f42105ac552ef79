"""Real browser (headless Debian chromium + chromedriver) against ``python app.py``: type a prompt,
Generate, watch the text stream and the four plots fill, move a threshold slider and see the tier
map change (policy replay), Generate again and press Stop mid-run. Saves a screenshot
(out/test_app_browser.png).

    python tests/test_app_browser.py --screenshot docs/screenshot.png   # the README screenshot
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
PROMPT = ("Read this note and answer the question. The storm reached the island on a Tuesday. Mara Quill, who ran the "
          "post office, kept a small parcel for the lighthouse keeper Tobias Venn. He told her to open it only if the "
          "light went out. At eleven minutes past two the lamp failed. Inside the parcel she found a brass key, a chart "
          "of the northern reef and a letter saying the lamp had never been electric. Question: what three things "
          "were in the parcel, and when did the lamp fail?")

PLOTS = ["importance-heatmap", "tier-map", "bits-map", "memory-chart"]
JS_PLOT_POINTS = """
const el = document.querySelector('#' + arguments[0] + ' .js-plotly-plot');
if (!el || !el.data) return 0;
let n = 0;
for (const t of el.data) { if (t.z) n += t.z.length; else if (t.y && t.y.length && t.y[0] !== null) n += t.y.length; }
return n;"""
JS_RECORD_LENGTHS = """
window.__agaccLens = [];
window.__agaccTimer = setInterval(() => {
  const t = document.querySelector('#output textarea');
  const s = document.querySelector('#stats');
  const rec = [t ? t.value.length : -1, !!(s && s.innerText.includes('Generating'))];
  const last = window.__agaccLens[window.__agaccLens.length - 1];
  if (!last || last[0] !== rec[0] || last[1] !== rec[1]) window.__agaccLens.push(rec);
}, 25);"""
# Stop latency as the page sees it: from the click on #stop (capture phase) to the status line saying
# "Stopped" (a MutationObserver), in the page's own clock
JS_STOP_PROBE = """
window.__stop = {t0: null, t1: null};
const st = document.querySelector('#stats');
document.querySelector('#stop').addEventListener('click', () => { if (window.__stop.t0 === null) window.__stop.t0 = performance.now(); }, {capture: true});
new MutationObserver(() => {
  if (window.__stop.t0 !== null && window.__stop.t1 === null && st.innerText.includes('Stopped')) window.__stop.t1 = performance.now();
}).observe(st, {childList: true, subtree: true, characterData: true});"""
JS_PLOT_Z = """
const el = document.querySelector('#' + arguments[0] + ' .js-plotly-plot');
return el && el.data && el.data[0] && el.data[0].z ? JSON.stringify(el.data[0].z) : null;"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _have_browser() -> bool:
    return Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()


def start_app(port: int, log_path: Path, extra_env: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), AGACC_THREADS="1",
               AGACC_OFFLINE="1", PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False")
    env.update(extra_env or {})
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 400  # a first start on a fresh machine converts the model and builds the kernels
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"app.py did not answer on {url}:\n{log_path.read_text()[-3000:]}")


def make_driver(width: int = 1600, height: int = 2400):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for a in ("--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
              "--no-first-run", "--headless=new", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


class Page:
    def __init__(self, driver):
        self.d = driver

    def open(self, url: str) -> "Page":
        """Load the app and wait for its prompt box."""
        self.d.get(url)
        self.wait(lambda: self.css("#prompt textarea"), 120, "the prompt box")
        return self

    def open_accordion(self, title: str) -> None:
        """Open the accordion whose label contains ``title`` (left open if it is)."""
        for b in self.d.find_elements("css selector", "button.label-wrap"):
            if title in b.text:
                if "open" not in (b.get_attribute("class") or ""):
                    self.d.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].click();", b)
                time.sleep(0.5)
                return

    def wait(self, cond, timeout=60.0, what="condition", poll=0.1):
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            try:
                last = cond()
                if last:
                    return last
            except Exception as e:  # element not there yet
                last = e
            time.sleep(poll)
        raise AssertionError(f"timed out waiting for {what} (last: {last!r})")

    def css(self, sel):
        from selenium.webdriver.common.by import By

        return self.d.find_element(By.CSS_SELECTOR, sel)

    def output(self) -> str:
        return self.css("#output textarea").get_attribute("value") or ""

    def stats(self) -> str:
        return self.css("#stats").text

    def points(self, elem_id) -> int:
        return int(self.d.execute_script(JS_PLOT_POINTS, elem_id) or 0)

    def z(self, elem_id):
        return self.d.execute_script(JS_PLOT_Z, elem_id)

    def set_number(self, elem_id: str, value) -> None:
        """Type into the number box of a gr.Slider / gr.Number and commit it (Enter, then blur)."""
        from selenium.webdriver.common.keys import Keys

        box = self.css(f"#{elem_id} input[type=number]")
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
        box.click()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(value))
        box.send_keys(Keys.ENTER)
        box.send_keys(Keys.TAB)

    def click(self, elem_id: str) -> None:
        el = self.css(f"#{elem_id}")
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
        el.click()

    def js_click(self, elem_id: str) -> None:
        """Click through the page's own event loop (a WebDriver click also waits for the element to be
        hit-testable, which a busy page can delay well past the click itself)."""
        self.d.execute_script("document.querySelector('#' + arguments[0]).click();", elem_id)

    def stop_and_measure(self, timeout: float = 60.0) -> float:
        """Press Stop and return the seconds, in the page's clock, until the status line says Stopped."""
        self.d.execute_script(JS_STOP_PROBE)
        self.js_click("stop")
        self.wait(lambda: self.d.execute_script("return window.__stop.t1 !== null"), timeout, "the stopped status")
        t = self.d.execute_script("return window.__stop")
        return (t["t1"] - t["t0"]) / 1000.0

    def set_prompt(self, text: str) -> None:
        from selenium.webdriver.common.keys import Keys

        box = self.css("#prompt textarea")
        box.click()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        box.send_keys(text)


def test_browser_stream_plots_replay_stop(app_url):
    url, proc, log = app_url
    driver = make_driver()
    shot = ROOT / "out" / "test_app_browser.png"
    shot.parent.mkdir(exist_ok=True)
    try:
        p = Page(driver)
        driver.get(url)
        p.wait(lambda: p.css("#prompt textarea"), 60, "the prompt box")
        p.set_prompt(PROMPT)
        assert p.css("#prompt textarea").get_attribute("value").startswith("Read this note")
        p.set_number("max-new-tokens", 24)
        # record, inside the page, every output length the DOM shows while the run is going
        driver.execute_script(JS_RECORD_LENGTHS)
        p.click("generate")
        for pid in PLOTS:
            p.wait(lambda pid=pid: p.points(pid) > 0, 120, f"data in #{pid}")
        p.wait(lambda: "Done" in p.stats(), 120, "the end of the run")
        seen = driver.execute_script("clearInterval(window.__agaccTimer); return window.__agaccLens;")
        # the text streamed: it showed several partial outputs (while the stats said Generating) before the end
        partial = {n for n, generating in seen if n > 0 and generating}
        assert len(partial) >= 2, f"output did not stream: (length, generating) seen {seen}"
        assert "tokens/s" in p.stats() and "MiB saved" in p.stats()
        assert driver.execute_script("return document.querySelectorAll('#token-view .tv-t').length") > 50
        for pid in PLOTS:
            assert p.points(pid) > 0, pid
        # tune by hand: a threshold slider re-applies the policy to the recorded importance
        before = p.z("tier-map")
        assert before and any(z in (2, 3, 4) for row in json.loads(before) for z in row), \
            "the run has no quantised block, so moving tau_l cannot change the tier map"
        tau_h = float(p.css("#knob-tau-h input[type=number]").get_attribute("value"))
        tau_l_max = float(p.css("#knob-tau-l input[type=number]").get_attribute("max"))
        # as high as the slider goes, below tau_h: the quantised blocks under it become pruned (a value
        # past the slider's maximum is refused by the server)
        p.set_number("knob-tau-l", round(min(tau_h - 0.05, tau_l_max), 2))
        p.wait(lambda: p.z("tier-map") != before, 30, "the tier map to change after moving tau_l")
        p.wait(lambda: "Replayed" in p.css("#replay-note").text, 30, "the replay note")
        # Stop mid-run: the story example writes on for hundreds of tokens (the note's answer ends at
        # its end-of-text token within a few seconds)
        p.click("ex-story")
        p.wait(lambda: len(p.css("#prompt textarea").get_attribute("value") or "") > 1000, 30, "the story prompt")
        p.set_number("max-new-tokens", 400)
        p.click("generate")
        p.wait(lambda: "Generating" in p.stats() and len(p.output()) > 0, 120, "a second run streaming")
        time.sleep(0.5)
        latency = p.stop_and_measure(60)
        print(f"stop latency in decode (page clock): {latency:.2f} s")
        text = p.output()
        time.sleep(2.0)
        assert p.output() == text, "the output kept growing after Stop"
        assert "Stopped" in p.stats(), "something of the run reached the page after Stop"
        assert latency < 15.0
        assert proc.poll() is None, "the app died"
        driver.save_screenshot(str(shot))
    except Exception:
        driver.save_screenshot(str(shot.with_name("test_app_browser_failed.png")))
        print(log.read_text()[-4000:])
        raise
    finally:
        driver.quit()


def make_screenshot(path: str, example: str = "ex-passkey", max_new_tokens: int = 40, compare: bool = True) -> None:
    """The README screenshot: an example prompt, the full-cache comparison on, the page after the run."""
    port = _free_port()
    log = Path("/tmp/agacc-screenshot-app.log")
    proc = start_app(port, log)
    driver = make_driver(1680, 2350)
    try:
        p = Page(driver)
        driver.get(f"http://127.0.0.1:{port}/")
        p.wait(lambda: p.css("#prompt textarea"), 60, "the prompt box")
        p.click(example)
        time.sleep(1.0)
        p.set_number("max-new-tokens", max_new_tokens)
        if compare:
            p.click("compare")
        p.click("generate")
        p.wait(lambda: "Done" in p.stats(), 600, "the end of the run", poll=0.5)
        time.sleep(2.0)
        driver.execute_script("window.scrollTo(0, 0);")
        time.sleep(0.5)
        driver.save_screenshot(path)
        print(json.dumps({"screenshot": path, "stats": p.stats()}))
    finally:
        driver.quit()
        proc.terminate()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--screenshot", default="docs/screenshot.png")
    ap.add_argument("--example", default="ex-passkey")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--no-compare", action="store_true")
    a = ap.parse_args()
    make_screenshot(a.screenshot, a.example, a.max_new_tokens, not a.no_compare)
