#!/usr/bin/env bash
# A profile-guided (PGO) build of cyan: an instrumented build serves a
# training load in the loopback lab (benches/lab.sh: HTTP/1.1 with sticky
# users, HTTP/2 and HTTP/1.1 over TLS 1.3), and the profile it writes on
# exit guides a second, optimized build. Same code, same features; the
# compiler lays out and inlines for the paths the load took.
#
#   bash benches/pgo.sh        # -> target/pgo/release/cyan (~12 minutes on 2 cores)
#   PGO_BUILD=0 bash benches/pgo.sh   # only the profile, target/pgo/cyan-<hash>.profdata
#
# Then, e.g.: CYAN=target/pgo/release/cyan bash benches/callgrind.sh,
# CYAN_BIN=target/pgo/release/cyan bash benches/compare.sh.
#
# Needs llvm-profdata from rustc's own LLVM (`rustup component add
# llvm-tools`; Debian's llvm-profdata is an older LLVM that cannot read
# rustc's profiles; LLVM_PROFDATA overrides the path), and nginx, wrk,
# h2load, openssl, python3 for the lab. Traffic goes to 127.0.0.1 only;
# everything started is stopped by PID. What it measured: benches/README.md
# ("Profile-guided build").

set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
CFG=$HERE/compare

# shellcheck source=benches/lab.sh
source "$HERE/lab.sh"
lab_profdata pgo.sh
lab_begin pgo.sh

# Flags the caller set stay; the profile flags come on top.
flags=${RUSTFLAGS:-}

# A fixed path: the instrumented build names it, and a second run of this
# script reuses that build.
RAW=$ROOT/target/pgo-gen/profraw
echo "pgo.sh: instrumented build (target/pgo-gen)"
RUSTFLAGS="$flags -Cprofile-generate=$RAW" CARGO_TARGET_DIR="$ROOT/target/pgo-gen" \
    cargo build --release --locked --manifest-path "$ROOT/Cargo.toml"
# Build scripts ran instrumented too, and so may an earlier training run
# have: only this run of cyan counts.
rm -rf "$RAW"

lab_up
lab_train pgo.sh "$ROOT/target/pgo-gen/release/cyan"
compgen -G "$RAW/*.profraw" >/dev/null || { echo "pgo.sh: cyan wrote no profile" >&2; exit 1; }

mkdir -p "$ROOT/target/pgo"
"$PROFDATA" merge -o "$WORK/cyan.profdata" "$RAW"
# Named by its content: a new profile changes RUSTFLAGS, so cargo rebuilds
# everything with it instead of keeping what the last profile built.
profile=$ROOT/target/pgo/cyan-$(sha256sum "$WORK/cyan.profdata" | cut -c1-16).profdata
rm -f "$ROOT"/target/pgo/cyan-*.profdata
mv "$WORK/cyan.profdata" "$profile"
# PGO_BUILD=0: the profile is what the caller wants (deploy/build-release.sh
# builds with it under BOLT's link flags itself).
if [[ "${PGO_BUILD:-1}" == 0 ]]; then
    echo "pgo.sh: profile $profile"
    exit 0
fi
echo "pgo.sh: optimized build (target/pgo, profile $(basename "$profile"))"
RUSTFLAGS="$flags -Cprofile-use=$profile" CARGO_TARGET_DIR="$ROOT/target/pgo" \
    cargo build --release --locked --manifest-path "$ROOT/Cargo.toml"
echo "pgo.sh: built $ROOT/target/pgo/release/cyan"
