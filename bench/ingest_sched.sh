#!/usr/bin/env bash
# Records the scheduler (perf sched_switch, all CPUs) while N libcohort clients upload
# to a real cohortd with nothing else in the window (bench-lcclients --upload-barrier),
# then shows where cohortd's loop thread was (bench/loop_offcpu.py).
#
#   bench/ingest_sched.sh BUILD_DIR OUT_DIR [N] [P] [-- extra cohortd flags]
#
# e.g. bench/ingest_sched.sh build-bench /tmp/isched 50 1000000 -- --max-uploads 50
# Needs perf (linux-perf) and a build with -Dbench=true. Runs 8 rounds.
set -euo pipefail
build=$(realpath "$1")
out=$2
n=${3:-50}
p=${4:-1000000}
shift $(( $# < 4 ? $# : 4 ))
[ "${1:-}" = "--" ] && shift
src=$(dirname "$(realpath "$0")")
mkdir -p "$out"
cd "$out"
rm -rf certs state
"$build/client/cli/cohort" certs --out certs --clients "$n" >/dev/null
"$build/bench/cohort-loadgen" mkmodel --out model.safetensors --params "$p" >/dev/null
port=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# cohortd in a session (scheduling autogroup) of its own, as bench_server.py starts it.
setsid "$build/server/cohortd" --listen "127.0.0.1:$port" --state-dir state \
    --ca certs/ca.pem --cert certs/server.pem --key certs/server.key \
    --model model.safetensors --round-timeout 3600 --min-clients "$n" --rounds 8 \
    --durability relaxed --max-connections $((n + 100)) --log-level notice "$@" \
    > cohortd.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
done
perf record -q -k mono -a -e sched:sched_switch -o sched.data &
rec=$!
sleep 0.3
"$build/bench/bench-lcclients" --server "127.0.0.1:$port" --ca certs/ca.pem --certs certs \
    --clients "$n" --upload-barrier > lc.out
kill -INT $rec
wait $rec || true
wait $server || true
trap - EXIT
/usr/bin/python3 "$src/loop_offcpu.py" sched.data lc.out "$server" 4 | tee offcpu.md
