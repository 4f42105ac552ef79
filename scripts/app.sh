#!/usr/bin/env bash
# Set up, then start the app on the embedded model at http://localhost:7860
set -euo pipefail
cd "$(dirname "$0")/.."
AGACC_SKIP_BROWSER=1 bash scripts/setup.sh
exec python3 app.py "$@"
