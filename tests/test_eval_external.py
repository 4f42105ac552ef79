"""External methods in the eval harness: transformers' ``QuantizedCache`` (``hf-quantized:quanto-4|2``,
``hf-quantized:hqq-4|2``). The byte walk is checked against a hand count on the tiny Llama of
tests/test_eval.py; the CLI runs them beside the presets, reports a missing backend as "skipped: ...",
and refuses unknown names with the list of valid ones."""
import json

import pytest
import torch

from tests.test_eval import loaded, tiny_model  # noqa: F401 (module-scoped fixtures)

# the tiny Llama: 2 layers, 2 KV heads, head dim 16, fp32, batch 1
LAYERS, HEADS, HEAD_DIM, FP32 = 2, 2, 16, 4


def _hand_count(quantized_tokens: int, residual_tokens: int, nbits: int, group: int = 64) -> tuple[int, int]:
    """(bytes held, bytes of a 16-bit cache) by hand: per layer, K and V each hold their quantised codes
    (values x nbits / 8), one fp32 scale and one fp32 zero point / shift per group of ``group`` values,
    and the residual tokens in fp32."""
    values = quantized_tokens * HEADS * HEAD_DIM  # per tensor (K or V) per layer
    per_tensor = values * nbits // 8 + (values // group) * 2 * FP32
    residual = residual_tokens * HEADS * HEAD_DIM * FP32
    held = LAYERS * 2 * (per_tensor + residual)
    fp16 = LAYERS * 2 * (quantized_tokens + residual_tokens) * HEADS * HEAD_DIM * 2
    return held, fp16


@pytest.mark.parametrize("variant", ["quanto-4", "quanto-2", "hqq-4", "hqq-2"])
def test_quantized_cache_bytes_match_a_hand_count(loaded, variant):
    from agacc.eval.external import parse_external

    model, _ = loaded
    _, method = parse_external(f"hf-quantized:{variant},residual_length=32")
    assert method.unavailable() is None, method.unavailable()  # a dev requirement: installed wherever tests run
    ids = torch.randint(3, 300, (1, 200), generator=torch.Generator().manual_seed(0))
    cache = method.new_cache(model)
    with torch.inference_mode():
        model(ids, past_key_values=cache)
        mem = method.memory(cache)
        assert (mem["bytes"], mem["bytes_fp16"]) == _hand_count(200, 0, method.nbits)  # the prefill: all quantised
        for _ in range(5):
            model(ids[:, :1], past_key_values=cache)
        mem = method.memory(cache)
        assert (mem["bytes"], mem["bytes_fp16"]) == _hand_count(200, 5, method.nbits)
        assert mem["residual_bytes"] == LAYERS * 2 * 5 * HEADS * HEAD_DIM * FP32 and mem["tokens"] == 205
        for _ in range(35):  # the residual fills at 32 tokens: everything re-quantised, then 8 more
            model(ids[:, :1], past_key_values=cache)
        mem = method.memory(cache)
        assert (mem["bytes"], mem["bytes_fp16"]) == _hand_count(232, 8, method.nbits)


def test_byte_walk_counts_each_storage_once():
    from agacc.eval.external import tensors_nbytes

    a = torch.zeros(10, 8)  # 320 bytes
    assert tensors_nbytes([a, a[2:5], (a.t(), {"x": a})]) == 320  # views hold the one storage
    assert tensors_nbytes([a, torch.zeros(3, dtype=torch.uint8), torch.tensor([])]) == 323


def test_cli_runs_quantized_cache_beside_the_presets(tiny_model, tmp_path, capsys, monkeypatch):
    from agacc.eval import external
    from agacc.eval.cli import main

    out = tmp_path / "q.json"
    # q_group_size=32: this model's K/V rows are 2 heads x 16 = 32 values (the default 64 needs an even
    # token count, see below)
    quanto, hqq = "hf-quantized:quanto-4,q_group_size=32", "hf-quantized:hqq-2,q_group_size=32"
    rc = main(["passkey", "--model", tiny_model, "--preset", "full", quanto, hqq,
               "--ratio", "4", "--context-tokens", "256", "--samples", "2", "--json", str(out), "--no-progress"])
    assert rc == 0
    recs = {r["preset"]: r for r in json.loads(out.read_text())}
    for name, bits in ((quanto, 4), (hqq, 2)):
        r = recs[name]
        assert not r.get("skipped"), r.get("skipped")
        assert r["config"]["nbits"] == bits and r["ratio_target"] is None  # --ratio does not move a fixed-bit cache
        assert r["ratio"] == pytest.approx(r["kv_bytes_fp16"] / r["kv_bytes"], rel=1e-3)
    # the hand count (groups of 32 here): per token held, u = layers x (K, V) x values per token; P prompt
    # tokens quantised (nbits/8 + two fp32 per 32 values = 0.25 bytes a value), the answer's T - P in the
    # fp32 residual. Each backend's bytes, solved for P, must give the same prompt on the same tokens
    # (quanto holds 64 bytes beyond the count here: 0.15 of a token; a count off by one bit a value
    # would move P by tens of tokens)
    u = LAYERS * 2 * HEADS * HEAD_DIM
    q, h = recs[quanto], recs[hqq]
    assert q["kv_bytes_fp16"] == h["kv_bytes_fp16"]  # the same tokens
    t = q["kv_bytes_fp16"] / (2 * u)
    p_q, p_h = ((r["kv_bytes"] / u - 4 * t) / (bits / 8 + 0.25 - 4) for r, bits in ((q, 4), (h, 2)))
    assert p_q == pytest.approx(p_h, abs=0.25)
    assert 0 < t - p_h < 32  # every prompt token quantised, the answer's few in the residual
    capsys.readouterr()

    # the library itself failing on a sample (as quanto does with its default groups of 64 values when
    # this model's 32 values per token come in an odd number of tokens): that method's row says so,
    # the others are scored
    def boom(self, model):
        raise ValueError("Group size (64) must be a divisor of (7968)")

    with monkeypatch.context() as m:
        m.setattr(external.HFQuantized, "new_cache", boom)
        out1 = tmp_path / "odd.json"
        assert main(["passkey", "--model", tiny_model, "--preset", "full", "hf-quantized:quanto-4", "--context-tokens",
                     "256", "--samples", "1", "--json", str(out1), "--no-progress"]) == 0
    full, failed = json.loads(out1.read_text())
    assert full["score"] is not None and failed["score"] is None
    assert failed["skipped"] == "skipped: hf-quantized:quanto-4 raised ValueError: Group size (64) must be a divisor of (7968)"
    capsys.readouterr()

    # a backend that cannot be imported: a "skipped" row naming the install, never a failed run
    monkeypatch.setitem(external.HF_PACKAGES, "hqq", ("no_such_module_xyz", "hqq==0.2.8.post1"))
    out2 = tmp_path / "skip.json"
    assert main(["needle", "--model", tiny_model, "--preset", "full", "hf-quantized:hqq-4", "--context-tokens", "256",
                 "--samples", "1", "--protocol", "query-agnostic", "--json", str(out2), "--no-progress"]) == 0
    full, skipped = json.loads(out2.read_text())
    assert full["score"] is not None and skipped["score"] is None and "pip install hqq" in skipped["skipped"]
    assert "skipped: no_such_module_xyz is not installed" in capsys.readouterr().out

    assert main(["passkey", "--model", tiny_model, "--preset", "hf-quantized:quanto-3"]) == 2
    assert "hf-quantized:quanto-4" in capsys.readouterr().err
    assert main(["passkey", "--model", tiny_model, "--preset", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'nope'" in err and "hf-quantized:hqq-2" in err and "agacc" in err
    assert main(["passkey", "--model", tiny_model, "--preset", "hf-quantized:quanto-4@4"]) == 2
    assert main(["passkey", "--model", tiny_model, "--preset", "hf-quantized:quanto-4,tau_h=3"]) == 2
