#!/bin/sh
# Install PyTorch: the default (CUDA) build where an NVIDIA GPU is present, otherwise a CPU build:
# a CPU wheel already available to pip locally (find-links / wheelhouse), else the PyTorch CPU index.
set -eu
PIP=${PIP:-pip}
V=${TORCH_VERSION:-2.13.0}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$PIP" install "torch==$V"
elif "$PIP" install --no-index --no-deps "torch==$V" >/dev/null 2>&1; then
    "$PIP" install "torch==$V"   # its pure-Python dependencies from the usual index
else
    "$PIP" install "torch==$V" --index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}" \
        --extra-index-url "${PIP_INDEX_URL:-https://pypi.org/simple}"
fi
