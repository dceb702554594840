#!/usr/bin/env bash
# Pull + unpack side by side in one run: caisson vs `skopeo copy` + `umoci unpack` (what a user
# would otherwise script), from the same local docker-registry, for a small busybox image and a
# generated ~200 MB multi-file image. Uses hyperfine; prints medians. Run as root:
#   benches/pull-compare.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-10}
scripts/install-deps.sh
CAISSON="$(scripts/build-dist.sh release)/caisson"
work=$(mktemp -d /tmp/caisson-bench.XXXXXX)
reg_pid=""
cleanup() { [ -n "$reg_pid" ] && kill "$reg_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'version: 0.1\nlog: {level: error}\nstorage: {filesystem: {rootdirectory: %s}}\nhttp: {addr: 127.0.0.1:%s}\n' \
  "$work/registry" "$port" > "$work/registry.yml"
docker-registry serve "$work/registry.yml" >/dev/null 2>&1 &
reg_pid=$!
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
reg="127.0.0.1:$port"

# Small: busybox-static in one layer (~1 MB compressed).
umoci init --layout "$work/oci" >/dev/null
umoci new --image "$work/oci:small" >/dev/null
umoci unpack --image "$work/oci:small" "$work/b" >/dev/null
mkdir -p "$work/b/rootfs/bin"; cp /bin/busybox "$work/b/rootfs/bin/"
for a in sh ls cat; do ln -s busybox "$work/b/rootfs/bin/$a"; done
umoci repack --image "$work/oci:small" "$work/b" >/dev/null; rm -rf "$work/b"
# Large: ~200 MB in 4 layers of 2,500 files each (half random, half text).
umoci new --image "$work/oci:large" >/dev/null
for l in 1 2 3 4; do
  umoci unpack --image "$work/oci:large" "$work/b" >/dev/null
  python3 - "$work/b/rootfs/layer$l" <<'PY'
import os, sys, random
d = sys.argv[1]; os.makedirs(d); r = random.Random(int.from_bytes(d.encode(), 'little'))
for i in range(2500):
    sub = os.path.join(d, f"dir{i % 25}"); os.makedirs(sub, exist_ok=True)
    n = 20000
    with open(os.path.join(sub, f"f{i}"), "wb") as f:
        f.write(r.randbytes(n // 2) + (b"caisson " * (n // 16)))
PY
  umoci repack --image "$work/oci:large" "$work/b" >/dev/null; rm -rf "$work/b"
done
for t in small large; do
  skopeo copy --quiet --dest-tls-verify=false "oci:$work/oci:$t" "docker://$reg/bench/img:$t"
done

for t in small large; do
  echo "== $t image"
  # CAISSON_BASE=/path/to/other/caisson adds a row for it (an A/B of two builds in one run).
  base=()
  if [ -n "${CAISSON_BASE:-}" ]; then
    base=(-n "caisson (base) pull" --prepare "rm -rf $work/root"
          "$CAISSON_BASE --root $work/root pull -q $reg/bench/img:$t")
  fi
  hyperfine --runs "$RUNS" --warmup 1 --export-json "$work/$t.json" \
    -n "caisson pull" \
    --prepare "rm -rf $work/root" \
    "$CAISSON --root $work/root pull -q $reg/bench/img:$t" \
    -n "skopeo copy + umoci unpack" \
    --prepare "rm -rf $work/p-oci $work/p-bundle" \
    "skopeo copy --quiet --src-tls-verify=false docker://$reg/bench/img:$t oci:$work/p-oci:$t && umoci unpack --image $work/p-oci:$t $work/p-bundle >/dev/null" \
    "${base[@]}"
  jq -r '.results[] | "\(.command)\tmedian \(.median*1000|floor) ms"' "$work/$t.json"
  jq -r '"ratio caisson/peer (medians): \((.results[0].median / .results[1].median) * 100 | floor / 100)"' "$work/$t.json"
  if [ -n "${CAISSON_BENCH_OUT:-}" ]; then cp "$work/$t.json" "$CAISSON_BENCH_OUT/pull-$t.json"; fi
done
