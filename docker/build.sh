#!/usr/bin/env bash
# Build the stage image (docker/Dockerfile) from the project root: `make images` calls this.
#
#   VARIANT=cpu|cuda      which torch build (default cpu); the image is rlhf-stage:$VARIANT unless IMAGE is set
#   BASE_IMAGE=...        default python:3.11-slim; any Debian-like image (Python 3.11 comes from apt if missing)
#   EXTRA_CA=/path.pem    a CA bundle to trust inside the image (TLS-intercepting proxies), also used by pip
#   TORCH_WHEELS=/dir     a folder holding torch-2.13.0*.whl to install instead of downloading torch (CPU variant)
set -euo pipefail
cd "$(dirname "$0")/.."

VARIANT=${VARIANT:-cpu}
IMAGE=${IMAGE:-rlhf-stage:$VARIANT}
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim}
command -v docker >/dev/null || { echo "error: docker is not installed (see README, Containers)" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "error: no Docker engine answers (start dockerd; see docker/engine.sh)" >&2; exit 1; }

# The build context gets only what .dockerignore lets through; certs/ and wheels/ are filled per build.
find docker/certs docker/wheels -type f ! -name README.md -delete
args=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "VARIANT=$VARIANT")
if [[ -n ${EXTRA_CA:-} ]]; then
    cp "$EXTRA_CA" docker/certs/extra-ca.pem
    args+=(--build-arg EXTRA_CA_BUNDLE=extra-ca.pem)
fi
if [[ -n ${TORCH_WHEELS:-} ]]; then
    compgen -G "$TORCH_WHEELS/torch-2.13.0*.whl" >/dev/null \
        || { echo "error: no torch-2.13.0*.whl in TORCH_WHEELS=$TORCH_WHEELS" >&2; exit 1; }
    cp "$TORCH_WHEELS"/torch-2.13.0*.whl docker/wheels/
fi
echo "building $IMAGE (VARIANT=$VARIANT, BASE_IMAGE=$BASE_IMAGE)"
docker build -f docker/Dockerfile -t "$IMAGE" --label "org.opencontainers.image.revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)" "${args[@]}" .
find docker/certs docker/wheels -type f ! -name README.md -delete
docker image inspect "$IMAGE" --format "built $IMAGE: {{.Id}} ({{.Size}} bytes)"
