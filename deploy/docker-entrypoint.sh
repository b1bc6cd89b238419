#!/bin/sh
# Container entrypoint for d2v-serve.
# - Serves the models mounted at $D2V_MODELS_MOUNT (default /models) when that folder holds *.onnx files, else the
#   demo models bundled in the package. An explicit --models argument or D2V_MODELS variable wins.
# - Arguments are passed on to d2v-serve (e.g. `docker run IMAGE --port 50052`); a first argument that is not an
#   option runs as a command instead (e.g. `docker run IMAGE d2v-healthcheck --target host:50051`, `... sh`).
set -eu

case "${1:-}" in
    "" | -*) ;;
    *) exec "$@" ;;
esac

if [ -n "${D2V_MODELS:-}" ]; then
    exec d2v-serve "$@"
fi
for arg in "$@"; do
    case "$arg" in
        --models | --models=*) exec d2v-serve "$@" ;;
    esac
done

mount="${D2V_MODELS_MOUNT:-/models}"
if [ -d "$mount" ] && { [ ! -r "$mount" ] || [ ! -x "$mount" ]; }; then
    echo "d2v: $mount exists but user $(id -u) cannot read it; fix its permissions (the image runs as uid 10001)" >&2
    exit 1
fi
for model in "$mount"/*.onnx; do
    if [ -f "$model" ]; then
        echo "d2v: serving the models in $mount" >&2
        exec d2v-serve --models "$mount" "$@"
    fi
done
echo "d2v: no *.onnx in $mount; serving the bundled demo models" >&2
exec d2v-serve "$@"
