#!/usr/bin/env bash
# N tasks through a master and one agent on loopback (issue 7's targets: 1,000 native /bin/true in
# at most 3 s, 1,000 Wasm tasks in at most 0.3 s). Run as root:
#   benches/cluster-launch.sh native|wasm [N] [C] [AGENT_PARALLELISM]
# The state (master, agent root, tasks) goes under $RUNDIR (default: a temp dir in /tmp). On
# these VMs the root ext4 has no journal: each new inode skips the group's recently freed ones
# (caisson spreads task directories over the groups against it) and every fsync of the master's
# log and the agent's outbox is real I/O, so a run on /dev/shm measures caisson while one on
# /tmp also measures that file system (printed with the load).
set -euo pipefail
cd "$(dirname "$0")/.."
KIND=${1:?native or wasm}; N=${2:-1000}; C=${3:-256}; PAR=${4:-8}
# AGENT_ARGS adds flags to the agent's command line, e.g.
# AGENT_ARGS="--warm-sandboxes localhost/oci:latest=4" (warm sandboxes of the benchmark's image).
# PAUSE_MS=MS: each submitter waits MS after its task's end before the next (latency of an
# agent that is not saturated; see `bench launch --pause-ms`).
# BIN=DIR runs prebuilt binaries (an A/B against an older build) instead of building.
if [ -z "${BIN:-}" ]; then
  scripts/install-deps.sh >/dev/null
  BIN=$(scripts/build-dist.sh release)
fi
W=$(mktemp -d "${RUNDIR:-/tmp}/caisson-cluster.XXXXXX")
# Installed copies (see install-bins.sh), for an A/B too.
BIN=$(benches/install-bins.sh "$W/bin" "$BIN")
# A random port that nothing listens on (a fixed one, or a random one unchecked, sometimes
# collided with a listener from an earlier run).
while :; do
  PORT=$((20000 + RANDOM % 20000))
  [ -z "$(ss -Htln "sport = :$PORT" 2>/dev/null)" ] && break
done
URL=http://127.0.0.1:$PORT
cleanup() {
  kill "${AP:-}" "${MP:-}" 2>/dev/null || true; wait 2>/dev/null || true
  "$BIN/caisson" --root "$W/agent" rm -f --all >/dev/null 2>&1 || true
  rm -rf "$W"
}
trap cleanup EXIT
# The busybox image for native tasks.
umoci init --layout "$W/oci" >/dev/null
umoci new --image "$W/oci:latest" >/dev/null
umoci unpack --image "$W/oci:latest" "$W/b" >/dev/null
mkdir -p "$W/b/rootfs/bin"; cp /bin/busybox "$W/b/rootfs/bin/"
for a in sh true; do ln -s busybox "$W/b/rootfs/bin/$a"; done
umoci repack --image "$W/oci:latest" "$W/b" >/dev/null; rm -rf "$W/b"
"$BIN/caisson" --root "$W/agent" load -q -i "$W/oci:latest" >/dev/null
"$BIN/caisson" master --listen "127.0.0.1:$PORT" --state "$W/master" --join-token j --api-token a \
  >/dev/null 2>"$W/master.err" &
MP=$!
sleep 0.5
"$BIN/caisson" --root "$W/agent" agent --master "$URL" --token j --resources cpus=64,mem=64g \
  --parallelism "$PAR" ${AGENT_ARGS:-} >/dev/null 2>"$W/agent.err" &
AP=$!
sleep 1
if [ "$KIND" = wasm ]; then ARGS=(--kind wasm --module tests/guests/hello.wat)
else ARGS=(--kind native --image localhost/oci:latest -- /bin/true); fi
# The state's file system: type, and for ext4 whether it has a journal.
FS=$(stat -f -c %T "$W")
DEV=$(findmnt -n -o SOURCE --target "$W" 2>/dev/null || true)
if [ "$FS" = ext2/ext3 ] && [ -b "$DEV" ] && command -v dumpe2fs >/dev/null; then
  if dumpe2fs -h "$DEV" 2>/dev/null | grep -q has_journal; then FS="ext4 (journal)"; else FS="ext4 (no journal)"; fi
fi
echo "load: $(cut -d' ' -f1-3 /proc/loadavg); state under $W ($FS)"
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
busy() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
A0=$(cpu "$AP"); M0=$(cpu "$MP"); B0=$(busy)
# The agent's shared Wasm host (started with the agent), if any.
HP=$(pgrep -f "caisson-wasm host --socket $W/" | head -1 || true); H0=$([ -n "$HP" ] && cpu "$HP" || echo 0)
# PERF=FILE also records the whole machine's profile (perf record -a -g) during the run;
# PERF_WHO=agent (or host: the shared Wasm host) records that process alone, with DWARF call
# graphs (user-space stacks).
if [ -n "${PERF:-}" ]; then
  case "${PERF_WHO:-}" in agent) PPID_=$AP ;; host) PPID_=$HP ;; *) PPID_= ;; esac
  if [ -n "$PPID_" ]; then perf record -q -p "$PPID_" --call-graph dwarf,16384 -F 2000 -o "$PERF" & PP=$!
  else perf record -q -a -g -o "$PERF" & PP=$!; fi
  sleep 0.5
fi
# STRACE=FILE counts the agent's system calls (strace -c -f) during the run; STRACE_WHO=host or
# master counts those of the shared Wasm host or of the master instead.
case "${STRACE_WHO:-agent}" in host) SPID=$HP ;; master) SPID=$MP ;; *) SPID=$AP ;; esac
if [ -n "${STRACE:-}" ]; then strace -c -f -o "$STRACE" -p "$SPID" & SP=$!; sleep 0.5; fi
/usr/bin/time -f "bench client cpu %U+%S s" \
  "$BIN/caisson" bench launch --master "$URL" --token a -n "$N" -c "$C" --warmup 20 \
  ${PAUSE_MS:+--pause-ms "$PAUSE_MS"} "${ARGS[@]}"
# perf stops on SIGTERM (SIGINT is ignored by a background job of a script); strace on SIGINT.
if [ -n "${PP:-}" ]; then kill -TERM "$PP"; wait "$PP" || true; fi
if [ -n "${SP:-}" ]; then kill -INT "$SP"; wait "$SP" || true; fi
# CPU used during the run (warm-up included), in seconds: the agent, the master, and the whole
# machine (every process and the kernel; other users' work too).
HZ=$(getconf CLK_TCK)
secs() { awk -v t="$1" -v hz="$HZ" 'BEGIN { printf "%.2f", t / hz }'; }
HC=0; [ -n "$HP" ] && HC=$(( $(cpu "$HP") - H0 ))
echo "cpu: agent $(secs $(( $(cpu "$AP") - A0 ))) s, master $(secs $(( $(cpu "$MP") - M0 ))) s," \
  "wasm host $(secs "$HC") s, machine $(secs $(( $(busy) - B0 ))) s; load: $(cut -d' ' -f1-3 /proc/loadavg)"
