#!/usr/bin/env bash
# Networked vs --network none `run --rm`, and a wasi:http hello service under wrk (release build;
# the guest is built by the wasm_run tests). Run as root: networked vs --network none run --rm; wasi:http hello under wrk.
set -euo pipefail
cd "$(dirname "$0")/.."
R="$PWD/${CARGO_TARGET_DIR:-target}/release"
GUEST="$PWD/${CARGO_TARGET_DIR:-target}/wasm-guests/wasm32-wasip2/release/caisson_http_guest.wasm"
W=$(mktemp -d /tmp/meas.XXXX)
cd "$W"
umoci init --layout oci >/dev/null; umoci new --image oci:latest >/dev/null
umoci unpack --image oci:latest b >/dev/null; mkdir -p b/rootfs/bin; cp /bin/busybox b/rootfs/bin/
ln -s busybox b/rootfs/bin/true; umoci repack --image oci:latest b >/dev/null
C="$R/caisson --root $W/root --cni-config-dir $W/net --cni-plugin-dir $R"
$C load -i oci:latest >/dev/null
ip link del cmeas0 2>/dev/null || true
$C network create --subnet 10.231.77.0/24 --bridge cmeas0 measnet >/dev/null
hyperfine -N --warmup 5 --runs 40 --export-json "$W/h.json" \
  "$C run --rm localhost/oci:latest /bin/true" \
  "$C run --rm --network measnet localhost/oci:latest /bin/true" 2>&1 | grep -E "Time|±|Benchmark"
jq -r '.results[] | "\(.command): median \(.median*1000|floor) ms"' "$W/h.json"
$C bench launch --kind native --image localhost/oci:latest -n 30 --warmup 3 --network measnet --json -- /bin/true > "$W/b.json" 2>/dev/null || true
jq -r '.phases // .report.phases // . | tostring' "$W/b.json" | head -c 1500; echo
# wasi:http hello
port=18299
id=$($C run -d -p 127.0.0.1:$port:80 "$GUEST")
for i in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:$port/ && break; sleep 0.2; done
wrk -t2 -c32 -d10s http://127.0.0.1:$port/ | grep -E "Requests/sec|Latency|requests in"
ps -o rss= -p $(pgrep -f "caisson-wasm run --spec $W/root" | head -1) | awk '{print "caisson-wasm RSS KiB:", $1}'
$C rm -f $id >/dev/null; $C rm -a >/dev/null
ip link del cmeas0 2>/dev/null || true
rm -rf "$W"
