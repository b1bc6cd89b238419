#!/bin/sh
# Build the d2v wheel (pure Python; dependencies are not bundled). The Dockerfile's builder stage runs this, and so
# does tests/test_deploy.py, so the test proves the image's commands.
# Usage: deploy/build-wheel.sh SOURCE_DIR WHEEL_DIR      (PYTHON picks the interpreter; default python3)
set -eu
if [ "$#" -ne 2 ]; then
    echo "usage: $0 SOURCE_DIR WHEEL_DIR" >&2
    exit 2
fi
if [ -f /run/secrets/ca-bundle ]; then
    export PIP_CERT=/run/secrets/ca-bundle  # the build secret `ca-bundle` (docs/deploy.md)
fi
"${PYTHON:-python3}" -m pip wheel --no-input --no-deps --wheel-dir "$2" "$1"
