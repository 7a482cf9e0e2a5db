#!/usr/bin/env bash
# Installs every Debian 12 package that cohort's build, tests and demo need.
# Idempotent: packages already present are left alone; apt-get update runs only
# when something is missing.
#
# --cross: also the arm64 and armhf cross toolchains for the edge build
# (docs/edge.md): Debian's cross compilers, qemu-user to run the results, and
# the multiarch OpenSSL and protobuf-c development packages (this adds the
# arm64 and armhf dpkg architectures).
set -euo pipefail

cross=0
for arg in "$@"; do
  case "$arg" in
    --cross) cross=1 ;;
    *) echo "usage: install-deps.sh [--cross]" >&2; exit 2 ;;
  esac
done

pkgs=(
  build-essential pkg-config meson ninja-build
  libuv1-dev libprotobuf-c-dev protobuf-c-compiler libssl-dev openssl
  libopenblas-dev libsqlite3-dev sqlite3 libcmocka-dev zlib1g-dev libcjson-dev libxxhash-dev
  dataset-fashion-mnist python3 valgrind gnuplot-nox
  libinih-dev libhttp-parser-dev python3-prometheus-client
  # the dashboard test (e2e-dashboard) drives headless Chromium; about 40 s to install
  chromium
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

# Adds dpkg architecture $1 if needed and installs the packages after it.
# Returns 1 (after undoing the architecture it added) when the mirror cannot
# provide them, so a broken foreign index never breaks later apt-get updates.
cross_install() {
  local arch=$1 added=0 p
  shift
  local want=()
  for p in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
      want+=("$p")
    fi
  done
  [ ${#want[@]} -gt 0 ] || return 0
  local foreign=" $(dpkg --print-foreign-architectures | tr '\n' ' ') "
  if [[ "$foreign" != *" $arch "* ]]; then
    echo "install-deps: adding dpkg architecture $arch" >&2
    $SUDO dpkg --add-architecture "$arch"
    added=1
  fi
  if ! $SUDO apt-get update -qq; then
    echo "install-deps: apt-get update failed with the $arch architecture" >&2
    if [ "$added" = 1 ]; then
      $SUDO dpkg --remove-architecture "$arch" || true
    fi
    return 1
  fi
  echo "install-deps: installing ${want[*]}" >&2
  # Wait for a concurrent apt or dpkg run instead of failing at once.
  $SUDO apt-get install -y -qq -o DPkg::Lock::Timeout=600 --no-install-recommends "${want[@]}" \
    >/dev/null || return 1
}

if [ "$cross" = 1 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  # arm64 is required. armhf is best effort: the edge test skips that target
  # (with a message) when its libraries are missing.
  cross_install arm64 gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf qemu-user \
    libc6-dev:arm64 libssl-dev:arm64 libprotobuf-c-dev:arm64 pkgconf:arm64 || {
    echo "install-deps: could not install the arm64 cross packages" >&2
    exit 1
  }
  cross_install armhf libc6-dev:armhf libssl-dev:armhf libprotobuf-c-dev:armhf pkgconf:armhf || \
    echo "install-deps: warning: no armhf cross packages (see above); the edge test will" \
         "skip armhf" >&2
fi
echo "install-deps: all packages present" >&2
