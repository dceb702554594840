#!/usr/bin/env bash
# Copies caisson's binaries from SRC (default: the release build) into DEST, as an install
# would, and prints DEST. Benchmarks run the copies: a file the linker has just written sits in
# the page cache in small pieces, and every start maps and faults it in more slowly (here a
# `caisson-wasm run` took 3.3 ms from target/release and 2.8 ms from a copy of the same bytes).
# The peers (crun, runc, wasmtime) get the same: install-peers.sh.
#   benches/install-bins.sh DEST [SRC]     (SRC default: target/dist, scripts/build-dist.sh)
set -euo pipefail
DEST=${1:?destination directory}
SRC=${2:-${CARGO_TARGET_DIR:-$(cd "$(dirname "$0")/.." && pwd)/target}/dist}
mkdir -p "$DEST"
for b in caisson caisson-shim caisson-wasm; do
  [ -x "$SRC/$b" ] || { echo "missing $SRC/$b (scripts/build-dist.sh)" >&2; exit 1; }
  rm -f "$DEST/$b"
  cp "$SRC/$b" "$DEST/$b"
done
# The static caisson's NVML helper (an older build or a plain cargo build has none).
if [ -x "$SRC/caisson-nvml" ]; then rm -f "$DEST/caisson-nvml"; cp "$SRC/caisson-nvml" "$DEST/"; fi
echo "$DEST"
