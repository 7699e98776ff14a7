#!/usr/bin/env bash
# Instructions per route decision, counted by callgrind: the same on a busy
# machine, where the criterion times of `hot_path` swing by 20-40 %.
#
#   bash benches/route_ir.sh [MODE...]     (default: all five modes)
#
# Each mode runs the hot_path bench binary with HOT_PATH_COUNT=N and 2N
# under `valgrind --tool=callgrind`; (I(2N) - I(N)) / N is what one decision
# costs, the loop included, with set-up and exit cancelled out.
# Modes: draw, sticky_map, sticky_lines (the decision `route_decision/*`
# times), route (the service match alone), pick (the endpoint pick alone).
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-20000}
MODES=("$@")
[ ${#MODES[@]} -gt 0 ] || MODES=(draw sticky_map sticky_lines route pick)

command -v valgrind >/dev/null || {
    echo "route_ir.sh: valgrind is needed (apt-get install valgrind)" >&2
    exit 1
}

BIN=$(cargo bench --bench hot_path --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "hot_path" and m.get("executable"):
        print(m["executable"])')
[ -x "$BIN" ] || {
    echo "route_ir.sh: could not build the hot_path bench" >&2
    exit 1
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

count() { # mode n -> total instructions
    HOT_PATH_MODE=$1 HOT_PATH_COUNT=$2 valgrind --tool=callgrind \
        --callgrind-out-file="$tmp/cg.$1.$2" "$BIN" >/dev/null 2>"$tmp/log.$1.$2" || {
        cat "$tmp/log.$1.$2" >&2
        exit 1
    }
    sed -n 's/^summary: //p' "$tmp/cg.$1.$2"
}

echo "instructions per decision (callgrind, N=$N; git $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
for m in "${MODES[@]}"; do
    a=$(count "$m" "$N")
    b=$(count "$m" $((2 * N)))
    printf '%-14s %6d\n' "$m" $(((b - a) / N))
done
