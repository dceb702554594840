#!/usr/bin/env python3
"""The shared Wasm host alone under a burst of tasks, as the agent drives it (issue 7's 1,000
Wasm tasks, without the master, the agent and the gRPC client, whose noise hides the host's
own cost on these VMs):

    benches/wasm-host-load.py BIN_DIR [N] [IN_FLIGHT] [ROUNDS]

Starts `BIN_DIR/caisson-wasm host` on a socket under /dev/shm, sends N hello-world tasks with
at most IN_FLIGHT unfinished (queued in batches, one write each, as the agent does), waits for
every end, and prints the wall time and the host's CPU time (user + system, from /proc) per
round; the task directories are deleted between rounds, outside the measurement. Run as root
(the host writes task records owned by root)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

HZ = os.sysconf("SC_CLK_TCK")


def cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


def main():
    bindir = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    in_flight = int(sys.argv[3]) if len(sys.argv) > 3 else 256
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    here = os.path.dirname(os.path.abspath(__file__))
    module = os.path.join(here, "..", "tests", "guests", "hello.wat")
    work = tempfile.mkdtemp(prefix="caisson-host-load.", dir="/dev/shm")
    sock_path = os.path.join(work, "host.sock")
    host = subprocess.Popen(
        [os.path.join(bindir, "caisson-wasm"), "host", "--socket", sock_path,
         "--cache", os.path.join(work, "cache")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(work, "host.log"), "w"))
    try:
        for _ in range(1000):
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(sock_path)
                break
            except OSError:
                time.sleep(0.005)
        else:
            sys.exit("the host did not start")
        r = s.makefile("rb")
        hello = json.loads(r.readline())
        assert hello["ev"] == "hello", hello
        containers = os.path.join(work, "containers")
        os.makedirs(containers)

        def request(i):
            return json.dumps({
                "op": "run", "id": f"t{i:06d}", "dir": os.path.join(containers, f"t{i:06d}"),
                "image": module,
                "spec": {"module": os.path.abspath(module), "argv": [], "env": [],
                         "preopens": [], "stdin": None, "stdout": None, "stderr": None,
                         "limits": {"memory_bytes": None, "table_elements": None},
                         "timeout_ms": None, "http": None},
            }).encode() + b"\n"

        # Events are read on a thread of their own, as the agent does: a writer that stopped
        # reading while its requests queue up would block the host's event writes.
        ends = threading.Semaphore(0)
        failed = []

        def read_events():
            for line in r:
                ev = json.loads(line)
                if ev["ev"] in ("exited", "failed"):
                    if ev["ev"] == "failed" or ev["state"]["exit_code"] != 0:
                        failed.append(ev)
                    ends.release()

        threading.Thread(target=read_events, daemon=True).start()

        def burst(first, count):
            sent = ended = 0
            while ended < count:
                batch = b"".join(request(first + sent + k)
                                 for k in range(min(in_flight - (sent - ended), count - sent)))
                if batch:
                    s.sendall(batch)
                    sent += batch.count(b"\n")
                if not ends.acquire(timeout=30):
                    sys.exit("no task ended in 30 s")
                ended += 1
                if failed:
                    sys.exit(f"task failed: {failed[0]}")

        burst(0, 20)  # compile cache and thread pool warm
        for k in range(rounds):
            shutil.rmtree(containers)
            os.makedirs(containers)
            c0, t0 = cpu(host.pid), time.monotonic()
            burst((k + 1) * 1_000_000, n)
            wall, used = time.monotonic() - t0, cpu(host.pid) - c0
            print(f"{n} tasks: wall {wall:.3f} s, host cpu {used:.2f} s "
                  f"({used / n * 1e6:.0f} us per task)", flush=True)
    finally:
        host.kill()
        host.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
