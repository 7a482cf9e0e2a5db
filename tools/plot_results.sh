#!/bin/sh
# Plots test accuracy against rounds from `cohort sim` CSVs (columns
# round,participants,test_accuracy,train_loss) into an SVG with gnuplot.
#
#   tools/plot_results.sh OUT.svg TITLE file1.csv label1 [file2.csv label2 ...]
#
# Only evaluated rounds are drawn (rows with an empty test_accuracy are skipped),
# as lines, one per file, with its label in the key.
set -eu

usage() {
    echo "usage: $0 OUT.svg TITLE file1.csv label1 [file2.csv label2 ...]" >&2
    exit 2
}

[ $# -ge 4 ] || usage
[ $(( ($# - 2) % 2 )) -eq 0 ] || usage
out=$1
title=$2
shift 2

command -v gnuplot >/dev/null 2>&1 || {
    echo "$0: gnuplot not found (Debian: apt-get install gnuplot-nox)" >&2
    exit 1
}

# gnuplot string literals: single quotes, a quote doubled.
quote() {
    printf "'%s'" "$(printf '%s' "$1" | sed "s/'/''/g")"
}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/plot_results.XXXXXX")
trap 'rm -rf "$tmp"' EXIT INT TERM

# One "round accuracy" data file per input: gnuplot then needs no CSV quirks and a
# file name with odd characters never reaches its parser.
plot=""
i=0
while [ $# -gt 0 ]; do
    csv=$1
    label=$2
    shift 2
    [ -r "$csv" ] || { echo "$0: cannot read $csv" >&2; exit 1; }
    i=$((i + 1))
    awk -F, 'NR == 1 {
                 for (c = 1; c <= NF; c++) { if ($c == "round") rc = c; if ($c == "test_accuracy") ac = c }
                 if (!rc || !ac) { print "no round/test_accuracy columns" > "/dev/stderr"; exit 1 }
                 next
             }
             $ac != "" { print $rc, $ac }' "$csv" > "$tmp/$i.dat" || {
        echo "$0: $csv is not a cohort sim CSV" >&2
        exit 1
    }
    [ -s "$tmp/$i.dat" ] || { echo "$0: $csv has no evaluated rounds" >&2; exit 1; }
    [ -z "$plot" ] || plot="$plot, "
    plot="$plot$(quote "$tmp/$i.dat") using 1:2 with lines linewidth 1.5 title $(quote "$label")"
done

cat > "$tmp/plot.gp" <<GP
set terminal svg size 900,560 dynamic enhanced font 'sans,12' background rgb 'white'
set output $(quote "$out")
set title $(quote "$title") noenhanced
set xlabel 'round'
set ylabel 'test accuracy'
set key bottom right noenhanced
set grid
set datafile separator whitespace
plot $plot
GP
gnuplot "$tmp/plot.gp"
echo "wrote $out"
