#!/usr/bin/env bash
# A BOLT-optimized cyan: the release build, linked with its relocations
# kept, is instrumented by llvm-bolt, serves the training load in the
# loopback lab (benches/lab.sh, the same load as pgo.sh), and the profile it
# writes on exit lays the binary's code out again: the hot paths together
# and in the order they run, cold blocks split off. Same machine code per
# instruction; what changes is which code shares cache lines and pages.
#
#   bash benches/bolt.sh        # -> target/bolt/cyan (~6 minutes on 2 cores)
#
# Then, e.g.: CYAN=target/bolt/cyan CACHE=1 bash benches/callgrind.sh,
# CYAN_BIN=target/bolt/cyan bash benches/compare.sh. The caller's RUSTFLAGS
# are kept: after benches/pgo.sh,
#   RUSTFLAGS="-Cprofile-use=$PWD/target/pgo/cyan-<hash>.profdata" bash benches/bolt.sh
# lays out the PGO build (the usual order: PGO, then BOLT).
#
# Needs llvm-bolt (Debian: `apt-get install bolt-19`; LLVM_BOLT overrides
# the path) with its instrumentation runtime, and nginx,
# wrk, h2load, openssl, python3 for the lab. Traffic goes to 127.0.0.1
# only; everything started is stopped by PID. What it measured:
# benches/README.md ("BOLT").

set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
CFG=$HERE/compare

# shellcheck source=benches/lab.sh
source "$HERE/lab.sh"
lab_bolt bolt.sh
lab_begin bolt.sh

# BOLT moves code only where it knows every reference to it: the link
# keeps its relocations. Its own target dir, as the flags differ.
echo "bolt.sh: release build with relocations (target/bolt)"
RUSTFLAGS="${RUSTFLAGS:-} -C link-arg=-Wl,--emit-relocs" CARGO_TARGET_DIR="$ROOT/target/bolt" \
    cargo build --release --locked --manifest-path "$ROOT/Cargo.toml"
BIN=$ROOT/target/bolt/release/cyan

echo "bolt.sh: instrumenting"
"$BOLT" "$BIN" -instrument "--instrumentation-file=$WORK/cyan.fdata" -o "$WORK/cyan.instr" >"$WORK/instrument.log" 2>&1 ||
    { echo "bolt.sh: instrumenting failed: $(tail -5 "$WORK/instrument.log")" >&2; exit 1; }

lab_up
lab_train bolt.sh "$WORK/cyan.instr"
[[ -s "$WORK/cyan.fdata" ]] || { echo "bolt.sh: cyan wrote no profile" >&2; exit 1; }

echo "bolt.sh: laying out target/bolt/cyan"
"$BOLT" "$BIN" "-data=$WORK/cyan.fdata" -o "$WORK/cyan" \
    -reorder-blocks=ext-tsp -reorder-functions=cdsort -split-functions -split-all-cold -split-eh \
    -icf=1 -dyno-stats >"$WORK/optimize.log" 2>&1 ||
    { echo "bolt.sh: optimizing failed: $(tail -5 "$WORK/optimize.log")" >&2; exit 1; }
grep -E 'taken branches|executed instructions' "$WORK/optimize.log" | sed 's/^ */  /' || true
mv "$WORK/cyan" "$ROOT/target/bolt/cyan"
"$ROOT/target/bolt/cyan" --version >/dev/null
echo "bolt.sh: built $ROOT/target/bolt/cyan"
