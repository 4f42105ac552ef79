"""Linear layers that keep a GGUF model's block-quantised weights and multiply by them directly.

The embedded model ships as a GGUF file whose linear layers are Q4_1 blocks (4.5 bits a weight) and
whose tied embedding / output layer is Q8_0 (8.5 bits). transformers dequantises them to fp32 on load,
so a decode step reads 32 bits a weight from memory where the file holds 4.5; on a small CPU that read
is most of the step. ``PackedLinear`` holds the file's blocks instead and, for the decode's few rows,
multiplies by them in the CPU kernel (``kernels/cpu_linear.cpp``): the same weights, the products
summed in another order (max relative difference ~1e-6). For many rows (a prefill) it dequantises the
weight exactly as gguf-py does and calls ``F.linear``: the numbers of the dequantised model.

Formats (llama.cpp's ``block_q4_1`` / ``block_q8_0``, 32 weights a block, split into tensors):
  q4_1: codes [N, K/2] uint8 (per block 16 bytes, byte j = q[j] | q[j+16] << 4), d, m [N, K/32] int16
        (float16 bits); w[j] = q[j] * d + m
  q8_0: codes [N, K] int8, d [N, K/32] int16 (float16 bits); w[j] = q[j] * d

The functions below are the PyTorch reference of the kernel's entry points.
"""
from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# the kernel's block-by-block products pay off while the weight read dominates: a few rows of x
SMALL_M = 4
# weights up to this many elements are dequantised into a buffer reused per thread (a fresh buffer of a
# few MB costs more in first-touch page faults than the dequantisation itself); larger ones are allocated
SCRATCH_MAX = 4 << 20
_scratch = threading.local()
_NO_OUT = torch.empty(0)  # "allocate the output"


def _scratch_for(numel: int) -> torch.Tensor:
    """An fp32 buffer of ``numel`` elements owned by the calling thread (empty: allocate instead)."""
    if numel > SCRATCH_MAX:
        return _NO_OUT
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _scratch.buf = torch.empty(SCRATCH_MAX)
    return buf[:numel]


def split_blocks(raw: np.ndarray, kind: str):
    """A GGUF tensor's raw bytes [N, K/32 * block bytes] uint8 -> (codes, d, m or None) as torch tensors."""
    n = raw.shape[0]
    if kind == "q4_1":
        b = raw.reshape(n, -1, 20)
        d, m, q = b[..., 0:2], b[..., 2:4], b[..., 4:20]
        return (torch.from_numpy(np.ascontiguousarray(q).reshape(n, -1)),
                torch.from_numpy(np.ascontiguousarray(d).view(np.int16).reshape(n, -1)),
                torch.from_numpy(np.ascontiguousarray(m).view(np.int16).reshape(n, -1)))
    if kind == "q8_0":
        b = raw.reshape(n, -1, 34)
        d, q = b[..., 0:2], b[..., 2:34]
        return (torch.from_numpy(np.ascontiguousarray(q).view(np.int8).reshape(n, -1)),
                torch.from_numpy(np.ascontiguousarray(d).view(np.int16).reshape(n, -1)), None)
    raise ValueError(f"unsupported GGUF block type {kind!r}: expected 'q4_1' or 'q8_0'")


def dequantize(kind: str, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
    """Blocks -> W [N, K] fp32, rounded as gguf-py rounds: q * d, then + m (two fp32 roundings)."""
    n = codes.shape[0]
    scale = d.view(torch.float16).float()[..., None]
    if kind == "q4_1":
        c = codes.view(n, -1, 16)
        q = torch.cat([c & 15, c >> 4], -1).float()  # [N, K/32, 32]: low nibbles are weights 0..15
        return (q * scale + m.view(torch.float16).float()[..., None]).reshape(n, -1)
    if kind == "q8_0":
        return (codes.view(n, -1, 32).float() * scale).reshape(n, -1)
    raise ValueError(f"unsupported kind {kind!r}")


def matmul(kind: str, x: torch.Tensor, codes, d, m=None) -> torch.Tensor:
    """x [M, K] fp32 @ W^T -> [M, N] fp32 (reference of ``q4_1_mm`` / ``q8_0_mm``)."""
    return x @ dequantize(kind, codes, d, m).t()


class PackedLinear(nn.Module):
    """``y = x W^T (+ bias)`` with W held as GGUF blocks (buffers ``codes``, ``d``, ``m``).

    ``kernel``: the built CPU extension (``kernels.cpu.load()``) or None (reference path only).
    Inputs [..., K] of any float dtype; the kernel path takes fp32 on the CPU with at most
    ``SMALL_M`` rows, everything else goes through the exact dequantised weight."""

    def __init__(self, kind: str, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, kernel=None):
        super().__init__()
        if kind not in ("q4_1", "q8_0") or (kind == "q4_1") != (m is not None):
            raise ValueError(f"bad packed weight: kind {kind!r}, mins {'given' if m is not None else 'missing'}")
        self.kind = kind
        self.out_features = codes.shape[0]
        self.in_features = d.shape[1] * 32
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("d", d.contiguous())
        self.register_buffer("m", m.contiguous() if m is not None else None)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self._kernel = kernel

    def weight_fp32(self, scratch: bool = False) -> torch.Tensor:
        """The dequantised weight [N, K] fp32 (the kernel's dequantiser, or the reference). ``scratch``:
        into the calling thread's reused buffer, valid until its next call (the forward's own use)."""
        if self._kernel is not None and self.codes.device.type == "cpu":
            out = _scratch_for(self.out_features * self.in_features) if scratch else _NO_OUT
            if self.kind == "q4_1":
                return self._kernel.q4_1_dequant(self.codes, self.d, self.m, out)
            return self._kernel.q8_0_dequant(self.codes, self.d, out)
        return dequantize(self.kind, self.codes, self.d, self.m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[-1]
        if (self._kernel is not None and x.dtype == torch.float32 and x.is_cpu and x.numel() <= SMALL_M * k
                and not torch.is_grad_enabled()):
            buf = self._buffers  # read directly: nn.Module.__getattr__ costs ~0.5 us a name, ~200 layers a step
            rows = x.reshape(-1, k).contiguous()
            if self.kind == "q4_1":
                y = self._kernel.q4_1_mm(rows, buf["codes"], buf["d"], buf["m"])
            else:
                y = self._kernel.q8_0_mm(rows, buf["codes"], buf["d"])
            if self.bias is not None:
                y = y + self.bias
            return y.view(*x.shape[:-1], self.out_features)
        grad = torch.is_grad_enabled() and x.requires_grad  # autograd keeps the weight: no shared buffer
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight_fp32(scratch=not grad).to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"
