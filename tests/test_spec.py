"""The method grammar NAME[@RATIO][,key=value]... (agacc/spec.py) against hand-built configs."""
from __future__ import annotations

import pytest

from agacc.config import AGACCConfig
from agacc.spec import method_label, parse_method, parse_methods, split_method


@pytest.mark.parametrize("spec, want", [
    ("agacc", AGACCConfig.preset("agacc")),
    ("full", AGACCConfig.preset("full")),
    ("agacc@4", AGACCConfig.preset("agacc", target_ratio=4.0)),
    ("agacc@2.5", AGACCConfig.preset("agacc", target_ratio=2.5)),
    ("h2o@4,recent_window=32", AGACCConfig.preset("h2o", target_ratio=4.0, recent_window=32)),
    ("agacc,tau_h=6,markers=false", AGACCConfig.preset("agacc", tau_h=6.0, markers=False)),
    ("attention-sum,position_norm=power,p_max=0.5", AGACCConfig.preset("attention-sum", position_norm="power", p_max=0.5)),
    ("dynacompress,c_max=0.5,block_size=8", AGACCConfig.preset("dynacompress", c_max=0.5, block_size=8)),
    ("agacc,target_ratio=3", AGACCConfig.preset("agacc", target_ratio=3.0)),
    ("fastkv@4,tsp_layer=1", AGACCConfig.preset("fastkv", target_ratio=4.0, tsp_layer=1)),
    ("snapkv,tsp_layer=none", AGACCConfig.preset("snapkv", tsp_layer=None)),
    ("uniform-int4", AGACCConfig.preset("uniform-int4")),
    (" agacc @ 4 , tau_h = 6 ", AGACCConfig.preset("agacc", target_ratio=4.0, tau_h=6.0)),
])
def test_parse_method_equals_hand_built(spec, want):
    got = parse_method(spec)
    assert got == want
    assert got.name == want.name


def test_types_follow_the_fields():
    cfg = parse_method("agacc,n_q=16,alpha=0.25,rotate=0,store_dtype=bfloat16")
    assert cfg.n_q == 16 and isinstance(cfg.n_q, int)
    assert cfg.alpha == 0.25 and cfg.rotate is False and cfg.store_dtype == "bfloat16"


def test_tuple_field_takes_the_following_values():
    cfg = parse_method("dynacompress,layer_weights=1,2,3,tau_h=6")
    assert cfg == AGACCConfig.preset("dynacompress", layer_weights=(1.0, 2.0, 3.0), tau_h=6.0)


def test_split_method():
    assert split_method("h2o@4,recent_window=32") == ("h2o", {"target_ratio": 4.0, "recent_window": 32})
    assert split_method("agacc") == ("agacc", {})


def test_labels():
    assert method_label("agacc") == "agacc"
    assert method_label("agacc@4.0") == "agacc@4"
    assert method_label(" h2o @ 4 , recent_window = 32 ") == "h2o@4,recent_window=32"
    out = parse_methods(["full", "agacc@4", "h2o@8,recent_window=16"])
    assert [label for label, _ in out] == ["full", "agacc@4", "h2o@8,recent_window=16"]
    assert out[2][1] == AGACCConfig.preset("h2o", target_ratio=8.0, recent_window=16)


@pytest.mark.parametrize("spec, message", [
    ("nosuch", "unknown preset 'nosuch'; choose from"),
    ("nosuch@4", "agacc"),                     # the choices are listed
    ("agacc@", "needs a ratio"),
    ("agacc@four", "must be a number >= 1"),
    ("agacc@0.5", "must be a number >= 1"),
    ("agacc@nan", "must be a number >= 1"),
    ("", "empty method spec"),
    ("@4", "no preset name"),
    ("agacc,tau_h", "expected key=value"),
    ("agacc,", "expected key=value"),
    ("agacc,nosuch=1", "unknown config field 'nosuch'"),
    ("agacc,tau_h=abc", "abc"),
    ("agacc,markers=maybe", "true/false"),
    ("agacc,tau_h=0.1", "tau_h > tau_l > tau_e"),   # validated like any config
    ("agacc@4,target_ratio=2", "given twice"),
    ("agacc,tau_h=6,tau_h=7", "given twice"),
])
def test_errors(spec, message):
    with pytest.raises(ValueError) as e:
        parse_method(spec)
    assert message in str(e.value)
    assert repr(spec) in str(e.value) or spec == ""


def test_same_method_twice_is_an_error():
    with pytest.raises(ValueError, match="given twice"):
        parse_methods(["agacc@4", "agacc@4.0"])


def test_eval_cli_methods_with_set_and_ratio_on_top():
    from agacc.eval.cli import method_configs

    got = method_configs(["full", "agacc@4,tau_h=6", "uniform-int4", "h2o"], ratio=None, sets={"recent_window": 16})
    assert [label for label, _ in got] == ["full", "agacc@4,tau_h=6", "uniform-int4", "h2o"]
    assert got[1][1] == AGACCConfig.preset("agacc", target_ratio=4.0, tau_h=6.0, recent_window=16)
    assert got[3][1] == AGACCConfig.preset("h2o", recent_window=16)
    # --ratio moves every method whose ratio can move (over the spec's own @R), not full / uniform-*
    got = dict(method_configs(["full", "agacc@4", "uniform-int4", "h2o"], ratio=3.0))
    assert got["agacc@4"].target_ratio == 3.0 and got["h2o"].target_ratio == 3.0
    assert got["full"] == AGACCConfig.preset("full") and got["uniform-int4"] == AGACCConfig.preset("uniform-int4")
    with pytest.raises(ValueError, match="kv-distill@4 or --ratio 4"):
        method_configs(["kv-distill"], None)
    assert method_configs(["kv-distill"], 3.0)[0][1].ratio == 3.0
    with pytest.raises(ValueError, match="given twice"):
        method_configs(["agacc@4", "agacc@4.0"], None)


def test_generate_cli_method_preset_and_set():
    from agacc.cli import _config_from_args, build_parser

    def cfg(*argv):
        return _config_from_args(build_parser().parse_args(["generate", "--prompt", "x", *argv]))

    assert cfg() == AGACCConfig.preset("agacc")
    assert cfg("--preset", "h2o", "--set", "recent_window=8") == AGACCConfig.preset("h2o", recent_window=8)
    assert cfg("--method", "agacc@4,markers=false", "--set", "tau_h=6") == AGACCConfig.preset(
        "agacc", target_ratio=4.0, markers=False, tau_h=6.0)
    with pytest.raises(ValueError, match="not both"):
        cfg("--method", "agacc", "--preset", "agacc")


def test_every_closed_choice_field_refuses_a_value_outside_it():
    """A field declared with ``choices`` takes only those values (one clean error naming the field and
    them); block_size's choices are the app's options, and any power of two up to 512 still runs."""
    from dataclasses import fields

    closed = [f for f in fields(AGACCConfig) if f.metadata.get("choices") and f.name != "block_size"]
    assert {"scoring", "prompt_evidence", "decode_evidence", "sink_bits", "store_dtype"} <= {f.name for f in closed}
    for f in closed:
        with pytest.raises(ValueError, match=f"{f.name} must be one of"):
            AGACCConfig(**{f.name: "no-such-value"})
    assert AGACCConfig(block_size=256).block_size == 256
