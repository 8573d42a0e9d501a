"""Memory and threads of both daemons under many transfers and many idle
connections, side by side (not a timed test; run under the CPU lock):

    flock -x /tmp/imageio-cpu.lock .venv/bin/python -m bench.connections \\
        [--transfers 10,50,160] [--idle 1000,10000] [--size-mib 64] \\
        [--rounds 2] [--json FILE]

Transfers: N concurrent HTTPS downloads (N/4 tickets x 4 connections, each
the whole image of --size-mib MiB) by one ``curl --parallel`` process; the
daemon's peak RSS (VmHWM, reset before each run) and peak thread count.
Idle: M TCP connections to the remote port that send nothing; the
daemon's RSS and threads while they are held, its CPU over 5 s, and the
control service's latency (GET /tickets/, best and worst of 5).

Both daemons run from bench/peers.py with the same configuration, the
rounds interleaved (ours, established, ours, ...); the table shows each
round, so the spread is visible.
"""

import argparse
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time

from . import peers

KINDS = ("imageio", "established")


def proc_status(pid, name):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return 0


def reset_peak(pid):
    # "5" resets VmHWM to the current RSS (proc(5), clear_refs).
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


class ThreadPeak(threading.Thread):
    """Samples a process's thread count every 50 ms."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.done = threading.Event()
        self.start()

    def run(self):
        while not self.done.wait(0.05):
            try:
                self.peak = max(self.peak, proc_status(self.pid, "Threads"))
            except OSError:
                return

    def stop(self):
        self.done.set()
        self.join()
        return self.peak


def make_image(directory, size_mib):
    path = os.path.join(directory, "image.raw")
    with open(path, "wb") as f:
        chunk = os.urandom(1024**2)
        for _ in range(size_mib):
            f.write(chunk)
    return path


def transfers(server, image, n, cert):
    """n concurrent downloads; return a result dict."""
    tickets = [server.add_ticket(f"t{n}-{i}", image) for i in
               range(max(1, n // 4))]
    host, port = server.https
    argv = ["curl", "--parallel", "--parallel-immediate",
            "--parallel-max", str(n), "--silent", "--show-error",
            "--fail", "--cacert", cert, "--write-out", "%{http_code}\\n"]
    for i in range(n):
        argv += ["-o", "/dev/null",
                 f"https://localhost:{port}/images/{tickets[i % len(tickets)]}"]
    pid = server.pid
    reset_peak(pid)
    rss0 = proc_status(pid, "VmRSS")
    threads = ThreadPeak(pid)
    start = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - start
    peak_threads = threads.stop()
    codes = out.stdout.split()
    for t in tickets:
        server.control("DELETE", f"/tickets/{t}")
    return {
        "transfers": n, "ok": codes.count("200"), "seconds": elapsed,
        "rss_before_mib": rss0 / 1024,
        "peak_rss_mib": proc_status(pid, "VmHWM") / 1024,
        "peak_threads": peak_threads,
        "errors": out.stderr.strip().splitlines()[:3],
    }


def connect_idle(port, count, timeout=120, batch=100):
    socks = []
    deadline = time.monotonic() + timeout
    while len(socks) < count:
        group = []
        for _ in range(min(batch, count - len(socks))):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            socks.append(s)
            group.append(s)
        poller = select.poll()
        for s in group:
            poller.register(s, select.POLLOUT)
        left = len(group)
        while left and time.monotonic() < deadline:
            for fd, _ in poller.poll(1000):
                poller.unregister(fd)
                left -= 1
        if left:
            break
    return socks


def control_latency(server, tries=5):
    times = []
    for _ in range(tries):
        start = time.monotonic()
        try:
            server.control("GET", "/tickets/")
        except OSError:
            times.append(float("inf"))
            continue
        times.append(time.monotonic() - start)
    return min(times), max(times)


def idle(server, count):
    pid = server.pid
    rss0 = proc_status(pid, "VmRSS")
    threads0 = proc_status(pid, "Threads")
    start = time.monotonic()
    socks = connect_idle(server.https[1], count)
    connect_s = time.monotonic() - start
    try:
        time.sleep(1)
        cpu0 = server.cpu_seconds()
        time.sleep(5)
        cpu = server.cpu_seconds() - cpu0
        best, worst = control_latency(server)
        rss = proc_status(pid, "VmRSS")
        threads = proc_status(pid, "Threads")
    finally:
        for s in socks:
            s.close()
    return {
        "idle": count, "connected": len(socks), "connect_seconds": connect_s,
        "rss_delta_mib": (rss - rss0) / 1024,
        "kib_per_connection": (rss - rss0) / max(1, len(socks)),
        "threads_before": threads0, "threads": threads,
        "cpu_5s": cpu, "control_best_ms": best * 1000,
        "control_worst_ms": worst * 1000,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transfers", default="10,50,160")
    p.add_argument("--idle", default="1000,10000")
    p.add_argument("--size-mib", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args(argv)
    counts = [int(x) for x in args.transfers.split(",") if x]
    idles = [int(x) for x in args.idle.split(",") if x]
    results = []
    with tempfile.TemporaryDirectory(prefix="imageio-bench-conn-",
                                     dir="/var/tmp") as tmp:
        image = make_image(tmp, args.size_mib)
        for rnd in range(args.rounds):
            for kind in KINDS:
                servers = peers.Servers(os.path.join(tmp, f"{kind}-{rnd}"))
                try:
                    server = servers.get(kind)
                    for n in counts:
                        r = transfers(server, image, n, servers.cert)
                        results.append(dict(r, kind=kind, round=rnd))
                        print(json.dumps(results[-1]), flush=True)
                    for m in idles:
                        r = idle(server, m)
                        results.append(dict(r, kind=kind, round=rnd))
                        print(json.dumps(results[-1]), flush=True)
                        time.sleep(2)
                finally:
                    servers.stop()
    print_tables(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def print_tables(results):
    print("\n| daemon | round | transfers | ok | seconds | peak RSS MiB "
          "| peak threads |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "transfers" in r:
            print(f"| {peers.Daemon.LABELS[r['kind']]} | {r['round']} "
                  f"| {r['transfers']} | {r['ok']} | {r['seconds']:.1f} "
                  f"| {r['peak_rss_mib']:.0f} | {r['peak_threads']} |")
    print("\n| daemon | round | idle | held | RSS +MiB | KiB each "
          "| threads | CPU s / 5 s | control ms best/worst |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "idle" in r:
            print(f"| {peers.Daemon.LABELS[r['kind']]} | {r['round']} "
                  f"| {r['idle']} | {r['connected']} "
                  f"| {r['rss_delta_mib']:.1f} "
                  f"| {r['kib_per_connection']:.1f} "
                  f"| {r['threads_before']} → {r['threads']} "
                  f"| {r['cpu_5s']:.2f} "
                  f"| {r['control_best_ms']:.1f} / "
                  f"{r['control_worst_ms']:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
