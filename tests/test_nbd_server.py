"""Tickets over NBD (imageio.nbd.server): the real daemon with real NBD
clients (qemu-img, qemu-io, nbdcopy, nbdinfo) over TLS and the unix
socket, byte for byte, and the protocol's edge cases through a raw-socket
client of our own (written from proto.md, not from imageio.nbd)."""

import hashlib
import os
import shutil
import socket
import struct
import subprocess
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import new_ticket
from imageio.admin import Error as admin_error
from harness.daemonproc import Daemon

MiB = 1024**2
SIZE = 64 * MiB


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    # [backend_http]: tickets proxied to this daemon itself trust its CA.
    d = Daemon(tmp_path_factory.mktemp("nbd"),
               "[nbd]\nenable = true\nport = 0\nsocket = run/nbd.sock\n"
               "[backend_http]\nca_file = pki/ca.pem\n")
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def cadir(daemon, tmp_path_factory):
    """The daemon's CA where libnbd and qemu look for it."""
    d = tmp_path_factory.mktemp("ca")
    shutil.copy(daemon.ca_file, str(d / "ca-cert.pem"))
    return str(d)


def image(tmp_path, data=b"", size=SIZE, name="disk.raw"):
    path = tmp_path / name
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(size)
    return str(path)


def add(daemon, path, size=SIZE, **kw):
    t = new_ticket("file://" + path, size, **kw)
    daemon.add_ticket(t)
    return t


def tls_url(daemon, t, cadir):
    return "nbds://localhost:{}/{}?tls-certificates={}".format(
        daemon.nbd_port, t["uuid"], cadir)


def unix_url(daemon, t):
    return "nbd+unix:///{}?socket={}".format(t["uuid"], daemon.nbd_socket)


def run(*args, timeout=120):
    r = subprocess.run([str(a) for a in args], capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# Real clients.

def test_qemu_img_convert_out_over_unix_and_tls(daemon, cadir, tmp_path):
    data = os.urandom(3 * MiB + 5)
    path = image(tmp_path, data)
    t = add(daemon, path, ops=["read"])
    out = str(tmp_path / "out.raw")
    run("qemu-img", "convert", "-f", "raw", "-O", "raw",
        unix_url(daemon, t), out)
    assert sha(out) == sha(path)
    os.unlink(out)
    run("qemu-img", "convert", "--object",
        "tls-creds-x509,id=tls0,dir={},endpoint=client".format(cadir),
        "--image-opts", "-O", "raw",
        "driver=raw,file.driver=nbd,file.host=localhost,file.port={},"
        "file.export={},file.tls-creds=tls0".format(daemon.nbd_port,
                                                   t["uuid"]), out)
    assert sha(out) == sha(path)


@pytest.mark.parametrize("way", ["unix", "tls"])
def test_qemu_img_convert_qcow2_into_ticket(daemon, cadir, tmp_path, way):
    src = str(tmp_path / "guest.qcow2")
    run("qemu-img", "create", "-f", "qcow2", src, SIZE)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x55 1M 2M",
        "-c", "write -P 0xaa 40M 1M", src)
    path = image(tmp_path)
    t = add(daemon, path, sparse=True)
    if way == "unix":
        run("qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", src,
            unix_url(daemon, t))
        run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", src,
            unix_url(daemon, t))
    else:
        # A guest into a ticket over nbds:// with x509 credentials.
        tls = "tls-creds-x509,id=tls0,dir={},endpoint=client".format(cadir)
        target = ("driver=raw,file.driver=nbd,file.host=localhost,"
                  "file.port={},file.export={},file.tls-creds=tls0".format(
                      daemon.nbd_port, t["uuid"]))
        run("qemu-img", "convert", "-n", "--object", tls, "-f", "qcow2",
            "--target-image-opts", src, target)
        run("qemu-img", "compare", "--object", tls, "--image-opts",
            "driver=qcow2,file.driver=file,file.filename=" + src, target)
    expect = str(tmp_path / "expect.raw")
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", src, expect)
    assert sha(path) == sha(expect)


def test_nbdcopy_both_ways_4_connections_tls(daemon, cadir, tmp_path):
    data = os.urandom(8 * MiB)
    src = image(tmp_path, data, name="src.raw")
    dst = image(tmp_path, name="dst.raw")
    t_src = add(daemon, src, ops=["read"])
    t_dst = add(daemon, dst)
    local = str(tmp_path / "local.raw")
    run("nbdcopy", "--connections=4", tls_url(daemon, t_src, cadir), local)
    assert sha(local) == sha(src)
    run("nbdcopy", "--connections=4", local, tls_url(daemon, t_dst, cadir))
    assert sha(dst) == sha(src)


def test_nbdinfo_map_shows_holes(daemon, tmp_path):
    path = image(tmp_path, os.urandom(MiB))
    t = add(daemon, path, ops=["read"])
    out = run("nbdinfo", "--map", unix_url(daemon, t))
    rows = [line.split() for line in out.splitlines() if line.strip()]
    assert rows[0][:3] == ["0", str(MiB), "0"]
    assert rows[1][:3] == [str(MiB), str(SIZE - MiB), "3"]
    assert "hole,zero" in out


def test_qemu_io_odd_offsets(daemon, tmp_path):
    path = image(tmp_path)
    t = add(daemon, path)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x33 4097 1000",
        "-c", "read -P 0x33 4097 1000", "-c", "read -P 0 0 4097",
        unix_url(daemon, t))
    with open(path, "rb") as f:
        f.seek(4097)
        assert f.read(1000) == b"\x33" * 1000


# A raw client, from proto.md.

class Raw:
    """A fixed newstyle NBD client over a socket, for what real clients
    never send."""

    def __init__(self, sock):
        self.sock = sock
        hello = self.recv(18)
        assert hello[:16] == b"NBDMAGICIHAVEOPT"
        self.sock.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE|NO_ZEROES

    def recv(self, n):
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed after {} bytes".format(len(out)))
            out += chunk
        return out

    def option(self, opt, data=b""):
        self.sock.sendall(b"IHAVEOPT" + struct.pack(">II", opt, len(data))
                          + data)
        replies = []
        while True:
            magic, ropt, rtype, length = struct.unpack(">QIII",
                                                       self.recv(20))
            assert magic == 0x3e889045565a9 and ropt == opt
            replies.append((rtype, self.recv(length)))
            if rtype == 1 or rtype & 2**31:  # ACK or an error.
                return replies

    def go(self, name):
        data = struct.pack(">I", len(name)) + name.encode() + \
            struct.pack(">H", 0)
        return self.option(7, data)

    def request(self, kind, offset, length, flags=0, payload=b"",
                cookie=1):
        self.sock.sendall(struct.pack(">IHHQQI", 0x25609513, flags, kind,
                                      cookie, offset, length) + payload)
        magic, error, rcookie = struct.unpack(">IIQ", self.recv(16))
        assert magic == 0x67446698 and rcookie == cookie
        return error


def connect_tcp(daemon):
    s = socket.create_connection(("localhost", daemon.nbd_port), timeout=20)
    return Raw(s)


def connect_unix(daemon):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(daemon.nbd_socket)
    return Raw(s)


def test_tls_required_before_anything(daemon, tmp_path):
    t = add(daemon, image(tmp_path), ops=["read"])
    c = connect_tcp(daemon)
    with c.sock:
        (rtype, msg), = c.go(t["uuid"])
        assert rtype == 2**31 + 5  # NBD_REP_ERR_TLS_REQD
        assert b"TLS" in msg
        (rtype, _), = c.option(3)  # LIST: TLS first too.
        assert rtype == 2**31 + 5


def test_wrong_export_refused_with_message(daemon):
    c = connect_unix(daemon)
    with c.sock:
        (rtype, msg), = c.go("no-such-ticket")
        assert rtype == 2**31 + 6  # NBD_REP_ERR_UNKNOWN
        assert b"No such ticket" in msg
        # LIST reveals no ticket.
        assert c.option(3) == [(1, b"")]


def test_read_only_write_eperm_connection_lives(daemon, tmp_path):
    data = os.urandom(MiB)
    path = image(tmp_path, data)
    t = add(daemon, path, ops=["read"])
    c = connect_unix(daemon)
    with c.sock:
        replies = c.go(t["uuid"])
        assert replies[-1][0] == 1
        export = [r for r in replies if r[0] == 3 and r[1][:2] == b"\0\0"]
        size, flags = struct.unpack(">QH", export[0][1][2:12])
        assert size == SIZE and flags & 2  # READ_ONLY
        assert c.request(1, 0, 4096, payload=b"x" * 4096) == 1  # EPERM
        assert c.request(0, 0, 4096) == 0
        assert c.recv(4096) == data[:4096]
    with open(path, "rb") as f:
        assert f.read(MiB) == data


def test_past_end_and_oversized(daemon, tmp_path):
    path = image(tmp_path)
    t = add(daemon, path)
    c = connect_unix(daemon)
    with c.sock:
        assert c.go(t["uuid"])[-1][0] == 1
        assert c.request(0, SIZE - 10, 20) == 22          # EINVAL
        assert c.request(1, SIZE - 10, 20, payload=b"y" * 20) == 28  # ENOSPC
        assert c.request(0, 0, 64 * MiB) == 22            # over the maximum
        assert c.request(7 + 20, 0, 10) == 22             # unknown command
        assert c.request(0, 0, 512, flags=1 << 9) == 22   # unknown flag
        assert c.request(0, 0, 512) == 0                  # still serving
        c.recv(512)
    with open(path, "rb") as f:
        assert f.read().count(b"\0") == SIZE


def test_truncated_payload_writes_nothing_others_served(daemon, tmp_path):
    path = image(tmp_path)
    t = add(daemon, path)
    c = connect_unix(daemon)
    c.go(t["uuid"])
    c.sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 9, 0, MiB)
                   + b"z" * 1000)
    c.sock.close()
    other = connect_unix(daemon)
    with other.sock:
        assert other.go(t["uuid"])[-1][0] == 1
        assert other.request(0, 0, 4096) == 0
        assert other.recv(4096) == b"\0" * 4096


def test_garbage_handshake_does_not_hurt_others(daemon, tmp_path):
    import random
    rnd = random.Random(7)
    t = add(daemon, image(tmp_path, b"ok" * 2048), ops=["read"])
    for _ in range(30):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(daemon.nbd_socket)
        try:
            s.recv(18)
            s.sendall(bytes(rnd.randrange(256)
                            for _ in range(rnd.randrange(1, 200))))
            s.recv(100)
        except OSError:
            pass
        finally:
            s.close()
    c = connect_unix(daemon)
    with c.sock:
        assert c.go(t["uuid"])[-1][0] == 1
        assert c.request(0, 0, 4) == 0
        assert c.recv(4) == b"okok"


# A malformed handshake: the client's flags, then option frames whose
# ids, lengths and data hypothesis chooses (lengths that lie about the data
# included), or plain bytes.
_frames = st.lists(st.one_of(
    st.builds(lambda opt, data, lie: b"IHAVEOPT" + struct.pack(
        ">II", opt, max(0, len(data) + lie)) + data,
        st.sampled_from([1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 0, 2**31, 2**32 - 1]),
        st.binary(max_size=80), st.integers(-8, 8)),
    st.binary(min_size=1, max_size=64)), min_size=1, max_size=4)


def test_fuzzed_handshake_does_not_hurt_others(daemon, tmp_path):
    t = add(daemon, image(tmp_path, b"ok" * 2048), ops=["read"])
    # A client in the middle of its transfer all along.
    held = connect_unix(daemon)
    assert held.go(t["uuid"])[-1][0] == 1

    @settings(max_examples=60, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(flags=st.binary(min_size=4, max_size=4), frames=_frames)
    def one(flags, frames):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        try:
            s.connect(daemon.nbd_socket)
            s.recv(18)
            s.sendall(flags + b"".join(frames))
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
        except OSError:
            pass
        finally:
            s.close()
        assert held.request(0, 0, 4) == 0
        assert held.recv(4) == b"okok"

    one()
    with held.sock:
        assert held.request(0, 4, 4) == 0
        assert held.recv(4) == b"okok"


def test_delete_waits_for_nbd_writer_then_refuses(daemon, tmp_path):
    path = image(tmp_path)
    t = add(daemon, path)
    c = connect_unix(daemon)
    assert c.go(t["uuid"])[-1][0] == 1
    assert c.request(1, 0, 4096, payload=b"w" * 4096) == 0
    with daemon.client() as admin:
        assert admin.get_ticket(t["uuid"])["connections"] == 1
        admin.del_ticket(t["uuid"])
    # The idle NBD connection was closed by the DELETE.
    with pytest.raises((ConnectionError, OSError)):
        c.request(0, 0, 4096)
    c.sock.close()
    c = connect_unix(daemon)
    with c.sock:
        assert c.go(t["uuid"])[0][0] == 2**31 + 6


def test_expired_ticket_gets_error_and_close(daemon, tmp_path):
    path = image(tmp_path)
    t = add(daemon, path)
    c = connect_unix(daemon)
    with c.sock:
        assert c.go(t["uuid"])[-1][0] == 1
        with daemon.client() as admin:
            admin.mod_ticket(t["uuid"], {"timeout": 0})
        assert c.request(0, 0, 4096) == 108  # ESHUTDOWN
        with pytest.raises((ConnectionError, OSError)):
            c.request(0, 0, 4096)


def test_transferred_counted_like_http(daemon, tmp_path):
    path = image(tmp_path, os.urandom(2 * MiB))
    t = add(daemon, path, ops=["read"])
    out = str(tmp_path / "o.raw")
    run("nbdcopy", unix_url(daemon, t), out)
    deadline = time.monotonic() + 10
    while True:
        with daemon.client() as admin:
            info = admin.get_ticket(t["uuid"])
        if not info["connections"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert info["transferred"] >= 2 * MiB


def test_options_advertise_the_nbd_endpoint(daemon, tmp_path):
    import json
    t = add(daemon, image(tmp_path), ops=["read"])
    con = daemon.unix(timeout=20)
    con.request("OPTIONS", "/images/" + t["uuid"])
    info = json.loads(con.getresponse().read())
    con.close()
    assert info["nbd"] == {"port": daemon.nbd_port, "tls": True,
                           "socket": daemon.nbd_socket}
    # What a client builds from it reaches the ticket.
    out = run("nbdinfo", "--size", "nbd+unix:///{}?socket={}".format(
        t["uuid"], info["nbd"]["socket"]))
    assert int(out) == SIZE


def test_metrics_count_nbd_requests(daemon, tmp_path):
    import urllib.request  # noqa: F401 (the control socket is unix)
    t = add(daemon, image(tmp_path, os.urandom(MiB)), ops=["read"])
    run("nbdcopy", unix_url(daemon, t), str(tmp_path / "o.raw"))
    con = daemon.control(timeout=20)
    con.request("GET", "/metrics")
    text = con.getresponse().read().decode()
    con.close()
    reads = [line for line in text.splitlines()
             if line.startswith("imageio_http_requests_total")
             and 'service="nbd-local"' in line and 'method="READ"' in line]
    assert reads and float(reads[0].rsplit(" ", 1)[1]) >= 1
    assert 'imageio_connections{service="nbd-local"}' in text


# ovirt-img --transport nbd: the data over the NBD endpoint, verified.

def ovirt_img(*args):
    import sys
    r = subprocess.run([sys.executable, "-m", "imageio.client.cli"]
                       + [str(a) for a in args], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_nbd_path_over_tls(daemon, tmp_path):
    # Not on the daemon's host (no unix socket): NBD over TCP with TLS,
    # verified with the same CA file as HTTPS.
    from imageio.backends.http import HTTPBackend
    from imageio.client.nbd_transport import NbdPath
    path = image(tmp_path)
    t = add(daemon, path)
    http = HTTPBackend("https://localhost:{}/images/{}".format(
        daemon.remote_port, t["uuid"]), cafile=daemon.ca_file,
        use_unix_socket=False)
    p = NbdPath(http, daemon.ca_file)
    try:
        assert p._url.startswith("nbds://localhost:{}/".format(
            daemon.nbd_port))
        data = os.urandom(MiB)
        p.put_with(4096, MiB, lambda sink: sink.write(data), flush=True)
        got = bytearray(MiB)

        def recv(source):
            view = memoryview(got)
            while source.remaining:
                source.readinto(view[MiB - source.remaining:])

        p.get_with(4096, MiB, recv)
        assert bytes(got) == data
        clone = p.clone()
        clone.zero(4096, 4096, False)
        clone.flush()
        clone.close()
    finally:
        p.close()
    with open(path, "rb") as f:
        f.seek(4096)
        assert f.read(MiB) == b"\0" * 4096 + data[4096:]


@pytest.mark.parametrize("where", ["https", "local"])
def test_ovirt_img_transport_nbd(daemon, tmp_path, where):
    src = str(tmp_path / "guest.qcow2")
    run("qemu-img", "create", "-f", "qcow2", src, SIZE)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 3M",
        "-c", "write -z 8M 1M", "-c", "write -P 0xa5 60M 1M", src)
    path = image(tmp_path)
    t = add(daemon, path)
    if where == "https":
        url = "https://127.0.0.1:{}/images/{}".format(daemon.remote_port,
                                                     t["uuid"])
    else:
        url = "https://localhost:{}/images/{}".format(daemon.remote_port,
                                                     t["uuid"])
    ovirt_img("upload", src, url, "--cafile", daemon.ca_file,
              "--transport", "nbd")
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", src, path)
    out = str(tmp_path / "back.qcow2")
    ovirt_img("download", url, out, "--cafile", daemon.ca_file,
              "--transport", "nbd")
    run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", src, out)
    # The data went over NBD.
    assert "serving ticket {}".format(t["uuid"][:8]) in daemon.log()


@pytest.mark.parametrize("backend", ["file", "nbd", "https"])
def test_every_backend_serves_nbd_clients(daemon, tmp_path, backend):
    # qemu-img writes a guest into the ticket over NBD and reads it back,
    # whatever holds the image: a file, an NBD export (qemu-nbd over a
    # qcow2), another imageio ticket over HTTPS (the proxy backend).
    from harness import nbdserver
    size = 16 * MiB
    src = str(tmp_path / "guest.raw")
    with open(src, "wb") as f:
        f.truncate(size)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 4097 3M",
        "-c", "write -P 0xa5 9M 1M", src)
    srv = None
    if backend == "file":
        store = image(tmp_path, size=size, name="store.raw")
        t = add(daemon, store, size=size)
    elif backend == "nbd":
        store = str(tmp_path / "store.qcow2")
        run("qemu-img", "create", "-f", "qcow2", store, size)
        srv = nbdserver.qemu_nbd(store, "qcow2", sock=str(tmp_path / "q"))
        srv.start()
        t = new_ticket(srv.url(), size)
        daemon.add_ticket(t)
    else:
        store = image(tmp_path, size=size, name="store.raw")
        inner = add(daemon, store, size=size)
        t = new_ticket("https://localhost:{}/images/{}".format(
            daemon.remote_port, inner["uuid"]), size)
        daemon.add_ticket(t)
    try:
        url = unix_url(daemon, t)
        run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, url)
        out = str(tmp_path / "back.raw")
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", url, out)
        assert sha(out) == sha(src)
        with daemon.client() as admin:
            admin.del_ticket(t["uuid"])
        fmt = "qcow2" if backend == "nbd" else "raw"
        if srv is not None:
            srv.stop()
            srv = None
        run("qemu-img", "compare", "-f", "raw", "-F", fmt, src, store)
    finally:
        if srv is not None:
            srv.stop()


def test_nbdinfo_map_dirty_bitmap_of_dirty_ticket(daemon, tmp_path):
    # A dirty ticket over an NBD export with a bitmap: its clients see
    # qemu:dirty-bitmap:NAME, as an incremental backup reads it.
    from harness import nbdserver
    img = str(tmp_path / "disk.qcow2")
    nbdserver.qemu_img("create", "-f", "qcow2", img, "8M")
    nbdserver.qemu_io(img, "qcow2", "write -P 1 0 1M")
    nbdserver.qemu_img("bitmap", "--add", img, "b0")
    nbdserver.qemu_io(img, "qcow2", "write -P 3 5M 1M")
    srv = nbdserver.qemu_nbd(img, "qcow2", sock=str(tmp_path / "s"),
                             read_only=True, bitmap="b0")
    with srv.start():
        t = new_ticket(srv.url(), 8 * MiB, ops=["read"], dirty=True)
        daemon.add_ticket(t)
        url = unix_url(daemon, t)
        out = run("nbdinfo", "--map=qemu:dirty-bitmap:b0", url)
        rows = [line.split() for line in out.splitlines() if line.strip()]
        dirty = [(int(r[0]), int(r[1])) for r in rows if r[2] == "1"]
        assert dirty == [(5 * MiB, MiB)], out
        # And the allocation map beside it.
        assert "data" in run("nbdinfo", "--map", url)


def test_idle_and_half_open_connections_cost_no_threads(daemon, tmp_path):
    # 200 clients that connect and stop after the greeting, or in the
    # middle of an option: file descriptors, not threads; a ticket holder
    # is still served.
    def threads():
        with open("/proc/{}/status".format(daemon.proc.pid)) as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1])

    t = add(daemon, image(tmp_path, b"ok" * 2048), ops=["read"])
    time.sleep(6)  # Idle workers of earlier tests exit.
    before = threads()
    socks = []
    try:
        for i in range(200):
            s = socket.socket(socket.AF_UNIX)
            s.connect(daemon.nbd_socket)
            if i % 2:
                s.sendall(struct.pack(">I", 3) + b"IHAVEOPT")  # Half.
            socks.append(s)
        time.sleep(0.5)
        assert threads() < before + 10
        c = connect_unix(daemon)
        with c.sock:
            assert c.go(t["uuid"])[-1][0] == 1
            assert c.request(0, 0, 4) == 0
            assert c.recv(4) == b"okok"
    finally:
        for s in socks:
            s.close()


# libnbd's Python bindings (python3-libnbd, Debian's python3): requests
# pipelined on one connection, as nbdcopy and qemu send them.

LIBNBD_PYTHON = "/usr/bin/python3"

PIPELINED = r'''
import os, random, sys, nbd
url, size, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sparse = sys.argv[4] == "True"
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(url)
assert h.get_size() == size
assert h.can_multi_conn() and h.can_zero()
# TRIM only on sparse tickets.
assert h.can_trim() == sparse
rng = random.Random(7)
expect = bytearray(size)
# 256 requests, up to 64 in flight: writes at odd offsets and lengths,
# zeroes and trims between them, none overlapping another in flight.
slots = list(range(0, size, 128 * 1024))
rng.shuffle(slots)
pending = []
for i, base in enumerate(slots[:256]):
    off = base + rng.randrange(0, 4096)
    n = rng.randrange(1, 120 * 1024)
    kind = rng.choice("wwwwzt" if sparse else "wwwwz")
    if kind == "w":
        data = os.urandom(n)
        expect[off:off + n] = data
        pending.append(h.aio_pwrite(data, off))
    elif kind == "z":
        expect[off:off + n] = bytes(n)
        pending.append(h.aio_zero(n, off))
    else:
        expect[off:off + n] = bytes(n)
        pending.append(h.aio_trim(n, off))
    while h.aio_in_flight() >= 64:
        h.poll(-1)
while h.aio_in_flight():
    h.poll(-1)
for cookie in pending:
    assert h.aio_command_completed(cookie)
h.flush()
# Read it all back, 32 reads in flight, and with one synchronous read.
bufs = []
for off in range(0, size, 1024 * 1024):
    buf = nbd.Buffer(1024 * 1024)
    bufs.append((off, buf, h.aio_pread(buf, off)))
while h.aio_in_flight():
    h.poll(-1)
got = bytearray(size)
for off, buf, cookie in bufs:
    assert h.aio_command_completed(cookie)
    got[off:off + 1024 * 1024] = buf.to_bytearray()
assert got == expect, "pipelined reads differ"
assert h.pread(16 * 1024 * 1024, 3) == expect[3:3 + 16 * 1024 * 1024]
h.shutdown()
with open(out, "wb") as f:
    f.write(expect)
print("ok")
'''


def libnbd(script, *args, timeout=120):
    return subprocess.run([LIBNBD_PYTHON, "-c", script] + [str(a) for a in
                                                           args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("sparse", [True, False])
def test_libnbd_pipelined_requests_byte_for_byte(daemon, tmp_path, sparse):
    size = 40 * MiB
    path = image(tmp_path, size=size)
    t = add(daemon, path, size=size, sparse=sparse)
    want = tmp_path / "want.raw"
    r = libnbd(PIPELINED, unix_url(daemon, t), size, want, sparse)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
    # What the daemon wrote is what the client meant, byte for byte.
    assert sha(path) == sha(want)


CANCELED = r'''
import os, sys, time, nbd
url, size, started = sys.argv[1], int(sys.argv[2]), sys.argv[3]
h = nbd.NBD()
h.connect_uri(url)
data = os.urandom(1024 * 1024)
errors = 0
off = 0
t0 = time.monotonic()
try:
    while time.monotonic() - t0 < 60:
        h.aio_pwrite(data, off % size)
        off += len(data)
        if off == 8 * len(data):
            open(started, "w").close()
        while h.aio_in_flight() >= 16:
            h.poll(-1)
    print("never canceled")
except nbd.Error as e:
    print("stopped:", e)
'''


def test_delete_mid_transfer_stops_the_nbd_writer(daemon, tmp_path):
    size = 64 * MiB
    path = image(tmp_path, size=size)
    t = add(daemon, path, size=size)
    started = tmp_path / "started"
    proc = subprocess.Popen(
        [LIBNBD_PYTHON, "-c", CANCELED, unix_url(daemon, t), str(size),
         str(started)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        deadline = time.monotonic() + 30
        while not started.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        with daemon.client() as admin:
            # DELETE returns once the writer's connection is gone.
            admin.del_ticket(t["uuid"])
            with pytest.raises(admin_error):
                admin.get_ticket(t["uuid"])
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out.startswith("stopped:"), (out, err[-2000:])
    # The daemon serves the next client.
    t2 = add(daemon, image(tmp_path, b"next", name="next.raw"))
    c = connect_unix(daemon)
    with c.sock:
        assert c.go(t2["uuid"])[-1][0] == 1
