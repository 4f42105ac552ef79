"""The Triton chunk attention (``kernels.triton_chunk.chunk_parts``, run by the interpreter on CPU:
TRITON_INTERPRET=1 from conftest.py) against its references: ``agacc.attention.chunk_attention``'s
PyTorch path and ``attend`` over the dequantised entries, output and attention mass.

Shapes are small but hit the edges: every kind of part (full, int8/4/3/2 with per-channel or per-token
keys, rotated or not, sparse, markers with their bias, hot), odd chunk lengths, several row tiles, GQA
g in {1, 2, 3, 4}, head dims 64/96 (padded)/128, batch 2, fp16/bf16 stores and queries, new tokens
fewer or more than the queries (the causal run crossing parts), n_obs above q.

The compile check builds a few specialisations (one per distinct code path) for sm_90 and sm_80 in a
subprocess (the GPU compiler needs TRITON_INTERPRET unset); the full sweep of ``aot_specs()`` is
``python -m kernels.aot --module kernels.triton_chunk``'s job."""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch

triton = pytest.importorskip("triton")

import kernels  # noqa: E402
from agacc import attention  # noqa: E402
from agacc.attention import attend, chunk_attention  # noqa: E402
from kernels import triton_chunk as TC  # noqa: E402
from kernels.triton_chunk import chunk_parts  # noqa: E402
from tests.helpers import every_part_store  # noqa: E402


@pytest.fixture(autouse=True)
def _torch_reference(monkeypatch):
    """``chunk_attention`` runs its PyTorch path here unless a test forces Triton (and builds no C++)."""
    monkeypatch.delenv(kernels.FORCE_TRITON_ENV, raising=False)
    monkeypatch.setenv("AGACC_CPU_KERNEL", "0")


def chunk_store(key_quant="channel", rotate=True, *, q=37, bt=1, h=2, d=64, dtype=torch.float16, group=32,
                tail=20, seed=0):
    """Every kind of part (``every_part_store``), then ``q`` new tokens: a chunk's own K/V."""
    st = every_part_store(key_quant, rotate, group=group, bt=bt, h=h, d=d, B=8 if key_quant == "token" else 16,
                          dtype=dtype, tail=tail, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    st.append(torch.randn(bt, h, q, d, generator=gen).to(dtype), torch.randn(bt, h, q, d, generator=gen).to(dtype))
    return st


def check(st, g, q, n_new=None, n_obs=16, qdtype=torch.float32, seed=5, transposed=False, softcap=None, qscale=1.0):
    """chunk_parts vs chunk_attention's PyTorch path and vs attend over the dequantised entries.
    ``transposed``: the query a [Bt, q, Hq, D] tensor's transpose, as transformers hands it over;
    ``softcap``: logit softcapping in all three; ``qscale`` scales the query (so that a cap bites)."""
    n_new = q if n_new is None else n_new
    parts = st.parts()
    bt, h, d = parts[0].k.shape[0], parts[0].heads, st.hot_k.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    if transposed:
        query = (torch.randn(bt, q, h * g, d, generator=gen) * qscale).to(qdtype).transpose(1, 2)
    else:
        query = (torch.randn(bt, h * g, q, d, generator=gen) * qscale).to(qdtype)
    assert kernels.backend("cpu") == "torch"
    got, mass = chunk_parts(query, parts, 0.125, n_new, n_obs, softcap=softcap)
    want, want_mass = chunk_attention(query, parts, 0.125, n_new=n_new, n_obs=n_obs, softcap=softcap)
    ref, ref_mass = attend(query.float(), st.attention_entries(torch.float32), 0.125, causal_new=n_new, n_obs=n_obs,
                           softcap=softcap)
    assert got.shape == (bt, q, h * g, d) and got.dtype == qdtype
    assert mass.shape == (st.n_entries,) and mass.dtype == torch.float32
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[qdtype]  # fp32: 1e-5; half: an ulp
    rtol = 0 if qdtype == torch.float32 else tol
    torch.testing.assert_close(got, want, rtol=rtol, atol=tol)
    torch.testing.assert_close(got.float(), ref.to(qdtype).float(), rtol=rtol, atol=tol)
    torch.testing.assert_close(mass, want_mass, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(mass, ref_mass, rtol=1e-4, atol=1e-7)
    assert abs(float(mass.sum()) - 1.0) < 1e-5
    return got, mass


@pytest.mark.parametrize("key_quant,rotate,g", [("channel", True, 3), ("token", False, 2)])
def test_every_part(key_quant, rotate, g):
    """full, int8 (8/5-bit), int4, int3, int2 (2/1-bit), sparse, a marker with its log-count bias, hot;
    keys per channel (B 16, rotated) or per token (groups of 32, B 8, not rotated); 37 new tokens."""
    st = chunk_store(key_quant, rotate)
    assert {p.kind for p in st.parts()} == {"dense", "quant", "sparse"} and st.markers.n > 0
    assert {p.container for p in st.parts() if p.kind == "quant"} == {8, 4, 3, 2}
    check(st, g, 37)


def _uncapped_gap(st, g, q, n_new, n_obs, got, mass, qscale, seed=5):
    """How far ``attend`` without the cap is from (got, mass): (max |out difference|, max |mass difference|)."""
    bt, h, d = st.parts()[0].k.shape[0], st.parts()[0].heads, st.hot_k.shape[-1]
    query = torch.randn(bt, h * g, q, d, generator=torch.Generator().manual_seed(seed)) * qscale  # check's
    free, free_mass = attend(query, st.attention_entries(torch.float32), 0.125, causal_new=n_new, n_obs=n_obs)
    return float((free - got.float()).abs().max()), float((free_mass - mass).abs().max())


@pytest.mark.parametrize("softcap", [0.5, 2.0])
@pytest.mark.parametrize("key_quant,rotate,g", [("channel", True, 3), ("token", False, 2)])
def test_every_part_softcap(key_quant, rotate, g, softcap):
    """Logit softcapping (Gemma2: c * tanh(z / c) on the scaled logits, then the markers' bias, then the
    causal mask of the 37 new tokens) over every kind of part (full, int8/4/3/2 with keys per channel,
    rotated, or per token, not rotated; sparse; a marker; hot) against both references, output and mass
    at the uncapped test's tolerances; the uncapped answer is far off, so the comparison can fail."""
    st = chunk_store(key_quant, rotate)
    assert {p.kind for p in st.parts()} == {"dense", "quant", "sparse"} and st.markers.n > 0
    got, mass = check(st, g, 37, softcap=softcap, qscale=3.0)
    gap_out, gap_mass = _uncapped_gap(st, g, 37, 37, 16, got, mass, 3.0)
    assert gap_out > 0.1 and gap_mass > 0.01, (gap_out, gap_mass)


def test_softcap_causal_run_crossing_parts_bf16():
    """Softcapping with 9 queries and n_new = q + 25 (the causal run starts in the sparse part and crosses
    the markers into hot; new entries past the queries get no mass), then a bf16 store and query (a
    transposed view), D = 96, batch 2, g = 4."""
    st = chunk_store("channel", True, q=9, tail=20)
    got, mass = check(st, 3, 9, n_new=9 + 25, softcap=1.0, qscale=3.0)
    assert float(mass[st.n_entries - 25:].abs().max()) == 0.0
    assert _uncapped_gap(st, 3, 9, 34, 16, got, mass, 3.0)[0] > 0.1
    st = chunk_store("token", True, q=5, bt=2, d=96, dtype=torch.bfloat16, group=24, tail=8)
    check(st, 4, 5, qdtype=torch.bfloat16, transposed=True, softcap=1.0, qscale=3.0)


def test_head96_bf16_batch2_gqa4_odd_chunk():
    """D = 96 (padded to 128), value and key groups of 24 (the gather path of a group size that is not
    a power of two), bf16 store and query (a transposed view), batch 2, g = 4, a 5-token chunk with
    n_obs 16 > q."""
    st = chunk_store("token", True, q=5, bt=2, d=96, dtype=torch.bfloat16, group=24, tail=8)
    assert st.parts()[1].value_group == 24 and st.parts()[1].key_group == 24
    check(st, 4, 5, qdtype=torch.bfloat16, transposed=True)


def test_head128_fp16_several_row_tiles():
    """D = 128, fp16 query: g * q = 2 * 41 rows are three row tiles of 32, the second one holding rows of
    both query heads; n_obs 33 of each head (two row tiles in the mass pass)."""
    st = chunk_store("channel", True, q=41, d=128, group=64, tail=23)
    check(st, 2, 41, n_obs=33, qdtype=torch.float16)


@pytest.mark.parametrize("extra,g", [(-3, 1), (25, 3)])
def test_new_tokens_fewer_or_more_than_queries(extra, g):
    """n_new = q - 3 (all new entries visible to the last queries; g = 1) or q + 25: the causal run starts
    in the sparse part and crosses the markers into the hot part; entries new-numbered >= q see no query."""
    q = 9
    st = chunk_store("channel", True, q=q, tail=20)
    parts = st.parts()
    assert [p.kind for p in parts][-3:] == ["sparse", "dense", "dense"] and parts[-1].n == 20 + q
    _, mass = check(st, g, q, n_new=q + extra)
    if extra > 0:
        assert float(mass[st.n_entries - extra:].abs().max()) == 0.0  # new entries q.. of q + extra


def test_one_query_and_only_dense():
    """q = 1 (a decode step through the chunk path) over a store of full blocks and hot tokens only."""
    st = every_part_store("channel", False, tail=21)
    dense = [p for p in st.parts() if p.kind == "dense" and p.bias is None]

    class Only:  # the dense parts of the store, as a store
        n_entries = sum(p.n for p in dense)
        hot_k = st.hot_k

        @staticmethod
        def parts():
            return dense

        @staticmethod
        def attention_entries(dtype):
            return [attention.Entries(p.k.to(dtype), p.v.to(dtype), None) for p in dense]

    check(Only, 4, 1)


def test_reads_the_packed_bytes():
    """Flipping one packed key code of the int4 part moves the mass of exactly that entry most."""
    st = chunk_store("channel", False, q=4, h=1)
    query = torch.randn(1, 2, 4, 64, generator=torch.Generator().manual_seed(3))
    _, m1 = chunk_parts(query, st.parts(), 0.125, 4, 4)
    seg = st.quant[4]
    e = sum(p.n for p in st.parts()[:2]) + 5  # full, int8, then entry 5 of int4
    seg.k[0, :, 5] ^= 0xFF
    _, m2 = chunk_parts(query, st.parts(), 0.125, 4, 4)
    assert int((m2 - m1).abs().argmax()) == e


def test_chunk_attention_branches_to_triton(monkeypatch):
    """With the backend "triton" (forced on CPU) ``chunk_attention`` runs the kernel, else its own path."""
    calls = []
    monkeypatch.setattr(TC, "chunk_parts", lambda *a, **k: calls.append(1) or chunk_parts(*a, **k))
    st = chunk_store("channel", True, q=6)
    query = torch.randn(1, 4, 6, 64, generator=torch.Generator().manual_seed(2))
    want = chunk_attention(query, st.parts(), 0.125, n_new=6, n_obs=4)
    assert calls == []
    monkeypatch.setenv(kernels.FORCE_TRITON_ENV, "1")
    got = chunk_attention(query, st.parts(), 0.125, n_new=6, n_obs=4)
    assert calls == [1]
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# ahead-of-time specialisations
# ------------------------------------------------------------------------------------------------

def _key(name, sig, ce):
    return name, tuple(sig.items()), tuple(sorted(ce.items()))


@pytest.mark.parametrize("d,group,key_quant,dtype", [
    (64, 32, "channel", torch.float16), (64, 64, "token", torch.bfloat16), (128, 64, "token", torch.float32),
    (96, 32, "channel", torch.float16), (256, 128, "channel", torch.bfloat16)])
def test_aot_specs_cover_the_launches(d, group, key_quant, dtype):
    """Every (kernel, signature, constexprs) ``chunk_parts`` launches for a store of every part is one
    of ``aot_specs()``, with the options the wrapper launches with; names are unique."""
    specs = TC.aot_specs()
    assert len({s[0] for s in specs}) == len(specs)
    have = {_key(fn.__name__, sig, ce): opts for _, fn, sig, ce, opts in specs}
    st = every_part_store(key_quant, True, group=group, d=d, dtype=dtype, tail=16)
    query = torch.randn(1, 2, 3, d)
    launched = TC.part_specs(query, st.parts())
    assert len(launched) == 2 * len(st.parts())
    for name, sig, ce in launched:
        assert _key(name, sig, ce) in have, (name, ce)
        kernel = "main" if name == "_chunk_kernel" else "mass"
        for cc in (75, 80, 90):  # the options of every target: what the wrapper launches with on that device
            assert have[_key(name, sig, ce)](cc) == TC.launch_options(kernel, ce["D_PAD"], cc)
    # logit softcapping: the same launches with SOFTCAP=True (its cap a runtime fp32), which the AOT list
    # leaves to first use (all its specs are SOFTCAP=False); signature and constexprs still name exactly
    # the kernel's runtime and constexpr arguments (what kernels.aot checks of a spec)
    assert all(ce["SOFTCAP"] is False for _, _, _, ce, _ in specs)
    capped = TC.part_specs(query, st.parts(), softcap=30.0)
    assert [(n, s) for n, s, _ in capped] == [(n, s) for n, s, _ in launched]
    for (name, sig, ce), (_, _, ce0) in zip(capped, launched):
        assert ce == {**ce0, "SOFTCAP": True} and _key(name, sig, ce) not in have and sig["softcap"] == "fp32"
        params = inspect.signature(getattr(TC, name).fn).parameters
        assert {n for n, p in params.items() if "constexpr" in str(p.annotation)} == set(ce)
        assert [n for n, p in params.items() if "constexpr" not in str(p.annotation)] == list(sig)


# one specialisation per distinct code path: the main kernel on a biased dense part, on 3-bit planes
# with per-token keys (D 128) and on a 2-bit sparse part (D 64) for sm_90; D 256 (the largest shared
# memory) for sm_80, whose limit is the tighter one: the main kernel on 8-bit per-channel keys, the
# mass kernel on a 3-bit sparse part. "+softcap": the same with SOFTCAP=True (logit softcapping, not in
# aot_specs): the main kernel on a biased dense part for sm_90, the mass kernel on a 4-bit part for sm_80.
COMPILE_SUBSET = [
    (r"chunk\.main\[D128,dense,fp16,bias,", "90"),
    (r"chunk\.main\[D128,quant,c3,keys=token/64,G=64,", "90"),
    (r"chunk\.main\[D64,sparse,c2,", "90"),
    (r"chunk\.main\[D256,quant,c8,keys=channel,G=64,", "80"),
    (r"chunk\.mass\[D256,sparse,c3,", "80"),
    (r"chunk\.main\[D128,dense,fp16,bias,", "90+softcap"),
    (r"chunk\.mass\[D128,quant,c4,keys=channel,", "80+softcap"),
]

_COMPILE = textwrap.dedent("""
    import re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from kernels.triton_chunk import aot_specs

    LIMIT = {80: 166912, 90: 232448}  # opt-in shared memory per block
    specs = aot_specs()
    for arg in sys.argv[1:]:
        pat, ccs = arg.split("@")
        ccs, _, cap = ccs.partition("+")
        hits = [s for s in specs if re.match(pat, s[0])]
        assert len(hits) == 1, (pat, [s[0] for s in hits])
        name, fn, sig, ce, opts = hits[0]
        if cap:
            assert ce["SOFTCAP"] is False
            name, ce = name + "+softcap", {**ce, "SOFTCAP": True}
        full = {p.name: "constexpr" if p.name in ce else sig[p.name] for p in fn.params}
        attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params) if full[p.name].startswith("*")}
        for cc in map(int, ccs.split(",")):
            k = triton.compile(ASTSource(fn=fn, signature=full, constexprs=ce, attrs=attrs),
                               target=GPUTarget("cuda", cc, 32), options=opts(cc))
            assert "cubin" in k.asm and k.metadata.shared <= LIMIT[cc], (name, cc, k.metadata.shared)
            print("ok", name, f"sm_{cc}", k.metadata.shared, flush=True)
""")


def test_aot_subset_compiles_for_sm90_and_sm80():
    """The subset compiles through ptxas to a cubin, within the target's shared memory per block."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = [f"{pat}@{ccs}" for pat, ccs in COMPILE_SUBSET]
    r = subprocess.run([sys.executable, "-c", _COMPILE, *args], cwd=root, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("ok ") == sum(len(ccs.split("+")[0].split(",")) for _, ccs in COMPILE_SUBSET)
