#!/usr/bin/env bash
# GPU acceptance for PULSE in one command (see docs/model.md): tiny-checkpoint parity against
# the golden logits in fp32/bf16/fp16, a random-weight PULSE-7B-shaped model, LoRA training
# steps and batched generation. Prints one table; exits 1 on a parity failure, 2 on another
# failure. Bounded to 8 minutes. Needs only torch, transformers, peft, safetensors,
# sentencepiece, numpy and Pillow (no Ray, wfdb or DeepSpeed):
#   PYTHON=python3 scripts/gpu_acceptance.sh
#   scripts/gpu_acceptance.sh --device cpu --tiny     # CPU smoke test of the same steps
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 "$PY" scripts/gpu_acceptance.py "$@"
