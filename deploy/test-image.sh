#!/usr/bin/env bash
# Build the CPU image from a clean checkout with buildah and test it running, from outside the container.
#
#   bash deploy/test-image.sh            # as root, on Debian/Ubuntu; installs buildah and mmdebstrap with apt
#
# 1. Tools: buildah and mmdebstrap (apt), the project's .venv (scripts/bootstrap.sh) for the reference server and
#    the test client.
# 2. A clean copy of the checkout (the files git tracks, plus new files it does not ignore) is the build context.
# 3. The Python base: PYTHON_IMAGE when given, else python:3.12.12-slim-bookworm when it can be pulled, else
#    localhost/d2v-python:bookworm, made once with deploy/make-python-base.sh (mmdebstrap: Debian's python3 and
#    python3-venv) and reused.
# 4. `buildah bud --isolation chroot --layers --build-arg FLAVOR=cpu`, with CA_BUNDLE (default: the host's
#    /etc/ssl/certs/ca-certificates.crt) as the `ca-bundle` build secret, so pip works behind a TLS-intercepting
#    proxy. The layer cache makes a second run fast; the image is left as localhost/d2v-serve:cpu-test.
# 5. deploy/image_checks.py: size of d2v's own layers (<= 250 MB), lean contents, the secret absent from the image,
#    then the image run as built: health over gRPC and HTTP, Embed and /v1/embeddings equal to the pip install's,
#    non-root, read-only root, HEALTHCHECK, SIGTERM drain, mounted models, a bad model folder.
# One PASS/FAIL line per check, the phase times, and a last line `test-image: N passed, M failed`; exit status 1 when
# anything failed. STORAGE_DRIVER picks buildah's storage driver (e.g. vfs where overlay mounts are not allowed).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
image=localhost/d2v-serve:cpu-test
registry_base=python:3.12.12-slim-bookworm
local_base=localhost/d2v-python:bookworm
ca_bundle=${CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}
started=$SECONDS
phase_start=$SECONDS

fail() {
    echo "FAIL $1: $2"
    echo "test-image: 0 passed, 1 failed"
    exit 1
}
phase() {
    echo "test-image: $1 took $((SECONDS - phase_start)) s"
    phase_start=$SECONDS
}
bh() {
    buildah ${STORAGE_DRIVER:+--storage-driver "$STORAGE_DRIVER"} "$@"
}

[ "$(id -u)" = 0 ] || fail "setup" "run as root: buildah mounts the image's root filesystem"
source scripts/bootstrap.sh
ensure_commands buildah mmdebstrap
command -v buildah >/dev/null && command -v mmdebstrap >/dev/null \
    || fail "setup" "buildah and mmdebstrap are needed (apt-get install buildah mmdebstrap)"
ensure_venv "."
echo "test-image: $(buildah --version), $(mmdebstrap --version)"
phase "setup"

git rev-parse --is-inside-work-tree >/dev/null 2>&1 || fail "context" "$repo is not a git checkout"
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
git ls-files -z --cached --others --exclude-standard \
    | tar --null --files-from=- --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$context"

if [ -n "${PYTHON_IMAGE:-}" ]; then
    base=$PYTHON_IMAGE
elif bh inspect --type image "$registry_base" >/dev/null 2>&1 \
    || timeout 60 "${BASH}" -c "$(declare -f bh); bh pull -q docker.io/library/$registry_base" >/dev/null 2>&1; then
    base=$registry_base
elif bh inspect --type image "$local_base" >/dev/null 2>&1; then
    base=$local_base
    echo "test-image: $registry_base cannot be pulled; using $local_base (made earlier by make-python-base.sh)"
else
    echo "test-image: $registry_base cannot be pulled; making $local_base from Debian packages"
    sh deploy/make-python-base.sh "$local_base" || fail "base" "deploy/make-python-base.sh failed"
    base=$local_base
fi
phase "base ($base)"

secret=()
if [ -n "$ca_bundle" ] && [ -f "$ca_bundle" ]; then
    secret=(--secret "id=ca-bundle,src=$ca_bundle")
    echo "test-image: pip trusts $ca_bundle during the build (build secret ca-bundle)"
fi
build_log=$(mktemp)
if ! bh bud --isolation chroot --layers --format docker --build-arg FLAVOR=cpu --build-arg "PYTHON_IMAGE=$base" \
    "${secret[@]}" -t "$image" "$context" >"$build_log" 2>&1; then
    tail -25 "$build_log"
    rm -f "$build_log"
    fail "build" "buildah bud failed (the lines above)"
fi
grep -E "^install-serving: " "$build_log" || true
rm -f "$build_log"
echo "PASS build: $image (FLAVOR=cpu, PYTHON_IMAGE=$base)"
phase "build"

checks_log=$(mktemp)
status=0
"$repo/.venv/bin/python" deploy/image_checks.py "$image" "$base" ${secret:+--ca-bundle "$ca_bundle"} \
    | tee "$checks_log" || status=$?
passed=$(($(grep -c '^PASS ' "$checks_log" || true) + 1))  # + the build
failed=$(grep -c '^FAIL ' "$checks_log" || true)
rm -f "$checks_log"
phase "checks"
echo "test-image: total $((SECONDS - started)) s"
if [ "$status" != 0 ] && [ "$failed" = 0 ]; then
    failed=1
    echo "FAIL checks: deploy/image_checks.py exited with status $status"
fi
echo "test-image: $passed passed, $failed failed"
[ "$failed" = 0 ]
