#!/bin/sh
# Install PyTorch: the default build where an NVIDIA GPU is present; otherwise a CPU build when pip can
# find one without an index (a local wheelhouse or find-links in pip's configuration), or from the index
# named by TORCH_INDEX_URL (PyTorch's CPU wheel index; see the README). Where packages come from is pip's
# own configuration: this script names no index.
set -eu
PIP=${PIP:-pip}
V=${TORCH_VERSION:-2.13.0}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$PIP" install "torch==$V"
elif "$PIP" install --no-index --no-deps "torch==$V" >/dev/null 2>&1; then
    "$PIP" install "torch==$V"   # its pure-Python dependencies from the usual index
elif [ -n "${TORCH_INDEX_URL:-}" ]; then
    "$PIP" install "torch==$V" --index-url "$TORCH_INDEX_URL"
else
    echo "install-torch: no GPU and no local CPU wheel of torch $V; installing pip's default build (on Linux a" \
         "CUDA build of several GB). Set TORCH_INDEX_URL to PyTorch's CPU wheel index for the CPU build." >&2
    "$PIP" install "torch==$V"
fi
