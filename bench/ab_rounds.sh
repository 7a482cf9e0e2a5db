#!/bin/bash
# Alternating runs of two builds at one round point, for changes smaller than
# this VM's drift between runs: each iteration runs a real cohortd and N
# libcohort clients (bench-lcclients, threads of one process) with build A,
# then with build B, and prints per run the median round (rounds.duration_s,
# rounds 2..R) and cohortd's CPU seconds (user + system) over the whole run.
#
#   bench/ab_rounds.sh [-n N] [-p P] [-r ROUNDS] [-i ITERATIONS] NAME=BUILD NAME=BUILD ...
#
# BUILD is a build directory configured with -Dbench=true (e.g. a git worktree
# of the old commit with its own build-bench). Defaults: N 50, P 1e6, 12 rounds,
# 8 iterations. cohortd runs in a session (autogroup) of its own, as in
# bench_server.py; run as root for the nice -20 both sides get. The seventh
# session's comparisons in docs/performance.md were taken this way.
set -euo pipefail
n=50 p=1000000 rounds=12 iters=8
while getopts n:p:r:i: o; do
    case $o in
    n) n=$OPTARG ;;
    p) p=$OPTARG ;;
    r) rounds=$OPTARG ;;
    i) iters=$OPTARG ;;
    *) exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[ $# -ge 2 ] || { echo "usage: $0 [-n N] [-p P] [-r R] [-i I] NAME=BUILD NAME=BUILD ..." >&2; exit 2; }
first=${1#*=}
dir=$(mktemp -d /tmp/cohort-ab-XXXXXX)
trap 'rm -rf "$dir"' EXIT
echo "# ab_rounds: N=$n P=$p rounds=$rounds iterations=$iters; columns: name median_round_s cohortd_cpu_s" >&2
"$first/client/cli/cohort" certs --out "$dir/certs" --clients "$n" >/dev/null
"$first/bench/cohort-loadgen" mkmodel --out "$dir/model.safetensors" --params "$p" >/dev/null
nice=()
[ "$(id -u)" = 0 ] && nice=(nice -n -20)
for _ in $(seq "$iters"); do
    for cfg in "$@"; do
        name=${cfg%%=*} b=${cfg#*=}
        rm -rf "$dir/state"
        port=$((20000 + RANDOM % 20000))
        setsid "${nice[@]}" /usr/bin/time -o "$dir/cpu" -f "%U %S" "$b/server/cohortd" \
            --listen "127.0.0.1:$port" --state-dir "$dir/state" --ca "$dir/certs/ca.pem" \
            --cert "$dir/certs/server.pem" --key "$dir/certs/server.key" \
            --model "$dir/model.safetensors" --round-timeout 3600 --idle-timeout-ms 3600000 \
            --upload-timeout-ms 3600000 --handshake-timeout-ms 600000 \
            --frame-timeout-ms 3600000 --log-level notice --min-clients "$n" \
            --rounds "$rounds" --max-connections $((n + 100)) >"$dir/cohortd.log" 2>&1 &
        srv=$!
        for _ in $(seq 100); do
            grep -q "listening" "$dir/cohortd.log" 2>/dev/null && break
            sleep 0.05
        done
        "${nice[@]}" "$b/bench/bench-lcclients" --server "127.0.0.1:$port" --ca "$dir/certs/ca.pem" \
            --certs "$dir/certs" --clients "$n" >/dev/null 2>"$dir/lc.err" || true
        wait "$srv" || { echo "$name: cohortd failed; see $dir/cohortd.log" >&2; trap - EXIT; exit 1; }
        med=$(sqlite3 "$dir/state/cohort.db" \
            "SELECT duration_s FROM rounds WHERE round >= 2 ORDER BY duration_s" |
            awk '{a[NR] = $1} END {printf "%.4f", a[int((NR + 1) / 2)]}')
        echo "$name $med $(awk '{print $1 + $2}' "$dir/cpu")"
    done
done
