#!/usr/bin/env python3
"""Interleaved A/B of whole commands: every round runs each command once (the order rotates
round by round), so that the VM's slow and fast phases fall on all of them alike; prints each
command's median and quartiles. Python's spawn adds ~0.4 ms to every figure (the same for all).
  benches/ab.py ROUNDS NAME=COMMAND [NAME=COMMAND ...]
e.g.  benches/ab.py 150 "new=/opt/new/caisson run --rm hello.wat" "wasmtime=wasmtime run hello.wat"
"""
import os
import shlex
import statistics
import subprocess
import sys
import time

rounds = int(sys.argv[1])
cmds = [(a.split("=", 1)[0], shlex.split(a.split("=", 1)[1])) for a in sys.argv[2:]]
null = open(os.devnull, "w")
times = {name: [] for name, _ in cmds}
for name, cmd in cmds:  # warm-up
    for _ in range(3):
        subprocess.run(cmd, stdout=null, stderr=null)
for i in range(rounds):
    k = i % len(cmds)
    for name, cmd in cmds[k:] + cmds[:k]:
        t0 = time.perf_counter()
        p = subprocess.run(cmd, stdout=null, stderr=null)
        elapsed = time.perf_counter() - t0
        if p.returncode != 0:
            sys.exit(f"{name}: exit {p.returncode}")
        times[name].append(elapsed * 1000)
for name, _ in cmds:
    v = sorted(times[name])
    q = lambda f: v[int(f * (len(v) - 1))]
    print(f"{name:14} median {statistics.median(v):7.2f} ms  p25 {q(.25):7.2f}  p75 {q(.75):7.2f}  (n={len(v)})")
