#!/usr/bin/env bash
# The extended tier of cyan's reliability battery: the long versions of the
# scenarios `cargo test` runs in seconds, plus testssl.sh and the fuzzers.
# Prints a results table (name | measured | target | PASS/FAIL) and exits
# non-zero when any row fails.
#
#   bash tests/extended.sh                      # everything, ~15-20 min on 2 cores
#   CYAN_EXT_SCALE=0.2 bash tests/extended.sh   # a quick pass (counts and durations x0.2)
#   CYAN_EXT_SKIP=fuzz,testssl bash tests/extended.sh
#
# What runs (all traffic goes to 127.0.0.1; every process started here is
# stopped by its PID):
#
# 1. `cargo test --release --test extended -- --ignored` (tests/extended.rs),
#    each scenario against the real cyan binary as a child process:
#    - slowloris: 3,000 heads trickled a byte at a time, 1,000 bodies trickled
#      then stalled, 1,000 responses never read, 3,000 TLS connections that
#      never send a ClientHello; each closed by its timeout (2 s) within 1.5 s,
#      while a control client keeps its p99 within 2x its baseline (its
#      quiet windows of 4 s right before and right after each attack, taken
#      together: a single quiet window's p99 moved 3x from one stretch to
#      the next on the 2-vCPU VM). With 2 CPUs or more (and taskset)
#      the measured path, cyan with one worker plus the control client and
#      its backends, runs on CPU 0 and the attack clients on CPU 1, so the
#      p99 shows what the attacks cost cyan, not the attackers' own CPU; the
#      control client and its backends run at real-time priority (when
#      allowed: root), standing for machines of their own;
#    - connection cap: 3,000 idle connections against max_connections = 1,000:
#      the excess waits in the backlog, no accept spin (proxy CPU), admin and
#      metrics answer, a waiting client is served once the flood leaves;
#    - split accuracy: 1/99, 10/90, 50/50, 90/10 over 100,000 requests each
#      within +-0.5 points; 0 % and 100 % send exactly nothing to the other side;
#    - split storm: 5,000 split changes over the admin socket under
#      digest-checked upload load: nothing fails, RSS within +8 MiB after
#      warm-up, descriptors back to baseline.
#    Every scenario ends by checking the proxy is alive and its open
#    descriptor count is back to its idle baseline (taken right after start,
#    compared once the clients are quiet and pooled connections expired).
# 2. testssl.sh (Debian package `testssl.sh`, installed if missing) against
#    `cyan run` with a TLS listener and a fresh RSA certificate: TLS 1.2/1.3
#    only, AEAD + forward-secret suites only, server cipher order, ALPN h2 and
#    http/1.1; read from its --jsonfile output.
# 3. cargo-fuzz (installed with `cargo install cargo-fuzz --locked` if
#    missing): every target in fuzz/ for CYAN_EXT_FUZZ_SECONDS (default 60 x
#    scale) on a scratch copy of its corpus; a row per target with executions
#    and crashes (target 0; crash inputs land in fuzz/artifacts/<target>/).
#
# Environment:
#   CYAN_EXT_SCALE           scales counts and durations (default 1)
#   CYAN_EXT_FUZZ_SECONDS    seconds per fuzz target (default 60 x scale)
#   CYAN_EXT_FUZZ_SANITIZER  none (default; cyan has no unsafe code) or address
#   CYAN_EXT_SKIP            comma-separated: rust, testssl, fuzz
#   CYAN_EXT_KEEP            1 keeps the work directory (logs, testssl JSON)
#   CARGO_TARGET_DIR         honoured (the cyan binary is looked up there)
#   CYAN_BIN                 test this cyan binary instead of cargo's release
#                            build (e.g. deploy/build-release.sh's, before it is
#                            published): the Rust scenarios and testssl.sh both
#                            start it

set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

SCALE="${CYAN_EXT_SCALE:-1}"
FUZZ_SECONDS="${CYAN_EXT_FUZZ_SECONDS:-$(awk -v s="$SCALE" 'BEGIN { n = int(60 * s); print (n < 5 ? 5 : n) }')}"
SANITIZER="${CYAN_EXT_FUZZ_SANITIZER:-none}"
SKIP=",${CYAN_EXT_SKIP:-},"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
if [ -n "${CYAN_BIN:-}" ]; then
    [ -f "$CYAN_BIN" ] && [ -x "$CYAN_BIN" ] || { echo "extended.sh: CYAN_BIN=$CYAN_BIN is not an executable" >&2; exit 2; }
    CYAN_BIN="$(realpath "$CYAN_BIN")"
    export CYAN_BIN
fi
# The binary the scenarios start: tests/support cyan_exe() reads CYAN_BIN too.
CYAN_EXE="${CYAN_BIN:-$TARGET_DIR/release/cyan}"
WORK="$(mktemp -d /tmp/cyan-extended.XXXXXX)"
RESULTS="$WORK/results.txt"
: >"$RESULTS"
START=$(date +%s)
PIDS=()

log() { printf '[extended %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# Stops every process this script started, by PID (SIGTERM, then SIGKILL).
cleanup() {
    local pid
    for pid in "${PIDS[@]:-}"; do
        [ -n "$pid" ] || continue
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null
            for _ in $(seq 1 50); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            kill -KILL "$pid" 2>/dev/null
        fi
        wait "$pid" 2>/dev/null
    done
    PIDS=()
    # cyan processes the Rust scenarios started (they stop them themselves;
    # this only matters if a test process was killed): by PID, and only if
    # that PID is still a cyan binary.
    if [ -f "$WORK/cyan.pids" ]; then
        while read -r pid; do
            if [ -n "$pid" ] && [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$CYAN_EXE" ]; then
                kill -KILL "$pid" 2>/dev/null
            fi
        done <"$WORK/cyan.pids"
    fi
    if [ "${CYAN_EXT_KEEP:-0}" = 1 ]; then
        log "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# row NAME MEASURED TARGET PASS|FAIL
row() {
    local measured="${2//|//}"
    printf '%s|%s|%s|%s\n' "$1" "$measured" "$3" "$4" >>"$RESULTS"
}

skipped() { [[ "$SKIP" == *",$1,"* ]]; }

# Installs Debian packages (as root, or through sudo when it works without a
# password).
apt_install() {
    local run=()
    if [ "$(id -u)" != 0 ]; then
        if sudo -n true 2>/dev/null; then
            run=(sudo -n)
        else
            log "cannot install $* (not root, no passwordless sudo)"
            return 1
        fi
    fi
    DEBIAN_FRONTEND=noninteractive "${run[@]}" apt-get install -y -q "$@" >"$WORK/apt.log" 2>&1 ||
        { "${run[@]}" apt-get update -q >>"$WORK/apt.log" 2>&1 &&
            DEBIAN_FRONTEND=noninteractive "${run[@]}" apt-get install -y -q "$@" >>"$WORK/apt.log" 2>&1; }
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ---------------------------------------------------------------------------
# 1. The Rust scenarios.
# ---------------------------------------------------------------------------
run_rust() {
    log "building (release) and running tests/extended.rs"
    local out="$WORK/extended.log" rc
    CYAN_EXT_SCALE="$SCALE" CYAN_EXT_PIDFILE="$WORK/cyan.pids" timeout 1800 \
        cargo test --release --test extended -- --ignored --test-threads=1 --nocapture >"$out" 2>&1
    rc=$?
    grep -o 'RESULT|.*' "$out" | sed 's/^RESULT|//' >>"$RESULTS"
    # Each test's rows start with its prefix; a test that failed without a
    # failing row (a panic outside a row) gets one.
    local t prefix
    for t in slowloris connection_cap_flood split_accuracy split_storm_long; do
        case "$t" in
        slowloris) prefix="slowloris" ;;
        connection_cap_flood) prefix="cap:" ;;
        split_accuracy) prefix="split (green|accuracy)" ;;
        split_storm_long) prefix="split storm" ;;
        esac
        if ! grep -q "^test $t \.\.\." "$out"; then
            row "rust: $t" "did not run (cargo test exit $rc; see the log)" "runs" FAIL
        elif grep -qx "    $t" "$out" && ! grep -Eq "^$prefix.*\|FAIL\$" "$RESULTS"; then
            row "rust: $t" "failed outside a row: $(grep -m1 -A1 'panicked at' "$out" | tail -1)" "passes" FAIL
        fi
    done
    if [ "$rc" != 0 ]; then
        grep -E "panicked at|control failures|cyan log" -A6 "$out" | head -60 >&2
    fi
    log "rust scenarios done (exit $rc)"
}

# ---------------------------------------------------------------------------
# 2. testssl.sh against a cyan TLS listener.
# ---------------------------------------------------------------------------
run_testssl() {
    local testssl
    testssl="$(command -v testssl || command -v testssl.sh || true)"
    if [ -z "$testssl" ]; then
        log "installing testssl.sh"
        apt_install testssl.sh
        testssl="$(command -v testssl || command -v testssl.sh || true)"
    fi
    command -v jq >/dev/null || apt_install jq
    if [ -z "$testssl" ] || ! command -v jq >/dev/null; then
        row "testssl: run" "testssl.sh or jq not installable" "runs" FAIL
        return
    fi
    local cyan="$CYAN_EXE"
    if [ -z "${CYAN_BIN:-}" ] && { [ ! -x "$cyan" ] || skipped rust; }; then
        log "building the cyan binary (release)"
        cargo build --release --bin cyan >"$WORK/build.log" 2>&1 || {
            row "testssl: run" "cargo build --release failed" "runs" FAIL
            return
        }
    fi
    local dir="$WORK/tls" port
    mkdir -p "$dir"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$dir/key.pem" -out "$dir/cert.pem" \
        -days 2 -subj /CN=localhost -addext subjectAltName=DNS:localhost >/dev/null 2>&1
    port="$(free_port)"
    cat >"$dir/cyan.toml" <<EOF
[metrics]
listen = "off"

[[listener]]
name = "tls"
listen = "127.0.0.1:$port"
tls = { cert = "$dir/cert.pem", key = "$dir/key.pem" }

[[service]]
name = "gateway"
candidate_percent = 0
blue  = { endpoints = ["127.0.0.1:9"] }
green = { endpoints = ["127.0.0.1:9"] }
EOF
    "$cyan" run --config "$dir/cyan.toml" >"$dir/cyan.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    local up=0
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            up=1
            break
        fi
        sleep 0.1
    done
    if [ "$up" != 1 ]; then
        row "testssl: run" "cyan did not start: $(tail -3 "$dir/cyan.log" | tr '\n' ' ')" "runs" FAIL
        return
    fi
    log "testssl.sh against cyan (pid $pid) on 127.0.0.1:$port"
    local json="$WORK/testssl.json"
    timeout 900 "$testssl" --jsonfile "$json" --warnings off --color 0 --quiet \
        -p -s -P -E --ip 127.0.0.1 "127.0.0.1:$port" >"$WORK/testssl.log" 2>&1
    local rc=$?
    kill -TERM "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    if [ ! -s "$json" ]; then
        row "testssl: run" "no JSON output (exit $rc, see log)" "runs" FAIL
        return
    fi
    finding() { jq -r --arg id "$1" '[.[] | select(.id == $id) | .finding] | first // "absent"' "$json"; }

    local protos="" p f ok=PASS
    for p in SSLv2 SSLv3 TLS1 TLS1_1 TLS1_2 TLS1_3; do
        f="$(finding "$p")"
        protos+="$p: $f; "
        case "$p" in
        TLS1_2 | TLS1_3) [[ "$f" == offered* ]] || ok=FAIL ;;
        *) [[ "$f" == "not offered"* ]] || ok=FAIL ;;
        esac
    done
    row "testssl: protocols" "${protos%; }" "only TLS 1.2 and 1.3 offered" "$ok"

    local cats="" c
    ok=PASS
    for c in NULL aNULL EXPORT LOW 3DES_IDEA AVERAGE; do
        f="$(finding "cipherlist_$c")"
        cats+="$c: $f; "
        [[ "$f" == "not offered"* ]] || ok=FAIL
    done
    f="$(finding cipherlist_STRONG)"
    [[ "$f" == offered* ]] || ok=FAIL
    row "testssl: cipher categories" "${cats%; }; STRONG: $f" \
        "no NULL/EXPORT/LOW(RC4,DES)/3DES/CBC (AVERAGE); AEAD offered" "$ok"

    local suites weak
    suites="$(jq -r '[.[] | select(.id | startswith("cipher-tls")) | .finding | split(" ") | map(select(. != "")) | .[3]] | join(" ")' "$json")"
    # TLS 1.2 suites must be ECDHE (forward secrecy) with GCM or ChaCha20.
    weak="$(jq -r '[.[] | select(.id | startswith("cipher-tls1_2")) | .finding | split(" ") | map(select(. != "")) | .[3]
        | select((startswith("ECDHE-") and (contains("GCM") or contains("CHACHA20"))) | not)] | join(" ")' "$json")"
    if [ -n "$suites" ] && [ -z "$weak" ]; then ok=PASS; else ok=FAIL; fi
    row "testssl: suites offered" "$suites${weak:+ (weak: $weak)}" "AEAD with forward secrecy only" "$ok"

    f="$(finding cipher_order)"
    [[ "$f" == server* ]] && ok=PASS || ok=FAIL
    row "testssl: cipher order" "$f ($(finding cipherorder_TLSv1_2))" "server" "$ok"

    local h2 alpn
    h2="$(finding ALPN_HTTP2)"
    alpn="$(finding ALPN)"
    [[ "$h2" == *h2* && "$alpn" == *http/1.1* ]] && ok=PASS || ok=FAIL
    row "testssl: ALPN" "ALPN_HTTP2: $h2; ALPN: $alpn" "h2 and http/1.1" "$ok"

    local bad
    bad="$(jq -r '[.[] | select(.severity == "MEDIUM" or .severity == "HIGH" or .severity == "CRITICAL") | .id] | join(" ")' "$json")"
    [ -z "$bad" ] && ok=PASS || ok=FAIL
    row "testssl: findings MEDIUM or worse" "${bad:-none} (scan $(finding scanTime) s)" "none" "$ok"
}

# ---------------------------------------------------------------------------
# 3. Fuzzing.
# ---------------------------------------------------------------------------
run_fuzz() {
    if ! cargo fuzz --version >/dev/null 2>&1; then
        log "installing cargo-fuzz"
        cargo install cargo-fuzz --locked >"$WORK/cargo-fuzz-install.log" 2>&1 || {
            row "fuzz: cargo-fuzz" "cargo install cargo-fuzz failed" "installed" FAIL
            return
        }
    fi
    # The fuzz crate is a workspace of its own: start from the main lock
    # file so it builds the versions cyan is tested with.
    [ -f fuzz/Cargo.lock ] || cp Cargo.lock fuzz/Cargo.lock
    # A stale rustc probe cache makes cargo reject -Z flags on stable.
    rm -f fuzz/target/.rustc_info.json
    local targets t
    targets="$(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^cyan-fuzz$')"
    log "building the fuzz targets (sanitizer: $SANITIZER)"
    if ! (cd fuzz && RUSTC_BOOTSTRAP=1 timeout 1800 cargo fuzz build -s "$SANITIZER") >"$WORK/fuzz-build.log" 2>&1; then
        row "fuzz: build" "cargo fuzz build failed: $(grep -m1 -E '^error' "$WORK/fuzz-build.log")" "builds" FAIL
        return
    fi
    for t in $targets; do
        local scratch="$WORK/corpus/$t" out="$WORK/fuzz-$t.log" rc
        mkdir -p "$scratch"
        log "fuzzing $t for ${FUZZ_SECONDS}s"
        # New inputs go to the scratch directory; the committed seeds are
        # only read. -rss_limit_mb guards against runaway inputs.
        (cd fuzz && RUSTC_BOOTSTRAP=1 timeout $((FUZZ_SECONDS + 300)) cargo fuzz run -s "$SANITIZER" "$t" \
            "$scratch" "corpus/$t" -- -max_total_time="$FUZZ_SECONDS" -print_final_stats=1 \
            -rss_limit_mb=2048 -timeout=10) >"$out" 2>&1
        rc=$?
        local execs crashes
        execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$out" | tail -1)"
        crashes="$(grep -cE 'ERROR: libFuzzer|ERROR: AddressSanitizer|panicked at|Test unit written to' "$out")"
        if [ "$rc" = 0 ] && [ -n "$execs" ] && [ "$crashes" = 0 ]; then
            row "fuzz: $t" "$execs executions in ${FUZZ_SECONDS}s, 0 crashes, corpus $(find "$scratch" -type f | wc -l) new + $(find "fuzz/corpus/$t" -type f | wc -l) seeds" "0 crashes" PASS
        else
            row "fuzz: $t" "${execs:-?} executions, exit $rc, crash reports: $crashes ($(grep -m1 -oE 'Test unit written to .*' "$out" || echo 'see log'))" "0 crashes" FAIL
        fi
    done
}

skipped rust || run_rust
skipped testssl || run_testssl
skipped fuzz || run_fuzz

# ---------------------------------------------------------------------------
# The table.
# ---------------------------------------------------------------------------
ELAPSED=$(($(date +%s) - START))
{
    echo "name|measured|target|result"
    echo "----|--------|------|------"
    cat "$RESULTS"
} | awk -F'|' '
    { for (i = 1; i <= 4; i++) { cell[NR, i] = $i; if (length($i) > w[i]) w[i] = length($i) } }
    END {
        if (w[2] > 110) w[2] = 110
        for (r = 1; r <= NR; r++) {
            line = ""
            for (i = 1; i <= 4; i++) {
                c = cell[r, i]
                if (r == 2) { c = ""; while (length(c) < w[i]) c = c "-" }
                line = line sprintf("%-" w[i] "s", c) (i < 4 ? " | " : "")
            }
            print line
        }
    }'
TOTAL=$(wc -l <"$RESULTS")
FAILED=$(grep -c '|FAIL$' "$RESULTS")
echo
echo "extended tier: $((TOTAL - FAILED))/$TOTAL rows passed, $FAILED failed, in $((ELAPSED / 60)) min $((ELAPSED % 60)) s (scale $SCALE)"
[ "$TOTAL" -gt 0 ] && [ "$FAILED" = 0 ]
