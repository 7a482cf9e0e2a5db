#!/usr/bin/env bash
# Edge devices: cross-builds libcohort and client/examples/edge_client for arm64
# and armhf with deploy/cross/*.ini (Debian 12 cross compilers and multiarch
# OpenSSL/protobuf-c), prints the stripped sizes, then runs the programs under
# qemu-user as members of a real federation with a native cohortd
# (edge_federation.py: exact checkpoints, on-device training, peak RSS).
#
#   bash tests/edge/test_edge.sh SOURCE_DIR BUILD_DIR   (BUILD_DIR: a native build
#                                                        with cohortd and cohort)
#
# Exits 77 (meson: skipped) with a "SKIP:" line when the arm64 toolchain,
# its libraries or qemu-user are missing; `bash deploy/install-deps.sh --cross`
# installs them. armhf alone missing skips only armhf. EDGE_KEEP=1 keeps the
# cross build directories.
set -euo pipefail
src=$(cd "${1:?usage: test_edge.sh SOURCE_DIR BUILD_DIR}" && pwd)
build=$(cd "${2:?usage: test_edge.sh SOURCE_DIR BUILD_DIR}" && pwd)
start=$(date +%s)

# What a target needs on this machine; prints the first thing missing.
missing() {
  local triplet=$1 qemu=$2 tmp
  for tool in "$triplet-gcc" "$triplet-strip" "$triplet-pkg-config" "$qemu" meson ninja python3; do
    command -v "$tool" >/dev/null 2>&1 || { echo "$tool not found"; return; }
  done
  "$triplet-pkg-config" --exists openssl libprotobuf-c 2>/dev/null ||
    { echo "no $triplet OpenSSL/protobuf-c development files (pkg-config)"; return; }
  tmp=$(mktemp /tmp/cohort-edge-cc-XXXXXX)
  if ! echo 'int main(void) { return 0; }' | "$triplet-gcc" -x c - -o "$tmp" 2>/dev/null; then
    rm -f "$tmp"
    echo "$triplet-gcc cannot link a program (no $triplet libc development files)"
    return
  fi
  rm -f "$tmp"
}

for f in "$build/server/cohortd" "$build/client/cli/cohort"; do
  [ -x "$f" ] || { echo "not ok - $f is missing; build the native tree first"; exit 1; }
done

all_targets=("arm64 aarch64-linux-gnu qemu-aarch64" "armhf arm-linux-gnueabihf qemu-arm")
targets=()
for spec in "${all_targets[@]}"; do
  read -r name triplet qemu <<<"$spec"
  why=$(missing "$triplet" "$qemu")
  if [ -n "$why" ]; then
    if [ "$name" = arm64 ]; then
      echo "SKIP: edge cross test needs the arm64 cross toolchain and qemu-user: $why" \
           "(install them with: bash deploy/install-deps.sh --cross)"
      exit 77
    fi
    echo "# SKIP $name: $why (bash deploy/install-deps.sh --cross installs it where the" \
         "mirror has the $name packages)"
    continue
  fi
  targets+=("$spec")
done

scratch=$(mktemp -d /tmp/cohort-edge-XXXXXX)
cleanup() { [ "${EDGE_KEEP:-0}" = 1 ] && echo "# kept $scratch" || rm -rf "$scratch"; }
trap cleanup EXIT

fail=0
env_targets=""
declare -A cmds
# The build machine's own -Os build comes first: the same program natively, as
# the reference for sizes and memory.
host=$(uname -m)
for spec in "$host native -" "${targets[@]}"; do
  read -r name triplet qemu <<<"$spec"
  bd="$scratch/$name"
  t0=$(date +%s)
  if [ "$triplet" = native ]; then
    cross=(); tool=""
  else
    cross=(--cross-file "$src/deploy/cross/$triplet.ini"); tool="$triplet-"
  fi
  # minsize (-Os) is what a device build would use; --werror as in CI, so a
  # warning that only a 32-bit or Arm target shows fails here.
  if ! meson setup "$bd" "$src" "${cross[@]}" -Dserver=false -Dtests=disabled \
        --buildtype=minsize --werror >"$scratch/$name-setup.log" 2>&1 ||
     ! ninja -C "$bd" >"$scratch/$name-build.log" 2>&1; then
    echo "not ok - $name: build of libcohort and edge_client failed"
    tail -n 30 "$scratch/$name-setup.log" "$scratch/$name-build.log" 2>/dev/null | sed 's/^/#   /'
    fail=1
    continue
  fi
  exe="$bd/client/examples/edge_client"
  so=$(readlink -f "$bd/client/libcohort.so")
  arch=$(readelf -h "$exe" | sed -n 's/^ *Class: *//p; s/^ *Machine: *//p' | tr '\n' ' ')
  echo "ok - $name: libcohort and edge_client built in $(( $(date +%s) - t0 )) s (${arch% })"
  "${tool}strip" --strip-debug -o "$scratch/$name-libcohort.a" "$bd/client/libcohort.a"
  "${tool}strip" --strip-unneeded -o "$scratch/$name-libcohort.so" "$so"
  "${tool}strip" -o "$scratch/$name-edge_client" "$exe"
  # File bytes, and the loaded bytes (text+data+bss; aarch64 files carry
  # 64 KiB page-alignment padding that is not loaded).
  sz() { stat -c %s "$1"; }
  mem() { "${tool}size" -B "$1" | awk 'NR == 2 {print $4}'; }
  echo "# size $name (-Os, stripped; file bytes / text+data+bss):" \
       "libcohort.a $(sz "$scratch/$name-libcohort.a")," \
       "libcohort.so $(sz "$scratch/$name-libcohort.so") / $(mem "$scratch/$name-libcohort.so")," \
       "edge_client $(sz "$scratch/$name-edge_client") / $(mem "$scratch/$name-edge_client")"
  echo "# needed $name edge_client: $(readelf -d "$exe" | awk '/NEEDED/ {print $5}' | tr -d '[]' | tr '\n' ' ')"
  run=()
  if [ "$triplet" != native ]; then
    # With Debian's multiarch libc (libc6:<arch>, which libssl3:<arch> pulls in)
    # the program's loader is on the host's root, where qemu looks by default.
    # Only without it is the cross toolchain's /usr/<triplet> the root to use:
    # that loader with the multiarch libc.so.6 hangs in pthread_create.
    interp=$(readelf -l "$exe" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
    run=("$qemu")
    [ -e "$interp" ] || run+=(-L "/usr/$triplet")
  fi
  # SIGKILL for a hung emulation: edge_client takes SIGTERM through a thread.
  if timeout -s KILL 60 "${run[@]}" "$exe" --help >/dev/null 2>&1; then
    echo "ok - $name: edge_client starts${run[*]:+ under ${run[*]}}"
  else
    echo "not ok - $name: edge_client does not start${run[*]:+ under ${run[*]}}"
    fail=1
    continue
  fi
  env_targets="$env_targets $name"
  cmds[$name]="${run[*]} $exe"
done

if [ -n "$env_targets" ]; then
  fed_env=(PYTHONDONTWRITEBYTECODE=1 COHORT_BUILD="$build" EDGE_TARGETS="$env_targets")
  for n in $env_targets; do
    fed_env+=("EDGE_CMD_$n=${cmds[$n]}")
  done
  env "${fed_env[@]}" python3 "$src/tests/edge/edge_federation.py" || fail=1
fi
echo "# edge test took $(( $(date +%s) - start )) s"
[ "$fail" = 0 ] && echo "edge-cross: passed" || echo "edge-cross: failed"
exit $fail
