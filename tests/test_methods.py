"""The method registry: a method is one file, and a new file is a working, tested preset."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agacc import methods
from agacc.config import AGACCConfig
from agacc.presets import PRESETS

ROOT = Path(__file__).resolve().parent.parent
METHOD_FILES = sorted(p for p in (ROOT / "agacc" / "methods").glob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("path", METHOD_FILES, ids=[p.stem for p in METHOD_FILES])
def test_every_method_file_registers_itself_by_its_quoted_name(path):
    names = [m.name for m in methods.load().values() if m.rule is not None or m.presets or m.unavailable]
    registered = [n for n in names if f'"{n}"' in path.read_text()]
    assert registered, f"{path.name} registers no method under a name quoted in the file"


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_come_from_the_registry(name):
    method, overrides = methods.preset_overrides()[name]
    cfg = AGACCConfig.preset(name)
    assert cfg.name == name and cfg.rule in methods.rule_names()
    assert all(getattr(cfg, k) == v for k, v in overrides.items())
    assert method.citation


def test_legacy_rule_names_still_load():
    assert AGACCConfig(rule="thresholds").rule == "agacc"
    assert AGACCConfig(rule="topk").rule == "snapkv"
    assert AGACCConfig(budget_shape="pyramid", c_max=0.5).budget_shape == "pyramidkv"
    with pytest.raises(ValueError, match="rule must be one of"):
        AGACCConfig(rule="nope")


_RUN = r"""
import json, torch, agacc
from tests.helpers import tiny_model
assert agacc.__file__.startswith({tmp!r}), agacc.__file__  # the copied package, not the repository's
out = {{}}
for name in ("h2o", "h2o-copy"):
    model = tiny_model(layers=2, seed=0)
    torch.manual_seed(1)
    ids = torch.randint(3, 256, (1, 300))
    cache = agacc.CompressedCache(model.config, agacc.AGACCConfig.preset(name, target_ratio=4.0))
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=24,
                         min_new_tokens=24, do_sample=False, pad_token_id=0)
    out[name] = {{"tokens": gen[0, 300:].tolist(), "bytes": cache.memory()["bytes"],
                 "rule": cache.cfg.rule, "tier": cache.snapshot()["tier"]}}
print(json.dumps(out))
"""


def test_a_new_method_is_one_new_file(tmp_path):
    """Copy agacc/methods/h2o.py to a new file of a copied package with only its quoted name changed:
    the new name is a preset that generates exactly what h2o does, and no other file was edited."""
    pkg = tmp_path / "agacc"
    shutil.copytree(ROOT / "agacc", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    src = (pkg / "methods" / "h2o.py").read_text()
    assert len(re.findall(r'"h2o"', src)) == 1, "h2o.py should name itself once"
    (pkg / "methods" / "h2o_copy.py").write_text(src.replace('"h2o"', '"h2o-copy"'))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]), AGACC_CPU_KERNEL="0")
    res = subprocess.run([sys.executable, "-c", _RUN.format(tmp=str(tmp_path))], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["h2o-copy"]["rule"] == "h2o-copy"
    assert out["h2o-copy"]["tokens"] == out["h2o"]["tokens"]
    assert out["h2o-copy"]["bytes"] == out["h2o"]["bytes"]
    assert out["h2o-copy"]["tier"] == out["h2o"]["tier"]
