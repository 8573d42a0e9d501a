"""stream.send_file / recv_to_file over real sockets: a blocking
socketpair, and TCP loopback sockets with a timeout (non-blocking fds)."""

import hashlib
import os
import socket
import struct
import threading
import time

import pytest

from imageio._io import directio, stream
from imageio._io.buffer import AlignedBuffer

ALIGN = 4096
MiB = 1024**2
SIZE = 3 * MiB + 5000

FILES = {
    # name: (directory, O_DIRECT)
    "ext4-direct": ("/var/tmp", True),
    "tmpfs-direct": ("/dev/shm", True),
    "ext4-buffered": ("/var/tmp", False),
}


class File:

    def __init__(self, directory, direct, data):
        self.path = os.path.join(directory, "imageio-stream-{}-{}".format(
            os.getpid(), threading.get_ident()))
        with open(self.path, "wb") as f:
            f.write(data)
        self.direct = direct
        self.align = ALIGN if direct else 0
        self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC |
                          (os.O_DIRECT if direct else 0))

    def content(self):
        with open(self.path, "rb") as f:
            return f.read()

    def close(self):
        os.close(self.fd)
        os.unlink(self.path)


@pytest.fixture(scope="module")
def reference():
    return os.urandom(SIZE)


@pytest.fixture(params=sorted(FILES))
def image(request, reference):
    f = File(*FILES[request.param], reference)
    yield f
    f.close()


def tcp_pair(timeout=None):
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
    client.settimeout(timeout)
    peer.settimeout(timeout)
    return client, peer


@pytest.fixture(params=["socketpair", "tcp-timeout"])
def pair(request):
    if request.param == "socketpair":
        a, b = socket.socketpair()
    else:
        # A timeout makes the fds non-blocking: the C loops must poll.
        a, b = tcp_pair(timeout=10)
    yield a, b
    a.close()
    b.close()


class Drain(threading.Thread):
    """Reads everything from a socket until EOF."""

    def __init__(self, sock, keep=True):
        super().__init__(daemon=True)
        self.sock = sock
        self.keep = keep
        self.data = bytearray()
        self.count = 0
        self.start()

    def run(self):
        buf = bytearray(1024**2)
        while True:
            n = self.sock.recv_into(buf)
            if not n:
                return
            self.count += n
            if self.keep:
                self.data += buf[:n]


@pytest.mark.parametrize("offset,length", [
    (0, 1), (1, 4095), (4095, 2), (4096, 4096), (4097, 1 * MiB),
    (0, SIZE), (123, SIZE - 123), (SIZE - 1, 1),
])
def test_send_file(image, pair, reference, offset, length):
    a, b = pair
    buf = AlignedBuffer(MiB)     # smaller than some lengths: several windows
    drain = Drain(b)
    sent = stream.send_file(a.fileno(), image.fd, offset, length, buf,
                            image.align, a.gettimeout())
    a.shutdown(socket.SHUT_WR)
    drain.join()
    assert sent == length
    assert drain.data == reference[offset:offset + length]


def test_send_file_chunks(image, pair, reference):
    # The way the file backend calls it: chunk by chunk.
    a, b = pair
    buf = AlignedBuffer(MiB)
    drain = Drain(b)
    offset = 777
    while offset < SIZE:
        n = min(SIZE - offset, MiB - offset % ALIGN)
        assert stream.send_file(a.fileno(), image.fd, offset, n, buf,
                                image.align, 5) == n
        offset += n
    a.shutdown(socket.SHUT_WR)
    drain.join()
    assert drain.data == reference[777:]


@pytest.mark.parametrize("offset,length,expected", [
    (SIZE - 10, 100, 10), (SIZE, 10, 0), (SIZE + 5000, 10, 0),
])
def test_send_file_end_of_file(image, pair, reference, offset, length,
                               expected):
    a, b = pair
    drain = Drain(b)
    sent = stream.send_file(a.fileno(), image.fd, offset, length,
                            AlignedBuffer(MiB), image.align, None)
    a.shutdown(socket.SHUT_WR)
    drain.join()
    assert sent == expected
    assert drain.data == reference[offset:offset + length]


def test_send_file_zero_length(image, pair):
    a, b = pair
    assert stream.send_file(a.fileno(), image.fd, 0, 0, AlignedBuffer(4096),
                            image.align, None) == 0


def test_send_file_peer_stops_reading(image):
    a, b = tcp_pair(timeout=0.5)
    try:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            # Far more than the socket buffers hold.
            for _ in range(100):
                stream.send_file(a.fileno(), image.fd, 0, SIZE,
                                 AlignedBuffer(MiB), image.align, 0.5)
        elapsed = time.monotonic() - start
        assert 0.4 < elapsed < 5
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("pair_kind", ["socketpair", "tcp"])
def test_send_file_peer_closed(image, pair_kind):
    if pair_kind == "tcp":
        a, b = tcp_pair(timeout=5)
    else:
        a, b = socket.socketpair()
    b.close()
    try:
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for _ in range(10):
                stream.send_file(a.fileno(), image.fd, 0, SIZE,
                                 AlignedBuffer(MiB), image.align, 5)
    finally:
        a.close()


def test_send_file_bad_alignment(image, pair):
    a, b = pair
    with pytest.raises(ValueError):
        stream.send_file(a.fileno(), image.fd, 0, 10, AlignedBuffer(4096),
                         3, None)
    with pytest.raises(ValueError):
        stream.send_file(a.fileno(), image.fd, 0, 10,
                         AlignedBuffer(4096, 512), 4096, None)


class Sender(threading.Thread):

    def __init__(self, sock, data, close=True):
        super().__init__(daemon=True)
        self.sock = sock
        self.data = data
        self.close = close
        self.start()

    def run(self):
        try:
            self.sock.sendall(self.data)
            if self.close:
                self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


@pytest.mark.parametrize("offset,length", [
    (0, 1), (1, 4095), (4095, 2), (4096, 4096), (4097, MiB),
    (MiB - 100, MiB), (5000, 2 * MiB), (SIZE - 1, 1), (SIZE - 100, 4196),
])
def test_recv_to_file(image, pair, reference, offset, length):
    a, b = pair
    buf = AlignedBuffer(2 * MiB)
    bounce = AlignedBuffer(2 * ALIGN)
    data = os.urandom(length)
    Sender(b, data)
    got = stream.recv_to_file(a.fileno(), image.fd, offset, length, buf,
                              bounce, image.align, a.gettimeout())
    assert got == length
    ref = bytearray(reference)
    ref[offset:offset + length] = data
    assert image.content() == ref


def test_recv_to_file_fills_buffer_unaligned(image, pair, reference):
    # offset % align + length > len(buf): received at the start of the
    # buffer, the middle goes through the bounce buffer.
    a, b = pair
    buf = AlignedBuffer(MiB)
    data = os.urandom(MiB)
    Sender(b, data)
    got = stream.recv_to_file(a.fileno(), image.fd, 100, MiB, buf,
                              AlignedBuffer(ALIGN), image.align, 5)
    assert got == MiB
    ref = bytearray(reference)
    ref[100:100 + MiB] = data
    assert image.content() == ref


def test_recv_to_file_eof(image, pair, reference):
    a, b = pair
    Sender(b, b"x" * 10000)
    got = stream.recv_to_file(a.fileno(), image.fd, 10, 20000,
                              AlignedBuffer(MiB), AlignedBuffer(ALIGN),
                              image.align, 5)
    assert got == 10000
    # What was received was written.
    assert image.content() == reference[:10] + b"x" * 10000 + \
        reference[10010:]


def test_recv_to_file_timeout(image):
    a, b = tcp_pair(timeout=0.3)
    try:
        b.sendall(b"x" * 100)     # then nothing
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            stream.recv_to_file(a.fileno(), image.fd, 0, 4096,
                                AlignedBuffer(MiB), AlignedBuffer(ALIGN),
                                image.align, 0.3)
        assert 0.25 < time.monotonic() - start < 5
    finally:
        a.close()
        b.close()


def test_recv_to_file_reset(image):
    a, b = tcp_pair(timeout=5)
    try:
        # Close with RST.
        b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                     struct.pack("ii", 1, 0))
        b.close()
        with pytest.raises(ConnectionResetError):
            stream.recv_to_file(a.fileno(), image.fd, 0, 4096,
                                AlignedBuffer(MiB), AlignedBuffer(ALIGN),
                                image.align, 5)
    finally:
        a.close()


def test_recv_to_file_too_long(image, pair):
    a, b = pair
    with pytest.raises(ValueError):
        stream.recv_to_file(a.fileno(), image.fd, 0, 4097,
                            AlignedBuffer(4096), AlignedBuffer(4096),
                            image.align, 5)


def test_recv_to_file_write_error(pair):
    # /dev/full: the write fails after a full receive.
    a, b = pair
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        Sender(b, b"x" * 100)
        with pytest.raises(OSError) as e:
            stream.recv_to_file(a.fileno(), fd, 0, 100, AlignedBuffer(4096),
                                None, 0, 5)
        assert e.value.errno == 28
    finally:
        os.close(fd)


# The GIL is released for the copies: a Python thread keeps running.

class Counter(threading.Thread):

    def __init__(self):
        super().__init__(daemon=True)
        self.count = 0
        self.running = True
        self.start()

    def run(self):
        while self.running:
            self.count += 1

    def stop(self):
        self.running = False
        self.join()


def count_during(func):
    # Let the counter thread get going before the call.
    counter = Counter()
    time.sleep(0.05)
    before = counter.count
    func()
    during = counter.count - before
    counter.stop()
    return during


@pytest.fixture(scope="module")
def big_file():
    path = "/var/tmp/imageio-gil-{}".format(os.getpid())
    with open(path, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(MiB))
    yield path
    os.unlink(path)


def test_gil_released_send_file(big_file):
    a, b = socket.socketpair()
    fd = os.open(big_file, os.O_RDONLY | os.O_DIRECT)
    buf = AlignedBuffer(8 * MiB)
    try:
        # The drain only needs the GIL briefly per recv.
        drain = Drain(b, keep=False)
        during = count_during(
            lambda: stream.send_file(a.fileno(), fd, 0, 64 * MiB, buf,
                                     ALIGN, None))
        a.shutdown(socket.SHUT_WR)
        drain.join()
        assert drain.count == 64 * MiB
        # Holding the GIL for the whole call would leave the counter (almost)
        # still; released, it counts many thousands per millisecond.
        assert during > 10000
    finally:
        os.close(fd)
        a.close()
        b.close()


def test_gil_released_readinto(big_file):
    fd = os.open(big_file, os.O_RDONLY | os.O_DIRECT)
    buf = AlignedBuffer(64 * MiB + 2 * ALIGN)
    try:
        h = hashlib.sha1()
        during = count_during(
            lambda: directio.readinto(fd, buf, 0, 64 * MiB, ALIGN))
        h.update(memoryview(buf)[:64 * MiB])
        with open(big_file, "rb") as f:
            assert h.digest() == hashlib.sha1(f.read()).digest()
        assert during > 1000
    finally:
        os.close(fd)


def test_gil_released_recv_to_file(tmp_path):
    a, b = socket.socketpair()
    path = "/var/tmp/imageio-gil-recv-{}".format(os.getpid())
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT)
    try:
        data = os.urandom(MiB) * 32
        sender = Sender(b, data)
        during = count_during(
            lambda: stream.recv_to_file(a.fileno(), fd, 0, 32 * MiB,
                                        AlignedBuffer(32 * MiB),
                                        AlignedBuffer(ALIGN), ALIGN, None))
        sender.join()
        with open(path, "rb") as f:
            assert f.read() == data
        assert during > 1000
    finally:
        os.close(fd)
        os.unlink(path)
        a.close()
        b.close()


def test_negative_offset(image, pair):
    a, b = pair
    with pytest.raises(ValueError):
        stream.send_file(a.fileno(), image.fd, -1, 10, AlignedBuffer(MiB),
                         image.align, 5)
    with pytest.raises(ValueError):
        stream.recv_to_file(a.fileno(), image.fd, -1, 10, AlignedBuffer(MiB),
                            AlignedBuffer(ALIGN), image.align, 5)


def test_recv_into_offset_and_eof():
    a, b = socket.socketpair()
    data = os.urandom(3 * 1024**2 + 5)

    def send():
        b.sendall(data)
        b.close()

    t = threading.Thread(target=send)
    t.start()
    buf = AlignedBuffer(4 * 1024**2)
    n = stream.recv_into(a.fileno(), buf, 100, 2 * 1024**2, 10)
    assert n == 2 * 1024**2
    assert bytes(memoryview(buf)[100:100 + n]) == data[:n]
    # The peer closes before the rest: fewer bytes, no error.
    m = stream.recv_into(a.fileno(), buf, 0, 2 * 1024**2, 10)
    assert m == len(data) - n
    assert bytes(memoryview(buf)[:m]) == data[n:]
    t.join()
    a.close()
    with pytest.raises(ValueError):
        stream.recv_into(0, buf, 4 * 1024**2, 1)
