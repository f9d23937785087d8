#!/usr/bin/env bash
# Build, without any container registry, what `docker-compose build` needs on a machine
# that reaches only Debian's and Python's package mirrors (see ../shared/DOCKER.md):
#
#   local/bookworm-python:3.11  Debian bookworm (python3, venv, pip) made with debootstrap
#   local/postgres:15           Debian's postgresql-15 on that base, entrypoint compatible
#                               with the official image (docker/postgres/)
#   docker/wheels/              the torch CPU wheel from pip's find-links folder
#   docker/certs/ca-bundle.crt  the host's CA bundle, only when pip here is set to use one
#                               (a TLS-intercepting mirror); their contents are git-ignored
#
# Then build with: BASE_IMAGE=local/bookworm-python:3.11 TORCH_SOURCE=wheels \
#   FEDSPARSE_CA_BUNDLE=docker/certs/ca-bundle.crt POSTGRES_IMAGE=local/postgres:15 \
#   docker-compose build       (docker/compose-e2e.sh sets these itself).
# Needs root (debootstrap), debootstrap and a reachable Docker Engine (DOCKER_HOST).
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=${BASE_IMAGE_LOCAL:-local/bookworm-python:3.11}
PG=${POSTGRES_IMAGE_LOCAL:-local/postgres:15}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
SECONDS=0

# 1. The Python base image (skipped when it exists: about 3 minutes, 290 MB)
if docker image inspect "$BASE" > /dev/null 2>&1; then
    echo "base image $BASE exists: kept"
else
    command -v debootstrap > /dev/null || { echo "needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }
    mirror=${DEBIAN_MIRROR:-$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)}
    mirror=${mirror:-http://deb.debian.org/debian}
    rootfs=$(mktemp -d /var/tmp/fedsparse-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    echo "debootstrap bookworm from $mirror into $rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$rootfs" "$mirror" > "$rootfs.log" 2>&1 \
        || { tail -20 "$rootfs.log" >&2; exit 1; }
    rm -f "$rootfs.log"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE" > /dev/null
    rm -rf "$rootfs"
    trap - EXIT
    echo "base image $BASE built (${SECONDS}s)"
fi

# 2. PostgreSQL 15 on that base (the layer cache makes a rebuild instant)
t=$SECONDS
docker build -q --network host --build-arg BASE_IMAGE="$BASE" -t "$PG" docker/postgres > /dev/null
echo "postgres image $PG ready ($((SECONDS - t))s)"

# 3. torch's CPU wheel, from pip's find-links folder(s), into the build context
mkdir -p docker/wheels
links=$(pip config list 2>/dev/null | sed -n "s/^[^=]*find-links='\(.*\)'$/\1/p" | tr ' ' '\n' | sort -u)
wheel=""
for dir in $links ${PIP_FIND_LINKS:-}; do
    for f in "${dir#file://}"/torch-"$TORCH_VERSION"+cpu-cp311-cp311-*linux*_x86_64.whl; do
        [ -f "$f" ] && wheel=$f
    done
done
if [ -n "$wheel" ]; then
    cp -u "$wheel" docker/wheels/
    echo "torch wheel: docker/wheels/$(basename "$wheel")"
else
    echo "no torch $TORCH_VERSION CPU wheel in pip's find-links ($links): build with the default" \
         "TORCH_SOURCE (the PyTorch CPU index)" >&2
fi

# 4. The CA bundle pip uses here, when it uses one (only for building behind a mirror)
cert=$(pip config list 2>/dev/null | sed -n "s/^global\.cert='\(.*\)'$/\1/p" | head -1)
cert=${PIP_CERT:-$cert}
if [ -n "$cert" ] && [ -f "$cert" ]; then
    mkdir -p docker/certs
    cp "$cert" docker/certs/ca-bundle.crt
    echo "CA bundle: docker/certs/ca-bundle.crt (from $cert)"
fi
echo "done in ${SECONDS}s"
