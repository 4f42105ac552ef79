"""KV-Distill (agacc.kv_distill): the pruned cache against a masked full-cache reference, the
selection rule on hand-worked cases, the byte count, and training that lowers its loss."""
import pytest
import torch
from transformers import DynamicCache

from agacc import kv_distill as kd
from tests.helpers import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(layers=3, seed=1)


def _ids(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (n,), generator=g).tolist()


def _record_selection(monkeypatch):
    picked = []
    select = kd.select

    def spy(*args):
        keep = select(*args)
        picked.append(keep)
        return keep

    monkeypatch.setattr(kd, "select", spy)
    return picked


def test_select_hand_worked():
    scores = torch.tensor([[0.0, 0.0, 5.0, 1.0, 9.0, 2.0, 0.0, 0.0, 3.0, 0.0]])
    # 10 tokens at 2x: 5 kept = 1 sink + 1 window + the 3 best of the middle (9, 5, 3)
    keep = kd.select(scores, 2.0, n_sink=1, window=1)
    assert keep[0].nonzero().squeeze(-1).tolist() == [0, 2, 4, 8, 9]
    # a budget below sinks + window keeps those only; a ratio of 1 keeps everything
    assert kd.select(scores, 10.0, 2, 1)[0].nonzero().squeeze(-1).tolist() == [0, 1, 9]
    assert bool(kd.select(scores, 1.0, 1, 1).all())
    with pytest.raises(ValueError, match="ratio"):
        kd.select(scores, 0.5, 1, 1)


def test_keep_all_is_the_plain_cache(model):
    """Ratio 1 and an untrained adapter (B = 0): the continuation's logits are the plain cache's."""
    ids = _ids(80)
    d = kd.KVDistill(model).eval()
    with torch.inference_mode():
        cache, first = kd.compress(model, d, ids[:64], 1.0, dtype=torch.float32)
        got = model(input_ids=torch.tensor([ids[64:]]), past_key_values=cache).logits[0]
        want = model(input_ids=torch.tensor([ids]), past_key_values=DynamicCache()).logits[0]
    torch.testing.assert_close(got, want[64:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(first, want[63], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("ratio", [2.0, 4.0, 7.0])
def test_pruned_cache_equals_masked_full_cache(model, monkeypatch, ratio):
    """Dropped tokens gone, the kept ones at their own positions: a question chunk and then single
    decode steps through the pruned cache give the logits of the full cache with the dropped tokens'
    columns masked out (a trained-looking adapter, so the kept K/V differ from the plain model's)."""
    picked = _record_selection(monkeypatch)
    ids, n, q = _ids(100, seed=2), 77, 9
    d = kd.KVDistill(model, kd.DistillConfig(n_sink=2, window=5)).eval()
    with torch.no_grad():
        for b in d.B.values():
            b.normal_(0, 0.05)
    with torch.inference_mode():
        cache, _ = kd.compress(model, d, ids[:n], ratio, dtype=torch.float32)
        kept = picked[-1][0]
        assert cache.layers[0].keys.shape[2] == int(kept.sum()) == kd.budget(n, ratio, 2, 5)
        got = [model(input_ids=torch.tensor([ids[n:n + q]]), past_key_values=cache).logits[0]]
        for t in range(n + q, len(ids)):
            got.append(model(input_ids=torch.tensor([[ids[t]]]), past_key_values=cache).logits[0])
        got = torch.cat(got)
        # reference: the same compressing forward into a plain cache, then everything after it in one
        # forward whose 4D mask hides the dropped columns
        ref = DynamicCache()
        with d.compressing(model, ratio):
            d.keep = None
            model(input_ids=torch.tensor([ids[:n]]), past_key_values=ref)
        m = len(ids) - n
        allow = torch.zeros(m, n + m, dtype=torch.bool)
        allow[:, :n] = kept
        allow[:, n:] = torch.tril(torch.ones(m, m, dtype=torch.bool))
        mask = torch.zeros(1, 1, m, n + m).masked_fill(~allow, float("-inf"))
        want = model(input_ids=torch.tensor([ids[n:]]), past_key_values=ref, attention_mask=mask).logits[0]
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    assert cache.get_seq_length() == len(ids)


def test_memory_counts_the_kept_tensors(model):
    ids = _ids(96)
    d = kd.KVDistill(model).eval()
    with torch.inference_mode():
        cache, _ = kd.compress(model, d, ids, 4.0)
    mem = cache.memory()
    c = model.config
    per_token = 2 * 2 * c.num_key_value_heads * c.head_dim * c.num_hidden_layers  # K and V, 16 bits
    assert cache.layers[0].keys.dtype == torch.float16
    assert mem["bytes"] == 24 * per_token and mem["bytes_fp16"] == 96 * per_token and mem["tokens"] == 96


def test_training_lowers_the_loss(model):
    """A few steps on one window at 4x: the KL to the full cache falls (selector and adapter both
    move), the model's own weights do not."""
    ids = _ids(120, seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    fresh = kd.KVDistill(model, kd.DistillConfig(n_sink=1, window=4))
    with torch.no_grad():
        loss0 = kd.distill_loss(model, fresh, ids, 96, 4.0).item()
    trained = kd.train(model, [ids], steps=40, n_ctx=96, n_cont=23, ratios=(4,), lr=1e-2,
                       cfg=kd.DistillConfig(n_sink=1, window=4), log=None)
    with torch.no_grad():
        loss1 = kd.distill_loss(model, trained, ids, 96, 4.0).item()
    assert loss1 < 0.7 * loss0, (loss0, loss1)
    assert any(b.abs().sum() > 0 for b in trained.B.values())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_save_load_round_trip(model, tmp_path):
    d = kd.KVDistill(model).eval()
    with torch.no_grad():
        next(iter(d.B.values())).fill_(0.5)
    kd.save(d, tmp_path / "w.pt", {"steps": 1})
    back = kd.load(model, tmp_path / "w.pt")
    assert all(torch.equal(a, b) for a, b in zip(d.state_dict().values(), back.state_dict().values()))
    assert back.meta == {"steps": 1} and back.cfg == d.cfg
    with pytest.raises(FileNotFoundError, match="python -m agacc distill"):
        kd.load(model, tmp_path / "none.pt")


def test_sliding_window_models_are_refused():
    from tests.helpers import COMMON, build

    m = build("MistralConfig", dict(COMMON, sliding_window=16))
    with pytest.raises(ValueError, match="sliding-window"):
        kd.KVDistill(m)
