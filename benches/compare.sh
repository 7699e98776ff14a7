#!/usr/bin/env bash
# Side-by-side load benchmark: cyan vs HAProxy 2.6 vs nginx 1.22 vs direct,
# on loopback, one proxy at a time, interleaved rounds. See benches/README.md.
#
#   bash benches/compare.sh                 # everything (~25 min), writes benches/RESULTS.md
#   MODES="closed mem" bash benches/compare.sh
#
# Knobs (environment):
#   MODES        closed fixed tls mem syscalls mt (default: all)
#   ROUNDS       5; DUR 10 (closed-loop seconds); DUR_SHORT 8 (fixed-rate,
#                TLS, multi-thread seconds); RATE 5000; IDLE_CONNS 2000
#   FIXED_SLOTS  4: the fixed-rate mode's slots per target per round
#                (DUR_SHORT / FIXED_SLOTS whole seconds each); FIXED_SKIP
#                0.25: seconds left out at each slot's start
#   OUT          benches/RESULTS.md
#   SKIP_BUILD=1 use target/release/cyan as it is
#   CYAN_BIN     measure this cyan binary (nothing is built)
#   BACKEND_BODY length (default) | chunked: backend response framing
#   KEEP=1       keep the temp dir with every raw output
#   QUIET_WAIT   600: most seconds to wait, before each measurement, for
#                other busy processes (cargo, rustc, tests) to finish
#
# Traffic goes to 127.0.0.1 only; every process it starts is stopped by PID.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
CFG=$HERE/compare
MODES=${MODES:-"closed fixed tls mem syscalls mt"}
# Five rounds: on a shared host one round's ratios swing by 10-40 %, more
# than some targets' margins; the report counts the rounds that met each.
ROUNDS=${ROUNDS:-5}
DUR=${DUR:-10}
# Fixed-rate, TLS and multi-thread runs: a little shorter, to fit ~25 min.
DUR_SHORT=${DUR_SHORT:-8}
RATE=${RATE:-5000}
IDLE_CONNS=${IDLE_CONNS:-2000}
OUT=${OUT:-$HERE/RESULTS.md}
QUIET_WAIT=${QUIET_WAIT:-600}
# Fixed rate: RATE_CLIENTS connections, each at RATE/RATE_CLIENTS req/s.
RATE_CLIENTS=${RATE_CLIENTS:-10}
# Fixed rate: each round's DUR_SHORT seconds per target are run as
# FIXED_SLOTS slots interleaved with the other targets (see mode_fixed),
# each slot's first FIXED_SKIP seconds left out.
FIXED_SLOTS=${FIXED_SLOTS:-4}
FIXED_SKIP=${FIXED_SKIP:-0.25}
# Whole seconds per slot (h2load -D); checked here, not ten minutes in.
FIXED_SLOT_SECS=0
if [[ "$FIXED_SLOTS" =~ ^[1-9][0-9]*$ ]]; then FIXED_SLOT_SECS=$((DUR_SHORT / FIXED_SLOTS)); fi
if [[ " $MODES " == *" fixed "* ]] && ((FIXED_SLOT_SECS < 1)); then
    echo "compare.sh: FIXED_SLOTS must be a whole number from 1 to DUR_SHORT ($DUR_SHORT), not '$FIXED_SLOTS'" >&2
    exit 2
fi
# Backend response framing: "length" (Content-Length, the default) or
# "chunked" (a diagnostic: shows how a proxy behaves when the upstream body
# ends with a terminating chunk instead of a byte count).
BACKEND_BODY=${BACKEND_BODY:-length}

T0=$(date +%s)
log() { echo "[$(date +%T) +$(($(date +%s) - T0))s] $*" >&2; }

# --------------------------------------------------------------------------
# 1. Tools and the cyan binary.
# --------------------------------------------------------------------------
need=()
for pair in haproxy:haproxy nginx:nginx wrk:wrk h2load:nghttp2-client perf:linux-perf strace:strace \
    taskset:util-linux openssl:openssl python3:python3; do
    which "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if ((${#need[@]})); then
    log "installing ${need[*]}"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}"
fi

if [[ "${SKIP_BUILD:-0}" != 1 && -z "${CYAN_BIN:-}" ]]; then
    log "cargo build --release --locked (waits if another cargo holds the lock)"
    (cd "$ROOT" && cargo build --release --locked)
fi

WORK=$(mktemp -d /tmp/cyan-compare.XXXXXX)
PIDS=()   # every long-lived process this script started
cleanup() {
    local rc=$?
    set +e
    if ((rc != 0 && rc != 130)) && [[ -n "${FAILED:-}" ]]; then log "stopped at $FAILED"; fi
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
    done
    if [[ "${KEEP:-0}" == 1 ]]; then
        echo "work dir kept: $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# set -e stops the run at the first failing command; the EXIT trap says
# which one. Errtrace (-E) reaches into functions, and into command
# substitutions too, where a failure stops nothing (`wrk -v | head -1`):
# only the main shell's first failure is kept.
set -E
trap 'err_rc=$?; if ((BASH_SUBSHELL == 0)) && [[ -z ${FAILED:-} ]]; then FAILED="line $LINENO: \"$BASH_COMMAND\" exited $err_rc"; fi' ERR

# A private copy, so a rebuild by someone else mid-run changes nothing.
cp "${CYAN_BIN:-$ROOT/target/release/cyan}" "$WORK/cyan"
CYAN=$WORK/cyan
RESULTS=$WORK/results.tsv      # mode target round key value
: >"$RESULTS"
META=$WORK/meta.txt
: >"$META"
COMMANDS=$WORK/commands.txt
: >"$COMMANDS"
CONDITIONS=$WORK/conditions.txt
: >"$CONDITIONS"
EXTRA=$WORK/extra.txt          # free text sections for the report
: >"$EXTRA"
CLK_TCK=$(getconf CLK_TCK)

if (($(nproc) >= 2)); then
    PIN_PROXY=(taskset -c 0)
    PIN_LOAD=(taskset -c 1)
    PINNING="proxy under test on CPU 0; backends and load generator on CPU 1 (taskset -c)"
else
    PIN_PROXY=()
    PIN_LOAD=()
    PINNING="UNPINNED: nproc=$(nproc) < 2, everything shares one CPU"
    log "nproc < 2: running unpinned"
fi

ansi_strip() { sed 's/\x1b\[[0-9;]*m//g'; }
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$RESULTS"; }
cmdlog() { echo "$*" >>"$COMMANDS"; }

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits (bounded) until nothing else is busy (a cargo build, a test or bench
# run) so the numbers are not polluted: any process outside this script using
# more than 20 % of a CPU over a 1 s sample, or any cargo/rustc process.
others_busy() {
    local excl=($$) p
    for p in "${PIDS[@]}"; do excl+=("$p"); done
    {
        python3 "$CFG/busy.py" 20 0.5 "${excl[@]}"
        pgrep -l -x cargo || true
        pgrep -l -x rustc || true
    } | sort -u
}
wait_quiet() {
    local waited=0 busy
    while busy=$(others_busy) && [[ -n "$busy" ]]; do
        if ((waited >= QUIET_WAIT)); then
            echo "$(date +%T) $1: gave up waiting after ${waited}s, still busy (numbers may be polluted): $(echo "$busy" | tr '\n' ';')" >>"$CONDITIONS"
            log "still busy after ${waited}s: measuring anyway ($(echo "$busy" | tr '\n' ';'))"
            return 0
        fi
        ((waited == 0)) && log "other work running ($(echo "$busy" | tr '\n' ';')): waiting (poll 20 s, up to ${QUIET_WAIT}s)"
        sleep 20 &
        wait $! || true
        waited=$((waited + 20))
    done
    if ((waited > 0)); then
        echo "$(date +%T) $1: waited ${waited}s for other work to finish" >>"$CONDITIONS"
    fi
}

snapshot_conditions() {
    {
        echo "--- $(date +%T) before $1: load average $(cut -d' ' -f1-3 /proc/loadavg)"
        top -bn1 -w 120 | sed -n '7,12p'
    } >>"$CONDITIONS"
}

wait_port() {
    local port=$1
    for _ in $(seq 100); do
        if curl -s -o /dev/null -m 1 "http://127.0.0.1:$port/"; then return 0; fi
        sleep 0.1
    done
    log "port $port never answered"
    return 1
}

stop_pid() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    local keep=()
    for p in "${PIDS[@]}"; do [[ "$p" == "$pid" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

# The process and its direct children (nginx: master + workers).
proc_tree() {
    local pid=$1
    echo "$pid"
    ps -o pid= --ppid "$pid" 2>/dev/null | tr -d ' ' || true
}

# utime + stime in clock ticks, all threads, summed over the given PIDs.
cpu_ticks() {
    local total=0 pid t
    for pid in "$@"; do
        t=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{print $12 + $13}') || t=0
        total=$((total + ${t:-0}))
    done
    echo "$total"
}

pss_kib() {
    local total=0 pid k
    for pid in "$@"; do
        k=$(awk '/^Pss:/ {print $2}' "/proc/$pid/smaps_rollup" 2>/dev/null) || k=0
        total=$((total + ${k:-0}))
    done
    echo "$total"
}

# wrk output → "requests rps p50_us p99_us errors"
parse_wrk() {
    awk '
    function us(v) { if (v ~ /us$/) return v + 0; if (v ~ /ms$/) return (v + 0) * 1000; if (v ~ /s$/) return (v + 0) * 1000000; return v + 0 }
    /^ +50%/ { p50 = us($2) }
    /^ +99%/ { p99 = us($2) }
    / requests in / { req = $1 }
    /^Requests\/sec/ { rps = $2 }
    /Non-2xx/ { bad += $NF }
    /Socket errors/ { gsub(",", ""); bad += $4 + $6 + $8 + $10 }
    END { printf "%d %.0f %.0f %.0f %d\n", req, rps, p50, p99, bad }' "$1"
}

# h2load output → "succeeded rps failed"
parse_h2load() {
    awk '
    /^finished in/ { gsub(",", ""); rps = $4 }
    /^requests:/ { gsub(",", ""); ok = $8; bad = $10 + $12 + $14 }
    END { printf "%d %.0f %d\n", ok, rps, bad }' "$1"
}

# --------------------------------------------------------------------------
# 2. Backends (blue, green), a certificate, configs.
# --------------------------------------------------------------------------
BLUE=$(free_port)
GREEN=$(free_port)
while [[ "$GREEN" == "$BLUE" ]]; do GREEN=$(free_port); done

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
cat "$WORK/cert.pem" "$WORK/key.pem" >"$WORK/combined.pem"

BACKEND_PIDS=()
start_backend() {
    local name=$1 port=$2 dir=$WORK/backend-$1
    mkdir -p "$dir"
    local chunked=""
    [[ "$BACKEND_BODY" == chunked ]] && chunked="sub_filter_types text/plain; sub_filter 'no-such-text' 'x';"
    sed -e "s#@NAME@#$name#g; s#@PORT@#$port#g; s#@PREFIX@#$dir#g; s#@CHUNKED@#$chunked#" \
        "$CFG/backend.nginx.conf" >"$dir/nginx.conf"
    cmdlog "backend $name: ${PIN_LOAD[*]} nginx -p $dir -c $dir/nginx.conf -e $dir/error.log"
    "${PIN_LOAD[@]}" nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" \
        >"$dir/out.log" 2>&1 &
    PIDS+=($!)
    BACKEND_PIDS+=($!)
    wait_port "$port"
}
start_backend blue "$BLUE"
start_backend green "$GREEN"
log "backends: blue 127.0.0.1:$BLUE green 127.0.0.1:$GREEN"

# Target under test. After start_target: TPID (main pid, empty for direct),
# TPORT (plain), TTLS (TLS port), TPIDS (pids whose CPU/memory count).
TPID=""
TPORT=""
TTLS=""
TPIDS=()
TMETRICS=""
declare -A PORT TLSPORT
for t in cyan cyan-log haproxy haproxy-log nginx cyan-mt haproxy-mt nginx-mt; do
    PORT[$t]=$(free_port)
    TLSPORT[$t]=$(free_port)
done

# start_target NAME: cyan | cyan-log | haproxy | haproxy-log | nginx | direct,
# with -mt for the multi-thread default shape (unpinned). haproxy-log is the
# peer of cyan-log: HAProxy writing an `option httplog` line per request to
# a file (`log stdout`, stdout redirected), as a container deployment does.
start_target() {
    local t=$1 dir=$WORK/run-$1 pin=("${PIN_PROXY[@]}")
    rm -rf "$dir"
    mkdir -p "$dir"
    TPID=""
    TPIDS=()
    TMETRICS=""
    [[ "$t" == *-mt ]] && pin=()
    if [[ "$t" == direct* ]]; then
        TPORT=$BLUE
        TTLS=""
        return 0
    fi
    TPORT=${PORT[$t]}
    TTLS=${TLSPORT[$t]}
    local subst="s#@PORT@#$TPORT#g; s#@TLS_PORT@#$TTLS#g; s#@BLUE@#$BLUE#g; s#@GREEN@#$GREEN#g; s#@PREFIX@#$dir#g; s#@CERT@#$WORK/cert.pem#g; s#@KEY@#$WORK/key.pem#g; s#@PEM@#$WORK/combined.pem#g"
    case $t in
    cyan | cyan-log | cyan-mt)
        TMETRICS=$(free_port)
        sed -e "$subst" -e "s#127.0.0.1:0#127.0.0.1:$TMETRICS#" "$CFG/cyan.toml" >"$dir/cyan.toml"
        [[ "$t" == cyan-mt ]] && sed -i '/^worker_threads/d' "$dir/cyan.toml"
        if [[ "$t" == cyan-log ]]; then
            printf '\n[access_log]\npath = "%s"\n' "$dir/access.log" >>"$dir/cyan.toml"
        fi
        cmdlog "$t: ${pin[*]} cyan run --config $dir/cyan.toml"
        "${pin[@]}" "$CYAN" run --config "$dir/cyan.toml" >"$dir/cyan.log" 2>&1 &
        TPID=$!
        ;;
    haproxy | haproxy-mt | haproxy-log)
        sed -e "$subst" -e "s#@NBTHREAD@#1#" "$CFG/haproxy.cfg" >"$dir/haproxy.cfg"
        [[ "$t" == haproxy-mt ]] && sed -i '/nbthread/d' "$dir/haproxy.cfg"
        if [[ "$t" == haproxy-log ]]; then
            sed -i -e 's/^global$/global\n    log stdout format raw local0/' \
                -e 's/^defaults$/defaults\n    log global\n    option httplog/' "$dir/haproxy.cfg"
            # The edit keys on two bare lines of haproxy.cfg; had they
            # changed, the variant would run silently without its log.
            if ! grep -q '^    option httplog$' "$dir/haproxy.cfg" || ! grep -q '^    log stdout' "$dir/haproxy.cfg"; then
                log "haproxy-log: could not turn HAProxy's log on in $dir/haproxy.cfg"
                return 1
            fi
            cmdlog "$t: ${pin[*]} haproxy -db -f $dir/haproxy.cfg >access.log (log stdout format raw, option httplog)"
            "${pin[@]}" haproxy -db -f "$dir/haproxy.cfg" >"$dir/access.log" 2>"$dir/haproxy.log" &
        else
            cmdlog "$t: ${pin[*]} haproxy -db -f $dir/haproxy.cfg"
            "${pin[@]}" haproxy -db -f "$dir/haproxy.cfg" >"$dir/haproxy.log" 2>&1 &
        fi
        TPID=$!
        ;;
    nginx | nginx-mt)
        local workers=1
        [[ "$t" == nginx-mt ]] && workers=auto
        sed -e "$subst" -e "s#@WORKERS@#$workers#" "$CFG/nginx-proxy.conf" >"$dir/nginx.conf"
        cmdlog "$t: ${pin[*]} nginx -p $dir -c $dir/nginx.conf -e $dir/error.log"
        "${pin[@]}" nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" >"$dir/nginx.log" 2>&1 &
        TPID=$!
        ;;
    *)
        log "unknown target $t"
        return 1
        ;;
    esac
    PIDS+=("$TPID")
    if ! wait_port "$TPORT"; then
        log "$t did not start; its log:"
        tail -20 "$dir"/*.log >&2 || true
        return 1
    fi
    mapfile -t TPIDS < <(proc_tree "$TPID")
}

stop_target() {
    if [[ -n "$TPID" ]]; then
        stop_pid "$TPID"
    fi
    TPID=""
    TPIDS=()
}

# cyan's access-log drops, when scraped.
access_log_check() {
    local t=$1 round=$2 dir=$WORK/run-$1
    [[ "$t" == cyan-log || "$t" == haproxy-log ]] || return 0
    local dropped=0 lines
    [[ "$t" == cyan-log ]] && dropped=$(curl -s -m 2 "http://127.0.0.1:$TMETRICS/metrics" | awk '/^cyan_access_log_dropped_total/ {s += $2} END {print s + 0}')
    lines=$(wc -l <"$dir/access.log" 2>/dev/null || echo 0)
    record "$MODE" "$t" "$round" log_lines "$lines"
    record "$MODE" "$t" "$round" log_dropped "$dropped"
    : >"$dir/access.log" 2>/dev/null || true
}

# Warm-up that ends cleanly: h2load -n finishes every request before it
# closes its connections. (wrk stops with requests in flight; cyan counts
# those client aborts as upstream 5xx and its passive health can then eject
# healthy endpoints, see RESULTS.md, so every measurement gets a fresh
# process and a clean warm-up.)
warmup() {
    local scheme=${1:-http} port=$TPORT
    [[ "$scheme" == https ]] && port=$TTLS
    "${PIN_LOAD[@]}" h2load --h1 -c64 -n 20000 "$scheme://127.0.0.1:$port/" >/dev/null 2>&1 || true
}

# Passive-health ejections cyan logged while measuring (should be 0).
ejections_check() {
    local t=$1 round=$2 dir=$WORK/run-$1
    [[ "$t" == cyan* ]] || return 0
    sleep 0.5
    record "$MODE" "$t" "$round" ejections "$(ansi_strip <"$dir/cyan.log" | grep -c 'healthy=false' || true)"
}

# --------------------------------------------------------------------------
# Sanity: each proxy answers 200 from both colors, about 50/50.
# --------------------------------------------------------------------------
sanity() {
    local t
    for t in cyan haproxy nginx; do
        start_target "$t"
        local split
        split=$(python3 - "$TPORT" <<'EOF'
import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=5)
seen = {}
for _ in range(400):
    c.request("GET", "/", headers={"Host": "bench"})
    r = c.getresponse()
    body = r.read().decode().strip()
    key = f"{r.status} {body}"
    seen[key] = seen.get(key, 0) + 1
print(", ".join(f"{k}: {v}" for k, v in sorted(seen.items())))
EOF
)
        local tls
        tls=$(openssl s_client -connect "127.0.0.1:$TTLS" -alpn h2,http/1.1 </dev/null 2>/dev/null |
            awk '/^New, / {p = $2 " " $5} /^ALPN protocol/ {a = $3} END {print p ", ALPN " a}' | tr -d ',' || true)
        echo "- $t: 400 requests → $split; TLS: $tls" >>"$EXTRA.sanity"
        log "sanity $t: $split; TLS $tls"
        stop_target
    done
}

# --------------------------------------------------------------------------
# Modes.
# --------------------------------------------------------------------------
cpu_per_req() { python3 -c "print(round(($2 - $1) * 1e6 / $CLK_TCK / $3, 2))"; }

mode_closed() {
    MODE=closed
    local r t
    for r in $(seq "$ROUNDS"); do
        for t in cyan cyan-log haproxy haproxy-log nginx direct; do
            wait_quiet "closed $t r$r"
            start_target "$t"
            warmup
            local c0 c1 f=$WORK/wrk-closed-$t-$r.txt
            c0=$(cpu_ticks "${TPIDS[@]}")
            ((r == 1)) && cmdlog "closed $t: ${PIN_LOAD[*]} wrk -t1 -c64 -d${DUR}s --latency -s benches/compare/users.lua http://127.0.0.1:$TPORT/"
            "${PIN_LOAD[@]}" wrk -t1 -c64 -d"${DUR}s" --latency -s "$CFG/users.lua" "http://127.0.0.1:$TPORT/" >"$f" 2>&1
            c1=$(cpu_ticks "${TPIDS[@]}")
            read -r req rps p50 p99 bad < <(parse_wrk "$f")
            record closed "$t" "$r" rps "$rps"
            record closed "$t" "$r" p50_us "$p50"
            record closed "$t" "$r" p99_us "$p99"
            record closed "$t" "$r" errors "$bad"
            if [[ -n "$TPID" ]] && ((req > 0)); then
                record closed "$t" "$r" cpu_us_per_req "$(cpu_per_req "$c0" "$c1" "$req")"
            fi
            access_log_check "$t" "$r"
            ejections_check "$t" "$r"
            log "closed r$r $t: $rps req/s p50 ${p50}us p99 ${p99}us cpu $((c1 - c0)) ticks / $req req, errors $bad"
            stop_target
        done
    done
}

# Fixed rate, interleaved in short slots. Each round starts every proxy
# once and warms it, then cycles through the targets FIXED_SLOTS times,
# DUR_SHORT / FIXED_SLOTS seconds each, the order rotated every cycle; a
# target's value for the round pools its slots, each without its first
# FIXED_SKIP seconds (the load generator's connection setup).
#
# Why slots: this VM's host stalls come in bursts of seconds, and a single
# 100 ms stall delays 500 requests, more than 1 % of an 8 s run. With one
# 8 s run per target per round, a burst decided the p99 of whichever target
# held the CPU then (bd4483a, round 3: cyan +1,940 µs over direct, HAProxy
# +607 µs; rounds 1-2 put every target 2-5 ms over). In 2 s slots a burst
# lands on the targets side by side. The proxies not being measured stay up,
# idle, on the proxy CPU: cyan wakes every 50 ms for its rollback window, a
# few µs each, HAProxy and nginx less often.
mode_fixed() {
    MODE=fixed
    local r t s i per=$((RATE / RATE_CLIENTS)) slot=$FIXED_SLOT_SECS
    local targets=(cyan cyan-log haproxy nginx direct)
    local n=${#targets[@]}
    local -A fpid fport fmet
    for r in $(seq "$ROUNDS"); do
        for t in "${targets[@]}"; do
            wait_quiet "fixed $t r$r"
            start_target "$t"
            warmup
            fpid[$t]=$TPID fport[$t]=$TPORT fmet[$t]=$TMETRICS
            ((r == 1)) && cmdlog "fixed $t: ${PIN_LOAD[*]} h2load --h1 -c $RATE_CLIENTS --rps $per -D $slot --log-file LOG http://127.0.0.1:$TPORT/ ; $FIXED_SLOTS slots per round, interleaved with the other targets; latency.py --skip $FIXED_SKIP LOG..."
        done
        for s in $(seq "$FIXED_SLOTS"); do
            wait_quiet "fixed r$r slot $s"
            for i in $(seq 0 $((n - 1))); do
                t=${targets[$(((i + s) % n))]}
                "${PIN_LOAD[@]}" h2load --h1 -c "$RATE_CLIENTS" --rps "$per" -D "$slot" \
                    --log-file "$WORK/fixed-$t-$r-$s.log" "http://127.0.0.1:${fport[$t]}/" \
                    >"$WORK/fixed-$t-$r-$s.txt" 2>&1 || true
            done
        done
        for t in "${targets[@]}"; do
            local line kv
            line=$(python3 "$CFG/latency.py" --skip "$FIXED_SKIP" "$WORK/fixed-$t-$r-"*.log)
            for kv in $line; do
                case ${kv%%=*} in
                count) record fixed "$t" "$r" count "${kv#*=}" ;;
                bad) record fixed "$t" "$r" errors "${kv#*=}" ;;
                rate) record fixed "$t" "$r" rate "${kv#*=}" ;;
                p50) record fixed "$t" "$r" p50_us "${kv#*=}" ;;
                p99) record fixed "$t" "$r" p99_us "${kv#*=}" ;;
                p999) record fixed "$t" "$r" p999_us "${kv#*=}" ;;
                esac
            done
            TMETRICS=${fmet[$t]}
            access_log_check "$t" "$r"
            ejections_check "$t" "$r"
            log "fixed r$r $t: $line"
        done
        for t in "${targets[@]}"; do
            if [[ -n "${fpid[$t]}" ]]; then stop_pid "${fpid[$t]}"; fi
        done
        TPID="" TPIDS=() TMETRICS=""
    done
    # Every round's slots pooled, as a second reading of the same requests.
    # (`fixed-cyan-*` would take cyan-log's logs too: a digit follows.)
    for t in "${targets[@]}"; do
        local kv
        for kv in $(python3 "$CFG/latency.py" --skip "$FIXED_SKIP" "$WORK/fixed-$t-"[0-9]*.log); do
            case ${kv%%=*} in
            p50 | p99 | p999) record fixed-pooled "$t" 0 "${kv%%=*}_us" "${kv#*=}" ;;
            esac
        done
    done
    rm -f "$WORK"/fixed-*.log
}

mode_tls() {
    MODE=tls
    local r t
    for r in $(seq "$ROUNDS"); do
        for t in cyan haproxy nginx; do
            local url="https://127.0.0.1:${TLSPORT[$t]}/" c0 c1 f=$WORK/tls-$t-$r
            # HTTP/1.1 over TLS 1.3, keep-alive.
            wait_quiet "tls-h1 $t r$r"
            start_target "$t"
            warmup https
            c0=$(cpu_ticks "${TPIDS[@]}")
            ((r == 1)) && cmdlog "tls-h1 $t: ${PIN_LOAD[*]} wrk -t1 -c64 -d${DUR_SHORT}s --latency -s benches/compare/users.lua $url"
            "${PIN_LOAD[@]}" wrk -t1 -c64 -d"${DUR_SHORT}s" --latency -s "$CFG/users.lua" "$url" >"$f-wrk.txt" 2>&1
            c1=$(cpu_ticks "${TPIDS[@]}")
            read -r req rps p50 p99 bad < <(parse_wrk "$f-wrk.txt")
            record tls "$t" "$r" h1_rps "$rps"
            record tls "$t" "$r" h1_errors "$bad"
            ((req > 0)) && record tls "$t" "$r" h1_cpu_us_per_req "$(cpu_per_req "$c0" "$c1" "$req")"
            ejections_check "$t" "$r"
            log "tls-h1 r$r $t: $rps req/s cpu $((c1 - c0)) ticks / $req, errors $bad"
            stop_target
            # HTTP/2 over TLS 1.3: 16 connections x 10 streams.
            wait_quiet "tls-h2 $t r$r"
            start_target "$t"
            "${PIN_LOAD[@]}" h2load -c16 -m10 -n 20000 "$url" >/dev/null 2>&1 || true
            c0=$(cpu_ticks "${TPIDS[@]}")
            ((r == 1)) && cmdlog "tls-h2 $t: ${PIN_LOAD[*]} h2load -c16 -m10 -D $DUR_SHORT $url"
            "${PIN_LOAD[@]}" h2load -c16 -m10 -D "$DUR_SHORT" "$url" >"$f-h2.txt" 2>&1 || true
            c1=$(cpu_ticks "${TPIDS[@]}")
            read -r ok rps bad < <(parse_h2load "$f-h2.txt")
            record tls "$t" "$r" h2_rps "$rps"
            record tls "$t" "$r" h2_errors "$bad"
            ((ok > 0)) && record tls "$t" "$r" h2_cpu_us_per_req "$(cpu_per_req "$c0" "$c1" "$ok")"
            grep -q 'Application protocol: h2' "$f-h2.txt" || record tls "$t" "$r" h2_not_negotiated 1
            ejections_check "$t" "$r"
            log "tls-h2 r$r $t: $rps req/s cpu $((c1 - c0)) ticks / $ok, failed $bad"
            stop_target
        done
    done
}

mode_mem() {
    MODE=mem
    local r t
    for r in $(seq "$ROUNDS"); do
        for t in cyan haproxy nginx; do
            wait_quiet "mem $t r$r"
            start_target "$t"
            "${PIN_LOAD[@]}" h2load --h1 -c16 -n 20000 "http://127.0.0.1:$TPORT/" >/dev/null 2>&1 || true
            sleep 1
            local base with f=$WORK/idle-$t-$r.txt
            base=$(pss_kib "${TPIDS[@]}")
            ((r == 1)) && cmdlog "mem $t: ${PIN_LOAD[*]} python3 benches/compare/idle_conns.py $TPORT $IDLE_CONNS 60 16"
            "${PIN_LOAD[@]}" python3 "$CFG/idle_conns.py" "$TPORT" "$IDLE_CONNS" 60 16 >"$f" 2>&1 &
            local ipid=$!
            PIDS+=("$ipid")
            for _ in $(seq 600); do
                grep -q '^READY' "$f" && break
                kill -0 "$ipid" 2>/dev/null || break
                sleep 0.1
            done
            sleep 2
            with=$(pss_kib "${TPIDS[@]}")
            stop_pid "$ipid"
            local ok held
            ok=$(awk '/^READY/ {print $2}' "$f")
            held=$(awk '/^HELD/ {print $2}' "$f")
            record mem "$t" "$r" base_kib "$base"
            record mem "$t" "$r" with_kib "$with"
            record mem "$t" "$r" conns_ok "${ok:-0}"
            record mem "$t" "$r" conns_held "${held:-0}"
            record mem "$t" "$r" kib_per_conn "$(python3 -c "print(round(($with - $base) / $IDLE_CONNS, 2))")"
            log "mem r$r $t: PSS $base → $with KiB with ${ok:-0} idle conns (${held:-?} still open at the end)"
            stop_target
        done
    done
}

mode_syscalls() {
    MODE=syscalls
    local r t
    for r in $(seq "$ROUNDS"); do
        for t in cyan cyan-log haproxy nginx; do
            local f=$WORK/sys-$t-$r pargs=() p
            # strace: counts every syscall of every thread (slows the proxy a lot).
            wait_quiet "syscalls-strace $t r$r"
            start_target "$t"
            warmup
            for p in "${TPIDS[@]}"; do pargs+=(-p "$p"); done
            ((r == 1)) && cmdlog "syscalls $t: strace -c -f -o OUT ${pargs[*]} & sleep 1; ${PIN_LOAD[*]} wrk -t1 -c16 -d2s -s benches/compare/users.lua http://127.0.0.1:$TPORT/; kill -INT strace"
            strace -c -f -o "$f.strace" "${pargs[@]}" 2>"$f.strace-err" &
            local spid=$!
            PIDS+=("$spid")
            sleep 1
            "${PIN_LOAD[@]}" wrk -t1 -c16 -d2s -s "$CFG/users.lua" "http://127.0.0.1:$TPORT/" >"$f.wrk" 2>&1
            kill -INT "$spid" 2>/dev/null || true
            for _ in $(seq 100); do kill -0 "$spid" 2>/dev/null || break; sleep 0.1; done
            stop_pid "$spid"
            read -r req _ _ _ bad < <(parse_wrk "$f.wrk")
            local calls
            calls=$(awk '$NF == "total" {print $4}' "$f.strace")
            record syscalls "$t" "$r" strace_requests "$req"
            record syscalls "$t" "$r" strace_errors "$bad"
            ((req > 0)) && record syscalls "$t" "$r" strace_per_req "$(python3 -c "print(round(${calls:-0} / $req, 2))")"
            if ((r == 1)); then
                {
                    echo "#### $t (strace -c -f, $req requests)"
                    echo '```'
                    awk -v n="$req" 'NR > 2 && $NF != "total" && $1 !~ /^-/ && NF >= 5 {printf "%-20s %8.3f per request\n", $NF, $4 / n}' "$f.strace" | head -8
                    echo '```'
                } >>"$EXTRA.strace"
            fi
            stop_target
            # perf: counts sys_enter tracepoints, nearly free, same load shape.
            wait_quiet "syscalls-perf $t r$r"
            start_target "$t"
            warmup
            local plist ppid req2 bad2 pcalls
            plist=$(IFS=,; echo "${TPIDS[*]}")
            ((r == 1)) && cmdlog "syscalls $t: perf stat -e raw_syscalls:sys_enter -p $plist -- sleep 3 & sleep 0.5; ${PIN_LOAD[*]} wrk -t1 -c16 -d2s -s benches/compare/users.lua http://127.0.0.1:$TPORT/"
            perf stat -x, -e raw_syscalls:sys_enter -p "$plist" -o "$f.perf" -- sleep 3 &
            ppid=$!
            PIDS+=("$ppid")
            sleep 0.5
            "${PIN_LOAD[@]}" wrk -t1 -c16 -d2s -s "$CFG/users.lua" "http://127.0.0.1:$TPORT/" >"$f.wrk2" 2>&1
            for _ in $(seq 100); do kill -0 "$ppid" 2>/dev/null || break; sleep 0.1; done
            stop_pid "$ppid"
            read -r req2 _ _ _ bad2 < <(parse_wrk "$f.wrk2")
            pcalls=$(awk -F, '/raw_syscalls:sys_enter/ {print $1}' "$f.perf")
            record syscalls "$t" "$r" perf_requests "$req2"
            record syscalls "$t" "$r" perf_errors "$bad2"
            if [[ "$pcalls" =~ ^[0-9]+$ ]] && ((req2 > 0)); then
                record syscalls "$t" "$r" perf_per_req "$(python3 -c "print(round($pcalls / $req2, 2))")"
            fi
            log "syscalls r$r $t: strace ${calls:-?} calls / $req req; perf ${pcalls:-?} / $req2 req"
            stop_target
        done
    done
}

mode_mt() {
    MODE=mt
    # Multi-thread default shape: everything unpinned, backends included.
    local p q all="0-$(($(nproc) - 1))"
    for p in "${BACKEND_PIDS[@]}"; do
        for q in $(proc_tree "$p"); do taskset -a -p -c "$all" "$q" >/dev/null 2>&1 || true; done
    done
    local r t
    for r in $(seq "$ROUNDS"); do
        for t in cyan-mt haproxy-mt nginx-mt direct-mt; do
            wait_quiet "mt $t r$r"
            start_target "$t"
            h2load --h1 -c64 -n 20000 "http://127.0.0.1:$TPORT/" >/dev/null 2>&1 || true
            local c0 c1 f=$WORK/wrk-mt-$t-$r.txt
            c0=$(cpu_ticks "${TPIDS[@]}")
            ((r == 1)) && cmdlog "mt $t: wrk -t2 -c64 -d${DUR_SHORT}s --latency http://127.0.0.1:$TPORT/ (unpinned)"
            wrk -t2 -c64 -d"${DUR_SHORT}s" --latency "http://127.0.0.1:$TPORT/" >"$f" 2>&1
            c1=$(cpu_ticks "${TPIDS[@]}")
            read -r req rps p50 p99 bad < <(parse_wrk "$f")
            record mt "$t" "$r" rps "$rps"
            record mt "$t" "$r" p50_us "$p50"
            record mt "$t" "$r" p99_us "$p99"
            record mt "$t" "$r" errors "$bad"
            if [[ -n "$TPID" ]] && ((req > 0)); then
                record mt "$t" "$r" cpu_us_per_req "$(cpu_per_req "$c0" "$c1" "$req")"
            fi
            ejections_check "$t" "$r"
            log "mt r$r $t: $rps req/s p50 ${p50}us p99 ${p99}us errors $bad"
            stop_target
        done
    done
    if ((${#PIN_LOAD[@]})); then
        for p in "${BACKEND_PIDS[@]}"; do
            for q in $(proc_tree "$p"); do taskset -a -p -c 1 "$q" >/dev/null 2>&1 || true; done
        done
    fi
}

# The client-abort anomaly, shown once: wrk ends with requests in flight;
# cyan records each aborted request as an upstream 502 and its passive
# health counts them as consecutive failures.
mode_abort() {
    MODE=abort
    wait_quiet "abort check"
    start_target cyan
    warmup
    local before after i codes=""
    "${PIN_LOAD[@]}" wrk -t1 -c64 -d2s "http://127.0.0.1:$TPORT/" >"$WORK/abort-wrk.txt" 2>&1
    sleep 0.2
    for i in 1 2 3 4 5 6; do
        codes+="$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$TPORT/") "
    done
    sleep 1
    local fivexx
    fivexx=$(curl -s -m 2 "http://127.0.0.1:$TMETRICS/metrics" | awk '/^cyan_requests_total\{code_class="5xx"/ {s += $2} END {print s + 0}')
    read -r req _ _ _ bad < <(parse_wrk "$WORK/abort-wrk.txt")
    local ej
    ej=$(ansi_strip <"$WORK/run-cyan/cyan.log" | grep -c 'healthy=false' || true)
    record abort cyan 1 wrk_non2xx "$bad"
    record abort cyan 1 cyan_5xx_counted "$fivexx"
    record abort cyan 1 ejections "$ej"
    echo "- cyan, after \`wrk -t1 -c64 -d2s\` ($req responses, $bad non-2xx seen by wrk): cyan_requests_total 5xx = $fivexx, endpoints ejected = $ej; the next 6 requests answered: $codes" >>"$EXTRA.abort"
    log "abort check: wrk saw $bad non-2xx; cyan counted $fivexx 5xx, $ej ejections; next: $codes"
    stop_target
}

# --------------------------------------------------------------------------
# Run.
# --------------------------------------------------------------------------
{
    echo "date=$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "uname=$(uname -a)"
    echo "cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo) × $(nproc)"
    echo "mem=$(awk '/^MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
    rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
    # Outside a git checkout (a copied benches/), `git status` fails: 0.
    dirty=$({ git -C "$ROOT" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null || true; } | wc -l)
    ((dirty > 0)) && rev="$rev + uncommitted changes in src/ or Cargo.* ($dirty files)"
    echo "cyan=$("$CYAN" --version 2>/dev/null | head -1) (git $rev)"
    # Which build: the README's results are of deploy/build-release.sh's
    # binary, whose BUILD file (beside it) names the profile and checksum.
    sum=$(sha256sum "$CYAN" | cut -d' ' -f1)
    build="cargo build --release"
    [[ -n "${CYAN_BIN:-}" ]] && build="CYAN_BIN=$CYAN_BIN"
    stamp=$(dirname "${CYAN_BIN:-$ROOT/target/release/cyan}")/BUILD
    if [[ -f "$stamp" ]] && grep -q "^sha256: *$sum" "$stamp"; then
        build="$build: deploy/build-release.sh, PGO + BOLT, $(sed -n 's/^profile: *//p' "$stamp"), built from $(sed -n 's/^commit: *//p' "$stamp" | cut -c1-12)"
    fi
    echo "cyan_build=$build (sha256 ${sum:0:16})"
    echo "haproxy=$(haproxy -v 2>/dev/null | head -1)"
    echo "nginx=$(nginx -v 2>&1 | head -1)"
    echo "wrk=$(wrk -v 2>&1 | head -1)"
    echo "h2load=$(h2load --version 2>&1 | head -1)"
    echo "openssl=$(openssl version)"
    echo "rustc=$(rustc -V 2>/dev/null || echo '?')"
    echo "pinning=$PINNING"
    echo "settings=ROUNDS=$ROUNDS DUR=${DUR}s DUR_SHORT=${DUR_SHORT}s RATE=$RATE (h2load --h1 -c $RATE_CLIENTS --rps $((RATE / RATE_CLIENTS)), $FIXED_SLOTS interleaved slots of ${FIXED_SLOT_SECS}s per round, first ${FIXED_SKIP}s of each skipped) IDLE_CONNS=$IDLE_CONNS BACKEND_BODY=$BACKEND_BODY MODES=\"$MODES\""
    echo "load_start=$(cut -d' ' -f1-3 /proc/loadavg)"
} >>"$META"

wait_quiet sanity
sanity
mode_abort
for m in $MODES; do
    snapshot_conditions "$m"
    log "=== mode $m"
    "mode_$m"
done
echo "load_end=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$META"
echo "elapsed=$(($(date +%s) - T0)) s" >>"$META"

python3 "$CFG/report.py" "$WORK" "$OUT"
log "wrote $OUT"
