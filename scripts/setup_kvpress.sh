#!/usr/bin/env bash
# Make .venv-kvpress: NVIDIA kvpress in a virtual environment of its own, for the kvpress:<press> methods of
# `python -m agacc eval` (agacc/eval/kvpress_adapter.py runs agacc/eval/kvpress_worker.py in it).
# kvpress pins transformers below 5.3 and this project pins 5.23, so the venv does not see the system's
# site-packages. torch is the same CPU build as the project's (torch==2.13.0 from this machine's wheels):
# the script stops before anything is installed if pip would fetch a CUDA build (gigabytes) instead.
# Idempotent; about 2 minutes the first time. KVPRESS_VENV=DIR puts it elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${KVPRESS_VENV:-.venv-kvpress}"
TORCH="torch==2.13.0"
KVPRESS="kvpress==0.5.5"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import kvpress, torch, transformers" 2>/dev/null; then
  echo "setup_kvpress: $VENV is ready ($("$VENV/bin/python" -c 'import kvpress, torch, transformers; from importlib.metadata import version; print("kvpress", version("kvpress"), "torch", torch.__version__, "transformers", transformers.__version__)'))"
  exit 0
fi
python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# guard: what would `pip install torch==2.13.0` fetch? A CPU build, no nvidia-* packages.
REPORT="$(mktemp)"
trap 'rm -f "$REPORT"' EXIT
"${PIP[@]}" install --dry-run --ignore-installed --report "$REPORT" "$TORCH" >/dev/null
"$VENV/bin/python" - "$REPORT" <<'EOF'
import json, sys
items = json.load(open(sys.argv[1]))["install"]
cuda = [i["metadata"]["name"] for i in items if i["metadata"]["name"].lower().startswith(("nvidia", "triton"))]
torch = [i for i in items if i["metadata"]["name"].lower() == "torch"]
version = torch[0]["metadata"]["version"] if torch else "?"
if cuda or "+cpu" not in version:
    sys.exit(f"setup_kvpress: pip would install torch {version} with {cuda or 'no CPU tag'} (CUDA wheels, gigabytes); "
             "make a CPU build of torch 2.13.0 available to pip first (as on this project's machines), then rerun")
print(f"setup_kvpress: torch {version} (CPU build, no CUDA wheels)")
EOF
"${PIP[@]}" install "$TORCH"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$REPORT" "$CONSTRAINTS"' EXIT
echo "$TORCH" > "$CONSTRAINTS"
"${PIP[@]}" install -c "$CONSTRAINTS" "transformers<5.3" "$KVPRESS" gguf
"$VENV/bin/python" -c "import kvpress, torch, transformers; from importlib.metadata import version; assert torch.__version__.startswith('2.13.0'), torch.__version__; print('setup_kvpress: ready:', 'kvpress', version('kvpress'), 'torch', torch.__version__, 'transformers', transformers.__version__)"
