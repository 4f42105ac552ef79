"""The one place that picks a Triton kernel or its PyTorch reference.

Triton runs when the input tensor is on CUDA, or everywhere when the environment variable
``AGACC_FORCE_TRITON=1`` is set (the tests use it with ``TRITON_INTERPRET=1`` on CPU). Otherwise --
CPU, MPS, or a machine without Triton (macOS, Windows) -- the reference in ``agacc`` runs.
Triton is imported lazily, so importing this module never needs it.

Signatures follow the references:
  decode_attention(query [Bt,Hq,1,D], store: LayerStore, scaling) -> (out [Bt,1,Hq,D], mass [n_entries] fp32)
  quantize_keys(k, bits, block_size, method, s)     -> (packed, scale, zero)   as agacc.quant.quantize_keys
  quantize_values(v, bits, group_size, method, s)   -> (packed, scale, zero)   as agacc.quant.quantize_values
  dequantize_keys(packed, scale, zero, bits, block_size, dtype)               as agacc.quant.dequantize_keys
  dequantize_values(packed, scale, zero, bits, dtype)                         as agacc.quant.dequantize_values
"""
from __future__ import annotations

import os
import warnings

import torch

from agacc import quant as _ref_quant

FORCE_ENV = "AGACC_FORCE_TRITON"
_warned = False


def forced() -> bool:
    """True when ``AGACC_FORCE_TRITON=1``: use Triton even off CUDA (the interpreter on CPU)."""
    return os.environ.get(FORCE_ENV, "") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Whether the kernels handle tensor ``t``: on CUDA with Triton importable, or when forced."""
    if forced():
        return True
    if not t.is_cuda:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        global _warned
        if not _warned:
            warnings.warn("Triton is not installed: AGACC uses the PyTorch reference on CUDA", RuntimeWarning)
            _warned = True
        return False
    return True


def decode_attention(query: torch.Tensor, store, scaling: float):
    """Attention of one decode step over everything ``store`` (a ``LayerStore``) holds.

    query [Bt, Hq, 1, D]; returns (out [Bt, 1, Hq, D] in query.dtype, mass [store.n_entries] fp32),
    mass = softmax probability per entry summed over query heads, averaged over batch, / Hq."""
    if query.dim() != 4 or query.shape[2] != 1:
        raise ValueError(f"decode_attention expects query [Bt, Hq, 1, D], got {tuple(query.shape)}")
    if use_triton(query):
        from kernels.decode_attention import decode_attention as kernel

        return kernel(query, store, scaling)
    from agacc.attention import attend

    return attend(query, store.attention_entries(query.dtype), scaling)


def quantize_keys(k: torch.Tensor, bits: int, block_size: int, method: str = "minmax", s: float = 3.0):
    """Keys [Bt, H, n, D] -> (packed [Bt,H,n,D*c//8] uint8, scale/zero [Bt,H,n//B,D] fp16)."""
    if use_triton(k):
        from kernels import quantize

        return quantize.quantize_keys(k, bits, block_size, method, s)
    return _ref_quant.quantize_keys(k, bits, block_size, method, s)


def quantize_values(v: torch.Tensor, bits: int, group_size: int, method: str = "minmax", s: float = 3.0):
    """Values [Bt, H, n, D] -> (packed [Bt,H,n,D*c//8] uint8, scale/zero [Bt,H,n,D//G] fp16)."""
    if use_triton(v):
        from kernels import quantize

        return quantize.quantize_values(v, bits, group_size, method, s)
    return _ref_quant.quantize_values(v, bits, group_size, method, s)


def dequantize_keys(packed, scale, zero, bits: int, block_size: int, dtype=torch.float32):
    """Inverse of ``quantize_keys`` -> [Bt, H, n, D] in ``dtype``."""
    if use_triton(packed):
        from kernels import quantize

        return quantize.dequantize_keys(packed, scale, zero, bits, block_size, dtype)
    return _ref_quant.dequantize_keys(packed, scale, zero, bits, block_size, dtype)


def dequantize_values(packed, scale, zero, bits: int, dtype=torch.float32):
    """Inverse of ``quantize_values`` -> [Bt, H, n, D] in ``dtype``."""
    if use_triton(packed):
        from kernels import quantize

        return quantize.dequantize_values(packed, scale, zero, bits, dtype)
    return _ref_quant.dequantize_values(packed, scale, zero, bits, dtype)
