"""``block_bands``: a prompt chunk's tokens are grouped into blocks of tokens scored alike, not of neighbours.

Checked against references: a store that keeps every block at full precision gives the plain cache's
logits with the rows reordered (attention does not depend on entry order; a lost or doubled row would
show), the rows are the chunk's tokens band by band, each band in position order (recovered by matching
each stored key with the plain cache's; the bands by hand in ``test_band_order_by_hand``), and the tracker's state follows its rows, through decode
steps too, against the same run unsorted.
"""
import pytest
import torch
from transformers import DynamicCache

import agacc
from agacc.cache import band_order
from agacc.config import AGACCConfig
from agacc.tiers import FULL
from tests.helpers import COMMON, build, tiny_model

PROMPT, SPLIT, DECODE = 300, 150, 24


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(layers=2)


def keep_all(bands: int) -> AGACCConfig:
    """Every block at full precision (scores are >= 0, tau_h below any positive one), the sinks too."""
    return AGACCConfig.preset("agacc", tau_h=1e-30, tau_l=1e-31, tau_e=0.0, sink_bits=16, recent_window=16,
                              block_bands=bands, layer_calibration="none", store_dtype="model")


def run(model, ids, cache):
    """Two prompt chunks, then teacher-forced decode steps -> logits [1, DECODE + 1, V]."""
    with torch.inference_mode():
        model(ids[:, :SPLIT], past_key_values=cache)
        rows = [model(ids[:, SPLIT:PROMPT], past_key_values=cache).logits[:, -1]]
        for t in range(PROMPT, PROMPT + DECODE):
            rows.append(model(ids[:, t:t + 1], past_key_values=cache).logits[:, -1])
    return torch.stack(rows, 1)


def positions_of_rows(store, plain_keys: torch.Tensor) -> torch.Tensor:
    """The token position of every tiered row of a full-precision store, found by matching its key with
    the plain cache's keys [1, H, n, D] -> int64 [n_blocks * B]."""
    B = store.B
    k = store.full.k[0]                                  # [H, rows, D], blocks in block_ids order
    ids = store.full.block_ids.tolist()
    rows = torch.empty(len(ids) * B, dtype=torch.long)
    ref = plain_keys[0].to(k.dtype)                      # [H, n, D]
    for slot, b in enumerate(ids):
        for j in range(B):
            d = (ref - k[:, slot * B + j][:, None]).abs().amax((0, 2))   # [n]
            pos = int(d.argmin())
            assert float(d[pos]) < 1e-5 and int((d < 1e-3).sum()) == 1, "a stored row matches no single token's key"
            rows[b * B + j] = pos
    return rows


def test_band_order_by_hand():
    s = torch.tensor([[0.0, 5, 0, 0, 0, 0, 0, 3]])  # max-pooled over 3: 5 5 5 0 0 0 3 3
    assert band_order(s, 2).tolist() == [[0, 1, 2, 6, 3, 4, 5, 7]]  # best four (0, 1, 2, 6), then the rest
    assert band_order(s, 8).tolist() == [[0, 1, 2, 6, 7, 3, 4, 5]]  # one band a token: a full sort (stable)
    assert band_order(s, 1).tolist() == [list(range(8))]


def test_banded_rows_are_a_permutation_of_each_chunk_and_logits_equal_the_plain_cache(tiny):
    ids = torch.randint(0, 256, (1, PROMPT + DECODE), generator=torch.Generator().manual_seed(3))
    plain = DynamicCache(config=tiny.config)
    want = run(tiny, ids, plain)
    sorted_cache, unsorted = agacc.CompressedCache(tiny.config, keep_all(4)), agacc.CompressedCache(tiny.config, keep_all(0))
    got, same = run(tiny, ids, sorted_cache), run(tiny, ids, unsorted)
    assert torch.allclose(got, want, atol=1e-4, rtol=0)
    assert torch.allclose(same, want, atol=1e-4, rtol=0)
    B, sink = 16, 16
    first_span = (SPLIT - 16) // B * B                    # chunk 1: rows [16, 128) left the hot region banded
    for layer, (s, u) in enumerate(zip(sorted_cache.layers, unsorted.layers)):
        st = s.store
        assert bool((st.block_tier == FULL).all())
        pos = positions_of_rows(st, plain.layers[layer].keys)
        n = pos.numel()
        assert sorted(pos.tolist()) == list(range(n)), "rows lost or doubled"
        assert pos[:sink].tolist() == list(range(sink))  # the sink block stays
        assert pos.tolist() != list(range(n)), "nothing was regrouped"
        # every regrouped span is its own tokens, in the order of their pooled scores (non-increasing)
        spans = [(sink, first_span), (first_span, (PROMPT - 16) // B * B)]
        for a, b in spans:
            assert sorted(pos[a:b].tolist()) == list(range(a, b))
        # decode blocks (one at a time) stay in position order
        tail = pos[(PROMPT - 16) // B * B:]
        assert tail.tolist() == sorted(tail.tolist())
        # the tracker's state went with its rows: row r holds what the unsorted run holds for its token
        imp_s, imp_u = s.tracker.importance[:n], u.tracker.importance[:n]
        assert torch.allclose(imp_s, imp_u[pos], rtol=1e-4, atol=1e-7)
    # the second span's rows are ``band_order`` of its tokens' scores at the re-evaluation that ended chunk 2,
    # recomputed from the unsorted run's evidence then (position order there; all scores divide by one mean)
    cfg = keep_all(4)
    with torch.inference_mode():
        probe = agacc.CompressedCache(tiny.config, keep_all(0))
        tiny(ids[:, :SPLIT], past_key_values=probe)
        tiny(ids[:, SPLIT:PROMPT], past_key_values=probe)
        check = agacc.CompressedCache(tiny.config, cfg)
        tiny(ids[:, :SPLIT], past_key_values=check)
        tiny(ids[:, SPLIT:PROMPT], past_key_values=check)
    a, b = first_span, (PROMPT - 16) // B * B
    for layer in range(len(check.layers)):
        pos = positions_of_rows(check.layers[layer].store, plain.layers[layer].keys)[a:b]
        imp = probe.layers[layer].tracker.importance[a:b]
        assert (pos - a).tolist() == band_order(imp[None], 4)[0].tolist()


def test_block_bands_refuses_what_needs_positions():
    with pytest.raises(ValueError, match="block_bands"):
        AGACCConfig.preset("agacc", block_bands=4, position_norm="power")
    with pytest.raises(ValueError, match="block_bands"):
        AGACCConfig.preset("agacc", block_bands=4, context_probe="reconstruct")
    with pytest.raises(ValueError, match="block_bands"):
        AGACCConfig.preset("agacc", block_bands=65)
    model = build("MistralConfig", dict(COMMON, sliding_window=32))
    with pytest.raises(ValueError, match="sliding-window"):
        agacc.CompressedCache(model.config, AGACCConfig.preset("agacc", block_bands=4))
    agacc.CompressedCache(model.config, AGACCConfig.preset("agacc"))  # without bands: served


def test_tracker_permute_moves_every_per_token_state():
    from agacc.importance import ImportanceTracker

    cfg = AGACCConfig.preset("agacc", value_weight=1.0)
    tr = ImportanceTracker(cfg)
    tr.init_prefill(torch.arange(10, dtype=torch.float32))
    tr.add_values(torch.arange(10, dtype=torch.float32).view(1, 1, 10, 1))
    tr.chunks = [(torch.arange(8, dtype=torch.bfloat16), 4)]  # shorter than the span's end: padded with zeros
    tr.permute(4, torch.tensor([5, 0, 3, 1, 2, 4]))
    assert tr.importance.tolist() == [0, 1, 2, 3, 9, 4, 7, 5, 6, 8]
    assert tr.value_norm.tolist() == [0, 1, 2, 3, 9, 4, 7, 5, 6, 8]
    assert tr.chunks[0][0].float().tolist() == [0, 1, 2, 3, 0, 4, 7, 5, 6, 0]


def test_views_that_place_blocks_by_position_refuse_banded_caches(tiny):
    from agacc.trace import TRACE_FORMAT, TRACE_VERSION, Trace

    cache = agacc.CompressedCache(tiny.config, AGACCConfig.preset("agacc", block_bands=4))
    with torch.inference_mode():
        tiny(torch.randint(0, 256, (1, 80)), past_key_values=cache)
    with pytest.raises(ValueError, match="block_bands=0"):
        cache.snapshot()
    plain = agacc.CompressedCache(tiny.config, AGACCConfig.preset("agacc"))
    with torch.inference_mode():
        tiny(torch.randint(0, 256, (1, 80)), past_key_values=plain)
    assert plain.snapshot()["seq_len"] == 80
    d = {"format": TRACE_FORMAT, "version": TRACE_VERSION, "frames": [], "history": [],
         "meta": {"config": AGACCConfig.preset("agacc", block_bands=4).to_dict(), "geometry": {}}}
    with pytest.raises(ValueError, match="block_bands=0"):
        Trace.from_dict(d)


def test_position_indexed_inputs_are_refused(tiny):
    from bench import bounds

    cache = agacc.CompressedCache(tiny.config, AGACCConfig.preset("agacc", block_bands=4))
    with pytest.raises(ValueError, match="block_bands=0"):
        cache.rescore_prompt([torch.ones(8)] * 2)
    with pytest.raises(SystemExit, match="block_bands=0"):
        bounds.main(["--mode", "oracle", "agacc@8,block_bands=4"])
