#!/usr/bin/env bash
# caisson side by side with the peers a user would pick instead, in one run on one machine:
#   pull + unpack   caisson pull            vs skopeo copy + umoci unpack   (pull-compare.sh)
#   native launch   caisson run --rm        vs crun run, runc run           (launch-compare.sh)
#   CNI ADD+DEL     our bridge + host-local vs the reference plugins        (cni-compare.sh)
#   Wasm            caisson-wasm run        vs wasmtime run (if its CLI is installed)
# and prints one table: medians with their spread (p25-p75) and the ratio caisson/peer (< 1:
# caisson is faster). launch-compare.sh also cross-checks `caisson bench launch` against
# hyperfine's `caisson run --rm`. Run as root:  benches/compare.sh [RUNS]  (default 50; pulls
# use max(5, RUNS/10)). CARGO_TARGET_DIR is honoured (release binaries under it).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-50}
PULL_RUNS=$(( RUNS / 10 > 5 ? RUNS / 10 : 5 ))
out=$(mktemp -d /tmp/caisson-compare.XXXXXX)
trap 'rm -rf "$out"' EXIT
export CAISSON_BENCH_OUT=$out

echo "### pull + unpack"; benches/pull-compare.sh "$PULL_RUNS"
echo "### native launch"; benches/launch-compare.sh "$RUNS"
echo "### CNI"; QUICK=${QUICK:-} benches/cni-compare.sh "$RUNS"

echo "### Wasm"
if command -v wasmtime >/dev/null; then
  T=$(benches/install-bins.sh "$out/bin")
  P=$(benches/install-peers.sh "$out/peers")
  cache=$(mktemp -d /tmp/caisson-wasm-cache.XXXXXX)
  hyperfine -N --warmup 20 --runs "$RUNS" --export-json "$out/wasm.json" \
    -n "caisson-wasm run hello.wat" "$T/caisson-wasm run --cache $cache tests/guests/hello.wat" \
    -n "wasmtime run hello.wat" "$P/wasmtime run tests/guests/hello.wat"
  rm -rf "$cache"
else
  echo "wasmtime CLI not installed: no Wasm peer row (building it takes ~20 min; see FACTS.md)"
fi

# One row: FILE, index of caisson's result, index of the peer's, label.
row() {
  [ -f "$1" ] || return 0
  jq -r --argjson c "$2" --argjson p "$3" --arg l "$4" '
    def q(f): (.times | sort) as $t | $t[((($t | length) - 1) * f) | round];
    def ms: . * 1000 * 100 | round / 100;
    def cell: "\(.median | ms) ms [\(q(0.25) | ms)-\(q(0.75) | ms)]";
    .results as $r |
    "| \($l) | \($r[$c] | cell) | `\($r[$p].command)` \($r[$p] | cell) | \(($r[$c].median / $r[$p].median) * 100 | round / 100) |"' "$1"
}
echo
echo "Summary (one run; medians, [p25-p75]; ratio = caisson / peer):"
echo
echo "| what | caisson | peer | ratio |"
echo "| --- | --- | --- | --- |"
row "$out/pull-small.json" 0 1 "pull + unpack, busybox ~1 MB"
row "$out/pull-large.json" 0 1 "pull + unpack, ~200 MB / 10k files"
row "$out/launch.json" 0 1 "run --rm IMAGE /bin/true"
row "$out/launch.json" 0 2 "run --rm IMAGE /bin/true"
row "$out/cni.json" 1 0 "CNI bridge + host-local ADD+DEL (plugins alone)"
row "$out/wasm.json" 0 1 "Wasm hello (process)"
