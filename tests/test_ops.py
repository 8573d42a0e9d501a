"""The copy engine (imageio.ops) between real backends: files on ext4
(O_DIRECT: the overlapped pump) and tmpfs (buffered: the serial pump),
real qemu-nbd and nbdkit servers, real sockets and the real HTTP reader.
Every result is checked byte for byte."""

import os
import socket
import threading
import time
import types

import pytest

from harness import nbdserver
from imageio import backends, errors, ops, streams
from imageio._io.buffer import AlignedBuffer

MiB = 1024**2
BUF = MiB               # halves of 512 KiB when overlapping
SIZE = 5 * MiB + 4608   # several chunks, an unaligned tail

pytestmark = pytest.mark.timeout(120)

# (offset, length): unaligned heads and tails, one chunk, many chunks.
RANGES = [(0, SIZE), (1, 4095), (4095, MiB + 2), (777, SIZE - 777),
          (MiB - 100, 3 * MiB + 200)]


def open_url(url, writable=True):
    ticket = types.SimpleNamespace(
        url=url, ops=["read", "write"] if writable else ["read"],
        sparse=False, dirty=False)
    cfg = types.SimpleNamespace(
        backend_file=types.SimpleNamespace(buffer_size=BUF),
        backend_nbd=types.SimpleNamespace(buffer_size=BUF),
        daemon=types.SimpleNamespace(max_connections=8))
    return backends.open_backend(ticket, cfg)


def make_file(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return path


@pytest.fixture(params=["ext4", "tmpfs"])
def storage(request):
    """Where files live: ext4 opens O_DIRECT (overlapped), tmpfs buffered
    (serial)."""
    base = "/var/tmp" if request.param == "ext4" else "/dev/shm"
    d = os.path.join(base, "imageio-ops-{}-{}".format(
        os.getpid(), request.param))
    os.mkdir(d)
    yield d, request.param == "ext4"
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)


@pytest.fixture
def data():
    return os.urandom(SIZE)


@pytest.fixture
def nbd_image(storage, tmp_path):
    """A raw image served by qemu-nbd, all zeroes at first."""
    d, _ = storage
    path = os.path.join(d, "nbd.raw")
    with open(path, "wb") as f:
        f.truncate(SIZE)
    server = nbdserver.qemu_nbd(path, sock=tmp_path / "nbd.sock").start()
    yield path, server
    server.stop()


class Progress:
    def __init__(self, cancel_after=None):
        self.calls = []
        self.cancel_after = cancel_after

    def __call__(self, n):
        self.calls.append(n)
        if self.cancel_after is not None and \
                len(self.calls) >= self.cancel_after:
            raise errors.Canceled("canceled by the test")


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


# Backend to backend, as the client's planner copies extents.

def test_copy_file_to_nbd_and_back(storage, nbd_image, data):
    d, direct = storage
    src_path = make_file(os.path.join(d, "src"), data)
    nbd_path, server = nbd_image
    src = open_url("file://" + src_path)
    nbd = open_url(server.url())
    buf = AlignedBuffer(BUF)
    try:
        assert src.direct == direct
        for offset, length in RANGES:
            progress = Progress()
            ops.copy(src, nbd, offset, length, buf, progress)
            assert sum(progress.calls) == length
            # Halves when overlapping, the whole buffer when not.
            assert max(progress.calls) <= (BUF // 2 if length > BUF // 2
                                           else BUF)
        nbd.flush()
        assert read_file(nbd_path) == data
        dst_path = make_file(os.path.join(d, "dst"), bytes(SIZE))
        dst = open_url("file://" + dst_path)
        try:
            ops.copy(nbd, dst, 0, SIZE, buf)
        finally:
            dst.close()
        assert read_file(dst_path) == data
    finally:
        src.close()
        nbd.close()


def test_copy_file_to_file(storage, data):
    d, _ = storage
    src = open_url("file://" + make_file(os.path.join(d, "src"), data))
    dst_path = make_file(os.path.join(d, "dst"), bytes(SIZE))
    dst = open_url("file://" + dst_path)
    buf = AlignedBuffer(BUF)
    ref = bytearray(SIZE)
    try:
        for offset, length in RANGES:
            progress = Progress()
            ops.copy(src, dst, offset, length, buf, progress)
            assert sum(progress.calls) == length
            ref[offset:offset + length] = data[offset:offset + length]
    finally:
        src.close()
        dst.close()
    assert read_file(dst_path) == ref


def test_copy_sparse_file(storage, nbd_image, data):
    """Chunks inside a hole are zeroes (on O_DIRECT storage not read)."""
    d, _ = storage
    path = os.path.join(d, "sparse")
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.write(data[:4096])
        f.seek(4 * MiB)
        f.write(data[4 * MiB:4 * MiB + 8192])
    expected = read_file(path)
    nbd_path, server = nbd_image
    with open(nbd_path, "wb") as f:
        f.write(b"\xff" * SIZE)
    src = open_url("file://" + path)
    dst = open_url(server.url())
    try:
        ops.copy(src, dst, 0, SIZE, AlignedBuffer(BUF))
        dst.flush()
    finally:
        src.close()
        dst.close()
    assert read_file(nbd_path) == expected


def test_workers_copy_at_once(storage, nbd_image, data):
    """A planner's workers: each its own backends and buffer, one range
    each, at the same time."""
    d, _ = storage
    src_path = make_file(os.path.join(d, "src"), data)
    nbd_path, server = nbd_image
    workers = 4
    step = SIZE // workers
    failures = []

    def work(i):
        try:
            src = open_url("file://" + src_path)
            dst = open_url(server.url())
            try:
                end = SIZE if i == workers - 1 else (i + 1) * step
                ops.copy(src, dst, i * step, end - i * step,
                         AlignedBuffer(BUF))
                dst.flush()
            finally:
                src.close()
                dst.close()
        except Exception as e:
            failures.append(e)

    threads = [threading.Thread(target=work, args=(i,))
               for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert read_file(nbd_path) == data


def test_cancel_mid_copy(storage, nbd_image, data):
    """progress raising stops the copy: the chunks reported are written,
    nothing after them."""
    d, _ = storage
    src = open_url("file://" + make_file(os.path.join(d, "src"), data))
    nbd_path, server = nbd_image
    dst = open_url(server.url())
    try:
        progress = Progress(cancel_after=2)
        with pytest.raises(errors.Canceled):
            ops.copy(src, dst, 0, SIZE, AlignedBuffer(BUF), progress)
        dst.flush()
    finally:
        src.close()
        dst.close()
    done = sum(progress.calls)
    assert 0 < done < SIZE
    got = read_file(nbd_path)
    assert got[:done] == data[:done]
    assert got[done:] == bytes(SIZE - done)


# Errors: from either side, after the other side's chunk in flight ends.

def slow_source(tmp_path, data, *extra):
    """nbdkit serving ``data`` with 200 ms reads."""
    path = tmp_path / "slow.raw"
    path.write_bytes(data)
    return nbdserver.nbdkit("file", str(path), "delay-read=200ms", *extra,
                            sock=tmp_path / "slow.sock",
                            filters=["delay"]).start()


def assert_buffer_untouched(buf):
    """Nobody fills ``buf`` after ops returned: a helper still reading
    would overwrite the pattern when its slow read completes."""
    pattern = b"\xa5" * len(buf)
    memoryview(buf)[:] = pattern
    time.sleep(0.5)
    assert bytes(buf) == pattern


def test_destination_error_waits_for_the_read_in_flight(tmp_path, data):
    server = slow_source(tmp_path, data)
    src = open_url(server.url())
    dst_path = make_file(str(tmp_path / "ro"), bytes(SIZE))
    dst = open_url("file://" + dst_path, writable=False)
    buf = AlignedBuffer(BUF)
    try:
        with pytest.raises(OSError):
            ops.copy(src, dst, 0, SIZE, buf)
        assert_buffer_untouched(buf)
    finally:
        src.close()
        dst.close()
        server.stop()
    assert read_file(dst_path) == bytes(SIZE)


def test_source_error_propagates(tmp_path, data):
    trigger = tmp_path / "fail"
    server = nbdserver.nbdkit(
        "memory", str(SIZE), "error=EIO", "error-rate=100%",
        "error-file={}".format(trigger), sock=tmp_path / "err.sock",
        filters=["error"]).start()
    src = open_url(server.url())
    dst_path = make_file("/var/tmp/imageio-ops-{}-dst".format(os.getpid()),
                         bytes(SIZE))
    dst = open_url("file://" + dst_path)
    try:
        assert dst.overlap
        trigger.touch()
        with pytest.raises(OSError):
            ops.copy(src, dst, 0, SIZE, AlignedBuffer(BUF))
        trigger.unlink()
        # The source still serves: the failed read did not break it.
        ops.copy(src, dst, 0, MiB, AlignedBuffer(BUF))
    finally:
        src.close()
        dst.close()
        server.stop()
        os.unlink(dst_path)


def test_canceled_waits_for_the_read_in_flight(tmp_path, data):
    server = slow_source(tmp_path, data)
    src = open_url(server.url())
    dst_path = make_file("/var/tmp/imageio-ops-{}-dst".format(os.getpid()),
                         bytes(SIZE))
    dst = open_url("file://" + dst_path)
    buf = AlignedBuffer(BUF)
    try:
        with pytest.raises(errors.Canceled):
            ops.copy(src, dst, 0, SIZE, buf, Progress(cancel_after=1))
        assert_buffer_untouched(buf)
    finally:
        src.close()
        dst.close()
        server.stop()
        os.unlink(dst_path)


# Streams: a request body in, a response socket out.

def body_from(data, length, tls_like=False):
    """A real streams.Body on a socketpair carrying ``data`` then EOF, as the
    daemon reads a PUT (part of it buffered by the HTTP reader)."""
    a, b = socket.socketpair()

    def send():
        try:
            b.sendall(b"PUT / HTTP/1.1\r\n\r\n" + data)
        except OSError:
            pass
        finally:
            b.close()

    t = threading.Thread(target=send, daemon=True)
    t.start()
    reader = streams.Reader(a)
    assert reader.readline().startswith(b"PUT")
    assert reader.readline() == b"\r\n"
    body = streams.Body(reader, a, length, None)
    if tls_like:
        body = NoFd(body)
    return a, t, body


class NoFd:
    """The body as a TLS connection offers it: no fd for C loops."""

    fd = -1
    timeout = None

    def __init__(self, body):
        self._body = body

    def readinto(self, view):
        return self._body.readinto(view)

    def consumed(self, n):
        raise AssertionError("no fd, nothing consumed")


@pytest.fixture(params=["file", "nbd"])
def target(request, storage, nbd_image):
    """(path, backend) of an all-zero image to write: a file, or the
    qemu-nbd export of one."""
    if request.param == "nbd":
        path, server = nbd_image
        backend = open_url(server.url())
    else:
        path = make_file(os.path.join(storage[0], "dst"), bytes(SIZE))
        backend = open_url("file://" + path)
    yield path, backend
    backend.close()


@pytest.mark.parametrize("tls_like", [False, True])
def test_write_short_source(target, data, tls_like):
    path, backend = target
    sent = 3 * MiB + 100
    a, t, body = body_from(data[:sent], SIZE, tls_like)
    progress = Progress()
    with a, pytest.raises(errors.PartialContent) as e:
        ops.write(backend, body, 0, SIZE, AlignedBuffer(BUF), progress)
    t.join()
    backend.flush()
    assert e.value.requested == SIZE
    assert e.value.received == sent
    assert sum(progress.calls) <= sent
    # What arrived is written.
    got = read_file(path)
    assert got[:sum(progress.calls)] == data[:sum(progress.calls)]


@pytest.mark.parametrize("tls_like", [False, True])
def test_write_from_body(target, data, tls_like):
    path, backend = target
    offset, length = 777, SIZE - 777
    a, t, body = body_from(data[offset:], length, tls_like)
    progress = Progress()
    with a:
        ops.write(backend, body, offset, length, AlignedBuffer(BUF), progress)
    t.join()
    backend.flush()
    assert sum(progress.calls) == length
    assert read_file(path)[offset:] == data[offset:]


class CollectSink:
    """A sink without an fd (like TLS): ops sends through write()."""

    fd = -1
    timeout = None

    def __init__(self):
        self.data = bytearray()

    def write(self, view):
        self.data += view


def source_backend(storage, nbd_image, data, source):
    """A backend holding ``data``: a file, or the qemu-nbd export of one."""
    d, _ = storage
    if source == "nbd":
        path, server = nbd_image
        with open(path, "r+b") as f:
            f.write(data)
        return open_url(server.url())
    return open_url("file://" + make_file(os.path.join(d, "s"), data))


@pytest.mark.parametrize("source", ["file", "nbd"])
def test_read_to_sink(storage, nbd_image, data, source):
    backend = source_backend(storage, nbd_image, data, source)
    try:
        for offset, length in RANGES:
            sink = CollectSink()
            progress = Progress()
            ops.read(backend, sink, offset, length, AlignedBuffer(BUF),
                     progress)
            assert sink.data == data[offset:offset + length]
            assert sum(progress.calls) == length
    finally:
        backend.close()


def test_zero_reports(storage, data):
    d, _ = storage
    path = make_file(os.path.join(d, "z"), data)
    backend = open_url("file://" + path)
    progress = Progress()
    try:
        ops.zero(backend, MiB, 2 * MiB, False, progress)
    finally:
        backend.close()
    assert progress.calls == [2 * MiB]
    got = read_file(path)
    assert got[MiB:3 * MiB] == bytes(2 * MiB)
    assert got[:MiB] == data[:MiB] and got[3 * MiB:] == data[3 * MiB:]


class Tap:
    """Records what ``tap(offset, view)`` saw, checking the order."""

    def __init__(self, offset):
        self.next = offset
        self.data = bytearray()

    def __call__(self, offset, view):
        assert offset == self.next
        self.data += view
        self.next += len(view)


@pytest.mark.parametrize("source", ["file", "nbd"])
def test_read_tap_sees_every_byte_even_to_a_plain_socket(
        storage, nbd_image, data, source):
    # A plain socket sink would take the C fast path; with a tap the bytes
    # go through the buffer, in order, and the peer still gets all of them.
    backend = source_backend(storage, nbd_image, data, source)
    try:
        for offset, length in RANGES:
            a, b = socket.socketpair()
            got = bytearray()

            def drain():
                while len(got) < length:
                    chunk = b.recv(1024 * 1024)
                    if not chunk:
                        return
                    got.extend(chunk)

            t = threading.Thread(target=drain, daemon=True)
            t.start()
            tap = Tap(offset)
            with a, b:
                ops.read(backend, streams.Sink(a), offset, length,
                         AlignedBuffer(BUF), tap=tap)
                t.join(30)
            assert bytes(tap.data) == data[offset:offset + length]
            assert bytes(got) == data[offset:offset + length]
    finally:
        backend.close()


@pytest.mark.parametrize("tls_like", [False, True])
def test_write_tap_sees_every_byte(target, data, tls_like):
    path, backend = target
    offset, length = 777, SIZE - 777
    a, t, body = body_from(data[offset:], length, tls_like)
    tap = Tap(offset)
    with a:
        ops.write(backend, body, offset, length, AlignedBuffer(BUF),
                  tap=tap)
    t.join()
    backend.flush()
    assert bytes(tap.data) == data[offset:]
    assert read_file(path)[offset:] == data[offset:]
