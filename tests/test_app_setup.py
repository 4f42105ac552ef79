"""The app's setup path (issue 21, item 10): the C++ kernel's build directory is keyed per Python
environment, a lock left by a killed build is found and removed with a message, and the app answers
before the model and the kernel are ready (its header says which kernel runs, without waiting)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import torch

from kernels import cpu


def test_build_dir_is_keyed_per_environment(monkeypatch):
    a = cpu.build_dir("AVX2")
    monkeypatch.setattr(sys, "prefix", sys.prefix + "-other-venv")
    b = cpu.build_dir("AVX2")
    assert a != b and a.parent == b.parent and a.name.startswith("agacc_cpu_avx2-")
    monkeypatch.undo()
    assert cpu.build_dir("AVX2") == a  # stable for one environment


def test_stale_lock_of_a_killed_build_is_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock, pidf = tmp_path / "lock", tmp_path / "agacc-build.pid"
    lock.write_text("")
    pidf.write_text(f"{socket.gethostname()} {dead.pid}")
    msg = cpu.clear_stale_lock(tmp_path)
    assert msg and "stale build lock" in msg and f"pid {dead.pid}" in msg and not lock.exists()
    # a live build's lock stays (the caller waits for it)
    lock.write_text("")
    pidf.write_text(f"{socket.gethostname()} {os.getpid()}")
    assert cpu.clear_stale_lock(tmp_path) is None and lock.exists()
    # a lock without a pid file (an older build) is stale once old
    pidf.unlink()
    assert cpu.clear_stale_lock(tmp_path) is None and lock.exists()
    old = time.time() - 2 * cpu.STALE_LOCK_S
    os.utime(lock, (old, old))
    assert "names no running build" in cpu.clear_stale_lock(tmp_path) and not lock.exists()
    assert cpu.clear_stale_lock(tmp_path) is None  # no lock: nothing to do


def test_header_kernel_label_does_not_wait_for_the_build(monkeypatch):
    from components.text import kernel_label

    monkeypatch.setattr(cpu, "status", lambda: "building")
    t0 = time.perf_counter()
    assert "building" in kernel_label("cpu") and time.perf_counter() - t0 < 1.0
    monkeypatch.setattr(cpu, "status", lambda: "ready")
    assert kernel_label("cpu") == "fused C++ kernel"
    monkeypatch.setattr(cpu, "status", lambda: "disabled")
    assert kernel_label("cpu").startswith("PyTorch reference")


def test_app_answers_before_the_model_is_loaded(monkeypatch):
    """preload="background": the Blocks are built at once; page_load says the model is loading."""
    import threading

    import app as A
    from components.state import Models

    gate = threading.Event()

    class SlowModels(Models):
        def get(self, choice, trust_remote_code=False):
            gate.wait(30)
            return super().get(choice, trust_remote_code)

    t0 = time.perf_counter()
    a = A.AgaccApp(models=SlowModels(), preload="background", offer_hub=False)
    a.build()
    assert time.perf_counter() - t0 < 20
    header, _, timer = a.page_load()
    assert "Loading the model" in header and timer.active  # the header's timer asks again each second
    gate.set()
    # the preload thread goes on loading the model: wait for it, so it never overlaps another test's load
    for t in threading.enumerate():
        if t.name == "agacc-preload":
            t.join(300)
            assert not t.is_alive()
    monkeypatch.setattr(cpu, "status", lambda: "building")
    header, _, timer = a.page_load()  # the model is in; the kernel still builds: the timer goes on
    assert "SmolLM2" in header and "building" in header and timer.active
    monkeypatch.setattr(cpu, "status", lambda: "ready")
    header, _, timer = a.page_load()  # both settled: the header names the kernel and the timer stops
    assert "decode kernels: fused C++ kernel" in header and not timer.active


def test_loads_on_two_threads_at_once_give_two_whole_models():
    """transformers builds a model under process-wide state (the meta-device init context): two
    ``load_model`` calls at once (the app's background preload and a test or a second model) used to
    leave one with meta tensors. Loads are serialised: both models are whole and equal."""
    import threading

    import agacc

    out, errors = [], []

    def load():
        try:
            out.append(agacc.load_model(device="cpu")[0])
        except Exception as e:  # (the failure this test is about)
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and len(out) == 2
    for m in out:
        assert not any(p.is_meta for p in m.parameters())
    a, b = (dict(m.named_parameters()) for m in out)
    assert all(torch.equal(a[k], b[k]) for k in a)
