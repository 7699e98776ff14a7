#!/usr/bin/env bash
# Two builds of the hot_path bench, alternated, pinned to CPU 1: what one
# step of the route decision bought, on a VM whose criterion medians drift
# between two runs more than most changes move them.
#
#   bash benches/ab.sh OLD_BIN NEW_BIN [FILTER] [ROUNDS]
#
# OLD_BIN and NEW_BIN are copies of target/release/deps/hot_path-* (cargo
# bench --bench hot_path --no-run prints the path; copy it aside before
# changing the code). FILTER is criterion's (a regex over bench ids,
# default `route_decision`), ROUNDS the alternations (default 6). Each run
# measures 2 s; for every bench it prints the minimum, the tenth
# percentile and the median of criterion's per-sample times (each sample
# is a batch of calls, divided by their count, from
# target/criterion/<id>/new/sample.json). The minimum and the tenth
# percentile are what the code costs; the median also holds the host's
# interruptions, which on this VM come in bursts of seconds.
set -euo pipefail

[ $# -ge 2 ] || {
    echo "usage: bash benches/ab.sh OLD_BIN NEW_BIN [FILTER] [ROUNDS]" >&2
    exit 2
}
for b in "$1" "$2"; do
    [ -f "$b" ] && [ -x "$b" ] || { echo "ab.sh: $b is not an executable" >&2; exit 2; }
done
OLD=$(realpath "$1") NEW=$(realpath "$2") FILTER=${3:-route_decision} ROUNDS=${4:-6}
cd "$(dirname "$0")/.."
# Where criterion writes the samples read below, whatever the environment.
export CRITERION_HOME=$PWD/target/criterion

stamp=$(mktemp)
trap 'rm -f "$stamp"' EXIT
for round in $(seq "$ROUNDS"); do
    for side in old new; do
        bin=$OLD
        [ "$side" = new ] && bin=$NEW
        touch "$stamp"
        taskset -c 1 "$bin" --bench --warm-up-time 1 --measurement-time 2 \
            --noplot "$FILTER" >/dev/null 2>&1 || {
            echo "ab.sh: $bin failed" >&2
            exit 1
        }
        find "$CRITERION_HOME" -path '*/new/sample.json' -newer "$stamp" |
            sort | python3 -c '
import json, os, sys
round, side, home = sys.argv[1], sys.argv[2], sys.argv[3]
for path in sys.stdin.read().split():
    d = json.load(open(path))
    x = sorted(t / i for t, i in zip(d["times"], d["iters"]))
    bench = os.path.relpath(path, home).rsplit("/new/", 1)[0]
    print(f"round {round} {side}  {bench:40} min {x[0]:7.1f}  p10 {x[len(x) // 10]:7.1f}  median {x[len(x) // 2]:7.1f} ns")
' "$round" "$side" "$CRITERION_HOME"
    done
done
