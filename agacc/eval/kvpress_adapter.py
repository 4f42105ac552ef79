"""``kvpress:<press>`` methods: NVIDIA kvpress's presses in the eval harness, run in their own environment.

kvpress pins transformers below 5.3 (this project: 5.23), so its presses run in ``.venv-kvpress``
(made by ``bash scripts/setup_kvpress.sh``), in a subprocess: ``agacc/eval/kvpress_worker.py``, which
imports nothing from agacc, reads the samples as JSON (token ids: the same tokens as every other
method) and writes one JSON line per (sample, method): the predicted token ids and the bytes of the
K/V tensors its cache holds. This side scores them with the task's metric and turns them into the
runner's per-sample results. Perplexity (query-aware: the context under the press, the targets
teacher-forced after it) is scored in the worker against the full cache's logits computed here. No
venv: every kvpress row says "skipped: run bash scripts/setup_kvpress.sh".

Names: ``kvpress:snapkv``, ``kvpress:expected_attention``, ``kvpress:streaming_llm``, ``kvpress:knorm``,
``kvpress:tova``, ``kvpress:observed_attention`` (eager attention), ``kvpress:kvzip`` (context
reconstruction: 2-3 extra prefill passes), each with ``@R`` or ``--ratio R``:
R is this project's ratio, bytes of a 16-bit cache / bytes held, so the press's
``compression_ratio`` (the fraction of tokens it removes) is set for equal bytes with the model's K/V
dtype: ``1 - 2 / (itemsize x R)`` (fp32 on CPU: @4 removes 87.5%, the kept tokens being held in
fp32). ``compression_ratio=X`` after a comma sets kvpress's own knob instead (the measured ratio is
then whatever it gives). Other press settings: ``kvpress:snapkv@4,window_size=32``.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from agacc.eval import ruler
from agacc.eval.scoring import text_score

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("kvpress_worker.py")
KV_PREFIX = "kvpress:"
# the presses the worker knows (kvpress_worker.PRESSES), kept here so this side imports nothing of it
PRESSES = ("snapkv", "expected_attention", "streaming_llm", "knorm", "tova", "observed_attention", "kvzip")
SETUP = "run bash scripts/setup_kvpress.sh"


def venv_python() -> Path:
    """The interpreter of kvpress's environment: $AGACC_KVPRESS_VENV or .venv-kvpress at the repo root."""
    return Path(os.environ.get("AGACC_KVPRESS_VENV", ROOT / ".venv-kvpress")) / "bin" / "python"


@dataclass(frozen=True)
class KVPressMethod:
    press: str
    ratio: float | None = None                # this project's ratio (16-bit bytes / bytes held)
    compression_ratio: float | None = None    # kvpress's own knob (fraction removed), when given
    kwargs: tuple = field(default_factory=tuple)

    n_q = 0
    compress = True
    in_worker = True

    @property
    def name(self) -> str:
        return KV_PREFIX + self.press

    @property
    def target_ratio(self):
        return self.ratio

    def unavailable(self, model=None) -> str | None:
        if not venv_python().exists():
            return (f"skipped: {SETUP} (kvpress pins transformers<5.3: it runs in its own environment, "
                    f"{venv_python().parent.parent.name} is missing)")
        return None

    def with_ratio(self, ratio: float | None) -> "KVPressMethod":
        """``--ratio`` applies when the spec gave neither ``@R`` nor ``compression_ratio``."""
        if ratio is None or self.ratio is not None or self.compression_ratio is not None:
            return self
        return replace(self, ratio=float(ratio))

    def compression_for(self, itemsize: int, prefill: int = 0, added: int = 0) -> float:
        """kvpress's ``compression_ratio`` for this method on K/V of ``itemsize`` bytes. With ``prefill``
        (tokens under the press) and ``added`` (tokens the cache takes after it, uncompressed, before
        the bytes are counted: the teacher-forced answer or targets), the press removes enough that the
        cache holds 1/R of a 16-bit cache *at the end*, as the fitted presets do."""
        if self.compression_ratio is not None:
            return self.compression_ratio
        if self.ratio is None:
            raise ValueError(f"{self.name} needs a ratio: {self.name}@4 or --ratio 4")
        cr = 1.0 - 2.0 / (itemsize * self.ratio)
        if not 0.0 <= cr < 1.0:
            raise ValueError(f"{self.name}@{self.ratio:g}: with {itemsize}-byte K/V the ratio must be >= {2 / itemsize:g} "
                             f"(it keeps the tokens it keeps at {8 * itemsize} bits)")
        if prefill and added:
            kept = max(1.0, (1.0 - cr) * (prefill + added) - added)  # tokens of the prefill it may keep
            cr = 1.0 - kept / prefill
        return cr

    def to_dict(self) -> dict:
        return {"name": self.name, "library": "kvpress", "press": self.press, "ratio": self.ratio,
                "compression_ratio": self.compression_ratio, "kwargs": dict(self.kwargs)}


def parse_kvpress(spec: str) -> tuple[str, KVPressMethod]:
    """``kvpress:PRESS[@R][,compression_ratio=X][,key=value]...`` -> (label, method)."""
    head, *items = [x.strip() for x in spec.split(",")]
    name, at, raw = head.partition("@")
    press = name.strip()[len(KV_PREFIX):]
    if press not in PRESSES:
        raise ValueError(f"method {spec!r}: unknown kvpress press {press!r}; choose from {[KV_PREFIX + p for p in PRESSES]}")
    ratio = None
    if at:
        try:
            ratio = float(raw)
        except ValueError:
            raise ValueError(f"method {spec!r}: the ratio after '@' must be a number, got {raw!r}") from None
        if not ratio > 0:
            raise ValueError(f"method {spec!r}: the ratio after '@' must be > 0")
    cr, kw = None, []
    for item in items:
        key, eq, val = (x.strip() for x in item.partition("="))
        if not eq or not key:
            raise ValueError(f"method {spec!r}: expected key=value after ',', got {item!r}")
        try:
            v = json.loads(val)
        except ValueError:
            v = val
        if key == "compression_ratio":
            if ratio is not None:
                raise ValueError(f"method {spec!r}: give '@R' (equal bytes) or compression_ratio=, not both")
            if not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise ValueError(f"method {spec!r}: compression_ratio is the fraction of tokens removed, in [0, 1)")
            cr = float(v)
        else:
            kw.append((key, v))
    label = f"{KV_PREFIX}{press}" + (f"@{ratio:g}" if ratio is not None else "")
    label = ",".join([label] + [f"{k}={v}" for k, v in ([("compression_ratio", cr)] if cr is not None else []) + kw])
    return label, KVPressMethod(press, ratio, cr, tuple(kw))


# --- the JSON protocol -------------------------------------------------------------------------

def make_request(samples, methods, protocol: str, scoring: str, model_path: str, itemsize: int, eos=(),
                 dtype: str = "float32", threads: int | None = None, refs: dict | None = None) -> dict:
    """The worker's request: every sample's token ids, every method's press and compression. An "lm"
    (perplexity) sample carries its targets and ``refs[index]``, the file of the full cache's logits."""
    out = []
    for s in samples:
        if s.kind == "lm":
            out.append({"index": s.index, "context_ids": list(s.prompt_ids), "target_ids": list(s.target_ids),
                        "ref_logits": str(refs[s.index]),
                        "compression": fitted(methods, itemsize, len(s.prompt_ids), len(s.target_ids) - 1)})
            continue
        ctx, q = (s.context_ids, s.question_ids) if s.has_split else (list(s.prompt_ids), [])
        if protocol == "query-aware" and s.has_split and ctx + q != s.prompt_ids:
            ctx, q = list(s.prompt_ids), []  # the very prompt the other methods prefill
        stop = s.metric == "contains" or s.metric in ruler.METRICS  # the runner's early stops (runner._score)
        # query-aware, match: the answer's tokens (but its last) join the cache before its bytes are counted
        added = len(s.answer_ids) - 1 if protocol == "query-aware" and scoring == "match" else 0
        out.append({"index": s.index, "context_ids": list(ctx), "question_ids": list(q), "answer_ids": list(s.answer_ids),
                    "answers": list(s.answers) if stop else [], "max_new_tokens": s.max_new_tokens,
                    # RULER: once every answer is in the text, case-insensitive (its metric); else any answer
                    "stop_all": s.metric in ruler.METRICS,
                    "compression": fitted(methods, itemsize, len(ctx) + (len(q) if protocol == "query-aware" else 0), added)})
    return {"model": model_path, "dtype": dtype, "threads": threads, "protocol": protocol, "scoring": scoring,
            "eos": sorted(eos), "samples": out,
            "methods": [{"label": label, "press": m.press, "compression_ratio": m.compression_for(itemsize),
                         "kwargs": dict(m.kwargs)} for label, m in methods]}


def fitted(methods, itemsize: int, prefill: int, added: int) -> dict:
    """label -> kvpress's compression_ratio for one sample (``KVPressMethod.compression_for``)."""
    return {label: m.compression_for(itemsize, prefill, added) for label, m in methods}


def results_from_lines(lines, samples, methods, tok, protocol: str, scoring: str, group_size=None) -> list[dict]:
    """The worker's JSON lines -> the runner's per-sample results (scored here with the task's metric)."""
    by_index = {s.index: s for s in samples}
    cfg = dict(methods)
    out = []
    for line in lines:
        if not line.strip():
            continue
        w = json.loads(line)
        s, label = by_index[w["index"]], w["label"]
        r = {"index": s.index, "preset": label, **s.meta}
        if protocol == "query-agnostic":
            r.update(protocol=protocol, reuse=(group_size or {}).get(s.index, 1))
        if "error" in w:
            r["skipped"] = f"skipped: {cfg[label].name} raised {w['error']}"
            out.append(r)
            continue
        pred = w["pred_ids"]
        if "nll" in w:  # perplexity, scored in the worker against this side's full-cache logits
            r.update({k: w[k] for k in ("nll", "nll_full", "top1", "kl", "tokens")})
            r["score"] = min(1.0, math.exp((w["nll_full"] - w["nll"]) / w["tokens"]))
        elif scoring == "match":
            ans = list(s.answer_ids)
            first_bad = next((i for i, (a, b) in enumerate(zip(pred, ans)) if a != b), len(ans))
            r["prediction"] = tok.decode(pred[: first_bad + 1])
            r["score"] = 1.0 if pred == ans else 0.0
        else:
            r["prediction"], r["score"] = text_score(s, tok.decode(pred, skip_special_tokens=True))
        r.update(kv_bytes=int(w["kv_bytes"]), kv_bytes_fp16=int(w["kv_bytes_fp16"]),
                 ratio=w["kv_bytes_fp16"] / w["kv_bytes"] if w["kv_bytes"] else 1.0,
                 kv_bytes_end=int(w["kv_bytes_end"]), kv_bytes_fp16_end=int(w["kv_bytes_fp16_end"]),
                 kept_tokens=int(w["kept_tokens"]), host_bytes=0, decoded_tokens=int(w["decoded_tokens"]),
                 build_s=float(w["build_s"]), decode_s=float(w["decode_s"]), prefill_s=0.0,
                 prompt_tokens=int(w["prompt_tokens"]))
        out.append(r)
    return out


def run_worker(model, tok, samples, methods, protocol: str, scoring: str, timeout: float | None = None) -> list[dict]:
    """Every (sample, kvpress method) through one worker process -> per-sample results. Unavailable
    methods, or perplexity under the query-agnostic protocol (no question), come back as "skipped" rows."""
    rows, todo = [], []
    for label, m in methods:
        why = m.unavailable()
        if why:
            rows += [_skip(s, label, why, protocol) for s in samples]
        else:
            todo.append((label, m))
    answer = [s for s in samples if s.kind == "answer" or (s.kind == "lm" and protocol == "query-aware")]
    asked = {id(s) for s in answer}
    for s in samples:
        if id(s) not in asked:
            rows += [_skip(s, label, f"skipped: {m.name}: a {s.kind} sample has no question to ask after the context",
                           protocol) for label, m in todo]
    if not todo or not answer:
        return rows
    itemsize = torch.finfo(model.dtype).bits // 8 if model.dtype.is_floating_point else 4
    eos = {t for t in (getattr(tok, "eos_token_id", None),) if t is not None}
    groups: dict = {}
    for s in answer:
        if s.group is not None:
            groups[s.group] = groups.get(s.group, 0) + 1
    group_size = {s.index: groups.get(s.group, 1) if s.group is not None else 1 for s in answer}
    with tempfile.TemporaryDirectory(prefix="agacc-kvpress-") as d:
        rq, rs = Path(d) / "request.json", Path(d) / "results.jsonl"
        for s in answer:  # perplexity's reference: the full cache's logits over the targets [T, V] fp32
            if s.kind == "lm":
                torch.save(full_logits(model, s), Path(d) / f"ref_{s.index}.pt")
        req = make_request(answer, todo, protocol, scoring, str(model.config._name_or_path), itemsize, eos,
                           dtype=str(model.dtype).replace("torch.", ""), threads=torch.get_num_threads(),
                           refs={s.index: Path(d) / f"ref_{s.index}.pt" for s in answer if s.kind == "lm"})
        rq.write_text(json.dumps(req))
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        env.pop("PYTHONPATH", None)  # the worker sees its own environment only
        p = subprocess.run([str(venv_python()), str(WORKER), str(rq), str(rs)], env=env, cwd=d,
                           capture_output=True, text=True, timeout=timeout)
        lines = rs.read_text().splitlines() if rs.exists() else []
        if p.returncode != 0:
            why = (p.stderr.strip().splitlines() or ["no output"])[-1][:300]
            done = {(json.loads(x)["index"], json.loads(x)["label"]) for x in lines if x.strip()}
            rows += [_skip(s, label, f"skipped: the kvpress worker failed ({why})", protocol)
                     for s in answer for label, _ in todo if (s.index, label) not in done]
    return rows + results_from_lines(lines, answer, todo, tok, protocol, scoring, group_size)


@torch.inference_mode()
def full_logits(model, s) -> torch.Tensor:
    """The full cache's logits at the positions predicting ``s.target_ids`` (one forward) -> [T, V] fp32:
    the reference the runner's other methods are scored against (``capture_prefill``'s logits)."""
    ids = torch.tensor([list(s.prompt_ids) + list(s.target_ids[:-1])], device=model.device)
    return model(input_ids=ids, use_cache=False, logits_to_keep=len(s.target_ids)).logits[0].float().cpu()


def _skip(s, label: str, why: str, protocol: str) -> dict:
    r = {"index": s.index, "preset": label, **s.meta, "skipped": why}
    if protocol == "query-agnostic":
        r["protocol"] = protocol
    return r
