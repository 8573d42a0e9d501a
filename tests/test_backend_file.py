"""The file backend on real storage: ext4 and tmpfs with O_DIRECT, ramfs
(which refuses O_DIRECT: the real buffered fallback of open()), and a loop
block device.  Transfers go through real sockets (plain and TLS) with the
real Sink, HTTP reader and request body; every result is checked byte for byte
against a reference bytearray."""

import logging
import os
import socket
import ssl
import subprocess
import threading
import types

import pytest

from imageio import backends, errors, ops, streams, tls
from imageio._io.buffer import AlignedBuffer
from imageio.backends import file as file_backend
from imageio.extents import Extent

MiB = 1024**2
# A multiple of 512 (a loop device's size) but not of 4096: the last block
# is partial.
SIZE = 3 * MiB + 5120
BUF_SIZE = MiB    # smaller than the image: transfers cross buffer boundaries

RANGES = [
    (0, 1), (1, 4095), (4095, 2), (4096, 4096), (4097, 8191),
    (MiB - 1, 2), (MiB - 100, MiB + 200), (0, SIZE), (777, SIZE - 777),
    (SIZE - 1, 1), (SIZE - 5000, 5000),
]


def run(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True,
                          text=True).stdout.strip()


class Image:

    def __init__(self, path, block_device=False, direct=True, holes=True,
                 data_path=None):
        self.path = path
        self.block_device = block_device
        self.direct = direct
        # Whether the file system reports holes (SEEK_HOLE) per block.
        self.holes = holes and not block_device
        # Where the bytes can be set up and inspected.
        self.data_path = data_path or path

    def write(self, data):
        with open(self.data_path, "r+b" if self.block_device else "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def content(self):
        with open(self.path, "rb") as f:
            return f.read()

    def open(self, ops=("read", "write"), sparse=False):
        ticket = types.SimpleNamespace(
            url="file://" + self.path, ops=list(ops), sparse=sparse,
            dirty=False)
        cfg = types.SimpleNamespace(
            backend_file=types.SimpleNamespace(buffer_size=BUF_SIZE))
        return file_backend.open(ticket, cfg)


def _ramfs(tmp_path):
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    try:
        run("mount", "-t", "ramfs", "ramfs", str(mnt))
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip("Cannot mount ramfs (needs root): {}".format(e))
    return str(mnt)


@pytest.fixture(params=["ext4", "tmpfs", "ramfs-buffered", "loop-device"])
def image(request, tmp_path):
    yield from _image(request.param, tmp_path)


# Files that grow when written past the end (not block devices).
@pytest.fixture(params=["ext4", "tmpfs", "ramfs-buffered"])
def growable_image(request, tmp_path):
    yield from _image(request.param, tmp_path)


# Files whose holes SEEK_HOLE reports per block (not ramfs, not devices).
@pytest.fixture(params=["ext4", "tmpfs"])
def holey_image(request, tmp_path):
    yield from _image(request.param, tmp_path)


# O_DIRECT images: partial blocks are read-modify-written.
@pytest.fixture(params=["ext4", "loop-device"])
def direct_image(request, tmp_path):
    yield from _image(request.param, tmp_path)


def _image(kind, tmp_path):
    if kind == "ext4":
        path = "/var/tmp/imageio-backend-{}".format(os.getpid())
        yield Image(path)
        os.unlink(path)
    elif kind == "tmpfs":
        # Buffered on purpose: tmpfs is the page cache (see file.open).
        path = "/dev/shm/imageio-backend-{}".format(os.getpid())
        yield Image(path, direct=False)
        os.unlink(path)
    elif kind == "ramfs-buffered":
        mnt = _ramfs(tmp_path)
        try:
            yield Image(os.path.join(mnt, "image"), direct=False,
                        holes=False)
        finally:
            run("umount", mnt)
    else:
        backing = "/var/tmp/imageio-loop-{}".format(os.getpid())
        with open(backing, "wb") as f:
            f.truncate(SIZE)
        try:
            dev = run("losetup", "--find", "--show", backing)
        except (OSError, subprocess.CalledProcessError) as e:
            os.unlink(backing)
            pytest.skip("Cannot attach a loop device (needs root and "
                        "/dev/loop-control): {}".format(e))
        try:
            yield Image(dev, block_device=True)
        finally:
            run("losetup", "--detach", dev)
            os.unlink(backing)


@pytest.fixture(scope="module")
def reference():
    return bytearray(os.urandom(SIZE))


@pytest.fixture
def buf():
    return AlignedBuffer(BUF_SIZE)


class Progress:

    def __init__(self):
        self.calls = []

    def __call__(self, n):
        self.calls.append(n)


def drain(sock):
    out = bytearray()

    def run():
        while True:
            try:
                chunk = sock.recv(MiB)
            except OSError:
                # The test closed the socket.
                return
            if not chunk:
                return
            out.extend(chunk)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


# TLS: a real SSLSocket, so the sink has no fd and ops.read goes through the
# buffer and SSLSocket.sendall.

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    key, cert, ca = str(d / "key.pem"), str(d / "cert.pem"), str(d / "ca.pem")
    tls.create_dev_pki(key, cert, ca)
    return key, cert, ca


def tls_pair(pki):
    key, cert, ca = pki
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=ca)
    a, b = socket.socketpair()
    result = {}

    def handshake():
        result["client"] = client_ctx.wrap_socket(
            b, server_hostname="localhost")

    t = threading.Thread(target=handshake)
    t.start()
    server = server_ctx.wrap_socket(a, server_side=True)
    t.join()
    return server, result["client"]


@pytest.mark.parametrize("timeout", [None, 10])
def test_read_to(image, reference, buf, timeout):
    image.write(reference)
    with image.open(ops=["read"]) as backend:
        assert backend.direct == image.direct
        for offset, length in RANGES:
            a, b = socket.socketpair()
            # A timeout makes the fd non-blocking.
            a.settimeout(timeout)
            with a, b:
                sink = streams.Sink(a, timeout=timeout)
                assert sink.fd == a.fileno()
                t, out = drain(b)
                progress = Progress()
                ops.read(backend, sink, offset, length, buf, progress)
                a.shutdown(socket.SHUT_WR)
                t.join()
            assert out == reference[offset:offset + length], (offset, length)
            assert sum(progress.calls) == length
            assert max(progress.calls) <= BUF_SIZE


def test_read_to_tls(image, reference, buf, pki):
    image.write(reference)
    a, b = tls_pair(pki)
    with image.open(ops=["read"]) as backend, a, b:
        sink = streams.Sink(a, timeout=5)
        assert sink.fd == -1
        for offset, length in RANGES:
            got = bytearray()
            t = threading.Thread(target=lambda: got.extend(
                _recv_exactly(b, length)))
            t.start()
            progress = Progress()
            ops.read(backend, sink, offset, length, buf, progress)
            t.join()
            assert got == reference[offset:offset + length], (offset, length)
            assert sum(progress.calls) == length


def _recv_exactly(sock, n):
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(n - len(out), MiB))
        assert chunk
        out += chunk
    return out


def test_read_to_past_end(image, reference, buf):
    image.write(reference)
    a, b = socket.socketpair()
    with image.open() as backend, a, b:
        t, out = drain(b)
        with pytest.raises(errors.BackendError):
            ops.read(backend, streams.Sink(a), SIZE - 10, 20, buf,
                     Progress())


def test_read_to_canceled(image, reference, buf):
    image.write(reference)
    a, b = socket.socketpair()

    def progress(n):
        raise errors.Canceled()

    with image.open() as backend, a, b:
        t, out = drain(b)
        with pytest.raises(errors.Canceled):
            ops.read(backend, streams.Sink(a), 0, SIZE, buf, progress)
        a.shutdown(socket.SHUT_WR)
        t.join()
        # Stopped after the first chunk.
        assert len(out) == BUF_SIZE


def send_request(sock, body, close=True):
    """Send a request head and body as one client would; the server side
    reads the head with the real HTTP reader, which buffers part of the
    body."""
    def run():
        sock.sendall(b"PUT /images/x HTTP/1.1\r\n\r\n" + body)
        if close:
            sock.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def request_source(sock, length):
    """The request body of ``length`` bytes, as the daemon reads it."""
    reader = streams.Reader(sock)
    assert reader.readline().startswith(b"PUT")
    assert reader.readline() == b"\r\n"
    return streams.Body(reader, sock, length, sock.gettimeout())


@pytest.mark.parametrize("transport", ["plain", "plain-timeout", "tls"])
def test_write_from(image, reference, buf, transport, pki):
    image.write(reference)
    ref = bytearray(reference)
    with image.open() as backend:
        for offset, length in RANGES:
            if transport == "tls":
                a, b = tls_pair(pki)
            else:
                a, b = socket.socketpair()
                if transport == "plain-timeout":
                    a.settimeout(10)
            with a, b:
                data = os.urandom(length)
                t = send_request(b, data, close=transport != "tls")
                source = request_source(a, length)
                progress = Progress()
                ops.write(backend, source, offset, length, buf, progress)
                t.join()
                assert sum(progress.calls) == length
            ref[offset:offset + length] = data
        assert backend.size() == SIZE
    assert image.content() == ref


def test_write_from_partial(image, reference, buf):
    image.write(reference)
    a, b = socket.socketpair()
    with image.open() as backend, a, b:
        t = send_request(b, b"x" * 5000)
        source = request_source(a, 2 * MiB)
        with pytest.raises(errors.PartialContent) as e:
            ops.write(backend, source, 100, 2 * MiB, buf, Progress())
        assert e.value.requested == 2 * MiB
        assert e.value.received == 5000
        t.join()


def test_write_from_timeout(image, reference, buf):
    with socket.create_server(("127.0.0.1", 0)) as server:
        b = socket.create_connection(server.getsockname())
        a, _ = server.accept()
    a.settimeout(0.3)
    image.write(reference)
    with image.open() as backend, a, b:
        t = send_request(b, b"x" * 5000, close=False)
        source = request_source(a, 2 * MiB)
        with pytest.raises(TimeoutError):
            ops.write(backend, source, 0, 2 * MiB, buf, Progress())
        t.join()


def test_write_read_only(image, reference, buf):
    image.write(reference)
    a, b = socket.socketpair()
    with image.open(ops=["read"]) as backend, a, b:
        sender = send_request(b, b"x" * 8192)
        with pytest.raises(OSError):
            ops.write(backend, request_source(a, 8192), 0, 8192, buf,
                      Progress())
        # The request fits the socket buffer: the sender is done before
        # the sockets close under it.
        sender.join(10)
        assert not sender.is_alive()


def test_readinto(image, reference):
    image.write(reference)
    buf = AlignedBuffer(MiB + 8192)
    with image.open(ops=["read"]) as backend:
        for offset, length in RANGES:
            if length > len(buf) - 4096:
                continue
            view = backend.readinto(buf, offset, length)
            assert view == reference[offset:offset + length]
        # The interface's largest read: len(buf) - 4096 at any offset.
        view = backend.readinto(buf, 4095, len(buf) - 4096)
        assert view == reference[4095:4095 + len(buf) - 4096]
        with pytest.raises(errors.BackendError):
            backend.readinto(buf, SIZE - 1, 2)


ZERO_RANGES = [
    (0, 1), (1, 4095), (4095, 2), (4096, 4096), (5000, 10000),
    (MiB - 1, MiB + 2), (2 * MiB, MiB), (SIZE - 1, 1), (SIZE - 3000, 3000),
]


@pytest.mark.parametrize("punch_hole", [True, False])
def test_zero(image, reference, punch_hole):
    image.write(reference)
    ref = bytearray(reference)
    with image.open(sparse=punch_hole) as backend:
        for offset, length in ZERO_RANGES:
            backend.zero(offset, length, punch_hole)
            ref[offset:offset + length] = bytes(length)
            assert backend.size() == SIZE
        backend.flush()
    assert image.content() == ref


def test_zero_deallocates(holey_image, reference):
    image = holey_image
    assert image.holes
    image.write(reference)
    with image.open(sparse=True) as backend:
        backend.zero(MiB, MiB, True)
        assert Extent(MiB, MiB, True, False) in backend.extents()
        backend.zero(MiB, MiB, False)
        # Allocated again (it may or may not report as data, but reads as
        # zeroes).
        assert backend.readinto(AlignedBuffer(2 * MiB), MiB, MiB) == \
            bytes(MiB)


@pytest.mark.parametrize("punch_hole", [True, False])
@pytest.mark.parametrize("offset,length", [
    (SIZE - 100, 200), (SIZE, 1), (SIZE + 5000, 3 * 4096), (SIZE, MiB),
])
def test_zero_grows_file_exactly(growable_image, reference, punch_hole,
                                 offset, length):
    image = growable_image
    image.write(reference)
    with image.open() as backend:
        backend.zero(offset, length, punch_hole)
        assert backend.size() == offset + length
    assert image.content() == reference[:offset] + bytes(
        offset + length - min(offset, SIZE))


@pytest.mark.parametrize("offset,length", [(100, 200), (4000, 200),
                                           (SIZE - 100, 100)])
def test_zero_partial_block_takes_write_lock(direct_image, reference,
                                             offset, length):
    # Writes to a partial block read, modify and write the whole block
    # under the block lock; a zero of part of a block done outside it
    # would be undone by a concurrent unaligned PUT to the same block.
    image = direct_image
    image.write(reference)
    with image.open(sparse=True) as backend:
        backend._lock.acquire()
        th = threading.Thread(target=backend.zero,
                              args=(offset, length, True))
        try:
            th.start()
            th.join(0.3)
            assert th.is_alive(), "zero did not wait for the block lock"
        finally:
            backend._lock.release()
        th.join(10)
        # A whole aligned range takes no lock (nothing to read back).
        backend._lock.acquire()
        try:
            backend.zero(8192, 4096, True)
        finally:
            backend._lock.release()
    ref = bytearray(reference)
    ref[offset:offset + length] = bytes(length)
    ref[8192:8192 + 4096] = bytes(4096)
    assert image.content() == ref


def test_zero_write_fallback(image, reference):
    # What happens where fallocate is refused: zeroes are written.
    image.write(reference)
    ref = bytearray(reference)
    with image.open() as backend:
        for offset, length in ZERO_RANGES:
            backend._write_zeroes(offset, length)
            ref[offset:offset + length] = bytes(length)
    assert image.content() == ref


def test_extents(image):
    if image.block_device:
        data = os.urandom(SIZE)
        image.write(data)
        with image.open() as backend:
            assert backend.extents() == [Extent(0, SIZE, False, False)]
        return
    # Data at [1 MiB, 2 MiB) and in the last block; holes elsewhere.
    with open(image.data_path, "wb") as f:
        f.truncate(SIZE)
        f.seek(MiB)
        f.write(b"x" * MiB)
        f.seek(SIZE - 1)
        f.write(b"y")
    with image.open() as backend:
        extents = backend.extents()
    check_extents(extents, SIZE)
    if image.holes:
        # ext4 and tmpfs track allocation per 4 KiB block (page).
        last = SIZE - SIZE % 4096
        assert extents == [
            Extent(0, MiB, True, False),
            Extent(MiB, MiB, False, False),
            Extent(2 * MiB, last - 2 * MiB, True, False),
            Extent(last, SIZE - last, False, False),
        ]
    # Zero extents read as zeroes.
    content = image.content()
    for e in extents:
        if e.zero:
            assert content[e.start:e.start + e.length] == bytes(e.length)


def test_extents_range(image):
    # A range answers for itself: the same extents as the whole walk, cut
    # at the range's ends, at offsets that are not block multiples.
    if image.block_device:
        image.write(os.urandom(SIZE))
        with image.open() as backend:
            assert backend.extents(4097, 10) == [
                Extent(4097, 10, False, False)]
        return
    with open(image.data_path, "wb") as f:
        f.truncate(SIZE)
        for i in range(0, SIZE - 8192, 16384):
            f.seek(i)
            f.write(b"x" * 8192)
    with image.open() as backend:
        whole = backend.extents()
        for start, length in [(0, SIZE), (1, 12287), (8191, 3), (12345, 0),
                              (SIZE - 5, 5), (4097, SIZE // 3)]:
            got = backend.extents(start, length)
            assert got == cut(whole, start, start + length), (start, length)
        assert backend.extents(SIZE) == []
        for start, length in [(-1, 1), (0, SIZE + 1), (SIZE + 1, None)]:
            with pytest.raises(errors.RangeNotSatisfiable):
                backend.extents(start, length)


def cut(extents, start, end):
    """``extents`` limited to [start, end)."""
    out = []
    for e in extents:
        s, t = max(e.start, start), min(e.start + e.length, end)
        if s < t:
            out.append(e._replace(start=s, length=t - s))
    return out


def check_extents(extents, size):
    pos = 0
    for i, e in enumerate(extents):
        assert e.start == pos and e.length > 0
        assert e.hole is False
        if i:
            assert extents[i - 1].zero != e.zero   # merged
        pos += e.length
    assert pos == size


def test_extents_empty_and_all_data(growable_image):
    image = growable_image
    image.write(b"")
    with image.open() as backend:
        assert backend.extents() == []
        backend.write(b"x" * 10000, 0)
        assert backend.extents() == [Extent(0, 10000, False, False)]


def test_extents_dirty(image, reference):
    image.write(reference)
    with image.open() as backend:
        with pytest.raises(errors.NotFound):
            backend.extents(context="dirty")


def test_interface(image, reference):
    image.write(reference)
    backend = image.open()
    assert backend.features == frozenset({"extents", "zero", "flush"})
    assert backend.max_readers == 8
    assert backend.max_writers == 8
    assert backend.size() == SIZE
    backend.flush()
    backend.close()
    backend.close()


def test_open_errors(tmp_path):
    ticket = types.SimpleNamespace(url="file://" + str(tmp_path / "missing"),
                                   ops=["read"], sparse=False, dirty=False)
    with pytest.raises(FileNotFoundError):
        file_backend.open(ticket, None)
    ticket.url = "file:relative"
    with pytest.raises(errors.BadRequest):
        file_backend.open(ticket, None)


def test_open_through_interface(tmp_path):
    path = "/var/tmp/imageio-iface-{}".format(os.getpid())
    with open(path, "wb") as f:
        f.write(b"x" * 4096)
    try:
        ticket = types.SimpleNamespace(url="file://" + path, ops=["read"],
                                       sparse=False, dirty=False)
        with backends.open_backend(ticket, None) as backend:
            assert backend.size() == 4096
            assert backend.direct
    finally:
        os.unlink(path)


def test_buffered_fallback_logged_once(tmp_path, caplog):
    mnt = _ramfs(tmp_path)
    try:
        path = os.path.join(mnt, "image")
        with open(path, "wb") as f:
            f.write(b"x" * 100)
        image = Image(path, direct=False, holes=False)
        with caplog.at_level(logging.INFO, logger="backends.file"):
            for _ in range(3):
                with image.open() as backend:
                    assert not backend.direct
        lines = [r for r in caplog.records if "O_DIRECT" in r.getMessage()]
        assert len(lines) == 1
        assert lines[0].levelno == logging.INFO
    finally:
        run("umount", mnt)


def test_concurrent_write_from_sharing_blocks(image, buf):
    """Connections writing neighbouring unaligned ranges (each its own
    backend, as the daemon opens one per connection) lose nothing."""
    image.write(bytes(SIZE))
    nconn = 4
    piece = SIZE // nconn
    ref = bytearray(SIZE)
    errors_seen = []

    def upload(i):
        try:
            a, b = socket.socketpair()
            data = bytes([i + 1]) * piece
            with image.open() as backend, a, b:
                t = send_request(b, data)
                ops.write(backend, request_source(a, piece), i * piece, piece,
                          AlignedBuffer(BUF_SIZE), Progress())
                t.join()
        except Exception as e:
            errors_seen.append(e)

    for i in range(nconn):
        ref[i * piece:(i + 1) * piece] = bytes([i + 1]) * piece
    threads = [threading.Thread(target=upload, args=(i,))
               for i in range(nconn)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors_seen
    assert image.content() == ref


def test_write_from_reports_consumed(image, reference, buf):
    """Bytes read from the socket fd by C code are reported to the source,
    so the HTTP layer knows the body was read."""
    image.write(reference)
    a, b = socket.socketpair()
    with image.open() as backend, a, b:
        t = send_request(b, os.urandom(2 * MiB))
        source = request_source(a, 2 * MiB)
        seen = []
        source.consumed = seen.append
        ops.write(backend, source, 100, 2 * MiB, buf, Progress())
        t.join()
        # The reader buffered part of the body; the rest came through fd.
        assert seen and sum(seen) < 2 * MiB


@pytest.mark.parametrize("directory,direct", [
    ("/dev/shm", False), ("/var/tmp", True),
])
def test_direct_only_where_it_means_something(directory, direct):
    """On tmpfs O_DIRECT only costs (the page cache is the storage): the
    backend uses buffered I/O, and so sendfile, there."""
    path = os.path.join(directory, "imageio-direct-{}".format(os.getpid()))
    with open(path, "wb") as f:
        f.write(b"x" * 4096)
    try:
        with Image(path).open() as backend:
            assert backend.direct == direct
    finally:
        os.unlink(path)


def test_clone_is_another_fd_with_the_same_flags(tmp_path):
    # Every backend clones (imageio.backends.base): a file's clone is a
    # second fd of the same file, O_DIRECT and writability kept.
    import fcntl
    from imageio.backends import file as file_backend
    from imageio.backends.base import Backend
    path = tmp_path / "img"
    path.write_bytes(b"\0" * 1024**2)
    ticket = type("T", (), {"url": "file://" + str(path),
                            "ops": ["read", "write"]})()
    cfg = type("C", (), {})()
    b = file_backend.open(ticket, cfg)
    c = b.clone()
    try:
        assert isinstance(c, Backend)
        assert c._fd != b._fd
        assert c.direct == b.direct
        flags = fcntl.fcntl(b._fd, fcntl.F_GETFL)
        assert fcntl.fcntl(c._fd, fcntl.F_GETFL) == flags
        c.write(b"\x55" * 4096, 4096)
        c.flush()
        from imageio._io.buffer import AlignedBuffer
        assert bytes(b.readinto(AlignedBuffer(16384), 4096, 4096)) == \
            b"\x55" * 4096
    finally:
        c.close()
        b.close()
