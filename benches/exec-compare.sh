#!/usr/bin/env bash
# `exec` latency side by side in one run: `caisson exec TASK /bin/true` into a running task vs
# `crun exec` and `runc exec` into containers of the same root filesystem, plus `caisson exec`
# into a task with a user namespace (`--userns=auto`). Run as root on the dev VM:
#   benches/exec-compare.sh [RUNS]
# On hybrid cgroup hosts crun refuses to run while the empty cgroup2 is mounted at
# /sys/fs/cgroup/unified: everything runs in a private mount namespace without it (FACTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-100}
for t in hyperfine crun runc umoci jq; do
  command -v "$t" >/dev/null || { echo "missing $t (scripts/install-deps.sh installs it)" >&2; exit 1; }
done
scripts/build-dist.sh release >/dev/null
work=$(mktemp -d /tmp/caisson-exec.XXXXXX)
CAISSON="$(benches/install-bins.sh "$work/bin")/caisson"
P=$(benches/install-peers.sh "$work/peers")
root="$work/root"
cleanup() {
  "$CAISSON" --root "$root" rm -f -a >/dev/null 2>&1 || true
  crun --root "$work/crun" delete -f cexec >/dev/null 2>&1 || true
  runc --root "$work/runc" delete -f rexec >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# A busybox image in caisson's store, and an OCI bundle with the same root filesystem.
. benches/busybox-image.sh
IMAGE=localhost/oci:latest
bundle="$work/bundle"
busybox_image_and_bundle "$work" "$CAISSON" "$root" "sh true sleep" '["/bin/sleep","600"]'

cat > "$work/inner.sh" <<INNER
set -e
if mountpoint -q /sys/fs/cgroup/unified; then umount /sys/fs/cgroup/unified; fi
task=\$("$CAISSON" --root "$root" run -d $IMAGE sleep 600)
utask=\$("$CAISSON" --root "$root" run -d --userns=auto $IMAGE sleep 600)
crun --root "$work/crun" run -d -b "$bundle" cexec
runc --root "$work/runc" run -d -b "$bundle" rexec </dev/null >/dev/null 2>&1
hyperfine -N --runs $RUNS --warmup 5 --export-json "$work/exec.json" \\
  -n "caisson exec TASK /bin/true" "$CAISSON --root $root exec \$task /bin/true" \\
  -n "caisson exec TASK /bin/true (--userns=auto task)" "$CAISSON --root $root exec \$utask /bin/true" \\
  -n "crun exec (same rootfs)" "$P/crun --root $work/crun exec cexec /bin/true" \\
  -n "runc exec (same rootfs)" "$P/runc --root $work/runc exec rexec /bin/true"
INNER
unshare --mount --propagation private bash "$work/inner.sh"
echo
echo "| command | median | mean ± σ |"
echo "| --- | --- | --- |"
jq -r '.results[] | "| `\(.command)` | \(.median*1000*100|floor/100) ms | \(.mean*1000*100|floor/100) ± \(.stddev*1000*100|floor/100) ms |"' "$work/exec.json"
jq -r '.results as $r | "ratios of medians: caisson/crun \(($r[0].median/$r[2].median)*100|floor/100), caisson/runc \(($r[0].median/$r[3].median)*100|floor/100)"' "$work/exec.json"
