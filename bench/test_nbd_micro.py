"""Micro benchmarks of imageio._io.nbd, with nbdcopy (and the established
service's NBD client) measured in the same run.

    .venv/bin/python -m pytest bench/test_nbd_micro.py --benchmark-only -s

Scenarios:

- read 1 GiB from qemu-nbd (qcow2 on /dev/shm, ``--cache=none
  --aio=native``) through ``send_to_socket`` into a drained socketpair,
  vs ``nbdcopy --no-extents nbd+unix://... null:`` (every byte read);
- the same through ``pread_pipelined`` (the TLS path, without TLS);
- write 1 GiB received from a socketpair with ``recv_from_socket``, vs
  ``nbdcopy`` from a pattern source to the same export;
- block status of a 1 TiB sparse qcow2 with 50,000 scattered 64 KiB
  clusters (100,000 extents), vs the established ovirt-imageio 2.5.1 NBD
  client when bench/.venv-established exists, and ``nbdinfo --map``.

Each test stores MiB/s (or seconds) and the ratio to its peer in
``benchmark.extra_info``.
"""

import json
import os
import socket
import subprocess
import threading
import time

import pytest

from imageio._io import nbd

from harness import nbdserver

HERE = os.path.dirname(os.path.abspath(__file__))

MiB = 1024**2
GiB = 1024**3
TiB = 1024**4

SHM = os.environ.get("IMAGEIO_BENCH_SHM", "/dev/shm/imageio-bench")
ROUNDS = int(os.environ.get("IMAGEIO_BENCH_ROUNDS", 3))
READ_SIZE = int(os.environ.get("IMAGEIO_BENCH_NBD_SIZE", GiB))
CLUSTERS = 50000
ESTABLISHED_PYTHON = os.path.join(HERE, ".venv-established", "bin", "python")

pytestmark = pytest.mark.timeout(900)


def _stamped(path, layout):
    stamp = path + ".layout.json"
    try:
        with open(stamp) as f:
            return json.load(f) == layout and os.path.exists(path)
    except (OSError, ValueError):
        return False


def _stamp(path, layout):
    with open(path + ".layout.json", "w") as f:
        json.dump(layout, f)


def data_image():
    """A fully allocated qcow2 of READ_SIZE random-ish bytes."""
    path = os.path.join(SHM, "nbd-data.qcow2")
    layout = {"size": READ_SIZE, "version": 1}
    if _stamped(path, layout):
        return path
    os.makedirs(SHM, exist_ok=True)
    raw = path + ".raw"
    chunk = os.urandom(64 * MiB)
    with open(raw, "wb") as f:
        for i in range(READ_SIZE // len(chunk)):
            # Vary each chunk a little so nothing dedups or compresses.
            f.write(i.to_bytes(8, "little") + chunk[8:])
    nbdserver.qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, path)
    os.unlink(raw)
    _stamp(path, layout)
    return path


def sparse_image():
    """1 TiB qcow2, CLUSTERS data clusters of 64 KiB spread evenly."""
    path = os.path.join(SHM, "nbd-sparse-1t.qcow2")
    layout = {"size": TiB, "clusters": CLUSTERS, "version": 1}
    if _stamped(path, layout):
        return path
    os.makedirs(SHM, exist_ok=True)
    nbdserver.qemu_img("create", "-f", "qcow2", path, TiB)
    step = (TiB // CLUSTERS) // (64 * 1024) * (64 * 1024)
    script = "".join("write -P 1 {} 64k\n".format(i * step)
                     for i in range(CLUSTERS))
    subprocess.run(["qemu-io", "-t", "unsafe", "-f", "qcow2", path],
                   input=script.encode(), check=True,
                   stdout=subprocess.DEVNULL, timeout=600)
    _stamp(path, layout)
    return path


@pytest.fixture(scope="module")
def data_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("nbd-bench")
    s = nbdserver.qemu_nbd(data_image(), "qcow2", sock=d / "data.sock",
                           cache="none", aio="native").start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def write_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("nbd-bench-w")
    path = os.path.join(SHM, "nbd-write.qcow2")
    nbdserver.qemu_img("create", "-f", "qcow2", path, READ_SIZE)
    s = nbdserver.qemu_nbd(path, "qcow2", sock=d / "write.sock",
                           cache="none", aio="native").start()
    yield s
    s.stop()
    os.unlink(path)


@pytest.fixture(scope="module")
def sparse_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("nbd-bench-s")
    s = nbdserver.qemu_nbd(sparse_image(), "qcow2", sock=d / "sparse.sock",
                           allocation_depth=True, read_only=True).start()
    yield s
    s.stop()


def best_time(fn, rounds=ROUNDS):
    best = None
    for _ in range(rounds):
        start = time.monotonic()
        fn()
        elapsed = time.monotonic() - start
        best = elapsed if best is None else min(best, elapsed)
    return best


def mib_s(size, seconds):
    return size / MiB / seconds


def nbdcopy_read(url, size):
    def run():
        subprocess.run(["nbdcopy", "--no-extents", url, "null:"],
                       check=True, timeout=300)
    return mib_s(size, best_time(run))


def record(benchmark, ours, peer, peer_name, unit="MiB/s", higher=True):
    benchmark.extra_info.update({
        "value": round(ours, 3),
        "unit": unit,
        peer_name: round(peer, 3),
        "ratio": round(ours / peer if higher else peer / ours, 3),
    })
    print("\n{}: ours {:.1f} {}, {} {:.1f} {}, ratio {:.2f}".format(
        benchmark.name, ours, unit, peer_name, peer, unit,
        benchmark.extra_info["ratio"]))


class Drain(threading.Thread):
    def __init__(self, sock):
        super().__init__(daemon=True)
        self.sock = sock
        self.count = 0
        self.start()

    def run(self):
        buf = bytearray(4 * MiB)
        while True:
            n = self.sock.recv_into(buf)
            if not n:
                break
            self.count += n


def test_send_to_socket(benchmark, data_server):
    h = nbd.Handle()
    h.connect(data_server.url())
    buf = bytearray(8 * MiB)

    def run():
        a, b = socket.socketpair()
        with a, b:
            drain = Drain(b)
            h.send_to_socket(a.fileno(), 0, READ_SIZE, buf)
            a.shutdown(socket.SHUT_WR)
            drain.join()
        assert drain.count == READ_SIZE

    peer = nbdcopy_read(data_server.url(), READ_SIZE)
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    ours = mib_s(READ_SIZE, benchmark.stats.stats.min)
    record(benchmark, ours, peer, "nbdcopy_no_extents")
    h.close()


def test_pread_pipelined(benchmark, data_server):
    h = nbd.Handle()
    h.connect(data_server.url())
    buf = bytearray(8 * MiB)

    def run():
        for off in range(0, READ_SIZE, len(buf)):
            h.pread_pipelined(buf, off, len(buf))

    peer = nbdcopy_read(data_server.url(), READ_SIZE)
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    ours = mib_s(READ_SIZE, benchmark.stats.stats.min)
    record(benchmark, ours, peer, "nbdcopy_no_extents")
    h.close()


def test_recv_from_socket(benchmark, write_server):
    h = nbd.Handle()
    h.connect(write_server.url())
    buf = bytearray(8 * MiB)
    payload = os.urandom(8 * MiB)

    def send(sock):
        with sock:
            for _ in range(READ_SIZE // len(payload)):
                sock.sendall(payload)

    def run():
        a, b = socket.socketpair()
        with a:
            t = threading.Thread(target=send, args=(b,), daemon=True)
            t.start()
            n = h.recv_from_socket(a.fileno(), 0, READ_SIZE, buf)
            t.join()
        assert n == READ_SIZE
        h.flush()

    def nbdcopy():
        subprocess.run(
            ["nbdcopy", "--", "[", "nbdkit", "--exit-with-parent",
             "pattern", str(READ_SIZE), "]", write_server.url()],
            check=True, timeout=300)

    peer = mib_s(READ_SIZE, best_time(nbdcopy))
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    ours = mib_s(READ_SIZE, benchmark.stats.stats.min)
    record(benchmark, ours, peer, "nbdcopy_from_pattern")
    h.close()


ESTABLISHED_EXTENTS = """
import sys, time
from urllib.parse import urlparse
from ovirt_imageio._internal.backends import nbd
b = nbd.open(urlparse(sys.argv[1]))
start = time.monotonic()
n = sum(1 for _ in b.extents(context="zero"))
print(n, time.monotonic() - start)
"""


def test_extents_1t(benchmark, sparse_server):
    h = nbd.Handle()
    h.connect(sparse_server.url())
    result = []

    def run():
        result[:] = h.zero_extents()

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    assert len(result) >= 2 * CLUSTERS
    ours = benchmark.stats.stats.min
    benchmark.extra_info["extents"] = len(result)

    def nbdinfo():
        subprocess.run(["nbdinfo", "--map", sparse_server.url()],
                       check=True, stdout=subprocess.DEVNULL, timeout=300)

    benchmark.extra_info["nbdinfo_map_s"] = round(best_time(nbdinfo), 3)

    if os.access(ESTABLISHED_PYTHON, os.X_OK):
        best = None
        for _ in range(ROUNDS):
            out = subprocess.run(
                [ESTABLISHED_PYTHON, "-c", ESTABLISHED_EXTENTS,
                 "nbd:unix:" + sparse_server.sock],
                check=True, stdout=subprocess.PIPE, timeout=300).stdout
            count, seconds = out.split()
            assert int(count) == len(result)
            best = float(seconds) if best is None else min(best,
                                                           float(seconds))
        record(benchmark, ours, best, "established_s", unit="s",
               higher=False)
    else:
        benchmark.extra_info.update({"value": round(ours, 3), "unit": "s"})
    h.close()

