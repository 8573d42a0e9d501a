"""The images API on the NBD backend, end to end: real qemu-nbd and
nbdkit servers, the real daemon, real clients."""

import hashlib
import json
import os
import subprocess
import time

import pytest

from harness import nbdserver
from conftest import new_ticket, request

MiB = 1024**2


def connect(daemon, service):
    return daemon.https() if service == "remote" else daemon.unix()


@pytest.fixture
def raw_server(tmp_path):
    data = os.urandom(2 * MiB) + b"\0" * (2 * MiB) + os.urandom(MiB + 512)
    path = tmp_path / "disk.raw"
    path.write_bytes(data)
    srv = nbdserver.qemu_nbd(path, "raw", sock=str(tmp_path / "nbd.sock"))
    srv.start()
    yield srv, path, data
    srv.stop()


@pytest.mark.parametrize("form", ["legacy", "uri"])
def test_get_put_roundtrip(daemon, service, raw_server, form):
    srv, path, data = raw_server
    t = new_ticket(srv.url(form), len(data))
    daemon.add_ticket(t)
    con = connect(daemon, service)
    resp, body = request(con, "GET", "/images/" + t["uuid"])
    assert resp.status == 200 and body == data
    resp, body = request(con, "GET", "/images/" + t["uuid"], headers={
        "Range": "bytes=4095-{}".format(3 * MiB)})
    assert body == data[4095:3 * MiB + 1]
    payload = os.urandom(MiB + 3)
    resp, body = request(con, "PUT", "/images/" + t["uuid"], body=payload,
                         headers={"Content-Range": "bytes 7-{}/*".format(
                             7 + len(payload) - 1)})
    assert resp.status == 200, body
    expected = data[:7] + payload + data[7 + len(payload):]
    resp, body = request(con, "GET", "/images/" + t["uuid"])
    assert body == expected
    resp, body = request(con, "PATCH", "/images/" + t["uuid"], body=json.dumps(
        {"op": "zero", "offset": 100, "size": 5000, "flush": True}))
    assert resp.status == 200, body
    expected = expected[:100] + b"\0" * 5000 + expected[5100:]
    srv.stop()
    assert path.read_bytes() == expected


def test_options(daemon, raw_server):
    srv, path, data = raw_server
    t = new_ticket(srv.url(), len(data))
    daemon.add_ticket(t)
    con = daemon.https()
    resp, body = request(con, "OPTIONS", "/images/" + t["uuid"])
    info = json.loads(body)
    assert set(info["features"]) == {"extents", "zero", "flush", "checksum"}
    # qemu-nbd --shared=8 offers multi-conn for a writable raw export.
    assert info["max_readers"] >= 1
    assert info["max_writers"] >= 1


def test_extents_holes_qcow2_backing(daemon, tmp_path):
    base = str(tmp_path / "base.qcow2")
    top = str(tmp_path / "top.qcow2")
    nbdserver.qemu_img("create", "-f", "qcow2", base, "8M")
    nbdserver.qemu_io(base, "qcow2", "write -P 1 0 2M")
    nbdserver.qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2",
                       top)
    nbdserver.qemu_io(top, "qcow2", "write -P 2 4M 1M", "write -z 6M 1M")
    srv = nbdserver.qemu_nbd(top, "qcow2", sock=str(tmp_path / "s"),
                             allocation_depth=True)
    with srv.start():
        t = new_ticket(srv.url(), 8 * MiB)
        daemon.add_ticket(t)
        con = daemon.unix()
        resp, body = request(con, "GET", "/images/{}/extents".format(
            t["uuid"]))
        assert resp.status == 200, body
        extents = json.loads(body)
    # Covers the image in order.
    pos = 0
    for e in extents:
        assert e["start"] == pos
        pos += e["length"]
    assert pos == 8 * MiB

    def at(offset):
        return [e for e in extents
                if e["start"] <= offset < e["start"] + e["length"]][0]

    # Like the established service, "hole" means unallocated in the whole
    # chain (qemu:allocation-depth 0): data from the backing file is not a
    # hole.
    assert at(0)["hole"] is False and at(0)["zero"] is False
    assert at(3 * MiB)["hole"] is True and at(3 * MiB)["zero"] is True
    assert at(4 * MiB) == {"start": 4 * MiB, "length": MiB, "zero": False,
                           "hole": False}
    assert at(6 * MiB)["zero"] is True and at(6 * MiB)["hole"] is False
    assert at(7 * MiB)["hole"] is True and at(7 * MiB)["zero"] is True


def test_extents_dirty(daemon, tmp_path):
    img = str(tmp_path / "disk.qcow2")
    nbdserver.qemu_img("create", "-f", "qcow2", img, "8M")
    nbdserver.qemu_io(img, "qcow2", "write -P 1 0 1M")
    nbdserver.qemu_img("bitmap", "--add", img, "b0")
    nbdserver.qemu_io(img, "qcow2", "write -P 2 2M 64k", "write -P 3 5M 1M")
    srv = nbdserver.qemu_nbd(img, "qcow2", sock=str(tmp_path / "s"),
                             read_only=True, bitmap="b0")
    with srv.start():
        t = new_ticket(srv.url(), 8 * MiB, ops=["read"], dirty=True)
        daemon.add_ticket(t)
        con = daemon.https()
        resp, body = request(con, "GET",
                             "/images/{}/extents?context=dirty".format(
                                 t["uuid"]))
        assert resp.status == 200, body
        dirty = [(e["start"], e["length"]) for e in json.loads(body)
                 if e["dirty"]]
    assert (5 * MiB, MiB) in dirty
    assert any(s <= 2 * MiB < s + n for s, n in dirty)
    assert not any(s <= 0 < s + n for s, n in dirty)


def test_checksum_matches_file(daemon, raw_server):
    srv, path, data = raw_server
    t = new_ticket(srv.url(), len(data), ops=["read"])
    daemon.add_ticket(t)
    con = daemon.unix()
    resp, body = request(con, "GET", "/images/{}/checksum".format(t["uuid"]))
    outer = hashlib.blake2b(digest_size=32)
    for i in range(0, len(data), 4 * MiB):
        outer.update(hashlib.blake2b(data[i:i + 4 * MiB],
                                     digest_size=32).digest())
    assert json.loads(body)["checksum"] == outer.hexdigest()


def test_unreachable_server(daemon, tmp_path):
    t = new_ticket("nbd:unix:{}".format(tmp_path / "nosuch.sock"), MiB)
    daemon.add_ticket(t)
    con = daemon.https()
    resp, body = request(con, "GET", "/images/" + t["uuid"])
    assert resp.status in (500, 502)
    assert body.strip()
    # The daemon keeps serving.
    con = daemon.https()
    resp, _ = request(con, "GET", "/info/")
    assert resp.status == 200


def test_failed_open_frees_the_connection_slot(make_daemon, tmp_path):
    """A request whose NBD server is not there yet fails; the ticket's only
    connection slot is free again, so the retry on the same keep-alive
    connection (or a new one) is served once the server is up."""
    d = make_daemon("[daemon]\nmax_connections = 1\n")
    data = os.urandom(MiB)
    path = tmp_path / "disk.raw"
    path.write_bytes(data)
    sock = str(tmp_path / "nbd.sock")
    t = new_ticket("nbd:unix:{}".format(sock), len(data), ops=["read"])
    d.add_ticket(t)
    for _ in range(3):
        con = d.unix()
        resp, body = request(con, "GET", "/images/" + t["uuid"])
        assert resp.status in (500, 502), (resp.status, body)
        con.close()
    srv = nbdserver.qemu_nbd(path, "raw", sock=sock, read_only=True)
    with srv.start():
        con = d.unix()
        start = time.monotonic()
        resp, body = request(con, "GET", "/images/" + t["uuid"])
        assert resp.status == 200 and body == data
        # Served at once, not after waiting for a slot that leaked.
        assert time.monotonic() - start < 1.5
        con.close()


def test_server_killed_then_reconnect(daemon, tmp_path):
    data = os.urandom(64 * MiB)
    path = tmp_path / "disk.raw"
    path.write_bytes(data)
    sock = str(tmp_path / "s")
    srv = nbdserver.qemu_nbd(path, "raw", sock=sock)
    srv.start()
    t = new_ticket(srv.url(), len(data))
    daemon.add_ticket(t)
    con = daemon.unix()
    con.request("GET", "/images/" + t["uuid"])
    resp = con.getresponse()
    got = resp.read(MiB)
    srv.kill()
    received = len(got)
    try:
        while True:
            chunk = resp.read(MiB)
            if not chunk:
                break
            received += len(chunk)
    except Exception:
        pass
    # The client sees a cut transfer, never the whole image.
    assert received < len(data)
    con.close()
    # A new server on the same socket: the next request reconnects.
    srv = nbdserver.qemu_nbd(path, "raw", sock=sock)
    with srv.start():
        con = daemon.unix()
        deadline = time.monotonic() + 10
        while True:
            resp, body = request(con, "GET", "/images/" + t["uuid"],
                                 headers={"Range": "bytes=0-4095"})
            if resp.status == 206 or time.monotonic() > deadline:
                break
            con = daemon.unix()
            time.sleep(0.2)
        assert resp.status == 206
        assert body == data[:4096]


def test_error_filter_fails_request_not_daemon(daemon, tmp_path):
    srv = nbdserver.nbdkit("memory", "size=8M", "error-pread-rate=100%",
                           "error=EIO", sock=str(tmp_path / "s"),
                           filters=["error"])
    with srv.start():
        t = new_ticket(srv.url(), 8 * MiB)
        daemon.add_ticket(t)
        con = daemon.unix()
        # Headers may already be out when the read fails; then the
        # connection is cut and the client sees a short body.
        import http.client
        try:
            resp, body = request(con, "GET", "/images/" + t["uuid"],
                                 headers={"Range": "bytes=0-65535"})
        except http.client.IncompleteRead as e:
            assert len(e.partial) < 65536
        else:
            assert resp.status == 500
            assert body.strip()
        # Writes still work, and the daemon serves on.
        con = daemon.unix()
        resp, body = request(con, "PUT", "/images/" + t["uuid"],
                             body=b"x" * 4096)
        assert resp.status == 200, body


def test_established_client_roundtrip_nbd(daemon, tmp_path):
    from test_established_client import run_client
    from bench import peers
    python = os.path.join(os.path.dirname(peers.ensure_established()),
                          "python")
    src = str(tmp_path / "src.qcow2")
    nbdserver.qemu_img("create", "-f", "qcow2", src, "32M")
    nbdserver.qemu_io(src, "qcow2", "write -P 0x33 0 3M",
                      "write -P 0x44 17M 1M")
    dst = str(tmp_path / "dst.qcow2")
    nbdserver.qemu_img("create", "-f", "qcow2", dst, "32M")
    srv = nbdserver.qemu_nbd(dst, "qcow2", sock=str(tmp_path / "s"))
    with srv.start():
        t = new_ticket(srv.url("legacy"), 32 * MiB)
        daemon.add_ticket(t)
        url = "https://localhost:{}/images/{}".format(daemon.remote_port,
                                                       t["uuid"])
        run_client(python, "upload", url, src, daemon.ca_file)
        back = str(tmp_path / "back.qcow2")
        run_client(python, "download", url, back, daemon.ca_file, "qcow2")
    subprocess.run(["qemu-img", "compare", src, dst], check=True,
                   timeout=60)
    subprocess.run(["qemu-img", "compare", src, back], check=True,
                   timeout=60)


def test_sparse_zero_of_empty_image_allocates_nothing(daemon, tmp_path):
    """A restore zeroes what is not data.  On a sparse ticket, ranges that
    already read as zeroes are not rewritten, so an empty qcow2 stays small
    (a WRITE_ZEROES of every range would set the zero flag in every L2
    entry: 8 MiB of tables for 64 GiB); ranges holding data are zeroed."""
    size = 64 * 1024**3
    path = tmp_path / "empty.qcow2"
    nbdserver.qemu_img("create", "-f", "qcow2", path, str(size))
    srv = nbdserver.qemu_nbd(path, "qcow2", sock=str(tmp_path / "nbd.sock"))
    data = os.urandom(MiB)
    step = 128 * MiB
    with srv.start():
        t = new_ticket(srv.url(), size, sparse=True)
        daemon.add_ticket(t)
        con = daemon.unix()
        resp, body = request(con, "PUT", "/images/" + t["uuid"], body=data,
                             headers={"Content-Range": "bytes {}-{}/*".format(
                                 1024**3 + 5, 1024**3 + 5 + MiB - 1)})
        assert resp.status == 200, body
        for offset in range(0, size, step):
            resp, body = request(
                con, "PATCH", "/images/" + t["uuid"],
                body=json.dumps({"op": "zero", "offset": offset,
                                 "size": step, "flush": False}).encode(),
                headers={"Content-Type": "application/json"})
            assert resp.status == 200, (offset, body)
        resp, body = request(con, "PATCH", "/images/" + t["uuid"],
                             body=b'{"op": "flush"}',
                             headers={"Content-Type": "application/json"})
        assert resp.status == 200, body
        resp, body = request(con, "GET", "/images/" + t["uuid"], headers={
            "Range": "bytes={}-{}".format(1024**3, 1024**3 + 2 * MiB - 1)})
        assert resp.status == 206 and body == bytes(2 * MiB)
        con.close()
    # Header, L1 table, refcounts, one L2 table for the data written once.
    assert path.stat().st_size < 2 * MiB, path.stat().st_size
