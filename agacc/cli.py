"""Command line: ``python -m agacc generate ...``, ``calibrate ...``, ``distill ...`` and ``eval ...``."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


def _config_from_args(args):
    """``--method SPEC`` (``agacc.spec`` grammar) or ``--preset NAME``, then every ``--set KEY=VALUE`` on top."""
    from agacc.config import parse_override
    from agacc.spec import parse_method

    if args.method is not None and args.preset is not None:
        raise ValueError("give --method or --preset, not both (--method agacc@4 = --preset agacc --set target_ratio=4)")
    cfg = parse_method(args.method if args.method is not None else (args.preset or "agacc"))
    overrides = dict(parse_override(s) for s in args.set or [])
    return cfg.with_overrides(**overrides) if overrides else cfg


def cmd_generate(args) -> int:
    import agacc
    from agacc.session import generate

    cfg = _config_from_args(args)
    if not args.prompt.strip():
        raise ValueError("--prompt is empty")
    model, tok = agacc.load_model(args.model, device=args.device)
    # greedy decoding through the compressed cache; the session checks the context limit and applies
    # the chat template (unless --raw), as the app does
    if args.prefill_chunk < 0:
        raise ValueError(f"--prefill-chunk must be >= 1 (0: one forward), got {args.prefill_chunk}")
    res = generate(model, tok, args.prompt, cfg, max_new_tokens=args.max_new_tokens, temperature=0.0,
                   chat_template=not args.raw, prefill_chunk=args.prefill_chunk or None)
    n_prompt, elapsed, mem = res["prompt_tokens"], res["seconds"] or 0.0, res["memory"]
    result = {"preset": cfg.name, "text": res["text"], "prompt_tokens": n_prompt, "new_tokens": res["new_tokens"],
              "seconds": round(elapsed, 3), "memory": mem}
    if args.method is not None:
        from agacc.spec import method_label

        result["method"] = method_label(args.method)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(res["text"])
        print(f"\n[{result.get('method', cfg.name)}] {n_prompt} prompt + {result['new_tokens']} new tokens in {elapsed:.2f} s")
        print(f"KV cache: {mem['bytes'] / 2**20:.2f} MiB held vs {mem['bytes_fp16'] / 2**20:.2f} MiB at 16 bits "
              f"(ratio {mem['ratio']:.2f}x); host copy {mem['host_bytes'] / 2**20:.2f} MiB")
        print("by tier (MiB): " + ", ".join(f"{k} {v / 2**20:.2f}" for k, v in mem["by_tier"].items() if v))
    return 0


def cmd_calibrate(args) -> int:
    """Per-layer sensitivity of a model to its cache's error (``agacc.calibrate``): printed, and with
    ``--save`` filed where ``layer_calibration="auto"`` (the agacc preset) finds it."""
    import torch

    import agacc
    from agacc import calibrate
    from agacc.config import AGACCConfig
    from agacc.eval.tasks import read_text

    if args.tokens < 64:
        raise ValueError(f"--tokens must be >= 64, got {args.tokens}")
    model, tok = agacc.load_model(args.model, device=args.device)
    if args.key_basis:
        return _calibrate_key_basis(args, model, tok)
    cfg = AGACCConfig.preset("agacc")
    per_text = []  # per text: one run per --evict fraction (eviction), or the one 3-bit run
    for path in args.text or [None]:
        ids = tok(read_text(path), return_tensors="pt").input_ids[:, :args.tokens]
        if ids.shape[1] < args.tokens:
            raise ValueError(f"{path or 'the default text'} has {ids.shape[1]} tokens, --tokens {args.tokens} needed")
        with torch.inference_mode():
            per_text.append([calibrate.eviction_sensitivity(model, ids, f, cfg.block_size) for f in args.evict]
                            if args.evict else [calibrate.layer_sensitivity(model, ids, cfg, bits=args.bits)])
    # the mean over the texts, then the geometric mean over the runs
    means = [[sum(col) / len(col) for col in zip(*(t[i] for t in per_text))] for i in range(len(per_text[0]))]
    sens = [math.prod(col) ** (1 / len(col)) for col in zip(*means)]
    kind, field = ("evict", "evict_scale") if args.evict else ("bits", "layer_scale")
    gamma = 1.0 if args.evict else calibrate.default_gamma(cfg.with_overrides(target_ratio=4.0))
    scale = calibrate.layer_scale(sens, gamma)
    what = f"evicting {args.evict} of its blocks" if args.evict else f"at {args.bits or cfg.b_min} bits"
    result = {"model": calibrate.model_key(model.config), "texts": args.text or ["(default)"], "tokens": args.tokens,
              kind: args.evict or args.bits or cfg.b_min, "sensitivity": sens, field: list(scale)}
    if args.save:
        result["saved"] = str(calibrate.save_sensitivity(model.config, sens, kind))
    print(json.dumps(result, indent=2) if args.json else "\n".join(
        [f"{result['model']}: KL per token (nats) with one layer's cache {what}, then {field}"]
        + [f"layer {i:3d}  {x:.3g}  x{f:.3f}" for i, (x, f) in enumerate(zip(sens, scale))]
        + [f"saved: {result['saved']}" if args.save else "(--save files it for layer_calibration=auto)"]))
    return 0


def _calibrate_key_basis(args, model, tok) -> int:
    """``calibrate --key-basis``: the model's key basis (``agacc.basis``) from the first ``--tokens`` tokens of
    each text (default: the repo's tuning texts; every query of them weighs the channels), and with ``--save``
    filed where key_quant="basis" finds it."""
    import torch

    from agacc import basis
    from agacc.config import AGACCConfig
    from agacc.eval.runner import capture_prefill
    from agacc.eval.tasks import read_text
    from agacc.policy import basis_layouts

    texts = [read_text(p) for p in args.text] if args.text else _tuning_texts(tok)
    ids = [tok(t, return_tensors="pt").input_ids[0, :args.tokens].tolist() for t in texts]
    with torch.inference_mode():
        table = basis.calibrate(model, [capture_prefill(model, i, n_obs=len(i)) for i in ids])
    layouts = basis_layouts(AGACCConfig.preset("agacc", key_quant="basis", keep_all=0.0), table.V.shape[-1])
    result = {"model": table.model, "texts": args.text or ["(the tuning texts)"], "tokens": [len(i) for i in ids],
              "layouts": {c: [list(g) for g in lay] for c, lay in zip((2, 3, 4), layouts)}}
    if args.save:
        result["saved"] = str(basis.save(model.config, table))
    print(json.dumps(result, indent=2) if args.json else "\n".join(
        [f"{table.model}: key basis of {table.V.shape[0]} layers x {table.V.shape[1]} KV heads, head dim "
         f"{table.V.shape[-1]}; 2/3/4-bit blocks' keys as (bits, coefficients): {result['layouts']}",
         f"saved: {result['saved']}" if args.save else "(--save files it for key_quant=basis)"]))
    return 0


def _tuning_texts(tok) -> list[str]:
    """The tuning split of the repo's text suite (bench/corpus.py), as text; a ValueError when the
    repo's bench/ folder is not importable (an installed package: pass --text)."""
    try:
        from bench import corpus
    except ImportError:
        raise ValueError("the tuning texts live in the repository's bench/ folder; run from the repository root "
                         "or pass --text FILE...") from None
    return [corpus.read(t, tok) for t in corpus.suite("tuning")]


def cmd_distill(args) -> int:
    """Train KV-Distill's selector and adapter for a model (``agacc.kv_distill``) and file them where
    ``python -m agacc eval --preset kv-distill@R`` finds them."""
    import torch

    import agacc
    from agacc import kv_distill
    from agacc.eval.tasks import read_text

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = agacc.load_model(args.model, device=args.device)
    texts = [read_text(p) for p in args.text] if args.text else _tuning_texts(tok)
    ids = [tok(t).input_ids for t in texts]
    ratios = tuple(float(r) for r in args.ratios)
    t0 = time.perf_counter()
    distill = kv_distill.train(model, ids, args.steps, n_ctx=args.context, n_cont=args.continuation, ratios=ratios,
                               lr=args.lr, seed=args.seed, minutes=args.minutes)
    path = Path(args.out) if args.out else kv_distill.weights_path(model)
    meta = {"model": getattr(model.config, "_name_or_path", ""), "texts": args.text or ["bench/corpus tuning split"],
            "steps": distill.steps_done, "context": args.context, "continuation": args.continuation,
            "ratios": list(ratios), "lr": args.lr, "seed": args.seed, "seconds": round(time.perf_counter() - t0, 1)}
    kv_distill.save(distill, path, meta)
    print(f"saved {path} ({path.stat().st_size / 2**20:.1f} MiB, {distill.steps_done} steps, {meta['seconds']:.0f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m agacc", description="Attention-guided adaptive KV-cache compression")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text with the compressed cache and print a memory summary")
    g.add_argument("--prompt", required=True)
    g.add_argument("--method", default=None, metavar="SPEC",
                   help="NAME[@RATIO][,key=value]..., e.g. agacc@4 or h2o@4,recent_window=32 (see agacc/spec.py)")
    g.add_argument("--preset", default=None, help="a preset name (default: agacc); --method takes the same and more")
    g.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    from agacc.session import PREFILL_CHUNK

    g.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK,
                   help="prompt tokens a prefill forward takes; the cache compresses after each (0: one forward)")
    g.add_argument("--model", default=None, help="hub id or local path (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--device", default=None)
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--json", action="store_true", help="print a JSON record instead of text")
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("calibrate", help="measure each layer's sensitivity to its cache's error (layer_scale)")
    c.add_argument("--text", nargs="+", default=None, help="text files, sensitivities averaged (default: a licence text)")
    c.add_argument("--tokens", type=int, default=1536, help="tokens a text: the first 5/6 cached, the rest scored")
    c.add_argument("--bits", type=int, default=None, help="bits of the layer under test (default: the preset's b_min)")
    c.add_argument("--evict", type=float, nargs="+", default=None, metavar="FRACTION",
                   help="measure eviction instead: the layer under test loses these fractions of its blocks "
                        "(least attended first; geometric mean over them) -> evict_scale (docs/tuning.md round 10)")
    c.add_argument("--key-basis", action="store_true",
                   help="calibrate the model's key basis instead (key_quant=basis; agacc.basis; default texts: the "
                        "repo's tuning texts)")
    c.add_argument("--model", default=None, help="hub id or local path (default: the embedded SmolLM2-135M-Instruct)")
    c.add_argument("--device", default=None)
    c.add_argument("--save", action="store_true", help="file it for layer_calibration=auto (under $AGACC_CACHE; with "
                   "--evict the eviction table; with --key-basis for key_quant=basis)")
    c.add_argument("--json", action="store_true", help="print a JSON record")
    c.set_defaults(func=cmd_calibrate)
    d = sub.add_parser("distill", help="train KV-Distill's token selector and adapter (the kv-distill@R baseline)")
    d.add_argument("--text", nargs="+", default=None, help="training text files (default: the repo's tuning texts)")
    d.add_argument("--steps", type=int, default=600, help="training windows, one a step")
    d.add_argument("--minutes", type=float, default=45.0, help="stop after this long even if steps remain")
    d.add_argument("--context", type=int, default=384, help="context tokens a window (compressed)")
    d.add_argument("--continuation", type=int, default=48, help="tokens after the context the KL is taken over")
    d.add_argument("--ratios", nargs="+", default=["2", "4", "8"], help="compression ratios drawn per step")
    d.add_argument("--lr", type=float, default=2e-3)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    d.add_argument("--out", default=None, help="weights file (default: under $AGACC_CACHE, where eval finds it)")
    d.add_argument("--model", default=None, help="hub id or local path (default: the embedded SmolLM2-135M-Instruct)")
    d.add_argument("--device", default=None)
    d.set_defaults(func=cmd_distill)
    sub.add_parser("eval", help="evaluate methods on a task (see `python -m agacc eval -h`)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:
        from agacc.eval.cli import main as eval_main

        return eval_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
