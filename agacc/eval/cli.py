"""``python -m agacc eval TASK --preset M [M ...] [--ratio R] ...`` (and under ``accelerate launch``).

Each M is a method in the grammar of ``agacc.spec``: ``NAME[@RATIO][,key=value]...`` (``agacc``,
``agacc@4``, ``h2o@4,recent_window=32``); ``--set KEY=VALUE`` and ``--ratio R`` apply on top of every
method (``--ratio`` only to the methods whose ratio can move, not ``full`` or ``uniform-int*``).
External methods are named the same way: ``hf-quantized:quanto-4`` (transformers' QuantizedCache),
``kvpress:snapkv@4`` (kvpress, run in .venv-kvpress); ``--protocol query-agnostic`` compresses the
context before the question is read, ``--reuse-questions Q`` asks Q questions of one context.

Writes one record per preset (and per context length when several are given) with task, preset,
samples, score (0..1), ratio (measured vs a 16-bit cache), kv_bytes, kv_bytes_fp16, tokens_per_s,
and the task's extras; prints a table; ``--plot`` draws the score-vs-memory Pareto chart.
Under ``accelerate launch`` each process takes every world-th sample; rank 0 gathers the
per-sample results and writes the same JSON a single process would (timings aside).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from agacc.eval import ruler
from agacc.eval import tasks as T

DEFAULT_LENGTH = {"passkey": 1024, "needle": 1024, "ppl": 1024, "longbench": None, "scrolls": None}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m agacc eval", description="compare KV-cache presets on a task")
    p.add_argument("task", choices=T.TASKS + tuple(ruler.TASKS),
                   help="passkey, needle, ppl, longbench, scrolls, or a RULER-style task (agacc/eval/ruler.py)")
    p.add_argument("--preset", "--method", dest="preset", nargs="+", default=["full", "agacc"], metavar="METHOD",
                   help="methods to compare: NAME[@RATIO][,key=value]... (agacc, agacc@4, h2o@4,recent_window=32; "
                        "names in docs/baselines.md)")
    p.add_argument("--protocol", choices=("query-aware", "query-agnostic"), default="query-aware",
                   help="retrieval tasks: 'query-aware' = the question is in the prefill the cache compresses; "
                        "'query-agnostic' = the context is prefilled and compressed first, then the question goes in "
                        "uncompressed and the answer is scored (kvpress's protocol)")
    p.add_argument("--reuse-questions", type=int, default=None, metavar="Q",
                   help="needle: Q needles in one context and one question per needle (--samples contexts); with "
                        "--protocol query-agnostic each method compresses the context once and answers every "
                        "question on its own copy of that cache")
    p.add_argument("--ratio", type=float, default=None, help="target memory ratio (16-bit bytes / bytes held) of every compressed preset")
    p.add_argument("--context-tokens", type=int, nargs="+", default=None, help="prompt length(s) in tokens (needle: the grid's lengths); with --data / longbench / scrolls: "
                        "cut each record to this many tokens (middle truncation; default: each record whole, "
                        "cut only to fit the model's context)")
    p.add_argument("--samples", type=int, default=None, help="samples per length (passkey/needle: depths spread 0..1; ppl: windows)")
    p.add_argument("--depths", type=float, nargs="+", default=None, help="needle/passkey depths in 0..1 (overrides --samples)")
    p.add_argument("--data", default=None, help="JSONL records: LongBench {context, input, answers} or SCROLLS {id, input, output}")
    p.add_argument("--dataset", default=None, help="LongBench/SCROLLS dataset name (metric, prompt; hub loading without --data)")
    p.add_argument("--text", default=None, help="text file (ppl text, needle haystack); default: a license text of the OS")
    p.add_argument("--decode-tokens", type=int, default=128, help="ppl: tokens teacher-forced through the cache (the rest is prefilled)")
    p.add_argument("--chunk", type=int, default=8, help="ppl: tokens per teacher-forced forward (1 = token by token)")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="a prompt longer than this goes into each cache this many tokens a forward, compressed as it "
                        "goes (generate's prefill_chunk_size); 0 = one full-precision prefill, compressed at its end")
    p.add_argument("--scoring", choices=("match", "generate"), default=None,
                   help="answers: 'match' = greedy output starts with the answer (one teacher-forced pass); "
                        "'generate' = greedy decoding + the task metric (default: match for passkey/needle, generate otherwise)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--metric", default=None, help="override the metric of --data records")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field of every method (on top of its spec)")
    p.add_argument("--model", default=None, help="hub id or local path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu, cuda, or auto (device_map='auto' across GPUs)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the records here")
    p.add_argument("--plot", default=None, help="OUT.html (Pareto chart + needle heatmaps) or OUT.png (needs kaleido)")
    p.add_argument("--no-progress", action="store_true")
    return p


def make_samples(args, tok, limit: int | None = None) -> list:
    """The task's samples; ``limit``: the model's positions (records are cut only to fit them, unless
    --context-tokens asks)."""
    task = args.task
    out = []
    if getattr(args, "reuse_questions", None) and (args.data or task != "needle"):
        raise ValueError("--reuse-questions makes its own needle contexts: use it with the needle task, without --data")
    if args.data or task in ("longbench", "scrolls"):
        rows = T.read_jsonl(args.data) if args.data else T.load_hub(task, args.dataset)
        for n in args.context_tokens or [None]:
            out += T.records_task(tok, rows, task, n, args.samples, dataset=args.dataset, metric=args.metric,
                                  max_new_tokens=args.max_new_tokens, limit=limit)
        return _numbered(out)
    k = args.samples or (5 if task in ("passkey", "needle") else 1)
    text = T.read_text(args.text) if (args.text or task in ("ppl", "needle")) else None
    if getattr(args, "reuse_questions", None):
        for n in args.context_tokens or [DEFAULT_LENGTH[task]]:
            out += T.needle_reuse(tok, n, args.samples or 1, args.reuse_questions, depths=args.depths, text=text,
                                  seed=args.seed, max_new_tokens=args.max_new_tokens or 12)
        return _renumber_groups(_numbered(out))
    for n in args.context_tokens or [DEFAULT_LENGTH.get(task, 1024)]:
        if task in ruler.TASKS:
            out += ruler.TASKS[task](tok, n, k, seed=args.seed)
        elif task == "passkey":
            out += T.passkey(tok, n, k, depths=args.depths, seed=args.seed, max_new_tokens=args.max_new_tokens or 8)
        elif task == "needle":
            out += T.needle(tok, n, k, depths=args.depths, text=text, seed=args.seed, max_new_tokens=args.max_new_tokens or 12)
        else:
            out += T.ppl(tok, n, k, text=text, decode_tokens=args.decode_tokens)
    return _numbered(out)


def _numbered(samples: list) -> list:
    for i, s in enumerate(samples):
        s.index = i
    return samples


def _renumber_groups(samples: list) -> list:
    """Contexts of several lengths: one group number per (length, context)."""
    ids: dict = {}
    for s in samples:
        if s.group is not None:
            s.group = ids.setdefault((s.meta.get("context_tokens"), s.group), len(ids))
    return samples


def cut_summary(samples: list) -> str | None:
    """One line on the records cut to fit (None when none was): how many, and for needle-style records
    in how many the answer survived the cut."""
    cut = [s for s in samples if s.meta.get("truncated")]
    if not cut:
        return None
    line = f"records cut (middle truncation): {len(cut)} of {len(samples)}"
    kept = [s.meta["answer_in_prompt"] for s in cut if "answer_in_prompt" in s.meta]
    if kept:
        line += f"; the answer survived the cut in {sum(kept)} of {len(kept)}"
    return line


def method_configs(specs: list[str], ratio: float | None, sets: dict | None = None) -> list[tuple[str, object]]:
    """(label, config) per method spec: the spec's own settings, then ``sets`` (``--set``), then ``ratio``
    (``--ratio``, on the methods whose ratio can move), by ``runner.preset_configs``' rules."""
    from agacc.eval import runner
    from agacc.spec import method_label, split_method

    from agacc.eval import external

    out, seen = [], set()
    for spec in specs:
        if isinstance(spec, str) and external.is_external_name(spec.strip()):
            label, method = external.parse_external(spec, ratio)
            if label in seen:
                raise ValueError(f"method {label!r} is given twice")
            seen.add(label)
            out.append((label, method))
            continue
        name, overrides = split_method(spec)
        label = method_label(spec)
        if label in seen:
            raise ValueError(f"method {label!r} is given twice")
        seen.add(label)
        try:
            ((_, cfg),) = runner.preset_configs([name], ratio, {**overrides, **(sets or {})})
        except ValueError as e:
            msg = str(e)
            if msg.startswith("unknown preset"):
                msg += f"; or an external method: {external.external_names()}"
            raise ValueError(f"method {spec!r}: {msg}") from None
        out.append((label, cfg))
    return out


def add_paired(records: list[dict]) -> None:
    """Each record with per-sample scores gets ``paired``: its score minus the first listed method's on
    the same samples (same context length), with the 95% half-width (``metrics.paired_difference``)."""
    from agacc.eval.metrics import paired_difference

    base: dict = {}
    for r in records:
        if r.get("skipped") or "ci95" not in r:
            continue
        key = (r.get("context_tokens"), r.get("protocol"))
        scores = {(s["index"], s.get("context_tokens")): s["score"] for s in r["per_sample"]}
        if key not in base:
            base[key] = (r["preset"], scores)
            continue
        name, ref = base[key]
        common = [i for i in ref if i in scores]
        if common:
            d, hw = paired_difference([ref[i] for i in common], [scores[i] for i in common])
            r["paired"] = {"vs": name, "samples": len(common), "diff": d, "half_width": hw}


def paired_lines(records: list[dict]) -> list[str]:
    out = []
    for r in records:
        p = r.get("paired")
        if p:
            verdict = "beyond noise" if abs(p["diff"]) > p["half_width"] else "within noise"
            out.append(f"paired vs {p['vs']} ({p['samples']} samples, ctx {r.get('context_tokens')}): {r['preset']} "
                       f"{p['diff']:+.3f} +- {p['half_width']:.3f} ({verdict})")
    return out


def format_table(records: list[dict]) -> str:
    """The records as a text table (a 95% interval column when scores are per sample), the paired
    comparisons with the first method under it, then the skipped methods' reasons."""
    ppl = any("ppl" in r for r in records)
    ci = any("ci95" in r for r in records)
    head = (["preset", "ctx", "score"] + (["95% CI"] if ci else []) + ["ratio", "KV MB", "fp16 MB", "tok/s"]
            + (["ppl", "ppl full", "top1", "KL"] if ppl else []))
    rows, notes = [], []
    for r in records:
        if r.get("skipped"):
            notes.append(f"{r['preset']}: {r['skipped']}")
            rows.append([r["preset"], str(r.get("context_tokens") or "-"), "skipped"] + ["-"] * (len(head) - 3))
            continue
        tps = r.get("tokens_per_s")
        row = [r["preset"], str(r.get("context_tokens") or r.get("prompt_tokens")), f"{r['score']:.3f}"]
        if ci:
            row.append("{:.2f}-{:.2f}".format(*r["ci95"]) if "ci95" in r else "-")
        row += [f"{r['ratio']:.2f}x", f"{r['kv_mb']:.2f}", f"{r['kv_mb_fp16']:.2f}", f"{tps:.1f}" if tps else "-"]
        if ppl:
            row += [f"{r['ppl']:.3f}", f"{r['ppl_full']:.3f}", f"{r['top1_agreement']:.3f}", f"{r['kl']:.4f}"]
        rows.append(row)
    w = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(cells))
    return "\n".join([line(head), line(["-" * x for x in w])] + [line(r) for r in rows] + paired_lines(records)
                     + sorted(set(notes), key=notes.index))


def _dist():
    """(rank, world, device) under ``accelerate launch`` / torchrun (WORLD_SIZE > 1), else (0, 1, None).
    Uses torch.distributed directly (gloo on CPU, nccl on GPUs): accelerate's PartialState reports a
    single process on a machine without GPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "False").lower() not in ("true", "1")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
    return dist.get_rank(), dist.get_world_size(), device


def _gather(obj, world):
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return [x for part in out for x in part]


def _finish(world):
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(args) -> int:
    import torch

    import agacc
    from agacc.config import parse_override
    from agacc.eval import runner
    from agacc.session import context_limit

    rank, world, dist_device = _dist()
    sets = dict(parse_override(s) for s in args.set or [])
    configs = method_configs(args.preset, args.ratio, sets)
    device = args.device
    if dist_device is not None and device is None:
        device = dist_device
    model, tok = agacc.load_model(args.model, device=device, dtype=args.dtype)
    torch.manual_seed(args.seed)
    limit = context_limit(model)
    samples = runner_samples = make_samples(args, tok, limit)
    if not samples:
        raise ValueError("no samples")
    longest = max(len(s.prompt_ids) + max(len(s.target_ids), len(s.answer_ids), s.max_new_tokens) for s in samples)
    if limit and longest > limit:
        raise ValueError(f"samples need {longest} positions, the model has {limit}")
    if args.protocol == "query-agnostic":
        if args.task == "ppl":
            raise ValueError("--protocol query-agnostic needs a question: ppl has none (use it with passkey, needle, "
                             "longbench or scrolls records)")
        nosplit = [s.index for s in samples if not s.has_split]
        if nosplit:
            raise ValueError(f"--protocol query-agnostic: samples {nosplit[:5]} have no context / question split "
                             "(their template has no {context} before the question)")
        longest = max(len(s.context_ids) + len(s.question_ids) + max(len(s.answer_ids), s.max_new_tokens) for s in samples)
        if limit and longest > limit:
            raise ValueError(f"samples need {longest} positions, the model has {limit}")
    scoring = args.scoring or ("match" if args.task in ("passkey", "needle") and not args.data else "generate")
    if args.prefill_chunk < 0:
        raise ValueError(f"--prefill-chunk must be >= 1 (0: one prefill), got {args.prefill_chunk}")
    per_sample = runner.run(model, tok, args.task, runner_samples, configs, ratio=args.ratio, scoring=scoring,
                            chunk=args.chunk, rank=rank, world=world, progress=not args.no_progress,
                            prefill_chunk=args.prefill_chunk or None, protocol=args.protocol)
    if world > 1:
        per_sample = _gather(per_sample, world)
        if rank != 0:
            _finish(world)
            return 0
    records = runner.aggregate(args.task, per_sample, configs, args.ratio, scoring)
    add_paired(records)
    for r in records:
        r["world_size"] = world
        r["model"] = args.model or "embedded:SmolLM2-135M-Instruct"
    print(format_table(records))
    if cut_summary(samples):
        print(cut_summary(samples))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=1)
    if args.plot:
        from agacc.eval.plots import write_plot

        write_plot([r for r in records if not r.get("skipped")], args.plot)
    _finish(world)
    return 0
