"""Tickets over NBD, side by side in one run: ``nbdcopy`` from a qcow2
into a raw file ticket over the daemon's NBD endpoint (TLS over TCP, and
its unix socket), against ``nbdcopy`` into ``qemu-nbd`` serving the same
kind of target the same ways (the limit), and the reverse (reads); and
virt-v2v's path, ``nbdcopy`` into nbdkit's Python plugin turning each NBD
write into an HTTPS PUT to the daemon (bench/v2v_plugin.py, 4 connections).

    python -m bench.nbdserve [--size BYTES] [--repeats N]

Prints seconds per round (interleaved), the best of each and the ratios
qemu-nbd time / daemon time (>= 1 means the daemon is as fast), with the
daemon's and qemu-nbd's CPU seconds per GiB.  Images live on /dev/shm.
"""

import argparse
import os
import shutil
import subprocess
import tempfile
import time
import uuid

from harness import nbdserver
from harness.daemonproc import Daemon

V2V_PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          "v2v_plugin.py")
GiB = 1024**3
MiB = 1024**2


def cpu_seconds(pid):
    with open("/proc/{}/stat".format(pid)) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def source_qcow2(path, size):
    """About half data in 1-16 MiB runs, the rest unallocated."""
    import random
    nbdserver.qemu_img("create", "-f", "qcow2", path, size)
    rnd = random.Random(5)
    cmds = []
    pos = 0
    while pos < size:
        n = rnd.randint(1, 16) * MiB
        if rnd.random() < 0.5:
            cmds += ["-c", "write -P {} {} {}".format(
                rnd.randint(1, 255), pos, min(n, size - pos))]
        pos += n
    subprocess.run(["qemu-io", "-f", "qcow2"] + cmds + [path], check=True,
                   stdout=subprocess.DEVNULL)


def qcow2(src):
    """nbdcopy reads a local file as raw bytes: the qcow2's guest data
    comes through a qemu-nbd that nbdcopy starts."""
    return ["--", "[", "qemu-nbd", "-f", "qcow2", "--read-only", src, "]"]


def timed(argv, pid):
    before = cpu_seconds(pid)
    start = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - start, cpu_seconds(pid) - before


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=2 * GiB)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default="/dev/shm",
                    help="where the targets live (a disk directory: the "
                    "daemon's file backend uses O_DIRECT there, and qemu-nbd "
                    "gets --cache=none --aio=native to match)")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="nbdserve-", dir=args.dir)
    try:
        run(work, args.size, args.repeats,
            direct=not args.dir.startswith("/dev/shm"))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work, size, repeats, direct=False):
    src = os.path.join(work, "src.qcow2")
    source_qcow2(src, size)
    target = os.path.join(work, "target.raw")
    with open(target, "wb") as f:
        f.truncate(size)
    pki = nbdserver.make_x509(os.path.join(work, "pki"))
    d = Daemon(os.path.join(work, "daemon"),
               "[nbd]\nenable = true\nport = 0\nsocket = run/nbd.sock\n"
               "[logger_root]\nlevel = INFO\nhandlers = stderr\n")
    d.start()
    cadir = os.path.join(work, "ca")
    os.makedirs(cadir)
    shutil.copy(d.ca_file, os.path.join(cadir, "ca-cert.pem"))
    t = {"uuid": str(uuid.uuid4()), "size": size, "timeout": 3600,
         "url": "file://" + target, "ops": ["read", "write"],
         # Holes punched for zeroes, as qemu-nbd does for nbdcopy.
         "sparse": True}
    d.add_ticket(t)
    port = nbdserver.free_port()
    sock = os.path.join(work, "qemu.sock")
    # Each server its own target file (qemu-nbd locks its image).
    targets = []
    for name in ("qemu-tls.raw", "qemu-unix.raw"):
        path = os.path.join(work, name)
        with open(path, "wb") as f:
            f.truncate(size)
        targets.append(path)
    io = {"cache": "none", "aio": "native"} if direct else {}
    qemu_tls = nbdserver.qemu_nbd(targets[0], "raw", port=port,
                                  tls_dir=pki, shared=8, **io).start()
    qemu_unix = nbdserver.qemu_nbd(targets[1], "raw", sock=sock,
                                   shared=8, **io).start()
    urls = {
        ("imageio", "tls"): ("nbds://localhost:{}/{}?tls-certificates={}"
                             .format(d.nbd_port, t["uuid"], cadir),
                             d.proc.pid),
        ("imageio", "unix"): ("nbd+unix:///{}?socket={}".format(
            t["uuid"], d.nbd_socket), d.proc.pid),
        ("qemu-nbd", "tls"): ("nbds://localhost:{}/?tls-certificates={}"
                              .format(port, pki), qemu_tls.proc.pid),
        ("qemu-nbd", "unix"): ("nbd+unix:///?socket={}".format(sock),
                               qemu_unix.proc.pid),
    }
    # virt-v2v's path: its own target and ticket, through HTTPS.
    v2v_target = os.path.join(work, "v2v.raw")
    with open(v2v_target, "wb") as f:
        f.truncate(size)
    tv = dict(t, uuid=str(uuid.uuid4()), url="file://" + v2v_target)
    d.add_ticket(tv)
    v2v_sock = os.path.join(work, "v2v.sock")
    v2v = nbdserver.nbdkit(
        "python", V2V_PLUGIN, "url=https://localhost:{}/images/{}".format(
            d.remote_port, tv["uuid"]),
        "cafile=" + d.ca_file, "size={}".format(size), sock=v2v_sock).start()
    urls[("v2v-plugin", "tls")] = ("nbd+unix:///?socket=" + v2v_sock,
                                   d.proc.pid)
    results = {}
    try:
        for r in range(repeats):
            for way in ("tls", "unix"):
                for server in ("imageio", "qemu-nbd"):
                    url, pid = urls[(server, way)]
                    w = timed(["nbdcopy", "--connections=4"] + qcow2(src) +
                              [url], pid)
                    out = os.path.join(work, "out.raw")
                    rd = timed(["nbdcopy", "--connections=4", url, out],
                               pid)
                    os.unlink(out)
                    results.setdefault((server, way, "write"), []).append(w)
                    results.setdefault((server, way, "read"), []).append(rd)
                    print("round {} {:8} {:4} write {:.2f} s read {:.2f} s"
                          .format(r, server, way, w[0], rd[0]), flush=True)
            url, pid = urls[("v2v-plugin", "tls")]
            w = timed(["nbdcopy", "--connections=4"] + qcow2(src) + [url],
                      pid)
            results.setdefault(("v2v-plugin", "tls", "write"), []).append(w)
            print("round {} v2v-plugin (https) write {:.2f} s".format(
                r, w[0]), flush=True)
    finally:
        v2v.stop()
        qemu_tls.stop()
        qemu_unix.stop()
        d.stop()
    gib = size / GiB
    print("\nbest of {} (seconds, server CPU s/GiB); ratio = qemu-nbd time "
          "/ imageio time".format(repeats))
    for way in ("tls", "unix"):
        for op in ("write", "read"):
            ours = min(results[("imageio", way, op)])
            peer = min(results[("qemu-nbd", way, op)])
            spread = [round(x[0], 2) for x in results[("imageio", way, op)]]
            print("{:4} {:5}: imageio {:.2f} s ({:.2f} CPU s/GiB) "
                  "qemu-nbd {:.2f} s ({:.2f}) ratio {:.2f}  rounds {}".format(
                      way, op, ours[0], ours[1] / gib, peer[0],
                      peer[1] / gib, peer[0] / ours[0], spread))
    ours = min(results[("imageio", "tls", "write")])
    peer = min(results[("v2v-plugin", "tls", "write")])
    print("tls  write: virt-v2v's plugin over HTTPS {:.2f} s ({:.2f} CPU s/GiB "
          "daemon) ratio plugin time / imageio NBD+TLS time {:.2f}".format(
              peer[0], peer[1] / gib, peer[0] / ours[0]))


if __name__ == "__main__":
    main()
