"""Command line: ``python -m agacc generate ...`` and ``python -m agacc eval ...``."""
from __future__ import annotations

import argparse
import json
import sys
import time


def _config_from_args(preset: str, sets: list[str]):
    from agacc.config import AGACCConfig, parse_override

    overrides = dict(parse_override(s) for s in sets or [])
    return AGACCConfig.preset(preset, **overrides)


def cmd_generate(args) -> int:
    import torch

    import agacc

    cfg = _config_from_args(args.preset, args.set)
    if not args.prompt.strip():
        raise ValueError("--prompt is empty")
    model, tok = agacc.load_model(args.model, device=args.device)
    messages = [{"role": "user", "content": args.prompt}]
    if tok.chat_template and not args.raw:
        inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    else:
        inputs = tok(args.prompt, return_tensors="pt")
    inputs = inputs.to(model.device)
    n_prompt = inputs["input_ids"].shape[1]
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and n_prompt + args.max_new_tokens > limit:
        raise ValueError(f"prompt ({n_prompt} tokens) + max_new_tokens ({args.max_new_tokens}) exceeds the model's {limit}")
    cache = agacc.CompressedCache(model.config, cfg)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=args.max_new_tokens, do_sample=False)
    elapsed = time.perf_counter() - t0
    text = tok.decode(out[0, n_prompt:], skip_special_tokens=True)
    mem = cache.memory()
    result = {"preset": cfg.name, "text": text, "prompt_tokens": n_prompt, "new_tokens": int(out.shape[1] - n_prompt),
              "seconds": round(elapsed, 3), "memory": mem}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(text)
        print(f"\n[{cfg.name}] {n_prompt} prompt + {result['new_tokens']} new tokens in {elapsed:.2f} s")
        print(f"KV cache: {mem['bytes'] / 2**20:.2f} MiB held vs {mem['bytes_fp16'] / 2**20:.2f} MiB at 16 bits "
              f"(ratio {mem['ratio']:.2f}x); host copy {mem['host_bytes'] / 2**20:.2f} MiB")
        print("by tier (MiB): " + ", ".join(f"{k} {v / 2**20:.2f}" for k, v in mem["by_tier"].items() if v))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m agacc", description="Attention-guided adaptive KV-cache compression")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text with the compressed cache and print a memory summary")
    g.add_argument("--prompt", required=True)
    g.add_argument("--preset", default="agacc")
    g.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--model", default=None, help="hub id or local path (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--device", default=None)
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--json", action="store_true", help="print a JSON record instead of text")
    g.set_defaults(func=cmd_generate)
    sub.add_parser("eval", help="evaluate presets on a task (see `python -m agacc eval -h`)", add_help=False)
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
