"""Real browser (headless Chromium): Stop during a Re-run + compare (the full cache in lockstep) settles
the page within 1 s, measured in the page's own clock (click on #stop -> the status line says Stopped),
and nothing of the run reaches the page after it."""
from __future__ import annotations

import time
from pathlib import Path

from tests.test_app_browser import ROOT, Page, make_driver

OUT = ROOT / "out"
PROMPT = "Write a long story about a dragon who learns to bake bread in a small mountain village."


# every text the status line shows after the click on Stop, with its time (for a failure's message)
JS_LOG = """
window.__slog = [];
const st = document.querySelector('#stats');
document.querySelector('#stop').addEventListener('click', () => window.__slog.push(['click', Date.now() / 1000]), {capture: true});
new MutationObserver(() => window.__slog.push([st.innerText.slice(0, 30), Date.now() / 1000])).observe(st, {childList: true, subtree: true, characterData: true});
"""


def test_stop_during_rerun_compare_within_a_second(app_url):
    url, proc, log = app_url
    d = make_driver(1400, 2000)
    p = Page(d)
    try:
        p.open(url)
        p.set_prompt(PROMPT)
        p.set_number("max-new-tokens", 400)
        latencies, logs = [], []
        for attempt in range(3):
            p.js_click("rerun")
            p.wait(lambda: "Generating" in p.stats() and len(p.output()) > 0, 300, "the re-run streaming")
            p.wait(lambda: "top-1 agreement" in p.css("#compare-stats").text, 60, "the lockstep comparison")
            time.sleep(2.0 + attempt)
            d.execute_script(JS_LOG)
            latencies.append(p.stop_and_measure(60))
            logs.append(d.execute_script("return window.__slog"))
            text = p.output()
            time.sleep(2.0)
            assert "Stopped" in p.stats() and "Generating" not in p.stats(), p.stats()
            assert p.output() == text, "the output kept growing after Stop"
        print("stop latencies during a re-run + compare (page clock):", [round(x, 3) for x in latencies])
        assert max(latencies) < 1.0, (latencies, logs)  # logs: what the status line said when, after the click
    except Exception:
        d.save_screenshot(str(OUT / "test_app_stop_failed.png"))
        print(Path(log).read_text()[-3000:])
        raise
    finally:
        d.quit()
    print("\n".join(line for line in Path(log).read_text().splitlines() if "stop:" in line))
