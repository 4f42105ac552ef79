"""Server-side state of the app: the loaded models (shared read-only by every session) and what each
browser session owns (its generation, cancel event, recorded trace, replay cache, export folder),
keyed by gradio's session hash. gr.State stays out of it because it must be deep-copyable.

No gradio here: the handlers in app.py turn the ``ValueError``s into messages on the page."""
from __future__ import annotations

import os
import shutil
import threading
import time
from collections import OrderedDict
from pathlib import Path

import agacc
from agacc.session import GenerationSession
from agacc.trace import Trace

EMBEDDED_CHOICE = "embedded: SmolLM2-135M-Instruct"
EMBEDDED_LABEL = "SmolLM2-135M-Instruct (embedded)"
HUB_CHOICES = ["HuggingFaceTB/SmolLM2-360M-Instruct", "HuggingFaceTB/SmolLM2-1.7B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct",
               "meta-llama/Llama-3.2-1B-Instruct"]
# the embedded model multiplies by its GGUF file's 4-bit blocks on the CPU (agacc.load_model's packed_weights)
PACKED_WEIGHTS = os.environ.get("AGACC_PACKED_WEIGHTS", "1") != "0"


def freeze_gc() -> None:
    """Move every object alive now (the imported libraries, a loaded model: about 600,000 objects) out of
    the cyclic garbage collector's reach (``gc.freeze``). A full collection then takes about 1 ms instead
    of 0.3-0.7 s; the library runs one when a session frees its caches (Stop, the end of a run), and a
    collection holds the interpreter lock: the whole server, the page's "Stopped" included, waited for it.
    Reference counting still frees these objects; only garbage cycles among them would stay."""
    import gc

    gc.freeze()


def hub_reachable(timeout: float = 1.0) -> bool:
    """True when the hub answers (``agacc.models.hub_reachable``: one HTTP request, ``timeout`` s); hub
    ids are then offered in the model list. ``AGACC_OFFLINE`` set: False without asking."""
    if os.environ.get("AGACC_OFFLINE"):
        return False
    from agacc.models import hub_reachable as probe

    return probe(timeout)


def hub_cached(name: str) -> bool:
    """True when the local hub cache holds ``name``'s config (it loads without the network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:
        return False


def model_arg(choice: str | None) -> str | None:
    """Dropdown value -> load_model name (None = embedded)."""
    c = (choice or "").strip()
    if not c or c == EMBEDDED_CHOICE or c.lower() in ("embedded", "default", agacc.models.EMBEDDED_NAME.lower()):
        return None
    return c


class Models:
    """Loaded models, shared read-only by all sessions (at most ``keep`` at once, LRU)."""

    def __init__(self, device: str | None = None, keep: int = 2, packed_weights: bool = PACKED_WEIGHTS):
        self.device = device
        self.keep = keep
        self.packed_weights = packed_weights
        self._models: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._hub = None

    def get(self, choice: str | None, trust_remote_code: bool = False):
        """-> (load_model name or None, model, tokenizer); ValueError with a readable message."""
        name = model_arg(choice)
        key = (name, bool(trust_remote_code) if name else False)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            if name is not None and not Path(name).exists() and not self.hub_ok() and not hub_cached(name):
                raise ValueError(f"cannot load model {name!r}: it is not a local path, not in the local hub cache, "
                                 "and the Hugging Face hub is not reachable from this server")
            try:
                model, tok = agacc.load_model(name, device=self.device, trust_remote_code=bool(trust_remote_code),
                                              packed_weights=self.packed_weights)
            except ValueError:
                raise
            except RuntimeError as e:
                if "out of memory" in str(e).lower():
                    raise ValueError(f"not enough memory to load {name!r}") from e
                raise ValueError(f"cannot load model {name or EMBEDDED_CHOICE!r}: {e}") from e
            except Exception as e:  # remote code refused, bad config ...
                raise ValueError(f"cannot load model {name or EMBEDDED_CHOICE!r}: {type(e).__name__}: {e}") from e
            self._models[key] = (name, model, tok)
            freeze_gc()
            while len(self._models) > self.keep:
                self._models.popitem(last=False)
            return self._models[key]

    def loaded(self, choice: str | None, trust_remote_code: bool = False) -> bool:
        """Whether ``choice`` is loaded (without waiting for a load under way)."""
        name = model_arg(choice)
        return (name, bool(trust_remote_code) if name else False) in self._models

    def hub_ok(self) -> bool:
        if self._hub is None or time.time() - self._hub[1] > 300:
            self._hub = (hub_reachable(), time.time())
        return self._hub[0]


class Run:
    """One Generate / Re-run of a session as the page sees it: its library session and whether the
    handler that streams it has ended (``done``) after painting its own final state (``painted``).
    Stop waits for ``done`` so that nothing of the run reaches the page after Stop's final state."""

    def __init__(self, session: GenerationSession | None = None):
        self.session = session
        self.done = threading.Event()
        self.painted = False


class UserState:
    """Everything one browser session owns (server side)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.cancel = threading.Event()
        self.run: Run | None = None
        self.session: GenerationSession | None = None
        self.trace: Trace | None = None
        self.model_choice: str | None = None
        self.replay_cache: OrderedDict = OrderedDict()
        self.tmpdir: str | None = None
        self.touched = time.time()
        # the quality-vs-memory curve of ``trace`` (trace, sweep) and the measured points of ``trace``
        self.curve: tuple | None = None
        self.measured: tuple | None = None  # (trace, [measure_quality results])

    def measured_points(self) -> list:
        """Measure quality's results for the current trace (a new run or import starts a new list)."""
        m = self.measured  # read once: cleanup clears it from another thread
        if m is None or m[0] is not self.trace:
            m = self.measured = (self.trace, [])
        return m[1]

    def running(self) -> bool:
        """A generation of this session is going on (its trace is still being recorded)."""
        s = self.session
        return s is not None and not s.finished.is_set()

    def stop_running(self, timeout: float = 10.0) -> bool:
        s = self.session
        self.cancel.set()
        if s is not None:
            return s.finished.wait(timeout)
        return True

    def cleanup(self):
        self.stop_running(timeout=2.0)
        self.session = None
        self.trace = None
        self.curve = self.measured = None
        self.replay_cache.clear()
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None


class Sessions:
    """session_hash -> UserState (bounded: the least recently used idle state goes first)."""

    def __init__(self, limit: int = 256):
        self.limit = limit
        self._d: OrderedDict[str, UserState] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str | None) -> UserState:
        key = key or "default"
        with self._lock:
            us = self._d.get(key)
            if us is None:
                us = self._d[key] = UserState()
            self._d.move_to_end(key)
            us.touched = time.time()
            while len(self._d) > self.limit:
                old_key, old = next(iter(self._d.items()))
                if old.running():
                    break
                self._d.pop(old_key)
                old.cleanup()
            return us

    def drop(self, key: str | None) -> None:
        with self._lock:
            us = self._d.pop(key or "default", None)
        if us is not None:
            us.cleanup()

    def __len__(self):
        return len(self._d)

    def __contains__(self, key):
        return key in self._d
