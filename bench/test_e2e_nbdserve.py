"""Tickets over NBD (issue 20), for the report and the CI gate: ``nbdcopy``
(4 connections) moving a qcow2 of IMAGEIO_BENCH_SIZE bytes (about half
data in 1-16 MiB runs, bench/nbdserve.source_qcow2) into a raw file ticket
on /dev/shm, and the ticket back out to a file.  Scenarios (time, lower is
better):

- nbd_serve_write_tls / nbd_serve_read_tls: over TCP with TLS (x509);
- nbd_serve_write_unix / nbd_serve_read_unix: over the unix socket.

Peers, interleaved round by round:

- imageio: the daemon's NBD service ([nbd] enable);
- qemu-nbd: serving the same kind of target the same way (the limit);
- v2v-plugin (writes over TLS only): virt-v2v's path, nbdkit's Python
  plugin turning every NBD write into an HTTPS PUT to this daemon over 4
  connections (bench/v2v_plugin.py).

Every written target is compared with the source (``qemu-img compare``),
every read-back with the target.
"""

import os
import shutil
import subprocess
import tempfile
import uuid

import pytest

from bench import images
from bench import nbdserve
from bench.e2e import servers_param
from bench.nbdpeers import discard, measure
from harness import nbdserver
from harness.daemonproc import Daemon

TLS_PEERS = ["imageio", "qemu-nbd", "v2v-plugin"]
PEERS = ["imageio", "qemu-nbd"]


class Peer:
    def __init__(self, kind, label, pid, url, target):
        self.kind = kind
        self.label = label
        self.pid = pid
        self.url = url
        self.target = target

    def cpu_seconds(self):
        return nbdserve.cpu_seconds(self.pid)


@pytest.fixture(scope="module")
def rig():
    size = images.BULK_SIZE
    os.makedirs(images.SHM_DIR, exist_ok=True)
    work = tempfile.mkdtemp(prefix="nbdserve-", dir=images.SHM_DIR)
    src = os.path.join(work, "src.qcow2")
    nbdserve.source_qcow2(src, size)
    pki = nbdserver.make_x509(os.path.join(work, "pki"))
    d = Daemon(os.path.join(work, "daemon"),
               "[nbd]\nenable = true\nport = 0\nsocket = run/nbd.sock\n")
    started = []
    try:
        d.start()
        started.append(d)
        cadir = os.path.join(work, "ca")
        os.makedirs(cadir)
        shutil.copy(d.ca_file, os.path.join(cadir, "ca-cert.pem"))

        def target(name):
            path = os.path.join(work, name)
            with open(path, "wb") as f:
                f.truncate(size)
            return path

        def ticket(path):
            t = {"uuid": str(uuid.uuid4()), "size": size, "timeout": 3600,
                 "url": "file://" + path, "ops": ["read", "write"],
                 "sparse": True}
            d.add_ticket(t)
            return t["uuid"]

        peers = {}
        for way in ("tls", "unix"):
            path = target("imageio-{}.raw".format(way))
            tid = ticket(path)
            if way == "tls":
                url = "nbds://localhost:{}/{}?tls-certificates={}".format(
                    d.nbd_port, tid, cadir)
            else:
                url = "nbd+unix:///{}?socket={}".format(tid, d.nbd_socket)
            peers[("imageio", way)] = Peer(
                "imageio", "this daemon's NBD service", d.proc.pid, url,
                path)
        path = target("qemu-tls.raw")
        q = nbdserver.qemu_nbd(path, "raw", port=nbdserver.free_port(),
                               tls_dir=pki, shared=8).start()
        started.append(q)
        peers[("qemu-nbd", "tls")] = Peer(
            "qemu-nbd", "qemu-nbd", q.proc.pid,
            "nbds://localhost:{}/?tls-certificates={}".format(q.port, pki),
            path)
        path = target("qemu-unix.raw")
        sock = os.path.join(work, "qemu.sock")
        q = nbdserver.qemu_nbd(path, "raw", sock=sock, shared=8).start()
        started.append(q)
        peers[("qemu-nbd", "unix")] = Peer(
            "qemu-nbd", "qemu-nbd", q.proc.pid,
            "nbd+unix:///?socket=" + sock, path)
        path = target("v2v.raw")
        tid = ticket(path)
        sock = os.path.join(work, "v2v.sock")
        v = nbdserver.nbdkit(
            "python", nbdserve.V2V_PLUGIN,
            "url=https://localhost:{}/images/{}".format(d.remote_port, tid),
            "cafile=" + d.ca_file, "size={}".format(size), sock=sock).start()
        started.append(v)
        # The daemon does the work behind the plugin: its CPU is counted.
        peers[("v2v-plugin", "tls")] = Peer(
            "v2v-plugin", "virt-v2v's plugin (nbdkit python, HTTPS)",
            d.proc.pid, "nbd+unix:///?socket=" + sock, path)
        yield {"src": src, "work": work, "peers": peers}
    finally:
        for server in reversed(started):
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def peer(request):
    return request.param


def nbdcopy(src, dst):
    r = subprocess.run(["nbdcopy", "--connections=4"] + qcow2_source(src) +
                       [dst],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError("nbdcopy {} {}: {}".format(src, dst,
                                                      r.stderr[-2000:]))


def qcow2_source(src):
    """nbdcopy reads a local file as raw bytes: a qcow2 goes through
    qemu-nbd, which nbdcopy starts (the guest's data, holes included)."""
    if src.endswith(".qcow2"):
        return ["--", "[", "qemu-nbd", "-f", "qcow2", "--read-only", src,
                "]"]
    return [src]


def compare(a, fmt_a, b):
    r = subprocess.run(["qemu-img", "compare", "-q", "-f", fmt_a, "-F",
                        "raw", a, b], capture_output=True, text=True,
                       timeout=600)
    if r.returncode != 0:
        raise RuntimeError("{} differs from {}: {}".format(b, a,
                                                           r.stderr[-500:]))


def _write(benchmark, rig, kind, way, rep):
    peer = rig["peers"][(kind, way)]

    def setup():
        # A fresh sparse target each round (the same file: the ticket and
        # qemu-nbd keep it open).
        os.truncate(peer.target, 0)
        os.truncate(peer.target, images.BULK_SIZE)

    measure(benchmark, "nbd_serve_write_" + way, peer, rep,
            lambda: nbdcopy(rig["src"], peer.url), amount=1, unit="s",
            cpu_per=(1, "s"), setup=setup)
    try:
        compare(rig["src"], "qcow2", peer.target)
    except RuntimeError as e:
        discard(benchmark, "{}: {}".format(peer.label, e))


def _read(benchmark, rig, kind, way, rep):
    peer = rig["peers"][(kind, way)]
    out = os.path.join(rig["work"], "out-{}-{}.raw".format(kind, way))
    # What is read back: the source's data, written through the peer
    # itself (once; the write scenarios leave it there too).
    filled = rig.setdefault("filled", set())
    if (kind, way) not in filled:
        nbdcopy(rig["src"], peer.url)
        filled.add((kind, way))

    def setup():
        if os.path.exists(out):
            os.unlink(out)

    measure(benchmark, "nbd_serve_read_" + way, peer, rep,
            lambda: nbdcopy(peer.url, out), amount=1, unit="s",
            cpu_per=(1, "s"), setup=setup)
    try:
        compare(rig["src"], "qcow2", out)
    except RuntimeError as e:
        discard(benchmark, "{}: {}".format(peer.label, e))
    finally:
        os.unlink(out)


@servers_param(TLS_PEERS, argname="peer")
def test_nbd_serve_write_tls(benchmark, rig, peer, rep):
    """nbdcopy of the qcow2 into a file ticket over NBD+TLS (time, s)."""
    _write(benchmark, rig, peer, "tls", rep)


@servers_param(PEERS, argname="peer")
def test_nbd_serve_write_unix(benchmark, rig, peer, rep):
    """nbdcopy of the qcow2 into a file ticket over the unix socket."""
    _write(benchmark, rig, peer, "unix", rep)


@servers_param(PEERS, argname="peer")
def test_nbd_serve_read_tls(benchmark, rig, peer, rep):
    """nbdcopy of a file ticket to a file over NBD+TLS (time, s)."""
    _read(benchmark, rig, peer, "tls", rep)


@servers_param(PEERS, argname="peer")
def test_nbd_serve_read_unix(benchmark, rig, peer, rep):
    """nbdcopy of a file ticket to a file over the unix socket."""
    _read(benchmark, rig, peer, "unix", rep)
