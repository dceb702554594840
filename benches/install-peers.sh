#!/usr/bin/env bash
# Copies the peers' programs (crun, runc, wasmtime: whichever is on PATH) into DEST and prints
# DEST, so that a comparison runs every program from a fresh copy, as it runs caisson's
# (install-bins.sh). How a program file's pages came into the page cache counts: brought back
# by an exec's page faults after the kernel reclaimed them (small folios) it starts slower than
# a fresh copy of the same bytes (written, or read with read(2): large folios). 2026-12-04:
# `wasmtime run hello.wat` 3.40 ms vs 3.08 ms from a copy; `runc run` 15.00 vs 14.27 ms; crun,
# 0.5 MB, the same either way (docs/benchmarks.md).
#   benches/install-peers.sh DEST
set -euo pipefail
DEST=${1:?destination directory}
mkdir -p "$DEST"
for p in crun runc wasmtime; do
  src=$(command -v "$p" 2>/dev/null) || continue
  rm -f "$DEST/$p"
  cp "$src" "$DEST/$p"
done
echo "$DEST"
