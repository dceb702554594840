#!/usr/bin/env bash
# The whole test suite: installs what the tests need, checks format and lints, builds, and runs
# every test (unit and end-to-end). Run as root on Debian.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --bins
cargo test --workspace -- --test-threads=2
# The end-to-end tests again, against the programs as installed: the static musl caisson,
# caisson-shim and CNI plugins with the glibc caisson-wasm and caisson-nvml (build-dist.sh).
dist=$(scripts/build-dist.sh debug)
CAISSON_TEST_BIN_DIR="$dist" cargo test -p caisson-tests -- --test-threads=2
