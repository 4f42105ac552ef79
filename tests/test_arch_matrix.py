"""Architecture matrix (as kvpress tests its presses): tiny random models of every decoder family
agacc supports (2 layers, hidden 64, head dim 16, built from configs: no downloads) x presets x
batch shapes, against transformers' plain ``DynamicCache``.

* lossless (``full``): the same greedy tokens as the plain cache, single / equal batch / beams /
  left-padded batch (each row its own cache, padding never stored), and ``memory()`` prices the
  tokens with the model's real geometry;
* compressing (``agacc`` and ``h2o`` at target ratio 4, ``uniform-int4``): the first token (from the
  exact prefill) equals the plain cache's, the ratio is reached, single / equal batch / beams; in a
  left-padded batch every row gets the tokens, tiers and bytes it gets alone;
* refused architectures (Falcon, MLA, attention sinks): ``enable`` says why, and a
  CompressedCache used without it raises instead of answering wrongly;
* sliding windows: the lossless preset is exact past the window; a compressing sliding layer keeps
  its window (blocks the window passed are dropped, the rest masked by position): with every block
  kept at full precision it gives the plain cache's tokens, one prefill or chunked; every compressing
  preset runs past the window, priced against transformers' own cache.
"""
from __future__ import annotations

import functools

import pytest
import torch
import transformers
from transformers import DynamicCache

import agacc
from agacc import tiers as T
from agacc.cache import AttentionNotEnabledError
from tests.helpers import COMMON, build, two_chunk_logits

transformers.logging.set_verbosity_error()

MHA = {k: v for k, v in COMMON.items() if k != "num_key_value_heads"}
MOE = dict(num_local_experts=4, num_experts_per_tok=2)

# name -> (config class, fields): every architecture the lossless preset serves exactly
SUPPORTED = {
    "llama": ("LlamaConfig", COMMON),
    # one KV head of 32 (of 16, the tracker's ~8 bytes a token a layer would cap agacc near 3.5x at 262 tokens)
    "llama-mqa": ("LlamaConfig", dict(COMMON, num_key_value_heads=1, head_dim=32)),
    "mistral": ("MistralConfig", COMMON),  # sliding window 4096 (longer than every sequence here)
    "qwen2": ("Qwen2Config", COMMON),
    "qwen3": ("Qwen3Config", dict(COMMON, head_dim=16)),
    "qwen3-moe": ("Qwen3MoeConfig", dict(COMMON, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32)),
    "gemma": ("GemmaConfig", dict(COMMON, head_dim=16)),
    "gemma2": ("Gemma2Config", dict(COMMON, head_dim=16)),  # logit softcapping 50, sliding + global layers
    "gemma3": ("Gemma3TextConfig", dict(COMMON, head_dim=16)),  # sliding + global layers, window 4096
    "phi": ("PhiConfig", COMMON),
    "phi3": ("Phi3Config", COMMON),
    "stablelm": ("StableLmConfig", COMMON),
    "starcoder2": ("Starcoder2Config", COMMON),
    "gpt-neox": ("GPTNeoXConfig", MHA),
    "olmo2": ("Olmo2Config", COMMON),
    "cohere": ("CohereConfig", COMMON),
    "granitemoe": ("GraniteMoeConfig", dict(COMMON, **MOE)),
    "mixtral": ("MixtralConfig", dict(COMMON, **MOE)),
    "gpt2": ("GPT2Config", dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=1024, pad_token_id=0,
                                bos_token_id=1, eos_token_id=2)),
}

# name -> (config class, fields, what enable() says)
REFUSED = {
    "falcon": ("FalconConfig", MHA, "AttentionInterface"),
    "deepseek-v3": ("DeepseekV3Config", dict(COMMON, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                                             qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                                             num_experts_per_tok=2, moe_intermediate_size=32, n_group=1,
                                             topk_group=1), "latent attention"),
    "gpt-oss": ("GptOssConfig", dict(COMMON, head_dim=16, **MOE), "sinks"),
}

COMPRESSING = {"agacc": dict(target_ratio=4.0), "h2o": dict(target_ratio=4.0), "uniform-int4": {}}
SHORT, LONG, NEW = 64, 256, 6  # prompt tokens (lossless, compressing) and new tokens


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes: one intra-op thread is ~50x faster than two on a shared CPU (no spin-waiting)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@functools.lru_cache(maxsize=None)
def model(arch: str):
    return agacc.enable(build(*SUPPORTED[arch]))


def prompts(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


def run(m, ids, cache, mask=None, beams=1, n_new=NEW):
    with torch.inference_mode():
        return m.generate(input_ids=ids, attention_mask=torch.ones_like(ids) if mask is None else mask,
                          past_key_values=cache, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                          num_beams=beams, pad_token_id=0)


def batch_of(mode: str, n: int):
    """(ids, mask, beams) of a batch mode: single, equal batch of 2, 2 beams, left-padded batch of 2."""
    ids = prompts(1 if mode in ("single", "beams") else 2, n)
    mask = None
    if mode == "padded":
        mask = torch.ones_like(ids)
        mask[1, : n // 4] = 0
        ids = ids.masked_fill(mask == 0, 0)
    return ids, mask, 2 if mode == "beams" else 1


@pytest.mark.parametrize("mode", ["single", "batch", "beams", "padded"])
@pytest.mark.parametrize("arch", list(SUPPORTED))
def test_lossless_equals_plain_cache(arch, mode):
    m = model(arch)
    ids, mask, beams = batch_of(mode, SHORT)
    ref = run(m, ids, DynamicCache(config=m.config), mask, beams)
    cache = agacc.CompressedCache(m.config, agacc.AGACCConfig.preset("full"))
    out = run(m, ids, cache, mask, beams)
    assert torch.equal(out, ref), (out, ref)
    # memory() prices the tokens with the model's real geometry: the fp32 store is twice the 16-bit bytes;
    # a padded batch's rows hold their own tokens only (no padding)
    caches = cache.rows if mode == "padded" else [cache]
    held = sum(l.store.hot_k.nbytes + l.store.hot_v.nbytes for c in caches for l in c.layers)
    assert cache.memory()["bytes_fp16"] * 2 == held
    if mode == "padded":
        assert [c.seq_len for c in caches] == [int(n) + NEW - 1 for n in mask.sum(1)]


@pytest.mark.parametrize("mode", ["single", "batch", "beams"])
@pytest.mark.parametrize("preset", list(COMPRESSING))
@pytest.mark.parametrize("arch", list(SUPPORTED))
def test_compressing_preset_reaches_its_ratio(arch, preset, mode):
    m = model(arch)
    ids, mask, beams = batch_of(mode, LONG)
    cfg = agacc.AGACCConfig.preset(preset, **COMPRESSING[preset])
    cache = agacc.CompressedCache(m.config, cfg)
    out = run(m, ids, cache, mask, beams)
    assert out.shape == (ids.shape[0], LONG + NEW)
    if mode == "single":  # the prefill is exact: the first new token is the plain cache's
        ref = run(m, ids, DynamicCache(config=m.config), n_new=1)
        assert torch.equal(out[:, : LONG + 1], ref)
    ratio = cache.memory()["ratio"]
    if cfg.target_ratio is not None:
        assert cfg.target_ratio * 0.95 <= ratio <= cfg.target_ratio * 1.3, ratio
    else:  # uniform-int4: every block out of the recent window is int4
        st = cache.layers[0].store
        assert st.n_blocks == st.n_ready_blocks() > 0 and bool((st.block_tier == T.INT4).all())
        assert ratio > 1.7, ratio


@pytest.mark.parametrize("preset", list(COMPRESSING))
@pytest.mark.parametrize("arch", list(SUPPORTED))
def test_compressing_preset_serves_a_padded_batch_row_by_row(arch, preset):
    """A left-padded batch: each row gets the tokens, tiers and bytes it gets alone (a cache of its own,
    padding never stored, scored or counted); the batch's memory is the rows' sum."""
    m = model(arch)
    ids, mask, _ = batch_of("padded", LONG)
    cfg = agacc.AGACCConfig.preset(preset, **COMPRESSING[preset])
    cache = agacc.CompressedCache(m.config, cfg)
    out = run(m, ids, cache, mask)
    assert cache.get_seq_length() == LONG + NEW - 1 and len(cache.rows) == 2
    for r in range(2):
        alone = agacc.CompressedCache(m.config, cfg)
        ref = run(m, ids[r:r + 1, mask[r].bool()], alone)
        assert torch.equal(out[r, -NEW:], ref[0, -NEW:])
        row = cache.rows[r]
        assert row.seq_len == alone.seq_len == int(mask[r].sum()) + NEW - 1
        for a, b in zip(row.layers, alone.layers):
            assert torch.equal(a.store.block_tier, b.store.block_tier) and torch.equal(a.store.block_bits, b.store.block_bits)
        assert row.memory()["bytes"] == alone.memory()["bytes"]
    mem = cache.memory()
    assert mem["bytes"] == sum(r.memory()["bytes"] for r in cache.rows)
    assert mem["bytes_fp16"] == sum(r.memory()["bytes_fp16"] for r in cache.rows)


@pytest.mark.parametrize("beams,chunk", [(2, None), (1, 32)])
def test_a_padded_batch_with_beams_or_a_chunked_prefill(beams, chunk):
    """Beam search over a padded batch (the rows' caches reordered and copied with their beams), and a
    chunked prefill whose first chunks hold nothing but a row's padding: each row as alone.
    (markers=True: in a padded batch every beam is a row with its own plan, while a lone prompt's beams
    share one cache and one plan, so with beams "as alone" is not the same computation; this case's
    tokens agree with markers, and without them the sixth token of row 0 differs.)"""
    m = model("llama")
    ids, mask, _ = batch_of("padded", LONG)  # row 1: 64 tokens of padding, two whole chunks of 32
    cfg = agacc.AGACCConfig.preset("agacc", target_ratio=4.0, markers=True)

    def gen(ids, mask, cache):
        with torch.inference_mode():
            return m.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=NEW,
                              min_new_tokens=NEW, do_sample=False, num_beams=beams, pad_token_id=0,
                              prefill_chunk_size=chunk)

    cache = agacc.CompressedCache(m.config, cfg)
    out = gen(ids, mask, cache)
    assert len(cache.rows) == 2 * beams
    for r in range(2):
        real = ids[r:r + 1, mask[r].bool()]
        alone = agacc.CompressedCache(m.config, cfg)
        assert torch.equal(out[r, -NEW:], gen(real, torch.ones_like(real), alone)[0, -NEW:])
        if beams == 1:
            for a, b in zip(cache.rows[r].layers, alone.layers):
                assert torch.equal(a.store.block_tier, b.store.block_tier)


def test_padding_after_the_first_prompt_is_refused():
    m = model("llama")
    cache = agacc.CompressedCache(m.config, agacc.AGACCConfig.preset("agacc", target_ratio=4.0))
    ids = prompts(2, LONG)
    run(m, ids, cache)  # an equal batch: one shared layout
    n = cache.get_seq_length()
    mask = torch.ones(2, n + 8, dtype=torch.long)
    mask[1, n:n + 4] = 0  # padding in a second turn
    with pytest.raises(ValueError, match="padded batch.*already holds tokens"), torch.inference_mode():
        m(prompts(2, 8), attention_mask=mask, past_key_values=cache)


@pytest.mark.parametrize("arch", list(REFUSED))
def test_refused_architecture_says_why(arch):
    cls_name, fields, why = REFUSED[arch]
    m = build(cls_name, fields)
    with pytest.raises(ValueError, match=why):
        agacc.enable(m)
    assert m.config._attn_implementation != "agacc"
    # without enable(): refused when the cache is made, or when the model reads it -- never a wrong answer
    with pytest.raises((ValueError, AttentionNotEnabledError), match="agacc.enable|cannot serve"):
        run(m, prompts(1, 16), agacc.CompressedCache(m.config, agacc.AGACCConfig.preset("full")), n_new=3)


SLIDING = {"mistral-swa": ("MistralConfig", dict(COMMON, sliding_window=32)),
           "gemma3-swa": ("Gemma3TextConfig", dict(COMMON, head_dim=16, sliding_window=32)),
           "gemma2-swa": ("Gemma2Config", dict(COMMON, head_dim=16, sliding_window=32))}  # sliding + global


@functools.lru_cache(maxsize=None)
def sliding(arch: str):
    return agacc.enable(build(*SLIDING[arch]))


@pytest.mark.parametrize("arch", list(SLIDING))
def test_sliding_window_lossless_is_exact_past_the_window(arch):
    m = sliding(arch)
    ids = prompts(1, 48)  # longer than the window
    assert torch.equal(run(m, ids, agacc.CompressedCache(m.config, agacc.AGACCConfig.preset("full"))),
                       run(m, ids, DynamicCache(config=m.config)))
    out, ref = two_chunk_logits(m, ids)  # the second chunk reads the window through the mask
    assert torch.allclose(out, ref, atol=1e-4, rtol=0)


# a compressing preset whose thresholds keep every block at full precision: lossless except for what a
# sliding layer's window has passed, which it drops (no marker) -- so it must give the plain cache's tokens
ALL_FULL = dict(tau_h=1e-9, tau_l=5e-10, tau_e=0.0, block_size=8, recent_window=8)


@pytest.mark.parametrize("chunk", [None, 24])
@pytest.mark.parametrize("arch", list(SLIDING))
def test_a_compressing_sliding_layer_keeps_exactly_its_window(arch, chunk):
    """Past the window (100-token prompt, window 32), one prefill or chunks of 24: the plain cache's
    tokens, a sliding layer holding at most its window + a block + the recent window, and a 16-bit
    reference priced as transformers' own cache holds the tokens (a sliding layer: its last window - 1)."""
    m = sliding(arch)
    ids = prompts(1, 100)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12, do_sample=False,
              pad_token_id=0, prefill_chunk_size=chunk)
    with torch.inference_mode():
        plain = DynamicCache(config=m.config)
        ref = m.generate(ids, past_key_values=plain, **kw)
        cache = agacc.CompressedCache(m.config, agacc.AGACCConfig.preset("agacc", **ALL_FULL))
        out = m.generate(ids, past_key_values=cache, **kw)
    assert torch.equal(out, ref)
    windows = agacc.planner.sliding_windows(m.config)
    for layer, w in zip(cache.layers, windows):
        if w is not None:
            assert layer.store.n_entries <= w + 8 + 8 and layer.store.markers.n == 0
    assert any(w is not None for w in windows)
    assert cache.memory()["bytes_fp16"] == sum(l.keys.numel() * 2 * 2 for l in plain.layers)


@pytest.mark.parametrize("preset", list(COMPRESSING))
@pytest.mark.parametrize("arch", list(SLIDING))
def test_compressing_presets_run_past_the_window(arch, preset):
    """Every compressing preset past the window (window 256, 600-token prompt): the exact prefill's first
    token, the bytes reference of transformers' own cache (its sliding layers hold their window), sliding
    layers bounded, the target ratio (within 10%: a sliding layer's recent window is a fifth of it here)
    or, uniform-int4, compression, and a replay of the history that gives the cache's tiers."""
    from agacc.trace import replay_frames

    cls_name, fields = SLIDING[arch]
    m = agacc.enable(build(cls_name, dict(fields, sliding_window=256)))
    ids = prompts(1, 600)
    cfg = agacc.AGACCConfig.preset(preset, **COMPRESSING[preset])
    cache = agacc.CompressedCache(m.config, cfg, record_history=True)
    plain = DynamicCache(config=m.config)
    out, ref = run(m, ids, cache), run(m, ids, plain)
    assert torch.equal(out[:, :601], ref[:, :601])
    windows = agacc.planner.sliding_windows(m.config)
    for layer, w in zip(cache.layers, windows):
        if w is not None:
            assert layer.store.n_entries <= w + cfg.block_size + cfg.recent_window
    mem = cache.memory()
    assert mem["bytes_fp16"] == sum(l.keys.numel() * 2 * 2 for l in plain.layers)
    assert mem["ratio"] >= (0.9 * cfg.target_ratio if cfg.target_ratio else 1.3), mem["ratio"]
    frame = replay_frames(cache.history, cfg, cache._geometry())[-1]  # tokens since are hot in the snapshot
    assert frame["tier"] == [t[:len(f)] for t, f in zip(cache.snapshot()["tier"], frame["tier"])]
    assert frame["bytes_fp16"] == cache.history[-1]["bytes_fp16"]
