#!/usr/bin/env bash
# Make .bench-venv312: the separate Python 3.12 environment of the Triton peer (bench/pytriton_app.py).
#
# nvidia-pytriton bundles a Triton server whose Python backend is built for 3.12, so it cannot share the
# project's .venv. The peer runs the same onnxruntime version as the project (read from pyproject.toml),
# so the two servers differ in their serving stack only. After this, `coursezoo bench` (full, or
# `--cases peer`) finds the interpreter by itself; COURSEZOO_BENCH_PEER_PYTHON points at another one.
# Works offline once installed (the Triton binaries are inside the wheel).
#
# Usage: bash bench/peer-venv.sh [PYTHON3.12]   (default: python3.12 on PATH, else pyenv's 3.12.1)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# A pyenv shim named python3.12 is on PATH even where it refuses to run, so the default must run.
py=${1:-python3.12}
if [[ $# -eq 0 ]] && ! python3.12 -c "" 2>/dev/null; then py=/root/.pyenv/versions/3.12.1/bin/python3.12; fi
ort=$(grep -oP '"onnxruntime-gpu==\K[0-9.]+' "$root/pyproject.toml")
"$py" -m venv "$root/.bench-venv312"
"$root/.bench-venv312/bin/python" -m pip install -q --upgrade pip
"$root/.bench-venv312/bin/python" -m pip install -q "nvidia-pytriton==0.7.0" "onnxruntime==$ort"
"$root/.bench-venv312/bin/python" -c "import pytriton, onnxruntime; print('peer venv ready: onnxruntime', onnxruntime.__version__)"
