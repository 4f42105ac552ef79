"""The CPU kernels, one C++ extension: the fused decode kernel (``kernels/cpu_decode.cpp``) and the
linear layers on GGUF block-quantised weights (``kernels/cpu_linear.cpp``, used by
``kernels/packed_linear.py``).

The decode kernel: one call per layer and step does the
scores over every stored part (packed quantised segments unpacked and dequantised in one pass over
their bytes, scales read as stored), the softmax, the weighted values and the attention mass, where
the PyTorch path (``agacc.decode.decode_attention`` on the "torch" backend, its reference) runs a few
dozen tensor ops per layer and step. ``kernels.backend("cpu")`` is "cpp" once ``load()`` has the
extension.

Built once per machine (and instruction set) with the C++ compiler through ``torch.utils.cpp_extension`` (about a minute;
cached under ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). ``AGACC_CPU_KERNEL=0``
turns it off; without a compiler the build fails once, with a warning, and the PyTorch path runs.

  decode_layer(qg [Bt,H,g,D] fp32, parts: list[Part]) -> (out [Bt,H,g,D] fp32, mass [n_entries] fp32)
"""
from __future__ import annotations

import os
import re
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from kernels.format import QUANT, SPARSE, Part, sparse_decode

ENV = "AGACC_CPU_KERNEL"
_SOURCES = [Path(__file__).with_name(f) for f in ("cpu_decode.cpp", "cpu_linear.cpp", "cpu_bindings.cpp")]
_lock = threading.Lock()
_state: dict = {}  # "module" once built, "error" once failed
_NO_BIAS = torch.empty(0)
# compiler flags per instruction set torch detected (not -march=native: a cached build must not
# outlive a move to an older CPU)
_ISA_FLAGS = {"AVX2": ["-mavx2", "-mfma", "-mf16c"], "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]}


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def load():
    """The built extension module, or None (disabled, or the build failed: warned once)."""
    if not enabled():
        return None
    if "module" in _state or "error" in _state:
        return _state.get("module")
    with _lock:
        if "module" not in _state and "error" not in _state:
            t0 = time.perf_counter()
            try:
                from torch.utils.cpp_extension import load as build

                cap = torch.backends.cpu.get_cpu_capability()  # the build is per instruction set
                _state["module"] = build(name="agacc_cpu_" + re.sub(r"\W", "_", cap.lower()),
                                         sources=[str(p) for p in _SOURCES],
                                         extra_cflags=["-O3", "-ffast-math", *_ISA_FLAGS.get(cap, [])], verbose=False)
                if time.perf_counter() - t0 > 5:
                    print(f"AGACC: built the CPU kernels in {time.perf_counter() - t0:.0f} s "
                          "(cached for later runs)", file=sys.stderr)
            except Exception as e:  # no compiler, no ninja, no headers: the PyTorch path runs
                _state["error"] = e
                warnings.warn(f"AGACC: the CPU kernels did not build ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}); using the PyTorch paths. "
                              f"Set {ENV}=0 to skip the build.", RuntimeWarning)
    return _state.get("module")


def load_in_background() -> threading.Thread:
    """Start building (or loading) the kernel in a daemon thread, so a server does not make its first
    request wait for the compiler; a decode that comes first waits for the same build."""
    t = threading.Thread(target=load, name="agacc-cpu-kernel", daemon=True)
    t.start()
    return t


def decode_layer(qg: torch.Tensor, parts: list[Part]):
    """One decode step over a layer's ``parts`` (``kernels.format.Part``, attention order), in one call.

    qg [Bt, H, g, D] fp32, the query already scaled -> (out [Bt, H, g, D] fp32, mass [n_entries] fp32),
    entries in ``parts`` order, normalised as ``agacc.decode.decode_attention``. Quantised parts are
    read packed, their scales as stored; sparse parts are decoded here (``format.sparse_decode``; the
    kernel reads them as dense parts); rotated parts meet the rotated query inside the kernel, which
    rotates their share of the output back once. Needs the built extension (``load()``)."""
    bt, h, g, d = qg.shape
    tensors, meta = [], []
    for p in parts:
        if p.kind == QUANT:
            tensors += [p.k, p.k_scale, p.k_zero, p.v, p.v_scale, p.v_zero]
            meta += [1, p.container, p.key_block, int(p.rotated)]
            continue
        if p.kind == SPARSE:
            k = sparse_decode(p.k_map, p.k, p.k_scale, p.k_zero, p.code_bits)
            v = sparse_decode(p.v_map, p.v, p.v_scale, p.v_zero, p.code_bits)
        else:
            k, v = p.k, p.v
        tensors += [k, v, p.bias if p.bias is not None else _NO_BIAS]
        meta += [0, 0, 0, 0]
    out, mass = _state["module"].decode_layer(qg.reshape(bt * h, g, d).contiguous(), tensors, meta)
    return out.view(bt, h, g, d), mass
