#!/usr/bin/env bash
# Installs what caisson's tests, demo and benchmarks need on Debian (idempotent).
set -euo pipefail
PKGS=(busybox-static umoci skopeo docker-registry apache2-utils containernetworking-plugins
      runc crun hyperfine iproute2 jq iptables podman wrk gcc curl musl-tools)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "cargo (rustup) is required" >&2; exit 1; }
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt
# Wasm test guests are built from source for both WASI targets; the installed binaries are static
# musl programs (scripts/build-dist.sh).
for t in wasm32-wasip1 wasm32-wasip2 x86_64-unknown-linux-musl; do
  rustup target list --installed 2>/dev/null | grep -qx "$t" || rustup target add "$t"
done
