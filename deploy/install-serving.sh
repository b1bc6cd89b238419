#!/bin/sh
# The serving install, as the image runs it (Dockerfile) and as tests/test_deploy.py runs it: a fresh virtualenv
# with the d2v wheel and its runtime dependencies only (the equivalent of `pip install .`, no extras: no torch),
# then checks that the console scripts start, that torch is absent and, in an image with CUDA (the base image sets
# CUDA_VERSION), that ONNX Runtime was built for the same CUDA major version.
# Usage: deploy/install-serving.sh VENV_DIR WHEEL_DIR      (PYTHON picks the interpreter; default python3)
set -eu
if [ "$#" -ne 2 ]; then
    echo "usage: $0 VENV_DIR WHEEL_DIR" >&2
    exit 2
fi
venv=$1
wheels=$2

set -- "$wheels"/d2v-*.whl
if [ "$#" -ne 1 ] || [ ! -f "$1" ]; then
    echo "install-serving: expected exactly one d2v wheel in $wheels" >&2
    exit 1
fi

"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install --no-input --disable-pip-version-check "$1"

if "$venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "install-serving: torch is installed, but the serving install must not carry it" >&2
    exit 1
fi
"$venv/bin/d2v-serve" --help >/dev/null
"$venv/bin/d2v-healthcheck" --help >/dev/null

if [ -n "${CUDA_VERSION:-}" ]; then
    sh "$(dirname "$0")/check-cuda.sh" "$venv"
fi
echo "install-serving: d2v serving install ready in $venv"
