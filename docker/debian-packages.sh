#!/usr/bin/env bash
# Install Debian packages the stack and its tests need, only those missing:
#   docker/debian-packages.sh postgresql-15 openssh-server chromium
# CI and the stack's test fixtures call this (as docker/engine.sh does for Docker); on a workstation, install them the
# usual way instead. apt waits for the dpkg lock (another apt run on the machine is common here) instead of failing.
set -euo pipefail
missing=()
for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
((${#missing[@]})) || exit 0
[[ $(id -u) == 0 ]] && command -v apt-get >/dev/null \
    || { echo "error: missing Debian packages ${missing[*]}, and not root on Debian to install them" >&2; exit 1; }
echo "installing ${missing[*]} (Debian)"
apt=(apt-get -o DPkg::Lock::Timeout=600 -qq)
"${apt[@]}" update
DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y --no-install-recommends "${missing[@]}" >/dev/null
