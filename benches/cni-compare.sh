#!/usr/bin/env bash
# ADD+DEL of bridge + host-local: caisson's plugins vs the reference plugins (/usr/lib/cni), in
# one run, through caisson's runtime. Also a raw hyperfine comparison of the plugin binaries
# alone (ADD then DEL from a shell, the same for both). Run as root:
#   benches/cni-compare.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-100}
cargo build --release -p caisson-cni-plugins
if [ "${QUICK:-}" = 1 ]; then
  # Debug-built runner (no release build of the whole containerizer), release plugins, exec'd
  # (CAISSON_CNI_EXEC): in-process they would run the runner's debug build of their code. The
  # runtime's share is the same for both plugin sets. Without QUICK, ours run in-process.
  CAISSON_CNI_EXEC=1 CAISSON_CNI_PLUGINS="${CARGO_TARGET_DIR:-$PWD/target}/release" cargo test -p caisson-benches --bench cni -- "$RUNS"
else
  cargo bench -p caisson-benches --bench cni -- "$RUNS"
fi

command -v hyperfine >/dev/null || { echo "hyperfine not installed; skipping the raw comparison"; exit 0; }
work=$(mktemp -d /tmp/caisson-cni-bench.XXXXXX)
ns=caisson-test-bench$$
cleanup() { ip netns del "$ns" 2>/dev/null || true; ip link del cstbench1 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
ip netns add "$ns"
for set in ref ours; do
  if [ $set = ref ]; then dir=/usr/lib/cni; else dir=${CARGO_TARGET_DIR:-$PWD/target}/release; fi
  printf '{"cniVersion":"1.0.0","name":"bench","type":"bridge","bridge":"cstbench1","isGateway":true,"ipam":{"type":"host-local","dataDir":"%s","ranges":[[{"subnet":"10.232.201.0/24"}]],"routes":[{"dst":"0.0.0.0/0"}]}}' "$work/ipam-$set" > "$work/$set.json"
  cat > "$work/$set.sh" <<SH
export CNI_CONTAINERID=bench CNI_NETNS=/run/netns/$ns CNI_IFNAME=eth0 CNI_PATH=$dir
CNI_COMMAND=ADD $dir/bridge < $work/$set.json >/dev/null
CNI_COMMAND=DEL $dir/bridge < $work/$set.json >/dev/null
SH
done
hyperfine -N --warmup 5 --runs "$RUNS" --export-json "$work/cni.json" \
  -n reference "sh $work/ref.sh" -n caisson "sh $work/ours.sh"
if [ -n "${CAISSON_BENCH_OUT:-}" ]; then cp "$work/cni.json" "$CAISSON_BENCH_OUT/"; fi
