#!/usr/bin/env bash
# A base image built from Debian's packages, for machines that reach Debian's mirror but no image registry:
#   docker/debian-base.sh [IMAGE]      # default local/debian:bookworm; then: make images BASE_IMAGE=local/debian:bookworm
# debootstrap's minimal bookworm (its python3 is 3.11; the Dockerfile installs it), imported with `docker import`.
set -euo pipefail
image=${1:-local/debian:bookworm}
docker image inspect "$image" >/dev/null 2>&1 && { echo "$image exists"; exit 0; }
if ! command -v debootstrap >/dev/null; then
    [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null || { echo "error: debootstrap is missing" >&2; exit 1; }
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq debootstrap >/dev/null
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "debootstrap --variant=minbase bookworm (log: $work/debootstrap.log)"
debootstrap --variant=minbase bookworm "$work/rootfs" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
tar -C "$work/rootfs" -c . | docker import - "$image" >/dev/null
echo "built $image"
