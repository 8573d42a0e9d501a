"""The proxy backend: a daemon serving tickets whose url is another
imageio daemon.  Two real daemons on loopback."""

import hashlib
import json
import os
import socket

import pytest

from conftest import new_ticket, request
from harness.daemonproc import Daemon

MiB = 1024**2


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    """The daemon next to the storage."""
    d = Daemon(tmp_path_factory.mktemp("storage")).start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, storage):
    """A daemon relaying to ``storage``, trusting its CA."""
    d = Daemon(tmp_path_factory.mktemp("proxy"),
               "[backend_http]\nca_file = {}\n".format(storage.ca_file))
    d.start()
    yield d
    d.stop()


def make_pair(storage, proxy, tmp_path, data, ops=("read", "write"),
              **kw):
    path = tmp_path / "image.raw"
    path.write_bytes(data)
    remote = new_ticket("file://" + str(path), len(data), ops=ops, **kw)
    storage.add_ticket(remote)
    url = "https://localhost:{}/images/{}".format(storage.remote_port,
                                                   remote["uuid"])
    local = new_ticket(url, len(data), ops=ops)
    proxy.add_ticket(local)
    return path, remote, local


@pytest.fixture(params=["remote", "local"])
def con(request, proxy):
    c = proxy.https() if request.param == "remote" else proxy.unix()
    yield c
    c.close()


def test_options(storage, proxy, tmp_path, con):
    _, _, t = make_pair(storage, proxy, tmp_path, os.urandom(MiB))
    resp, body = request(con, "OPTIONS", "/images/" + t["uuid"])
    assert resp.status == 200
    info = json.loads(body)
    assert set(info["features"]) == {"extents", "zero", "flush", "checksum"}
    # The proxy's own local socket, not the remote one.
    assert info["unix_socket"] == proxy.local_socket
    assert info["max_readers"] >= 1


def test_get_ranges(storage, proxy, tmp_path, con):
    data = os.urandom(3 * MiB + 11)
    _, _, t = make_pair(storage, proxy, tmp_path, data)
    resp, body = request(con, "GET", "/images/" + t["uuid"])
    assert resp.status == 200 and body == data
    for first, last in [(0, 0), (4095, 4097), (MiB - 1, 3 * MiB + 10)]:
        resp, body = request(con, "GET", "/images/" + t["uuid"], headers={
            "Range": "bytes={}-{}".format(first, last)})
        assert resp.status == 206
        assert body == data[first:last + 1]


def test_put_zero_flush(storage, proxy, tmp_path, con):
    data = os.urandom(2 * MiB)
    path, _, t = make_pair(storage, proxy, tmp_path, data)
    payload = os.urandom(MiB + 3)
    resp, body = request(con, "PUT", "/images/" + t["uuid"], body=payload,
                         headers={"Content-Range": "bytes 5-{}/*".format(
                             5 + len(payload) - 1)})
    assert resp.status == 200, body
    expected = data[:5] + payload + data[5 + len(payload):]
    assert path.read_bytes() == expected
    resp, body = request(con, "PATCH", "/images/" + t["uuid"],
                         body=json.dumps({"op": "zero", "offset": 4096,
                                          "size": 8192, "flush": True}))
    assert resp.status == 200, body
    expected = expected[:4096] + b"\0" * 8192 + expected[4096 + 8192:]
    assert path.read_bytes() == expected
    resp, body = request(con, "PATCH", "/images/" + t["uuid"],
                         body=json.dumps({"op": "flush"}))
    assert resp.status == 200


def test_extents_and_checksum(storage, proxy, tmp_path, con):
    data = b"\0" * (4 * MiB) + os.urandom(MiB)
    path, remote, t = make_pair(storage, proxy, tmp_path, data)
    # Rewrite it sparse: the zero part becomes a hole.
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(4 * MiB)
        f.write(data[4 * MiB:])
    resp, body = request(con, "GET", "/images/{}/extents".format(t["uuid"]))
    assert resp.status == 200
    direct = storage.https()
    _, expected = request(direct, "GET", "/images/{}/extents".format(
        remote["uuid"]))
    assert json.loads(body) == json.loads(expected)
    # A piece: forwarded as a piece.
    query = "?start={}&length={}".format(4 * MiB - 5, 4097)
    resp, body = request(con, "GET", "/images/{}/extents{}".format(
        t["uuid"], query))
    assert json.loads(body) == [
        {"start": 4 * MiB - 5, "length": 5, "zero": True, "hole": False},
        {"start": 4 * MiB, "length": 4092, "zero": False, "hole": False}]
    resp, body = request(con, "GET", "/images/{}/checksum".format(t["uuid"]))
    outer = hashlib.blake2b(digest_size=32)
    for i in range(0, len(data), 4 * MiB):
        outer.update(hashlib.blake2b(data[i:i + 4 * MiB],
                                     digest_size=32).digest())
    assert json.loads(body)["checksum"] == outer.hexdigest()


def test_remote_errors_pass_through(storage, proxy, tmp_path, con):
    data = os.urandom(MiB)
    _, remote, t = make_pair(storage, proxy, tmp_path, data)
    # A range outside the image.
    resp, body = request(con, "GET", "/images/" + t["uuid"], headers={
        "Range": "bytes={}-".format(len(data))})
    assert resp.status == 416
    # The remote ticket deleted: 403 reaches the client.
    with storage.client() as c:
        c.del_ticket(remote["uuid"])
    c2 = proxy.https()
    resp, body = request(c2, "GET", "/images/" + t["uuid"])
    assert resp.status == 403
    assert b"Remote" in body


def test_remote_down(proxy, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = new_ticket("https://localhost:{}/images/x".format(port), MiB)
    proxy.add_ticket(t)
    con = proxy.https(timeout=30)
    resp, body = request(con, "GET", "/images/" + t["uuid"])
    assert resp.status == 502
    assert b"Cannot reach the remote imageio daemon" in body


def test_bad_ca(storage, tmp_path):
    # A proxy trusting another CA refuses the storage daemon.
    other = Daemon(tmp_path / "other").start()
    try:
        data = os.urandom(MiB)
        path = tmp_path / "img"
        path.write_bytes(data)
        remote = new_ticket("file://" + str(path), len(data))
        storage.add_ticket(remote)
        t = new_ticket("https://localhost:{}/images/{}".format(
            storage.remote_port, remote["uuid"]), len(data))
        other.add_ticket(t)
        con = other.https()
        resp, body = request(con, "GET", "/images/" + t["uuid"])
        assert resp.status == 502
        assert b"verify" in body
    finally:
        other.stop()


def test_large_transfer(storage, proxy, tmp_path, con):
    # Several buffers each way, unaligned: exercises the pipelined relay.
    data = os.urandom(20 * MiB + 4099)
    path, _, t = make_pair(storage, proxy, tmp_path, data)
    payload = os.urandom(17 * MiB + 5)
    resp, body = request(con, "PUT", "/images/" + t["uuid"], body=payload,
                         headers={"Content-Range": "bytes 4097-{}/*".format(
                             4097 + len(payload) - 1)})
    assert resp.status == 200, body
    expected = data[:4097] + payload + data[4097 + len(payload):]
    assert path.read_bytes() == expected
    resp, body = request(con, "GET", "/images/" + t["uuid"], headers={
        "Range": "bytes=1-{}".format(len(data) - 2)})
    assert resp.status == 206
    assert body == expected[1:-1]


def test_established_client_through_proxy(storage, proxy, tmp_path):
    """The established client uploads a qcow2 through the proxy to a raw
    file next to the storage daemon and downloads it back."""
    import subprocess
    import sys
    # Importable whether or not pytest collected tests/established first.
    sys.path.insert(0, os.path.join(os.path.dirname(__file__),
                                    "established"))
    from test_established_client import run_client
    from bench import peers
    python = os.path.join(os.path.dirname(peers.ensure_established()),
                          "python")
    src = str(tmp_path / "src.qcow2")
    subprocess.run(["qemu-img", "create", "-f", "qcow2", src, "48M"],
                   check=True, capture_output=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 5M",
                    "-c", "write -P 9 30M 2M", src],
                   check=True, capture_output=True)
    target = tmp_path / "target.raw"
    with open(target, "wb") as f:
        f.truncate(48 * MiB)
    remote = new_ticket("file://" + str(target), 48 * MiB)
    storage.add_ticket(remote)
    t = new_ticket("https://localhost:{}/images/{}".format(
        storage.remote_port, remote["uuid"]), 48 * MiB)
    proxy.add_ticket(t)
    url = "https://localhost:{}/images/{}".format(proxy.remote_port,
                                                   t["uuid"])
    run_client(python, "upload", url, src, proxy.ca_file)
    subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", src,
                    str(target)], check=True, timeout=60)
    back = str(tmp_path / "back.qcow2")
    run_client(python, "download", url, back, proxy.ca_file, "qcow2")
    subprocess.run(["qemu-img", "compare", src, back], check=True,
                   timeout=60)


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"this is not http\r\n\r\n",
    b"",
])
def test_remote_answers_nonsense(storage, proxy, answer):
    """A TLS server (trusted certificate) that answers garbage: the client
    gets a clear 502, and the proxy serves on."""
    import ssl
    import threading
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    pki = os.path.join(storage.confdir, "pki")
    ctx.load_cert_chain(os.path.join(pki, "cert.pem"),
                        os.path.join(pki, "key.pem"))
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(30)
    port = srv.getsockname()[1]

    def serve():
        try:
            c, _ = srv.accept()
            with ctx.wrap_socket(c, server_side=True) as s:
                s.settimeout(10)
                s.recv(65536)
                s.sendall(answer)
        except OSError:
            pass
        finally:
            srv.close()

    th = threading.Thread(target=serve)
    th.start()
    t = new_ticket("https://127.0.0.1:{}/images/x".format(port), MiB)
    proxy.add_ticket(t)
    con = proxy.https(timeout=60)
    resp, body = request(con, "GET", "/images/" + t["uuid"])
    th.join(30)
    assert resp.status == 502
    assert b"Remote imageio daemon" in body or b"remote imageio daemon" in body
    con = proxy.https()
    resp, _ = request(con, "GET", "/info/")
    assert resp.status == 200
