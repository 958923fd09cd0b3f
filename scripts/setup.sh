#!/usr/bin/env bash
# Prepares a fresh Debian 12 machine for the demo and the tests: system packages, a virtualenv in ./venv
# with the project and its pinned dependencies. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(openssh-server openssh-client zstd nix-bin util-linux fdisk gdisk iproute2 procps nodejs age)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  # policy-rc.d keeps apt from starting a system-wide sshd: the simulator runs its own.
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python3 -m venv venv
venv/bin/pip install -q --upgrade pip >/dev/null
venv/bin/pip install -q -e '.[test]'
