"""kvpress worker: runs NVIDIA kvpress presses on samples, in kvpress's own virtual environment.

    .venv-kvpress/bin/python agacc/eval/kvpress_worker.py REQUEST.json RESULTS.jsonl

It imports nothing from agacc (that environment has transformers < 5.3, this project 5.23): the
adapter (``agacc/eval/kvpress_adapter.py``) writes the request and scores what comes back.

Request (JSON): ``{"model": path, "dtype": "float32", "threads": n|null, "protocol":
"query-aware"|"query-agnostic", "scoring": "match"|"generate", "eos": [ids], "methods": [{"label",
"press", "compression_ratio", "kwargs"}], "samples": [{"index", "context_ids", "question_ids",
"answer_ids", "answers", "max_new_tokens", "stop_all", "compression"} or, for perplexity, {"index",
"context_ids", "target_ids", "ref_logits", "compression"}]}``; a sample's ``compression`` (label ->
compression_ratio: the adapter's fit for equal bytes at the end) overrides the method's.

Per sample and method, kvpress's protocol (its ``KVPressTextGenerationPipeline``): the press hooks the
attention layers during a prefill and prunes the cache (a ``DynamicCache``); later tokens take the
positions after the *uncompressed* sequence. query-agnostic: the context is prefilled under the press,
then the question (no press), then the answer; query-aware: context + question prefilled under the
press, then the answer. ``match`` scoring teacher-forces the answer in one forward and returns the
argmax at each answer position; ``generate`` decodes greedily (stopping at EOS, at ``max_new_tokens``,
or once the text contains an answer; ``stop_all``: all of them, case-insensitive, as RULER's metric).

Perplexity (a sample with ``target_ids``): the context prefilled under the press, then the target tokens
teacher-forced through the pruned cache in chunks of 8 (as the adapter's other methods), compared with the
full cache's logits the adapter saved (``ref_logits``: a ``torch.save``d [T, V] fp32 tensor): ``nll``,
``nll_full``, ``top1``, ``kl``, ``tokens`` added to the line.

One JSON line per (sample, method): ``{"index", "label", "pred_ids", "kv_bytes", "kv_bytes_fp16",
"kv_bytes_end", "kv_bytes_fp16_end", "kept_tokens", "prompt_tokens", "build_s", "decode_s",
"decoded_tokens"}`` or ``{"index", "label", "error"}``. Bytes: ``cache_bytes`` walks the K/V tensors
the cache holds (each storage once) after the prefill (query-agnostic: the compressed context;
query-aware: at the end, as the adapter's other methods) and at the end; ``*_fp16`` is a 16-bit cache
of the same tokens (all of them, uncompressed).
"""
from __future__ import annotations

import functools
import json
import sys
import time

PRESSES = {
    "snapkv": "SnapKVPress",
    "expected_attention": "ExpectedAttentionPress",
    "streaming_llm": "StreamingLLMPress",
    "knorm": "KnormPress",
    "tova": "TOVAPress",
    "observed_attention": "ObservedAttentionPress",  # needs attn_implementation="eager"
    # query-agnostic by design: scores each entry by how well the model reconstructs the context from the
    # cache (2-3 extra prefill passes after the prefill, when the press's block ends)
    "kvzip": "KVzipPress",
}
EAGER = {"observed_attention"}


def cache_bytes(kv_pairs) -> int:
    """Bytes of the storages behind the K/V tensors ``[(keys, values), ...]`` (per layer), each once."""
    seen, total = set(), 0
    for pair in kv_pairs:
        for t in pair:
            if t is None:
                continue
            st = t.untyped_storage()
            key = (st.data_ptr(), st.nbytes(), str(t.device))
            if st.nbytes() == 0 or key in seen:
                continue
            seen.add(key)
            total += st.nbytes()
    return total


def fp16_bytes(kv_pairs, tokens: int) -> int:
    """A 16-bit cache of ``tokens`` tokens with these layers' shapes: 2 bytes x (K + V) x batch x heads x
    head dim x tokens, per layer."""
    total = 0
    for k, _ in kv_pairs:
        b, h, _, d = k.shape
        total += 2 * 2 * b * h * d * tokens
    return total


def layers_kv(cache):
    return [(layer.keys, layer.values) for layer in cache.layers]


def _forward(model, ids, cache, start: int, logits_to_keep: int = 0):
    import torch

    x = torch.tensor([ids], device=model.device)
    pos = torch.arange(start, start + len(ids), device=model.device)[None]
    return model(input_ids=x, past_key_values=cache, position_ids=pos, use_cache=True,
                 logits_to_keep=logits_to_keep).logits[0].float()


def run_one(model, tok, press, sample: dict, protocol: str, scoring: str, eos) -> dict:
    import torch
    from transformers import DynamicCache

    ctx, q, ans = sample["context_ids"], sample["question_ids"], sample["answer_ids"]
    prefill = ctx if protocol == "query-agnostic" else ctx + q
    cache = DynamicCache()
    t0 = time.perf_counter()
    with torch.inference_mode():
        with press(model):
            first = _forward(model, prefill, cache, 0, logits_to_keep=1)[-1]
        built = layers_kv(cache)
        held = cache_bytes(built), fp16_bytes(built, len(prefill))
        kept = int(cache.get_seq_length())
        pos = len(prefill)
        t1 = time.perf_counter()
        if protocol == "query-agnostic":
            first = _forward(model, q, cache, pos, logits_to_keep=1)[-1]
            pos += len(q)
        if scoring == "match":
            rest = _forward(model, ans[:-1], cache, pos) if len(ans) > 1 else first.new_zeros(0, first.shape[-1])
            pred = torch.cat([first[None], rest]).argmax(-1).tolist()
            processed = len(ans) - 1
        else:
            pred = [int(first.argmax())]
            while len(pred) < sample["max_new_tokens"] and pred[-1] not in eos:
                text = tok.decode(pred, skip_special_tokens=True)
                if answered(text, sample):
                    break
                pred.append(int(_forward(model, [pred[-1]], cache, pos + len(pred) - 1, logits_to_keep=1)[-1].argmax()))
            processed = len(pred) - 1
        t2 = time.perf_counter()
    end = layers_kv(cache)
    total = len(ctx) + len(q) + processed
    r = {"index": sample["index"], "pred_ids": pred, "kept_tokens": kept, "prompt_tokens": len(ctx) + len(q),
         "kv_bytes_end": cache_bytes(end), "kv_bytes_fp16_end": fp16_bytes(end, total),
         "build_s": t1 - t0, "decode_s": t2 - t1,
         "decoded_tokens": processed + (len(q) if protocol == "query-agnostic" else 0)}
    if protocol == "query-agnostic":
        r["kv_bytes"], r["kv_bytes_fp16"] = held
    else:
        r["kv_bytes"], r["kv_bytes_fp16"] = r["kv_bytes_end"], r["kv_bytes_fp16_end"]
    return r


def answered(text: str, sample: dict) -> bool:
    """Generation can stop: the text holds an answer (``stop_all``: every answer, case-insensitive)."""
    answers = [str(a) for a in sample.get("answers") or []]
    if sample.get("stop_all"):
        return bool(answers) and all(a.lower() in text.lower() for a in answers)
    return any(a in text for a in answers)


@functools.cache
def _metrics():
    """agacc/eval/metrics.py, loaded once from its file beside this one: it needs only torch, and this
    worker imports no agacc package (its environment has kvpress's transformers)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("agacc_eval_metrics", Path(__file__).with_name("metrics.py"))
    metrics = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(metrics)
    return metrics


def lm_stats(logits, ref_logits, targets) -> dict:
    """The runner's ``agacc.eval.metrics.lm_stats`` on the worker's logits."""
    return _metrics().lm_stats(logits, ref_logits, targets)


def run_lm(model, press, sample: dict, chunk: int = 8) -> dict:
    """Perplexity: the context under the press, the targets teacher-forced after it (see the module doc)."""
    import torch
    from transformers import DynamicCache

    ctx, tgt = sample["context_ids"], sample["target_ids"]
    ref = torch.load(sample["ref_logits"])
    cache = DynamicCache()
    t0 = time.perf_counter()
    with torch.inference_mode():
        with press(model):
            first = _forward(model, ctx, cache, 0, logits_to_keep=1)[-1]
        kept = int(cache.get_seq_length())
        t1 = time.perf_counter()
        forced = tgt[:-1]
        rest = [_forward(model, forced[lo: lo + chunk], cache, len(ctx) + lo) for lo in range(0, len(forced), chunk)]
        logits = torch.cat([first[None]] + rest)
        t2 = time.perf_counter()
    end = layers_kv(cache)
    held, fp16 = cache_bytes(end), fp16_bytes(end, len(ctx) + len(forced))
    return {"index": sample["index"], "pred_ids": [], "kept_tokens": kept, "prompt_tokens": len(ctx),
            "kv_bytes": held, "kv_bytes_fp16": fp16, "kv_bytes_end": held, "kv_bytes_fp16_end": fp16,
            "build_s": t1 - t0, "decode_s": t2 - t1, "decoded_tokens": len(forced),
            **lm_stats(logits, ref, torch.tensor(tgt))}


def make_press(method: dict, compression: float | None = None):
    import kvpress

    name = method["press"]
    if name not in PRESSES:
        raise ValueError(f"unknown press {name!r}; choose from {sorted(PRESSES)}")
    cr = method["compression_ratio"] if compression is None else compression
    return getattr(kvpress, PRESSES[name])(compression_ratio=float(cr), **method.get("kwargs", {}))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: kvpress_worker.py REQUEST.json RESULTS.jsonl", file=sys.stderr)
        return 2
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    req = json.loads(open(argv[0], encoding="utf-8").read())
    if req.get("threads"):
        torch.set_num_threads(int(req["threads"]))
    dtype = getattr(torch, req.get("dtype") or "float32")
    tok = AutoTokenizer.from_pretrained(req["model"])
    models = {}

    def model_for(press_name):
        attn = "eager" if press_name in EAGER else "sdpa"
        if attn not in models:
            models[attn] = AutoModelForCausalLM.from_pretrained(req["model"], dtype=dtype, attn_implementation=attn).eval()
        return models[attn]

    eos = set(req.get("eos") or [])
    with open(argv[1], "w", encoding="utf-8") as out:
        for sample in req["samples"]:
            for method in req["methods"]:
                try:
                    press = make_press(method, (sample.get("compression") or {}).get(method["label"]))
                    model = model_for(method["press"])
                    r = (run_lm(model, press, sample) if "target_ids" in sample else
                         run_one(model, tok, press, sample, req["protocol"], req["scoring"], eos))
                except Exception as e:  # one method failing on one sample: said in its row
                    r = {"index": sample["index"], "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
                r["label"] = method["label"]
                out.write(json.dumps(r) + "\n")
                out.flush()
    return 0


def exit_with_parent(poll_s: float = 1.0) -> None:
    """End this process once its parent is gone: an evaluation killed mid-run (the adapter's process)
    must not leave its worker computing for nobody. A daemon thread watches for the re-parenting."""
    import os
    import threading

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


if __name__ == "__main__":
    exit_with_parent()
    sys.exit(main())
