#!/usr/bin/env bash
# The prepared device check (bench/gpu_check.py): kernels vs their PyTorch references on CUDA, decode
# attention latency / bandwidth at 8K / 32K / 128K tokens (Llama-3-8B shapes, ~2x / 4x / 8x) vs fp16
# flash SDPA, 8B-shaped decode tokens/s compressed vs plain at 32K, peak memory of a 128K prompt
# (chunked vs plain), the app's session generating 64 tokens with its figures, keys held in a basis (the
# preset above 4x) against their reference and its decode speed. Nothing is downloaded.
#
#   bash bench/gpu_check.sh OUTDIR [--dry-run] [more bench/gpu_check.py flags]
#
# Writes OUTDIR/gpu_check.json, OUTDIR/summary.md, OUTDIR/session_figures.{json,html} and
# OUTDIR/log.txt. Stops starting sections after 450 s and is killed at 480 s (8 minutes): what was
# measured by then is on disk. --dry-run: the CPU rehearsal (tiny shapes, the Triton interpreter,
# no timing claims).
set -uo pipefail
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash bench/gpu_check.sh OUTDIR [--dry-run] [bench/gpu_check.py flags]" >&2
  exit 2
fi
OUT="$1"; shift
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# offline: nothing may be downloaded on the device machine
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY="${PYTHON:-python3}"
{
  echo "# $(date -u '+%Y-%m-%d %H:%M:%S UTC') $(hostname) git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.mem --format=csv
} > "$OUT/log.txt" 2>&1
timeout --signal=TERM --kill-after=10 480 "$PY" -m bench.gpu_check --out "$OUT" "$@" 2>&1 | tee -a "$OUT/log.txt"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "gpu_check: killed at the 8-minute limit; partial results in $OUT" | tee -a "$OUT/log.txt"
exit "$rc"
