"""The fused CPU decode kernel (``kernels/cpu_decode.cpp``): per quantised segment, unpack +
dequantise + dot product in one pass over the packed bytes, where the PyTorch path
(``agacc.decode._key_scores`` / ``_value_out``, its reference) runs a dozen whole-segment tensor ops.

Built once per machine (and instruction set) with the C++ compiler through ``torch.utils.cpp_extension`` (about a minute;
cached under ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). ``AGACC_CPU_KERNEL=0``
turns it off; without a compiler the build fails once, with a warning, and the PyTorch path runs.

  key_scores(qg [Bt,H,g,D] fp32, seg: QuantSegment, B) -> scores [Bt,H,g,n] fp32
  value_out(p [Bt,H,g,n] fp32, seg: QuantSegment)      -> sum_t p_t v_t [Bt,H,g,D] fp32
(the segment's rotation is the caller's business, as in the reference).
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

ENV = "AGACC_CPU_KERNEL"
_SOURCE = Path(__file__).with_name("cpu_decode.cpp")
_lock = threading.Lock()
_state: dict = {}  # "module" once built, "error" once failed
# compiler flags per instruction set torch detected (not -march=native: a cached build must not
# outlive a move to an older CPU)
_ISA_FLAGS = {"AVX2": ["-mavx2", "-mfma", "-mf16c"], "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]}


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
                _state["module"] = build(name="agacc_cpu_decode_" + re.sub(r"\W", "_", cap.lower()), sources=[str(_SOURCE)],
                                         extra_cflags=["-O3", "-ffast-math", *_ISA_FLAGS.get(cap, [])], verbose=False)
                if time.perf_counter() - t0 > 5:
                    print(f"AGACC: built the fused CPU decode kernel in {time.perf_counter() - t0:.0f} s "
                          "(cached for later runs)", file=sys.stderr)
            except Exception as e:  # no compiler, no ninja, no headers: the PyTorch path runs
                _state["error"] = e
                warnings.warn(f"AGACC: the fused CPU decode kernel did not build ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}); using the PyTorch path. "
                              f"Set {ENV}=0 to skip the build.", RuntimeWarning)
    return _state.get("module")


def load_in_background() -> threading.Thread:
    """Start building (or loading) the kernel in a daemon thread, so a server does not make its first
    request wait for the compiler; a decode that comes first waits for the same build."""
    t = threading.Thread(target=load, name="agacc-cpu-kernel", daemon=True)
    t.start()
    return t


def key_scores(qg: torch.Tensor, seg, B: int) -> torch.Tensor:
    bt, h, g, d = qg.shape
    n = seg.k.shape[2]
    mod = _state["module"]
    s = mod.key_scores(qg.reshape(bt * h, g, d).contiguous(), seg.k.reshape(bt * h, n, -1).contiguous(),
                       seg.k_scale.float().reshape(bt * h, seg.k_scale.shape[2], -1).contiguous(),
                       seg.k_zero.float().reshape(bt * h, seg.k_zero.shape[2], -1).contiguous(),
                       seg.container, 0 if seg.key_per_token else B)
    return s.view(bt, h, g, n)


def value_out(p: torch.Tensor, seg) -> torch.Tensor:
    bt, h, g, n = p.shape
    mod = _state["module"]
    o = mod.value_out(p.reshape(bt * h, g, n).contiguous(), seg.v.reshape(bt * h, n, -1).contiguous(),
                      seg.v_scale.float().reshape(bt * h, n, -1).contiguous(),
                      seg.v_zero.float().reshape(bt * h, n, -1).contiguous(), seg.container)
    return o.view(bt, h, g, -1)
