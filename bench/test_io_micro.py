"""Micro benchmarks of imageio._io's byte movers (buffer, directio, stream,
zero).

    .venv/bin/python -m pytest bench/test_io_micro.py --benchmark-only

Each test stores its throughput in ``benchmark.extra_info["MiB/s"]``.
Files live on /dev/shm (as the end-to-end images do) unless the name says
``disk`` (/var/tmp, ext4 on the VM's disk).  O_DIRECT everywhere except the
``buffered`` variants.

- readinto: 8 MiB O_DIRECT pread into an AlignedBuffer;
- write: 8 MiB O_DIRECT pwrite from an AlignedBuffer (aligned, and at an
  unaligned offset with read-modify-write of head and tail);
- send_file: 256 MiB to a socketpair drained by a thread, from an O_DIRECT
  fd (aligned pread + send) and from a buffered fd (sendfile);
- recv_to_file: 256 MiB from a socketpair fed by a thread, 8 MiB chunks;
- is_zero: 8 MiB of zeroes (the worst case: every byte is looked at).
"""

import itertools
import os
import socket
import threading

import pytest

from imageio._io import directio, stream, zero
from imageio._io.buffer import AlignedBuffer

MiB = 1024**2
ALIGN = 4096
CHUNK = 8 * MiB
STREAM_SIZE = int(os.environ.get("IMAGEIO_BENCH_STREAM_SIZE", 256 * MiB))
DIRS = {"shm": "/dev/shm", "disk": "/var/tmp"}

pytestmark = pytest.mark.timeout(900)


def mib_per_s(benchmark, nbytes):
    mean = benchmark.stats.stats.mean
    benchmark.extra_info["MiB/s"] = round(nbytes / MiB / mean, 1)


@pytest.fixture(scope="module")
def data_files():
    """A STREAM_SIZE random file in each directory."""
    paths = {}
    block = os.urandom(CHUNK)
    for name, d in DIRS.items():
        path = os.path.join(d, "imageio-micro-{}".format(os.getpid()))
        with open(path, "wb") as f:
            for i in range(STREAM_SIZE // CHUNK):
                f.write(i.to_bytes(8, "little") + block[8:])
        paths[name] = path
    yield paths
    for path in paths.values():
        os.unlink(path)


def open_direct(path, flags=os.O_RDONLY):
    return os.open(path, flags | os.O_DIRECT | os.O_CLOEXEC)


@pytest.mark.parametrize("where", ["shm", "disk"])
def test_readinto(benchmark, data_files, where):
    fd = open_direct(data_files[where])
    buf = AlignedBuffer(CHUNK)
    offsets = itertools.count(0, CHUNK)

    def read():
        # Walk the file so the disk case is not one cached block.
        offset = next(offsets) % STREAM_SIZE
        assert directio.readinto(fd, buf, offset, CHUNK, ALIGN)[1] == CHUNK

    try:
        benchmark(read)
        mib_per_s(benchmark, CHUNK)
    finally:
        os.close(fd)


@pytest.mark.parametrize("where,offset", [
    ("shm", 0), ("shm", 1000), ("disk", 0),
])
def test_write(benchmark, where, offset):
    path = os.path.join(DIRS[where], "imageio-micro-w-{}".format(os.getpid()))
    fd = open_direct(path, os.O_RDWR | os.O_CREAT)
    buf = AlignedBuffer(CHUNK + ALIGN)
    memoryview(buf)[:] = os.urandom(len(buf))
    bounce = AlignedBuffer(MiB)
    # Same alignment in memory as in the file, as the backend arranges.
    skip = offset % ALIGN
    view = memoryview(buf)[skip:skip + CHUNK]
    try:
        benchmark(directio.write, fd, view, offset, bounce, ALIGN)
        mib_per_s(benchmark, CHUNK)
    finally:
        view.release()
        os.close(fd)
        os.unlink(path)


class Drain(threading.Thread):

    def __init__(self, sock):
        super().__init__(daemon=True)
        self.sock = sock
        self.start()

    def run(self):
        buf = bytearray(MiB)
        try:
            while self.sock.recv_into(buf):
                pass
        except OSError:
            pass


@pytest.mark.parametrize("mode", ["direct", "buffered"])
def test_send_file(benchmark, data_files, mode):
    a, b = socket.socketpair()
    Drain(b)
    path = data_files["shm"]
    if mode == "direct":
        fd, align = open_direct(path), ALIGN
    else:
        fd, align = os.open(path, os.O_RDONLY), 0
    buf = AlignedBuffer(CHUNK)

    def send():
        # Chunk by chunk, as the file backend calls it.
        for offset in range(0, STREAM_SIZE, CHUNK):
            stream.send_file(a.fileno(), fd, offset, CHUNK, buf, align, None)

    try:
        benchmark.pedantic(send, rounds=5, warmup_rounds=1)
        mib_per_s(benchmark, STREAM_SIZE)
    finally:
        os.close(fd)
        a.close()
        b.close()


class Feed(threading.Thread):

    def __init__(self, sock, nbytes):
        super().__init__(daemon=True)
        self.sock = sock
        self.nbytes = nbytes
        self.start()

    def run(self):
        data = memoryview(os.urandom(MiB))
        try:
            for _ in range(self.nbytes // MiB):
                self.sock.sendall(data)
        except OSError:
            pass


def test_recv_to_file(benchmark):
    path = os.path.join(DIRS["shm"], "imageio-micro-r-{}".format(os.getpid()))
    fd = open_direct(path, os.O_RDWR | os.O_CREAT)
    buf = AlignedBuffer(CHUNK)
    bounce = AlignedBuffer(MiB)
    rounds = 5
    a, b = socket.socketpair()
    Feed(b, STREAM_SIZE * (rounds + 1))

    def recv():
        for offset in range(0, STREAM_SIZE, CHUNK):
            assert stream.recv_to_file(a.fileno(), fd, offset, CHUNK, buf,
                                       bounce, ALIGN, None) == CHUNK

    try:
        benchmark.pedantic(recv, rounds=rounds, warmup_rounds=1)
        mib_per_s(benchmark, STREAM_SIZE)
    finally:
        a.close()
        b.close()
        os.close(fd)
        os.unlink(path)


def test_is_zero(benchmark):
    buf = AlignedBuffer(CHUNK)
    assert benchmark(zero.is_zero, buf)
    mib_per_s(benchmark, CHUNK)
