"""The images API on the file backend, through a real daemon, over HTTPS
(remote service) and the unix socket (local service)."""

import hashlib
import json
import os
import socket
import subprocess
import threading
import time

import pytest

from conftest import request, add, connect, new_ticket

MiB = 1024**2


def make_image(tmp_path, size, data=None, name="image.raw"):
    path = tmp_path / name
    with open(path, "wb") as f:
        if data:
            f.write(data)
        f.truncate(size)
    return path


@pytest.fixture
def image(tmp_path):
    # 3 MiB + 5 bytes: not a multiple of the block size.
    data = os.urandom(3 * MiB + 5)
    path = make_image(tmp_path, len(data), data)
    return path, data


# OPTIONS

def test_options_writable(daemon, service, image):
    path, data = image
    t = add(daemon, path, len(data))
    con = connect(daemon, service)
    resp, body = request(con, "OPTIONS", "/images/" + t["uuid"])
    assert resp.status == 200
    assert resp.getheader("Allow") == "OPTIONS,GET,PUT,PATCH"
    assert resp.getheader("Access-Control-Allow-Origin") == "*"
    info = json.loads(body)
    assert set(info["features"]) == {"extents", "zero", "flush", "checksum"}
    assert info["unix_socket"] == daemon.local_socket
    assert info["max_readers"] >= 1 and info["max_writers"] >= 1


def test_options_readonly(daemon, service, image):
    path, data = image
    t = add(daemon, path, len(data), ops=["read"])
    con = connect(daemon, service)
    resp, body = request(con, "OPTIONS", "/images/" + t["uuid"])
    assert resp.status == 200
    assert resp.getheader("Allow") == "OPTIONS,GET"
    info = json.loads(body)
    assert "zero" not in info["features"]
    assert "extents" in info["features"]


def test_options_server(daemon, service):
    con = connect(daemon, service)
    resp, body = request(con, "OPTIONS", "/images/*")
    assert resp.status == 200
    assert set(json.loads(body)["features"]) == {
        "extents", "zero", "flush", "checksum"}


# GET

def test_get_whole(daemon, service, image):
    path, data = image
    t = add(daemon, path, len(data), filename="disk.raw")
    con = connect(daemon, service)
    resp, body = request(con, "GET", "/images/" + t["uuid"])
    assert resp.status == 200
    assert body == data
    assert resp.getheader("Content-Type") == "application/octet-stream"
    assert resp.getheader("Content-Disposition") == \
        'attachment; filename="disk.raw"'
    assert resp.getheader("Access-Control-Allow-Origin") == "*"


@pytest.mark.parametrize("name,expected", [
    ("диск.raw", "attachment; filename=\"____.raw\"; "
     "filename*=UTF-8''%D0%B4%D0%B8%D1%81%D0%BA.raw"),
    ('a "b" c.raw', "attachment; filename=\"a _b_ c.raw\"; "
     "filename*=UTF-8''a%20%22b%22%20c.raw"),
    ("back\\slash", "attachment; filename=\"back_slash\"; "
     "filename*=UTF-8''back%5Cslash"),
])
def test_get_unicode_filename(daemon, service, image, name, expected):
    # RFC 6266: an ASCII fallback and the UTF-8 name; outside Latin-1 the
    # daemon once dropped the connection without a response.
    path, data = image
    t = add(daemon, path, len(data), filename=name)
    con = connect(daemon, service)
    resp, body = request(con, "GET", "/images/" + t["uuid"],
                         headers={"Range": "bytes=0-99"})
    assert resp.status == 206 and body == data[:100]
    assert resp.getheader("Content-Disposition") == expected


def test_filename_with_crlf_refused(daemon, image):
    # A header injection at ticket add: 400, and no ticket.
    path, data = image
    t = new_ticket("file://" + str(path), len(data),
                   filename="disk.raw\r\nX-Injected: yes")
    con = daemon.control()
    resp, body = request(con, "PUT", "/tickets/" + t["uuid"],
                         body=json.dumps(t))
    assert resp.status == 400 and b"filename" in body
    resp, _ = request(con, "GET", "/tickets/" + t["uuid"])
    assert resp.status == 404


@pytest.mark.parametrize("first,last", [
    (0, 0), (1, 1), (0, 4094), (1, 4096), (4095, 4096), (4097, 8191),
    (0, MiB), (MiB - 1, 2 * MiB + 1), (3 * MiB, 3 * MiB + 4),
])
def test_get_range(daemon, service, image, first, last):
    path, data = image
    t = add(daemon, path, len(data))
    con = connect(daemon, service)
    resp, body = request(con, "GET", "/images/" + t["uuid"], headers={
        "Range": "bytes={}-{}".format(first, last)})
    assert resp.status == 206
    assert resp.getheader("Content-Range") == "bytes {}-{}/{}".format(
        first, last, len(data))
    assert body == data[first:last + 1]


def test_get_open_range(daemon, service, image):
    path, data = image
    t = add(daemon, path, len(data))
    con = connect(daemon, service)
    resp, body = request(con, "GET", "/images/" + t["uuid"], headers={
        "Range": "bytes=4097-"})
    assert resp.status == 206
    assert body == data[4097:]


@pytest.mark.parametrize("value", [
    "bytes=0-1,3-4", "bytes=-100", "bytes={size}-", "bytes={size}-{size}",
])
def test_get_bad_range(daemon, service, image, value):
    path, data = image
    t = add(daemon, path, len(data))
    con = connect(daemon, service)
    resp, body = request(con, "GET", "/images/" + t["uuid"], headers={
        "Range": value.format(size=len(data))})
    assert resp.status == 416
    assert resp.getheader("Content-Range") == "bytes */{}".format(len(data))
    assert body.strip()


def test_get_range_past_end_is_the_rest(daemon, service, image):
    # RFC 9110 14.1.2; nbdkit's curl plugin asks one byte too many for
    # the last block.
    path, data = image
    t = add(daemon, path, len(data))
    con = connect(daemon, service)
    first = len(data) - 5000
    resp, body = request(con, "GET", "/images/" + t["uuid"], headers={
        "Range": "bytes={}-{}".format(first, len(data))})
    assert resp.status == 206
    assert resp.getheader("Content-Range") == "bytes {}-{}/{}".format(
        first, len(data) - 1, len(data))
    assert body == data[first:]


def test_get_ticket_size_limits_access(daemon, service, image):
    path, data = image
    t = add(daemon, path, 8192)
    con = connect(daemon, service)
    resp, body = request(con, "GET", "/images/" + t["uuid"])
    assert body == data[:8192]
    resp, body = request(con, "GET", "/images/" + t["uuid"], headers={
        "Range": "bytes=8192-8192"})
    assert resp.status == 416


def test_get_zero_size(daemon, service, tmp_path):
    path = make_image(tmp_path, 0)
    t = add(daemon, path, 0)
    con = connect(daemon, service)
    resp, body = request(con, "GET", "/images/" + t["uuid"])
    assert resp.status == 200
    assert body == b""


# Access

@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "OPTIONS"])
def test_no_ticket(daemon, service, method):
    con = connect(daemon, service)
    resp, body = request(con, method, "/images/no-such-ticket", body=b"")
    assert resp.status == 403
    assert b"No such ticket" in body
    # And the connection is closed.
    assert resp.getheader("Connection") == "close"


def test_expired_ticket(daemon, service, image):
    path, data = image
    t = add(daemon, path, len(data))
    with daemon.client() as c:
        c.mod_ticket(t["uuid"], {"timeout": 0})
    con = connect(daemon, service)
    resp, body = request(con, "GET", "/images/" + t["uuid"])
    assert resp.status == 403
    assert b"expired" in body


def test_readonly_ticket_refuses_write(daemon, service, image):
    path, data = image
    t = add(daemon, path, len(data), ops=["read"])
    con = connect(daemon, service)
    resp, body = request(con, "PUT", "/images/" + t["uuid"], body=b"x")
    assert resp.status == 403
    assert b"does not allow write" in body
    con = connect(daemon, service)
    resp, body = request(con, "PATCH", "/images/" + t["uuid"],
                         body=json.dumps({"op": "flush"}))
    assert resp.status == 403
    assert open(path, "rb").read() == data


def test_readonly_ticket_refuses_zero_keeps_reading(daemon, service, image):
    path, data = image
    t = add(daemon, path, len(data), ops=["read"])
    con = connect(daemon, service)
    resp, body = request(con, "PATCH", "/images/" + t["uuid"],
                         body=json.dumps({"op": "zero", "size": 4096}))
    assert resp.status == 403
    assert b"does not allow write" in body
    # Reading is what the ticket allows: it still works.
    con = connect(daemon, service)
    for suffix in ("", "/extents", "/checksum"):
        resp, _ = request(con, "GET", "/images/" + t["uuid"] + suffix)
        assert resp.status == 200, suffix
    assert open(path, "rb").read() == data


# HEAD

@pytest.mark.parametrize("ops", [["read"], ["read", "write"]])
def test_head(daemon, service, image, ops):
    path, data = image
    t = add(daemon, path, len(data), ops=ops, filename="disk.raw")
    con = connect(daemon, service)
    resp, body = request(con, "HEAD", "/images/" + t["uuid"])
    assert resp.status == 200
    assert body == b""
    assert resp.getheader("Content-Length") == str(len(data))
    assert resp.getheader("Accept-Ranges") == "bytes"
    assert resp.getheader("Access-Control-Allow-Origin") == "*"
    assert resp.getheader("Content-Disposition") == \
        'attachment; filename="disk.raw"'
    # No body was sent: the next response on the connection is intact.
    resp, body = request(con, "GET", "/images/" + t["uuid"],
                         headers={"Range": "bytes=0-9"})
    assert resp.status == 206
    assert resp.getheader("Accept-Ranges") == "bytes"
    assert body == data[:10]


def test_head_range_and_errors_have_no_body(daemon, service, image):
    path, data = image
    t = add(daemon, path, len(data))
    con = connect(daemon, service)
    resp, body = request(con, "HEAD", "/images/" + t["uuid"],
                         headers={"Range": "bytes=100-"})
    assert resp.status == 206
    assert resp.getheader("Content-Range") == \
        "bytes 100-{}/{}".format(len(data) - 1, len(data))
    assert resp.getheader("Content-Length") == str(len(data) - 100)
    resp, body = request(con, "HEAD", "/images/" + t["uuid"],
                         headers={"Range": "bytes={}-".format(len(data))})
    assert resp.status == 416
    assert body == b""
    # HEAD on a resource without it: 405, also without a body.
    resp, body = request(con, "HEAD", "/images/" + t["uuid"] + "/extents")
    assert resp.status == 405
    assert body == b""
    resp, body = request(con, "GET", "/images/" + t["uuid"])
    assert resp.status == 200 and body == data


def test_head_expired_ticket(daemon, service, image):
    path, data = image
    t = add(daemon, path, len(data), ops=["read"])
    with daemon.client() as c:
        c.mod_ticket(t["uuid"], {"timeout": 0})
    con = connect(daemon, service)
    resp, body = request(con, "HEAD", "/images/" + t["uuid"])
    assert resp.status == 403
    assert body == b""
    assert resp.getheader("Connection") == "close"


def test_options_reports_size(daemon, service, image):
    path, data = image
    for ops in (["read"], ["read", "write"]):
        t = add(daemon, path, len(data), ops=ops)
        con = connect(daemon, service)
        resp, body = request(con, "OPTIONS", "/images/" + t["uuid"])
        assert json.loads(body)["size"] == len(data)


def test_path_traversal_ticket_id(daemon, service):
    con = connect(daemon, service)
    resp, _ = request(con, "GET", "/images/../tickets/")
    assert resp.status in (403, 404)
    con = connect(daemon, service)
    resp, _ = request(con, "GET", "/images/%2e%2e%2fetc%2fpasswd")
    assert resp.status in (403, 404)


# PUT

@pytest.mark.parametrize("offset,length", [
    (0, 1), (1, 1), (4095, 2), (4096, 4096), (4097, 4095), (1, 8190),
    (MiB - 3, MiB + 7), (0, 3 * MiB + 5), (3 * MiB, 5),
])
def test_put_unaligned(daemon, service, image, offset, length):
    path, data = image
    t = add(daemon, path, len(data))
    payload = os.urandom(length)
    con = connect(daemon, service)
    resp, body = request(con, "PUT", "/images/" + t["uuid"], body=payload,
                         headers={"Content-Range": "bytes {}-{}/*".format(
                             offset, offset + length - 1)})
    assert resp.status == 200, body
    expected = data[:offset] + payload + data[offset + length:]
    assert open(path, "rb").read() == expected
    # And reading it back through the daemon agrees.
    resp, body = request(con, "GET", "/images/" + t["uuid"])
    assert body == expected


def test_put_no_content_range_writes_at_zero(daemon, service, image):
    path, data = image
    t = add(daemon, path, len(data))
    con = connect(daemon, service)
    resp, _ = request(con, "PUT", "/images/" + t["uuid"] + "?flush=n",
                      body=b"abc")
    assert resp.status == 200
    assert open(path, "rb").read(4) == b"abc" + data[3:4]


def test_put_chunked(daemon, service, image):
    path, data = image
    t = add(daemon, path, len(data))
    chunks = [os.urandom(n) for n in (1, 4095, 70000, 3)]
    con = connect(daemon, service)
    con.request("PUT", "/images/" + t["uuid"], body=iter(chunks),
                encode_chunked=True)
    resp = con.getresponse()
    resp.read()
    assert resp.status == 200
    payload = b"".join(chunks)
    assert open(path, "rb").read(len(payload)) == payload


def test_put_past_end(daemon, service, image):
    path, data = image
    t = add(daemon, path, len(data))
    con = connect(daemon, service)
    resp, body = request(con, "PUT", "/images/" + t["uuid"], body=b"xy",
                         headers={"Content-Range": "bytes {}-{}/*".format(
                             len(data) - 1, len(data))})
    assert resp.status == 416
    assert open(path, "rb").read() == data


def test_put_mismatched_lengths(daemon, service, image):
    path, data = image
    t = add(daemon, path, len(data))
    con = connect(daemon, service)
    resp, body = request(con, "PUT", "/images/" + t["uuid"], body=b"xy",
                         headers={"Content-Range": "bytes 0-9/*"})
    assert resp.status == 400
    assert open(path, "rb").read() == data


def raw_request(daemon, service, data, read_timeout=30):
    """Send raw bytes, return everything the daemon answers until it
    closes the connection."""
    if service == "local":
        s = socket.socket(socket.AF_UNIX)
        s.connect(daemon.local_socket)
    else:
        import ssl
        ctx = ssl.create_default_context(cafile=daemon.ca_file)
        s = ctx.wrap_socket(socket.create_connection(
            ("localhost", daemon.remote_port)), server_hostname="localhost")
    s.settimeout(read_timeout)
    with s:
        s.sendall(data)
        if service == "local":
            # (SSLSocket.shutdown drops TLS: then we could not read.)
            s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, OSError, socket.timeout):
                break
            if not chunk:
                break
            out += chunk
    return out


def test_put_short_body(daemon, service, image):
    path, data = image
    t = add(daemon, path, len(data))
    # Over TLS the client cannot half-close: the daemon waits for the rest
    # of the body and we give up reading first.
    out = raw_request(daemon, service, (
        "PUT /images/{} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
        "\r\n".format(t["uuid"])).encode() + b"x" * 1000,
        read_timeout=30 if service == "local" else 2)
    # Never reported as success.
    assert not out.startswith(b"HTTP/1.1 200")
    if out:
        assert out.startswith(b"HTTP/1.1 400")
        assert b"short" in out.lower()
    # The daemon goes on serving.
    con = connect(daemon, service)
    resp, body = request(con, "GET", "/images/" + t["uuid"], headers={
        "Range": "bytes=2000-2999"})
    assert body == data[2000:3000]


def test_put_without_length(daemon, service, image):
    path, data = image
    t = add(daemon, path, len(data))
    out = raw_request(daemon, service, (
        "PUT /images/{} HTTP/1.1\r\nHost: x\r\n\r\nabc".format(
            t["uuid"])).encode())
    assert out.startswith(b"HTTP/1.1 411")
    assert open(path, "rb").read() == data


# PATCH

def test_zero_allocating(daemon, service, tmp_path):
    data = os.urandom(2 * MiB)
    path = make_image(tmp_path, len(data), data)
    t = add(daemon, path, len(data), sparse=False)
    con = connect(daemon, service)
    msg = {"op": "zero", "offset": 4097, "size": MiB, "flush": True}
    resp, body = request(con, "PATCH", "/images/" + t["uuid"],
                         body=json.dumps(msg))
    assert resp.status == 200, body
    expected = data[:4097] + b"\0" * MiB + data[4097 + MiB:]
    assert open(path, "rb").read() == expected


def test_zero_sparse_punches_hole(daemon, service, tmp_path):
    data = os.urandom(4 * MiB)
    path = make_image(tmp_path, len(data), data, name="sparse.raw")
    before = os.stat(path).st_blocks
    t = add(daemon, path, len(data), sparse=True)
    con = connect(daemon, service)
    resp, body = request(con, "PATCH", "/images/" + t["uuid"],
                         body=json.dumps({"op": "zero", "offset": MiB,
                                          "size": 2 * MiB}))
    assert resp.status == 200, body
    assert open(path, "rb").read() == \
        data[:MiB] + b"\0" * (2 * MiB) + data[3 * MiB:]
    assert os.stat(path).st_blocks < before
    resp, body = request(con, "GET", "/images/{}/extents".format(t["uuid"]))
    extents = json.loads(body)
    assert {"start": MiB, "length": 2 * MiB, "zero": True,
            "hole": False} in extents


def test_flush(daemon, service, image):
    path, data = image
    t = add(daemon, path, len(data))
    con = connect(daemon, service)
    resp, _ = request(con, "PATCH", "/images/" + t["uuid"],
                      body=json.dumps({"op": "flush"}))
    assert resp.status == 200


@pytest.mark.parametrize("msg,word", [
    ({"op": "zero"}, b"'size'"),
    ({"op": "zero", "size": -1}, b"'size'"),
    ({"op": "zero", "size": 1, "offset": "0"}, b"'offset'"),
    ({"op": "zero", "size": 1, "flush": "yes"}, b"'flush'"),
    ({"op": "explode"}, b"explode"),
    ({}, b"'op'"),
    ([], b"object"),
])
def test_patch_bad(daemon, service, image, msg, word):
    path, data = image
    t = add(daemon, path, len(data))
    con = connect(daemon, service)
    resp, body = request(con, "PATCH", "/images/" + t["uuid"],
                         body=json.dumps(msg))
    assert resp.status == 400
    assert word in body
    assert open(path, "rb").read() == data


def test_patch_not_json(daemon, service, image):
    path, data = image
    t = add(daemon, path, len(data))
    con = connect(daemon, service)
    resp, body = request(con, "PATCH", "/images/" + t["uuid"], body=b"{op")
    assert resp.status == 400


def test_zero_outside(daemon, service, image):
    path, data = image
    t = add(daemon, path, len(data))
    con = connect(daemon, service)
    resp, body = request(con, "PATCH", "/images/" + t["uuid"],
                         body=json.dumps({"op": "zero", "offset": 1,
                                          "size": len(data)}))
    assert resp.status == 416
    assert open(path, "rb").read() == data


# Extents and checksum

def test_extents(daemon, service, tmp_path):
    path = tmp_path / "holes.raw"
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(2 * MiB)
        f.write(b"x" * MiB)
    t = add(daemon, path, 8 * MiB)
    con = connect(daemon, service)
    resp, body = request(con, "GET", "/images/{}/extents".format(t["uuid"]))
    assert resp.status == 200
    extents = json.loads(body)
    assert extents == [
        {"start": 0, "length": 2 * MiB, "zero": True, "hole": False},
        {"start": 2 * MiB, "length": MiB, "zero": False, "hole": False},
        {"start": 3 * MiB, "length": 5 * MiB, "zero": True, "hole": False},
    ]


def test_extents_dirty_not_available(daemon, service, image):
    path, data = image
    t = add(daemon, path, len(data))
    con = connect(daemon, service)
    resp, body = request(con, "GET",
                         "/images/{}/extents?context=dirty".format(t["uuid"]))
    assert resp.status == 404


def reference_checksum(data, block_size=4 * MiB):
    outer = hashlib.blake2b(digest_size=32)
    for i in range(0, len(data), block_size):
        outer.update(hashlib.blake2b(data[i:i + block_size],
                                     digest_size=32).digest())
    return outer.hexdigest()


def test_checksum(daemon, service, tmp_path):
    data = os.urandom(MiB) + b"\0" * (5 * MiB) + os.urandom(MiB + 7)
    path = make_image(tmp_path, len(data), data[:MiB])
    with open(path, "r+b") as f:
        f.seek(6 * MiB)
        f.write(data[6 * MiB:])
    t = add(daemon, path, len(data))
    con = connect(daemon, service)
    resp, body = request(con, "GET", "/images/{}/checksum".format(t["uuid"]))
    assert resp.status == 200
    r = json.loads(body)
    assert r == {"algorithm": "blake2b", "block_size": 4 * MiB,
                 "checksum": reference_checksum(data)}
    resp, body = request(con, "GET",
                         "/images/{}/checksum?algorithm=sha256&block_size={}"
                         .format(t["uuid"], MiB))
    r = json.loads(body)
    outer = hashlib.sha256()
    for i in range(0, len(data), MiB):
        outer.update(hashlib.sha256(data[i:i + MiB]).digest())
    assert r["checksum"] == outer.hexdigest()


def test_checksum_of_a_window(daemon, service, tmp_path):
    # ?offset=&length=: the block hash of whole blocks of the image (the
    # client verifies an upload window by window with it); the image's
    # last block may be short.
    data = os.urandom(2 * MiB) + b"\0" * (7 * MiB) + os.urandom(MiB + 7)
    path = make_image(tmp_path, len(data), data)
    t = add(daemon, path, len(data))
    con = connect(daemon, service)
    for offset, length in [(0, 4 * MiB), (4 * MiB, 4 * MiB),
                           (4 * MiB, len(data) - 4 * MiB),
                           (8 * MiB, len(data) - 8 * MiB), (0, len(data)),
                           (len(data) - len(data) % (4 * MiB), len(data) %
                            (4 * MiB))]:
        resp, body = request(con, "GET", "/images/{}/checksum?offset={}&"
                             "length={}".format(t["uuid"], offset, length))
        assert resp.status == 200, body
        assert json.loads(body) == {
            "algorithm": "blake2b", "block_size": 4 * MiB,
            "offset": offset, "length": length,
            "checksum": reference_checksum(data[offset:offset + length])}
    resp, body = request(con, "GET", "/images/{}/checksum/algorithms"
                         .format(t["uuid"]))
    assert json.loads(body)["windows"] is True


@pytest.mark.parametrize("query,says", [
    ("algorithm=md42", None), ("block_size=1000", None),
    ("block_size=x", None), ("block_size=33554432", None),
    # Windows that are not whole blocks of the image.
    ("offset=1&length=4194304", b"offset"),     # not at a block's start
    ("offset=0&length=1000", b"offset"),        # not whole blocks
    ("offset=0&length=1073741824", b"offset"),  # past the end
    ("offset=1073741824", b"offset"),           # starts past the end
    ("offset=-4194304&length=4194304", b"offset"),
])
def test_checksum_bad(daemon, service, image, query, says):
    path, data = image
    t = add(daemon, path, len(data))
    con = connect(daemon, service)
    resp, body = request(con, "GET", "/images/{}/checksum?{}".format(
        t["uuid"], query))
    assert resp.status == 400
    assert says is None or says in body, body


def test_checksum_algorithms(daemon, service, image):
    path, data = image
    t = add(daemon, path, len(data))
    con = connect(daemon, service)
    resp, body = request(con, "GET", "/images/{}/checksum/algorithms".format(
        t["uuid"]))
    algs = json.loads(body)["algorithms"]
    assert "blake2b" in algs and "sha256" in algs


# HTTP behaviour

def test_keep_alive_many_requests(daemon, service, image):
    path, data = image
    t = add(daemon, path, len(data))
    con = connect(daemon, service)
    for i in range(200):
        offset = (i * 12345) % (len(data) - 100)
        resp, body = request(con, "GET", "/images/" + t["uuid"], headers={
            "Range": "bytes={}-{}".format(offset, offset + 99)})
        assert body == data[offset:offset + 100]
    con.request("GET", "/images/" + t["uuid"] + "?close=y",
                headers={"Range": "bytes=0-0"})
    resp = con.getresponse()
    assert resp.getheader("Connection") == "close"
    resp.read()


def test_connection_close_honoured(daemon, service, image):
    path, data = image
    t = add(daemon, path, len(data))
    out = raw_request(daemon, service, (
        "GET /images/{} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\n"
        "Connection: close\r\n\r\n").format(t["uuid"]).encode())
    assert out.startswith(b"HTTP/1.1 206")
    assert out.endswith(data[:10])


def test_inactivity_timeout(daemon, service, image):
    path, data = image
    t = add(daemon, path, len(data), inactivity_timeout=1)
    con = connect(daemon, service)
    resp, body = request(con, "GET", "/images/" + t["uuid"], headers={
        "Range": "bytes=0-0"})
    assert resp.status == 206
    start = time.monotonic()
    # The daemon closes the idle connection: the socket reads EOF.
    con.sock.settimeout(10)
    try:
        assert con.sock.recv(1) == b""
    except ConnectionResetError:
        pass
    assert time.monotonic() - start < 5


def test_max_connections(make_daemon, tmp_path):
    d = make_daemon("[daemon]\nmax_connections = 2\n")
    data = os.urandom(8192)
    path = make_image(tmp_path, len(data), data)
    t = add(d, path, len(data))
    cons = [d.unix() for _ in range(3)]
    statuses = []
    for con in cons:
        resp, _ = request(con, "GET", "/images/" + t["uuid"])
        statuses.append(resp.status)
    assert statuses == [200, 200, 503]
    cons[0].close()
    # A slot frees when a connection closes.
    deadline = time.monotonic() + 10
    while True:
        con = d.unix()
        resp, _ = request(con, "GET", "/images/" + t["uuid"])
        if resp.status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert resp.status == 200
    with d.client() as c:
        assert c.get_ticket(t["uuid"])["connections"] == 2


def test_ticket_deleted_during_transfer(daemon, service, tmp_path):
    size = 1024 * MiB
    path = make_image(tmp_path, size, os.urandom(MiB))
    t = add(daemon, path, size)
    con = connect(daemon, service)
    con.request("GET", "/images/" + t["uuid"])
    resp = con.getresponse()
    got = resp.read(MiB)
    assert len(got) == MiB
    start = time.monotonic()
    with daemon.client() as c:
        c.del_ticket(t["uuid"])
    assert time.monotonic() - start < 10
    # The transfer stops: the client sees a cut connection, not the image.
    received = len(got)
    try:
        while True:
            chunk = resp.read(MiB)
            if not chunk:
                break
            received += len(chunk)
    except Exception:
        pass
    assert received < size
    con = connect(daemon, service)
    resp, _ = request(con, "GET", "/images/" + t["uuid"])
    assert resp.status == 403


def test_ticket_accounting(daemon, service, image):
    path, data = image
    t = add(daemon, path, len(data), ops=["read"])
    con = connect(daemon, service)
    for first, last in [(0, 999), (500, 1499), (4096, 8191)]:
        request(con, "GET", "/images/" + t["uuid"], headers={
            "Range": "bytes={}-{}".format(first, last)})
    # The daemon accounts a chunk after sending it: the client may see
    # the last byte a moment before.
    deadline = time.monotonic() + 5
    with daemon.client() as c:
        while True:
            info = c.get_ticket(t["uuid"])
            if info["transferred"] == 1500 + 4096 or \
                    time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert info["transferred"] == 1500 + 4096
    assert info["active"] is False
    assert info["connections"] == 1


def test_curl_download_tls(daemon, tmp_path, image):
    path, data = image
    t = add(daemon, path, len(data))
    out = tmp_path / "download"
    r = subprocess.run(
        ["curl", "--fail", "-sS", "--cacert", daemon.ca_file, "-o", str(out),
         "https://localhost:{}/images/{}".format(daemon.remote_port,
                                                 t["uuid"])],
        capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == data


def test_curl_upload_unix(daemon, tmp_path, image):
    path, data = image
    t = add(daemon, path, len(data))
    src = tmp_path / "upload"
    payload = os.urandom(2 * MiB + 3)
    src.write_bytes(payload)
    r = subprocess.run(
        ["curl", "--fail", "-sS", "--unix-socket", daemon.local_socket,
         "-T", str(src), "http://localhost/images/{}".format(t["uuid"])],
        capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert open(path, "rb").read() == payload + data[len(payload):]


def test_concurrent_clients(daemon, service, image):
    path, data = image
    t = add(daemon, path, len(data))
    errors = []

    def reader(k):
        try:
            con = connect(daemon, service)
            for i in range(20):
                offset = (k * 7919 + i * 104729) % (len(data) - 65536)
                resp, body = request(con, "GET", "/images/" + t["uuid"],
                                     headers={"Range": "bytes={}-{}".format(
                                         offset, offset + 65535)})
                if body != data[offset:offset + 65536]:
                    errors.append((k, i))
            con.close()
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []


@pytest.mark.parametrize("offset,length", [
    (4097, 20 * MiB + 3),   # several buffers, unaligned head and tail
    (0, 2 * MiB),           # the smallest pipelined transfer
    (1, 8 * MiB),           # exactly one buffer, shifted
])
def test_large_unaligned_roundtrip(daemon, service, tmp_path, offset, length):
    size = offset + length + 4096 * 3 + 1
    base = os.urandom(size)
    path = make_image(tmp_path, size, base, name="large.raw")
    t = add(daemon, path, size)
    payload = os.urandom(length)
    con = connect(daemon, service)
    resp, body = request(con, "PUT", "/images/" + t["uuid"], body=payload,
                         headers={"Content-Range": "bytes {}-{}/*".format(
                             offset, offset + length - 1)})
    assert resp.status == 200, body
    expected = base[:offset] + payload + base[offset + length:]
    assert open(path, "rb").read() == expected
    resp, body = request(con, "GET", "/images/" + t["uuid"], headers={
        "Range": "bytes={}-{}".format(offset - 1 if offset else 0,
                                      offset + length)})
    start = offset - 1 if offset else 0
    assert body == expected[start:offset + length + 1]


def test_large_put_short_body(daemon, service, tmp_path):
    size = 16 * MiB
    base = os.urandom(size)
    path = make_image(tmp_path, size, base, name="short.raw")
    t = add(daemon, path, size)
    out = raw_request(daemon, service, (
        "PUT /images/{} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n"
        "\r\n".format(t["uuid"], size)).encode() + b"x" * (5 * MiB + 7),
        read_timeout=30 if service == "local" else 2)
    assert not out.startswith(b"HTTP/1.1 200")
    # The daemon serves on, and what it did not receive is untouched.
    con = connect(daemon, service)
    resp, body = request(con, "GET", "/images/" + t["uuid"], headers={
        "Range": "bytes={}-{}".format(6 * MiB, size - 1)})
    assert body == base[6 * MiB:]


def test_expect_100_continue(daemon, service, image, tmp_path):
    # curl -T sends "Expect: 100-continue" and waits up to a second for
    # "100 Continue" before the body.
    path, data = image
    t = add(daemon, path, len(data))
    src = tmp_path / "payload"
    payload = os.urandom(MiB)
    src.write_bytes(payload)
    if service == "local":
        target = ["--unix-socket", daemon.local_socket,
                  "http://localhost/images/" + t["uuid"]]
    else:
        target = ["--cacert", daemon.ca_file,
                  "https://localhost:{}/images/{}".format(
                      daemon.remote_port, t["uuid"])]
    start = time.monotonic()
    r = subprocess.run(
        ["curl", "--fail", "-sS", "-v", "-H", "Expect: 100-continue",
         "--expect100-timeout", "10", "-T", str(src)] + target,
        capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "HTTP/1.1 100 Continue" in r.stderr
    assert time.monotonic() - start < 5
    assert open(path, "rb").read(MiB) == payload


def test_expect_100_continue_refused(daemon, service, image):
    # An error before the body: no 100, the final status, and the
    # connection closed (the client may or may not send the body).
    path, data = image
    t = add(daemon, path, len(data), ops=["read"])
    out = raw_request(daemon, service, (
        "PUT /images/{} HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n"
        "Expect: 100-continue\r\n\r\n".format(t["uuid"])).encode(),
        read_timeout=10)
    assert out.startswith(b"HTTP/1.1 403")
    assert b"100 Continue" not in out
    assert open(path, "rb").read() == data


def test_concurrent_checksums_share_hashing_threads(daemon, tmp_path):
    # Each checksum request used to start a thread per core of its own:
    # 8 at once share the daemon's hashing threads instead.
    import threading as th
    size = 64 * 1024**2
    path = tmp_path / "sum.raw"
    with open(path, "wb") as f:
        for _ in range(size // (4 * 1024**2)):
            f.write(os.urandom(4 * 1024**2))
    t = add(daemon, path, size, ops=["read"])

    def threads():
        with open("/proc/{}/status".format(daemon.proc.pid)) as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1])

    before = threads()
    peak = [0]
    results = []
    stop = th.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], threads())
            time.sleep(0.005)

    def run():
        con = daemon.unix(timeout=60)
        resp, body = request(con, "GET",
                             "/images/{}/checksum".format(t["uuid"]))
        results.append((resp.status, body))
        con.close()

    watcher = th.Thread(target=watch)
    watcher.start()
    clients = [th.Thread(target=run) for _ in range(8)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(120)
    stop.set()
    watcher.join()
    assert [s for s, _ in results] == [200] * 8
    assert len({b for _, b in results}) == 1
    # 8 request workers and one hashing thread per core, not 8 per core.
    assert peak[0] - before <= 8 + (os.cpu_count() or 1) + 2
