"""imageio._io.nbd against real qemu-nbd and nbdkit servers."""

import os
import socket
import threading
import time

import pytest

from harness import nbdserver
from imageio._io import nbd

MiB = 1024**2
GiB = 1024**3

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def memory(tmp_path):
    """A 64 MiB nbdkit memory export on a unix socket."""
    s = nbdserver.nbdkit("memory", "64M", sock=tmp_path / "mem.sock",
                         log=tmp_path / "nbdkit.log").start()
    yield s
    s.stop()


@pytest.fixture
def handle(memory):
    h = nbd.Handle()
    h.connect(memory.url())
    yield h
    h.close()


@pytest.fixture
def raw(tmp_path):
    """A 32 MiB sparse raw file served by qemu-nbd."""
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(32 * MiB)
    s = nbdserver.qemu_nbd(image, "raw", sock=tmp_path / "qemu.sock",
                           log=tmp_path / "qemu-nbd.log").start()
    s.image = image
    yield s
    s.stop()


class Reader(threading.Thread):
    """Drain a socket into a bytearray."""

    def __init__(self, sock, delay=0):
        super().__init__(daemon=True)
        self.sock = sock
        self.data = bytearray()
        self.delay = delay
        self.start()

    def run(self):
        time.sleep(self.delay)
        while True:
            b = self.sock.recv(1024 * 1024)
            if not b:
                break
            self.data += b


class Writer(threading.Thread):
    def __init__(self, sock, data):
        super().__init__(daemon=True)
        self.sock = sock
        self.payload = data
        self.start()

    def run(self):
        try:
            self.sock.sendall(self.payload)
        except OSError:
            pass  # The receiver gave up: that is what some tests check.
        finally:
            self.sock.close()


# Connecting.

@pytest.mark.parametrize("form", ["uri", "legacy"])
def test_connect_unix(tmp_path, form):
    s = nbdserver.nbdkit("memory", "1M", sock=tmp_path / "s.sock",
                         export="").start()
    try:
        h = nbd.Handle()
        if form == "uri":
            h.connect(s.url())
        else:
            h.connect_unix(s.sock, "")
        assert h.size() == MiB
        h.close()
    finally:
        s.stop()


@pytest.mark.parametrize("form", ["uri", "legacy"])
def test_connect_tcp_export_name(tmp_path, form):
    image = tmp_path / "disk.raw"
    image.write_bytes(b"x" * MiB)
    s = nbdserver.qemu_nbd(image, "raw", port=nbdserver.free_port(),
                           export="disk").start()
    try:
        h = nbd.Handle()
        if form == "uri":
            h.connect("nbd://127.0.0.1:{}/disk".format(s.port))
        else:
            h.connect_tcp("127.0.0.1", s.port, "disk")
        buf = bytearray(10)
        h.pread(buf, 0)
        assert buf == b"x" * 10
        h.close()
    finally:
        s.stop()


def test_connect_wrong_export(tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(b"x" * MiB)
    s = nbdserver.qemu_nbd(image, "raw", sock=tmp_path / "s.sock",
                           export="disk").start()
    try:
        h = nbd.Handle()
        with pytest.raises(nbd.Error):
            h.connect_unix(s.sock, "other")
    finally:
        s.stop()


def test_connect_refused(tmp_path):
    h = nbd.Handle()
    with pytest.raises(nbd.Error) as e:
        h.connect("nbd+unix:///?socket={}".format(tmp_path / "missing.sock"))
    assert isinstance(e.value, OSError)
    assert e.value.errno != 0
    assert "connect" in str(e.value)


def test_connect_bad_uri():
    h = nbd.Handle()
    with pytest.raises(nbd.Error):
        h.connect("nbd+unix:///?nosocket=1")


def test_properties(handle):
    assert handle.size() == 64 * MiB
    assert handle.can_zero()
    assert handle.can_flush()
    assert handle.can_trim()
    assert handle.can_multi_conn()
    assert not handle.is_read_only()
    assert handle.can_meta_context(nbd.BASE_ALLOCATION)
    # nbdkit has no qemu contexts.
    assert not handle.can_meta_context(nbd.ALLOCATION_DEPTH)
    assert handle.dirty_context is None
    assert handle.is_connected()


def test_read_only(tmp_path):
    s = nbdserver.nbdkit("memory", "1M", sock=tmp_path / "s.sock",
                         read_only=True).start()
    try:
        h = nbd.Handle()
        h.connect(s.url())
        assert h.is_read_only()
        with pytest.raises(nbd.Error):
            h.pwrite(b"x" * 512, 0)
        h.close()
    finally:
        s.stop()


def test_close(handle):
    handle.close()
    handle.close()
    assert handle.closed
    assert not handle.is_connected()
    with pytest.raises(ValueError):
        handle.size()
    with pytest.raises(ValueError):
        handle.pread(bytearray(10), 0)


# Simple commands.

@pytest.mark.parametrize("offset,length", [
    (0, 4096),
    (1, 1),
    (4095, 8193),
    (3 * MiB + 7, 5 * MiB + 3),     # Several requests.
    (0, 64 * MiB),                  # The whole export.
])
def test_pwrite_pread(handle, offset, length):
    data = os.urandom(length)
    handle.pwrite(data, offset)
    buf = bytearray(length)
    handle.pread(buf, offset)
    assert buf == data


def test_pread_out_of_bounds(handle):
    with pytest.raises(nbd.Error) as e:
        handle.pread(bytearray(10), handle.size() - 5)
    assert e.value.errno != 0
    # The handle is still usable.
    handle.pread(bytearray(10), 0)


def test_pwrite_readonly_buffer_types(handle):
    handle.pwrite(memoryview(b"abc"), 10)
    handle.pwrite(bytearray(b"def"), 13)
    buf = bytearray(6)
    handle.pread(memoryview(buf), 10)
    assert buf == b"abcdef"


def test_pipelined_partial_buffer(handle):
    data = os.urandom(3 * MiB)
    buf = bytearray(8 * MiB)
    buf[:len(data)] = data
    assert handle.pwrite_pipelined(buf, 1000, len(data)) == len(data)
    out = bytearray(8 * MiB)
    assert handle.pread_pipelined(out, 1000, len(data)) == len(data)
    assert out[:len(data)] == data
    assert out[len(data):] == bytes(len(out) - len(data))
    with pytest.raises(ValueError):
        handle.pread_pipelined(bytearray(10), 0, 11)
    with pytest.raises(ValueError):
        handle.pwrite_pipelined(b"x" * 10, 0, 11)


@pytest.mark.parametrize("no_hole", [True, False])
def test_zero(raw, no_hole):
    h = nbd.Handle()
    h.connect(raw.url())
    try:
        h.pwrite(b"\xff" * (8 * MiB), 0)
        h.flush()
        allocated = os.stat(raw.image).st_blocks
        h.zero(MiB, 4 * MiB, no_hole=no_hole)
        h.flush()
        buf = bytearray(8 * MiB)
        h.pread(buf, 0)
        assert buf[:MiB] == b"\xff" * MiB
        assert buf[MiB:5 * MiB] == bytes(4 * MiB)
        assert buf[5 * MiB:] == b"\xff" * (3 * MiB)
        blocks = os.stat(raw.image).st_blocks
        if no_hole:
            assert blocks == allocated
        else:
            assert blocks < allocated
    finally:
        h.close()


def test_zero_large(tmp_path):
    # Larger than one WRITE_ZEROES request.
    s = nbdserver.nbdkit("memory", "3G", sock=tmp_path / "s.sock").start()
    try:
        h = nbd.Handle()
        h.connect(s.url())
        h.pwrite(b"x" * 4096, 2 * GiB + MiB)
        h.zero(0, 3 * GiB)
        buf = bytearray(4096)
        h.pread(buf, 2 * GiB + MiB)
        assert buf == bytes(4096)
        h.close()
    finally:
        s.stop()


def test_trim_flush(handle):
    handle.pwrite(b"x" * MiB, 0)
    handle.trim(0, MiB)
    handle.flush()
    # nbdkit memory trims to zeroes.
    buf = bytearray(MiB)
    handle.pread(buf, 0)
    assert buf == bytes(MiB)


# Pipelined socket transfers.

@pytest.mark.parametrize("bufsize", [4096, 256 * 1024, 8 * MiB])
def test_send_to_socket(handle, bufsize):
    data = os.urandom(20 * MiB + 5)
    handle.pwrite(data, 7)
    a, b = socket.socketpair()
    with a, b:
        reader = Reader(b)
        calls = []
        n = handle.send_to_socket(a.fileno(), 7, len(data),
                                  bytearray(bufsize), None, calls.append)
        a.shutdown(socket.SHUT_WR)
        reader.join(10)
    assert n == len(data)
    assert reader.data == data
    assert sum(calls) == len(data)
    assert all(c > 0 for c in calls)


def test_send_to_socket_nonblocking(handle):
    data = os.urandom(16 * MiB)
    handle.pwrite(data, 0)
    a, b = socket.socketpair()
    with a, b:
        a.settimeout(5)  # The fd is now non-blocking.
        reader = Reader(b, delay=0.2)
        handle.send_to_socket(a.fileno(), 0, len(data), bytearray(MiB), 5)
        a.shutdown(socket.SHUT_WR)
        reader.join(10)
    assert reader.data == data


def test_send_to_socket_timeout(handle):
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            handle.send_to_socket(a.fileno(), 0, 64 * MiB, bytearray(MiB),
                                  0.3)
        assert time.monotonic() - start < 5
    # The handle is still usable.
    assert handle.is_connected()
    handle.pread(bytearray(10), 0)


def test_send_to_socket_peer_closed(handle):
    a, b = socket.socketpair()
    b.close()
    with a:
        with pytest.raises(BrokenPipeError):
            handle.send_to_socket(a.fileno(), 0, 64 * MiB, bytearray(MiB))
    handle.pread(bytearray(10), 0)


class Canceled(Exception):
    pass


def test_send_to_socket_progress_raises(handle):
    a, b = socket.socketpair()
    with a, b:
        reader = Reader(b)

        def progress(n):
            raise Canceled()

        with pytest.raises(Canceled):
            handle.send_to_socket(a.fileno(), 0, 64 * MiB, bytearray(MiB),
                                  None, progress)
        a.shutdown(socket.SHUT_WR)
        reader.join(10)
    # Stopped early, and requests in flight were retired.
    assert len(reader.data) < 64 * MiB
    handle.pread(bytearray(10), 0)


@pytest.mark.parametrize("bufsize", [4096, 256 * 1024, 8 * MiB])
def test_recv_from_socket(handle, bufsize):
    data = os.urandom(20 * MiB + 5)
    a, b = socket.socketpair()
    with a:
        Writer(b, data)
        calls = []
        n = handle.recv_from_socket(a.fileno(), 3, len(data),
                                    bytearray(bufsize), None, calls.append)
    assert n == len(data)
    assert sum(calls) == len(data)
    buf = bytearray(len(data))
    handle.pread(buf, 3)
    assert buf == data


def test_recv_from_socket_short(handle):
    a, b = socket.socketpair()
    with a:
        Writer(b, b"x" * (5 * MiB))
        n = handle.recv_from_socket(a.fileno(), 0, 10 * MiB, bytearray(MiB))
    assert n == 5 * MiB
    handle.pread(bytearray(10), 0)


def test_recv_from_socket_timeout(handle):
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"x" * 1000)
        with pytest.raises(TimeoutError):
            handle.recv_from_socket(a.fileno(), 0, MiB, bytearray(MiB), 0.3)
    handle.pread(bytearray(10), 0)


# Failures injected by nbdkit's error filter, a dying server.

def test_read_error(tmp_path):
    trigger = tmp_path / "fail"
    s = nbdkit_error(tmp_path, trigger)
    try:
        h = nbd.Handle()
        h.connect(s.url())
        h.pread(bytearray(MiB), 0)
        trigger.touch()
        with pytest.raises(nbd.Error) as e:
            h.pread(bytearray(4 * MiB), 0)
        assert e.value.errno == 5  # EIO
        a, b = socket.socketpair()
        with a, b:
            Reader(b)
            with pytest.raises(nbd.Error):
                h.send_to_socket(a.fileno(), 0, 32 * MiB, bytearray(MiB))
        # Errors fail requests, not the connection.
        trigger.unlink()
        assert h.is_connected()
        h.pread(bytearray(MiB), 0)
        h.close()
    finally:
        s.stop()


def test_write_error(tmp_path):
    trigger = tmp_path / "fail"
    s = nbdkit_error(tmp_path, trigger)
    try:
        h = nbd.Handle()
        h.connect(s.url())
        trigger.touch()
        with pytest.raises(nbd.Error):
            h.pwrite(b"x" * MiB, 0)
        a, b = socket.socketpair()
        with a:
            Writer(b, b"x" * (16 * MiB))
            with pytest.raises(nbd.Error):
                h.recv_from_socket(a.fileno(), 0, 16 * MiB, bytearray(MiB))
        trigger.unlink()
        h.pwrite(b"x" * MiB, 0)
        h.close()
    finally:
        s.stop()


def nbdkit_error(tmp_path, trigger):
    return nbdserver.nbdkit(
        "memory", "64M", "error=EIO", "error-rate=100%",
        "error-file={}".format(trigger),
        sock=tmp_path / "err.sock", filters=["error"],
        log=tmp_path / "nbdkit.log").start()


def test_server_dies_during_send(tmp_path):
    s = nbdserver.nbdkit("memory", "256M", "delay-read=50ms",
                         sock=tmp_path / "s.sock", filters=["delay"]).start()
    try:
        h = nbd.Handle()
        h.connect(s.url())
        threading.Timer(0.3, s.kill).start()
        a, b = socket.socketpair()
        with a, b:
            Reader(b)
            with pytest.raises(OSError):
                h.send_to_socket(a.fileno(), 0, 256 * MiB, bytearray(MiB))
        assert not h.is_connected()
        with pytest.raises(OSError):
            h.pread(bytearray(10), 0)
        h.close()
    finally:
        s.stop()


def test_server_dies_during_pread(tmp_path):
    s = nbdserver.nbdkit("memory", "256M", "delay-read=50ms",
                         sock=tmp_path / "s.sock", filters=["delay"]).start()
    try:
        h = nbd.Handle()
        h.connect(s.url())
        threading.Timer(0.3, s.kill).start()
        with pytest.raises(OSError):
            for i in range(100):
                h.pread(bytearray(8 * MiB), 0)
        assert not h.is_connected()
    finally:
        s.stop()


def test_delay_keeps_requests_in_flight(tmp_path):
    # 16 reads of 2 MiB with 50 ms each take 0.8 s one at a time; with
    # 8 in flight about 0.1-0.2 s.
    s = nbdserver.nbdkit("memory", "64M", "delay-read=50ms",
                         sock=tmp_path / "s.sock", filters=["delay"]).start()
    try:
        h = nbd.Handle()
        h.connect(s.url())
        start = time.monotonic()
        h.pread(bytearray(32 * MiB), 0)
        elapsed = time.monotonic() - start
        assert elapsed < 0.5
        h.close()
    finally:
        s.stop()


# TLS.

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return nbdserver.make_x509(tmp_path_factory.mktemp("pki"))


def test_tls_x509_unix(tmp_path, pki):
    s = nbdserver.nbdkit("memory", "16M", sock=tmp_path / "s.sock",
                         tls_dir=pki).start()
    try:
        # Without TLS the server refuses.
        with pytest.raises(nbd.Error):
            nbd.Handle().connect(s.url())
        h = nbd.Handle()
        h.connect(s.url(scheme="nbds+unix",
                        query="tls-certificates=" + pki))
        data = os.urandom(5 * MiB)
        h.pwrite(data, 0)
        a, b = socket.socketpair()
        with a, b:
            reader = Reader(b)
            h.send_to_socket(a.fileno(), 0, len(data), bytearray(MiB))
            a.shutdown(socket.SHUT_WR)
            reader.join(10)
        assert reader.data == data
        h.close()
    finally:
        s.stop()


def test_tls_x509_tcp_qemu_nbd(tmp_path, pki):
    image = tmp_path / "disk.qcow2"
    nbdserver.qemu_img("create", "-f", "qcow2", image, "16M")
    s = nbdserver.qemu_nbd(image, "qcow2", port=nbdserver.free_port(),
                           tls_dir=pki).start()
    try:
        h = nbd.Handle()
        h.connect("nbds://localhost:{}/?tls-certificates={}".format(
            s.port, pki))
        h.pwrite(b"y" * MiB, MiB)
        buf = bytearray(2 * MiB)
        h.pread(buf, 0)
        assert buf == bytes(MiB) + b"y" * MiB
        # No --allocation-depth: no holes.
        assert h.zero_extents() == [
            (0, MiB, True, False),
            (MiB, MiB, False, False),
            (2 * MiB, 14 * MiB, True, False),
        ]
        h.close()
    finally:
        s.stop()


def test_tls_psk(tmp_path):
    psk, user = nbdserver.make_psk(tmp_path / "keys.psk")
    s = nbdserver.nbdkit("memory", "16M", sock=tmp_path / "s.sock",
                         psk_file=psk).start()
    try:
        # The user in the URI.
        h = nbd.Handle()
        h.connect("nbds+unix://{}@/?socket={}&tls-psk-file={}".format(
            user, s.sock, psk))
        assert h.size() == 16 * MiB
        h.close()
        # libnbd 1.14 ignores tls-username; the caller passes it.
        h = nbd.Handle()
        h.connect("nbds+unix:///?socket={}&tls-psk-file={}"
                  "&tls-username={}".format(s.sock, psk, user),
                  tls_username=user)
        assert h.size() == 16 * MiB
        h.close()
        # A wrong user is refused.
        h = nbd.Handle()
        with pytest.raises(nbd.Error):
            h.connect("nbds+unix:///?socket={}&tls-psk-file={}".format(
                s.sock, psk), tls_username="intruder")
    finally:
        s.stop()


# Block status.

def qemu_map_extents(image, fmt):
    """(start, length, zero, hole) from qemu-img map, merged."""
    out = []
    for e in nbdserver.qemu_img_map(image, fmt):
        zero = e["zero"]
        hole = not e.get("present", True)
        if out and out[-1][2:] == (zero, hole):
            s, n, _, _ = out[-1]
            out[-1] = (s, n + e["length"], zero, hole)
        else:
            out.append((e["start"], e["length"], zero, hole))
    return out


@pytest.fixture
def chain(tmp_path):
    """qcow2 over a qcow2 backing file, with a dirty bitmap "b1" recording
    the writes made after it was added."""
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    nbdserver.qemu_img("create", "-f", "qcow2", base, "16M")
    nbdserver.qemu_io(base, "qcow2", "write -P 1 0 4M", "write -z 8M 1M")
    nbdserver.qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2",
                       top)
    nbdserver.qemu_io(top, "qcow2", "write -P 2 1M 1M", "write -z 2M 64k")
    nbdserver.qemu_img("bitmap", "--add", top, "b1")
    nbdserver.qemu_io(top, "qcow2", "write -P 3 12M 128k",
                      "write -z 3M 64k")
    return top


def test_zero_extents_qcow2_chain(tmp_path, chain):
    s = nbdserver.qemu_nbd(chain, "qcow2", sock=tmp_path / "s.sock",
                           allocation_depth=True, read_only=True).start()
    try:
        h = nbd.Handle()
        h.connect(s.url())
        assert h.can_meta_context(nbd.ALLOCATION_DEPTH)
        extents = h.zero_extents()
        assert extents == qemu_map_extents(chain, "qcow2")
        # Some holes and some zeroes that are not holes.
        assert any(e[3] for e in extents)
        assert any(e[2] and not e[3] for e in extents)
        # A sub range.
        sub = h.zero_extents(MiB + 4096, 2 * MiB)
        assert sub[0][0] == MiB + 4096
        assert sum(e[1] for e in sub) == 2 * MiB
        h.close()
    finally:
        s.stop()


def test_zero_extents_without_allocation_depth(tmp_path, chain):
    s = nbdserver.qemu_nbd(chain, "qcow2", sock=tmp_path / "s.sock",
                           read_only=True).start()
    try:
        h = nbd.Handle()
        h.connect(s.url())
        assert not h.can_meta_context(nbd.ALLOCATION_DEPTH)
        extents = h.zero_extents()
        expected = []
        for start, length, zero, hole in qemu_map_extents(chain, "qcow2"):
            if expected and expected[-1][2] == zero:
                s0, n0, _, _ = expected[-1]
                expected[-1] = (s0, n0 + length, zero, False)
            else:
                expected.append((start, length, zero, False))
        assert extents == expected
        h.close()
    finally:
        s.stop()


def test_dirty_extents(tmp_path, chain):
    s = nbdserver.qemu_nbd(chain, "qcow2", sock=tmp_path / "s.sock",
                           allocation_depth=True, bitmap="b1",
                           read_only=True).start()
    try:
        h = nbd.Handle()
        h.connect(s.url(), dirty=True)
        assert h.dirty_context == "qemu:dirty-bitmap:b1"
        assert h.can_meta_context(nbd.ALLOCATION_DEPTH)
        extents = h.dirty_extents()
        # qcow2 bitmaps have 64 KiB granularity.
        # dirty from the bitmap (64 KiB granularity), zero from
        # base:allocation.
        assert extents == [
            (0, 2 * MiB, False, False),
            (2 * MiB, 64 * 1024, False, True),
            (2 * MiB + 64 * 1024, MiB - 64 * 1024, False, False),
            (3 * MiB, 64 * 1024, True, True),
            (3 * MiB + 64 * 1024, MiB - 64 * 1024, False, False),
            (4 * MiB, 8 * MiB, False, True),
            (12 * MiB, 128 * 1024, True, False),
            (12 * MiB + 128 * 1024, 4 * MiB - 128 * 1024, False, True),
        ]
        raw = h.extents("qemu:dirty-bitmap:b1")
        assert [(s_, n) for s_, n, f in raw if f] == [
            (3 * MiB, 64 * 1024), (12 * MiB, 128 * 1024)]
        # Zero extents still work on a dirty connection.
        assert h.zero_extents() == qemu_map_extents(chain, "qcow2")
        h.close()
        # Without dirty=True no bitmap is negotiated.
        h = nbd.Handle()
        h.connect(s.url())
        assert h.dirty_context is None
        with pytest.raises(LookupError):
            h.dirty_extents()
        h.close()
    finally:
        s.stop()


def test_dirty_without_bitmap(tmp_path, chain):
    s = nbdserver.qemu_nbd(chain, "qcow2", sock=tmp_path / "s.sock",
                           read_only=True).start()
    try:
        h = nbd.Handle()
        h.connect_unix(s.sock, "", dirty=True)
        assert h.dirty_context is None
        with pytest.raises(LookupError):
            h.dirty_extents()
        # The connection is usable.
        assert len(h.zero_extents()) > 1
        h.close()
    finally:
        s.stop()


def test_dirty_nbdkit(memory):
    # nbdkit has no dirty bitmaps: dirty=True must still connect.
    h = nbd.Handle()
    h.connect(memory.url(), dirty=True)
    assert h.dirty_context is None
    assert h.can_meta_context(nbd.BASE_ALLOCATION)
    h.close()


def test_extents_sparse_random(tmp_path):
    # Many extents over several block status requests (> 4 GiB export);
    # zero extents must read as zeroes.
    s = nbdserver.nbdkit("sparse-random", "6G", "percent=1",
                         "runlength=65536", "seed=42",
                         sock=tmp_path / "s.sock").start()
    try:
        h = nbd.Handle()
        h.connect(s.url())
        size = h.size()
        extents = h.zero_extents()
        assert extents[0][0] == 0
        end = 0
        for i, (start, length, zero, hole) in enumerate(extents):
            assert start == end
            assert length > 0
            assert not hole
            if i:
                assert extents[i - 1][2] != zero  # merged
            end = start + length
        assert end == size
        assert len(extents) > 100
        data = [e for e in extents if not e[2]]
        assert data
        buf = bytearray(MiB)
        for start, length, zero, hole in extents[:200]:
            n = min(length, len(buf))
            view = memoryview(buf)[:n]
            h.pread(view, start)
            if zero:
                assert view == bytes(n)
        raw = h.extents(nbd.BASE_ALLOCATION)
        assert sum(e[1] for e in raw) == size
        h.close()
    finally:
        s.stop()


def test_extents_range_checks(handle):
    with pytest.raises(ValueError):
        handle.zero_extents(0, handle.size() + 1)
    assert handle.zero_extents(handle.size(), 0) == []
    with pytest.raises(LookupError):
        handle.extents("qemu:allocation-depth")


def test_extents_without_base_allocation(tmp_path):
    s = nbdserver.nbdkit("memory", "8M", sock=tmp_path / "s.sock",
                         filters=["noextents"]).start()
    try:
        h = nbd.Handle()
        h.connect(s.url())
        # nbdkit still offers base:allocation, reporting all data.
        assert h.zero_extents() == [(0, 8 * MiB, False, False)]
        h.close()
    finally:
        s.stop()


def test_gil_released(tmp_path):
    # Another thread runs while a handle waits for a slow server.
    s = nbdserver.nbdkit("memory", "64M", "delay-read=500ms",
                         sock=tmp_path / "s.sock", filters=["delay"]).start()
    try:
        h = nbd.Handle()
        h.connect(s.url())
        ticks = []
        stop = threading.Event()

        def ticker():
            while not stop.is_set():
                ticks.append(1)
                time.sleep(0.01)

        t = threading.Thread(target=ticker)
        t.start()
        h.pread(bytearray(MiB), 0)
        stop.set()
        t.join()
        assert len(ticks) > 20
        h.close()
    finally:
        s.stop()


@pytest.mark.parametrize("timeout", [2147484, 2**32, 1e300])
def test_long_timeouts_clamped(handle, timeout):
    # A ticket's inactivity_timeout may be up to 2**32 s; <int>(t * 1000)
    # overflowed to a negative poll timeout and every request failed.
    data = os.urandom(MiB)
    assert handle.pwrite_pipelined(data, 0, len(data), timeout=timeout) \
        == len(data)
    out = bytearray(MiB)
    assert handle.pread_pipelined(out, 0, len(out), timeout=timeout) \
        == len(out)
    assert out == data
    a, b = socket.socketpair()
    with a, b:
        reader = Reader(b)
        handle.send_to_socket(a.fileno(), 0, len(data), bytearray(MiB),
                              timeout)
        a.shutdown(socket.SHUT_WR)
        reader.join(10)
    assert reader.data == data
