#!/bin/sh
# Fail when the ONNX Runtime in VENV_DIR was built for another CUDA major version than the image's CUDA_VERSION
# (set by nvidia/cuda base images): its CUDA execution provider would not load and the server would run on the CPU.
# install-serving.sh runs this when CUDA_VERSION is set.
# Usage: CUDA_VERSION=13.0.2 deploy/check-cuda.sh VENV_DIR
set -eu
if [ "$#" -ne 1 ] || [ -z "${CUDA_VERSION:-}" ]; then
    echo "usage: CUDA_VERSION=X.Y.Z $0 VENV_DIR" >&2
    exit 2
fi
"$1/bin/python" - "$CUDA_VERSION" <<'PY'
import sys

from onnxruntime.capi import build_and_package_info as info

image_cuda = sys.argv[1]
ort_cuda = getattr(info, "cuda_version", "") or "none"
if ort_cuda.split(".")[0] != image_cuda.split(".")[0]:
    sys.exit(
        f"check-cuda: {info.package_name} {info.__version__} is built for CUDA {ort_cuda}, but the image has "
        f"CUDA {image_cuda}: its CUDA execution provider would not load. Use a base image with CUDA {ort_cuda}."
    )
print(f"check-cuda: {info.package_name} {info.__version__} (CUDA {ort_cuda}) matches the image's CUDA {image_cuda}")
PY
