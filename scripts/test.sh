#!/usr/bin/env bash
# Set up, then run the whole test suite (CPU only; Triton kernels under TRITON_INTERPRET=1), then
# compile every Triton kernel for sm_80 and sm_90 (python -m kernels.aot): the rows of docs/aot.json
# whose key (kernel source, specialisation, target, Triton version) still matches are reused, every
# other variant compiles here; a variant that fails is named and fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRITON_INTERPRET=1 TOKENIZERS_PARALLELISM=false
python3 -m pytest tests -q --durations=15 "$@"
mkdir -p out
env -u TRITON_INTERPRET python3 -m kernels.aot --targets sm_80,sm_90 --seed docs/aot.json --quiet --json out/aot.json \
    > out/aot.txt 2>&1 || { tail -n 40 out/aot.txt; exit 1; }
tail -n 1 out/aot.txt
