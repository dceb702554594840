#!/usr/bin/env python3
"""Where a `caisson run` spends its wall time: runs COMMAND N times under
`perf record -a -e sched:sched_process_{fork,exec,exit}` and prints, for each event of a run, its
median time after the launcher's exec (ms): the launcher's threads, the supervisor's fork or exec,
the task's clone, exec and exit, the launcher's exit. Run as root (perf).
  benches/timeline.py N COMMAND...
e.g.  benches/timeline.py 60 /opt/caisson/caisson run --rm localhost/oci:latest /bin/true
Events are named by the process that makes them (`fork caisson` = the launcher's first thread
or fork, `fork shim-standby` = the early supervisor's spawn, `fork caisson-shim` = the task's
clone, `exec /bin/true`, `exit true`, `exit launcher`); later events of one name are numbered
(`fork caisson #2`).
"""
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile

runs, cmd = int(sys.argv[1]), sys.argv[2:]
launcher = os.path.realpath(cmd[0])
with tempfile.TemporaryDirectory() as tmp:
    data = os.path.join(tmp, "perf.data")
    loop = f"for i in $(seq {runs}); do {shlex.join(cmd)} >/dev/null; done"
    subprocess.run(
        ["perf", "record", "-q", "-a", "-o", data]
        + [f"-e sched:sched_process_{e}" for e in ("fork", "exec", "exit")]
        + ["--", "sh", "-c", loop],
        check=True,
        stderr=subprocess.DEVNULL,
    )
    text = subprocess.run(
        ["perf", "script", "-i", data, "-F", "comm,pid,tid,time,event,trace"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout

line_re = re.compile(r"\s*(\S+)\s+(\d+)/(\d+)\s+([\d.]+):\s+(\S+):\s*(.*)")
timelines, cur = [], None
for line in text.splitlines():
    m = line_re.match(line)
    if not m:
        continue
    comm, pid, tid, t, event, rest = m.groups()
    pid, tid, t = int(pid), int(tid), float(t) * 1e3
    if event.endswith("sched_process_exec") and f"filename={launcher} " in rest + " ":
        cur = {"pid": pid, "t0": t, "seen": {}, "tree": {pid}}
        timelines.append(cur)
        continue
    # Only the launcher and what descends from it (a build or anything else may run meanwhile).
    if cur is None or not {pid, tid} & cur["tree"]:
        continue
    if event.endswith("sched_process_fork"):
        cur["tree"].add(int(re.search(r"child_pid=(\d+)", rest).group(1)))
        name = f"fork {comm}"
    elif event.endswith("sched_process_exec"):
        name = "exec " + rest.split()[0].removeprefix("filename=")
    elif event.endswith("sched_process_exit"):
        name = "exit launcher" if (pid, tid) == (cur["pid"], cur["pid"]) else f"exit {comm}"
    else:
        continue
    # The second and later events of one name are numbered (a fork of a fork).
    k = 2
    base = name
    while name in cur["seen"]:
        name, k = f"{base} #{k}", k + 1
    cur["seen"][name] = t - cur["t0"]

order = {}
for tl in timelines:
    for name, dt in tl["seen"].items():
        order.setdefault(name, []).append(dt)
print(f"{len(timelines)} runs of {shlex.join(cmd)}; ms after the launcher's exec (median, n)")
for name, times in sorted(order.items(), key=lambda kv: statistics.median(kv[1])):
    print(f"  {statistics.median(times):7.3f}  {name}  (n={len(times)})")
