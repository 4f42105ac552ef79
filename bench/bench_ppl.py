"""Teacher-forced perplexity, bytes and decode speed of the compressed cache on the embedded model.

Prefill the first ``--prefill`` tokens of a natural text, then feed the rest one token at a time
through the cache (``agacc.eval.runner.teacher_force`` with chunks of 1: every prediction after the
first comes from a decode step over the compressed store). Reports perplexity vs the plain model
(DynamicCache, same loop), top-1 agreement, KL (``agacc.eval.metrics.lm_stats``), bytes held vs a
16-bit cache (measured ``cache.memory()`` at the end), decode tokens/s.

    python bench/bench_ppl.py --tokens 2048 --prefill 1024 --threads 1 --json out/bench_ppl.json \\
        agacc agacc@4 uniform-int4 h2o@4,recent_window=32

With ``--suite tuning|heldout|all`` it runs every text of ``bench/corpus.py`` instead (a licence,
documentation prose, code, a story, a chat transcript; one tuning and one held-out text of each
kind) and prints one table per split and target ratio, every text a row, with the mean and the
worst text: defaults are chosen on the tuning texts, results are reported on the held-out ones
(docs/tuning.md):

    python bench/bench_ppl.py --suite heldout --threads 1 --json out/ppl_heldout.json \
        agacc@4 agacc@8 uniform-int4 uniform-int2 h2o@4 snapkv@4

Each method is ``NAME[@RATIO][,key=value]...`` (``agacc.spec``), or transformers' own ``QuantizedCache``
(``hf-quantized:quanto-4`` ..., ``agacc.eval.external``; its bytes counted from the tensors it holds, the
residual window at the model's precision). ``--threads`` sets torch's
intra-op threads for the plain and the compressed runs alike (on the 2-core CPU this was measured
on, one thread is faster for both: decode steps are many small ops). ``--perturb 1 2 3`` runs every method
once per seed with noise of 1e-6 on the input embeddings (``perturbed``; columns ``METHOD~SEED``): the
spread another CPU's rounding gives a result (docs/tuning.md round 36).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import time
from pathlib import Path

import torch

from bench import common

DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"
PLAIN = "plain (DynamicCache)"
DEFAULT_METHODS = ["agacc", "dynacompress", "attention-sum", "uniform-int8", "uniform-int4", "uniform-int2"]
PERTURB_EPS = 1e-6


@contextlib.contextmanager
def perturbed(model, seed: int | None, eps: float = PERTURB_EPS):
    """Within it, the model's input embeddings [B, q, hidden] carry relative noise: times (1 + eps z), z
    standard normal from ``seed`` (None: no noise). Another CPU's kernels round otherwise, so a method's
    decisions that sit on a near tie fall the other way and the rest of its run follows; runs over seeds
    show how far a result moves for no reason of the method's (``--perturb``)."""
    if seed is None:
        yield
        return
    gen = torch.Generator().manual_seed(seed)

    def noisy(_module, _inputs, out):
        return out * (1 + eps * torch.randn(out.shape, generator=gen, dtype=out.dtype))

    handle = model.get_input_embeddings().register_forward_hook(noisy)
    try:
        yield
    finally:
        handle.remove()


def run(model, ids, prefill, cache, prefill_chunk: int = 0):
    """Prefill (``prefill_chunk`` tokens a forward; 0: one forward), then token-by-token teacher
    forcing -> (logits [n, V] fp32 predicting ids[prefill:], decode s, steps)."""
    from agacc.eval.runner import teacher_force

    step = prefill_chunk or prefill
    with torch.inference_mode():
        for lo in range(0, prefill, step):
            out = model(ids[:, lo:min(prefill, lo + step)], past_key_values=cache, use_cache=True, logits_to_keep=1)
        first = out.logits[0, -1:].float()
    rest = ids[0, prefill:-1].tolist()
    t0 = time.perf_counter()
    logits = teacher_force(model, cache, rest, chunk=1)
    dt = time.perf_counter() - t0
    return torch.cat([first, logits]), dt, len(rest)


def reference(model, ids, prefill: int, prefill_chunk: int, cache_dir: str | None):
    """The plain cache's (logits, decode s, steps), from ``cache_dir`` when a run of the same model,
    tokens and prefill left it there (``--ref-cache``: the plain run is the same every time)."""
    path = None
    if cache_dir:
        key = hashlib.sha1(repr((model.config.to_json_string(), ids.tolist(), prefill, prefill_chunk)).encode())
        path = Path(cache_dir) / f"ref_{key.hexdigest()[:16]}.pt"
        if path.exists():
            return torch.load(path)
    out = run(model, ids, prefill, common.make_cache(model, None), prefill_chunk)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, path)
    return out


def measure(model, ids, methods, prefill: int, prefill_chunk: int, ref_cache: str | None = None,
            seeds: tuple = (None,)) -> list[dict]:
    """The plain cache's row, then one row per method and seed (``perturbed``; a seed's label ``METHOD~SEED``):
    perplexity vs plain, top-1, KL, bytes, speed. With seeds, the plain cache's own KL under each seed's
    noise is printed first (what the noise costs by itself)."""
    from agacc.eval.metrics import lm_stats

    targets = ids[0, prefill:]
    ref, ref_dt, steps = reference(model, ids, prefill, prefill_chunk, ref_cache)
    ref_st = lm_stats(ref, ref, targets)
    ref_ppl = math.exp(ref_st["nll"] / ref_st["tokens"])
    rows = [{"preset": PLAIN, "ppl": ref_ppl, "ppl_rel": 1.0, "top1": 1.0, "kl": 0.0, "ratio": None,
             "bytes": None, "bytes_fp16": None, "tok_s": steps / ref_dt, "speed_rel": 1.0}]
    print(f"  plain: ppl {ref_ppl:.3f}, {steps / ref_dt:.1f} tok/s", flush=True)
    for seed in seeds:
        if seed is not None:
            with perturbed(model, seed):
                noisy = run(model, ids, prefill, common.make_cache(model, None), prefill_chunk)[0]
            st = lm_stats(noisy, ref, targets)
            print(f"  plain~{seed}: KL {st['kl'] / st['tokens']:.2e}", flush=True)
    for (label, cfg), seed in ((m, s) for m in methods for s in seeds):
        name = label if seed is None else f"{label}~{seed}"
        external = hasattr(cfg, "new_cache")  # transformers' QuantizedCache (agacc.eval.external.HFQuantized)
        cache = cfg.new_cache(model) if external else common.make_cache(model, cfg)
        with perturbed(model, seed):
            logits, dt, _ = run(model, ids, prefill, cache, prefill_chunk)
        st = lm_stats(logits, ref, targets)
        if external:  # the bytes it holds at the end; no peak or tiers of its own
            mem = dict(cfg.memory(cache), peak_bytes=None, by_tier=None)
            mem["ratio"] = mem["bytes_fp16"] / mem["bytes"]
        else:
            mem = cache.memory()
        ppl = math.exp(st["nll"] / st["tokens"])
        top1, kl = st["top1"] / st["tokens"], st["kl"] / st["tokens"]
        row = {"preset": name, "ppl": ppl, "ppl_rel": ppl / ref_ppl, "top1": top1, "kl": kl, "ratio": mem["ratio"],
               "bytes": mem["bytes"], "bytes_fp16": mem["bytes_fp16"], "peak_bytes": mem["peak_bytes"],
               "tok_s": steps / dt,
               "speed_rel": (steps / dt) / (steps / ref_dt), "by_tier": mem["by_tier"],
               "target_ratio": cfg.target_ratio, "seed": seed,
               "overrides": {} if external else common.method_overrides(label)}
        rows.append(row)
        peak = f" (peak {mem['bytes_fp16'] / mem['peak_bytes']:.2f}x)" if mem["peak_bytes"] else ""
        print(f"  {name}: ppl {ppl:.3f} ({100 * (ppl / ref_ppl - 1):+.2f}%), top1 {top1:.3f}, KL {kl:.4f}, "
              f"ratio {mem['ratio']:.2f}x{peak}, {steps / dt:.1f} tok/s ({row['speed_rel']:.2f}x)", flush=True)
        del cache, logits
    return rows


def method_table(rows: list[dict]) -> None:
    """One text: every method a row."""
    common.print_table(["method", "ppl", "Δppl", "top-1", "KL", "ratio", "MiB", "tok/s", "speed"], [
        [r["preset"], f"{r['ppl']:.3f}", f"{100 * (r['ppl_rel'] - 1):+.2f}%", f"{r['top1']:.3f}", f"{r['kl']:.4f}",
         f"{r['ratio']:.2f}x" if r["ratio"] else "1.00x", f"{r['bytes'] / 2**20:.2f}" if r["bytes"] else "-",
         f"{r['tok_s']:.1f}", f"{r['speed_rel']:.2f}x"] for r in rows])


def suite_tables(texts: list[dict]) -> list[dict]:
    """A suite of texts: one table per split and target ratio (every text a row, every method a
    column: Δppl, KL and the measured ratio), with the mean and the worst text; -> the summary rows
    ``{"split", "method", "target_ratio", "mean_dppl", "max_dppl", "mean_kl", "mean_ratio", "texts"}``."""
    summary = []
    for split in dict.fromkeys(t["split"] for t in texts):
        group = [t for t in texts if t["split"] == split]
        methods = [r for r in group[0]["rows"] if r["preset"] != PLAIN]
        by_ratio = {}
        for r in methods:
            by_ratio.setdefault(r.get("target_ratio"), []).append(r["preset"])
        for target, labels in by_ratio.items():
            print(f"\n{split} texts, {f'fitted to {target:g}x' if target else 'unfitted (the ratio each setting gives)'}: "
                  "Δppl vs the plain cache (KL nats/token, ratio)")
            cells = {(t["name"], r["preset"]): r for t in group for r in t["rows"]}
            table = [[t["name"]] + [_cell(cells[t["name"], m]) for m in labels] for t in group]
            stats = []
            for m in labels:
                rs = [cells[t["name"], m] for t in group]
                d = [100 * (r["ppl_rel"] - 1) for r in rs]
                stats.append({"split": split, "method": m, "target_ratio": target, "mean_dppl": sum(d) / len(d),
                              "max_dppl": max(d), "mean_kl": sum(r["kl"] for r in rs) / len(rs),
                              "mean_ratio": sum(r["ratio"] for r in rs) / len(rs), "texts": len(rs)})
            table.append(["mean"] + [f"{s['mean_dppl']:+.2f}% ({s['mean_kl']:.4f}, {s['mean_ratio']:.2f}x)" for s in stats])
            table.append(["worst"] + [f"{s['max_dppl']:+.2f}%" for s in stats])
            common.print_table(["text"] + [m if len(m) <= 40 else m[:37] + "..." for m in labels], table)
            summary += stats
    return summary


def _cell(r: dict) -> str:
    return f"{100 * (r['ppl_rel'] - 1):+.2f}% ({r['kl']:.4f}, {r['ratio']:.2f}x)"


def parse_methods(specs) -> list[tuple[str, object]]:
    """``common.parse_methods``, and ``hf-quantized:*`` as ``agacc.eval.external.HFQuantized``; any other
    external method (kvpress, kv-distill: their own prefill) ends the script naming ``python -m agacc eval``."""
    from agacc.eval.external import HF_PREFIX, is_external_name, parse_external

    out = []
    for spec in specs:
        if not is_external_name(spec):
            out += common.parse_methods([spec])
            continue
        if not spec.strip().startswith(HF_PREFIX):
            raise SystemExit(f"error: {spec!r} prefills the prompt its own way; compare it with python -m agacc eval ppl")
        try:
            label, method = parse_external(spec)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        if reason := method.unavailable():
            raise SystemExit(f"error: {label}: {reason}")
        out.append((label, method))
    labels = [label for label, _ in out]
    for label in labels:
        if labels.count(label) > 1:
            raise SystemExit(f"error: method {label!r} is given twice")
    return out


def main(argv=None):
    from bench import corpus

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("methods", nargs="*", metavar="METHOD", help=common.METHOD_HELP + f" (default: {' '.join(DEFAULT_METHODS)})")
    ap.add_argument("--methods", "--presets", dest="more_methods", nargs="+", default=[], metavar="METHOD",
                    help="more methods (the same as the positional ones)")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--prefill", type=int, default=1024)
    ap.add_argument("--prefill-chunk", type=int, default=512,
                    help="prompt tokens a prefill forward (the library's default chunked prefill); 0 = one forward")
    ap.add_argument("--suite", choices=("tuning", "heldout", "all"), default=None,
                    help="the texts of bench/corpus.py instead of --text: every kind's tuning text, held-out text, or both")
    ap.add_argument("--texts", nargs="+", default=None, metavar="NAME",
                    help=f"only these texts of the suite ({', '.join(corpus.TEXTS)})")
    ap.add_argument("--ref-cache", default=None, metavar="DIR",
                    help="keep the plain cache's logits per text here and reuse them (speeds then compare with "
                         "the run that left them)")
    common.add_model_args(ap, text=DEFAULT_TEXT)
    ap.add_argument("--perturb", type=int, nargs="+", default=None, metavar="SEED",
                    help=f"run every method once per seed with the input embeddings times (1 + {PERTURB_EPS:g} z) "
                         "instead of once as is: how far a result moves when near-tied decisions fall otherwise")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    methods = parse_methods((args.methods + args.more_methods) or DEFAULT_METHODS)
    if not 0 < args.prefill < args.tokens - 1:
        ap.error("need 0 < --prefill < --tokens - 1")
    if args.prefill_chunk < 0:
        ap.error("--prefill-chunk must be >= 0")
    if args.texts and not args.suite:
        ap.error("--texts selects inside a --suite")
    unknown = set(args.texts or ()) - set(corpus.TEXTS)
    if unknown:
        ap.error(f"unknown text(s) {', '.join(sorted(unknown))}: one of {', '.join(corpus.TEXTS)}")
    common.set_threads(args.threads)

    torch.manual_seed(0)
    model, tok = common.load_model(args.model)
    if args.suite:
        chosen = [t for t in corpus.suite(args.suite) if not args.texts or t.name in args.texts]
        sources = [(t.name, t.kind, t.split, str(t.path), tok(corpus.read(t, tok), return_tensors="pt").input_ids)
                   for t in chosen]
    else:
        sources = [(os.path.basename(args.text), "file", "-", args.text, common.text_ids(tok, args.text, args.tokens))]
    texts = []
    for name, kind, split, path, ids in sources:
        if ids.shape[1] < args.tokens:
            raise SystemExit(f"error: {path} has {ids.shape[1]} tokens, {args.tokens} needed")
        print(f"{name} ({path})", flush=True)
        rows = measure(model, ids[:, :args.tokens], methods, args.prefill, args.prefill_chunk, args.ref_cache,
                       tuple(args.perturb) if args.perturb else (None,))
        texts.append({"name": name, "kind": kind, "split": split, "path": path, "rows": rows})

    steps = args.tokens - args.prefill - 1
    print(f"\n{args.tokens} tokens a text, prefill {args.prefill} "
          f"({f'chunks of {args.prefill_chunk}' if args.prefill_chunk else 'one forward'}), "
          f"{steps} teacher-forced decode steps, {torch.get_num_threads()} torch thread(s)")
    summary = []
    if args.suite:
        summary = suite_tables(texts)
    else:
        method_table(texts[0]["rows"])
    record = {"tokens": args.tokens, "prefill": args.prefill, "prefill_chunk": args.prefill_chunk,
              "threads": torch.get_num_threads(), "perturb": args.perturb, "perturb_eps": PERTURB_EPS,
              "suite": args.suite, "texts": texts, "summary": summary}
    if not args.suite:  # one text: its rows at the top level as before
        record.update(text=args.text, rows=texts[0]["rows"])
    common.write_json(args.json, record)


if __name__ == "__main__":
    main()
