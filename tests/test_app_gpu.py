"""The app on a CUDA machine, without one: ``torch.cuda`` monkeypatched. The model list offers the hub
models whose bf16 weights fit the GPU (checked against the parameter counts here), the header shows GPU
memory in use and peak (``memory_allocated`` / ``max_memory_allocated``) beside the session's KV-cache
bytes; without CUDA neither appears."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

GIB = 2 ** 30


@pytest.fixture
def fake_cuda(monkeypatch):
    """A fake GPU 0 of ``total`` bytes with ``allocated`` / ``peak`` bytes in use (set on the returned object)."""
    state = SimpleNamespace(total=16 * GIB, allocated=int(3.25 * GIB), peak=int(5.5 * GIB), name="Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i=0: SimpleNamespace(total_memory=state.total, name=state.name))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i=0: state.allocated)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda i=0: state.peak)
    return state


@pytest.mark.parametrize("total_gib", [8, 16, 24, 80])
def test_gpu_models_fit_the_gpu(fake_cuda, total_gib):
    from components import gpu

    fake_cuda.total = total_gib * GIB
    got = gpu.gpu_models()
    # the reference: bf16 weights (2 bytes a parameter) at most half of the GPU's memory
    want = [n for n, p in gpu.GPU_MODELS.items() if p * 1e9 * 2 <= 0.5 * total_gib * GIB]
    assert set(got) == set(want) and got == sorted(got, key=gpu.GPU_MODELS.get)
    assert "HuggingFaceTB/SmolLM2-360M-Instruct" in got
    if total_gib == 16:  # a T4: the 3B models fit, the 7B ones do not
        assert "Qwen/Qwen2.5-3B-Instruct" in got and "Qwen/Qwen2.5-7B-Instruct" not in got
    if total_gib == 80:
        assert set(got) == set(gpu.GPU_MODELS)


def test_no_cuda_no_gpu_models_no_line(monkeypatch):
    from components import gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.gpu_models() == [] and gpu.gpu_memory() is None and gpu.gpu_line(123) == ""


def test_gpu_line_numbers(fake_cuda):
    from components import gpu

    line = gpu.gpu_line(kv_bytes=512 * 2 ** 20)
    assert "GPU Tesla T4: 3.25 GiB in use, peak 5.50 GiB of 16.0 GiB" in line
    assert "this session's KV cache 0.500 GiB" in line
    assert gpu.gpu_memory() == {"name": "Tesla T4", "allocated": int(3.25 * GIB), "peak": int(5.5 * GIB),
                                "total": 16 * GIB}


def test_app_model_list_and_header_on_cuda(fake_cuda, monkeypatch):
    import app as A
    from agacc.trace import Trace
    from components import gpu
    from components.state import EMBEDDED_CHOICE, HUB_CHOICES

    fake_cuda.total = 24 * GIB
    a = A.AgaccApp(preload=False, offer_hub=True, max_context=4096)
    assert a.model_choices[0] == EMBEDDED_CHOICE
    assert a.model_choices[1:] == gpu.gpu_models(24 * GIB)
    assert "Qwen/Qwen2.5-7B-Instruct" not in a.model_choices  # 15.2 GB of weights > half of 24 GiB
    # the header: GPU memory beside this session's last KV-cache bytes
    us = a.sessions.get("default")
    us.trace = Trace(meta={"memory": {"bytes": 3 * 2 ** 20, "bytes_fp16": 12 * 2 ** 20}})
    a.model_line = "Model: <b>test</b>"
    header = a.header(None)
    assert "Model: <b>test</b>" in header
    assert "GPU Tesla T4: 3.25 GiB in use, peak 5.50 GiB of 24.0 GiB; this session's KV cache 0.003 GiB" in header
    fake_cuda.allocated, fake_cuda.peak = 7 * GIB, 9 * GIB  # the numbers of now, at every call
    assert "7.00 GiB in use, peak 9.00 GiB" in a.header(None)
    # without CUDA: the CPU list, no GPU line
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    b = A.AgaccApp(preload=False, offer_hub=True, max_context=4096)
    assert b.model_choices[1:] == HUB_CHOICES
    assert b.header(None) is not None and "GPU" not in str(b.header(None))
    assert "GPU" not in b.page_load(None)[0]
