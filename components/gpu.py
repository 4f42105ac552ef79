"""On a CUDA machine: the hub models that fit its GPU, and the GPU memory line of the header.

No gradio here. Both read ``torch.cuda`` only (the tests monkeypatch it)."""
from __future__ import annotations

import torch

GIB = 2 ** 30
# hub id -> parameters (billions): instruction-tuned models of the architectures the library serves,
# small to mid size (a Spaces GPU: T4 16 GB, A10G 24 GB, L4 24 GB, A100 40/80 GB, H100 80 GB); none
# gated, so a Space loads them without a token (meta-llama's need one: type the id to use them)
GPU_MODELS = {
    "HuggingFaceTB/SmolLM2-360M-Instruct": 0.36,
    "Qwen/Qwen2.5-0.5B-Instruct": 0.49,
    "Qwen/Qwen2.5-1.5B-Instruct": 1.54,
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": 1.71,
    "Qwen/Qwen2.5-3B-Instruct": 3.09,
    "microsoft/Phi-3.5-mini-instruct": 3.82,
    "allenai/OLMo-2-1124-7B-Instruct": 7.30,
    "Qwen/Qwen2.5-7B-Instruct": 7.62,
}
# the weights in bf16 (2 bytes a parameter) take at most this share of the GPU: the rest is for the
# KV cache of a long prompt (a full-cache comparison doubles it), activations and the CUDA context
WEIGHT_SHARE = 0.5


def model_bytes(params_billion: float, itemsize: int = 2) -> int:
    return int(params_billion * 1e9 * itemsize)


def gpu_models(total_memory: int | None = None) -> list[str]:
    """The ``GPU_MODELS`` whose bf16 weights take at most ``WEIGHT_SHARE`` of the GPU's memory (GPU 0's
    ``total_memory`` unless given), smallest first; [] without CUDA."""
    if total_memory is None:
        if not torch.cuda.is_available():
            return []
        total_memory = torch.cuda.get_device_properties(0).total_memory
    return [name for name, p in sorted(GPU_MODELS.items(), key=lambda kv: kv[1])
            if model_bytes(p) <= WEIGHT_SHARE * total_memory]


def gpu_memory() -> dict | None:
    """{name, allocated, peak, total} in bytes of GPU 0 (``torch.cuda.memory_allocated`` /
    ``max_memory_allocated`` / the device's total), None without CUDA."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {"name": getattr(props, "name", "GPU"), "allocated": int(torch.cuda.memory_allocated(0)),
            "peak": int(torch.cuda.max_memory_allocated(0)), "total": int(props.total_memory)}


def gpu_line(kv_bytes: int | None = None) -> str:
    """The header's GPU line: memory in use and peak (all of this process's tensors: weights, caches,
    activations) beside the KV cache's bytes of this session's last run; "" without CUDA."""
    m = gpu_memory()
    if m is None:
        return ""
    kv = f"; this session's KV cache {kv_bytes / GIB:.3f} GiB" if kv_bytes is not None else ""
    return (f"<span id='gpu-memory'>GPU {m['name']}: {m['allocated'] / GIB:.2f} GiB in use, peak "
            f"{m['peak'] / GIB:.2f} GiB of {m['total'] / GIB:.1f} GiB{kv}</span>")
