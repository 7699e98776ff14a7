#!/usr/bin/env bash
# User and system CPU per request of two cyan binaries and HAProxy, all up
# at once on the proxy CPU and measured in turn, round after round: what a
# build change (PGO, BOLT) buys on the clock, with HAProxy as the yardstick
# in the same rounds.
#
#   bash benches/cpu_ab.sh OLD_BIN NEW_BIN [ROUNDS]     # default 6 rounds
#   LOAD=post bash benches/cpu_ab.sh ...                # another request shape
#
# Each turn: 2 s of the load to warm, then DUR seconds (8) of it while the
# target's utime and stime in /proc/PID/stat are read before and after.
# LOAD picks the requests:
#   get    (default) HTTP/1.1 GETs, `wrk -t1 -c64` with compare/users.lua
#   post   HTTP/1.1 POSTs of a 4 KiB body, `h2load --h1 -c64`
#   h2tls  HTTP/2 over TLS 1.3, `h2load -c16 -m10`
# Prints one line per target and round: req/s, user, system and total µs
# per request. The binaries run with the lab's cyan.toml (benches/lab.sh).
# Traffic goes to 127.0.0.1 only; everything started is stopped by PID.
set -euo pipefail

[[ $# -ge 2 ]] || { echo "usage: bash benches/cpu_ab.sh OLD_BIN NEW_BIN [ROUNDS]" >&2; exit 2; }
for b in "$1" "$2"; do
    [[ -f "$b" && -x "$b" ]] || { echo "cpu_ab.sh: $b is not an executable" >&2; exit 2; }
done
OLD=$(realpath "$1") NEW=$(realpath "$2") ROUNDS=${3:-6} DUR=${DUR:-8} LOAD=${LOAD:-get}
case $LOAD in
    get | post | h2tls) ;;
    *) echo "cpu_ab.sh: LOAD=$LOAD: one of get, post, h2tls" >&2; exit 2 ;;
esac
command -v haproxy >/dev/null || { echo "cpu_ab.sh: haproxy is missing" >&2; exit 2; }
HERE=$(cd "$(dirname "$0")" && pwd)
CFG=$HERE/compare
# shellcheck source=benches/lab.sh
source "$HERE/lab.sh"
lab_begin cpu_ab.sh
lab_up

# The second cyan and HAProxy on ports of their own.
NPORT=$(free_port) NTLS=$(free_port) HPORT=$(free_port) HTLS=$(free_port)
sed -e "s#127.0.0.1:$PORT\"#127.0.0.1:$NPORT\"#; s#127.0.0.1:$TLS\"#127.0.0.1:$NTLS\"#" \
    "$WORK/cyan.toml" >"$WORK/new.toml"
sed -e "s#127.0.0.1:$PORT\$#127.0.0.1:$HPORT#; s#127.0.0.1:$TLS #127.0.0.1:$HTLS #" \
    "$WORK/haproxy.cfg" >"$WORK/h.cfg"
"${PIN_PROXY[@]}" "$OLD" run --config "$WORK/cyan.toml" >"$WORK/old.log" 2>&1 &
PIDS+=($!)
OPID=$!
"${PIN_PROXY[@]}" "$NEW" run --config "$WORK/new.toml" >"$WORK/new.log" 2>&1 &
PIDS+=($!)
NPID=$!
"${PIN_PROXY[@]}" haproxy -db -f "$WORK/h.cfg" >"$WORK/haproxy.log" 2>&1 &
PIDS+=($!)
HPID=$!
for p in "$PORT" "$NPORT" "$HPORT" "$TLS" "$NTLS" "$HTLS"; do
    wait_port "$p" || { echo "cpu_ab.sh: nothing answers on $p: $(tail -3 "$WORK"/*.log)" >&2; exit 1; }
done

# load SECONDS PORT TLS_PORT: LOAD's requests for SECONDS; prints the
# generator's report. Fails, saying why, when the generator failed, any
# request failed or none completed (the caller's `out=$(load ...)` runs
# without errexit, so each step checks).
load() {
    local out rc=0 port=$2 n
    case $LOAD in
        get) out=$("${PIN_LOAD[@]}" wrk -t1 -c64 "-d$1s" -s "$CFG/users.lua" "http://127.0.0.1:$2/" 2>&1) || rc=$? ;;
        post) out=$("${PIN_LOAD[@]}" h2load --h1 -c64 -D "$1" -d "$WORK/body-4k" "http://127.0.0.1:$2/" 2>&1) || rc=$? ;;
        h2tls) port=$3 out=$("${PIN_LOAD[@]}" h2load -c16 -m10 -D "$1" "https://127.0.0.1:$3/" 2>&1) || rc=$? ;;
    esac
    n=$(completed "$out")
    if ((rc != 0)) || lab_load_failed "$out" || ! [[ $n =~ ^[1-9][0-9]*$ ]]; then
        echo "cpu_ab.sh: $LOAD on port $port: exit $rc, $n requests completed: $out" >&2
        return 1
    fi
    echo "$out"
}
# Requests that succeeded, from wrk's or h2load's report (h2load: the number
# before "succeeded,").
completed() {
    awk '/ requests in /{print $1}
         /^requests: /{for (i = 2; i <= NF; i++) if ($i == "succeeded,") print $(i - 1)}' <<<"$1"
}

ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12, $13}'; }
for round in $(seq "$ROUNDS"); do
    for t in "old:$PORT:$TLS:$OPID" "new:$NPORT:$NTLS:$NPID" "haproxy:$HPORT:$HTLS:$HPID"; do
        IFS=: read -r name port tls pid <<<"$t"
        load 2 "$port" "$tls" >/dev/null || exit 1
        read -r u0 s0 < <(ticks "$pid")
        out=$(load "$DUR" "$port" "$tls") || exit 1
        read -r u1 s1 < <(ticks "$pid")
        req=$(completed "$out")
        python3 -c '
import os, sys
name, rnd, req, dur, u0, s0, u1, s1 = sys.argv[1:]
req, tck = int(req), os.sysconf("SC_CLK_TCK")
u = (int(u1) - int(u0)) / tck * 1e6 / req
s = (int(s1) - int(s0)) / tck * 1e6 / req
print(f"round {rnd} {name:8} req/s {req / int(dur):7.0f}  user {u:6.2f}  system {s:6.2f}  total {u + s:6.2f} us per request")
' "$name" "$round" "$req" "$DUR" "$u0" "$s0" "$u1" "$s1"
    done
done
