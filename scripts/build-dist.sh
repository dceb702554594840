#!/usr/bin/env bash
# Builds the programs an install of caisson is made of into one directory, and prints it:
#   scripts/build-dist.sh [release|debug]     -> target/dist (default) or target/dist-debug
#
# - caisson, caisson-shim and the CNI plugins (bridge, host-local, loopback, portmap): static
#   musl programs (x86_64-unknown-linux-musl, non-PIE). They start once per `caisson` command,
#   task and CNI call, and on VMs every glibc program start spends ~0.5 ms in CPU-feature probes
#   (`cpuid`, a trap to the hypervisor each: ~6 us here) before main; musl makes none, and a
#   static program maps no libraries. `caisson` uses mimalloc there (musl's allocator halves
#   multi-threaded throughput).
# - caisson-wasm and caisson-nvml: glibc programs. caisson-wasm is the long-running Wasm service
#   and shared host process (glibc's allocator keeps an idle service near 0.75 MiB, mimalloc's
#   took ~1.2); caisson-nvml lists the GPUs for the static caisson, which cannot load NVML (a
#   glibc library loaded at run time).
# Each finds the others next to itself. Needs musl-gcc (Debian musl-tools: the C code of ring,
# zstd and mimalloc) and the Rust target: scripts/install-deps.sh installs both.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${1:-release}
MUSL=x86_64-unknown-linux-musl
case "$PROFILE" in
  release) flags=(--release); dir=release; out=dist ;;
  debug) flags=(); dir=debug; out=dist-debug ;;
  *) echo "usage: $0 [release|debug]" >&2; exit 2 ;;
esac
scripts/install-deps.sh >&2
T=${CARGO_TARGET_DIR:-target}
cargo build "${flags[@]}" --target "$MUSL" -p caisson --bin caisson --bin caisson-shim >&2
cargo build "${flags[@]}" --target "$MUSL" -p caisson-cni-plugins --bins >&2
cargo build "${flags[@]}" -p caisson --bin caisson-wasm --bin caisson-nvml >&2
mkdir -p "$T/$out"
for b in caisson caisson-shim bridge host-local loopback portmap; do
  cp -f "$T/$MUSL/$dir/$b" "$T/$out/$b.new" && mv -f "$T/$out/$b.new" "$T/$out/$b"
done
for b in caisson-wasm caisson-nvml; do
  cp -f "$T/$dir/$b" "$T/$out/$b.new" && mv -f "$T/$out/$b.new" "$T/$out/$b"
done
realpath "$T/$out"
