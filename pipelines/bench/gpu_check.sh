#!/usr/bin/env bash
# The GPU check a maintainer with one CUDA GPU runs (under 10 minutes): the CUDA test subset, ViT-B/32
# bf16/fp16 training against open_clip_train (samples/s, peak memory, MFU), the largest batch of the
# tiled InfoNCE vs ClipLoss, model.compile=true, FSDP on one GPU with periodic evaluation.
# Details: pipelines/bench/gpu_check.py and pipelines/bench/README.md.
#
#   make install && pipelines/bench/gpu_check.sh [--out DIR] [--only tests training loss compile fsdp]
#
# Without a CUDA GPU it prints one line and exits 0.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-.venv/bin/python}"
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "gpu_check: $PY cannot import torch; run \`make install\` first" >&2
    exit 2
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU visible to torch here (torch.cuda.is_available() is False); nothing checked"
    exit 0
fi
exec "$PY" pipelines/bench/gpu_check.py "$@"
