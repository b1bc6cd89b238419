#!/bin/sh
# The serving install, as the image runs it (Dockerfile) and as tests/test_deploy.py runs it: a fresh virtualenv
# with the d2v wheel and its runtime dependencies only (the equivalent of `pip install .`, no extras: no torch),
# then checks that the console scripts start, that torch is absent and, in an image with CUDA (the base image sets
# CUDA_VERSION), that ONNX Runtime was built for the same CUDA major version. pip and setuptools are removed last.
#
# ONNX Runtime: the wheel depends on plain `onnxruntime`. ONNXRUNTIME=onnxruntime-gpu (the default when CUDA_VERSION
# is set) installs onnxruntime-gpu in its place, with the same version range: the two ship the same `onnxruntime`
# module and must never be installed together.
# A build secret `ca-bundle` (mounted at /run/secrets/ca-bundle) is the CA bundle pip trusts, e.g. behind a
# TLS-intercepting proxy; it is read during the build only.
# Usage: deploy/install-serving.sh VENV_DIR WHEEL_DIR      (PYTHON picks the interpreter; default python3)
set -eu
if [ "$#" -ne 2 ]; then
    echo "usage: $0 VENV_DIR WHEEL_DIR" >&2
    exit 2
fi
venv=$1
wheels=$2
if [ -n "${CUDA_VERSION:-}" ]; then
    onnxruntime=${ONNXRUNTIME:-onnxruntime-gpu}
else
    onnxruntime=${ONNXRUNTIME:-onnxruntime}
fi
case "$onnxruntime" in
    onnxruntime | onnxruntime-gpu) ;;
    *)
        echo "install-serving: ONNXRUNTIME must be onnxruntime or onnxruntime-gpu, not '$onnxruntime'" >&2
        exit 2
        ;;
esac
if [ -f /run/secrets/ca-bundle ]; then
    export PIP_CERT=/run/secrets/ca-bundle
fi

set -- "$wheels"/d2v-*.whl
if [ "$#" -ne 1 ] || [ ! -f "$1" ]; then
    echo "install-serving: expected exactly one d2v wheel in $wheels" >&2
    exit 1
fi
wheel=$1

"${PYTHON:-python3}" -m venv "$venv"
pip="$venv/bin/python -m pip --no-input --disable-pip-version-check"
# --no-compile: no bytecode is written at install (the image ships none); Python compiles on first import.
if [ "$onnxruntime" = onnxruntime ]; then
    $pip install --no-compile "$wheel"
else
    # The wheel's own requirements (no extras), onnxruntime renamed; then the wheel without its dependencies.
    "$venv/bin/python" - "$wheel" "$onnxruntime" > "$venv/d2v-requirements.txt" <<'PY'
import re
import sys
import zipfile
from email.parser import Parser

wheel, onnxruntime = sys.argv[1:]
with zipfile.ZipFile(wheel) as zf:
    meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
    requires = Parser().parsestr(zf.read(meta).decode()).get_all("Requires-Dist") or []
for req in requires:
    if "extra ==" not in req:
        print(re.sub(r"^onnxruntime(?=[\s<>=!~;\[]|$)", onnxruntime, req))
PY
    $pip install --no-compile -r "$venv/d2v-requirements.txt"
    $pip install --no-compile --no-deps "$wheel"
    rm "$venv/d2v-requirements.txt"
fi

if "$venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "install-serving: torch is installed, but the serving install must not carry it" >&2
    exit 1
fi
"$venv/bin/python" - "$onnxruntime" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

wanted = sys.argv[1]
other = "onnxruntime-gpu" if wanted == "onnxruntime" else "onnxruntime"
try:
    version(other)
except PackageNotFoundError:
    pass
else:
    sys.exit(f"install-serving: both {wanted} and {other} are installed; they ship the same module")
print(f"install-serving: {wanted} {version(wanted)}")
PY
"$venv/bin/d2v-serve" --help >/dev/null
"$venv/bin/d2v-healthcheck" --help >/dev/null
# The venv serves; it installs nothing more: no pip or setuptools (about 22 MB).
$pip uninstall --yes --quiet pip setuptools

if [ -n "${CUDA_VERSION:-}" ]; then
    sh "$(dirname "$0")/check-cuda.sh" "$venv"
fi
echo "install-serving: d2v serving install ready in $venv"
