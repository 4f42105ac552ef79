"""The CPU kernels, one C++ extension: the fused decode kernel (``kernels/cpu_decode.cpp``) and the
linear layers on GGUF block-quantised weights (``kernels/cpu_linear.cpp``, used by
``kernels/packed_linear.py``).

The decode kernel: one call per layer and step does the
scores over every stored part (packed quantised segments unpacked and dequantised in one pass over
their bytes, scales read as stored), the softmax, the weighted values and the attention mass, where
the PyTorch path (``agacc.decode.decode_attention`` on the "torch" backend, its reference) runs a few
dozen tensor ops per layer and step. ``kernels.backend("cpu")`` is "cpp" once ``load()`` has the
extension.

Built once per Python environment (and instruction set) with the C++ compiler through
``torch.utils.cpp_extension`` (one to three minutes), cached under
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) in ``agacc/<name>-<key>``: the key hashes
the interpreter (``sys.prefix``, its version), torch's version and install path, the instruction set,
the flags and the sources, so two environments on one machine keep a build each instead of rebuilding
each other's. A build killed halfway leaves torch's ``lock`` file behind (the next build would wait on
it forever, without a word): ``load()`` finds it, sees from ``agacc-build.pid`` that the process that
held it is gone, says so and removes it. ``status()`` tells, without waiting, whether the build is done
(the app's header). ``AGACC_CPU_KERNEL=0`` turns it off; without a compiler the build fails once, with
a warning, and the PyTorch path runs.

  decode_layer(qg [Bt,H,g,D] fp32, parts: list[Part], softcap: float | None = None)
      -> (out [Bt,H,g,D] fp32, mass [n_entries] fp32)
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import socket
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
# decode_layer's meta, per part (cpu_decode.cpp's decode_layer reads the same): quantised (0/1), container,
# key_block, rotated (0/1), then META_GROUPS pairs (width, count): a basis part's key_groups, unused pairs (0, 0)
META_GROUPS = 4
META_INTS = 4 + 2 * META_GROUPS
# compiler flags per instruction set torch detected (not -march=native: a cached build must not
# outlive a move to an older CPU)
_ISA_FLAGS = {"AVX2": ["-mavx2", "-mfma", "-mf16c"], "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]}


# a lock without a pid file (a build by an older version of this file) counts as stale after this long
STALE_LOCK_S = 15 * 60


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def status() -> str:
    """"disabled" | "ready" | "failed" | "building" | "not built yet", without waiting for a build."""
    if not enabled():
        return "disabled"
    if "module" in _state:
        return "ready"
    if "error" in _state:
        return "failed"
    return "building" if _lock.locked() else "not built yet"


def _flags(cap: str) -> list[str]:
    return ["-O3", "-ffast-math", *_ISA_FLAGS.get(cap, [])]


def build_dir(cap: str | None = None) -> Path:
    """Where this environment's build lives: ``$TORCH_EXTENSIONS_DIR/agacc/<name>-<key>`` (see the module doc)."""
    cap = cap or torch.backends.cpu.get_cpu_capability()
    h = hashlib.sha256()
    for part in (sys.prefix, sys.version, torch.__version__, os.path.dirname(torch.__file__), cap, " ".join(_flags(cap))):
        h.update(part.encode() + b"\0")
    for src in _SOURCES:
        h.update(src.read_bytes())
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    return Path(root) / "agacc" / f"{_name(cap)}-{h.hexdigest()[:12]}"


def _name(cap: str) -> str:
    return "agacc_cpu_" + re.sub(r"\W", "_", cap.lower())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clear_stale_lock(directory: Path) -> str | None:
    """Remove torch's build ``lock`` in ``directory`` when the build that took it is gone (killed
    halfway): its ``agacc-build.pid`` names a process of this host that no longer runs, or there is no
    pid file and the lock is older than ``STALE_LOCK_S``. -> a message saying what was done (None: no lock,
    or a live build holds it, which the caller then waits for)."""
    lock, pidf = directory / "lock", directory / "agacc-build.pid"
    if not lock.exists():
        return None
    owner = None
    try:
        host, pid = pidf.read_text().split()
        owner = (host, int(pid))
    except (OSError, ValueError):
        pass
    if owner is not None:
        if owner[0] != socket.gethostname() or _alive(owner[1]):
            return None
        why = f"the build that took it (pid {owner[1]}) is gone"
    else:
        try:
            age = time.time() - lock.stat().st_mtime
        except OSError:
            return None
        if age < STALE_LOCK_S:
            return None
        why = f"it is {age / 60:.0f} minutes old and names no running build"
    for f in (lock, pidf):
        try:
            f.unlink()
        except FileNotFoundError:
            pass
    return f"AGACC: removed a stale build lock in {directory} ({why}: a build killed halfway); building again"


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
                directory = build_dir(cap)
                directory.mkdir(parents=True, exist_ok=True)
                msg = clear_stale_lock(directory)
                if msg:
                    print(msg, file=sys.stderr)
                fresh = not any(directory.glob("*.so"))
                if fresh:
                    print(f"AGACC: building the CPU kernels in {directory} (once per Python environment, "
                          "one to three minutes)", file=sys.stderr)
                elif (directory / "lock").exists():
                    print(f"AGACC: another process holds the CPU kernels' build lock in {directory} (building or "
                          "checking them); waiting for it", file=sys.stderr)
                pidf = directory / "agacc-build.pid"
                try:  # who holds torch's lock while this build runs (clear_stale_lock reads it)
                    fd = os.open(pidf, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                    os.write(fd, f"{socket.gethostname()} {os.getpid()}".encode())
                    os.close(fd)
                    mine = True
                except OSError:
                    mine = False
                try:
                    _state["module"] = build(name=_name(cap), sources=[str(p) for p in _SOURCES],
                                             extra_cflags=_flags(cap), build_directory=str(directory), verbose=False)
                finally:
                    if mine:
                        pidf.unlink(missing_ok=True)
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


def decode_layer(qg: torch.Tensor, parts: list[Part], softcap: float | None = None):
    """One decode step over a layer's ``parts`` (``kernels.format.Part``, attention order), in one call.

    qg [Bt, H, g, D] fp32, the query already scaled -> (out [Bt, H, g, D] fp32, mass [n_entries] fp32),
    entries in ``parts`` order, normalised as ``agacc.decode.decode_attention``. Quantised parts are
    read packed, their scales as stored; sparse parts are decoded here (``format.sparse_decode``; the
    kernel reads them as dense parts); rotated parts meet the rotated query inside the kernel, which
    rotates their share of the output back once. Keys held in a basis (``Part.basis``) are rebuilt in
    the kernel a block at a time (coefficients dequantised, ``c @ axes``, turned by ``format.frame`` at
    ``Part.pos``) and meet the query as it is; their values, if rotated, as above. Needs the built
    extension (``load()``).

    softcap: logit softcapping (Gemma2's ``attn_logit_softcapping``; ``agacc.attention.cap_logits``),
    None or 0 = off. With c = softcap every logit z = qg . k (k as dequantised) becomes c * tanh(z / c),
    and only then is the part's ``bias`` (the eviction markers' log-count) added: softmax, output and
    mass all use c * tanh(z / c) + bias, as ``agacc.decode._decode_parts`` does. The cap is a pass of
    the kernel's own over the scores, so off, its results are the same bits as with no cap at all."""
    if softcap is not None and not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be a finite number > 0 (or None / 0: off), got {softcap!r}")
    bt, h, g, d = qg.shape
    tensors, meta = [], []
    for p in parts:
        if p.kind == QUANT:
            tensors += [p.k, p.k_scale, p.k_zero, p.v, p.v_scale, p.v_zero]
            meta += [1, p.container, p.key_block, int(p.rotated)]
            groups = []
            if p.basis is not None:  # keys in a basis: axes, inv_freq, pos and the key groups (width, count)
                if len(p.key_groups) > META_GROUPS:
                    raise ValueError(f"a basis part of {len(p.key_groups)} key groups; the kernel reads {META_GROUPS}")
                tensors += [p.basis.float().contiguous(), p.inv_freq.float().contiguous(),
                            p.pos.to(torch.int32).contiguous()]
                groups = [int(x) for wn in p.key_groups for x in wn]
            meta += groups + [0] * (2 * META_GROUPS - len(groups))
            continue
        if p.kind == SPARSE:
            k = sparse_decode(p.k_map, p.k, p.k_scale, p.k_zero, p.code_bits)
            v = sparse_decode(p.v_map, p.v, p.v_scale, p.v_zero, p.code_bits)
        else:
            k, v = p.k, p.v
        tensors += [k, v, p.bias if p.bias is not None else _NO_BIAS]
        meta += [0] * META_INTS
    out, mass = _state["module"].decode_layer(qg.reshape(bt * h, g, d).contiguous(), tensors, meta,
                                              float(softcap or 0.0))
    return out.view(bt, h, g, d), mass
