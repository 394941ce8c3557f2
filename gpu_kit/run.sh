#!/usr/bin/env bash
# The GPU kit: check every library against onnxruntime and time it against torch's cuDNN.
#   bash run.sh --out DIR              on the GPU machine (CPython 3.12 with torch, onnxruntime)
#   bash run.sh --rehearse --out DIR   the same steps with the llvm twins on a CPU, no torch
# Other options go to kit/gpu_run.py (--runs, --warmup, --only NAME...). PYTHON picks the
# interpreter (default python3). It installs nothing: tvm-ffi is unpacked from the kit's wheel
# into a temporary folder, and TVM's runtime libraries are loaded from runtime/.
set -euo pipefail
KIT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "run.sh: no '$PYTHON' on PATH (set PYTHON to a CPython 3.12 interpreter)" >&2
    exit 2
fi
if ! "$PYTHON" -c 'import sys, platform; sys.exit(sys.version_info[:2] != (3, 12) or platform.machine() != "x86_64")'; then
    echo "run.sh: the kit's runtime is for CPython 3.12 on x86-64, and $PYTHON is $("$PYTHON" -c 'import sys, platform; print(sys.version.split()[0], platform.machine())')" >&2
    exit 2
fi
WHEEL=("$KIT"/runtime/apache_tvm_ffi-*-cp312-*.whl)
if [ ! -f "${WHEEL[0]}" ] || [ ! -f "$KIT/runtime/libtvm_runtime.so" ] || [ ! -f "$KIT/manifest.json" ]; then
    echo "run.sh: $KIT is not a complete kit (runtime/ wheel, libtvm_runtime.so or manifest.json missing); rebuild it with make gpu-kit" >&2
    exit 2
fi
SITE="$(mktemp -d "${TMPDIR:-/tmp}/gpu-kit-site.XXXXXX")"
trap 'rm -rf "$SITE"' EXIT
"$PYTHON" -m zipfile -e "${WHEEL[0]}" "$SITE"
export PYTHONPATH="$KIT/kit:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export GCONV_TVM_RUNTIME_DIR="$KIT/runtime"
export PIP_NO_INDEX=1
# tvm-ffi would otherwise JIT-compile a torch DLPack add-on at import (a C++ build, minutes).
export TVM_FFI_DISABLE_TORCH_C_DLPACK=1
# The GPU slot is short: stop at GPU_KIT_TIMEOUT seconds (default 340, under the 6 minutes);
# gpu_run.py writes its results after every model, so a stopped run keeps what it measured.
LIMIT="${GPU_KIT_TIMEOUT:-340}"
status=0
if command -v timeout >/dev/null 2>&1; then
    timeout "$LIMIT" "$PYTHON" "$KIT/kit/gpu_run.py" "$@" || status=$?
else
    "$PYTHON" "$KIT/kit/gpu_run.py" "$@" || status=$?
fi
if [ "$status" -eq 124 ]; then
    echo "run.sh: stopped after $LIMIT s (GPU_KIT_TIMEOUT); the models run so far are in the results" >&2
fi
exit "$status"
