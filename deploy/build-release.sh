#!/usr/bin/env bash
# The optimized cyan binary for hosts: profile-guided (benches/pgo.sh), then
# laid out by BOLT (benches/bolt.sh), both trained on the same loopback load
# (benches/lab.sh `lab_train`), then checked before it is published, with
# CYAN_BIN pointing the tests at it:
#   - the tests that start cyan as a process: `cyan run` reloads, restarts,
#     state and `cyan ctl` (tests/control_plane.rs), binary upgrades that
#     refuse no connection (tests/upgrade.rs);
#   - the extended tier's scenarios against the real process
#     (tests/extended.sh: slowloris, connection cap flood, split accuracy,
#     split storm), at CYAN_EXT_SCALE (default here 0.2, a quick pass).
# The rest of `cargo test` runs cyan's library inside the test process, so
# it checks the source, not this binary.
#
#   bash deploy/build-release.sh    # -> target/optimized/cyan (~15-25 minutes on 2 cores)
#
# Same source and features as `cargo build --release`; what it buys per
# request is in benches/README.md ("PGO + BOLT: deploy/build-release.sh").
# The caller's RUSTFLAGS are kept under both builds.
#
# Needs, besides cargo: llvm-profdata from rustc's LLVM (`rustup component
# add llvm-tools`), llvm-bolt with its runtime (Debian 12: `apt-get install
# bolt-19`; LLVM_BOLT overrides the path), and nginx, wrk, h2load
# (nghttp2-client), openssl, python3 for the training lab. Traffic goes to
# 127.0.0.1 only; everything started is stopped by PID.
#
# target/optimized/ gets the binary and BUILD (commit, rustc, profile,
# flags, sha256) only when every step, the tests included, passed, and the
# checkout did not change under the build; a failed run leaves the last
# good one in place.

set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$ROOT/target/optimized
SCALE=${CYAN_EXT_SCALE:-0.2}
started=$SECONDS

say() { echo "build-release.sh: $*"; }
fail() { echo "build-release.sh: $*" >&2; exit 1; }

# Every tool first, with the checks pgo.sh and bolt.sh make themselves: a
# missing one should not cost the PGO step's minutes.
# shellcheck source=benches/lab.sh
source "$ROOT/benches/lab.sh"
lab_profdata build-release.sh
lab_bolt build-release.sh
lab_tools build-release.sh

# What is built: the sources as committed (their tree and blob ids, so a
# commit of docs alone changes nothing) and any uncommitted change to them,
# read now and again at the end.
SOURCES=(src Cargo.toml Cargo.lock)
source_state() {
    local p
    for p in "${SOURCES[@]}"; do git -C "$ROOT" rev-parse "HEAD:$p" 2>/dev/null || echo "$p: ?"; done
    git -C "$ROOT" status --porcelain -- "${SOURCES[@]}" 2>/dev/null || true
    git -C "$ROOT" diff HEAD -- "${SOURCES[@]}" 2>/dev/null | sha256sum
}
before=$(source_state)
commit=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
[[ -z "$(git -C "$ROOT" status --porcelain -- "${SOURCES[@]}" 2>/dev/null)" ]] ||
    commit="$commit (with uncommitted changes in src/ or Cargo.*)"

say "1/3 PGO profile (benches/pgo.sh)"
PGO_BUILD=0 bash "$ROOT/benches/pgo.sh"
profiles=("$ROOT"/target/pgo/cyan-*.profdata)
((${#profiles[@]} == 1)) && [[ -f "${profiles[0]}" ]] ||
    fail "expected one target/pgo/cyan-*.profdata, found: ${profiles[*]}"
profile=${profiles[0]}

say "2/3 PGO build laid out by BOLT (benches/bolt.sh)"
flags="${RUSTFLAGS:-} -Cprofile-use=$profile"
RUSTFLAGS=$flags bash "$ROOT/benches/bolt.sh"

# The file tested is the file published: a copy of its own, out of reach
# of another bolt.sh run.
mkdir -p "$OUT"
cand=$OUT/cyan.new
install -m 0755 "$ROOT/target/bolt/cyan" "$cand"
sum=$(sha256sum "$cand" | cut -d' ' -f1)

say "3/3 the process-level tests against it"
CYAN_BIN=$cand cargo test --locked --manifest-path "$ROOT/Cargo.toml" --test control_plane --test upgrade ||
    fail "tests failed against the optimized binary; target/optimized/cyan is unchanged"
CYAN_BIN=$cand CYAN_EXT_SCALE=$SCALE CYAN_EXT_SKIP=testssl,fuzz bash "$ROOT/tests/extended.sh" ||
    fail "the extended scenarios failed against the optimized binary; target/optimized/cyan is unchanged"

[[ "$(source_state)" == "$before" ]] ||
    fail "src/ or Cargo.* changed during the build; build again from a still tree"
[[ "$(sha256sum "$cand" | cut -d' ' -f1)" == "$sum" ]] || fail "$cand changed during the tests"

{
    echo "commit:  $commit"
    echo "rustc:   $(rustc -V)"
    echo "bolt:    $("$BOLT" --version 2>/dev/null | grep -m1 -o 'LLVM version [0-9.]*' || echo '?')"
    echo "profile: $(basename "$profile")"
    echo "flags:   $flags -C link-arg=-Wl,--emit-relocs (then llvm-bolt, see benches/bolt.sh)"
    echo "sha256:  $sum"
    echo "built:   $(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$OUT/BUILD.new"
mv "$cand" "$OUT/cyan"
mv "$OUT/BUILD.new" "$OUT/BUILD"
"$OUT/cyan" --version
say "built $OUT/cyan in $(((SECONDS - started) / 60))m$(((SECONDS - started) % 60))s"
sed 's/^/  /' "$OUT/BUILD"
