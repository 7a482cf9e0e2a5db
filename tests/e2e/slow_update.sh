#!/bin/sh
# A trainer for `cohort client --exec`: waits DELAY seconds (so rounds take a
# known minimum time), then writes the fixed update SRC as this round's update.
# usage: slow_update.sh DELAY SRC GLOBAL UPDATE
sleep "$1" && cp "$2" "$4"
