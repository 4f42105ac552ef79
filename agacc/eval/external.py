"""Methods from outside this project, run in the same harness and named like presets on the CLI.

* ``hf-quantized:quanto-4``, ``hf-quantized:quanto-2``, ``hf-quantized:hqq-4``, ``hf-quantized:hqq-2``:
  transformers' own ``QuantizedCache`` (KIVI-style: every token quantised group-wise along the
  channel axis, the most recent ``residual_length`` tokens kept at the model's precision, re-quantised
  when that window fills), with the optimum-quanto or HQQ backend. transformers' defaults
  (``q_group_size=64``, ``residual_length=128``, ``axis_key=axis_value=0``) unless the spec sets them:
  ``hf-quantized:quanto-4,residual_length=32,q_group_size=32``. A fixed-bit method: ``--ratio`` does
  not move it.
* ``kvpress:<press>``: NVIDIA kvpress's presses, run in their own environment
  (``agacc/eval/kvpress_adapter.py``).
* ``kv-distill@R``: KV-Distill (``agacc.kv_distill``), its selector and adapter trained here by
  ``python -m agacc distill``; "skipped: ..." until they are. R = tokens in the context / tokens kept
  (its cache holds the kept tokens at 16 bits: R is its bytes ratio at the prompt's end).

Bytes are counted from what the cache holds (``quantized_cache_bytes``): every plain tensor reachable
from each layer's quantised keys and values (quanto: packed codes, scales, shifts; HQQ: packed codes,
scales, zero points), plus the residual full-precision keys and values, each storage once, against
a 16-bit cache of the same tokens. A backend whose package is missing is reported as
"skipped: pip install ..." by the runner, never a failed run.
"""
from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass

import torch

HF_PREFIX = "hf-quantized:"
HF_VARIANTS = {"quanto-4": ("quanto", 4), "quanto-2": ("quanto", 2), "hqq-4": ("hqq", 4), "hqq-2": ("hqq", 2)}
HF_PACKAGES = {"quanto": ("optimum.quanto", "optimum-quanto==0.2.7"), "hqq": ("hqq", "hqq==0.2.8.post1")}
HF_KEYS = ("q_group_size", "residual_length", "axis_key", "axis_value")


def external_names() -> list[str]:
    """Every external method name the CLI accepts."""
    from agacc.eval.kvpress_adapter import KV_PREFIX, PRESSES

    return [HF_PREFIX + v for v in HF_VARIANTS] + [KV_PREFIX + p for p in PRESSES] + [KV_DISTILL]


def is_external_name(name: str) -> bool:
    from agacc.eval.kvpress_adapter import KV_PREFIX

    head = name.split(",")[0].split("@")[0].strip()
    return name.startswith(HF_PREFIX) or name.startswith(KV_PREFIX) or head == KV_DISTILL


@dataclass(frozen=True)
class HFQuantized:
    """transformers' ``QuantizedCache`` as an eval method (see the module docstring)."""
    variant: str
    backend: str
    nbits: int
    q_group_size: int = 64
    residual_length: int = 128
    axis_key: int = 0
    axis_value: int = 0

    # what the runner reads of a method config
    target_ratio = None
    n_q = 0
    compress = True

    @property
    def name(self) -> str:
        return HF_PREFIX + self.variant

    def unavailable(self, model=None) -> str | None:
        """None when the backend's package imports; else why not, naming the install command."""
        module, pin = HF_PACKAGES[self.backend]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return f"skipped: {module} is not installed (pip install {pin}; keeps torch as it is)"
        return None

    def new_cache(self, model):
        from transformers import QuantizedCache

        return QuantizedCache(self.backend, model.config, nbits=self.nbits, axis_key=self.axis_key,
                              axis_value=self.axis_value, q_group_size=self.q_group_size,
                              residual_length=self.residual_length)

    def memory(self, cache) -> dict:
        return quantized_cache_bytes(cache)

    def to_dict(self) -> dict:
        return {"name": self.name, "library": "transformers.QuantizedCache", **asdict(self)}


KV_DISTILL = "kv-distill"
_DISTILLED: dict = {}  # weights path -> the loaded KVDistill (one load per process)


@dataclass(frozen=True)
class KVDistillMethod:
    """KV-Distill (``agacc.kv_distill``) as an eval method: the prompt goes in one forward through the
    selector and adapter, the cache keeps 1/``ratio`` of its tokens; later tokens are kept whole."""
    ratio: float
    weights: str | None = None  # a weights file (default: ``kv_distill.weights_path(model)``)

    n_q = 0
    compress = True

    @property
    def target_ratio(self):
        return self.ratio

    @property
    def name(self) -> str:
        return f"{KV_DISTILL}@{self.ratio:g}"

    def _path(self, model):
        from pathlib import Path

        from agacc import kv_distill

        return Path(self.weights) if self.weights else kv_distill.weights_path(model)

    def unavailable(self, model=None) -> str | None:
        """None when trained weights are there (checked against ``model`` when given); else why not."""
        if model is None:
            return None
        path = self._path(model)
        if not path.exists():
            return f"skipped: no trained KV-Distill weights at {path} (train them: python -m agacc distill)"
        return None

    def distill(self, model):
        from agacc import kv_distill

        path = self._path(model)
        if str(path) not in _DISTILLED:
            _DISTILLED[str(path)] = kv_distill.load(model, path)
        return _DISTILLED[str(path)]

    def build(self, model, ids: list[int], prefill_chunk: int | None = None):
        """-> (cache holding the compressed ``ids``, logits after the last id [V] fp32). One forward
        whatever ``prefill_chunk`` (the selector ranks the whole context at once)."""
        from agacc import kv_distill

        with torch.inference_mode():
            return kv_distill.compress(model, self.distill(model), ids, self.ratio)

    def memory(self, cache) -> dict:
        return cache.memory()

    def to_dict(self) -> dict:
        meta = next(iter(_DISTILLED.values())).meta if len(_DISTILLED) == 1 else {}
        return {"name": self.name, "library": "agacc.kv_distill (trained here)", "ratio": self.ratio, "training": meta}


def parse_external(spec: str, ratio: float | None = None) -> tuple[str, object]:
    """``hf-quantized:VARIANT[,key=value]...``, ``kvpress:PRESS[@R][,key=value]...`` or
    ``kv-distill[@R][,weights=FILE]`` -> (label, method); ``ratio`` (``--ratio``) applies to the kvpress
    and kv-distill methods without their own. A bad name or setting
    raises a ValueError listing what is valid."""
    from agacc.eval.kvpress_adapter import KV_PREFIX, parse_kvpress

    if spec.strip().startswith(KV_PREFIX):
        label, method = parse_kvpress(spec.strip())
        method = method.with_ratio(ratio)
        if method.ratio is None and method.compression_ratio is None:
            raise ValueError(f"method {spec!r} needs a ratio: {method.name}@4, --ratio 4, or compression_ratio=0.75")
        return label, method
    head, *items = [x.strip() for x in spec.split(",")]
    name, at, r = head.partition("@")
    name = name.strip()
    if name == KV_DISTILL:
        try:
            value = float(r) if at else ratio
        except ValueError:
            raise ValueError(f"method {spec!r}: the ratio after '@' must be a number") from None
        if value is None or not value >= 1:
            raise ValueError(f"method {spec!r} needs a ratio >= 1: {KV_DISTILL}@4 or --ratio 4")
        kw = {}
        for item in items:
            key, eq, raw = item.partition("=")
            if not eq or key.strip() != "weights":
                raise ValueError(f"method {spec!r}: expected weights=FILE, got {item!r}")
            kw["weights"] = raw.strip()
        method = KVDistillMethod(value, **kw)
        return method.name + (f",weights={kw['weights']}" if kw else ""), method
    if name.startswith(HF_PREFIX):
        variant = name[len(HF_PREFIX):]
        if variant not in HF_VARIANTS:
            raise ValueError(f"method {spec!r}: unknown QuantizedCache variant {variant!r}; choose from "
                             f"{[HF_PREFIX + v for v in HF_VARIANTS]}")
        if at:
            raise ValueError(f"method {spec!r}: {name} stores a fixed number of bits, a ratio after '@' cannot move it")
        kw = {}
        for item in items:
            key, eq, raw = item.partition("=")
            key = key.strip()
            if not eq or key not in HF_KEYS:
                raise ValueError(f"method {spec!r}: expected key=value with key in {list(HF_KEYS)}, got {item!r}")
            try:
                kw[key] = int(raw)
            except ValueError:
                raise ValueError(f"method {spec!r}: {key} must be an integer, got {raw.strip()!r}") from None
        backend, nbits = HF_VARIANTS[variant]
        label = ",".join([name] + [f"{k}={v}" for k, v in kw.items()])
        return label, HFQuantized(variant, backend, nbits, **kw)
    raise ValueError(f"method {spec!r}: not an external method; choose from {external_names()}")


# --- byte accounting --------------------------------------------------------------------------

def _plain_tensors(obj, out: list) -> None:
    """Every plain tensor reachable from ``obj``: tensor subclasses (quanto's WeightQBitsTensor,
    PackedTensor) are opened through ``__tensor_flatten__`` down to the tensors that own storage;
    tuples, lists and dicts (HQQ's (codes, meta)) are walked."""
    if isinstance(obj, torch.Tensor):
        if type(obj) in (torch.Tensor, torch.nn.Parameter):
            out.append(obj)
            return
        flatten = getattr(obj, "__tensor_flatten__", None)
        if flatten is None:
            raise TypeError(f"cannot count the bytes of a {type(obj).__name__} (no __tensor_flatten__)")
        for attr in flatten()[0]:
            _plain_tensors(getattr(obj, attr), out)
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            _plain_tensors(x, out)
    elif isinstance(obj, dict):
        for x in obj.values():
            _plain_tensors(x, out)


def tensors_nbytes(objs) -> int:
    """Bytes of the storages behind every plain tensor reachable from ``objs``, each storage once (a view
    holds its whole storage)."""
    found: list = []
    _plain_tensors(list(objs), found)
    seen, total = set(), 0
    for t in found:
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes(), t.device)
        if st.nbytes() == 0 or key in seen:
            continue
        seen.add(key)
        total += st.nbytes()
    return total


def quantized_cache_bytes(cache) -> dict:
    """A transformers ``QuantizedCache`` -> {'bytes', 'bytes_fp16', 'host_bytes', 'tokens', 'quantized_bytes',
    'residual_bytes'}: the quantised tensors (codes + scales + zero points / shifts) and the residual
    full-precision K/V it holds, against a 16-bit cache of the same tokens (2 bytes x 2 (K, V) x batch x
    KV heads x head dim x tokens, per layer)."""
    q_bytes = r_bytes = fp16 = 0
    tokens = 0
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False):
            continue
        q_bytes += tensors_nbytes([layer._quantized_keys, layer._quantized_values])
        r_bytes += tensors_nbytes([layer.keys, layer.values])
        n = layer.get_seq_length()
        tokens = max(tokens, n)
        # the shape of the tokens' K/V: the quantised tensor's logical shape (batch, heads, tokens, head dim)
        qk = layer._quantized_keys
        shape = qk[1]["shape"] if isinstance(qk, tuple) else qk.shape
        b, h, _, d = shape
        fp16 += 2 * 2 * b * h * d * n
    return {"bytes": q_bytes + r_bytes, "bytes_fp16": fp16, "host_bytes": 0, "tokens": tokens,
            "quantized_bytes": q_bytes, "residual_bytes": r_bytes}
