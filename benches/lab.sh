# The loopback lab of callgrind.sh and pgo.sh, sourced by both: two nginx
# backends (blue, green) on the load generator's CPU, a self-signed
# certificate, and cyan's and HAProxy's configs from benches/compare/ with
# their ports filled in. compare.sh builds the same lab itself, with more
# targets and per-target ports.
#
# Before `lab_up`: WORK (a fresh directory), CFG (benches/compare), PIDS (an
# array; the backends' PIDs are added for the caller's cleanup). After it:
# PORT (plaintext listener), TLS (TLS listener), BLUE, GREEN, PIN_PROXY and
# PIN_LOAD (taskset prefixes: CPU 0 for the proxy, CPU 1 for the rest, or
# nothing on one CPU), $WORK/cyan.toml (plus CYAN_EXTRA when set),
# $WORK/haproxy.cfg, $WORK/body-4k and $WORK/body-64k (request bodies).
# `lab_begin` (pgo.sh, bolt.sh, cpu_ab.sh) checks the lab's tools, makes
# WORK and sets the cleanup; `lab_train` runs a profiling build of cyan
# under the training load. `lab_tools`, `lab_profdata` and `lab_bolt` find
# what the lab and the two optimizing builds need, or exit 2 saying what is
# missing (deploy/build-release.sh checks them all before it starts).

# lab_tools TOOL: the lab's programs are on PATH.
lab_tools() {
    local t
    for t in nginx wrk h2load openssl python3; do
        command -v "$t" >/dev/null || { echo "$1: $t is missing" >&2; exit 2; }
    done
}

# lab_profdata TOOL: sets PROFDATA to rustc's own llvm-profdata (Debian's
# is an older LLVM that cannot read rustc's profiles; LLVM_PROFDATA
# overrides).
lab_profdata() {
    local host
    host=$(rustc -vV | sed -n 's/^host: //p')
    PROFDATA=${LLVM_PROFDATA:-$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata}
    if [[ ! -x "$PROFDATA" ]]; then
        echo "$1: no llvm-profdata at $PROFDATA; run: rustup component add llvm-tools" >&2
        exit 2
    fi
}

# lab_bolt TOOL: sets BOLT to llvm-bolt (LLVM_BOLT overrides), resolved to
# its LLVM tree: Debian's /usr/bin/llvm-bolt-19 is a link into
# /usr/lib/llvm-19/bin, and llvm-bolt looks for its instrumentation runtime
# in ../lib beside the path it was started by.
lab_bolt() {
    BOLT=${LLVM_BOLT:-$(command -v llvm-bolt || command -v llvm-bolt-19 || true)}
    if [[ -z "$BOLT" || ! -x "$BOLT" ]]; then
        echo "$1: no llvm-bolt; on Debian: apt-get install bolt-19 (or set LLVM_BOLT)" >&2
        exit 2
    fi
    BOLT=$(readlink -f "$BOLT")
    if [[ ! -f "$(dirname "$BOLT")/../lib/libbolt_rt_instr.a" ]]; then
        echo "$1: no libbolt_rt_instr.a beside $BOLT (../lib)" >&2
        exit 2
    fi
}

# lab_load_failed OUTPUT: wrk's or h2load's report shows a failed request.
lab_load_failed() { grep -qE 'Non-2xx|Socket errors|[1-9][0-9]* failed' <<<"$1"; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_port() {
    local i
    for i in $(seq 300); do
        (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.2
    done
    return 1
}

lab_up() {
    PIN_PROXY=() PIN_LOAD=()
    if (($(nproc) >= 2)); then PIN_PROXY=(taskset -c 0) PIN_LOAD=(taskset -c 1); fi
    BLUE=$(free_port) GREEN=$(free_port) PORT=$(free_port) TLS=$(free_port)
    local b name port
    for b in blue:$BLUE green:$GREEN; do
        name=${b%:*} port=${b#*:}
        mkdir -p "$WORK/$name"
        sed -e "s#@NAME@#$name#g; s#@PORT@#$port#g; s#@PREFIX@#$WORK/$name#g; s#@CHUNKED@##" \
            "$CFG/backend.nginx.conf" >"$WORK/$name/nginx.conf"
        "${PIN_LOAD[@]}" nginx -p "$WORK/$name" -c "$WORK/$name/nginx.conf" -e "$WORK/$name/error.log" &
        PIDS+=($!)
    done
    wait_port "$BLUE" && wait_port "$GREEN" || { echo "lab.sh: backends did not start" >&2; return 1; }

    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
        -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
    cat "$WORK/cert.pem" "$WORK/key.pem" >"$WORK/combined.pem"
    local subst="s#@PORT@#$PORT#g; s#@TLS_PORT@#$TLS#g; s#@BLUE@#$BLUE#g; s#@GREEN@#$GREEN#g; s#@PREFIX@#$WORK#g; s#@CERT@#$WORK/cert.pem#g; s#@KEY@#$WORK/key.pem#g; s#@PEM@#$WORK/combined.pem#g"
    sed -e "$subst" "$CFG/cyan.toml" >"$WORK/cyan.toml"
    if [[ -n "${CYAN_EXTRA:-}" ]]; then printf '\n%s\n' "$CYAN_EXTRA" >>"$WORK/cyan.toml"; fi
    sed -e "$subst" -e "s#@NBTHREAD@#1#" "$CFG/haproxy.cfg" >"$WORK/haproxy.cfg"
    head -c 4096 /dev/urandom >"$WORK/body-4k"
    head -c 65536 /dev/urandom >"$WORK/body-64k"
}

# lab_train TOOL BINARY: runs BINARY (an instrumented cyan) with
# $WORK/cyan.toml under the training load, HTTP/1.1 with sticky users, then
# HTTP/2 and HTTP/1.1 over TLS 1.3, then POSTs (a 4 KiB body that goes up
# whole, a 64 KiB one that streams past request_buffer_bytes), and stops it
# with SIGTERM: cyan drains
# and exits, and the instrumentation writes its profile as the process
# ends. TOOL names the caller in messages. Sets TPID while cyan runs, for
# the caller's cleanup.
lab_train() {
    local tool=$1 bin=$2 out
    "${PIN_PROXY[@]}" "$bin" run --config "$WORK/cyan.toml" >"$WORK/cyan.log" 2>&1 &
    TPID=$!
    wait_port "$PORT" && wait_port "$TLS" || { echo "$tool: cyan did not start: $(tail -3 "$WORK/cyan.log")" >&2; return 1; }
    echo "$tool: training load"
    local load
    for load in \
        "wrk -t1 -c64 -d10s -s $CFG/users.lua http://127.0.0.1:$PORT/" \
        "h2load --h1 -c16 -n 30000 http://127.0.0.1:$PORT/" \
        "h2load -c16 -m10 -n 100000 https://127.0.0.1:$TLS/" \
        "wrk -t1 -c64 -d5s -s $CFG/users.lua https://127.0.0.1:$TLS/" \
        "h2load --h1 -c16 -n 20000 -d $WORK/body-4k http://127.0.0.1:$PORT/" \
        "h2load -c16 -m10 -n 10000 -d $WORK/body-64k https://127.0.0.1:$TLS/"; do
        # shellcheck disable=SC2086 # the words of the command line
        out=$("${PIN_LOAD[@]}" $load 2>&1) || { echo "$tool: $load failed: $out" >&2; return 1; }
        grep -E '^requests:|Requests/sec' <<<"$out" | sed 's/^/  /'
        if lab_load_failed "$out"; then
            echo "$tool: errors in the training load: $out" >&2
            return 1
        fi
    done
    kill -TERM "$TPID"
    for _ in $(seq 300); do
        kill -0 "$TPID" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 "$TPID" 2>/dev/null; then
        echo "$tool: cyan did not stop within 60 s of SIGTERM" >&2
        return 1
    fi
    wait "$TPID" || { echo "$tool: cyan exited with an error: $(tail -3 "$WORK/cyan.log")" >&2; TPID=; return 1; }
    TPID=
}

# lab_begin TOOL: the lab's tools are there, WORK is a fresh directory,
# PIDS and TPID are empty, and on exit everything started is stopped by PID
# and WORK removed. TOOL names the caller in messages.
lab_begin() {
    lab_tools "$1"
    WORK=$(mktemp -d "/tmp/cyan-${1%.sh}.XXXXXX")
    PIDS=()
    TPID=
    trap lab_end EXIT
}

lab_end() {
    [[ -n "${TPID:-}" ]] && kill -KILL "$TPID" 2>/dev/null
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
