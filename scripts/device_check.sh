#!/usr/bin/env bash
# Device check for one GPU machine (offline, about 2-4 minutes, at most ~9): training and
# embedding images/s of ResNet-50 at 224 px in bf16 (random init, no download) and exact search
# queries/s over 1,000,000 x 512 vectors, printed as one table.
#   bash scripts/device_check.sh [--out DIR]   # DIR (default $OUT) gets device_check.{md,json}
#   bash scripts/device_check.sh --dry-run     # on a CPU with tiny sizes: checks the script
# Exit status 1 when any measurement failed (its row says why); the others still run.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " != *" --dry-run "* ]] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader >&2 || true
fi
exec "${PYTHON:-python}" scripts/device_check.py "$@"
