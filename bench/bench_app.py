"""Streaming speed of the app on the embedded model: time to first token (TTFT) and tokens/s.

Rows (same prompt, greedy, same number of new tokens):
  generate / DynamicCache     plain ``model.generate`` with the full 16/32-bit cache (SDPA)
  generate / CompressedCache  ``model.generate`` with the AGACC cache, no streaming
  session                     ``agacc.session.GenerationSession`` streaming, no plots
  app handler (live plots)    the app's generator (``AgaccApp.generate``): figures, token view and
                              stats re-drawn every AGACC_DRAW_INTERVAL s, JSON-encoded as gradio sends them
  app via gradio_client       end to end through the gradio queue and SSE, the client in the same process
  app in Chromium             ``python app.py`` in its own process, driven by headless Chromium (--browser):
                              the example prompt clicked, Generate, text arrival timed inside the page; the
                              note gives what the UI's stats line showed

    python bench/bench_app.py [--tokens 64] [--prompt document|passkey|story] [--threads N] [--browser [--browser-runs 3]]
                              [--out out/bench_app.json]
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import time
from pathlib import Path

import torch

from bench.common import ROOT, write_json


class _Clock:
    """A generate() streamer that timestamps every new token."""

    def __init__(self):
        self.t = []
        self.first_call = True

    def put(self, value):
        if self.first_call:  # the prompt
            self.first_call = False
            return
        self.t.append(time.perf_counter())

    def end(self):
        pass


def _rates(t0, stamps):
    n = len(stamps)
    ttft = stamps[0] - t0 if n else float("nan")
    tps = (n - 1) / (stamps[-1] - stamps[0]) if n > 1 and stamps[-1] > stamps[0] else float("nan")
    return ttft, tps, n


def bench_generate(model, ids, cache_factory, n):
    clock = _Clock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache_factory(),
                       max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock)
    return _rates(t0, clock.t)


def bench_session(model, tok, prompt, cfg, n):
    from agacc.session import GenerationSession

    s = GenerationSession(model, tok, prompt, cfg, max_new_tokens=n)
    t0 = time.perf_counter()
    stamps = [time.perf_counter() for _ in s.stream()]
    return _rates(t0, stamps)


def bench_app_handler(app, prompt, knob_values, n):
    """The app's own generator: what the server does per session, minus the transport. Inputs by
    name, as gradio passes them (the knobs: ``controls.preset_values``)."""
    gen = app.generate(request=None, prompt=prompt, model=app.default_model, trust_remote_code=False, preset="agacc",
                       max_new_tokens=n, temperature=0.0, seed=0, compare=False, chat_template=True, **knob_values)
    t0 = time.perf_counter()
    stamps, redraws, payload = [], 0, 0
    prev_text, prev = "", []
    for upd in gen:
        text = upd[0] if isinstance(upd[0], str) else None
        for i, v in enumerate(upd):  # what gradio would send: new plot JSON, HTML, markdown (a value sent
            if i < len(prev) and v is prev[i]:  # again is diffed to nothing)
                continue
            plot = getattr(v, "plot", None)
            if plot is not None:
                payload += len(plot)
                redraws += 1
            elif isinstance(v, str):
                payload += len(v)
        prev = upd
        if text and text != prev_text:
            stamps.append(time.perf_counter())
            prev_text = text
    tr = app.sessions.get("default").trace
    n_tok = tr.meta["new_tokens"]
    ttft = (stamps[0] - t0) if stamps else float("nan")
    tps = (n_tok - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return ttft, tps, n_tok, redraws, payload, tr.meta


def bench_app_client(app, prompt, knob_values, n):
    from gradio_client import Client

    import app as A

    demo = app.demo
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, **A.launch_kwargs())
    try:
        c = Client(f"http://127.0.0.1:{port}/", verbose=False)
        t0 = time.perf_counter()
        job = c.submit(prompt=prompt, preset="agacc", max_new_tokens=n, temperature=0.0, seed=0, compare=False,
                       chat_template=True, api_name="/generate", **knob_values)
        stamps, seen, plot_updates = [], 0, 0
        prev = None
        while not job.done() or seen < len(job.outputs()):
            outs = job.outputs()
            for o in outs[seen:]:
                if o[0] and o[0] != prev:
                    stamps.append(time.perf_counter())
                    prev = o[0]
                plot_updates += 1
            seen = len(outs)
            time.sleep(0.01)
        job.result()
        tr = app.sessions.get(c.session_hash).trace
        n_tok = tr.meta["new_tokens"]
        ttft = stamps[0] - t0 if stamps else float("nan")
        tps = (n_tok - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
        return ttft, tps, n_tok, len(stamps), tr.meta
    finally:
        demo.close()


JS_RECORD_TEXT = """
window.__agaccT0 = performance.now();
window.__agaccText = [];
const before = (document.querySelector('#output textarea') || {}).value;  // the previous run's text
window.__agaccTimer = setInterval(() => {
  const t = document.querySelector('#output textarea');
  const v = t ? t.value : '';
  const last = window.__agaccText[window.__agaccText.length - 1];
  if (v && (last ? last[1] !== v.length : v !== before)) window.__agaccText.push([performance.now(), v.length]);
}, 5);"""


def _cpu_seconds(name: str) -> float:
    """CPU seconds (user + system) used so far by the processes whose command name starts with ``name``."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            comm, rest = stat.read_text().rsplit(")", 1)
        except OSError:
            continue
        if comm.split("(", 1)[1].startswith(name):
            f = rest.split()
            total += int(f[11]) + int(f[12])
    return total / os.sysconf("SC_CLK_TCK")


def bench_browser(prompt_name, n, threads, runs=3):
    """The real app in its own process and a headless Chromium: TTFT from the click to the first text
    in the page; tokens/s over the text updates the page received (first to last, n - 1 tokens).
    ``runs`` measured runs after a warm-up one; returns their means, the note gives each run."""
    import re

    from tests.test_app_browser import Page, _free_port, make_driver, start_app

    port = _free_port()
    log = Path("/tmp/agacc-bench-app.log")
    proc = start_app(port, log, {"AGACC_THREADS": str(threads), "AGACC_DRAW_INTERVAL": os.environ.get("AGACC_DRAW_INTERVAL", "0.3")})
    driver = make_driver()
    try:
        p = Page(driver)
        driver.get(f"http://127.0.0.1:{port}/")
        p.wait(lambda: p.css("#prompt textarea"), 120, "the prompt box")
        p.click(f"ex-{prompt_name}")
        p.wait(lambda: len(p.css("#prompt textarea").get_attribute("value") or "") > 100, 30, "the example prompt")
        p.set_number("max-new-tokens", n)
        time.sleep(1.0)
        per_run = []
        for run in range(1 + runs):  # the first run warms the server (model load, kernel, allocators)
            cpu0, t_run = _cpu_seconds("chrom"), time.perf_counter()
            driver.execute_script(JS_RECORD_TEXT)
            p.click("generate")
            p.wait(lambda: "Done" not in p.stats(), 60, "the run to start", poll=0.05)
            p.wait(lambda: "Done" in p.stats(), 600, "the end of the run", poll=0.2)
            seen = driver.execute_script("clearInterval(window.__agaccTimer); return [window.__agaccT0, window.__agaccText];")
            browser_cores = (_cpu_seconds("chrom") - cpu0) / (time.perf_counter() - t_run)
            t0, texts = seen
            stats = p.stats()
            ntok = int(re.search(r"(\d+) new", stats).group(1))
            ttft = (texts[0][0] - t0) / 1000 if texts else float("nan")
            span = (texts[-1][0] - texts[0][0]) / 1000 if len(texts) > 1 else 0.0
            tps = (ntok - 1) / span if span > 0 else float("nan")
            ui = re.search(r"time to first token ([\d.]+) s . ([\d.]+) tokens/s", stats)
            if run:
                per_run.append((ttft, tps, ntok, len(texts), browser_cores, float(ui.group(2)) if ui else float("nan")))
        mean = [sum(r[i] for r in per_run) / len(per_run) for i in range(6)]
        note = (f"mean of {len(per_run)} runs (page tokens/s {', '.join(f'{r[1]:.2f}' for r in per_run)}); "
                f"{mean[3]:.0f} text updates in the page; Chromium used {mean[4]:.2f} cores; "
                f"UI showed {mean[5]:.1f} tokens/s ({', '.join(f'{r[5]:.1f}' for r in per_run)})")
        return mean[0], mean[1], per_run[-1][2], note
    finally:
        driver.quit()
        proc.terminate()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", default="document", choices=["document", "passkey", "story"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: as the app sets them)")
    ap.add_argument("--no-client", action="store_true", help="skip the end-to-end gradio_client row")
    ap.add_argument("--browser", action="store_true", help="add the row of the real app in headless Chromium")
    ap.add_argument("--browser-runs", type=int, default=3, help="measured browser runs (after a warm-up), averaged")
    ap.add_argument("--out", default=str(ROOT / "out" / "bench_app.json"))
    a = ap.parse_args(argv)

    import agacc
    import app as A
    from agacc.spec import parse_method
    from components import controls
    from transformers import DynamicCache

    if a.threads:
        os.environ["AGACC_THREADS"] = str(a.threads)
    threads = A.set_threads()
    prompt = (ROOT / "assets" / "examples" / f"{a.prompt}.txt").read_text()
    app = A.AgaccApp(offer_hub=False)
    app.build()
    _, model, tok = app.models.get(None)
    cfg = parse_method("agacc")  # the app's default method, as its handler runs it below
    values = controls.preset_values("agacc")
    from agacc.session import encode_prompt

    ids = encode_prompt(tok, prompt).to(model.device)
    n = a.tokens
    # warm-up (allocators, kernels, tokenizer caches)
    bench_generate(model, ids[:, :64], lambda: DynamicCache(config=model.config), 4)
    bench_session(model, tok, "warm up", cfg, 4)

    rows = []

    def add(name, ttft, tps, ntok, note=""):
        rows.append({"path": name, "ttft_s": round(ttft, 3), "tokens_per_s": round(tps, 2), "new_tokens": ntok,
                     "note": note})
        print(f"  {name:32s} TTFT {ttft:6.2f} s   {tps:6.2f} tokens/s   ({ntok} tokens) {note}", flush=True)

    packed = bool(getattr(model, "agacc_packed_layers", 0))
    print(f"prompt {a.prompt}: {ids.shape[1]} tokens, {n} new tokens, torch threads {threads}, device {model.device}, "
          f"weights: {'the GGUF blocks (packed_weights)' if packed else str(model.dtype)}")
    add("generate / DynamicCache", *bench_generate(model, ids, lambda: DynamicCache(config=model.config), n))
    add("generate / CompressedCache", *bench_generate(model, ids, lambda: agacc.CompressedCache(model.config, cfg), n))
    add("session (stream, no plots)", *bench_session(model, tok, prompt, cfg, n))
    ttft, tps, ntok, redraws, payload, meta = bench_app_handler(app, prompt, values, n)
    add("app handler (live plots)", ttft, tps, ntok,
        f"{redraws} figure updates, {payload / 2 ** 20:.1f} MiB sent; UI showed TTFT {meta['ttft']:.2f} s, "
        f"{meta['tokens_per_s']:.1f} tokens/s")
    if not a.no_client:
        ttft, tps, ntok, updates, meta = bench_app_client(app, prompt, values, n)
        add("app via gradio_client", ttft, tps, ntok,
            f"{updates} text updates received; UI showed TTFT {meta['ttft']:.2f} s, {meta['tokens_per_s']:.1f} tokens/s")
    if a.browser:
        add("app in Chromium", *bench_browser(a.prompt, n, threads, a.browser_runs))
    mem = meta.get("memory") or {}
    result = {"prompt": a.prompt, "prompt_tokens": int(ids.shape[1]), "new_tokens": n, "threads": threads,
              "device": str(model.device), "dtype": str(model.dtype), "packed_weights": packed,
              "cpu": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
              "draw_interval_s": A.DRAW_INTERVAL, "rows": rows,
              "kv_bytes": mem.get("bytes"), "kv_bytes_fp16": mem.get("bytes_fp16"), "kv_ratio": mem.get("ratio")}
    write_json(a.out, result)
    print("\n| path | TTFT (s) | tokens/s | note |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['ttft_s']:.2f} | {r['tokens_per_s']:.2f} | {r['note']} |")
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
