import math

import pytest
import torch

from agacc import quant
from agacc import tiers as T
from agacc.attention import attend
from agacc.config import AGACCConfig
from agacc.decode import _codes_t, decode_attention
from agacc.planner import block_cost_bytes, marker_cost_bytes
from agacc.store import LayerStore, narrow_hot
from tests.helpers import walk_tensor_bytes

D = 64


def make_store(n_tokens=16 * 12 + 5, batch=1, heads=3, host_copy=False, dtype=torch.float16, **cfg_kw):
    cfg = AGACCConfig(**{"block_size": 16, "recent_window": 16, "host_copy": host_copy, "b_min": 2, **cfg_kw})
    st = LayerStore(cfg, torch.device("cpu"), dtype)
    torch.manual_seed(0)
    k = torch.randn(batch, heads, n_tokens, D)
    v = torch.randn(batch, heads, n_tokens, D)
    st.append(k, v)
    return st, k, v


MIXED = dict(
    tier=[T.FULL, T.INT8, T.INT3, T.INT2, T.PRUNED, T.EVICTED, T.EVICTED, T.INT4, T.INT2, T.PRUNED, T.INT8],
    bits=[16, 8, 3, 2, 2, 0, 0, 4, 2, 2, 6],
    keep=[64, 64, 64, 64, 16, 0, 0, 64, 64, 56, 64],
)


def apply(st, tier, bits, keep):
    return st.apply_tiers(torch.tensor(tier), torch.tensor(bits), torch.tensor(keep), torch.rand(st.seq_len) + 0.1)


def test_nbytes_equals_independent_walk():
    st, _, _ = make_store()
    apply(st, **MIXED)
    st.token_layout()
    assert st.nbytes() == walk_tensor_bytes(st)
    assert st.n_entries == (11 - 2) * 16 + 1 + (st.seq_len - st.hot_start)  # one marker for blocks 5-6


@pytest.mark.parametrize("key_quant", ["token", "channel"])
def test_packed_storage_is_the_size_it_claims(key_quant):
    st, _, _ = make_store(key_quant=key_quant, key_group_size=32)
    apply(st, [T.INT4] * 11, [4] * 11, [64] * 11)
    q = st.quant[4]
    n = 11 * 16
    assert q.k.nbytes == 3 * n * D // 2 and q.v.nbytes == 3 * n * D // 2  # two 4-bit codes per byte
    if key_quant == "token":
        assert q.k_scale.nbytes == 3 * n * (D // 32) * 2  # fp16 per token per 32 channels
    else:
        assert q.k_scale.nbytes == 3 * 11 * D * 2  # fp16 per channel per block
    assert q.v_scale.nbytes == 3 * n * 1 * 2  # fp16 per token per 64 channels
    apply(st, [T.INT3] * 11, [3] * 11, [64] * 11)
    assert st.quant[3].k.nbytes == 3 * n * D * 3 // 8 and st.quant[4].n_blocks == 0  # 3 bits per code
    apply(st, [T.INT2] * 11, [2] * 11, [64] * 11)
    assert st.quant[2].k.nbytes == 3 * n * D // 4 and st.quant[3].n_blocks == 0
    with pytest.raises(ValueError, match="tier int4 holds 4-bit container codes, got 3-bit"):
        apply(st, [T.INT4] * 11, [3] * 11, [64] * 11)  # 3-bit codes belong to the int3 tier
    with pytest.raises(ValueError, match="tier pruned holds 3-bit container codes, got 2-bit"):
        apply(make_store(b_min=3)[0], [T.PRUNED] * 11, [2] * 11, [32] * 11)  # pruned codes: b_min's container


@pytest.mark.parametrize("key_quant,rotate", [("token", True), ("token", False), ("channel", True), ("channel", False)])
def test_quantised_blocks_read_back_within_the_code_error(key_quant, rotate):
    """A QuantSegment gives back (un-rotated) K and V within its quantisation error: at 8 bits every
    element within 2 * (range / 255) of the original, and 4 bits about 16x noisier than 8."""
    st, k, v = make_store(key_quant=key_quant, rotate=rotate)
    apply(st, [T.INT8] * 11, [8] * 11, [64] * 11)
    n = 11 * 16
    k8, v8 = st.quant[8].read_blocks(torch.arange(11))
    step = 2 * (2 * 4.5) / 255  # |randn| < 4.5 here; rotated values stay in the same range
    assert (k8 - k[:, :, :n]).abs().max() < step and (v8 - v[:, :, :n]).abs().max() < step
    st4, _, _ = make_store(key_quant=key_quant, rotate=rotate)
    apply(st4, [T.INT4] * 11, [4] * 11, [64] * 11)
    k4, v4 = st4.quant[4].read_blocks(torch.arange(11))
    assert 8 < (k4 - k[:, :, :n]).norm() / (k8 - k[:, :, :n]).norm() < 32
    assert 8 < (v4 - v[:, :, :n]).norm() / (v8 - v[:, :, :n]).norm() < 32


@pytest.mark.parametrize("batched", [False, True])
def test_a_nested_4_bit_block_cut_to_3_bits_holds_what_3_bits_straight_would(batched):
    """``nested_values``: a block quantised at 4 bits and then cut to 3 holds the values a 3-bit block quantised
    from the exact K/V holds (near-ties aside); without it the cut quantises the 4-bit reconstruction again and
    carries both errors. ``batched``: through ``apply_plans`` (several layers' moves at once) instead of
    ``apply_tiers``."""
    from agacc.store import apply_plans

    def values(nested, path):
        st, _, v = make_store(b_min=3, nested_values=nested)
        for t, b in path:
            if batched:
                apply_plans([st], torch.tensor([[t] * 11]), torch.tensor([[b] * 11]), torch.tensor([[64] * 11]),
                            lambda _: torch.rand(st.seq_len) + 0.1)
            else:
                apply(st, [t] * 11, [b] * 11, [64] * 11)
        seg = st.quant[3]
        assert seg.n_blocks == 11 and st.quant[4].n_blocks == 0
        return quant.unpack(seg.v, 3).int(), seg.read_blocks(torch.arange(11))[1], v[:, :, :11 * 16]

    codes, straight, v = values(True, [(T.INT3, 3)])
    nested_codes, nested, _ = values(True, [(T.INT4, 4), (T.INT3, 3)])
    _, cut, _ = values(False, [(T.INT4, 4), (T.INT3, 3)])
    diff = (nested_codes - codes).abs()  # (of the rotated values)
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.005
    err = lambda x: float((x - v).norm())
    assert err(cut) > 1.04 * err(straight) and err(nested) < 1.005 * err(straight)  # cut: +6% here


@pytest.mark.parametrize("key_quant,key_group", [("token", 64), ("token", 16), ("channel", 64)])
def test_cost_model_matches_held_bytes(key_quant, key_group):
    for tier, bits, keep in [(T.FULL, 16, 64), (T.INT8, 8, 64), (T.INT4, 4, 64), (T.INT3, 3, 64), (T.INT2, 2, 64),
                             (T.PRUNED, 2, 16), (T.PRUNED, 2, 56)]:
        st, _, _ = make_store(n_tokens=16 * 3 + 16, key_quant=key_quant, key_group_size=key_group)
        before = st.nbytes() - (st.hot_k.nbytes + st.hot_v.nbytes)
        apply(st, [tier] * 3, [bits] * 3, [keep] * 3)
        held = st.nbytes() - st.hot_k.nbytes - st.hot_v.nbytes - before
        cost = 3 * block_cost_bytes(tier, bits, keep, batch=1, heads=3, head_dim=D, block_size=16, full_itemsize=2,
                                    value_group_size=64, b_min=2, sparse_threshold=0.25,
                                    key_quant=key_quant, key_group_size=key_group)
        assert held == cost, (tier, bits, keep)


@pytest.mark.parametrize("rotate", [False, True])
def test_a_narrowed_hot_region_holds_8_bit_codes_and_reads_back_by_hand(rotate):
    """``hot_bits=8``: ``narrow_hot`` holds the hot tokens as one byte an element plus an fp16 (scale, zero) per
    token per group of G channels, min-max (worked here by hand, not through ``quant``; with ``rotate`` of the
    Hadamard-rotated vectors, turned back as read); later tokens stay exact
    until the next narrowing; blocks leave the hot region as it reads back; ``truncate`` spans both; every count
    of the hot bytes agrees (held, walked, ``planner.hot_bytes``)."""
    from agacc.planner import Geometry, hot_bytes

    st, k, v = make_store(n_tokens=40, hot_bits=8, value_group_size=32, rotate=rotate)
    narrow_hot([st])
    turn = quant.rotate if rotate else (lambda x: x)
    g = turn(k.half().float()).reshape(1, 3, 40, 2, 32)  # as held before: the store dtype
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / 255).half().float()
    zero = lo.half().float()
    want = turn((((g - zero) / scale).round().clamp(0, 255) * scale + zero).reshape(1, 3, 40, D)).half()
    assert torch.equal(st.hot_k, want)
    assert (st.hot_k.float() - k).abs().max() <= scale.max() / 2 * (8 if rotate else 1) + 1e-2  # codes', fp16's
    geo = Geometry(1, 3, D)
    assert st.bytes_by_tier()["hot"] == 2 * 3 * 40 * (D + 2 * 2 * 2) == hot_bytes(st.cfg, geo, 40)
    assert st.nbytes() == walk_tensor_bytes(st)
    # fresh tokens after it: exact, after the narrowed ones
    k2, v2 = torch.randn(1, 3, 5, D), torch.randn(1, 3, 5, D)
    st.append(k2, v2)
    assert st.hot_k.shape[2] == 45 and torch.equal(st.hot_v[:, :, 40:], v2.half())
    assert st.bytes_by_tier()["hot"] == hot_bytes(st.cfg, geo, 40) + 2 * 3 * 5 * D * 2
    st.truncate(43)  # drops 2 fresh tokens
    assert st.seq_len == 43 and torch.equal(st.hot_k[:, :, 40:], k2[:, :, :3].half())
    st.truncate(36)  # and into the narrowed ones
    assert st.hot_k.shape[2] == 36 and torch.equal(st.hot_k, want[:, :, :36]) and st.nbytes() == walk_tensor_bytes(st)
    before = st.hot_k.clone()
    apply(st, [T.FULL], [16], [64])  # block 0 leaves the hot region as it reads back
    assert torch.equal(st.full.k, before[:, :, :16]) and torch.equal(st.hot_k, before[:, :, 16:])
    assert st.bytes_by_tier()["hot"] == hot_bytes(st.cfg, geo, 20) and st.nbytes() == walk_tensor_bytes(st)


def test_eviction_frees_bytes_and_leaves_one_marker_per_run():
    st, _, _ = make_store()
    apply(st, [T.FULL] * 11, [16] * 11, [64] * 11)
    full_bytes = st.nbytes()
    apply(st, [T.FULL, T.EVICTED, T.EVICTED, T.FULL, T.EVICTED] + [T.FULL] * 6, [16, 0, 0, 16, 0] + [16] * 6,
          [64, 0, 0, 64, 0] + [64] * 6)
    assert st.markers.n == 2 and st.markers.span.tolist() == [[1, 2], [4, 4]]
    freed = full_bytes - st.nbytes()
    per_block = 2 * 3 * 16 * D * 2
    marker = marker_cost_bytes(batch=1, heads=3, head_dim=D, full_itemsize=2)
    assert freed == 3 * per_block + 3 * 4 - 2 * marker  # 3 blocks (K/V + ids) out, 2 markers in
    assert math.isclose(float(st.markers.log_count[0]), math.log(32), rel_tol=1e-6)


def test_marker_keeps_the_span_share_of_attention():
    """A span of near-identical keys: full attention vs the span replaced by its marker."""
    torch.manual_seed(1)
    heads, B = 2, 16
    cfg = AGACCConfig(block_size=B, recent_window=16, n_sink=0)
    st = LayerStore(cfg, "cpu", torch.float32)
    k = torch.randn(1, heads, 80, D)
    v = torch.randn(1, heads, 80, D)
    k[:, :, 16:48] = k[:, :, 16:17] + 0.01 * torch.randn(1, heads, 32, D)  # blocks 1-2: one repeated key
    st.append(k, v)
    q = torch.randn(1, heads, 1, D) + 0.1 * k[:, :, 16:17]  # the span gets ~40% of the attention
    out_full, mass_full = attend(q, st.attention_entries(torch.float32), D ** -0.5)
    span_share = float(mass_full[16:48].sum())
    st.apply_tiers(torch.tensor([T.FULL, T.EVICTED, T.EVICTED, T.FULL]), torch.tensor([16, 0, 0, 16]),
                   torch.tensor([64, 0, 0, 64]), torch.ones(80))
    out_m, mass_m = attend(q, st.attention_entries(torch.float32), D ** -0.5)
    marker_share = float(mass_m[32])  # entries: full blocks 0, 3 (32) then the marker, then hot
    assert 0.3 < span_share < 0.6
    assert abs(marker_share - span_share) < 0.01 * span_share + 1e-4
    assert torch.allclose(out_m, out_full, atol=0.02)
    # without the log(count) bias the marker would get ~1/32 of the span's share
    st.markers.log_count.zero_()
    _, mass_nob = attend(q, st.attention_entries(torch.float32), D ** -0.5)
    assert float(mass_nob[32]) < 0.5 * span_share


def test_repromotion_from_host_copy_is_exact():
    st, k, v = make_store(host_copy=True, dtype=torch.float32)
    apply(st, [T.INT2] * 11, [2] * 11, [64] * 11)
    assert st.host_nbytes() == 11 * 16 * 3 * D * 4 * 2
    apply(st, [T.EVICTED] * 5 + [T.INT2] * 6, [0] * 5 + [2] * 6, [0] * 5 + [64] * 6)
    apply(st, [T.FULL] * 11, [16] * 11, [64] * 11)
    assert st.markers.n == 0
    assert torch.equal(st.full.k, k[:, :, :176]) and torch.equal(st.full.v, v[:, :, :176])


def test_without_host_copy_blocks_only_lose_fidelity():
    st, _, _ = make_store()
    apply(st, [T.INT4] * 11, [4] * 11, [64] * 11)
    tier, bits, _ = apply(st, [T.FULL] * 5 + [T.INT2] * 6, [16] * 5 + [2] * 6, [64] * 11)
    assert tier.tolist() == [T.INT4] * 5 + [T.INT2] * 6 and bits.tolist() == [4] * 5 + [2] * 6


@pytest.mark.parametrize("key_quant,rotate", [("token", True), ("token", False), ("channel", True), ("channel", False)])
@pytest.mark.parametrize("group", [64, 16])
@pytest.mark.parametrize("batch,heads,q_heads", [(1, 3, 9), (2, 2, 2), (1, 1, 4)])
def test_packed_decode_path_equals_reference(monkeypatch, group, batch, heads, q_heads, key_quant, rotate):
    """The PyTorch path of agacc.decode (the "torch" backend) == attend over the dequantised entries."""
    monkeypatch.setenv("AGACC_CPU_KERNEL", "0")
    monkeypatch.delenv("AGACC_FORCE_TRITON", raising=False)
    st, _, _ = make_store(batch=batch, heads=heads, value_group_size=group, key_group_size=group,
                          key_quant=key_quant, rotate=rotate)
    apply(st, **MIXED)
    q = torch.randn(batch, q_heads, 1, D)
    ref_out, ref_mass = attend(q, st.attention_entries(torch.float32), 0.125)
    out, mass = decode_attention(q, st, 0.125)
    assert torch.allclose(out, ref_out, atol=1e-5) and torch.allclose(mass, ref_mass, atol=1e-6)
    assert math.isclose(float(mass.sum()), 1.0, rel_tol=1e-5)


def test_parts_describe_the_store_in_attention_order():
    """parts(): full, int8, int4, int3, int2, sparse, markers (with their log-count bias), hot; their
    entries add up to n_entries and attention_entries is each part dequantised, in the same order."""
    st, _, _ = make_store(key_quant="token", key_group_size=16, rotate=True)
    apply(st, **MIXED)
    parts = st.parts()
    assert [(p.kind, p.container) for p in parts] == [("dense", 0), ("quant", 8), ("quant", 4), ("quant", 3),
                                                      ("quant", 2), ("sparse", 2), ("dense", 0), ("dense", 0)]
    assert sum(p.n for p in parts) == st.n_entries
    full, q8, sp, mk, hot = parts[0], parts[1], parts[5], parts[6], parts[7]
    assert full.k is st.full.k and mk.bias is st.markers.log_count and hot.k is st.hot_k and hot.bias is None
    assert q8.k is st.quant[8].k and q8.rotated and q8.key_block == 0 and q8.key_group == 16 and q8.value_group == 64
    assert sp.keep == 16 and sp.code_bits == 2 and sp.k_map is st.sparse[16].k_map
    entries = st.attention_entries(torch.float32)
    assert len(entries) == len(parts)
    for e, p in zip(entries, parts):
        k, v = quant.dequantize_part(p)
        assert torch.equal(e.k, k) and torch.equal(e.v, v) and (e.bias is p.bias)
    st2, _, _ = make_store(key_quant="channel", rotate=False)  # keys per channel per block
    apply(st2, [T.INT4] * 11, [4] * 11, [64] * 11)
    q4 = st2.parts()[0]
    assert q4.key_block == 16 and q4.key_group == 0 and not q4.rotated


@pytest.mark.parametrize("container", [2, 3, 4, 8])
def test_cpu_unpack_is_the_transpose_of_the_reference_unpack(container):
    """decode._codes_t (transposed, all tokens at once) == quant.unpack (row by row), channels in order."""
    torch.manual_seed(container)
    codes = torch.randint(0, 1 << container, (2, 3, 37, 64), dtype=torch.uint8)
    packed = quant.pack(codes, container)
    assert torch.equal(_codes_t(packed, container), quant.unpack(packed, container).float().transpose(-1, -2))


def test_token_mass_maps_entries_back_to_tokens():
    """Entry mass in attention order -> token mass, checked against a token-by-token construction:
    a tiered entry is its token, a marker's mass is spread evenly over its span, hot by position."""
    st, _, _ = make_store()
    apply(st, **MIXED)
    B, n = st.B, st.seq_len
    mass = torch.rand(st.n_entries)
    want = torch.zeros(n)
    pos = 0
    for seg in [s for s in st.segments if s.n_blocks]:
        for b in seg.block_ids.tolist():
            for t in range(b * B, (b + 1) * B):
                want[t] += mass[pos]
                pos += 1
    for first, last in st.markers.span.tolist():
        span = range(first * B, (last + 1) * B)
        for t in span:
            want[t] += mass[pos] / len(span)
        pos += 1
    for t in range(st.hot_start, n):
        want[t] += mass[pos]
        pos += 1
    assert pos == st.n_entries and st.markers.n == 1
    torch.testing.assert_close(st.token_mass(mass), want)
    assert st.token_layout().nbytes == 4 * (11 - 2)  # one int32 per tiered block, nothing per token


@pytest.mark.parametrize("scoring", ["ema", "decay", "sum"])
def test_window_kept_per_entry_equals_mapping_every_step(scoring):
    """The tracker sums decode-step mass per store entry and maps it to tokens once, at the
    re-evaluation; the importance must equal that of mapping every step to tokens (the layout only
    grows at the end between re-evaluations: one new hot entry per step)."""
    from agacc.importance import ImportanceTracker

    st, _, _ = make_store()
    apply(st, **MIXED)
    cfg = AGACCConfig(scoring=scoring, n_r=4, n_w=8)
    per_entry, per_token = ImportanceTracker(cfg), ImportanceTracker(cfg)
    g = torch.Generator().manual_seed(2)
    for step in range(4):
        st.append(torch.randn(1, 3, 1, D), torch.randn(1, 3, 1, D))
        mass = torch.rand(st.n_entries, generator=g).to(torch.bfloat16).float()  # bf16-exact, O(1) per entry
        per_entry.observe(mass)
        per_token.observe(st.token_mass(mass))
    per_entry.update(st.token_mass)
    per_token.update()
    # bf16 sums of 4 steps: ~0.5% apart at most; a one-entry misalignment moves tokens by O(1)
    torch.testing.assert_close(per_entry.importance, per_token.importance, rtol=1e-2, atol=1e-3)
    assert per_entry.window.numel() == 0 and per_entry.importance.numel() == st.seq_len


def test_ema_means_the_last_n_w_steps_and_holds_only_what_the_next_mean_needs():
    """alpha 0.5, N_r 2, N_w 4, per-token mass a, b, c in three windows of two steps: I after each
    re-evaluation is 0.5 * (mean over the last 4 steps) + 0.5 * I, by hand; between re-evaluations the
    tracker holds one window's sum (N_w - N_r steps), not two."""
    from agacc.importance import ImportanceTracker

    tr = ImportanceTracker(AGACCConfig(scoring="ema", alpha=0.5, n_r=2, n_w=4))
    a, b, c = torch.tensor([0.5, 0.25]), torch.tensor([0.125, 0.625]), torch.tensor([0.75, 0.0])
    want = torch.zeros(2)
    for m, s in [(a, a), (b, (a + b) / 2), (c, (b + c) / 2)]:  # s: mean per step over <= 4 steps
        tr.observe(m)
        tr.observe(m)
        tr.update()
        want = 0.5 * s + 0.5 * want
        torch.testing.assert_close(tr.importance, want)
        assert len(tr.chunks) == 1 and tr.chunks[0][1] == 2
    assert tr.nbytes() == 2 * 4 + 2 * 2  # fp32 importance + one bf16 two-step sum per token


@pytest.mark.parametrize("rule", [
    dict(scoring="ema", decode_evidence="max", evidence_half_life=6.0), dict(scoring="ema", prompt_evidence="max"),
    dict(scoring="ema", prompt_evidence="last"), dict(scoring="ema", prompt_evidence="fold"), dict(scoring="decay"),
    dict(scoring="sum")])
def test_a_forgotten_blocks_largest_and_summed_importance_decay_as_its_tokens_would(rule):
    """Two trackers see the same prompt chunks and decode windows, one forgetting blocks 1 and 3 (evicted
    after the first chunk: no attention since), one keeping every token's state. Once the window sums
    postdate the eviction the blocks are forgotten (4 bytes a token and 2 a window sum fewer, 12 a block
    more), and at every step the kept tokens' I_i are the same, as are each forgotten block's largest I_i
    and its sum; the first token holds the largest; ``truncate`` and ``set_raw`` keep the layout (``set_raw``
    leaves forgotten blocks as they are)."""
    from agacc.importance import ImportanceTracker

    B = 4
    cfg = AGACCConfig(block_size=B, n_r=2, n_w=4, markers=False, **rule)
    tr, ref = ImportanceTracker(cfg), ImportanceTracker(cfg)
    g = torch.Generator().manual_seed(0)
    gone = torch.zeros(24, dtype=torch.bool)
    gone[B:2 * B] = gone[3 * B:4 * B] = True

    def same():
        got, want = tr.raw(), ref.raw()
        assert got.numel() == want.numel()
        torch.testing.assert_close(got[~gone[: got.numel()]], want[~gone[: got.numel()]], rtol=1e-6, atol=0)
        for b in (1, 3):
            blk_got, blk_want = got[b * B:(b + 1) * B], want[b * B:(b + 1) * B]
            torch.testing.assert_close(blk_got.sum(), blk_want.sum(), rtol=1e-5, atol=1e-12)
            if b in tr.gone.tolist():
                torch.testing.assert_close(blk_got[0], blk_want.max(), rtol=1e-6, atol=0)

    def both(fn):
        fn(tr)
        fn(ref)
        same()

    first = torch.rand(16, generator=g) + 0.1
    both(lambda t: t.init_prefill(first))
    tr.forget(torch.tensor([1, 3]))
    assert tr.gone.tolist() == [1, 3] and tr.pending == []  # no window sum held: forgotten at once
    for n, steps in [(20, 0), (20, 2), (22, 2), (24, 2)]:
        if steps == 0:  # a prompt chunk: the evicted tokens get no attention
            mass = (torch.rand(n, generator=g) + 0.1) * ~gone[:n]
            both(lambda t: t.init_prefill(mass))
            continue
        for _ in range(steps):
            mass = (torch.rand(n, generator=g) + 0.1) * ~gone[:n]
            tr.observe(mass)  # per token (every token's slot: ``update()`` maps it to the held ones)
            ref.observe(mass)
        both(lambda t: t.update())
        tr.forget(torch.tensor([1, 3]))
    held = 24 - 2 * B
    assert tr.importance.numel() == held and all(c.numel() <= held for c, _ in tr.chunks)
    chunk_bytes = sum(c.nbytes for c, _ in ref.chunks) - sum(c.nbytes for c, _ in tr.chunks)
    assert ref.nbytes() - tr.nbytes() == 2 * B * 4 + chunk_bytes - 2 * 12
    if cfg.scoring == "ema":
        assert chunk_bytes == 2 * B * 2 * len(tr.chunks)
    tr.truncate(22)
    ref.truncate(22)
    gone = gone[:22]
    same()
    before, s = tr.raw(), torch.rand(18, generator=g)
    tr.set_raw(s)
    ref.set_raw(s)
    got = tr.raw()
    assert torch.equal(got[~gone], ref.raw()[~gone]) and torch.equal(got[gone], before[gone])  # (forgotten: stay so)


def test_decode_max_keeps_the_strongest_window_fading_by_its_half_life_by_hand():
    """decode_evidence="max", half-life 4 steps, N_r 2, N_w 4, windows a, b, c of two steps each: I after
    each re-evaluation is max(mean over the last 4 steps, 2^(-2/4) I) (a window of two steps fades I by
    2^-0.5), by hand; an infinite half-life keeps the running maximum."""
    from agacc.importance import ImportanceTracker

    a, b, c = torch.tensor([0.5, 0.25]), torch.tensor([0.125, 0.625]), torch.tensor([0.0, 0.0])
    for half_life, fade in ((4.0, 2 ** -0.5), (float("inf"), 1.0)):
        tr = ImportanceTracker(AGACCConfig(scoring="ema", decode_evidence="max", evidence_half_life=half_life,
                                           n_r=2, n_w=4))
        want = torch.zeros(2)
        for m, s in [(a, a), (b, (a + b) / 2), (c, (b + c) / 2)]:
            tr.observe(m)
            tr.observe(m)
            tr.update()
            want = torch.maximum(s, fade * want)
            torch.testing.assert_close(tr.importance, want)
    # the running maximum: a = [0.5, 0.25], then (a + b) / 2 = [0.3125, 0.4375], then (b + c) / 2 =
    # [0.0625, 0.3125]: [0.5, 0.4375] (the EMA with alpha 0.5 would leave [0.1719, 0.2969])
    torch.testing.assert_close(tr.importance, torch.tensor([0.5, 0.4375]))
    with pytest.raises(ValueError, match="evidence_half_life must be > 0"):
        AGACCConfig(evidence_half_life=0.0)
    # None (the default): 182 steps up to a fitted 4x and without a target, 91 above (round 28); a value given is kept
    from agacc.importance import fold_decode, half_life

    for ratio, h in ((None, 182.0), (4.0, 182.0), (4.5, 91.0), (8.0, 91.0)):
        cfg = AGACCConfig.preset("agacc", target_ratio=ratio)
        assert half_life(cfg) == h
        torch.testing.assert_close(fold_decode(cfg, torch.zeros(2), torch.ones(2), int(h)), torch.full((2,), 0.5))
    assert half_life(AGACCConfig.preset("agacc", target_ratio=8.0, evidence_half_life=300.0)) == 300.0
    with pytest.raises(ValueError, match="decode_evidence must be one of"):
        AGACCConfig(decode_evidence="sum")


def test_packed_blocks_hold_their_largest_and_summed_importance_through_every_fold():
    """``config.block_state``: two trackers see the same prompt chunks and decode windows, one holding blocks 0-2
    packed after the first chunk (then 0-3). At every step the tokens held one by one are the same, each packed
    block's largest I_i is its tokens' largest in the other (a decaying maximum's block maximum folds as one
    value), and its sum is its read-back tokens folded (``spread``: the largest first, the rest shared), by hand;
    ``update_all`` folds as ``update``; 8 bytes a packed block instead of 4 a token; ``set_raw`` and ``truncate``
    keep the layout."""
    from agacc.importance import ImportanceTracker, fold_decode, spread, update_all

    B = 4
    cfg = AGACCConfig(block_size=B, n_r=2, n_w=2, markers=False, decode_evidence="max", evidence_half_life=6.0,
                      block_state=True)
    with pytest.raises(ValueError, match="block_state needs decode_evidence='max', n_w == n_r"):
        cfg.with_overrides(decode_evidence="ema", n_w=4)
    g = torch.Generator().manual_seed(0)
    tr, ref = [ImportanceTracker(cfg) for _ in range(2)], [ImportanceTracker(cfg.with_overrides(block_state=False))
                                                          for _ in range(2)]

    def same(n_packed):
        for t, r in zip(tr, ref):
            got, want = t.raw(), r.raw()
            k = n_packed * B
            assert got.numel() == want.numel() and t.n_packed == n_packed and t.importance.numel() == got.numel() - k
            torch.testing.assert_close(got[k:], want[k:], rtol=0, atol=0)
            torch.testing.assert_close(got[:k].view(-1, B).amax(1), want[:k].view(-1, B).amax(1), rtol=0, atol=0)
            assert t.nbytes() == r.nbytes() - n_packed * (4 * B - 8)

    first = torch.rand(14, generator=g)
    for t in tr + ref:
        t.init_prefill(first)
    for t in tr:
        t.pack(3)
    same(3)
    second = torch.rand(20, generator=g)  # a second prompt chunk folds into the packed blocks too
    for t in tr + ref:
        t.init_prefill(second)
    same(3)
    for window, n_packed in enumerate([3, 4, 4]):
        for _ in range(2):
            masses = [torch.rand(20 + window, generator=g) for _ in tr]
            for t, r, m in zip(tr, ref, masses):
                t.observe(m)
                r.observe(m)
        before = [(t.packed_max.clone(), t.packed_sum.clone()) for t in tr]
        s_i = [t.window.float()[: t.n_packed * B] / 2 for t in tr]  # the window's mean over its 2 steps
        if window == 1:
            update_all(tr, [None, None])
            update_all(ref, [None, None])
        else:
            for t in tr + ref:
                t.update()
        for t, (mx, sm), s in zip(tr, before, s_i):  # by hand: the read-back tokens folded
            want = fold_decode(cfg, s, spread(mx, sm, B), 2).view(-1, B)
            torch.testing.assert_close(t.packed_sum, want.sum(1), rtol=1e-6, atol=0)
            torch.testing.assert_close(t.packed_max, want.amax(1), rtol=0, atol=0)
        for t in tr:
            t.pack(n_packed)
        same(n_packed)
    scores = torch.rand(17, generator=g)  # every packed block's tokens (a block partly set keeps the rest read back)
    for t in tr + ref:
        t.set_raw(scores)
    same(4)
    for t in tr + ref:
        t.truncate(18)
    same(4)


@pytest.mark.parametrize("evidence", ["ema", "max"])
def test_update_all_folds_every_layer_as_update_does(evidence):
    """``update_all`` (all layers at once) leaves every tracker as its own ``update`` would, for both rules."""
    from agacc.importance import ImportanceTracker, update_all

    cfg = AGACCConfig(scoring="ema", decode_evidence=evidence, evidence_half_life=6.0, n_r=3, n_w=6)
    g = torch.Generator().manual_seed(3)
    batched = [ImportanceTracker(cfg) for _ in range(3)]
    single = [ImportanceTracker(cfg) for _ in range(3)]
    for window in range(4):
        n = 5 + window
        for tb, ts in zip(batched, single):
            for _ in range(3):
                m = torch.rand(n, generator=g).to(torch.bfloat16).float()
                tb.observe(m)
                ts.observe(m)
        update_all(batched, [None] * 3)
        for ts in single:
            ts.update()
        for tb, ts in zip(batched, single):
            torch.testing.assert_close(tb.importance, ts.importance)


@pytest.mark.parametrize("evidence", ["fold", "last", "max"])
def test_prompt_chunks_combine_their_evidence_by_hand(evidence):
    """Two prompt chunks' observation windows, S = a (4 tokens) then b (6 tokens), by hand:
    fold = alpha * b + (1 - alpha) * a on the old tokens and b on the new ones; last = b;
    max = the elementwise max of b and (1 - alpha) * a (a padded with zeros)."""
    from agacc.importance import ImportanceTracker

    tr = ImportanceTracker(AGACCConfig(scoring="ema", alpha=0.25, prompt_evidence=evidence))
    a = torch.tensor([0.5, 0.1, 0.2, 0.2])
    b = torch.tensor([0.05, 0.3, 0.1, 0.05, 0.3, 0.2])
    tr.init_prefill(a)
    torch.testing.assert_close(tr.importance, a)  # the first chunk: every rule starts from its window
    tr.init_prefill(b)
    a6 = torch.cat([a, torch.zeros(2)])
    want = {"fold": torch.cat([0.25 * b[:4] + 0.75 * a, b[4:]]), "last": b, "max": torch.maximum(0.75 * a6, b)}[evidence]
    torch.testing.assert_close(tr.importance, want)


def test_value_weight_scales_importance_by_the_value_norm_by_hand():
    """I^_i x (||v_i|| / mean ||v||)^v, then divided by its mean; v = 0 leaves attention alone."""
    from agacc.importance import ImportanceTracker, scores_all

    mass = torch.tensor([0.4, 0.1, 0.3, 0.2])
    v = torch.zeros(1, 2, 4, 3)
    v[0, 0, :, 0] = torch.tensor([1.0, 2.0, 3.0, 2.0])  # head 0's norms; head 1 has the same, on another channel
    v[0, 1, :, 2] = torch.tensor([-1.0, 2.0, 3.0, -2.0])
    trackers = []
    for weight in (1.0, 0.5, 0.0):
        tr = ImportanceTracker(AGACCConfig(value_weight=weight))
        tr.init_prefill(mass)
        tr.add_values(v)
        trackers.append(tr)
    norms = torch.tensor([1.0, 2.0, 3.0, 2.0])
    for tr, weight in zip(trackers, (1.0, 0.5, 0.0)):
        raw = mass * (norms / norms.mean()) ** weight
        assert torch.allclose(tr.scores(4, 4), raw / raw.mean())
    # by hand at v = 1: mass x norm / 2 = [0.2, 0.1, 0.45, 0.2], mean 0.2375
    assert torch.allclose(trackers[0].scores(4, 4), torch.tensor([0.2, 0.1, 0.45, 0.2]) / 0.2375)
    same = [ImportanceTracker(trackers[0].cfg) for _ in range(2)]
    for tr, m in zip(same, (mass, mass.flip(0))):
        tr.init_prefill(m)
        tr.add_values(v)
    assert torch.allclose(scores_all(same, 4, 4), torch.stack([t.scores(4, 4) for t in same]))
    assert trackers[0].nbytes() == trackers[2].nbytes() + 4 * 4  # the norms are counted


def test_value_weight_in_the_cache_counts_its_norms_and_survives_a_crop():
    from transformers import LlamaConfig

    from agacc import CompressedCache

    config = LlamaConfig(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, hidden_size=32,
                         head_dim=16)
    cache = CompressedCache(config, AGACCConfig(value_weight=1.0))
    k = torch.randn(1, 1, 40, 16)
    for layer in range(2):
        cache.update(k, 3 * k, layer)
    tr = cache.layers[0].tracker
    assert torch.allclose(tr.value_norm, (3 * k)[0, 0].norm(dim=-1))
    cache.layers[0].truncate(36)
    assert tr.value_norm.numel() == 36
