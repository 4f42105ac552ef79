"""Results page: every preset at ratios 2, 4, 8 on ppl, passkey and needle at 1K, 2K and 4K tokens
on the embedded model -> docs/results.md (+ the JSON records).

Each (preset, ratio) prefills the sample through its own cache in chunks of --prefill-chunk tokens,
compressing as it goes (what the library does by default; --prefill-chunk 0: one full-precision
prefill forward shared by every method, compressed at its end, as before). Passkey and needle scored by greedy-match (one teacher-forced pass over the answer, see agacc/eval/runner.py);
ppl teacher-forces --decode-tokens tokens in chunks of 8 through the cache. Cells run in the order
length -> task -> sample, and the run stops starting new samples after --budget-min minutes: what
did not run is marked as missing. Results are appended to the JSON after every sample, and
--resume skips what it already holds; with --redo P [P ...] it re-runs those presets (every ratio)
on the samples it holds and keeps the other presets' results (after a change to one method);
--redo-missing-only makes such a run skip what it already redid with this --prefill-chunk, so a
--redo run cut by --budget-min continues where it stopped.

    python bench/make_results.py --budget-min 40          # run + write docs/results.md
    python bench/make_results.py --render-only            # rewrite the page (and its plots) from the JSON

The field's own implementations run beside the presets (agacc.eval.external): kvpress's presses in their
own environment (`bash scripts/setup_kvpress.sh`; fitted to each ratio at equal bytes, one prefill
forward as kvpress's pipeline does) and transformers' QuantizedCache (fixed bits); where one cannot run,
its row says "skipped: why". --protocol query-agnostic runs the retrieval tasks with the context
compressed before the question is known (ppl has no question): its tables sit beside the query-aware
ones, e.g. `--resume --protocol query-agnostic --redo agacc full kvpress:snapkv` on the samples held.

The page opens with a Pareto plot per task (bench/pareto.py): score vs measured ratio of every
method, written as pareto_<task>.png next to the page (needs matplotlib; without it, no PNG and a note).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from agacc.eval.runner import PROTOCOLS
from bench.common import ROOT, parse_methods
from bench.pareto import PROTOCOL_DEFAULT as QUERY_AWARE, protocol_of

# kv-distill: its own cache (agacc.kv_distill), trained by `python -m agacc distill`; "skipped" rows until then
RATIO_PRESETS = ["agacc", "dynacompress", "attention-sum", "h2o", "streamingllm", "snapkv", "pyramidkv", "fastkv", "dynamickv",
                 "kv-distill"]
FIXED = ["full", "uniform-int8", "uniform-int4", "uniform-int2"]
# the field's implementations (docs/baselines.md): kvpress presses at each ratio, QuantizedCache at its bits
EXTERNAL_RATIO = ["kvpress:snapkv", "kvpress:tova", "kvpress:expected_attention", "kvpress:knorm", "kvpress:streaming_llm"]
EXTERNAL_FIXED = ["hf-quantized:quanto-4", "hf-quantized:hqq-4", "hf-quantized:quanto-2", "hf-quantized:hqq-2"]
OWN = FIXED + RATIO_PRESETS
ROWS = FIXED[:1] + RATIO_PRESETS + EXTERNAL_RATIO + FIXED[1:] + EXTERNAL_FIXED  # table order
ADAPTIVE = "agacc"


def base(label: str) -> str:
    """A result label's method: ``agacc@4`` -> ``agacc``, ``kvpress:snapkv@4`` -> ``kvpress:snapkv``."""
    return label.partition("@")[0]


def run(args) -> None:
    import torch

    import agacc
    from agacc.eval import runner, tasks as T

    torch.manual_seed(0)
    out_json = Path(args.json)
    done = json.loads(out_json.read_text()) if (args.resume and out_json.exists()) else {"meta": {}, "samples": []}
    have = {(s["task"], s["context_tokens"], s["sample"]): s for s in done["samples"]}
    model, tok = agacc.load_model()
    text = T.read_text(args.text)
    configs = _configs(FIXED + EXTERNAL_FIXED + [f"{p}@{r:g}" for r in args.ratios
                                                 for p in RATIO_PRESETS + EXTERNAL_RATIO])  # labels: P, P@R
    by_label = dict(configs)
    runs = done["meta"].get("runs") or ([_run_of(done["meta"])] if done["meta"] else [])
    this = {"command": " ".join([sys.executable.split("/")[-1]] + sys.argv), "lengths": args.lengths,
            "prefill_chunk": args.prefill_chunk, "protocol": args.protocol, "torch_threads": torch.get_num_threads(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    done["meta"] = {"text": args.text or "default", "decode_tokens": args.decode_tokens, "ppl_windows": args.ppl_windows,
                    "depths": args.depths, "ratios": args.ratios, "runs": runs + [this]}
    t_start = time.time()
    for n in args.lengths:
        for task in args.tasks:
            if task == "ppl" and args.protocol != QUERY_AWARE:
                print(f"ppl has no question: skipped under --protocol {args.protocol}", flush=True)
                continue
            if task == "ppl":
                samples = T.ppl(tok, n, args.ppl_windows, text=text, decode_tokens=args.decode_tokens)
            elif task == "passkey":
                samples = T.passkey(tok, n, len(args.depths), depths=args.depths)
            else:
                samples = T.needle(tok, n, len(args.depths), depths=args.depths, text=text)
            for s in samples:
                held = have.get((task, n, s.index))
                todo = to_run(configs, held, args.redo, args.prefill_chunk if args.redo_missing_only else None,
                              args.protocol)
                if not todo:
                    continue
                if (time.time() - t_start) / 60 > args.budget_min:
                    print(f"budget reached: skipping {task} {n} sample {s.index}", flush=True)
                    continue
                t0 = time.time()
                res = runner.evaluate_sample(model, tok, s, todo, scoring="match", chunk=8, protocol=args.protocol,
                                             prefill_chunk=args.prefill_chunk or None, log=lambda r: print(
                    f"  {r['preset']}: score {r['score']:.3f} ratio {r['ratio']:.2f} build {r['build_s']:.1f}s decode {r['decode_s']:.1f}s", flush=True))
                for r in res:  # 0: one prefill forward (shared by the store's presets; kv-distill's and kvpress's always)
                    cfg = by_label[r["preset"]]
                    r["prefill_chunk"] = 0 if hasattr(cfg, "build") or getattr(cfg, "in_worker", False) else args.prefill_chunk
                if held is None:
                    done["samples"].append({"task": task, "context_tokens": n, "sample": s.index, "results": res,
                                            "seconds": time.time() - t0})
                else:  # --redo (or another protocol): replace those presets' results in this protocol, keep the rest
                    replace(held, res)
                out_json.write_text(json.dumps(done, indent=0))
                print(f"{task} {n} sample {s.index}: {time.time() - t0:.0f}s (total {(time.time() - t_start) / 60:.1f} min)", flush=True)
    this["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    this["minutes"] = round((time.time() - t_start) / 60, 1)
    out_json.write_text(json.dumps(done, indent=0))


def _configs(specs: list[str]) -> list:
    """(label, config) per spec: the store's presets (``parse_methods``) and kv-distill (``agacc.eval.external``)."""
    from agacc.eval.external import is_external_name, parse_external

    return [parse_external(s) if is_external_name(s) else parse_methods([s])[0] for s in specs]


def to_run(configs: list, held: dict | None, redo, same_prefill: int | None = None, protocol: str = QUERY_AWARE) -> list:
    """The (label, config) pairs to run on one sample under ``protocol``: all of them when nothing is held
    for it (or, without ``redo``, nothing in this protocol), else those of the ``redo`` presets --
    skipping, when ``same_prefill`` is given (``--redo-missing-only``), every label whose held result in
    this protocol was already made with that prefill chunk (a cut ``--redo`` run continues where it
    stopped instead of starting over)."""
    if held is None:
        return list(configs)
    mine = [r for r in held["results"] if protocol_of(r) == protocol]
    if not mine and not redo:
        return list(configs)
    done = {r["preset"] for r in mine if same_prefill is not None and r.get("prefill_chunk", 0) == same_prefill}
    return [(name, c) for name, c in configs if base(name) in redo and name not in done]


def replace(held: dict, new: list) -> None:
    """Put results ``new`` into a held sample, each replacing the held result of its label and protocol."""
    keys = {(r["preset"], protocol_of(r)) for r in new}
    held["results"] = [r for r in held["results"] if (r["preset"], protocol_of(r)) not in keys] + new


def merge(done: dict, src: dict, redo, tasks, lengths) -> int:
    """Take into ``done`` the ``redo`` presets' results of ``src`` (a page's JSON written by another
    process, e.g. one ``--tasks`` share of a split run) for the samples of ``tasks`` x ``lengths`` both
    hold, and the runs ``src`` adds. -> the number of results taken."""
    have = {(s["task"], s["context_tokens"], s["sample"]): s for s in done["samples"]}
    taken = 0
    for s in src["samples"]:
        held = have.get((s["task"], s["context_tokens"], s["sample"]))
        if held is None or s["task"] not in tasks or s["context_tokens"] not in lengths:
            continue
        new = [r for r in s["results"] if base(r["preset"]) in redo]
        replace(held, new)
        taken += len(new)
    done["meta"]["runs"] += [r for r in src["meta"].get("runs", []) if r not in done["meta"]["runs"]]
    return taken


def _run_of(meta: dict) -> dict:
    """A run's entry from the flat meta that pages written before the run list held (one prefill forward)."""
    return {k: meta.get(k) for k in ("command", "lengths", "torch_threads", "started", "finished", "minutes")} | {
        "prefill_chunk": meta.get("prefill_chunk", 0)}


def prefill_note(data, task: str, n: int, protocol: str = QUERY_AWARE) -> str:
    """How the prompts of one table went in, from the results' recorded prefill chunk (records written
    before it was recorded: one forward), naming the presets of each kind when a table mixes them."""
    by_chunk: dict = {}
    for s in data["samples"]:
        if s["task"] == task and s["context_tokens"] == n:
            for r in s["results"]:
                if not r.get("skipped") and protocol_of(r) == protocol:
                    by_chunk.setdefault(r.get("prefill_chunk", 0), set()).add(base(r["preset"]))
    say = {0: "one prefill forward, compressed at its end"}
    parts = [say.get(c, f"chunks of {c} tokens, each method compressing as it goes")
             + (f" ({', '.join(sorted(ps))})" if len(by_chunk) > 1 else "") for c, ps in sorted(by_chunk.items())]
    return "Prefill: " + "; ".join(parts) + "."


def _key(s: dict, r: dict) -> tuple:
    preset, _, rt = r["preset"].partition("@")
    return s["task"], s["context_tokens"], preset, float(rt) if rt else None


def skips(data, protocol: str = QUERY_AWARE) -> dict:
    """(task, length, preset, ratio) -> why the method could not run there ("skipped: ..."): a method
    without its package, kv-distill without weights (a cell with results shows those instead)."""
    why: dict = {}
    for s in data["samples"]:
        for r in s["results"]:
            if r.get("skipped") and protocol_of(r) == protocol:
                why.setdefault(_key(s, r), r["skipped"])
    return why


def cells(data, protocol: str = QUERY_AWARE) -> dict:
    """(task, length, preset, ratio) -> aggregate over the samples run under ``protocol`` (score, ratio,
    MB, tok/s, ppl...; ``by_sample``: each sample's score, for paired comparisons)."""
    import math

    acc: dict = {}
    for s in data["samples"]:
        for r in s["results"]:
            if r.get("skipped") or protocol_of(r) != protocol:  # skipped: a method that could not run here
                continue
            acc.setdefault(_key(s, r), []).append((s["sample"], r))
    out = {}
    for key, srs in acc.items():
        rs = [r for _, r in srs]
        k = len(rs)
        kv, kv16 = sum(r["kv_bytes"] for r in rs), sum(r["kv_bytes_fp16"] for r in rs)
        c = {"n": k, "score": sum(r["score"] for r in rs) / k, "ratio": kv16 / kv, "mb": kv / k / 1e6,
             "by_sample": {i: r["score"] for i, r in srs},
             "mb16": kv16 / k / 1e6,
             "tps": sum(r["decoded_tokens"] for r in rs) / max(1e-9, sum(r["decode_s"] for r in rs)),
             "build_s": sum(r["build_s"] for r in rs) / k}
        if "nll" in rs[0]:
            toks = sum(r["tokens"] for r in rs)
            c.update(ppl=math.exp(sum(r["nll"] for r in rs) / toks), ppl_full=math.exp(sum(r["nll_full"] for r in rs) / toks),
                     top1=sum(r["top1"] for r in rs) / toks, kl=sum(r["kl"] for r in rs) / toks)
            c["score"] = min(1.0, c["ppl_full"] / c["ppl"])
        out[key] = c
    return out


def render(data, ratios, lengths, tasks, plot_dir=None) -> str:
    """The page's markdown; with ``plot_dir`` also its Pareto plots, ``plot_dir/pareto_<task>.png``."""
    from bench.pareto import render_section

    m = data["meta"]
    L = []
    L.append("# Results: AGACC vs baselines on the embedded model\n")
    L.append("Produced by `bench/make_results.py` (do not edit by hand). Model: SmolLM2-135M-Instruct "
             "(embedded, fp32, CPU). Every method is a preset of the same compressed store but `kv-distill` (its "
             "own cache of the kept tokens at 16 bits, its selector and adapter trained here: `python -m agacc distill`, "
             "docs/baselines.md) and the field's own implementations: `kvpress:*` (NVIDIA kvpress 0.5.5's presses in "
             "their own environment, `bash scripts/setup_kvpress.sh`: transformers 5.2, the same torch 2.13 CPU build; "
             "fitted to each ratio at equal bytes, so in fp32 `@4` keeps 1/8 of the tokens) and `hf-quantized:*` "
             "(transformers 5.23's `QuantizedCache` with optimum-quanto 0.2.7 and hqq 0.2.8.post1, groups of 64, "
             "the last 128 tokens at full precision). "
             "Memory is the bytes each cache actually holds at the end of each sample (`cache.memory()`, tracker "
             "included; the external methods' tensors walked, each storage once; query-agnostic: the compressed "
             "context) and the ratio is measured: 16-bit bytes of the same tokens / bytes held.\n")
    for run in m.get("runs") or [_run_of(m)]:
        L.append(f"Command: `{run.get('command')}`  \nStarted {run.get('started')}, finished {run.get('finished', 'not finished')}"
                 f" ({run.get('minutes', '?')} min), torch threads {run.get('torch_threads')}."
                 + (f" {run['note'][0].upper()}{run['note'][1:]}." if run.get("note") else "") + "\n")
    L.append("The machine is a shared 2-core CPU: tokens/s are indicative only. Each table says how its prompts "
             "went in (one prefill forward, or chunks compressed as they go: the library's default).\n")
    L.append("## How to read\n")
    windows = m.get("ppl_windows", 1)
    L.append(f"- **ppl**: {windows} window{'s' if windows > 1 else ''} of the text (`--text`, default the GPL-3 text of the OS) "
             "per length, at evenly spaced offsets; in each the first "
             f"`length - {m.get('decode_tokens')}` tokens are prefilled, the last {m.get('decode_tokens')} are teacher-forced "
             "through the cache in chunks of 8 (re-evaluations at the same steps as token-by-token decoding); perplexities "
             "pool the negative log-likelihoods of every window's tokens. "
             "score = min(1, ppl_full / ppl); top-1 = agreement of the argmax with the full cache; KL(full || method) in nats/token.\n"
             f"- **passkey** / **needle**: {len(m.get('depths') or [])} samples per length (depths {m.get('depths')}); score = greedy "
             "decoding reproduces the key (5 digits) / the needle's 7-digit number exactly (checked in one teacher-forced pass). "
             "Few samples: each is worth 1/{n} of the score, so differences of one sample are noise.\n".replace("{n}", str(len(m.get('depths') or [1]))) +
             "- Each cell: `score (measured ratio)`. `full` stores the model's fp32 (ratio 0.5: lossless reference). "
             "The uniform presets have a fixed ratio (their bit width), shown once per length; `--ratio` cannot move them.\n"
             "- `—` = not run (time budget). A method meets a ratio column if its measured ratio is >= 95% of the target.\n")
    L += render_section(data, tasks, lengths, plot_dir)
    protocols = [p for p in PROTOCOLS if any(protocol_of(r) == p for s in data["samples"] for r in s["results"])]
    by_protocol = {p: cells(data, p) for p in protocols}
    for task in tasks:
        L.append(f"\n## {task}\n")
        for proto in protocols:
            cs, sk = by_protocol[proto], skips(data, proto)
            for n in lengths:
                title = f"{task} @ {n} tokens" + ("" if proto == QUERY_AWARE else f", {proto}")
                if not any(k[0] == task and k[1] == n for k in cs):
                    if proto == QUERY_AWARE:
                        L.append(f"\n### {title}: not run (time budget)\n")
                    continue
                L.append(f"\n### {title}\n")
                L.append(prefill_note(data, task, n, proto) + "\n")
                L += _table(cs, sk, task, n, ratios, proto)
                full = cs.get((task, n, "full", None))
                if full:
                    extra = f", ppl {full['ppl']:.3f}" if "ppl" in full else ""
                    L.append(f"\nfull cache: score {full['score']:.3f}{extra}, {full['mb16']:.2f} MB at 16 bits "
                             f"({full['mb']:.2f} MB held in fp32).\n")
    cs = by_protocol.get(QUERY_AWARE, {})
    # memory table
    L.append("\n## Memory (MB held) and speed at each context length\n")
    L.append("KV-cache MB held (mean over the samples of the ppl task, else passkey) per preset and ratio; "
             "16-bit reference in the first row. tok/s = teacher-forced tokens per second through the compressed "
             "cache (decode-like forwards, chunks of 8), build = seconds to compress after the prefill (fitter included).\n")
    head = "| preset | ratio | " + " | ".join(f"{n} MB | {n} tok/s | {n} build s" for n in lengths) + " |"
    L.append(head)
    L.append("|" + "---|" * (2 + 3 * len(lengths)))
    mt = "ppl" if "ppl" in tasks else tasks[0]

    def pick(p, r, n):
        for t in [mt] + [t for t in tasks if t != mt]:
            c = cs.get((t, n, p, r))
            if c:
                return c
        return None
    ref = ["16-bit reference", ""]
    for n in lengths:
        c = pick("full", None, n)
        ref += [f"{c['mb16']:.2f}" if c else "—", "", ""]
    L.append("| " + " | ".join(ref) + " |")
    for p in FIXED + [p for p in EXTERNAL_FIXED if any(k[2] == p for k in cs)]:
        row = [p, "fixed"]
        for n in lengths:
            c = pick(p, None, n)
            row += [f"{c['mb']:.2f} ({c['ratio']:.2f}x)", f"{c['tps']:.1f}", f"{c['build_s']:.1f}"] if c else ["—"] * 3
        L.append("| " + " | ".join(row) + " |")
    for p in RATIO_PRESETS + [p for p in EXTERNAL_RATIO if any(k[2] == p for k in cs)]:
        for r in ratios:
            row = [p, f"{r:g}"]
            for n in lengths:
                c = pick(p, float(r), n)
                row += [f"{c['mb']:.2f} ({c['ratio']:.2f}x)", f"{c['tps']:.1f}", f"{c['build_s']:.1f}"] if c else ["—"] * 3
            L.append("| " + " | ".join(row) + " |")
    L.append("\n## Does the adaptive method dominate?\n")
    L.append("For each task, length and ratio: AGACC's score vs the best baseline at equal memory: every baseline "
             "whose measured ratio is within 5% of the target (the fitted ones run at that target; the fixed-ratio "
             "uniform presets count in every column whose target they reach). A baseline that could not get down to "
             "the ratio and still scored higher is named in the verdict. Ties count as 'at least as good'. "
             "For ppl the score (ppl_full / ppl, capped at 1) "
             "saturates and is noisy over few tokens, so a second verdict compares KL(full || method) per token "
             "(lower is better) against the lowest baseline KL. The external methods (kvpress's presses, "
             "transformers' QuantizedCache) get their own verdict: the best of them at equal memory against AGACC, "
             "by the 95% interval of the paired per-sample difference (AGACC minus it; 'better' when the interval "
             "is above 0, 'yes' when it holds 0, **no** when it is below), by KL on ppl.\n")
    for proto in protocols:
        L += _verdicts(by_protocol[proto], tasks, lengths, ratios, proto, len(protocols) > 1)
    if any(";" in prefill_note(data, t, n) for t in tasks for n in lengths):
        L.append("Where a table mixes prefills (its Prefill line), these comparisons set a method that compressed "
                 "chunk by chunk against baselines that compressed after one prefill of the whole prompt (kvpress's "
                 "presses always prefill in one forward, as its pipeline does).\n")
    return "\n".join(L) + "\n"


def _table(cs: dict, sk: dict, task: str, n: int, ratios, proto: str) -> list[str]:
    """One task x length x protocol table: a row per method that ran or was skipped there (the store's
    presets always, query-aware), a column per ratio and one for the fixed-ratio methods."""
    fixed = FIXED + EXTERNAL_FIXED
    L = ["| preset | " + " | ".join(f"ratio {r:g}" for r in ratios) + " | fixed |", "|" + "---|" * (len(ratios) + 2)]
    for p in ROWS:
        keys = [(task, n, p, float(r)) for r in ratios] + [(task, n, p, None)]
        if not any(k in cs or k in sk for k in keys) and not (p in OWN and proto == QUERY_AWARE):
            continue
        cell = lambda k, empty: _fmt(cs[k], task) if k in cs else sk.get(k, empty)  # results, else why not
        row = [p] + ["—" if p in fixed else cell(k, "—") for k in keys[:-1]] + [cell(keys[-1], "")]
        L.append("| " + " | ".join(row) + " |")
    return L


def _verdicts(cs: dict, tasks, lengths, ratios, proto: str, say_protocol: bool) -> list[str]:
    """The dominance table of one protocol: AGACC against the best of the store's baselines and against the
    best external method at equal memory, per task x length x ratio, and the counts."""
    from agacc.eval.metrics import paired_difference

    L = [f"\n### {proto}\n"] if say_protocol else []
    L.append("| task | ctx | ratio | agacc | best baseline | verdict | ppl: best baseline KL | verdict by KL "
             "| best external | vs external |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    wins = losses = kl_wins = kl_losses = 0
    ext = {"yes": 0, "better": 0, "no": 0}
    lost, more_mem, ext_lost = [], [], []
    for task in tasks:
        for n in lengths:
            for r in ratios:
                a = cs.get((task, n, "agacc", float(r)))
                if a is None:
                    if any(k[0] == task and k[1] == n for k in cs):
                        L.append(f"| {task} | {n} | {r:g} | — | — | not run | | | | |")
                    continue
                equal, more = _at_ratio(cs, task, n, r, RATIO_PRESETS[3:], FIXED[1:])
                ext_cols = _vs_external(cs, a, task, n, r, paired_difference)
                if ext_cols[1] in ext:
                    ext[ext_cols[1]] += 1
                    if ext_cols[1] == "no":
                        ext_lost.append(f"{task} {n} @ {r:g}")
                ext_txt = f" | {ext_cols[0]} | {ext_cols[2]} |"
                if not equal:
                    L.append(f"| {task} | {n} | {r:g} | {_fmt(a, task)} | none ran | — | |" + ext_txt)
                    continue
                bname, best = max(equal, key=lambda pc: pc[1]["score"])
                oname, over = max(more, key=lambda pc: pc[1]["score"]) if more else (None, None)
                ok = a["score"] >= best["score"] - 1e-9
                meets = a["ratio"] >= 0.95 * r
                verdict = ("yes" if ok else "**no**") + ("" if meets else " (agacc misses the ratio)")
                if over is not None and over["score"] > a["score"] + 1e-9:
                    verdict += f" ({oname} scores {over['score']:.3f} holding more memory: {over['ratio']:.2f}x)"
                    more_mem.append(f"{task} {n} @ {r:g} ({oname})")
                wins += ok
                losses += not ok
                if not ok:
                    lost.append(f"{task} {n} @ {r:g}")
                kl_cols = " | |"
                if "kl" in a:
                    kb, kp = min((c["kl"], p) for p, c in equal)
                    ok_kl = a["kl"] <= kb + 1e-12
                    kl_wins += ok_kl
                    kl_losses += not ok_kl
                    kl_cols = f" | {kp}: {kb:.4f} (agacc {a['kl']:.4f}) | {'yes' if ok_kl else '**no**'} |"
                L.append(f"| {task} | {n} | {r:g} | {_fmt(a, task)} | {bname}: {_fmt(best, task)} | {verdict}"
                         + kl_cols + ext_txt[2:])
    misses = [f"{p} {t} {n} @ {r:g}: {c['ratio']:.2f}x" for (t, n, p, r), c in sorted(cs.items(), key=lambda kv: str(kv[0]))
              if r is not None and c["ratio"] < 0.95 * r]
    if misses:
        L.append("\nMeasured ratio below 95% of the target (the method could not get there: full-precision "
                 "recent window and sinks, tracker state, or generated tokens a compress-once method keeps): "
                 + "; ".join(misses) + ".\n")
    L.append((f"\nAGACC at least as good as the best baseline in {wins} of {wins + losses} cells that ran." if wins + losses
              else "\n")
             + (f" It does **not** dominate in: {', '.join(lost)}." if lost else "")
             + (f" A baseline holding more memory than the ratio allows scored higher in: {', '.join(more_mem)}."
                if more_mem else "")
             + (f" By KL on ppl: at least as good in {kl_wins} of {kl_wins + kl_losses}." if kl_wins + kl_losses else "")
             + (f" Against the best external method at equal memory: at least as good in {ext['yes'] + ext['better']} "
                f"of {sum(ext.values())} cells, better beyond the interval in {ext['better']}"
                + (f"; behind in: {', '.join(ext_lost)}" if ext_lost else "") + "." if sum(ext.values()) else "") + "\n")
    return L


def _at_ratio(cs: dict, task: str, n: int, r: float, fitted: list, fixed: list) -> tuple[list, list]:
    """The (method, cell) pairs that ran for target ratio ``r``: (those at equal memory -- a measured
    ratio >= 95% of ``r``: the ``fitted`` methods run at ``r``, the ``fixed``-bit ones that reach it --,
    the fitted ones that could not get down to it, holding more memory)."""
    ran = [(p, cs.get((task, n, p, float(r)))) for p in fitted] + [(p, cs.get((task, n, p, None))) for p in fixed]
    return ([(p, c) for p, c in ran if c and c["ratio"] >= 0.95 * r],
            [(p, c) for p, c in ran if c and c["ratio"] < 0.95 * r and p in fitted])


def _vs_external(cs: dict, a: dict, task: str, n: int, r: float, paired_difference) -> tuple[str, str, str]:
    """(the best external method at equal memory, verdict key, verdict text) for AGACC's cell ``a``:
    retrieval tasks by the paired per-sample difference's 95% interval, ppl by KL (lower is better).
    Where no external method got down to the ratio, the best fitted one that holds more memory: AGACC
    ahead of it counts; behind it is said and not counted (key "")."""
    equal, more = _at_ratio(cs, task, n, r, EXTERNAL_RATIO, EXTERNAL_FIXED)
    if not equal and not more:
        return "none ran", "", "—"
    pool = equal or more  # none at equal memory: the ones holding more, which AGACC can only beat, never trail
    if "kl" in a:
        bp, bc = min(pool, key=lambda pc: pc[1]["kl"])
        v, best, diff = ("yes" if a["kl"] <= bc["kl"] + 1e-12 else "no"), f"{bp}: KL {bc['kl']:.4f} (agacc {a['kl']:.4f})", ""
    else:
        bp, bc = max(pool, key=lambda pc: pc[1]["score"])
        both = sorted(set(a["by_sample"]) & set(bc["by_sample"]))
        d, h = paired_difference([bc["by_sample"][i] for i in both], [a["by_sample"][i] for i in both])
        v = "better" if d - h > 1e-12 else "yes" if d + h >= -1e-12 else "no"
        best, diff = f"{bp}: {_fmt(bc, task)}", f"{d:+.2f} ± {h:.2f} ({len(both)} samples): "
    if not equal:
        best += f", holding more memory ({bc['ratio']:.2f}x)"
        v = "" if v == "no" else v  # behind a method that holds more: not a comparison at equal memory
    return best, v, diff + {"better": "better", "yes": "yes", "no": "**no**", "": "behind it, not at equal memory"}[v]


def _fmt(c, task) -> str:
    if c is None:
        return "—"
    s = f"{c['score']:.3f} ({c['ratio']:.2f}x)"
    if "ppl" in c:
        s = f"{c['score']:.3f} ({c['ratio']:.2f}x) ppl {c['ppl']:.2f}, top1 {c['top1']:.2f}, KL {c['kl']:.3f}"
    return s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--ratios", type=float, nargs="+", default=[2, 4, 8])
    p.add_argument("--tasks", nargs="+", default=["ppl", "passkey", "needle"])
    p.add_argument("--depths", type=float, nargs="+", default=[0.25, 0.75])
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="each cache's prompt goes in this many tokens a forward, compressed as it goes (the "
                        "library's default); 0 = one prefill forward shared by every method, compressed at its end")
    p.add_argument("--ppl-windows", type=int, default=3, help="ppl windows per length (their tokens pooled)")
    p.add_argument("--text", default=None)
    p.add_argument("--budget-min", type=float, default=40)
    p.add_argument("--json", default=str(ROOT / "docs" / "results.json"))
    p.add_argument("--out", default=str(ROOT / "docs" / "results.md"))
    p.add_argument("--resume", action="store_true")
    p.add_argument("--redo", nargs="+", default=[], metavar="PRESET",
                   help="with --resume: re-run these presets on the samples held, keep the others' results")
    p.add_argument("--redo-missing-only", action="store_true",
                   help="with --redo: skip results already made with this --prefill-chunk (continue a cut --redo run)")
    p.add_argument("--protocol", choices=PROTOCOLS, default=QUERY_AWARE,
                   help="retrieval tasks: the question in the compressed prefill (query-aware) or asked after the "
                        "context was compressed (query-agnostic; ppl is skipped)")
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                   help="with --redo: take those presets' results at --tasks x --lengths from these pages' JSON "
                        "(each written by a process of a split run) into --json, then render")
    args = p.parse_args(argv)
    unknown = set(args.redo) - set(ROWS)
    if unknown or (args.redo and not (args.resume or args.merge)):
        p.error(f"--redo needs --resume (or --merge) and presets of this page (unknown: {sorted(unknown)})")
    if args.redo_missing_only and not args.redo:
        p.error("--redo-missing-only goes with --redo")
    if args.merge and not args.redo:
        p.error("--merge goes with --redo (the presets to take)")
    if args.merge:
        data = json.loads(Path(args.json).read_text())
        for src in args.merge:
            print(f"{src}: {merge(data, json.loads(Path(src).read_text()), args.redo, args.tasks, args.lengths)} results")
        Path(args.json).write_text(json.dumps(data, indent=0))
    elif not args.render_only:
        run(args)
    data = json.loads(Path(args.json).read_text())
    Path(args.out).write_text(render(data, args.ratios, args.lengths, args.tasks, plot_dir=Path(args.out).parent))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
