#!/usr/bin/env bash
# Set up, then run the whole test suite (CPU only; Triton kernels under TRITON_INTERPRET=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRITON_INTERPRET=1 TOKENIZERS_PARALLELISM=false
python3 -m pytest tests -q --durations=15 "$@"
