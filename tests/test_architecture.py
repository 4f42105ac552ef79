"""The project's layering, read from its source, and the decode backends agreeing on one description
of what a layer holds.

(a) The import graph of the project's own modules (agacc/**, kernels/**, components/**, app.py), built
    with ``ast`` from every ``import`` / ``from ... import`` anywhere in a file -- module level, inside
    functions (lazy), relative -- and ``importlib.import_module("constant")``:
      * no cycles;
      * ``kernels`` sits below the library: nothing under kernels/ imports ``agacc``;
      * the library does not know the app: nothing under agacc/ imports gradio, ``app`` or ``components``.
    ``from agacc import quant`` is an edge to agacc.quant (a module), ``from agacc.x import y`` to
    agacc.x, ``import agacc`` / ``from agacc import Name`` to the package itself (agacc/__init__.py).
    Importing a submodule is not counted as importing its parent packages' __init__ (Python runs them,
    but a package's __init__ importing its own submodules is then only a cycle when a submodule imports
    the bare package back, which this graph shows as one).
(b) ``LayerStore.parts()`` read by the three decode backends -- Triton (``kernels.triton_decode``, the
    interpreter on CPU), the fused C++ kernel (``kernels.cpu``) and the PyTorch path (``agacc.decode``)
    -- gives the reference attention over the dequantised entries, for a store holding every part kind.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from tests.helpers import every_part_store

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("agacc", "kernels", "components")
TOP_MODULES = ("app",)


# ------------------------------------------------------------------------------------------------
# (a) the import graph
# ------------------------------------------------------------------------------------------------

def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_files() -> dict[str, Path]:
    """{dotted module name: file} of the project's own modules."""
    files = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            files[_module_name(path)] = path
    for name in TOP_MODULES:
        files[name] = ROOT / f"{name}.py"
    return files


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id in ("import_module", "__import__"))


def imports_of(name: str, path: Path, source: str | None = None):
    """Every import in a file as (absolute module, imported names or None, line), lazy ones included."""
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: up (level - 1) packages from this module's package
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            yield base, [a.name for a in node.names], node.lineno
        elif (isinstance(node, ast.Call) and _is_import_module(node.func) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            yield node.args[0].value, None, node.lineno


def _resolve(base: str, names, modules) -> list[str]:
    """The project modules an import statement makes this module depend on."""
    if names is None:  # import a.b.c (or import_module("a.b.c"))
        return [base] if base in modules else []
    out = []
    for n in names:
        if f"{base}.{n}" in modules:  # from agacc import quant: the submodule
            out.append(f"{base}.{n}")
        elif base in modules:  # from agacc.x import y / from agacc import Name: the module itself
            out.append(base)
    return sorted(set(out))


def import_graph():
    """({module: {imported project module: first line}}, [(module, top-level name imported, line)])."""
    files = project_files()
    graph, raw = {m: {} for m in files}, []
    for mod, path in files.items():
        for base, names, line in imports_of(mod, path):
            raw.append((mod, base.split(".")[0], line))
            for target in _resolve(base, names, files):
                graph[mod].setdefault(target, line)
    return graph, raw


def find_cycles(graph) -> list[list[str]]:
    """One cycle (as a closed path of modules) per strongly connected component that has one."""
    index, low, on_stack, stack, sccs = {}, {}, set(), [], []
    counter = [0]

    def strongconnect(v):  # Tarjan, iterative enough for a few hundred modules
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            sccs.append(comp)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    cycles = []
    for comp in sccs:
        members = set(comp)
        start = min(comp)
        if len(comp) == 1 and start not in graph[start]:
            continue
        # shortest path from start back to start inside the component (BFS)
        prev, frontier, seen = {}, [start], {start}
        found = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w == start:
                        found = v
                        break
                    if w in members and w not in seen:
                        seen.add(w)
                        prev[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path = [found]
        while path[-1] != start:
            path.append(prev[path[-1]])
        cycles.append([start] + path[::-1][1:] + [start] if len(path) > 1 else [start, start])
    return cycles


def _describe(cycle, graph, files) -> str:
    steps = [f"{a} ({files[a].relative_to(ROOT)}:{graph[a][b]}) -> {b}" for a, b in zip(cycle, cycle[1:])]
    return "\n    ".join(steps)


def test_the_graph_sees_lazy_relative_and_dynamic_imports():
    graph, _ = import_graph()
    assert "kernels" in graph["agacc.decode"]                  # import kernels (module level)
    assert "kernels.triton_decode" in graph["agacc.decode"]    # from kernels.triton_decode import ... (in a function)
    assert "agacc.quant" in graph["agacc.store"]               # from agacc import quant: the submodule
    src = "from . import quant\nfrom .quant import pack\nfrom .. import app\ndef f():\n    import importlib\n" \
          "    importlib.import_module('agacc.store')\n"
    got = list(imports_of("agacc.methods.x", ROOT / "agacc" / "methods" / "x.py", src))
    assert [(b, n) for b, n, _ in got] == [("agacc.methods", ["quant"]), ("agacc.methods.quant", ["pack"]),
                                           ("agacc", ["app"]), ("importlib", None), ("agacc.store", None)]
    assert _resolve("agacc", ["quant", "AGACCConfig"], project_files()) == ["agacc", "agacc.quant"]
    assert find_cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"d": 1}, "e": {"a": 1}}) == [
        ["a", "b", "c", "a"], ["d", "d"]]


def test_no_import_cycles():
    graph, _ = import_graph()
    files = project_files()
    cycles = find_cycles(graph)
    assert not cycles, "import cycles among the project's modules:\n  " + "\n  ".join(
        _describe(c, graph, files) for c in cycles)


def test_kernels_sit_below_the_library():
    _, raw = import_graph()
    bad = [f"{m} line {line}" for m, top, line in raw if m.split(".")[0] == "kernels" and top == "agacc"]
    assert not bad, f"kernels/ imports agacc: {bad}"


def test_the_library_does_not_import_the_app():
    _, raw = import_graph()
    bad = [f"{m} imports {top} (line {line})" for m, top, line in raw
           if m.split(".")[0] == "agacc" and top in ("gradio", "app", "components")]
    assert not bad, f"agacc/ imports the app's layer: {bad}"


# ------------------------------------------------------------------------------------------------
# (b) every backend reads the same parts
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key_quant,rotate", [("token", True), ("channel", False)])
def test_every_backend_reads_the_parts_alike(key_quant, rotate):
    from agacc.attention import attend
    from agacc.decode import _decode_parts
    from kernels import cpu

    triton = pytest.importorskip("triton")  # noqa: F841
    from kernels.triton_decode import decode_parts

    store = every_part_store(key_quant, rotate, tail=21)
    parts = store.parts()
    kinds = [(p.kind, p.container, p.bias is not None) for p in parts]
    assert kinds == [("dense", 0, False), ("quant", 8, False), ("quant", 4, False), ("quant", 3, False),
                     ("quant", 2, False), ("sparse", 2, False), ("dense", 0, True), ("dense", 0, False)]
    assert all(p.rotated == rotate and (p.key_block == 0) == (key_quant == "token") for p in parts if p.kind == "quant")
    bt, h, _, d = store.hot_k.shape
    g, scaling = 3, 0.125
    q = torch.randn(bt, h * g, 1, d, generator=torch.Generator().manual_seed(1))
    qg = q.reshape(bt, h, g, d) * scaling
    ref_out, ref_mass = attend(q, store.attention_entries(torch.float32), scaling)
    ref_out = ref_out.transpose(1, 2).reshape(bt, h, g, d)

    got = {"torch": _decode_parts(qg, parts, None)}
    assert cpu.load() is not None, f"the CPU kernel did not build: {cpu._state.get('error')}"
    got["cpp"] = cpu.decode_layer(qg, parts)
    out, mass = decode_parts(q, parts, scaling, split=48, block_n=16)
    got["triton"] = out.transpose(1, 2).reshape(bt, h, g, d), mass
    for name, (out, mass) in got.items():
        assert mass.shape == (store.n_entries,), name
        torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-4, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(mass, ref_mass, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
