#!/usr/bin/env bash
# Installs every Debian 12 package that cohort's build, tests and demo need.
# Idempotent: packages already present are left alone; apt-get update runs only
# when something is missing.
set -euo pipefail

pkgs=(
  build-essential pkg-config meson ninja-build
  libuv1-dev libprotobuf-c-dev protobuf-c-compiler libssl-dev openssl
  libopenblas-dev libsqlite3-dev sqlite3 libcmocka-dev zlib1g-dev libcjson-dev
  dataset-fashion-mnist python3 valgrind gnuplot-nox
)

missing=()
for p in "${pkgs[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "install-deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "install-deps: all packages present" >&2
