#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind (the same on a busy
# machine, unlike time). The target runs under valgrind twice, for N and for
# 2N requests, and the difference over N is the per-request count: start-up,
# TLS handshakes and warm-up drop out.
#
#   bash benches/callgrind.sh [cyan|haproxy] [h1|h2] [N]
#
# h1: plaintext HTTP/1.1 keep-alive, `h2load --h1 -c16`; h2: HTTP/2 over
# TLS 1.3, `h2load -c16 -m10`. Defaults: cyan h1 12000. Backends: two nginx
# on loopback, as in compare.sh (its config files are used here too).
#
# Environment: CYAN (binary, default target/release/cyan; nothing is built
# here), CACHE=1 (simulate caches: I1/D1 misses per request too),
# CYAN_EXTRA (TOML appended to cyan's config, e.g. an [access_log] table),
# KEEP=1 (keep the work dir with the callgrind files).
#
# Traffic goes to 127.0.0.1 only; everything started is stopped by PID.
set -euo pipefail

TARGET=${1:-cyan}
PROTO=${2:-h1}
N=${3:-12000}
HERE=$(cd "$(dirname "$0")" && pwd)
CFG=$HERE/compare
CYAN=${CYAN:-$HERE/../target/release/cyan}
CACHE=${CACHE:-0}

for tool in valgrind callgrind_annotate nginx h2load openssl python3; do
    command -v "$tool" >/dev/null || { echo "callgrind.sh: $tool is missing" >&2; exit 2; }
done
case "$TARGET" in
cyan) [[ -x "$CYAN" ]] || { echo "callgrind.sh: no cyan binary at $CYAN (cargo build --release)" >&2; exit 2; } ;;
haproxy) command -v haproxy >/dev/null || { echo "callgrind.sh: haproxy is missing" >&2; exit 2; } ;;
*) echo "callgrind.sh: target is cyan or haproxy, not '$TARGET'" >&2; exit 2 ;;
esac
[[ "$PROTO" == h1 || "$PROTO" == h2 ]] || { echo "callgrind.sh: protocol is h1 or h2, not '$PROTO'" >&2; exit 2; }
[[ "$N" =~ ^[0-9]+$ ]] && ((N > 0)) || { echo "callgrind.sh: N is a positive count, not '$N'" >&2; exit 2; }

WORK=$(mktemp -d /tmp/cyan-callgrind.XXXXXX)
PIDS=()
cleanup() {
    [[ -s "$WORK/target.pid" ]] && kill -KILL "$(cat "$WORK/target.pid")" 2>/dev/null
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [[ "${KEEP:-0}" == 1 ]] && echo "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT

# shellcheck source=benches/lab.sh
source "$HERE/lab.sh"
lab_up

# count N OUT: runs the target under callgrind for N requests; prints the total.
count() {
    local n=$1 out=$2 pid
    local vg=(valgrind --tool=callgrind "--callgrind-out-file=$out")
    ((CACHE)) && vg+=(--cache-sim=yes)
    if [[ "$TARGET" == cyan ]]; then
        "${PIN_PROXY[@]}" "${vg[@]}" "$CYAN" run --config "$WORK/cyan.toml" >"$out.log" 2>&1 &
    else
        "${PIN_PROXY[@]}" "${vg[@]}" haproxy -db -f "$WORK/haproxy.cfg" >"$out.log" 2>&1 &
    fi
    pid=$!
    # Runs in a command substitution: the parent's PIDS does not see this
    # PID, so it goes in a file the cleanup reads, and a failure stops it
    # here.
    echo "$pid" >"$WORK/target.pid"
    fail() { echo "callgrind.sh: $*" >&2; kill -KILL "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; exit 1; }
    local port=$PORT
    [[ "$PROTO" == h2 ]] && port=$TLS
    wait_port "$port" || fail "$TARGET did not start: $(tail -3 "$out.log")"
    sleep 1
    if [[ "$PROTO" == h1 ]]; then
        "${PIN_LOAD[@]}" h2load --h1 -c16 -n "$n" "http://127.0.0.1:$PORT/" >"$out.load" 2>&1
    else
        "${PIN_LOAD[@]}" h2load -c16 -m10 -n "$n" "https://127.0.0.1:$TLS/" >"$out.load" 2>&1
    fi
    grep -q " $n succeeded" "$out.load" || fail "not every request succeeded: $(grep -E '^requests:' "$out.load")"
    # cyan drains on SIGINT; HAProxy in the foreground (-db) stops on SIGTERM.
    if [[ "$TARGET" == cyan ]]; then kill -INT "$pid"; else kill -TERM "$pid"; fi
    local i
    for i in $(seq 300); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    kill -0 "$pid" 2>/dev/null && fail "$TARGET did not stop within 60 s of its signal"
    wait "$pid" || true
    rm -f "$WORK/target.pid"
    # The events line names the columns; the summary line holds the totals.
    awk '/^events:/ {for (i = 2; i <= NF; i++) name[i - 1] = $i}
         /^summary:/ {for (i = 2; i <= NF; i++) printf "%s=%s ", name[i - 1], $i; print ""}' "$out"
}

echo "callgrind.sh: $TARGET $PROTO, $N and $((2 * N)) requests (h2load -c16$([[ $PROTO == h2 ]] && echo ' -m10, TLS 1.3'))"
one=$(count "$N" "$WORK/one.cg")
two=$(count "$((2 * N))" "$WORK/two.cg")
echo "$N requests:   $one"
echo "$((2 * N)) requests: $two"
python3 - "$N" "$one" "$two" <<'EOF'
import sys
n = int(sys.argv[1])
one = dict(kv.split("=") for kv in sys.argv[2].split())
two = dict(kv.split("=") for kv in sys.argv[3].split())
print("per request:  " + "  ".join(f"{k} {(int(two[k]) - int(one[k])) / n:,.0f}" for k in one))
EOF
