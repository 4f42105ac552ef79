#!/usr/bin/env bash
# Set up, then run the whole test suite (CPU only; Triton kernels under TRITON_INTERPRET=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the browser test fails (instead of skipping) if setup did not give it Chromium
export TRITON_INTERPRET=1 TOKENIZERS_PARALLELISM=false AGACC_REQUIRE_BROWSER=1
python3 -m pytest tests -q --durations=15 "$@"
