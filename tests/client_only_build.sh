#!/usr/bin/env bash
# The edge build: configure and build libcohort alone (-Dserver=false) in a
# scratch directory and check that neither the static nor the shared library
# needs libuv, SQLite or OpenBLAS, and that only the public API is exported.
set -euo pipefail
src=${1:?source dir}
out=$(mktemp -d /tmp/cohort-client-only-XXXXXX)
trap 'rm -rf "$out"' EXIT
meson setup "$out" "$src" -Dserver=false -Dtests=disabled >"$out.log" 2>&1 || { cat "$out.log"; exit 1; }
ninja -C "$out" >>"$out.log" 2>&1 || { cat "$out.log"; exit 1; }
rm -f "$out.log"
so=$(ls "$out"/client/libcohort.so.* | head -1)
a="$out/client/libcohort.a"
fail=0
[ -f "$a" ] && echo "ok - static library built: $(du -h "$a" | cut -f1)" || { echo "not ok - no libcohort.a"; fail=1; }
[ -f "$so" ] && echo "ok - shared library built: $(du -hL "$so" | cut -f1)" || { echo "not ok - no libcohort.so"; fail=1; }
needed=$(readelf -d "$so" | awk '/NEEDED/ {print $5}' | tr -d '[]' | tr '\n' ' ')
echo "# NEEDED: $needed"
for bad in libuv libsqlite3 libopenblas libblas libcjson; do
  if echo "$needed" | grep -q "$bad"; then echo "not ok - libcohort.so needs $bad"; fail=1; fi
done
echo "$needed" | grep -q libssl && echo "ok - links OpenSSL" || { echo "not ok - OpenSSL missing"; fail=1; }
if nm -A "$a" 2>/dev/null | grep -E ' U (uv_|sqlite3_|cblas_)' ; then
  echo "not ok - libcohort.a refers to server-only symbols"; fail=1
else
  echo "ok - libcohort.a refers to no libuv, SQLite or BLAS symbol"
fi
bad_exports=$(nm -D --defined-only "$so" | awk '{print $3}' | grep -v -e '^cohort_[a-z]' -e '^COHORT_[0-9.]*$' || true)
if [ -n "$bad_exports" ]; then
  echo "not ok - exports beyond the public API: $(echo $bad_exports | head -c 300)"; fail=1
else
  echo "ok - exports only cohort_* ($(nm -D --defined-only "$so" | wc -l) symbols)"
fi
[ -f "$out/client/cli/cohort" ] && { echo "not ok - the CLI was built without the server"; fail=1; }
[ "$fail" = 0 ] && echo "client-only build: 5 passed, 0 failed" || echo "client-only build: failed"
exit $fail
