#!/usr/bin/env bash
# One-shot GPU check (issue 16): on a bare CUDA machine, install what is missing, then run
# bench/gpu_check.py (the CUDA tests and the 7B-shape throughput rows, as one table for
# bench/RESULTS.md). Without a GPU it says so and exits 0, installing and measuring nothing.
# Usage: bash bench/gpu_check.sh [gpu_check.py options]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
    echo "gpu_check: no CUDA GPU on this machine (nvidia-smi lists none). Nothing was installed, run or measured."
    exit 0
fi
nvidia-smi -L

# torch for CUDA: machines lent with a GPU usually have it; else the pinned version (the PyPI
# Linux wheel is the CUDA build).
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: installing torch==2.13.0 (no CUDA-enabled torch found)"
    "$PY" -m pip install -q "torch==2.13.0"
fi
# What the CUDA tests and the throughput rows import (not the UI's gradio and plotly), with
# the versions requirements*.txt pin, where any is missing.
if ! "$PY" -c "import transformers, bitsandbytes, pytest, sentencepiece, safetensors, tqdm" 2>/dev/null; then
    echo "gpu_check: installing the model's and the tests' requirements"
    # shellcheck disable=SC2046  # one requirement per word
    "$PY" -m pip install -q $(grep -hE '^(bitsandbytes|sentencepiece|safetensors|tqdm|transformers|pytest)\b' requirements.txt requirements-test.txt)
fi
exec "$PY" bench/gpu_check.py "$@"
