"""On the embedded SmolLM2-135M-Instruct (converted once, cached in ~/.cache/agacc)."""
import json
import subprocess
import sys

import pytest
import torch

import agacc
from agacc.config import AGACCConfig


@pytest.fixture(scope="module")
def model_tok():
    return agacc.load_model()


def chat(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)


def test_embedded_model_shape(model_tok):
    model, _ = model_tok
    c = model.config
    assert (c.num_hidden_layers, c.num_key_value_heads, c.num_attention_heads) == (30, 3, 9)
    assert model.config._attn_implementation == "agacc"


def test_full_preset_is_token_for_token_the_plain_model(model_tok):
    model, tok = model_tok
    inputs = chat(tok, "Write two sentences about the sea and the wind.")
    kw = dict(max_new_tokens=40, do_sample=False)
    with torch.inference_mode():
        ref = model.generate(**inputs, **kw)
        out = model.generate(**inputs, past_key_values=agacc.CompressedCache(model.config, AGACCConfig.preset("full")), **kw)
        beam_ref = model.generate(**inputs, max_new_tokens=12, num_beams=2, do_sample=False)
        beam = model.generate(**inputs, max_new_tokens=12, num_beams=2, do_sample=False,
                              past_key_values=agacc.CompressedCache(model.config, AGACCConfig.preset("full")))
    assert torch.equal(out, ref)
    assert torch.equal(beam, beam_ref)


def test_agacc_compresses_a_long_prompt_and_still_answers(model_tok):
    """Passkey retrieval over ~1.25K tokens: the plain model answers; AGACC must too at > 3x.

    (Uniform 2-bit at a similar ratio gets this one wrong, which is what makes it a test.)
    """
    model, tok = model_tok
    filler = " ".join(["The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."] * 25)
    text = f"{filler} The pass key is 48213. Remember it. {filler}\nWhat is the pass key? Answer with the number only."
    inputs = chat(tok, text)
    n = inputs["input_ids"].shape[1]
    cache = agacc.CompressedCache(model.config, AGACCConfig.preset("agacc"))
    with torch.inference_mode():
        ref = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=12, do_sample=False)
    assert "48213" in tok.decode(ref[0, n:])
    mem = cache.memory()
    assert mem["ratio"] > 3.0, mem
    answer = tok.decode(out[0, n:])
    assert "48213" in answer, answer


def test_cli_generate_json_and_errors():
    cmd = [sys.executable, "-m", "agacc", "generate", "--prompt", "Say hello.", "--max-new-tokens", "8", "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rec = json.loads(res.stdout)
    assert rec["new_tokens"] <= 8 and rec["memory"]["bytes"] > 0 and rec["text"]
    bad = subprocess.run(cmd[:-1] + ["--set", "tau_l=500"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "tau_h > tau_l" in bad.stderr


def test_two_processes_converting_at_once_both_load(tmp_path):
    """Two fresh starts at once both convert the GGUF: the second to finish keeps the first one's
    copy (``models.publish``) instead of failing with 'Directory not empty'; a rename that fails for
    another reason still raises."""
    from agacc.models import publish

    def converted(name, text):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(text)
        return d

    target = tmp_path / "model"
    publish(converted("model.tmp1", "first"), target)
    publish(converted("model.tmp2", "second"), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (target / "config.json").read_text() == "first"
    (target / "config.json").rename(target / "half")  # not a finished conversion: not ours to keep
    with pytest.raises(OSError):
        publish(converted("model.tmp3", "third"), target)
