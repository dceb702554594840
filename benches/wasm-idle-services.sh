#!/usr/bin/env bash
# Many idle wasi:http services on one host: launches N services (`caisson run -d -p`), waits until
# every one has answered a request, reports what they cost in memory per service, and removes them.
#
#   benches/wasm-idle-services.sh [N]        (default 100; run as root, release build)
#
# Per service it counts every process of the service (its caisson-shim supervisor and its
# caisson-wasm host): PSS (shared pages split between the processes that map them, the fair
# share), USS (private pages only) and RSS, from /proc/PID/smaps_rollup; and the task cgroup's
# memory charge (cgroup v2 memory.current, v1 memory.usage_in_bytes), which holds the host
# process only (the supervisor stays outside the task's cgroup).
#
# Environment: BIN (directory of caisson, caisson-shim, caisson-wasm; default target/dist),
# GUEST (the component; default the tests' http guest, built if missing), BASE_PORT (default
# 21000; ports BASE_PORT..BASE_PORT+N-1 on 127.0.0.1), KEEP=1 to leave the services running.
set -euo pipefail
N=${1:-100}
cd "$(dirname "$0")/.."
BIN=${BIN:-$PWD/${CARGO_TARGET_DIR:-target}/dist}
GUEST=${GUEST:-$PWD/${CARGO_TARGET_DIR:-target}/wasm-guests/wasm32-wasip2/release/caisson_http_guest.wasm}
BASE_PORT=${BASE_PORT:-21000}
if [ ! -f "$GUEST" ]; then
  cargo build --release --quiet --target wasm32-wasip2 \
    --manifest-path tests/guests/http-guest/Cargo.toml \
    --target-dir "${CARGO_TARGET_DIR:-target}/wasm-guests"
fi
for b in caisson caisson-shim caisson-wasm; do
  [ -x "$BIN/$b" ] || { echo "missing $BIN/$b (scripts/build-dist.sh)" >&2; exit 1; }
done
W=$(mktemp -d /tmp/caisson-idle.XXXXXX)
C="$BIN/caisson --root $W/root"
cleanup() {
  if [ "${KEEP:-0}" = 1 ]; then echo "left running: $C ps"; return; fi
  $C rm -f $($C ps -aq 2>/dev/null) >/dev/null 2>&1 || true
  rm -rf "$W"
}
trap cleanup EXIT

echo "# $(date -u +%FT%TZ) $(uname -r), $(nproc) CPUs, load:$(uptime | sed 's/.*load average://')"
answer() {
  for _ in $(seq 600); do
    curl -sf -o /dev/null "http://127.0.0.1:$((BASE_PORT + $1))/" && return 0
    sleep 0.1
  done
  echo "service idle$1 never answered" >&2
  return 1
}
# The first one compiles the component into the root's cache; the others map it from there.
$C run -d --name idle0 -p "127.0.0.1:$BASE_PORT:80" "$GUEST" >/dev/null
answer 0
t0=$(date +%s.%N)
for i in $(seq 1 $((N - 1))); do
  $C run -d --name "idle$i" -p "127.0.0.1:$((BASE_PORT + i)):80" "$GUEST" >/dev/null
done
t1=$(date +%s.%N)
for i in $(seq 1 $((N - 1))); do answer "$i"; done
t2=$(date +%s.%N)
sleep 2 # let start-up garbage settle; nothing runs while idle

pss=0 uss=0 rss=0 cg=0 procs=0 hostpss=0 shimpss=0
kib() { awk -v k="$1" '$1 == k":" {print $2}' "$2"; }
for i in $(seq 0 $((N - 1))); do
  st=$($C inspect "idle$i" | jq -c '.[0].state')
  for role in pid shim_pid; do
    pid=$(jq -r ".$role" <<<"$st")
    f=/proc/$pid/smaps_rollup
    [ -r "$f" ] || continue
    p=$(kib Pss "$f") u=$(($(kib Private_Clean "$f") + $(kib Private_Dirty "$f"))) r=$(kib Rss "$f")
    pss=$((pss + p)) uss=$((uss + u)) rss=$((rss + r)) procs=$((procs + 1))
    if [ "$role" = pid ]; then hostpss=$((hostpss + p)); else shimpss=$((shimpss + p)); fi
  done
  for d in $(jq -r '.cgroup_paths[]' <<<"$st"); do
    for f in "$d/memory.current" "$d/memory.usage_in_bytes"; do
      [ -r "$f" ] && cg=$((cg + $(cat "$f") / 1024))
    done
  done
done
echo "services: $N ($procs processes); $((N - 1)) launched in $(echo "$t1 - $t0" | bc) s, all answering $(echo "$t2 - $t1" | bc) s later"
printf 'per service: PSS %d KiB (host %d + supervisor %d), USS %d KiB, RSS %d KiB, cgroup memory %d KiB\n' \
  $((pss / N)) $((hostpss / N)) $((shimpss / N)) $((uss / N)) $((rss / N)) $((cg / N))
echo "host memory in use (free): $(free -m | awk '/^Mem:/ {print $3}') MiB"
