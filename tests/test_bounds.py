"""bench/bounds.py: the oracle's scores by hand, the K3V2 simulation's codes and prices, the allocated
keys' widths and reads, and the keys in a calibrated basis: its widths and prices by hand, its basis against an
SVD, its reads and held bytes against a recomputation on the tiny model."""
import pytest
import torch

import agacc
import agacc.importance as importance
import agacc.store as store
from agacc import planner, quant
from agacc import tiers as T
from agacc.config import AGACCConfig
from bench import bounds
from tests.helpers import tiny_model


def test_oracle_scores_are_the_later_queries_attention_by_hand():
    """Four tokens, one layer: at a cache of 2 tokens, queries 2 and 3 are to come; token 0 gets
    (0.5, 0.1) from them, token 1 (0.3, 0.6): max -> (0.5, 0.6), mean -> (0.3, 0.45), each divided by its
    mean over the one ready token (token 0). At the full length the last query stands in."""
    attn = torch.tensor([[[1.0, 0, 0, 0], [0.4, 0.6, 0, 0], [0.5, 0.3, 0.2, 0], [0.1, 0.6, 0.2, 0.1]]])
    torch.testing.assert_close(bounds.oracle_scores(attn, 2, 1, "max"), torch.tensor([[1.0, 0.6 / 0.5]]))
    torch.testing.assert_close(bounds.oracle_scores(attn, 2, 1, "mean"), torch.tensor([[1.0, 0.45 / 0.3]]))
    torch.testing.assert_close(bounds.oracle_scores(attn, 4, 0, "max"), attn[:, 3] / attn[:, 3].mean())
    # the past queries (0 and 1) instead: token 0 (1.0, 0.4), token 1 (0, 0.6)
    torch.testing.assert_close(bounds.oracle_scores(attn, 2, 1, "max", "past"), torch.tensor([[1.0, 0.6]]))


def test_values_2bit_prices_and_holds_2bit_values_in_3bit_blocks(monkeypatch):
    monkeypatch.setattr(planner, "block_cost_bytes", planner.block_cost_bytes)  # restored after the test
    monkeypatch.setattr(store.QuantSegment, "quantize", store.QuantSegment.quantize)
    monkeypatch.setattr(importance, "scores_all", importance.scores_all)
    cfg = AGACCConfig(block_size=16)
    kw = dict(batch=1, heads=3, head_dim=64, block_size=16, full_itemsize=2, value_group_size=64, b_min=3,
              sparse_threshold=0.25, key_quant="channel", key_group_size=64)
    before = {t: planner.block_cost_bytes(t, b, 64, **kw) for t, b in ((T.INT3, 3), (T.INT4, 4), (T.FULL, 16))}
    torch.manual_seed(0)
    k, v = torch.randn(1, 3, 32, 64), torch.randn(1, 3, 32, 64)
    seg = store.QuantSegment(16, "cpu", 3, cfg)
    k3 = seg.quantize(k, v, 3)
    bounds.install_values_2bit()
    after = {t: planner.block_cost_bytes(t, b, 64, **kw) for t, b in ((T.INT3, 3), (T.INT4, 4), (T.FULL, 16))}
    assert before[T.INT3] - after[T.INT3] == 3 * 16 * 64 // 8 and after[T.INT4] == before[T.INT4]
    assert after[T.FULL] == before[T.FULL]
    pk, ks, kz, pv, vs, vz = seg.quantize(k, v, 3)
    assert torch.equal(pk, k3[0]) and pv.shape == k3[3].shape  # keys as before; values in the 3-bit container
    codes = quant.unpack(pv, 3)
    assert int(codes.max()) == 3  # 2-bit codes
    v2 = quant.quantize_values(v, 2, 64)
    torch.testing.assert_close(quant.dequantize_values(pv, vs, vz, 3), quant.dequantize_values(*v2, 2))


def test_allocated_key_widths_by_hand():
    """One head, four channels, one block: (q RMS x range)^2 = 64, 16, 4, 1 (q 2,1,1,1 and ranges 4,4,2,1).
    Eight bits by greedy water-filling (a bit quarters a channel's error, ties to the first): 4, 3, 1, 0.
    A channel never takes more than 8 bits."""
    k = torch.zeros(1, 1, 16, 4)
    k[0, 0, 5] = torch.tensor([4.0, 4.0, 2.0, 1.0])
    q = torch.tensor([2.0, 1.0, 1.0, 1.0]).view(1, 1, 1, 4)
    cost = bounds.key_channel_cost(q, k)
    torch.testing.assert_close(cost, torch.tensor([[64.0, 16.0, 4.0, 1.0]]))
    assert bounds.allocate_key_bits(cost, 2).tolist() == [[4, 3, 1, 0]]
    assert bounds.allocate_key_bits(torch.tensor([[1e8, 1.0]]), 8).tolist() == [[8, 8]]


def test_allocated_keys_read_as_the_store_format_channel_by_channel():
    """Equal widths are the store's per-channel keys (quant.quantize_keys, un-rotated) exactly; mixed widths
    are each channel at its own width; a 0-bit channel reads its block's mid-range."""
    torch.manual_seed(0)
    k = torch.randn(1, 2, 32, 8)
    for b in (2, 3, 4):
        want = quant.dequantize_keys(*quant.quantize_keys(k, b, 16), b, 16)
        torch.testing.assert_close(bounds.quantize_allocated(k, torch.full((2, 8), b)), want)
    bits = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 8]] * 2)
    got = bounds.quantize_allocated(k, bits)
    for j, b in enumerate(bits[0].tolist()):
        kb = k[..., j].reshape(1, 2, 2, 16)  # the channel's two blocks
        if b:
            codes, scale, zero = quant.quantize(kb, b, dim=-1)
            want = codes.float() * scale.float() + zero.float()
        else:
            want = ((kb.amin(-1, keepdim=True) + kb.amax(-1, keepdim=True)) / 2).half().float().expand(-1, -1, -1, 16)
        torch.testing.assert_close(got[..., j], want.reshape(1, 2, 32))


def _restored_after_the_test(monkeypatch):
    """What ``install_keys_allocated`` and ``install_keys_basis`` patch, set back when the test ends."""
    import bench_ppl

    from agacc.cache import CompressedLayer

    monkeypatch.setattr(bench_ppl, "measure", bench_ppl.measure)
    monkeypatch.setattr(bench_ppl.common, "load_model", bench_ppl.common.load_model)
    monkeypatch.setattr(CompressedLayer, "lazy_initialization", CompressedLayer.lazy_initialization)
    for name in ("append", "parts", "nbytes"):
        monkeypatch.setattr(store.LayerStore, name, getattr(store.LayerStore, name))
    monkeypatch.setattr(store.QuantSegment, "nbytes", store.QuantSegment.nbytes)
    monkeypatch.setattr(planner, "block_cost_bytes", planner.block_cost_bytes)


@pytest.mark.parametrize("pre_rope", [False, True])
def test_keys_allocated_reads_each_quantised_blocks_keys_in_the_allocated_format(monkeypatch, pre_rope):
    """A cache at 4x on the tiny model, its prompt's widths set: every 2/3/4-bit block reads its own tokens'
    exact keys quantised with its layer's widths at its bits (RoPE undone first and redone with ``pre_rope``),
    its values as the store holds them; every other part as the store holds it."""
    from transformers.models.llama.modeling_llama import rotate_half

    from kernels.format import QUANT

    _restored_after_the_test(monkeypatch)
    model = tiny_model()
    torch.manual_seed(2)
    ids = torch.randint(3, 256, (1, 640))
    unpatched_parts = store.LayerStore.parts
    prompt = bounds.install_keys_allocated(pre_rope)
    widths = prompt(model, ids, 640)
    cache = agacc.CompressedCache(model.config, AGACCConfig.preset("agacc", target_ratio=4.0))
    with torch.inference_mode():
        model(ids, past_key_values=cache)
    cache.end_prefill()
    cos, sin = model.model.rotary_emb(torch.zeros(1), torch.arange(640)[None])
    seen = set()
    for layer in cache.layers:
        s = layer.store
        pos = s.entry_positions()
        at = 0
        for held, read in zip(unpatched_parts(s), s.parts()):
            n = held.k.shape[2]  # tokens (packed codes keep them on dim 2 too)
            if held.kind == QUANT and held.key_block and held.container in (2, 3, 4):
                k = s._exact[0][:, :, pos[at:at + n]]
                c, sn = cos[0, pos[at:at + n]], sin[0, pos[at:at + n]]
                if pre_rope:
                    k = k * c - rotate_half(k) * sn
                want = bounds.quantize_allocated(k, widths[layer.layer_idx][held.container], held.key_block)
                if pre_rope:
                    want = want * c + rotate_half(want) * sn
                torch.testing.assert_close(read.k.float(), want.to(s.dtype).float())
                torch.testing.assert_close(read.v.float(), quant.dequantize_part(held)[1].to(s.dtype).float())
                seen.add(held.container)
            else:
                assert read.kind == held.kind and torch.equal(read.k, held.k) and torch.equal(read.v, held.v)
            at += n
    assert seen  # quantised blocks were read so


def _calibration_texts(names, seed):
    """Random prompts of 320 tokens standing in for the named bench/corpus.py texts, and a tokenizer that reads
    each text as its prompt."""
    from types import SimpleNamespace

    from bench import corpus

    torch.manual_seed(seed)
    texts = {name: torch.randint(3, 256, (1, 320)) for name in names}
    by_text = {corpus.read(corpus.TEXTS[n]): ids for n, ids in texts.items()}
    return texts, lambda text, return_tensors: SimpleNamespace(input_ids=by_text[text])


def test_keys_allocated_widths_from_other_texts_average_their_costs(monkeypatch):
    """``widths_from``: one table for every text, the water-filling of the named texts' channel costs averaged
    (their prompts read through the tokenizer); the measured text's own prompt plays no part."""
    from agacc.eval.runner import capture_prefill

    _restored_after_the_test(monkeypatch)
    model = tiny_model()
    texts, tok = _calibration_texts(["licence-tuning", "narrative-tuning"], 3)
    prompt = bounds.install_keys_allocated(False, list(texts))
    widths = prompt(model, torch.randint(3, 256, (1, 320)), 320, tok)
    caps = [capture_prefill(model, ids[0].tolist(), n_obs=64) for ids in texts.values()]
    for layer in range(len(caps[0].keys)):
        cost = torch.stack([bounds.key_channel_cost(c.queries[layer], c.keys[layer]) for c in caps]).mean(0)
        for b in (2, 3, 4):
            assert torch.equal(widths[layer][b], bounds.allocate_key_bits(cost, b))
    assert prompt(model, torch.randint(3, 256, (1, 320)), 320) is widths  # found once: no tokenizer needed again


def test_before_each_text_runs_first_with_the_text_and_passes_everything_on(monkeypatch):
    import bench_ppl

    calls = []
    monkeypatch.setattr(bench_ppl, "measure", lambda *a, **kw: calls.append(("measure", a, kw)) or "rows")
    bounds.before_each_text(lambda model, ids, prefill: calls.append(("fn", model, ids, prefill)))
    assert bench_ppl.measure("m", "ids", ["x"], 1024, 512, ref_cache="r") == "rows"
    assert calls == [("fn", "m", "ids", 1024), ("measure", ("m", "ids", ["x"], 1024, 512), {"ref_cache": "r"})]


@pytest.mark.parametrize("phase", ["all", "prompt", "decode"])
def test_oracle_phase_reads_the_oracle_where_asked_and_the_tracker_elsewhere(monkeypatch, phase):
    """``--phase``: the prompt's re-evaluations (the cache holds <= the prompt's tokens) read the oracle's scores
    with "all" and "prompt", the decode steps' with "all" and "decode"; the others the tracker's scores."""
    import bench_ppl

    monkeypatch.setattr(importance, "scores_all", lambda trackers, seq_len, ready: "tracker")
    monkeypatch.setattr(bounds, "oracle_scores", lambda attn, seq_len, ready, reduce, when: ("oracle", attn))
    monkeypatch.setattr(bounds, "attention_of", lambda model, ids, heads: "attn")
    monkeypatch.setattr(bench_ppl, "measure", lambda model, ids, methods, prefill, *a, **kw: [
        importance.scores_all([], n, 0) for n in (prefill // 2, prefill, prefill + 1)])
    bounds.install_oracle("max", "mean", phase=phase)
    got = bench_ppl.measure(None, None, [], 8)
    oracle, tracker = ("oracle", "attn"), "tracker"
    want = {"all": [oracle] * 3, "prompt": [oracle, oracle, tracker], "decode": [tracker, tracker, oracle]}[phase]
    assert got == want


def test_basis_widths_by_hand():
    """Two coefficients, range_sq = 12 x energy, so one bit removes nothing (err E, E/9, E/49, E/225 at 1-4 bits)
    and 2 bits of metadata per coded coefficient. Energy 64 and 1, 3 bits an element (6 in all): the first
    coefficient to 2 bits (58.9 removed / 4 bits spent, against 62.7 / 5 for 3 bits), then 3, then 4 bits, spent 6;
    the second never. At 5 bits an element (10): the second takes 2 bits (0.889 / 4 = 0.222) before the first's
    fifth (0.284 - 64/961 = 0.218). The 8-bit cap holds; widths limited to a set step to the next one in it."""
    energy = torch.tensor([[64.0, 1.0]])
    assert bounds.basis_bits(energy, 12 * energy, 3).tolist() == [[4, 0]]
    assert bounds.basis_bits(energy, 12 * energy, 5).tolist() == [[4, 2]]
    assert bounds.basis_bits(torch.tensor([[1e8, 1e8]]), torch.tensor([[1e8, 1e8]]), 20).tolist() == [[8, 8]]
    # widths limited to the store's containers: from 4 bits the next is 8 (4 bits more), taken when it fits
    one, rng = torch.tensor([[64.0]]), torch.tensor([[768.0]])
    assert bounds.basis_bits(one, rng, 9).tolist() == [[7]]  # 2 (+2 metadata), then 3, 4, 5, 6, 7
    assert bounds.basis_bits(one, rng, 9, allowed=(2, 3, 4, 8)).tolist() == [[4]]
    assert bounds.basis_bits(one, rng, 10, allowed=(2, 3, 4, 8)).tolist() == [[8]]


def test_key_basis_is_the_weighed_keys_principal_axes():
    """w: the square root of the query energy per channel (a KV head's query heads and the prompts averaged),
    equal across each rotate_half pair; V: the right singular vectors of the weighed keys of every prompt
    stacked; energy: each coefficient's mean square (the squared singular values / tokens, prompts of equal
    length); range_sq by a recomputation."""
    torch.manual_seed(4)
    keys = [torch.randn(1, 2, 32, 4) * torch.tensor([3.0, 1.0, 0.5, 0.2]) for _ in range(2)]
    queries = [torch.randn(1, 4, 8, 4) for _ in range(2)]
    basis = bounds.key_basis(queries, keys)
    q_energy = torch.cat([q[0] for q in queries], 1).reshape(2, 2, 16, 4).pow(2).mean((1, 2))  # [H, D]
    pair = (q_energy[:, :2] + q_energy[:, 2:]) / 2
    torch.testing.assert_close(basis["w"], torch.cat([pair, pair], -1).sqrt())
    for h in range(2):
        kw = torch.cat([k[0, h] for k in keys]) * basis["w"][h]  # [64, D]
        _, sv, vt = torch.linalg.svd(kw, full_matrices=False)
        torch.testing.assert_close((basis["V"][h].T @ vt.T).abs(), torch.eye(4), atol=1e-4, rtol=0)
        torch.testing.assert_close(basis["energy"][h], sv ** 2 / 64, rtol=1e-4, atol=1e-6)
        c = [(k[0, h] * basis["w"][h]) @ basis["V"][h] for k in keys]
        blocks = [x.reshape(2, 16, 4) for x in c]
        rs = torch.stack([(x.amax(1) - x.amin(1)).pow(2).mean(0) for x in blocks]).mean(0)
        torch.testing.assert_close(basis["range_sq"][h], rs)


def test_allocated_keys_with_8bit_metadata_are_round_9s_coded_form():
    """``scale_step``: at equal widths round 9's 8-bit log scale + int8 zero format (recomputed here: per channel
    per 16-token block, the scale rounded up on a log2 grid of 1/16 so the range and the zero fit, the zero an
    int8 in units of the scale), and the basis reads through it when asked."""
    def coded(x, b, step=1 / 16):
        xb = x.reshape(1, 2, 2, 16, 8)
        lo, hi = xb.amin(3, keepdim=True), xb.amax(3, keepdim=True)
        levels = (1 << b) - 1
        s = ((hi - lo) / levels).clamp_min(1e-6)
        s = torch.exp2(torch.ceil(torch.log2(torch.maximum(s, lo.abs() / 127.5)) / step) * step)
        z = torch.round(lo / s).clamp(-128, 127)
        return ((torch.round(xb / s - z).clamp(0, levels) + z) * s).reshape(x.shape)

    torch.manual_seed(7)
    k = torch.randn(1, 2, 32, 8) * 3
    for b in (2, 3, 4):
        torch.testing.assert_close(bounds.quantize_allocated(k, torch.full((2, 8), b), scale_step=1 / 16), coded(k, b))
    ident = {"w": torch.ones(2, 8), "V": torch.eye(8).expand(2, 8, 8)}
    torch.testing.assert_close(bounds.quantize_in_basis(k, ident, torch.full((2, 8), 3), scale_step=1 / 16),
                               coded(k, 3))


def test_keys_in_a_basis_read_per_coefficient_per_block():
    """The identity basis at equal widths is the store's per-channel keys; any basis is the coefficients
    (k * w) @ V quantised per channel per block and turned back; a 0-bit coefficient is gone from the read."""
    torch.manual_seed(5)
    k = torch.randn(1, 2, 32, 8)
    ident = {"w": torch.ones(2, 8), "V": torch.eye(8).expand(2, 8, 8)}
    for b in (2, 3, 4):
        want = quant.dequantize_keys(*quant.quantize_keys(k, b, 16), b, 16)
        torch.testing.assert_close(bounds.quantize_in_basis(k, ident, torch.full((2, 8), b)), want)
    basis = {"w": torch.rand(2, 8) + 0.5, "V": torch.linalg.qr(torch.randn(2, 8, 8))[0]}
    c = (k * basis["w"][:, None]) @ basis["V"]
    want = quant.dequantize_keys(*quant.quantize_keys(c, 3, 16), 3, 16) @ basis["V"].transpose(-1, -2)
    want = want / basis["w"][:, None]
    torch.testing.assert_close(bounds.quantize_in_basis(k, basis, torch.full((2, 8), 3)), want)
    widths = torch.full((2, 8), 4)
    widths[:, 5] = 0
    got = (bounds.quantize_in_basis(k, basis, widths) * basis["w"][:, None]) @ basis["V"]
    assert got[..., 5].abs().max() < 1e-5 and got[..., 4].abs().max() > 0.1


def test_a_fixed_tail_reads_each_dropped_coefficient_as_its_axis_nearest_level():
    """Round 35's offline format: Lloyd's levels of a two-cluster axis are the clusters' means by hand; with a
    tail, a dropped coefficient reads as its axis' nearest level (coded ones as before), without one as 0; a
    layout's bits an element count its codes, 16 bits of metadata a coded coefficient a block, the tail's."""
    from bench.bench_quant_error import layout_bits

    x = torch.tensor([-2.0, -1.8, -2.2, 3.0, 3.3, 2.7, 3.0, 2.8]).reshape(1, 8, 1)  # [H, N, D]
    torch.testing.assert_close(bounds.tail_levels(x, 1), torch.tensor([[[-2.0, 2.96]]]))
    torch.manual_seed(6)
    k = torch.randn(1, 2, 32, 8)
    basis = {"w": torch.rand(2, 8) + 0.5, "V": torch.linalg.qr(torch.randn(2, 8, 8))[0]}
    c = (k * basis["w"][:, None]) @ basis["V"]
    widths = torch.full((2, 8), 3)
    widths[:, 6:] = 0
    levels = torch.tensor([-0.5, 0.25, 1.0]).expand(2, 8, 3)
    got = (bounds.quantize_in_basis(k, basis, widths, tail=levels) * basis["w"][:, None]) @ basis["V"]
    near = levels[0, 0][(c[..., 6:, None] - levels[0, 0]).abs().argmin(-1)]
    torch.testing.assert_close(got[..., 6:], near, atol=1e-5, rtol=1e-5)
    plain = (bounds.quantize_in_basis(k, basis, widths) * basis["w"][:, None]) @ basis["V"]
    torch.testing.assert_close(got[..., :6], plain[..., :6], atol=1e-5, rtol=1e-5)
    assert plain[..., 6:].abs().max() < 1e-5
    assert layout_bits({8: 2, 4: 6, 3: 16, 2: 16}, 64) == (16 + 24 + 48 + 32 + 40) / 64
    assert layout_bits({8: 2, 4: 6, 3: 16, 2: 16}, 64, 1) == (160 + 24) / 64


def test_keys_basis_prices_keys_at_its_bits_by_hand(monkeypatch):
    """One block of 16 tokens, 3 KV heads, head dim 64: 3-bit keys hold 48 x 64 x 3 / 8 = 1152 code bytes and
    3 x 64 fp16 scales and zeros (768); in a basis at 3 bits an element, 1152 in all (768 less). At 4.5 bits
    against 4: 1536 + 768 - 1728 = 576 less. Other tiers as before."""
    _restored_after_the_test(monkeypatch)
    kw = dict(batch=1, heads=3, head_dim=64, block_size=16, full_itemsize=2, value_group_size=64, b_min=3,
              sparse_threshold=0.25, key_quant="channel", key_group_size=64)
    geo = {n: kw[n] for n in ("batch", "heads", "head_dim", "block_size")}
    assert bounds.key_bytes_in_basis(3.0, 3, **geo) == 768 and bounds.key_bytes_in_basis(4.5, 4, **geo) == 576
    tiers = ((T.INT3, 3), (T.INT4, 4), (T.INT8, 8), (T.FULL, 16))
    before = {t: planner.block_cost_bytes(t, b, 64, **kw) for t, b in tiers}
    per_token = planner.block_cost_bytes(T.INT3, 3, 64, **{**kw, "key_quant": "token"})
    bounds.install_keys_basis({3: 3.0, 4: 4.5}, ["licence-tuning"])
    after = {t: planner.block_cost_bytes(t, b, 64, **kw) for t, b in tiers}
    assert before[T.INT3] - after[T.INT3] == 768 and before[T.INT4] - after[T.INT4] == 576
    assert after[T.INT8] == before[T.INT8] and after[T.FULL] == before[T.FULL]
    assert planner.block_cost_bytes(T.INT3, 3, 64, **{**kw, "key_quant": "token"}) == per_token


@pytest.mark.parametrize("meta8", [False, True])
def test_keys_basis_reads_and_holds_each_quantised_blocks_keys_in_the_calibrated_basis(monkeypatch, meta8):
    """The tiny model at 8x, its basis calibrated on two other prompts (read through the tokenizer): each
    layer's basis is ``key_basis`` of those prompts' queries and keys with RoPE undone, its widths
    ``basis_bits`` at each container's bits; every 3/4-bit block reads its own tokens' exact keys so (RoPE
    undone, quantised in the basis, redone), its values as held; every other part as held; and the bytes held
    are the store's less what its 3/4-bit keys weigh less in the basis, segment by segment. ``meta8``: the widths
    for 1 bit an element of metadata, the coefficients read with 8-bit scales and zeros."""
    from transformers.models.llama.modeling_llama import rotate_half

    from agacc.eval.runner import capture_prefill
    from kernels.format import QUANT

    _restored_after_the_test(monkeypatch)
    model = tiny_model()
    texts, tok = _calibration_texts(["licence-tuning", "code-tuning"], 6)
    unpatched_parts, unpatched_bytes = store.LayerStore.parts, store.LayerStore.nbytes
    key_bits = {3: 2.5, 4: 3.5}
    prompt = bounds.install_keys_basis(key_bits, list(texts), meta8=meta8)
    ids = torch.randint(3, 256, (1, 640))
    table = prompt(model, ids, 320, tok)
    cos, sin = model.model.rotary_emb(torch.zeros(1), torch.arange(640)[None])
    turn = lambda x, at, sign: x * cos[0, at] + sign * rotate_half(x) * sin[0, at]  # noqa: E731
    caps = [capture_prefill(model, i[0].tolist(), n_obs=64) for i in texts.values()]
    for layer, entry in table.items():
        want = bounds.key_basis([turn(c.queries[layer], torch.arange(256, 320), -1) for c in caps],
                                [turn(c.keys[layer], torch.arange(320), -1) for c in caps])
        for name in ("w", "V", "energy", "range_sq"):
            torch.testing.assert_close(entry["basis"][name], want[name])
        for c, b in key_bits.items():
            assert torch.equal(entry[c], bounds.basis_bits(want["energy"], want["range_sq"], b, 1.0 if meta8 else 2.0))
    cache = agacc.CompressedCache(model.config, AGACCConfig.preset("agacc", target_ratio=8.0))
    with torch.inference_mode():
        model(ids, past_key_values=cache)
    cache.end_prefill()
    seen, saved = set(), 0
    for layer in cache.layers:
        s = layer.store
        pos, at = s.entry_positions(), 0
        for held, read in zip(unpatched_parts(s), s.parts()):
            n = held.k.shape[2]
            if held.kind == QUANT and held.key_block and held.container in key_bits:
                where = pos[at:at + n]
                entry = table[layer.layer_idx]
                want = turn(bounds.quantize_in_basis(turn(s._exact[0][:, :, where], where, -1), entry["basis"],
                                                     entry[held.container], held.key_block,
                                                     1 / 16 if meta8 else 0.0), where, 1)
                torch.testing.assert_close(read.k.float(), want.to(s.dtype).float())
                torch.testing.assert_close(read.v.float(), quant.dequantize_part(held)[1].to(s.dtype).float())
                seen.add(held.container)
                saved += n // 16 * bounds.key_bytes_in_basis(key_bits[held.container], held.container, batch=1,
                                                             heads=2, head_dim=32, block_size=16)
            else:
                assert read.kind == held.kind and torch.equal(read.k, held.k) and torch.equal(read.v, held.v)
            at += n
    assert seen and saved > 0
    assert sum(unpatched_bytes(layer.store) - layer.store.nbytes() for layer in cache.layers) == saved


@pytest.mark.parametrize("combine", ["replace", "max"])
def test_lookahead_rescores_the_prompt_before_its_held_evictions(monkeypatch, combine):
    """``--mode lookahead``: at the prompt's end the cache re-plans from the pseudo queries' attention (an eager
    forward over the prompt and the greedy continuation), or from the larger of it and the tracker's evidence over
    their means; then the held evictions are carried out."""
    import bench_ppl

    from agacc.cache import CompressedCache
    from bench import common

    model = tiny_model()
    prompt = torch.randint(3, 200, (1, 320), generator=torch.Generator().manual_seed(0))
    seen = []
    rescore = CompressedCache.rescore_prompt
    monkeypatch.setattr(CompressedCache, "end_prefill", CompressedCache.end_prefill)  # restored after the test
    monkeypatch.setattr(CompressedCache, "__init__", CompressedCache.__init__)  # (the bound pins lookahead=0)
    monkeypatch.setattr(CompressedCache, "rescore_prompt", lambda self, s: seen.append(
        ([l.tracker.raw()[:320].clone() for l in self.layers], s)) or rescore(self, s))

    def measure(model, ids, methods, prefill, *a, **kw):
        cache = CompressedCache(model.config, AGACCConfig.preset("agacc", target_ratio=8.0))
        with torch.inference_mode():
            model(ids[:, :prefill], past_key_values=cache)
            assert cache.held is not None
            model(ids[:, prefill:prefill + 1], past_key_values=cache)  # the first decode step ends the prompt
        return cache

    monkeypatch.setattr(bench_ppl, "measure", measure)
    bounds.install_lookahead(3, combine)
    cache = bench_ppl.measure(model, prompt, [], 319)
    assert cache.held is None and len(seen) == 1
    raws, scores = seen[0]
    t = 319
    ids = common.greedy_continuation(model, prompt[:, :t], 3)
    with torch.inference_mode():
        attn = model(ids, output_attentions=True, use_cache=False).attentions
    for raw, s, a in zip(raws, scores, attn):
        look = a[0, :, t:, :t].float().mean(0).mean(0)
        if combine == "max":
            raw = raw[:t].float()
            look = torch.maximum(raw / raw.mean(), look / look.mean()) * raw.mean()
        torch.testing.assert_close(s, look, rtol=1e-4, atol=1e-6)
