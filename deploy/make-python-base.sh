#!/bin/sh
# The offline Python base: a Debian image with python3 and python3-venv, made from Debian's packages with mmdebstrap
# and committed to local container storage with buildah, for machines that reach a Debian mirror but no container
# registry (python:*-slim cannot be pulled). Point the Dockerfile's PYTHON_IMAGE at it:
#   buildah bud --build-arg PYTHON_IMAGE=localhost/d2v-python:bookworm --build-arg FLAVOR=cpu ...
# Like python:*-slim it has no compilers and no pip of its own (venvs bring theirs). Runs as root.
# Usage: deploy/make-python-base.sh [IMAGE [SUITE]]     (default localhost/d2v-python:bookworm, bookworm)
#        MIRROR picks the Debian mirror (default: mmdebstrap's, deb.debian.org); STORAGE_DRIVER=vfs where
#        overlay mounts are not allowed.
set -eu
image=${1:-localhost/d2v-python:bookworm}
suite=${2:-bookworm}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# minbase: Essential and Priority: required packages plus apt; merged /usr like Debian's own images; no docs, man
# pages or translations.
mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    "$suite" "$work/rootfs.tar" ${MIRROR:+"$MIRROR"}

ctr=$(buildah from scratch)
buildah add "$ctr" "$work/rootfs.tar" / >/dev/null
buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
    --cmd python3 --label org.opencontainers.image.description="Debian $suite python3 + python3-venv (mmdebstrap)" \
    "$ctr"
python=$(buildah run --isolation chroot "$ctr" -- python3 --version)
buildah commit --rm "$ctr" "$image" >/dev/null
echo "make-python-base: $image ($python, Debian $suite)"
