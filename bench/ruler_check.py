"""Which RULER-style tasks (agacc/eval/ruler.py) can the model do at all: the plain cache (the ``full``
preset, through ``agacc.eval.runner.evaluate_sample`` with greedy ``generate`` scoring and RULER's
string_match_all) on a few samples per task, beside a copy baseline that does not read the question
or count anything (niah: the first numbers of the context; vt: the first variable names of the task's
text; cwe / fwe: the first distinct words of the list). A task where the model does not clearly beat
the copy baseline measures nothing about a cache.

    python bench/ruler_check.py                       # 5 samples per task at 1K tokens
    python bench/ruler_check.py --samples 10 --lengths 1024 2048 --tasks niah_single vt --json out/ruler_check.json

Measured (embedded SmolLM2-135M-Instruct, CPU, seed 0, 5 samples per task at 1K, raw prompts):
accuracy / copy baseline -- niah_single 1.00 / 1.00, niah_multikey 0.80 / 0.40, niah_multivalue
0.60 / 1.00, niah_multiquery 0.15 / 1.00, vt 0.20 / 1.00, cwe 0.00 / 0.34, fwe 0.27 / 0.53.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def copy_baseline(task: str, context: str, k: int) -> str:
    """A prediction made without reading the question or counting: the first k candidates of the answer's
    kind in the context (after the worked example, where there is one)."""
    if task.startswith("niah"):
        cands = re.findall(r"\b\d{7}\b", context)
    elif task == "vt":
        cands = re.findall(r"VAR ([A-Z]{5}) =", context.split("hidden in the following text.")[-1])
    elif task == "cwe":
        cands = re.findall(r"\d+\. (\S+)", context.split("appear most often.\n")[-1])
    else:  # fwe
        cands = [w for w in context.split("coded words.")[-1].split() if w != "..."]
    seen = list(dict.fromkeys(cands))
    return " ".join(seen[:k])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="hub id or path (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--tasks", nargs="*", default=None, help="default: every task of agacc.eval.ruler.TASKS")
    ap.add_argument("--lengths", nargs="*", type=int, default=[1024])
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the per-sample records here")
    ap.add_argument("--show", action="store_true", help="print each prediction")
    args = ap.parse_args(argv)

    import torch

    import agacc
    from agacc.eval import ruler as RU
    from agacc.eval import runner as RN

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = agacc.load_model(args.model)
    configs = RN.preset_configs(["full"], None)
    suite = RU.ruler_suite(tok, args.lengths, args.samples, seed=args.seed, tasks=args.tasks)
    records, rows = [], []
    for task, samples in suite.items():
        for n in args.lengths:
            got, base, t0 = [], [], time.perf_counter()
            for s in [x for x in samples if x.meta["context_tokens"] == n]:
                (r,) = RN.evaluate_sample(model, tok, s, configs, scoring="generate")
                assert r["score"] == RU.score(s, r["prediction"])
                ctx = tok.decode(s.context_ids, skip_special_tokens=True)
                b = RU.score(s, copy_baseline(task, ctx, len(s.answers)))
                got.append(r["score"])
                base.append(b)
                records.append({"task": task, "context_tokens": n, "index": s.index, "score": r["score"],
                                "copy_baseline": b, "prediction": r["prediction"], "answers": s.answers,
                                "prompt_tokens": len(s.prompt_ids)})
                if args.show:
                    print(f"  {task} {n} #{s.index}: {r['score']:.2f} {r['prediction']!r} <- {s.answers}", flush=True)
            m = len(got)
            rows.append((task, n, m, sum(got) / m, sum(base) / m, sum(x == 1.0 for x in got), time.perf_counter() - t0))
            print(f"{task:16s} {n:6d}  n={m:3d}  accuracy {rows[-1][3]:.2f}  (all right {rows[-1][5]}/{m})  "
                  f"copy baseline {rows[-1][4]:.2f}  {rows[-1][6]:.0f}s", flush=True)
    if args.json:
        import json

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": [dict(zip(("task", "context_tokens", "samples", "accuracy",
                                                                   "copy_baseline", "all_right", "seconds"), r))
                                                         for r in rows], "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
