#!/bin/sh
# Install PyTorch into the current venv without ever pulling the multi-GB CUDA build onto a
# machine that has no GPU.
#   - already installed: nothing to do;
#   - an NVIDIA GPU is present: the default (CUDA) build from PyPI;
#   - no GPU: a CPU build, first from a local wheel directory if pip is configured with one
#     (--no-index keeps pip off the network), otherwise from PyTorch's CPU index.
set -e
PIP=${PIP:-python -m pip}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if $PIP show torch >/dev/null 2>&1; then
    exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $PIP install -q "torch==$TORCH_VERSION"
elif $PIP install -q --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
    $PIP install -q "torch==$TORCH_VERSION"   # now resolves torch's own dependencies
else
    $PIP install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
        --extra-index-url https://pypi.org/simple
fi
