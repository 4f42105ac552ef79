"""Ahead-of-time compilation of every Triton kernel for CUDA targets, without a GPU.

    python -m kernels.aot --targets sm_80,sm_90 [--jobs N] [--json PATH] [--docs docs/kernels.md]

The interpreter (``TRITON_INTERPRET=1``, what the tests use) accepts shapes and constructs the GPU
compiler rejects, so passing the interpreter is not compiling. This command runs Triton's real
pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> ``ptxas`` -> cubin) on this machine for each variant the
dispatch can launch, via ``triton.compile(ASTSource(fn, signature, constexprs, attrs),
target=GPUTarget("cuda", cc, 32), options)``.

Which variants: every ``kernels/triton_*.py`` module, plus ``kernels/quantize.py``, exposes
``aot_specs()`` -> a list of ``(name, fn, signature, constexprs)`` or ``(name, fn, signature,
constexprs, options)``:

    name        str, unique: the specialisation, e.g. ``decode.partial[D=128,g=4,...]``
    fn          the ``@triton.jit`` kernel
    signature   {arg: Triton type} for the runtime arguments ("*fp16", "*u8", "i32", "fp32", ...);
                constexpr arguments may be left out (they are filled in as "constexpr")
    constexprs  {arg: value} for every ``tl.constexpr`` argument
    options     optional {"num_warps": 4, "num_stages": 3, "enable_fp_fusion": bool} as launched, or a
                callable of the compute capability (75, 80, 90) returning them: options per target

Pointer arguments are compiled 16-byte aligned (``tt.divisibility = 16``), as the runtime
specialises a freshly allocated tensor. A module whose ``aot_specs`` is missing is reported as a
failure (a new kernel must say what it launches).

Per variant and target: registers per thread, spill bytes (stores + loads) and stack frame from
``ptxas -v`` (Triton runs it with ``-v``; ``knobs.nvidia.dump_ptxas_log`` hands us the log), static
shared memory from the kernel's metadata. A variant fails when Triton or ptxas rejects it, or when
its shared memory exceeds the target's per-block limit (the runtime would refuse to launch it).
Spills are reported, not failures (``--fail-on-spill`` makes them failures).

Results are cached under ``~/.cache/agacc/aot`` (``--cache-dir``; ``--no-cache``), one JSON file per
(kernel source hash incl. the jit functions it calls, signature, constexprs, options, target,
Triton version): a rerun with no kernel change compiles nothing. Compilation runs in ``--jobs``
processes (default: the CPU count). Exit status 1 if any variant failed; each failure is named.

sm_75 (T4): Triton 3.9 compiles for it (``ptxas`` of CUDA 12.9 still targets Turing), see
``docs/kernels.md``; pass ``--targets sm_75,sm_80,sm_90`` to include it.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import io
import json
import os
import re
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

KERNELS_DIR = Path(__file__).resolve().parent
DEFAULT_TARGETS = "sm_80,sm_90"
CACHE_DIR = Path(os.environ.get("AGACC_AOT_CACHE", Path.home() / ".cache" / "agacc" / "aot"))
CACHE_VERSION = 1  # bump when a Row's fields or their meaning change
DOCS_BEGIN, DOCS_END = "<!-- aot-table:begin -->", "<!-- aot-table:end -->"

# Largest shared memory one block may use (bytes, the opt-in maximum) per compute capability.
SHARED_LIMIT = {70: 98304, 75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448,
                100: 232448, 120: 101376}


@dataclass
class Row:
    """One compiled variant on one target. Sizes in bytes; ``regs`` per thread; ``time_s`` / ``cpu_s``
    wall / CPU seconds of the compile that produced it (kept when the row comes from the cache)."""

    module: str
    kernel: str
    variant: str
    target: str
    ok: bool = False
    regs: int | None = None
    shared: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    num_warps: int | None = None
    time_s: float = 0.0  # wall seconds of the compile
    cpu_s: float = 0.0   # CPU seconds of the compile (this process + ptxas), what a sweep costs on idle cores
    cached: bool = False
    error: str = ""
    key: str = ""  # cache_key(): what the result depends on


    @property
    def spills(self) -> int:
        return (self.spill_stores or 0) + (self.spill_loads or 0)


@dataclass
class Spec:
    """An entry of a module's ``aot_specs()``, normalised."""

    module: str
    name: str
    fn: object
    signature: dict
    constexprs: dict
    options: dict | Callable[[int], dict] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# targets, discovery, validation
# --------------------------------------------------------------------------------------------

def parse_targets(text: str) -> list[int]:
    """"sm_80,sm_90" -> [80, 90] (also "80", "sm90", "sm_90a")."""
    out = []
    for tok in filter(None, (t.strip() for t in text.split(","))):
        m = re.fullmatch(r"(?:sm_?)?(\d{2,3})a?", tok)
        if not m:
            raise ValueError(f"bad target {tok!r}: expected sm_XX, e.g. sm_80")
        out.append(int(m.group(1)))
    if not out:
        raise ValueError("no targets")
    return out


def kernel_modules() -> list[str]:
    """``kernels.quantize`` and every ``kernels/triton_*.py``, as module names."""
    names = ["kernels.quantize"] + [f"kernels.{p.stem}" for p in sorted(KERNELS_DIR.glob("triton_*.py"))]
    return names


def _short(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def load_specs(modules: list[str]) -> tuple[list[Spec], list[Row]]:
    """Import each module and normalise its ``aot_specs()``. -> (specs, failure rows for modules that
    cannot be imported, lack ``aot_specs`` or return malformed entries)."""
    import triton

    specs, bad, seen = [], [], set()
    for mod_name in modules:
        def fail(variant, msg):
            bad.append(Row(mod_name, "-", variant, "-", error=msg))

        try:
            mod = importlib.import_module(mod_name)
        except Exception as e:  # noqa: BLE001 -- reported as a failure row
            fail("(import)", f"{type(e).__name__}: {e}")
            continue
        if not hasattr(mod, "aot_specs"):
            fail("(aot_specs)", f"{mod_name} has Triton kernels but no aot_specs(): say what the dispatch launches")
            continue
        try:
            entries = list(mod.aot_specs())
        except Exception as e:  # noqa: BLE001
            fail("(aot_specs)", f"aot_specs() raised {type(e).__name__}: {e}")
            continue
        for i, entry in enumerate(entries):
            try:
                spec = _normalise(mod_name, entry, triton)
            except (TypeError, ValueError) as e:
                name = entry[0] if isinstance(entry, (tuple, list)) and entry and isinstance(entry[0], str) else f"#{i}"
                fail(name, f"malformed spec: {e}")
                continue
            if spec.name in seen:
                fail(spec.name, "duplicate spec name")
                continue
            seen.add(spec.name)
            specs.append(spec)
    return specs, bad


def _normalise(mod_name: str, entry, triton) -> Spec:
    if not isinstance(entry, (tuple, list)) or len(entry) not in (4, 5):
        raise TypeError("expected (name, fn, signature, constexprs[, options])")
    name, fn, sig, consts = entry[:4]
    opts = entry[4] if len(entry) == 5 else None
    opts = opts if callable(opts) else dict(opts or {})
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise TypeError(f"{name}: fn is {type(fn).__name__}, not a JITFunction (is TRITON_INTERPRET=1 set? "
                        "kernels.aot must import the kernels with it unset)")
    params = {p.name: p for p in fn.params}
    consts = dict(consts)
    sig = {k: v for k, v in dict(sig).items() if v != "constexpr"}
    unknown = sorted((set(sig) | set(consts)) - set(params))
    if unknown:
        raise ValueError(f"{name}: {fn.__name__} has no argument(s) {unknown}")
    for p in fn.params:
        if p.is_constexpr and p.name not in consts:
            raise ValueError(f"{name}: constexpr {p.name} has no value")
        if not p.is_constexpr and p.name not in sig and p.name not in consts:
            raise ValueError(f"{name}: argument {p.name} has no type")
    full_sig = {p.name: ("constexpr" if p.name in consts else sig[p.name]) for p in fn.params}
    return Spec(mod_name, str(name), fn, full_sig, consts, opts)


# --------------------------------------------------------------------------------------------
# compiling one variant
# --------------------------------------------------------------------------------------------

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _options(spec: Spec, cc: int) -> dict:
    """The compile options of ``spec`` for sm_``cc``: its options, or what its callable gives for ``cc``
    (a kernel whose launch options depend on the target, e.g. fewer stages where shared memory is small)."""
    opts = spec.options(cc) if callable(spec.options) else spec.options
    return {"num_warps": 4, "num_stages": 3, "enable_fp_fusion": True, **opts}


def cache_key(spec: Spec, cc: int) -> str:
    """sha256 of everything the compiled result depends on (the kernel's source and the sources of
    the jit functions it calls, through ``JITFunction.cache_key``)."""
    import triton

    payload = json.dumps({
        "v": CACHE_VERSION, "triton": triton.__version__, "cc": cc, "fn": spec.fn.cache_key,
        "name": spec.fn.__name__, "sig": spec.signature, "constexprs": {k: repr(v) for k, v in spec.constexprs.items()},
        "options": _options(spec, cc),
    }, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _error_text(e: BaseException) -> str:
    """One line saying why: the compiler's own message (the last line of a CompilationError, the
    first ``error`` line of ptxas)."""
    msg = str(e.__cause__) if e.__cause__ is not None and str(e.__cause__) else str(e)
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    err_lines = [ln for ln in lines if "error" in ln.lower() and "ptxas" in ln.lower()]
    line = err_lines[0] if err_lines else (lines[-1] if lines else "")
    return f"{type(e).__name__}: {line}"[:500]


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def compile_spec(spec: Spec, cc: int, fail_on_spill: bool = False) -> Row:
    """Compile ``spec`` for sm_``cc``; never raises: a failure is a Row with ``ok=False``."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    opts = _options(spec, cc)
    row = Row(spec.module, spec.fn.__name__, spec.name, f"sm_{cc}", num_warps=opts["num_warps"], key=cache_key(spec, cc))
    knobs.nvidia.dump_ptxas_log = True      # ptxas -v output, printed to stdout: captured below
    knobs.compilation.always_compile = True  # a Triton cache hit would skip ptxas and its log
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(spec.fn.params)
             if spec.signature[p.name].startswith("*")}
    log = io.StringIO()
    t0, c0 = time.perf_counter(), _cpu()
    try:
        with contextlib.redirect_stdout(log):
            src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
            kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=opts)
    except Exception as e:  # noqa: BLE001 -- every compiler error becomes a named failure
        row.error = _error_text(e)
        row.time_s, row.cpu_s = time.perf_counter() - t0, _cpu() - c0
        return row
    row.time_s, row.cpu_s = time.perf_counter() - t0, _cpu() - c0
    text = log.getvalue()
    regs = _PTXAS_REGS.findall(text)
    spill = _PTXAS_SPILL.findall(text)
    row.regs = int(regs[-1]) if regs else None
    if spill:
        row.stack, row.spill_stores, row.spill_loads = map(int, spill[-1])
    row.shared = int(kernel.metadata.shared)
    limit = SHARED_LIMIT.get(cc)
    if limit is not None and row.shared > limit:
        row.error = f"shared memory {row.shared} B > the sm_{cc} limit {limit} B"
    elif row.regs is None:
        row.error = "no ptxas register report in the compile log"
    elif fail_on_spill and row.spills:
        row.error = f"spills {row.spill_stores} B stores / {row.spill_loads} B loads"
    row.ok = not row.error
    return row


def _cached(spec: Spec, cc: int, cache_dir: Path | None, seed: dict | None = None) -> Row | None:
    key = cache_key(spec, cc)
    data = (seed or {}).get(key)
    if data is None and cache_dir is not None:
        try:
            data = json.loads((cache_dir / f"{key}.json").read_text())
        except (OSError, ValueError):
            data = None
    if data is None or not data.get("ok"):
        return None
    fields = {f for f in Row.__dataclass_fields__}
    return Row(**{**{k: v for k, v in data.items() if k in fields}, "module": spec.module, "variant": spec.name,
                  "cached": True, "key": key})


def load_seed(path: str | Path) -> dict:
    """{key: row} of the successful rows of a previous ``--json`` output (a committed results file)."""
    rows = json.loads(Path(path).read_text()).get("rows", [])
    return {r["key"]: r for r in rows if r.get("key") and r.get("ok")}


def _store(spec: Spec, cc: int, row: Row, cache_dir: Path | None) -> None:
    if cache_dir is None or not row.ok:
        return  # failures are always recompiled (their messages stay current)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{cache_key(spec, cc)}.json"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(row)))
    tmp.replace(path)


# worker processes are forked after the specs are loaded: a task is an index into this list
_SPECS: list[Spec] = []


def _work(i: int, cc: int, fail_on_spill: bool) -> Row:
    try:
        return compile_spec(_SPECS[i], cc, fail_on_spill)
    except BaseException as e:  # noqa: BLE001 -- a worker must always answer
        s = _SPECS[i]
        return Row(s.module, s.fn.__name__, s.name, f"sm_{cc}", error=f"{type(e).__name__}: {e} "
                   f"{traceback.format_exc(limit=2)}"[:500])


def compile_all(specs: list[Spec], targets: list[int], jobs: int = 1, cache_dir: Path | None = CACHE_DIR,
                fail_on_spill: bool = False, progress=None, seed: dict | None = None,
                cached_only: bool = False) -> list[Row]:
    """Every spec for every target -> rows in (spec, target) order. Rows found in ``seed`` ({key: row},
    ``load_seed``) or the cache are not recompiled; the rest run in ``jobs`` forked processes (1: in
    this process)."""
    global _SPECS
    tasks = [(i, cc) for i, _ in enumerate(specs) for cc in targets]
    rows: dict[tuple[int, int], Row] = {}
    todo = []
    for i, cc in tasks:
        hit = _cached(specs[i], cc, cache_dir, seed) if not fail_on_spill else None
        if hit is not None:
            rows[i, cc] = hit
        else:
            todo.append((i, cc))
    done = len(rows)

    def finish(i, cc, row):
        nonlocal done
        rows[i, cc] = row
        _store(specs[i], cc, row, cache_dir)
        done += 1
        if progress:
            progress(done, len(tasks), row)

    if cached_only:  # report what is known, compile nothing
        return [rows[t] for t in tasks if t in rows]
    # the costliest kernels first, so the pool's tail is short
    todo.sort(key=lambda t: -len(specs[t[0]].signature))
    _SPECS = specs
    if jobs <= 1 or len(todo) <= 1:
        for i, cc in todo:
            finish(i, cc, _work(i, cc, fail_on_spill))
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("fork")) as pool:
            futs = {pool.submit(_work, i, cc, fail_on_spill): (i, cc) for i, cc in todo}
            for fut in as_completed(futs):
                i, cc = futs[fut]
                try:
                    row = fut.result()
                except Exception as e:  # noqa: BLE001 -- e.g. a worker killed by the OS
                    s = specs[i]
                    row = Row(s.module, s.fn.__name__, s.name, f"sm_{cc}", error=f"{type(e).__name__}: {e}")
                finish(i, cc, row)
    return [rows[t] for t in tasks]


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------

COLUMNS = ("kernel", "specialisation", "target", "regs", "shared B", "spills B", "status")


def _cells(r: Row) -> list[str]:
    def num(x):
        return "-" if x is None else str(x)

    spills = "-" if r.spill_stores is None else (f"{r.spill_stores}/{r.spill_loads}" if r.spills else "0")
    status = "ok" if r.ok else "FAIL"
    return [f"{_short(r.module)}.{r.kernel}", r.variant, r.target, num(r.regs), num(r.shared), spills, status]


def format_text(rows: list[Row]) -> str:
    body = [_cells(r) for r in rows]
    w = [max([len(h)] + [len(c[i]) for c in body]) for i, h in enumerate(COLUMNS)]
    line = lambda cells: "  ".join(c.ljust(w[i]) if i < 3 else c.rjust(w[i]) for i, c in enumerate(cells))  # noqa: E731
    return "\n".join([line(COLUMNS), line(["-" * x for x in w])] + [line(c) for c in body])


def summarise(rows: list[Row]) -> list[dict]:
    """Per (kernel, target): variants, failures, max registers, max shared, variants that spill."""
    out: dict[tuple, dict] = {}
    for r in rows:
        s = out.setdefault((f"{_short(r.module)}.{r.kernel}", r.target), {
            "kernel": f"{_short(r.module)}.{r.kernel}", "target": r.target, "variants": 0, "failed": 0,
            "max_regs": 0, "max_shared": 0, "spilling": 0})
        s["variants"] += 1
        s["failed"] += not r.ok
        s["max_regs"] = max(s["max_regs"], r.regs or 0)
        s["max_shared"] = max(s["max_shared"], r.shared or 0)
        s["spilling"] += bool(r.spills)
    return list(out.values())


def format_markdown(rows: list[Row], targets: list[int], missing: int = 0) -> str:
    """The docs section body: a summary per kernel and target (with the CPU-seconds its compiles
    cost), then every row (folded)."""
    import triton

    lines = [f"Triton {triton.__version__}, targets {', '.join(f'sm_{t}' for t in targets)}: "
             f"{len(rows)} compiled variants, {sum(not r.ok for r in rows)} failed, "
             f"{sum(bool(r.spills) for r in rows)} spill; the compiles cost {sum(r.cpu_s for r in rows):.0f} CPU-seconds."
             + (f" **Partial: {missing} variants not compiled yet.**" if missing else ""), "",
             "| kernel | target | variants | failed | max regs | max shared B | spilling | CPU-s |",
             "|---|---|---|---|---|---|---|---|"]
    cpu: dict = {}
    for r in rows:
        key = (f"{_short(r.module)}.{r.kernel}", r.target)
        cpu[key] = cpu.get(key, 0.0) + r.cpu_s
    for s in summarise(rows):
        lines.append(f"| `{s['kernel']}` | {s['target']} | {s['variants']} | {s['failed']} | {s['max_regs']} | "
                     f"{s['max_shared']} | {s['spilling']} | {cpu[s['kernel'], s['target']]:.0f} |")
    lines += ["", "<details><summary>every variant</summary>", "",
              "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        c = _cells(r)
        c[0], c[1] = f"`{c[0]}`", f"`{c[1]}`"
        lines.append("| " + " | ".join(c) + " |")
    lines += ["", "</details>"]
    return "\n".join(lines)


def write_docs(path: Path, body: str) -> None:
    """Replace the text between the aot-table markers of ``path`` with ``body``."""
    text = path.read_text()
    if DOCS_BEGIN not in text or DOCS_END not in text:
        raise SystemExit(f"error: {path} has no {DOCS_BEGIN} ... {DOCS_END} section")
    head, rest = text.split(DOCS_BEGIN, 1)
    _, tail = rest.split(DOCS_END, 1)
    path.write_text(f"{head}{DOCS_BEGIN}\n{body}\n{DOCS_END}{tail}")


# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels.aot", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Exit status: 0 all variants compiled, 1 some failed (named), 2 usage.")
    ap.add_argument("--targets", default=DEFAULT_TARGETS, help=f"comma-separated sm_XX (default {DEFAULT_TARGETS})")
    ap.add_argument("--module", action="append", metavar="NAME",
                    help="compile this module's aot_specs() instead of discovering kernels/ (repeatable)")
    ap.add_argument("--filter", metavar="REGEX", help="only specialisations whose name matches")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes (default: CPUs)")
    ap.add_argument("--cache-dir", default=str(CACHE_DIR), help="result cache (default %(default)s)")
    ap.add_argument("--no-cache", action="store_true", help="compile everything; read and write no cache")
    ap.add_argument("--seed", metavar="JSON", help="reuse the rows of a previous --json output whose key (kernel "
                    "source, spec, target, Triton version) still matches; the rest compile")
    ap.add_argument("--fail-on-spill", action="store_true", help="a variant that spills fails")
    ap.add_argument("--list", action="store_true", help="list the specialisations, compile nothing")
    ap.add_argument("--cached-only", action="store_true",
                    help="report only the variants already in the cache / --seed; compile nothing")
    ap.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    ap.add_argument("--docs", metavar="PATH", help="replace the aot-table section of this markdown file")
    ap.add_argument("--quiet", action="store_true", help="no progress lines (stderr)")
    args = ap.parse_args(argv)
    try:
        targets = parse_targets(args.targets)
    except ValueError as e:
        ap.error(str(e))
    # the kernels must be real JITFunctions: the interpreter's stand-ins cannot be compiled
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

    specs, bad = load_specs(args.module or kernel_modules())
    if args.filter:
        rx = re.compile(args.filter)
        specs = [s for s in specs if rx.search(s.name)]
    if args.list:
        for s in specs:
            print(f"{_short(s.module)}.{s.fn.__name__}  {s.name}")
        for r in bad:
            print(f"FAIL {r.module} {r.variant}: {r.error}")
        return 1 if bad else 0

    def progress(done, total, row):
        if not args.quiet:
            state = "ok" if row.ok else "FAIL"
            how = "cached" if row.cached else f"{row.time_s:.1f}s"
            print(f"[{done}/{total}] {row.variant} {row.target}: {state} ({how})", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    cache_dir = None if args.no_cache else Path(args.cache_dir)
    seed = load_seed(args.seed) if args.seed and not args.no_cache else None
    rows = compile_all(specs, targets, max(1, args.jobs), cache_dir, args.fail_on_spill, progress, seed,
                       args.cached_only)
    seconds = time.perf_counter() - t0
    missing = len(specs) * len(targets) - len(rows)
    rows = bad + rows
    print(format_text(rows))
    failed = [r for r in rows if not r.ok]
    n_cached = sum(r.cached for r in rows)
    print(f"\n{len(rows)} variants ({len(specs)} specialisations x {len(targets)} targets), "
          f"{len(failed)} failed, {sum(bool(r.spills) for r in rows)} spill, {n_cached} from the cache; "
          f"{seconds:.1f} s with {args.jobs} jobs; the compiles cost {sum(r.cpu_s for r in rows):.0f} CPU-s"
          + (f"; {missing} variants not compiled yet (--cached-only)" if missing else ""))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"targets": [f"sm_{t}" for t in targets], "seconds": seconds,
                                               "rows": [asdict(r) for r in rows]}, indent=1))
    if args.docs:
        write_docs(Path(args.docs), format_markdown(rows, targets, missing))
    for r in failed:
        print(f"FAILED {_short(r.module)}.{r.kernel} {r.variant} @ {r.target}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
