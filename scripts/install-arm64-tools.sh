#!/usr/bin/env bash
# Debian's aarch64 cross-compiler and qemu-user, for the ARM64 kernel checks (tests/test_native_ports.py). Installs
# them where they are missing and this runs as root with apt-get; elsewhere it says so, and those tests skip.
set -euo pipefail
if command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "note: the ARM64 kernel checks need g++-aarch64-linux-gnu and qemu-user (apt-get, as root); they will skip" >&2
  exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++-aarch64-linux-gnu qemu-user >/dev/null
