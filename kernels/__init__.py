"""Kernels for the compressed cache's hot paths: Triton on GPU, C++ on CPU. Below the library: nothing
here imports ``agacc``; the PyTorch references live in ``agacc`` and the tests compare the two.

``backend(device)`` is the one place that chooses which kernels run for a device:

    "triton"  CUDA with Triton importable (or anywhere with AGACC_FORCE_TRITON=1: the interpreter on CPU,
              which the tests use with TRITON_INTERPRET=1)
    "cpp"     CPU with the C++ extension built (``kernels.cpu``; AGACC_CPU_KERNEL=0 turns it off)
    "torch"   everything else: the library's PyTorch reference path (MPS, CUDA without Triton, a CPU
              without a compiler)

One fallback story: when a backend cannot run, the PyTorch reference runs, with one warning that says why
(``warn_once``): the Triton kernels do not read keys held in a basis (``kernels.format.basis_keys``) yet.

Its users: ``agacc.decode.decode_attention`` (a decode step: ``kernels.triton_decode.decode_parts``,
``kernels.cpu.decode_layer`` or the packed PyTorch path, all reading ``LayerStore.parts()``, a list of
``kernels.format.Part``) and ``agacc.store`` (its quantisers: ``kernels.quantize`` where this says
"triton", else ``agacc.quant``). The format both sides share is ``kernels/format.py``.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

FORCE_TRITON_ENV = "AGACC_FORCE_TRITON"
BACKENDS = ("triton", "cpp", "torch")
LABELS = {"triton": "Triton kernels", "cpp": "fused C++ kernel", "torch": "PyTorch reference"}
_warned: set = set()


def warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def backend(device) -> str:
    """"triton" | "cpp" | "torch": the kernels that run for tensors on ``device`` (a torch.device or str)."""
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    if os.environ.get(FORCE_TRITON_ENV, "") == "1" or kind == "cuda":
        if importlib.util.find_spec("triton") is not None:
            return "triton"
        if kind == "cuda":
            warn_once("triton", "AGACC: Triton is not installed; the PyTorch reference runs on CUDA "
                                "(pip install triton)")
    if kind == "cpu":
        from kernels import cpu

        if cpu.load() is not None:
            return "cpp"
    return "torch"
