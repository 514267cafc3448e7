#!/usr/bin/env bash
# Run `coursezoo bench` on a machine with an NVIDIA GPU whose python3 (3.12, with torch and the nvidia
# CUDA/cuDNN wheels) has only the CPU build of onnxruntime and no package index to install from.
#
#   bash bench/gpu.sh pack          # here, where PyPI is reachable: writes .ortgpu/ (onnxruntime-gpu in
#                                   # parts, by ../shared/tools/ort-gpu-parts.sh), .bench-wheels/ (the serving
#                                   # dependencies as cp312 wheels, pinned as in pyproject.toml) and .bench-data/
#                                   # (the held-out splits the benchmark and the tests read, ~1.7 MB) and, where
#                                   # this machine has h2load, .bench-tools/ (it and the libraries it needs, ~7 MB)
#   bash bench/gpu.sh run [ARGS]    # on the GPU host, in the repository root: unpacks onnxruntime-gpu to
#                                   # /tmp/ortgpu and the wheels to /tmp/benchdeps (once), then runs
#                                   # `coursezoo bench --device cuda ARGS` (JSON to $OUT/gpu.json when $OUT is set)
#   bash bench/gpu.sh test [ARGS]   # the same set-up, then pytest tests/serving/test_gpu.py ARGS
#   bash bench/gpu.sh pack-peer     # here: .bench-peer/ (the Triton peer's packages, nvidia-pytriton and its
#                                   # dependencies for cp312, unpacked and xz-compressed in parts, ~65 MB)
#
# Transfers: the .ortgpu parts are ~45 MB each; bring them over a few at a time into /tmp/parts (or
# .ortgpu/) and `run` finds them. .bench-tools/ may come with an earlier part, copied to /tmp/benchtools;
# set-up keeps everything under /tmp (ortgpu, benchdeps, benchtools, benchdata), so later calls on the same
# machine need none of it carried again. onnxruntime.preload_dlls() (called by serving/runtime.py and by the
# in-process CUDA baselines) loads cuBLAS/cuDNN from the host's nvidia wheels. The Triton peer comes as
# .bench-peer/ parts (gathered in /tmp/peerparts like the others); set-up unpacks them into a venv of the
# host's python3 at /tmp/peervenv and points COURSEZOO_BENCH_PEER_PYTHON at it. Without them the peer is
# skipped with a note.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
PY=${PYTHON:-python3}

download_cp312() {
    # wheels for the GPU host's CPython 3.12 (Ubuntu 24.04, glibc 2.39; nvidia-pytriton's are manylinux_2_35)
    local dest=$1
    shift
    "$root/.venv/bin/python" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "$@"
}

pack() {
    bash "$root/../shared/tools/ort-gpu-parts.sh"
    grep -qx '/.bench-wheels/' .git/info/exclude 2>/dev/null || echo '/.bench-wheels/' >> .git/info/exclude
    rm -rf .bench-wheels
    # the serving dependencies and the load client, minus what the GPU host already has (numpy, onnxruntime)
    mapfile -t pins < <(python3 - <<'PY'
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = [d for d in p["dependencies"] if not d.startswith(("numpy", "onnxruntime"))]
deps += [d for d in p["optional-dependencies"]["test"] if d.startswith("tritonclient")]
print("\n".join(deps))
PY
)
    download_cp312 .bench-wheels "${pins[@]}"
    rm -f .bench-wheels/numpy-*.whl
    # the test splits only: the GPU host has no data mirror, and nothing there trains
    local mirror=${COURSEZOO_DATA_MIRROR:-$root/../shared/data}
    grep -qx '/.bench-data/' .git/info/exclude 2>/dev/null || echo '/.bench-data/' >> .git/info/exclude
    rm -rf .bench-data && mkdir -p .bench-data/mnist .bench-data/diabetes .bench-data/names
    cp "$mirror"/mnist/t10k-*.gz .bench-data/mnist/
    cp "$mirror"/diabetes/diabetes.csv.gz .bench-data/diabetes/
    cp "$mirror"/names/names_test.csv.gz .bench-data/names/
    # h2load for the external-client rows: the GPU host has no apt, so the binary travels with the libraries it
    # needs beyond glibc and libstdc++; a wrapper points the loader at them for h2load alone
    grep -qx '/.bench-tools/' .git/info/exclude 2>/dev/null || echo '/.bench-tools/' >> .git/info/exclude
    rm -rf .bench-tools
    if h2=$(command -v h2load); then
        mkdir -p .bench-tools/lib
        cp "$h2" .bench-tools/lib/
        ldd "$h2" | awk '$3 ~ /lib(nghttp2|jemalloc|ev|ssl|crypto)\./ {print $3}' | xargs -I{} cp -L {} .bench-tools/lib/
        cat > .bench-tools/h2load <<'SH'
#!/bin/sh
lib=$(dirname "$(readlink -f "$0")")/lib
LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$lib/h2load" "$@"
SH
        chmod +x .bench-tools/h2load
    fi
    du -sh .ortgpu .bench-wheels .bench-data .bench-tools 2>/dev/null
}

pack_peer() {
    # the same packages bench/peer-venv.sh installs, minus onnxruntime (the GPU host gets onnxruntime-gpu):
    # wheels unzipped (what pip's install would put in site-packages) and xz-compressed, 65 MB instead of 98
    local pin tmp
    pin=$(grep -oP 'nvidia-pytriton==[0-9.]+' bench/peer-venv.sh)
    tmp=$(mktemp -d)
    download_cp312 "$tmp/wheels" "$pin"
    mkdir "$tmp/tree"
    for wheel in "$tmp"/wheels/*.whl; do unzip -q -o "$wheel" -d "$tmp/tree"; done
    grep -qx '/.bench-peer/' .git/info/exclude 2>/dev/null || echo '/.bench-peer/' >> .git/info/exclude
    rm -rf .bench-peer && mkdir .bench-peer
    tar -C "$tmp/tree" -cf - . | xz -T0 -9 | split -b 45M -d - .bench-peer/part-
    rm -rf "$tmp"
    du -sh .bench-peer/part-*
}

setup_peer() {
    # a venv of the host's python3 (its nvidia wheels stay visible) with the peer's packages in its
    # site-packages: PyTriton finds Triton's libraries beside itself there, and Triton's Python backend stub
    # imports from there; a .pth puts onnxruntime-gpu ahead of the host's CPU build
    mkdir -p /tmp/peerparts
    if [ -d .bench-peer ]; then cp -n .bench-peer/part-* /tmp/peerparts/ 2>/dev/null || true; fi
    if [ ! -x /tmp/peervenv/bin/python ] && compgen -G '/tmp/peerparts/part-*' >/dev/null; then
        local site
        "$PY" -m venv --without-pip --system-site-packages /tmp/peervenv
        site=$(/tmp/peervenv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
        cat /tmp/peerparts/part-* | xz -T0 -dc | tar -C "$site" -xf -
        # a venv made from a venv sees the base install's packages, not that venv's: name them too
        printf '%s\n' /tmp/ortgpu "$("$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
            > "$site/gpu-host.pth"
    fi
    if [ -x /tmp/peervenv/bin/python ]; then
        export COURSEZOO_BENCH_PEER_PYTHON=${COURSEZOO_BENCH_PEER_PYTHON:-/tmp/peervenv/bin/python}
    fi
}

setup() {
    if ! PYTHONPATH=/tmp/ortgpu "$PY" -c "import onnxruntime as o, sys; \
            sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
        [ -x .ortgpu/unpack.sh ] || { echo "gpu.sh: no onnxruntime-gpu at /tmp/ortgpu and no .ortgpu/ (run 'pack')"; exit 1; }
        bash .ortgpu/unpack.sh
    fi
    if ! PYTHONPATH=/tmp/benchdeps "$PY" -c "import grpc, grpc_tools, grpc_health, grpc_reflection, PIL, pyspng, tqdm, \
            prometheus_client, tritonclient.grpc" 2>/dev/null; then
        [ -d .bench-wheels ] || { echo "gpu.sh: serving dependencies missing and no .bench-wheels/ (run 'pack')"; exit 1; }
        "$PY" -m pip install -q --no-index --no-deps --target /tmp/benchdeps .bench-wheels/*.whl
    fi
    if ! command -v h2load >/dev/null && [ -d .bench-tools ]; then
        mkdir -p /tmp/benchtools && cp -r .bench-tools/. /tmp/benchtools/
    fi
    if [ -x /tmp/benchtools/h2load ]; then export PATH="/tmp/benchtools:$PATH"; fi
    export PYTHONPATH="/tmp/ortgpu:/tmp/benchdeps:$root${PYTHONPATH:+:$PYTHONPATH}"
    # kept in /tmp like the rest: on the lent machine a carried folder is gone by the next call
    if [ -d .bench-data ]; then mkdir -p /tmp/benchdata && cp -r .bench-data/. /tmp/benchdata/; fi
    if [ -d /tmp/benchdata ]; then export COURSEZOO_DATA_MIRROR=${COURSEZOO_DATA_MIRROR:-/tmp/benchdata}; fi
    setup_peer
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$PY" -c "import onnxruntime as o; o.preload_dlls(); print('onnxruntime', o.__version__, o.get_available_providers())"
}

run() {
    setup
    local json=()
    [ -n "${OUT:-}" ] && json=(--json "$OUT/gpu.json")
    exec "$PY" -m coursezoo bench --device cuda "${json[@]}" "$@"
}

case "${1:-}" in
    pack) pack ;;
    pack-peer) pack_peer ;;
    run) shift; run "$@" ;;
    test) shift; setup; exec "$PY" -m pytest -p no:cacheprovider tests/serving/test_gpu.py "$@" ;;
    *) sed -n '2,25p' "$0"; exit 2 ;;
esac
