#!/usr/bin/env bash
# A hello wasi:http service under wrk: serves the tests' http guest with `caisson run -d -p`,
# loads it with wrk, and removes it. With BASE set, it also serves the guest with the binaries in
# BASE (an A/B in one run: both services run side by side, the rounds are interleaved, each wrk
# run loads one of them while the other idles).
#
#   benches/wasm-http.sh                     (run as root, release build)
#
# Environment: BIN (directory of caisson, caisson-shim, caisson-wasm; default target/dist),
# BASE (a second such directory to compare with), WRK (wrk arguments; default -t2 -c32 -d10s),
# ROUNDS (wrk runs per service; default 3), THREADS (CAISSON_WASM_HTTP_THREADS for the services;
# default unset: the binaries' own default), PORT (default 18299; BASE's service gets PORT+1),
# GUEST (the component; default the tests' http guest, built if missing), QUIET=1 to wait
# (up to 10 minutes) before each run until the CPUs were at least 90% idle for a second: on a
# shared machine, a build that starts mid-run skews that run only.
#
# Prints each wrk run (requests/s, mean latency), then per service the median requests/s, the
# host process's RSS and CPU time after the runs, and the load before and after.
set -euo pipefail
# BIN and BASE may be relative to where we were started.
[ -n "${BIN:-}" ] && BIN=$(realpath "$BIN")
[ -n "${BASE:-}" ] && BASE=$(realpath "$BASE")
cd "$(dirname "$0")/.."
BIN=${BIN:-$PWD/${CARGO_TARGET_DIR:-target}/dist}
BASE=${BASE:-}
WRK=${WRK:--t2 -c32 -d10s}
ROUNDS=${ROUNDS:-3}
PORT=${PORT:-18299}
GUEST=${GUEST:-$PWD/${CARGO_TARGET_DIR:-target}/wasm-guests/wasm32-wasip2/release/caisson_http_guest.wasm}
command -v wrk >/dev/null || { echo "wrk is missing (apt-get install -y wrk)" >&2; exit 1; }
if [ ! -f "$GUEST" ]; then
  cargo build --release --quiet --target wasm32-wasip2 \
    --manifest-path tests/guests/http-guest/Cargo.toml \
    --target-dir "${CARGO_TARGET_DIR:-target}/wasm-guests"
fi
sets=(new)
dirs=("$BIN")
[ -n "$BASE" ] && sets+=(base) && dirs+=("$BASE")
for d in "${dirs[@]}"; do
  for b in caisson caisson-shim caisson-wasm; do
    [ -x "$d/$b" ] || { echo "missing $d/$b (scripts/build-dist.sh)" >&2; exit 1; }
  done
done
[ -n "${THREADS:-}" ] && export CAISSON_WASM_HTTP_THREADS=$THREADS
W=$(mktemp -d /tmp/caisson-wasm-http.XXXXXX)
cleanup() {
  for i in "${!sets[@]}"; do
    "${dirs[$i]}/caisson" --root "$W/${sets[$i]}" rm -f "${sets[$i]}" >/dev/null 2>&1 || true
  done
  rm -rf "$W"
}
trap cleanup EXIT

echo "# $(date -u +%FT%TZ) $(uname -r), $(nproc) CPUs, load:$(uptime | sed 's/.*load average://')"
echo "# wrk $WRK, $ROUNDS rounds, CAISSON_WASM_HTTP_THREADS=${CAISSON_WASM_HTTP_THREADS:-unset}"
for i in "${!sets[@]}"; do
  s=${sets[$i]} port=$((PORT + i))
  "${dirs[$i]}/caisson" --root "$W/$s" run -d --name "$s" -p "127.0.0.1:$port:80" "$GUEST" >/dev/null
  ok=
  for _ in $(seq 300); do
    curl -sf -o /dev/null "http://127.0.0.1:$port/" && ok=1 && break
    sleep 0.1
  done
  [ -n "$ok" ] || { echo "the $s service never answered on port $port" >&2; exit 1; }
  # Warm up: the first requests fault in the pool's pages and grow the allocator's arenas.
  wrk -t1 -c4 -d1s "http://127.0.0.1:$port/" >/dev/null
done

# Percent of CPU time busy over the last second.
busy() {
  local a b
  read -ra a < <(head -1 /proc/stat)
  sleep 1
  read -ra b < <(head -1 /proc/stat)
  local tot=0 i
  for i in 1 2 3 4 5 6 7 8; do tot=$((tot + b[i] - a[i])); done
  echo $((100 - 100 * (b[4] - a[4] + b[5] - a[5]) / tot))
}
for r in $(seq "$ROUNDS"); do
  for i in "${!sets[@]}"; do
    s=${sets[$i]} port=$((PORT + i))
    pre=$(busy)
    if [ "${QUIET:-0}" = 1 ]; then
      for _ in $(seq 600); do
        [ "$pre" -lt 10 ] && break
        pre=$(busy)
      done
    fi
    # shellcheck disable=SC2086 # WRK is a list of arguments
    out=$(wrk $WRK "http://127.0.0.1:$port/")
    rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
    lat=$(awk '$1 == "Latency" {print $2}' <<<"$out")
    errs=$(grep -E "Non-2xx|Socket errors" <<<"$out" | tr '\n' ' ' || true)
    echo "round $r $s: $rps requests/s, latency mean $lat (CPUs ${pre}% busy before) $errs"
    echo "$rps" >>"$W/$s.rps"
  done
done

for i in "${!sets[@]}"; do
  s=${sets[$i]}
  med=$(sort -n "$W/$s.rps" | awk '{v[NR] = $1} END {m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%.0f", m}')
  pid=$("${dirs[$i]}/caisson" --root "$W/$s" inspect "$s" | jq -r '.[0].state.pid')
  rss=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo "?")
  cpu=$(awk '{printf "%.2f", ($14 + $15) / 100}' "/proc/$pid/stat" 2>/dev/null || echo "?")
  echo "$s (${dirs[$i]}): median $med requests/s over $ROUNDS runs; host RSS $rss KiB, CPU $cpu s"
done
echo "# load after:$(uptime | sed 's/.*load average://')"
