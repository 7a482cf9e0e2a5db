#!/usr/bin/env bash
# Records the scheduler (perf sched_switch and sched_wakeup, all CPUs) while N libcohort
# clients upload to a real cohortd with nothing else in the window (bench-lcclients
# --upload-barrier), then shows where cohortd's loop thread was (bench/loop_offcpu.py).
#
#   bench/ingest_sched.sh BUILD_DIR OUT_DIR [N [P]] [-- extra cohortd flags]
#
# e.g. bench/ingest_sched.sh build-bench /tmp/isched 50 1000000 -- --max-uploads 50
# Needs perf (linux-perf) and a build with -Dbench=true. Runs 8 rounds. cohortd runs in
# a session (scheduling autogroup) of its own with this shell's autogroup nice value, as
# bench_server.py starts it (run it under COHORT_BENCH_NICE's setting to match a
# benchmark run: e.g. from a shell whose autogroup nice is -20).
set -euo pipefail
[ $# -ge 2 ] || { sed -n 2,11p "$0"; exit 2; }
build=$(realpath "$1")
out=$2
shift 2
n=50
p=1000000
if [ $# -gt 0 ] && [ "$1" != "--" ]; then n=$1; shift; fi
if [ $# -gt 0 ] && [ "$1" != "--" ]; then p=$1; shift; fi
[ "${1:-}" = "--" ] && shift
src=$(dirname "$(realpath "$0")")
mkdir -p "$out"
cd "$out"
rm -rf certs state
"$build/client/cli/cohort" certs --out certs --clients "$n" >/dev/null
"$build/bench/cohort-loadgen" mkmodel --out model.safetensors --params "$p" >/dev/null
port=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
nice_ag=$(sed -n 's/.* nice \(-\{0,1\}[0-9]*\)/\1/p' /proc/self/autogroup 2>/dev/null || echo 0)
# setsid execs cohortd in place (this background job leads no process group), so $! is
# cohortd's pid, which is also its loop thread's id.
setsid "$build/server/cohortd" --listen "127.0.0.1:$port" \
    --state-dir state --ca certs/ca.pem --cert certs/server.pem --key certs/server.key \
    --model model.safetensors --round-timeout 3600 --min-clients "$n" --rounds 8 \
    --durability relaxed --max-connections $((n + 100)) --idle-timeout-ms 3600000 \
    --upload-timeout-ms 3600000 --handshake-timeout-ms 600000 --frame-timeout-ms 3600000 \
    --log-level notice "$@" > cohortd.log 2>&1 &
server=$!
rec=
cleanup() {
    kill "$server" 2>/dev/null || true
    [ -n "$rec" ] && kill -INT "$rec" 2>/dev/null || true
}
trap cleanup EXIT
sleep 0.2
[ "$(cat "/proc/$server/comm" 2>/dev/null)" = cohortd ] ||
    { echo "ingest_sched.sh: cohortd is not pid $server (see $out/cohortd.log)" >&2; exit 1; }
echo "${nice_ag:-0}" > "/proc/$server/autogroup" 2>/dev/null || true
sleep 0.3
perf record -k mono -a -e sched:sched_switch -e sched:sched_wakeup -e sched:sched_wakeup_new -o sched.data &
rec=$!
sleep 0.3
timeout 600 "$build/bench/bench-lcclients" --server "127.0.0.1:$port" --ca certs/ca.pem \
    --certs certs --clients "$n" --upload-barrier > lc.out
kill -INT "$rec"
wait "$rec" || true
rec=
wait "$server" || true
trap - EXIT
/usr/bin/python3 "$src/loop_offcpu.py" sched.data lc.out "$server" 4 | tee offcpu.md
