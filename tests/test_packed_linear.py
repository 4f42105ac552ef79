"""Linear layers on GGUF blocks (kernels/cpu_linear.cpp, kernels/packed_linear.py) against gguf-py's own
dequantiser, a hand-worked block, F.linear on the dequantised weight, and the embedded model in fp32.

The kernel is built on first use (scripts/setup.sh installs its toolchain; test_cpu_kernel.py checks it)."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kernels import cpu
from kernels.packed_linear import PackedLinear, dequantize, matmul, split_blocks


@pytest.fixture(scope="module")
def kernel():
    k = cpu.load()
    assert k is not None, f"the CPU kernels did not build: {cpu._state.get('error')}"
    return k


def _raw_blocks(kind: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Random GGUF blocks [n, k/32 * block bytes] uint8 with sane float16 scales (and mins)."""
    rng = np.random.default_rng(seed)
    kb = k // 32
    if kind == "q4_1":
        d = (rng.random((n, kb, 1)) * 0.02 + 1e-3).astype(np.float16).view(np.uint8)
        m = (rng.standard_normal((n, kb, 1)) * 0.05).astype(np.float16).view(np.uint8)
        q = rng.integers(0, 256, (n, kb, 16), dtype=np.uint8)
        return np.concatenate([d, m, q], -1).reshape(n, -1)
    d = (rng.random((n, kb, 1)) * 0.01 + 1e-4).astype(np.float16).view(np.uint8)
    q = rng.integers(-128, 128, (n, kb, 32), dtype=np.int8).view(np.uint8)
    return np.concatenate([d, q], -1).reshape(n, -1)


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_reference_dequantiser_equals_gguf_py(kind):
    raw = _raw_blocks(kind, 24, 96)
    qtype = gguf.GGMLQuantizationType.Q4_1 if kind == "q4_1" else gguf.GGMLQuantizationType.Q8_0
    want = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, qtype))).float()
    got = dequantize(kind, *split_blocks(raw, kind))
    assert got.shape == (24, 96)
    assert torch.equal(got, want)


def test_hand_worked_q4_1_block():
    # one block: codes q[j] = j % 16, d = 0.5, m = -1: byte j holds q[j] (low nibble) and q[j + 16] (high)
    q = np.arange(32) % 16
    codes = torch.from_numpy((q[:16] | (q[16:] << 4)).astype(np.uint8))[None]
    d = torch.tensor([[0.5]], dtype=torch.float16).view(torch.int16)
    m = torch.tensor([[-1.0]], dtype=torch.float16).view(torch.int16)
    w = dequantize("q4_1", codes, d, m)
    assert w.tolist() == [[j % 16 * 0.5 - 1.0 for j in range(32)]]
    x = torch.ones(1, 32)
    assert matmul("q4_1", x, codes, d, m).item() == sum(j % 16 * 0.5 - 1.0 for j in range(32))  # 28.0


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_kernel_dequantiser_is_bit_exact(kernel, kind):
    codes, d, m = split_blocks(_raw_blocks(kind, 100, 576, seed=1), kind)
    want = dequantize(kind, codes, d, m)
    got = kernel.q4_1_dequant(codes, d, m, torch.empty(0)) if kind == "q4_1" else kernel.q8_0_dequant(codes, d, torch.empty(0))
    assert torch.equal(got, want)
    out = torch.full((100 * 576,), float("nan"))  # into a given buffer
    got = kernel.q4_1_dequant(codes, d, m, out) if kind == "q4_1" else kernel.q8_0_dequant(codes, d, out)
    assert torch.equal(got, want) and torch.equal(out.view(100, 576), want)


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@pytest.mark.parametrize("rows,n,k", [(1, 100, 576), (3, 192, 1536), (2, 64, 64), (4, 37, 352)])
def test_kernel_matmul_matches_reference(kernel, kind, rows, n, k):
    codes, d, m = split_blocks(_raw_blocks(kind, n, k, seed=rows + n), kind)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(k))
    exact = (x.double() @ dequantize(kind, codes, d, m).double().t())  # the same products in float64
    got = kernel.q4_1_mm(x, codes, d, m) if kind == "q4_1" else kernel.q8_0_mm(x, codes, d)
    assert got.shape == (rows, n)
    scale = exact.abs().max().item()
    assert (got.double() - exact).abs().max().item() < 1e-5 * scale
    ref = matmul(kind, x, codes, d, m)
    assert (ref.double() - exact).abs().max().item() < 1e-5 * scale


def test_packed_linear_paths(kernel):
    codes, d, m = split_blocks(_raw_blocks("q4_1", 48, 128, seed=3), "q4_1")
    bias = torch.randn(48)
    lin = PackedLinear("q4_1", codes, d, m, bias, kernel)
    w = dequantize("q4_1", codes, d, m)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        few = torch.randn(2, 1, 128, generator=gen)  # decode: the kernel
        y = lin(few)
        assert y.shape == (2, 1, 48)
        assert torch.allclose(y, F.linear(few, w, bias), atol=1e-5, rtol=1e-5)
        many = torch.randn(1, 20, 128, generator=gen)  # prefill: the dequantised weight, F.linear as is
        assert torch.equal(lin(many), F.linear(many, w, bias))
        assert torch.equal(lin(many.double()), F.linear(many.double(), w.double(), bias.double()))
    x = torch.randn(1, 128, requires_grad=True)  # with autograd: the plain path, gradients flow to x
    lin(x).sum().backward()
    assert torch.allclose(x.grad, w.sum(0, keepdim=True), atol=1e-5)
    with pytest.raises(ValueError, match="mins missing"):
        PackedLinear("q4_1", codes, d)


def test_embedded_model_on_its_gguf_blocks(kernel):
    """Every linear layer and the tied output layer run on the file's blocks; the prefill's logits are
    the fp32 model's bit for bit, the decode's within float rounding, and greedy tokens agree."""
    import agacc
    from agacc.models import EMBEDDED_NAME, cache_dir
    from transformers import DynamicCache

    model, tok = agacc.load_model(packed_weights=True)
    assert (cache_dir() / EMBEDDED_NAME / "packed-linears.safetensors").exists()
    assert model.agacc_packed_layers == 30 * 7 + 1
    assert isinstance(model.lm_head, PackedLinear) and model.lm_head.kind == "q8_0"
    assert isinstance(model.model.layers[3].self_attn.k_proj, PackedLinear)
    ref, _ = agacc.load_model()  # the default: dequantised fp32 weights
    assert not hasattr(ref, "agacc_packed_layers") and isinstance(ref.lm_head, torch.nn.Linear)
    ids = tok("The lighthouse keeper wrote in his log that the storm", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, ref(ids).logits)
        caches = DynamicCache(config=model.config), DynamicCache(config=ref.config)
        logits = [m(ids, past_key_values=c).logits[:, -1:] for m, c in zip((model, ref), caches)]
        for _ in range(16):
            assert torch.equal(logits[0].argmax(-1), logits[1].argmax(-1))
            nxt = logits[1].argmax(-1)
            logits = [m(nxt, past_key_values=c).logits for m, c in zip((model, ref), caches)]
            assert (logits[0] - logits[1]).abs().max().item() < 1e-3
