#!/usr/bin/env bash
# Make sure a Docker engine answers: install Debian's docker.io if there is none, start dockerd if it is not running.
# CI uses this (tests/test_docker.py); on a workstation, install Docker the usual way instead.
set -euo pipefail
docker info >/dev/null 2>&1 && exit 0
if ! command -v dockerd >/dev/null; then
    [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null \
        || { echo "error: no Docker engine, and not root on Debian to install docker.io" >&2; exit 1; }
    echo "installing docker.io (Debian)"
    # another apt/dpkg process (an unattended upgrade, a parallel test) may hold the lock: wait for it, do not fail
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq docker.io >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
    [[ $(id -u) == 0 ]] || { echo "error: the Docker engine is not running and only root can start dockerd" >&2; exit 1; }
    log=${DOCKERD_LOG:-/tmp/dockerd.log}
    echo "starting dockerd (log: $log)"
    setsid nohup dockerd >"$log" 2>&1 </dev/null &
    for _ in $(seq 300); do docker info >/dev/null 2>&1 && exit 0; sleep 1; done
    echo "error: dockerd did not answer within 300 s; the end of $log:" >&2
    tail -20 "$log" >&2
    exit 1
fi
