"""imageio.backends.nbd against real qemu-nbd and nbdkit servers."""

import os
import socket
import threading
import types

import pytest

from bench.peers import ESTABLISHED_CLIENT as SCRIPT
from harness import nbdserver
from imageio import backends, errors, extents, ops, streams
from imageio._io.buffer import AlignedBuffer

MiB = 1024**2

pytestmark = pytest.mark.timeout(120)


def make_ticket(url, ops=("read", "write"), sparse=False, dirty=False):
    return types.SimpleNamespace(url=url, ops=list(ops), sparse=sparse,
                                 dirty=dirty)


def make_cfg(buffer_size=8 * MiB, max_connections=8):
    return types.SimpleNamespace(
        backend_nbd=types.SimpleNamespace(buffer_size=buffer_size),
        daemon=types.SimpleNamespace(max_connections=max_connections))


def open_backend(url, **kw):
    cfg = kw.pop("cfg", None) or make_cfg()
    return backends.open_backend(make_ticket(url, **kw), cfg)


@pytest.fixture
def buf():
    return AlignedBuffer(8 * MiB)


@pytest.fixture
def memory(tmp_path):
    s = nbdserver.nbdkit("memory", "64M", sock=tmp_path / "mem.sock").start()
    yield s
    s.stop()


class Drain(threading.Thread):
    def __init__(self, sock):
        super().__init__(daemon=True)
        self.sock = sock
        self.data = bytearray()
        self.start()

    def run(self):
        while True:
            b = self.sock.recv(MiB)
            if not b:
                break
            self.data += b


def read_all(backend, buf, offset=0, length=None):
    """GET through a plain socket: the C send loop."""
    if length is None:
        length = backend.size() - offset
    a, b = socket.socketpair()
    with a, b:
        drain = Drain(b)
        calls = []
        ops.read(backend, streams.Sink(a), offset, length, buf, calls.append)
        a.shutdown(socket.SHUT_WR)
        drain.join(20)
    assert sum(calls) == length
    return bytes(drain.data)


class TLSLikeSink:
    """A sink without an fd, like an SSL socket."""

    fd = -1
    timeout = None

    def __init__(self):
        self.data = bytearray()

    def write(self, data):
        self.data += data


def write_all(backend, buf, data, offset=0, prefix=b""):
    """PUT through a real streams.Body: header bytes, then the body, read
    partly from the HTTP reader's buffer and then from the socket fd."""
    a, b = socket.socketpair()

    def send():
        try:
            b.sendall(b"HEADER\r\n" + prefix + data)
        except OSError:
            pass  # The backend failed and gave up reading.
        finally:
            b.close()

    with a:
        t = threading.Thread(target=send, daemon=True)
        t.start()
        reader = streams.Reader(a)
        assert reader.readline() == b"HEADER\r\n"
        body = streams.Body(reader, a, len(prefix) + len(data), None)
        calls = []
        ops.write(backend, body, offset, len(prefix) + len(data), buf,
                  calls.append)
        t.join(20)
        assert body.remaining == 0
        assert sum(calls) == len(prefix) + len(data)


# URLs.

# Connecting with every URL form.

def test_every_url_form(tmp_path, buf):
    image = tmp_path / "disk.raw"
    data = os.urandom(MiB)
    image.write_bytes(data)
    unix = nbdserver.qemu_nbd(image, "raw", sock=tmp_path / "s.sock",
                              export="disk", shared=16).start()
    tcp = nbdserver.qemu_nbd(image, "raw", port=nbdserver.free_port(),
                             export="disk", read_only=True).start()
    try:
        urls = [
            "nbd:unix:{}:exportname=disk".format(unix.sock),
            "nbd+unix:///disk?socket={}".format(unix.sock),
            "nbd:127.0.0.1:{}:exportname=disk".format(tcp.port),
            "nbd://127.0.0.1:{}/disk".format(tcp.port),
            "nbd://localhost:{}/disk".format(tcp.port),
        ]
        for url in urls:
            backend = open_backend(url)
            try:
                assert backend.size() == MiB
                assert read_all(backend, buf) == data, url
            finally:
                backend.close()
    finally:
        unix.stop()
        tcp.stop()


def test_unix_without_export_name(tmp_path, buf):
    s = nbdserver.nbdkit("memory", "1M", sock=tmp_path / "s.sock").start()
    try:
        backend = open_backend("nbd:unix:" + s.sock)
        assert backend.size() == MiB
        backend.close()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return nbdserver.make_x509(tmp_path_factory.mktemp("pki"))


def test_tls_x509(tmp_path, pki, buf):
    s = nbdserver.nbdkit("memory", "16M", sock=tmp_path / "s.sock",
                         tls_dir=pki).start()
    port = nbdserver.free_port()
    t = nbdserver.nbdkit("memory", "16M", port=port, tls_dir=pki).start()
    try:
        for url in [
                "nbds+unix:///?socket={}&tls-certificates={}".format(
                    s.sock, pki),
                "nbds://localhost:{}/?tls-certificates={}".format(port, pki)]:
            backend = open_backend(url)
            try:
                data = os.urandom(3 * MiB)
                write_all(backend, buf, data, offset=MiB)
                assert read_all(backend, buf, MiB, len(data)) == data
                sink = TLSLikeSink()
                ops.read(backend, sink, MiB, len(data), buf, None)
                assert sink.data == data
            finally:
                backend.close()
    finally:
        s.stop()
        t.stop()


def test_tls_psk(tmp_path, buf):
    psk, user = nbdserver.make_psk(tmp_path / "keys.psk")
    s = nbdserver.nbdkit("memory", "16M", sock=tmp_path / "s.sock",
                         psk_file=psk).start()
    try:
        for url in [
                "nbds+unix:///?socket={}&tls-psk-file={}&tls-username={}"
                .format(s.sock, psk, user),
                "nbds+unix://{}@/?socket={}&tls-psk-file={}"
                .format(user, s.sock, psk)]:
            backend = open_backend(url)
            assert backend.size() == 16 * MiB
            backend.close()
        # A wrong user: a clear error naming the user, never the key, nor
        # (told to clients) the socket or the key file.
        url = ("nbds+unix:///?socket={}&tls-psk-file={}&tls-username=eve"
               .format(s.sock, psk))
        with pytest.raises(errors.BackendError) as e:
            open_backend(url)
        assert s.sock not in str(e.value)
        assert str(psk) not in str(e.value)
        assert "eve" in str(e.value)
        with open(psk) as f:
            key = f.read().split(":")[1].strip()
        assert key not in str(e.value)
    finally:
        s.stop()


def test_unreachable(tmp_path):
    url = "nbd+unix:///x?socket={}".format(tmp_path / "missing.sock")
    with pytest.raises(errors.BackendError) as e:
        open_backend(url)
    msg = str(e.value)
    assert "Cannot connect to NBD server" in msg
    # Clients are not told where the server is (the log says).
    assert str(tmp_path / "missing.sock") not in msg
    assert e.value.status == 500
    with pytest.raises(errors.BackendError):
        open_backend("nbd:127.0.0.1:{}".format(nbdserver.free_port()))


# Properties.

def test_features_writable(memory):
    backend = open_backend(memory.url())
    assert backend.features == {"extents", "zero", "flush"}
    assert backend.max_readers == 8
    assert backend.max_writers == 8
    backend.close()
    backend.close()


def test_max_connections_from_config(memory):
    backend = open_backend(memory.url(), cfg=make_cfg(max_connections=4))
    assert backend.max_readers == 4
    assert backend.max_writers == 4
    backend.close()


def test_no_multi_conn(tmp_path):
    s = nbdserver.nbdkit("memory", "1M", "multi-conn-mode=disable",
                         sock=tmp_path / "s.sock",
                         filters=["multi-conn"]).start()
    try:
        backend = open_backend(s.url())
        assert backend.max_readers == 8
        assert backend.max_writers == 1
        backend.close()
    finally:
        s.stop()


def test_read_only_export(tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(b"x" * MiB)
    s = nbdserver.qemu_nbd(image, "raw", sock=tmp_path / "s.sock",
                           read_only=True).start()
    try:
        backend = open_backend(s.url(), ops=["read"])
        assert backend.features == {"extents"}
        backend.close()
    finally:
        s.stop()


# I/O.

@pytest.mark.parametrize("offset,length", [
    (0, 64 * MiB),
    (1, 1),
    (4095, 10 * MiB + 3),
])
def test_write_read(memory, buf, offset, length):
    backend = open_backend(memory.url())
    try:
        data = os.urandom(length)
        write_all(backend, buf, data, offset)
        assert read_all(backend, buf, offset, length) == data
        sink = TLSLikeSink()
        ops.read(backend, sink, offset, length, buf, None)
        assert sink.data == data
        view = backend.readinto(buf, offset, min(length, len(buf) - 4096))
        assert bytes(view) == data[:len(view)]
    finally:
        backend.close()


def test_write_buffered_prefix(memory, buf):
    # Body bytes the HTTP reader buffered with the headers go first.
    backend = open_backend(memory.url())
    try:
        prefix = os.urandom(1000)
        data = os.urandom(5 * MiB)
        write_all(backend, buf, data, 0, prefix=prefix)
        assert read_all(backend, buf, 0, len(prefix) + len(data)) == \
            prefix + data
    finally:
        backend.close()


def test_write_short_body(memory, buf):
    backend = open_backend(memory.url())
    try:
        a, b = socket.socketpair()
        with a:
            threading.Thread(
                target=lambda: (b.sendall(b"x" * (3 * MiB)), b.close()),
                daemon=True).start()
            source = streams.Body(streams.Reader(a), a, 10 * MiB, None)
            with pytest.raises(errors.PartialContent) as e:
                ops.write(backend, source, 0, 10 * MiB, buf, None)
        assert e.value.requested == 10 * MiB
        assert e.value.received == 3 * MiB
    finally:
        backend.close()


def test_range_outside_image(memory, buf):
    backend = open_backend(memory.url())
    try:
        with pytest.raises(errors.RangeNotSatisfiable):
            ops.read(backend, TLSLikeSink(), 64 * MiB - 1, 2, buf, None)
        with pytest.raises(errors.RangeNotSatisfiable):
            backend.zero(0, 64 * MiB + 1, False)
    finally:
        backend.close()


@pytest.mark.parametrize("punch_hole", [False, True])
def test_zero(tmp_path, buf, punch_hole):
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\xff" * (8 * MiB))
    s = nbdserver.qemu_nbd(image, "raw", sock=tmp_path / "s.sock").start()
    try:
        backend = open_backend(s.url(), sparse=punch_hole)
        blocks = os.stat(image).st_blocks
        backend.zero(MiB, 2 * MiB, punch_hole)
        backend.flush()
        data = read_all(backend, buf)
        assert data == b"\xff" * MiB + bytes(2 * MiB) + b"\xff" * (5 * MiB)
        if punch_hole:
            assert os.stat(image).st_blocks < blocks
        else:
            assert os.stat(image).st_blocks == blocks
        backend.close()
    finally:
        s.stop()


def test_zero_fallback(tmp_path, buf):
    # A server without WRITE_ZEROES: zeroes are written.
    s = nbdserver.nbdkit("memory", "32M", "zeromode=none",
                         sock=tmp_path / "s.sock", filters=["nozero"]).start()
    try:
        backend = open_backend(s.url())
        assert "zero" in backend.features
        write_all(backend, buf, b"\xff" * (32 * MiB))
        backend.zero(MiB, 20 * MiB, False)
        data = read_all(backend, buf)
        assert data == b"\xff" * MiB + bytes(20 * MiB) + b"\xff" * (11 * MiB)
        backend.close()
    finally:
        s.stop()


# Extents.

def test_extents_chain(tmp_path):
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    nbdserver.qemu_img("create", "-f", "qcow2", base, "8M")
    nbdserver.qemu_io(base, "qcow2", "write -P 1 0 2M")
    nbdserver.qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2",
                       top)
    nbdserver.qemu_io(top, "qcow2", "write -P 2 1M 1M", "write -z 4M 1M")
    s = nbdserver.qemu_nbd(top, "qcow2", sock=tmp_path / "s.sock",
                           allocation_depth=True).start()
    try:
        backend = open_backend(s.url())
        got = list(backend.extents())
        assert got == [
            extents.Extent(0, 2 * MiB, False, False),
            extents.Extent(2 * MiB, 2 * MiB, True, True),
            extents.Extent(4 * MiB, MiB, True, False),
            extents.Extent(5 * MiB, 3 * MiB, True, True),
        ]
        assert got[0].zero is False
        # A range: block status for it alone, cut at odd offsets.
        assert backend.extents(MiB + 3, 3 * MiB) == [
            extents.Extent(MiB + 3, MiB - 3, False, False),
            extents.Extent(2 * MiB, 2 * MiB, True, True),
            extents.Extent(4 * MiB, 3, True, False),
        ]
        with pytest.raises(errors.RangeNotSatisfiable):
            backend.extents(MiB, 8 * MiB)
        with pytest.raises(errors.NotFound):
            backend.extents(context="dirty")
        backend.close()
    finally:
        s.stop()


def test_extents_dirty(tmp_path):
    image = tmp_path / "disk.qcow2"
    nbdserver.qemu_img("create", "-f", "qcow2", image, "8M")
    nbdserver.qemu_io(image, "qcow2", "write -P 1 0 2M")
    nbdserver.qemu_img("bitmap", "--add", image, "incremental")
    nbdserver.qemu_io(image, "qcow2", "write -P 2 1M 64k",
                      "write -z 6M 1M")
    s = nbdserver.qemu_nbd(image, "qcow2", sock=tmp_path / "s.sock",
                           bitmap="incremental", read_only=True).start()
    try:
        backend = open_backend(s.url(), ops=["read"], dirty=True)
        assert list(backend.extents(context="dirty")) == [
            extents.DirtyExtent(0, MiB, False, False),
            extents.DirtyExtent(MiB, 64 * 1024, True, False),
            extents.DirtyExtent(MiB + 64 * 1024, MiB - 64 * 1024, False,
                                 False),
            extents.DirtyExtent(2 * MiB, 4 * MiB, False, True),
            extents.DirtyExtent(6 * MiB, MiB, True, True),
            extents.DirtyExtent(7 * MiB, MiB, False, True),
        ]
        assert len(backend.extents()) > 1
        backend.close()
        # A ticket that is not dirty has no dirty extents.
        backend = open_backend(s.url(), ops=["read"])
        with pytest.raises(errors.NotFound):
            backend.extents(context="dirty")
        backend.close()
    finally:
        s.stop()


def test_extents_dirty_without_bitmap(memory):
    backend = open_backend(memory.url(), dirty=True)
    with pytest.raises(errors.NotFound) as e:
        backend.extents(context="dirty")
    assert "dirty bitmap" in str(e.value)
    backend.close()


# A server that dies.

def test_server_dies_then_reconnect(tmp_path, buf):
    sock = tmp_path / "s.sock"
    image = tmp_path / "disk.raw"
    data = os.urandom(4 * MiB)
    with open(image, "wb") as f:
        f.write(data)
        f.truncate(256 * MiB)
    # 128 reads of 2 MiB, 8 in flight, 100 ms each: 1.6 s.
    s = nbdserver.nbdkit("file", str(image), "delay-read=100ms", sock=sock,
                         filters=["delay"]).start()
    backend = open_backend(s.url())
    try:
        killer = threading.Timer(0.3, s.kill)
        killer.start()
        a, b = socket.socketpair()
        with a, b:
            Drain(b)
            with pytest.raises(OSError):
                ops.read(backend, streams.Sink(a), 0, 256 * MiB, buf, None)
        killer.join()
        # While the server is down: a clear error.
        os.unlink(sock)
        with pytest.raises(errors.BackendError):
            backend.flush()
        # The server is back: the next request reconnects.
        s = nbdserver.nbdkit("file", str(image), sock=sock).start()
        assert read_all(backend, buf, 0, 4 * MiB) == data[:4 * MiB]
    finally:
        backend.close()
        s.stop()


def test_injected_errors(tmp_path, buf):
    trigger = tmp_path / "fail"
    s = nbdserver.nbdkit("memory", "16M", "error=EIO", "error-rate=100%",
                         "error-file={}".format(trigger),
                         sock=tmp_path / "s.sock", filters=["error"]).start()
    try:
        backend = open_backend(s.url())
        trigger.touch()
        with pytest.raises(OSError):
            read_all(backend, buf, 0, 8 * MiB)
        with pytest.raises(OSError):
            ops.read(backend, TLSLikeSink(), 0, 8 * MiB, buf, None)
        with pytest.raises(OSError):
            write_all(backend, buf, b"x" * MiB)
        with pytest.raises(OSError):
            backend.zero(0, MiB, False)
        trigger.unlink()
        # The same backend works again.
        write_all(backend, buf, b"x" * MiB)
        assert read_all(backend, buf, 0, MiB) == b"x" * MiB
        backend.close()
    finally:
        s.stop()


# Through the real daemon.

def _nbd_target(tmp_path, size=64 * MiB, **kw):
    image = tmp_path / "target.qcow2"
    nbdserver.qemu_img("create", "-f", "qcow2", image, size)
    s = nbdserver.qemu_nbd(image, "qcow2", sock=tmp_path / "target.sock",
                           allocation_depth=True, **kw).start()
    s.image = image
    return s


@pytest.mark.parametrize("service", ["https", "unix"])
def test_daemon_get_put_extents(daemon, tmp_path, service):
    import json
    from conftest import new_ticket
    s = _nbd_target(tmp_path)
    try:
        t = daemon.add_ticket(new_ticket(s.url("legacy"), 64 * MiB))
        path = "/images/" + t["uuid"]
        data = os.urandom(5 * MiB)
        conn = getattr(daemon, service)()
        conn.request("PUT", path, body=data,
                      headers={"Content-Range": "bytes {}-{}/*".format(
                          MiB, MiB + len(data) - 1)})
        r = conn.getresponse()
        assert r.status == 200, r.read()
        r.read()
        conn.request("GET", path, headers={"Range": "bytes={}-{}".format(
            MiB, MiB + len(data) - 1)})
        r = conn.getresponse()
        assert r.status == 206
        assert r.read() == data
        conn.request("PATCH", path, body=json.dumps(
            {"op": "zero", "offset": 2 * MiB, "size": MiB}))
        r = conn.getresponse()
        assert r.status == 200, r.read()
        r.read()
        conn.request("GET", path + "/extents")
        r = conn.getresponse()
        assert r.status == 200
        extents = json.loads(r.read())
        assert extents[0] == {"start": 0, "length": MiB, "zero": True,
                              "hole": True}
        assert extents[1] == {"start": MiB, "length": MiB, "zero": False,
                              "hole": False}
        assert extents[2]["start"] == 2 * MiB and extents[2]["zero"]
        assert not extents[2]["hole"]
        assert extents[-1]["hole"]
        conn.request("OPTIONS", path)
        r = conn.getresponse()
        options = json.loads(r.read())
        assert set(options["features"]) >= {"extents", "zero", "flush"}
        conn.close()
    finally:
        s.stop()


def test_daemon_nbd_server_unreachable(daemon, tmp_path):
    from conftest import new_ticket
    url = "nbd+unix:///x?socket={}".format(tmp_path / "missing.sock")
    t = daemon.add_ticket(new_ticket(url, MiB))
    conn = daemon.https()
    conn.request("GET", "/images/" + t["uuid"])
    r = conn.getresponse()
    body = r.read().decode()
    assert r.status >= 500
    # Why, not where: the socket path is for the log.
    assert "Cannot connect to NBD server" in body
    assert "missing.sock" not in body
    assert "missing.sock" in daemon.log()
    conn.close()


def test_established_client_round_trip(daemon, tmp_path):
    """ovirt-imageio 2.5.1's client uploads a qcow2 to an NBD target through
    the daemon and downloads it back."""
    import subprocess
    from conftest import new_ticket
    from bench import peers
    try:
        python = os.path.join(os.path.dirname(peers.ensure_established()),
                              "python")
    except peers.Unavailable as e:
        # The test command installs it; its absence is a failure, not a
        # reason to pass.
        pytest.fail("established client not installed: {}".format(e))
    source = tmp_path / "source.qcow2"
    nbdserver.qemu_img("create", "-f", "qcow2", source, "64M")
    nbdserver.qemu_io(source, "qcow2", "write -P 0x55 0 1M",
                      "write -P 0xaa 10M 3M", "write -z 20M 1M",
                      "write -P 0x11 63M 1M")
    s = _nbd_target(tmp_path)
    try:
        t = daemon.add_ticket(new_ticket(s.url(), 64 * MiB))
        url = "https://localhost:{}/images/{}".format(daemon.remote_port,
                                                       t["uuid"])

        def run(*args):
            r = subprocess.run([python, "-c", SCRIPT] + [str(a) for a in args],
                               capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr[-3000:]

        run("upload", url, source, daemon.ca_file)
        nbdserver.qemu_img("compare", "-U", source, s.image)
        download = tmp_path / "download.qcow2"
        run("download", url, download, daemon.ca_file, "qcow2")
        nbdserver.qemu_img("compare", source, download)
    finally:
        s.stop()


def test_concurrent_reads_on_one_backend(tmp_path):
    """The checksum reads one connection's backend from several worker
    threads at once: every read returns its own bytes and none hangs (two
    pumps polling one NBD socket each took the other's replies and waited
    for ever)."""
    import concurrent.futures
    import time
    size = 16 * MiB
    data = os.urandom(size)
    path = tmp_path / "disk.raw"
    path.write_bytes(data)
    srv = nbdserver.qemu_nbd(path, "raw", sock=str(tmp_path / "nbd.sock"))
    step = 256 * 1024
    with srv.start():
        backend = open_backend(srv.url(), ops=["read"])
        local = threading.local()

        def read(offset):
            b = getattr(local, "buf", None)
            if b is None:
                b = local.buf = AlignedBuffer(step)
            return offset, bytes(backend.readinto(b, offset, step))

        deadline = time.monotonic() + 60
        offsets = [(i * 7919 * 4096) % (size - step) for i in range(4000)]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            for f in concurrent.futures.as_completed(
                    [pool.submit(read, o) for o in offsets], timeout=60):
                offset, got = f.result()
                assert got == data[offset:offset + step]
        backend.close()
        assert time.monotonic() < deadline
