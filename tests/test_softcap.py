"""Attention logit softcapping (Gemma2's ``attn_logit_softcapping``: c * tanh(z / c) on the scaled
logits, before any bias or mask) in every PyTorch path, against a hand-worked case, transformers' own
eager attention and the uncapped answer (so each check can fail). The C++ and Triton kernels are
checked against these references in test_cpu_kernel.py, test_kernels.py and test_triton_chunk.py."""
import copy
import math

import pytest
import torch
from transformers import DynamicCache
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

import agacc
from agacc.attention import attend, cap_logits, chunk_attention, dense_attention, observe_prefill
from agacc.decode import decode_attention
from agacc.store import Entries
from tests.helpers import COMMON, build, every_part_store, two_chunk_logits

D, H, CAP = 64, 2, 1.5


def test_hand_worked_two_keys():
    """q = [1, 0], keys [4, 0] and [0, 0], scaling 1, cap 2: logits 2 tanh(2) = 1.928 and 0."""
    query = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    k = torch.tensor([[4.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 1, 2, 2)
    entries = [Entries(k, v)]
    out, mass = attend(query, entries, 1.0, softcap=2.0)
    p = math.exp(2 * math.tanh(2)) / (math.exp(2 * math.tanh(2)) + 1)
    torch.testing.assert_close(mass, torch.tensor([p, 1 - p]))
    torch.testing.assert_close(out.view(2), torch.tensor([p, 1 - p]))
    uncapped, _ = attend(query, entries, 1.0)
    assert float(uncapped.view(2)[0]) > 0.98 > p + 0.1  # e^4 / (e^4 + 1): the cap changed the answer
    assert cap_logits(torch.tensor([3.0]), None).item() == 3.0 == cap_logits(torch.tensor([3.0]), 0).item()


def store_and_query(key_quant, rotate, q):
    st = every_part_store(key_quant, rotate, h=H, d=D, B=8 if key_quant == "token" else 16)
    g = torch.Generator().manual_seed(1)
    st.append(torch.randn(1, H, q, D, generator=g).half() * 2, torch.randn(1, H, q, D, generator=g).half())
    return st, torch.randn(1, H * 3, q, D, generator=g) * 4  # logits of several units: the cap of 1.5 bites


@pytest.mark.parametrize("key_quant,rotate", [("channel", True), ("token", False)])
def test_chunk_and_decode_paths_equal_the_reference(key_quant, rotate, monkeypatch):
    """chunk_attention (every part kind, the causal new entries) and the PyTorch decode path against
    ``attend`` over the dequantised entries, capped; both far from the uncapped answer."""
    monkeypatch.setattr("kernels.backend", lambda device: "torch")
    st, query = store_and_query(key_quant, rotate, q=21)
    assert {p.kind for p in st.parts()} == {"dense", "quant", "sparse"} and st.markers.n > 0
    entries = st.attention_entries(torch.float32)
    want, want_mass = attend(query, entries, 0.125, causal_new=21, n_obs=8, softcap=CAP)
    got, mass = chunk_attention(query, st.parts(), 0.125, n_new=21, n_obs=8, block=16, softcap=CAP)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(mass, want_mass, rtol=1e-5, atol=1e-8)
    free, _ = attend(query, entries, 0.125, causal_new=21, n_obs=8)
    assert (free - want).abs().max() > 0.1

    q1 = query[:, :, -1:]
    want, want_mass = attend(q1, entries, 0.125, softcap=CAP)
    got, mass = decode_attention(q1, st, 0.125, softcap=CAP)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(mass, want_mass, rtol=1e-5, atol=1e-8)
    assert (attend(q1, entries, 0.125)[0] - want).abs().max() > 0.1


def test_dense_paths_equal_transformers_eager():
    """``dense_attention`` (prompt, lossless later chunks, the plain cache after ``enable``) and
    ``observe_prefill`` against Gemma2's own eager attention and ``attend``: causal and with a mask."""
    g = torch.Generator().manual_seed(2)
    q, n = 12, 20
    query = torch.randn(2, 6, q, D, generator=g) * 4
    key, value = torch.randn(2, 2, n, D, generator=g) * 2, torch.randn(2, 2, n, D, generator=g)
    causal = torch.arange(n)[None, :] <= torch.arange(n - q, n)[:, None]
    mask = causal.expand(2, 1, q, n).clone()
    mask[1, :, :, :3] = False  # a padded row
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    module = type("M", (), {"num_key_value_groups": 3, "training": False})()
    want, _ = eager_attention_forward(module, query, key, value, additive, scaling=0.125, softcap=CAP)
    torch.testing.assert_close(dense_attention(query, key, value, mask, 0.125, CAP), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dense_attention(query, key, value, additive, 0.125, CAP), want, rtol=1e-6, atol=1e-6)
    want_causal, _ = eager_attention_forward(module, query, key, value, additive[:1].expand(2, -1, -1, -1),
                                             scaling=0.125, softcap=CAP)
    torch.testing.assert_close(dense_attention(query, key, value, None, 0.125, CAP), want_causal, rtol=1e-6, atol=1e-6)
    assert (dense_attention(query, key, value, None, 0.125) - want_causal).abs().max() > 0.1
    blind = mask.clone()
    blind[1, :, 0] = False  # a padding query that sees nothing: finite, as transformers' eager masks keep it
    assert torch.isfinite(dense_attention(query, key, value, blind, 0.125, CAP)).all()

    qp, kp = query[:, :, -8:], key[:, :, -8:]  # a prompt of 8 tokens: what its last 4 queries give each key
    entries = [Entries(kp, value[:, :, -8:])]
    _, want_mass = attend(qp, entries, 0.125, causal_new=8, n_obs=4, softcap=CAP)
    torch.testing.assert_close(observe_prefill(qp, kp, 0.125, 4, chunk=3, softcap=CAP), want_mass, rtol=1e-5, atol=1e-7)


def gemma2(cap):
    """A tiny random Gemma2 in transformers' eager attention; q/k projections x30 so the logits are
    several units and a cap of 1 changes the answer."""
    m = build("Gemma2Config", dict(COMMON, head_dim=16, attn_logit_softcapping=cap, attn_implementation="eager"))
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(30.0)
            layer.self_attn.k_proj.weight.mul_(30.0)
    return m


def generate(m, ids, cache, n=8):
    with torch.inference_mode():
        out = m.generate(input_ids=ids, past_key_values=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


def test_gemma2_softcapping_end_to_end(monkeypatch):
    """Lossless preset = transformers' eager Gemma2 with a plain cache (one prompt; two prompt chunks);
    the plain cache still works after ``enable``; a compressing preset's exact prefill gives the eager
    first token. The uncapped model answers differently, so none of this holds by accident."""
    monkeypatch.setattr("kernels.backend", lambda device: "torch")
    m = gemma2(1.0)
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    ref_ids, ref = generate(m, ids, DynamicCache(config=m.config))
    uncapped = copy.deepcopy(m)
    for layer in uncapped.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    assert (generate(uncapped, ids, DynamicCache(config=m.config))[1] - ref).abs().max() > 1.0

    agacc.enable(m)
    plain_ids, plain = generate(m, ids, DynamicCache(config=m.config))
    assert torch.equal(plain_ids, ref_ids) and torch.allclose(plain, ref, atol=1e-5, rtol=0)
    full = agacc.CompressedCache(m.config, agacc.AGACCConfig.preset("full"))
    out_ids, out = generate(m, ids, full)
    assert torch.equal(out_ids, ref_ids) and torch.allclose(out, ref, atol=1e-4, rtol=0)
    got, want = two_chunk_logits(m, ids)
    assert torch.allclose(got, want, atol=1e-4, rtol=0)

    ids = torch.randint(3, 256, (1, 200), generator=torch.Generator().manual_seed(1))
    ref_ids, ref = generate(m, ids, DynamicCache(config=m.config), n=1)
    cache = agacc.CompressedCache(m.config, agacc.AGACCConfig.preset("agacc", target_ratio=3.0))
    out_ids, out = generate(m, ids, cache, n=4)
    assert torch.equal(out_ids[:, :201], ref_ids) and torch.allclose(out[0], ref[0], atol=1e-4, rtol=0)
    assert cache.memory()["ratio"] >= 3.0 * 0.95


def test_an_attention_variant_no_path_implements_raises():
    """Learned sinks (gpt-oss's ``s_aux``) reaching the agacc function raise, naming the fix, whichever
    cache is in use: never an answer without them."""
    from agacc.attention import agacc_attention_forward

    q = torch.randn(1, 4, 3, 16)
    k = v = torch.randn(1, 2, 3, 16)
    with pytest.raises(ValueError, match="sinks.*agacc.enable"):
        agacc_attention_forward(torch.nn.Module(), q, k, v, None, s_aux=torch.zeros(4))
