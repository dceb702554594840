#!/usr/bin/env bash
# Launch latency side by side in one run: `caisson run --rm IMAGE /bin/true` vs `crun run` and
# `runc run` of the same root filesystem (a bundle made from the image's layer), plus the
# floors `/bin/true` and `unshare ... /bin/true`. Run as root:  benches/launch-compare.sh [RUNS]
#
# crun 1.8 refuses the hybrid cgroup layout of our machines, so (FACTS.md) every command runs in
# a private mount namespace where /sys/fs/cgroup/unified is unmounted: there all three runtimes
# see plain cgroup v1. On pure v1 or v2 hosts nothing is unmounted.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-100}
scripts/install-deps.sh
scripts/build-dist.sh release >/dev/null
work=$(mktemp -d /tmp/caisson-launch.XXXXXX)
trap 'rm -rf "$work"' EXIT
# Installed copies, as the peers' binaries are (see install-bins.sh).
CAISSON="$(benches/install-bins.sh "$work/bin")/caisson"
P=$(benches/install-peers.sh "$work/peers")

# A busybox image in caisson's store, and an OCI bundle with the same root filesystem.
. benches/busybox-image.sh
root="$work/root"
IMAGE=localhost/oci:latest
bundle="$work/bundle"
busybox_image_and_bundle "$work" "$CAISSON" "$root" "sh true" '["/bin/true"]'

# CAISSON_BASE=/path/to/old/caisson adds a before/after row (its caisson-shim next to it).
BASE_CMD=""
if [ -n "${CAISSON_BASE:-}" ]; then
  CAISSON_BASE="$(benches/install-bins.sh "$work/base" "$(dirname "$CAISSON_BASE")")/caisson"
  BASE_CMD="-n 'caisson (base) run --rm IMAGE /bin/true' '$CAISSON_BASE --root $root run --rm $IMAGE /bin/true'"
fi
cat > "$work/inner.sh" <<INNER
set -e
if mountpoint -q /sys/fs/cgroup/unified; then umount /sys/fs/cgroup/unified; fi
hyperfine -N --runs $RUNS --warmup 5 --export-json "$work/launch.json" \\
  -n "caisson run --rm IMAGE /bin/true" "$CAISSON --root $root run --rm $IMAGE /bin/true" \\
  -n "crun run (same rootfs)" "$P/crun --root $work/crun run -b $bundle cbench" \\
  -n "runc run (same rootfs)" "$P/runc --root $work/runc run -b $bundle rbench" \\
  -n "unshare -pfmuin /bin/true" "unshare --pid --fork --mount --uts --ipc --net /bin/true" \\
  -n "/bin/true" "/bin/true" \\
  -n "caisson --version (process start)" "$CAISSON --version" $BASE_CMD
# The same work timed by caisson itself, for the cross-check below.
"$CAISSON" --root $root bench launch --kind native --image $IMAGE -n $RUNS --warmup 5 --json \\
  -- /bin/true > "$work/bench-launch.json"
INNER
unshare --mount --propagation private bash "$work/inner.sh"
echo
echo "| command | median | mean ± σ |"
echo "| --- | --- | --- |"
jq -r '.results[] | "| `\(.command)` | \(.median*1000*100|floor/100) ms | \(.mean*1000*100|floor/100) ± \(.stddev*1000*100|floor/100) ms |"' "$work/launch.json"
jq -r '.results as $r | "ratios of medians: caisson/crun \(($r[0].median/$r[1].median)*100|floor/100), caisson/runc \(($r[0].median/$r[2].median)*100|floor/100)"' "$work/launch.json"
# Cross-check: caisson bench launch (in one process) plus a caisson process start should match
# hyperfine's caisson run --rm within noise.
jq -r --slurpfile b "$work/bench-launch.json" '.results as $r | ($b[0].phases[] | select(.name=="total")) as $t |
  "cross-check: bench launch p50 total \($t.p50_us/1000*100|floor/100) ms + process start \($r[5].median*1000*100|floor/100) ms = \(($t.p50_us/1000 + $r[5].median*1000)*100|floor/100) ms; hyperfine caisson run --rm median \($r[0].median*1000*100|floor/100) ms (ratio \((($t.p50_us/1000 + $r[5].median*1000)/($r[0].median*1000))*100|floor/100))"' "$work/launch.json"
if [ -n "${CAISSON_BENCH_OUT:-}" ]; then cp "$work/launch.json" "$work/bench-launch.json" "$CAISSON_BENCH_OUT/"; fi
echo
echo "caisson's own per-phase timings (last run, microseconds):"
"$CAISSON" --root "$root" run --name timing "$IMAGE" /bin/true >/dev/null
"$CAISSON" --root "$root" inspect timing | jq -c '.[0].state.timings'
"$CAISSON" --root "$root" rm timing >/dev/null
echo
echo "In-process launch-to-exit (the agent's path): cargo bench -p caisson-benches --bench launch"
