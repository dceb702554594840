#!/usr/bin/env bash
# The main job, end to end on a fresh machine: builds caisson, runs `caisson demo` (master +
# agent + a native task, a Wasm task and a wasi:http microservice it calls, latency per phase), then makes a busybox image with real
# tools (umoci), pushes it to a local registry (docker-registry) and loads it as an archive,
# then pulls, lists and inspects it with caisson. Run as root on Debian.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# The binaries an install is made of (static musl caisson and caisson-shim, glibc caisson-wasm).
CAISSON="$(scripts/build-dist.sh release)/caisson"

echo "== caisson demo: a master, an agent, a native task, a Wasm task and a Wasm HTTP microservice side by side"
"$CAISSON" demo

work=$(mktemp -d /tmp/caisson-demo.XXXXXX)
root="$work/root"
reg_pid=""
cleanup() { [ -n "$reg_pid" ] && kill "$reg_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

echo "== building a busybox image with umoci"
umoci init --layout "$work/oci" >/dev/null
umoci new --image "$work/oci:latest" >/dev/null
umoci unpack --image "$work/oci:latest" "$work/bundle" >/dev/null
mkdir -p "$work/bundle/rootfs/bin"
cp /bin/busybox "$work/bundle/rootfs/bin/"
for a in sh ls cat echo true; do ln -s busybox "$work/bundle/rootfs/bin/$a"; done
umoci repack --image "$work/oci:latest" "$work/bundle" >/dev/null
umoci config --image "$work/oci:latest" --config.cmd /bin/sh --config.env PATH=/bin >/dev/null

echo "== starting a local registry and pushing the image with skopeo"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/registry.yml" <<YML
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: 127.0.0.1:$port}
YML
docker-registry serve "$work/registry.yml" >/dev/null 2>&1 &
reg_pid=$!
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
skopeo copy --quiet --dest-tls-verify=false "oci:$work/oci:latest" "docker://127.0.0.1:$port/demo/busybox:1.0"
skopeo copy --quiet "oci:$work/oci:latest" "docker-archive:$work/busybox.tar:demo/busybox:archive"

echo "== caisson pull, load, images, image inspect"
set -x
"$CAISSON" --root "$root" pull "127.0.0.1:$port/demo/busybox:1.0"
"$CAISSON" --root "$root" load -i "$work/busybox.tar"
"$CAISSON" --root "$root" images
"$CAISSON" --root "$root" image inspect "127.0.0.1:$port/demo/busybox:1.0" | jq '.[0] | {Id, Platform, Config, Layers: (.Layers | length)}'
ls -l "$root"/layers/sha256/*/diff/bin | head -5
