#!/usr/bin/env bash
# GPU check for PULSE: load it in bf16, answer one ECG printout, print load time, peak memory
# and tokens/s. Bounded to 8 minutes.
#   scripts/gpu_check_pulse.sh --model-dir /path/to/PULSE-7B   # a local PULSE-7B download
#   scripts/gpu_check_pulse.sh --random-7b                     # PULSE-7B's shape, no download
#   scripts/gpu_check_pulse.sh --tiny --device cpu             # CPU smoke test of the same path
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 "$PY" scripts/gpu_check_pulse.py "$@"
