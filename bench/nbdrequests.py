"""Requests per second through the daemon's NBD service against qemu-nbd,
side by side: a libnbd client (Debian's python3 with python3-libnbd) on
one connection keeps 64 requests of one kind and size in flight over the
unix socket, into a file on /dev/shm (or ``--dir``).  Prints requests per
second and each server's CPU per request: what a request costs beyond its
bytes (the figure behind the NBD service's choice of serving small
requests in place rather than through lanes, docs/benchmarks.md).

    python -m bench.nbdrequests [--kib 4] [--count 20000] [--kinds wrz]
                                [--repeats 3] [--dir DIR]

Kinds: w (WRITE), r (READ), z (WRITE_ZEROES).
"""

import argparse
import os
import shutil
import subprocess
import tempfile
import uuid

from bench.nbdserve import cpu_seconds
from harness import nbdserver
from harness.daemonproc import Daemon

SIZE = 256 * 1024**2
IN_FLIGHT = 64

CLIENT = r'''
import sys, time, nbd
url, kind, n, bs, size, depth = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
h = nbd.NBD()
h.connect_uri(url)
buf = bytearray(bs)
rbuf = nbd.Buffer(bs)
t0 = time.monotonic()
for i in range(n):
    off = (i * bs) % size
    if kind == "w":
        h.aio_pwrite(buf, off)
    elif kind == "z":
        h.aio_zero(bs, off)
    else:
        h.aio_pread(rbuf, off)
    while h.aio_in_flight() >= depth:
        h.poll(-1)
    while True:
        c = h.aio_peek_command_completed()
        if c <= 0:
            break
        h.aio_command_completed(c)
while h.aio_in_flight():
    h.poll(-1)
print(n / (time.monotonic() - t0))
'''


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kib", type=int, default=4)
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--kinds", default="wrz")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default="/dev/shm")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="nbdrequests-", dir=args.dir)
    try:
        run(work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work, args):
    def target(name):
        path = os.path.join(work, name)
        with open(path, "wb") as f:
            f.truncate(SIZE)
        return path

    d = Daemon(os.path.join(work, "daemon"),
               "[nbd]\nenable = true\nport = 0\nsocket = run/nbd.sock\n")
    d.start()
    t = {"uuid": str(uuid.uuid4()), "size": SIZE, "timeout": 3600,
         "url": "file://" + target("imageio.raw"), "ops": ["read", "write"],
         "sparse": True}
    d.add_ticket(t)
    sock = os.path.join(work, "qemu.sock")
    q = nbdserver.qemu_nbd(target("qemu.raw"), "raw", sock=sock, shared=8)
    q.start()
    servers = {
        "imageio": ("nbd+unix:///{}?socket={}".format(t["uuid"],
                                                     d.nbd_socket),
                    d.proc.pid),
        "qemu-nbd": ("nbd+unix:///?socket=" + sock, q.proc.pid),
    }
    bs = args.kib * 1024
    try:
        for r in range(args.repeats):
            for kind in args.kinds:
                for name, (url, pid) in servers.items():
                    c0 = cpu_seconds(pid)
                    out = subprocess.run(
                        ["/usr/bin/python3", "-c", CLIENT, url, kind,
                         str(args.count), str(bs), str(SIZE),
                         str(IN_FLIGHT)],
                        capture_output=True, text=True, timeout=600,
                        check=True)
                    cpu = cpu_seconds(pid) - c0
                    print("round {} {} {} KiB {:8}: {:8.0f} req/s, "
                          "{:6.1f} us CPU/request".format(
                              r, kind, args.kib, name, float(out.stdout),
                              cpu / args.count * 1e6), flush=True)
    finally:
        q.stop()
        d.stop()


if __name__ == "__main__":
    main()
