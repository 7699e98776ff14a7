#!/usr/bin/env bash
# The optimized cyan binary for hosts: profile-guided (benches/pgo.sh), then
# laid out by BOLT (benches/bolt.sh), both trained on the same loopback load
# (benches/lab.sh `lab_train`), then checked before it is published: the
# tests that start cyan as a process (`cyan run`, `cyan ctl`,
# `cyan test-backend`: the control plane's CLI, binary upgrades, fault
# injection) run against it through CYAN_BIN.
#
#   bash deploy/build-release.sh    # -> target/optimized/cyan (~20 minutes on 2 cores)
#
# Same source and features as `cargo build --release`; what it buys per
# request is in benches/README.md ("PGO + BOLT"). The caller's RUSTFLAGS
# are kept under both builds.
#
# Needs, besides cargo: llvm-profdata from rustc's LLVM (`rustup component
# add llvm-tools`), llvm-bolt (Debian 12: `apt-get install bolt-19`), and
# nginx, wrk, h2load (nghttp2-client), openssl, python3 for the training
# lab. Traffic goes to 127.0.0.1 only; everything started is stopped by PID.
#
# target/optimized/ gets the binary and BUILD (commit, rustc, profile,
# sha256) only when every step, the tests included, passed; a failed run
# leaves the last good one in place.

set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$ROOT/target/optimized
started=$SECONDS

say() { echo "build-release.sh: $*"; }
fail() { echo "build-release.sh: $*" >&2; exit 1; }

say "1/3 PGO profile (benches/pgo.sh)"
PGO_BUILD=0 bash "$ROOT/benches/pgo.sh"
profiles=("$ROOT"/target/pgo/cyan-*.profdata)
((${#profiles[@]} == 1)) && [[ -f "${profiles[0]}" ]] ||
    fail "expected one target/pgo/cyan-*.profdata, found: ${profiles[*]}"
profile=${profiles[0]}

say "2/3 PGO build laid out by BOLT (benches/bolt.sh)"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$profile" bash "$ROOT/benches/bolt.sh"
bin=$ROOT/target/bolt/cyan

say "3/3 the process-level tests against $bin"
CYAN_BIN=$bin cargo test --locked --manifest-path "$ROOT/Cargo.toml" \
    --test control_plane --test upgrade --test faults --test data_path ||
    fail "tests failed against the optimized binary; target/optimized is unchanged"

mkdir -p "$OUT"
install -m 0755 "$bin" "$OUT/cyan.new"
{
    echo "commit:  $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)$(
        [[ -n "$(git -C "$ROOT" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]] && echo ' (src modified)')"
    echo "rustc:   $(rustc -V)"
    echo "bolt:    $("${LLVM_BOLT:-$(command -v llvm-bolt || command -v llvm-bolt-19)}" --version 2>/dev/null | grep -m1 -o 'LLVM version [0-9.]*' || echo '?')"
    echo "profile: $(basename "$profile")"
    echo "flags:   ${RUSTFLAGS:-}"
    echo "sha256:  $(sha256sum "$OUT/cyan.new" | cut -d' ' -f1)"
    echo "built:   $(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$OUT/BUILD.new"
mv "$OUT/cyan.new" "$OUT/cyan"
mv "$OUT/BUILD.new" "$OUT/BUILD"
"$OUT/cyan" --version
say "built $OUT/cyan in $(((SECONDS - started) / 60))m$(((SECONDS - started) % 60))s"
sed 's/^/  /' "$OUT/BUILD"
