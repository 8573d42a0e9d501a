"""Bad input and abusive clients against the real daemon.

Every malformed request gets a clear 4xx and changes nothing: the image's
bytes and mtime, the ticket (not active, same expiry, no connection left
bound) and the files around the daemon are checked before and after.
Slow, stalled, greedy and bursty clients are cut off or refused within a
bounded time while other clients are served meanwhile.
"""

import hashlib
import http.client
import json
import os
import select
import socket
import ssl
import threading
import time

import pytest

from conftest import (new_ticket, request, make_image, add, connect,
                      connect_raw, ticket_info, wait_idle)

KiB = 1024
MiB = 1024**2

# The daemon's limits (imageio/httpparse.py, imageio/http.py).
MAX_LINE = 8192
MAX_HEADERS = 100
HEADERS_TIMEOUT = 10  # [daemon] header_timeout


# Helpers.

def exchange(daemon, service, data, timeout=20):
    """Send raw bytes; return (status, headers, body) of the one response,
    and whether the daemon closed the connection after it."""
    sock = connect_raw(daemon, service, timeout)
    with sock:
        try:
            sock.sendall(data)
        except OSError:
            # The daemon may answer and close before reading it all.
            pass
        # A response to HEAD has no body, whatever its Content-Length.
        method = data.split(b" ", 1)[0].decode("latin-1")
        resp = http.client.HTTPResponse(sock, method=method)
        resp.begin()
        body = resp.read()
        closed = resp.will_close or _closed(sock)
        return resp.status, dict(resp.getheaders()), body, closed


def _closed(sock, timeout=0.2):
    try:
        sock.settimeout(timeout)
        return sock.recv(1) == b""
    except socket.timeout:
        return False
    except OSError:
        return True


def tree(*dirs):
    """Every file under ``dirs`` with size, mtime and a hash of the
    content (sockets and logs excepted)."""
    out = {}
    for top in dirs:
        if os.path.isfile(str(top)):
            with open(str(top), "rb") as f:
                out[str(top)] = hashlib.sha256(f.read()).hexdigest()
            continue
        for root, _, files in os.walk(str(top)):
            for name in files:
                p = os.path.join(root, name)
                if name.endswith(".log") or name.endswith(".sock"):
                    continue
                st = os.lstat(p)
                if not os.path.isfile(p):
                    continue
                with open(p, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                out[p] = (st.st_size, st.st_mtime_ns, digest)
    return out


class Unchanged:
    """Check that a request changed nothing: the files under ``dirs`` and
    the ticket's state."""

    def __init__(self, daemon, ticket, *dirs):
        self.daemon = daemon
        self.ticket = ticket
        self.dirs = dirs

    def __enter__(self):
        self.before_files = tree(*self.dirs)
        self.before = wait_idle(self.daemon, self.ticket["uuid"])
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            return False
        after = wait_idle(self.daemon, self.ticket["uuid"])
        for key in ("expires", "timeout", "size", "canceled", "ops"):
            assert after[key] == self.before[key], (key, self.before, after)
        assert tree(*self.dirs) == self.before_files
        return False


@pytest.fixture
def image(tmp_path):
    data = os.urandom(MiB)
    path = make_image(tmp_path / "image.raw", len(data), data)
    return path, data


def assert_serving(daemon, path, data):
    t = add(daemon, path, len(data), ops=["read"])
    for svc in ("remote", "local"):
        con = connect(daemon, svc, timeout=20)
        resp, body = request(con, "GET", "/images/" + t["uuid"],
                             headers={"Range": "bytes=0-4095"})
        assert resp.status == 206 and body == data[:4096]
        con.close()


def put_request(ticket_id, body, extra="", query="", method="PUT",
                content_range=None):
    head = "{} /images/{}{} HTTP/1.1\r\nHost: localhost\r\n".format(
        method, ticket_id, query)
    if content_range is not None:
        head += "Content-Range: {}\r\n".format(content_range)
    head += "Content-Length: {}\r\n{}\r\n".format(len(body), extra)
    return head.encode() + body


# Size limits.

def test_request_line_too_long(daemon, service, image, tmp_path):
    path, data = image
    t = add(daemon, path, len(data))
    with Unchanged(daemon, t, tmp_path, daemon.confdir):
        status, _, body, closed = exchange(daemon, service, put_request(
            t["uuid"], b"x" * 4096, query="?pad=" + "a" * MAX_LINE))
        assert status == 431 and closed
        assert b"too long" in body
        status, _, body, closed = exchange(daemon, service, (
            "GET /images/" + "a" * (MAX_LINE + 1) + " HTTP/1.1\r\n"
            "Host: x\r\n\r\n").encode())
        assert status == 431 and closed
    assert_serving(daemon, path, data)


def test_request_line_without_newline(daemon, service, image, tmp_path):
    # 100 KiB and no line end at all: refused once past the limit, not
    # buffered forever.
    path, data = image
    t = add(daemon, path, len(data))
    with Unchanged(daemon, t, tmp_path, daemon.confdir):
        status, _, body, closed = exchange(daemon, service,
                                           b"G" * (100 * KiB))
        assert status == 431 and closed


def test_header_line_too_long(daemon, service, image, tmp_path):
    path, data = image
    t = add(daemon, path, len(data))
    with Unchanged(daemon, t, tmp_path, daemon.confdir):
        status, _, body, closed = exchange(daemon, service, put_request(
            t["uuid"], b"x" * 4096,
            extra="X-Pad: {}\r\n".format("b" * MAX_LINE)))
        assert status == 431 and closed
        assert body.strip()
    assert_serving(daemon, path, data)


@pytest.mark.parametrize("count,status", [(MAX_HEADERS, 200),
                                          (MAX_HEADERS + 1, 431),
                                          (5000, 431)])
def test_header_count(daemon, service, image, tmp_path, count, status):
    # Host and Content-Length count too.
    path, data = image
    t = add(daemon, path, len(data))
    extra = "".join("X-H{}: v\r\n".format(i) for i in range(count - 2))
    req = put_request(t["uuid"], b"y" * 4096, extra=extra,
                      content_range=None)
    if status == 200:
        got, _, body, _ = exchange(daemon, service, req)
        assert got == 200, body
        with open(path, "rb") as f:
            assert f.read(4096) == b"y" * 4096
        return
    with Unchanged(daemon, t, tmp_path, daemon.confdir):
        got, _, body, closed = exchange(daemon, service, req)
        assert got == 431 and closed
        assert b"headers" in body.lower()


# Methods.

@pytest.mark.parametrize("method", [
    "DELETE", "POST", "TRACE", "CONNECT", "PROPFIND", "FOO",
    "__INIT__", "_PUT", "__CLASS__"])
def test_bad_method(daemon, service, image, tmp_path, method):
    path, data = image
    t = add(daemon, path, len(data))
    with Unchanged(daemon, t, tmp_path, daemon.confdir):
        status, _, body, _ = exchange(daemon, service, put_request(
            t["uuid"], b"z" * 512, method=method))
        assert status == 405, (status, body)
        assert method.encode() in body
    assert_serving(daemon, path, data)


@pytest.mark.parametrize("method", ["put", "Put", "patch", "get"])
def test_method_is_case_sensitive(daemon, service, image, tmp_path, method):
    # RFC 9110 9.1: methods are case-sensitive.  "put" is not PUT: a
    # filter that allows only GET in front of the daemon must not be
    # bypassed by spelling PUT in lower case.
    path, data = image
    t = add(daemon, path, len(data))
    body = {"patch": b'{"op": "zero", "size": 4096}',
            "get": b""}.get(method, b"w" * 4096)
    with Unchanged(daemon, t, tmp_path, daemon.confdir):
        status, _, answer, _ = exchange(daemon, service, put_request(
            t["uuid"], body, method=method,
            content_range=None))
        assert status in (400, 405, 501), (status, answer)


def test_bad_method_control(daemon, image, tmp_path):
    path, data = image
    t = add(daemon, path, len(data))
    with Unchanged(daemon, t, tmp_path, daemon.confdir):
        for method in ("POST", "HEAD", "TRACE", "OPTIONS", "__INIT__"):
            status, _, body, _ = exchange(daemon, "control", (
                "{} /tickets/{} HTTP/1.1\r\nHost: x\r\nContent-Length: 2"
                "\r\n\r\n{{}}".format(method, t["uuid"])).encode())
            assert status == 405, (method, status, body)
            assert (method == "HEAD") == (body == b""), (method, body)


@pytest.mark.parametrize("line", [
    b"GET  /images/x HTTP/1.1", b"GET /images/x HTTP/2.0",
    b"GET /images/x", b"G(ET /images/x HTTP/1.1", b"GET images/x HTTP/1.1",
    b"GET /images/x HTTP/1.1 extra", b"\x00\x01\x02 / HTTP/1.1"])
def test_malformed_request_line(daemon, service, image, tmp_path, line):
    path, data = image
    t = add(daemon, path, len(data))
    with Unchanged(daemon, t, tmp_path, daemon.confdir):
        status, _, body, closed = exchange(
            daemon, service, line + b"\r\nHost: x\r\n\r\n")
        assert status == 400 and closed, (status, body)
        assert body.strip()


# Bodies where none belongs.

def test_body_on_get(daemon, service, image, tmp_path):
    path, data = image
    t = add(daemon, path, len(data))
    with Unchanged(daemon, t, tmp_path, daemon.confdir):
        status, _, body, _ = exchange(daemon, service, put_request(
            t["uuid"], b"q" * 1000, method="GET"))
        assert status == 400, body
        assert b"body" in body.lower()
        chunked = ("GET /images/{} HTTP/1.1\r\nHost: x\r\n"
                   "Transfer-Encoding: chunked\r\n\r\n"
                   "5\r\nhello\r\n0\r\n\r\n".format(t["uuid"])).encode()
        status, _, body, _ = exchange(daemon, service, chunked)
        assert status == 400, body
    assert_serving(daemon, path, data)


# Numbers: negative, overflowing, not numbers.

BAD_RANGES = [
    "bytes=-5-10", "bytes=-1", "bytes=5--1", "bytes=--1",
    "bytes=99999999999999999999-", "bytes=0-99999999999999999999",
    "bytes=9223372036854775807-9223372036854775807",
    "bytes=18446744073709551615-18446744073709551616",
    "bytes=9999999999999999999-", "bytes=1048576-",
    "bytes=0x10-0x20", "bytes=1e3-2e3", "bytes=+1-2", "bytes= 1-2",
    "bytes=0-1,2-3", "bytes=\u0661-\u0662", "items=0-1", "bytes=",
]


@pytest.mark.parametrize("value", BAD_RANGES)
def test_bad_range(daemon, image, tmp_path, value):
    path, data = image
    t = add(daemon, path, len(data))
    with Unchanged(daemon, t, tmp_path, daemon.confdir):
        req = ("GET /images/{} HTTP/1.1\r\nHost: x\r\nRange: {}\r\n\r\n"
               .format(t["uuid"], value)).encode("utf-8")
        status, headers, body, _ = exchange(daemon, "local", req)
        assert status in (400, 416), (status, body)
        if status == 416:
            assert headers["Content-Range"] == "bytes */{}".format(len(data))
        assert body.strip()


BAD_CONTENT_RANGES = [
    "bytes -1-10/*", "bytes 0--1/*", "bytes -0-0/*",
    "bytes 99999999999999999999-99999999999999999999/*",
    "bytes 9223372036854775807-9223372036854775807/*",
    "bytes 9223372036854775807-9223372036854779902/*",
    "bytes 18446744073709547520-18446744073709551615/*",
    "bytes 9999999999999999999-9999999999999999999/*",
    "bytes 1048576-1052671/*", "bytes 1044480-1048576/*",
    "bytes 0-4095/-1", "bytes 0-4095/99999999999999999999",
    "bytes 4095-0/*", "bytes 0x0-0xfff/*", "bytes */*", "bytes 0-4095",
    "bytes \u0660-4095/*",
]


@pytest.mark.parametrize("value", BAD_CONTENT_RANGES)
def test_bad_content_range(daemon, image, tmp_path, value):
    path, data = image
    t = add(daemon, path, len(data))
    with Unchanged(daemon, t, tmp_path, daemon.confdir):
        status, _, body, _ = exchange(daemon, "local", put_request(
            t["uuid"], b"c" * 4096, content_range=value))
        assert status in (400, 416), (status, body)
        assert body.strip()


BAD_LENGTHS = [
    "-1", "-0", "+4096", "99999999999999999999", "18446744073709551616",
    "9223372036854775808", "4096, 4096", "0x1000", "1e4", "4 096", "",
    "\u0664\u0660\u0669\u0666",
]


@pytest.mark.parametrize("value", BAD_LENGTHS)
def test_bad_content_length(daemon, image, tmp_path, value):
    path, data = image
    t = add(daemon, path, len(data))
    with Unchanged(daemon, t, tmp_path, daemon.confdir):
        req = ("PUT /images/{} HTTP/1.1\r\nHost: x\r\n"
               "Content-Length: {}\r\n\r\n".format(t["uuid"], value)
               ).encode("utf-8") + b"L" * 4096
        status, _, body, closed = exchange(daemon, "local", req)
        assert status in (400, 413, 416), (status, body)
        assert body.strip()


def test_huge_content_length(daemon, service, image, tmp_path):
    # A valid number, far past the ticket: refused before any byte is
    # read or written.
    path, data = image
    t = add(daemon, path, len(data))
    with Unchanged(daemon, t, tmp_path, daemon.confdir):
        req = ("PUT /images/{} HTTP/1.1\r\nHost: x\r\n"
               "Content-Length: 9223372036854775807\r\n\r\n".format(
                   t["uuid"])).encode() + b"H" * 4096
        status, headers, body, _ = exchange(daemon, service, req)
        assert status == 416, body
        assert headers["Content-Range"] == "bytes */{}".format(len(data))


@pytest.mark.parametrize("msg", [
    {"op": "zero", "offset": -1, "size": 4096},
    {"op": "zero", "offset": 0, "size": -4096},
    {"op": "zero", "offset": 2**64, "size": 4096},
    {"op": "zero", "offset": 0, "size": 2**63},
    {"op": "zero", "offset": 2**63 - 1, "size": 2**63 - 1},
    {"op": "zero", "offset": 10**400, "size": 1},
    {"op": "zero", "offset": 0, "size": 1e400},
])
def test_bad_patch_numbers(daemon, image, tmp_path, msg):
    path, data = image
    t = add(daemon, path, len(data))
    with Unchanged(daemon, t, tmp_path, daemon.confdir):
        body = json.dumps(msg).encode()
        status, _, answer, _ = exchange(daemon, "local", put_request(
            t["uuid"], body, method="PATCH"))
        assert status in (400, 416), (status, answer)


@pytest.mark.parametrize("query", [
    "block_size=-4096", "block_size=99999999999999999999",
    "block_size=18446744073709551616", "block_size=0",
    "block_size=%2B4096", "algorithm=../../../etc/passwd",
    "algorithm=%00"])
def test_bad_checksum_numbers(daemon, image, tmp_path, query):
    path, data = image
    t = add(daemon, path, len(data))
    with Unchanged(daemon, t, tmp_path, daemon.confdir):
        status, _, body, _ = exchange(daemon, "local", (
            "GET /images/{}/checksum?{} HTTP/1.1\r\nHost: x\r\n\r\n".format(
                t["uuid"], query)).encode())
        assert status == 400, (status, body)


@pytest.mark.parametrize("field,value", [
    ("timeout", 10**400), ("timeout", 2**1024), ("timeout", -1),
    ("size", -1), ("inactivity_timeout", 10**400),
    ("inactivity_timeout", -5)],
    ids=["timeout-1e400", "timeout-2^1024", "timeout-neg", "size-neg",
         "inactivity-1e400", "inactivity-neg"])
def test_control_overflowing_ticket(daemon, image, tmp_path, field, value):
    # A number Python holds but the daemon cannot use (a float conversion
    # overflows) must be a 400 naming the field, like a negative one; no
    # ticket added.
    path, data = image
    t = new_ticket("file://" + str(path), len(data))
    t[field] = value
    body = json.dumps(t).encode()
    status, _, answer, _ = exchange(daemon, "control", (
        "PUT /tickets/{} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n"
        .format(t["uuid"], len(body))).encode() + body)
    assert status == 400, (status, answer)
    assert field.encode() in answer
    status, _, _, _ = exchange(daemon, "control", (
        "GET /tickets/{} HTTP/1.1\r\nHost: x\r\n\r\n".format(
            t["uuid"])).encode())
    assert status == 404


@pytest.mark.parametrize("value", [10**400, 2**1024, -1, 1.5, "10", None],
                         ids=["1e400", "2^1024", "neg", "float", "str",
                              "null"])
def test_control_overflowing_timeout_patch(daemon, image, tmp_path, value):
    # mod-ticket with an unusable timeout: 400, and the ticket is exactly
    # as before (still usable, same timeout and expiry).
    path, data = image
    t = add(daemon, path, len(data))
    with Unchanged(daemon, t, tmp_path, daemon.confdir):
        body = json.dumps({"timeout": value}).encode()
        status, _, answer, _ = exchange(daemon, "control", (
            "PATCH /tickets/{} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n"
            "\r\n".format(t["uuid"], len(body))).encode() + body)
        assert status == 400, (status, answer)
        assert b"timeout" in answer
    con = daemon.unix(timeout=20)
    resp, body = request(con, "PUT", "/images/" + t["uuid"], body=b"u" * 4096)
    assert resp.status == 200, body
    resp, body = request(con, "GET", "/images/" + t["uuid"],
                         headers={"Range": "bytes=0-4095"})
    assert resp.status == 206 and body == b"u" * 4096


# Ticket ids: unicode and path traversal.

TRAVERSAL = [
    "..", "%2e%2e", "..%2f..%2f..%2fetc%2fpasswd",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "..%5c..%5cwindows",
    "%252e%252e%252f", "..%00", "%00", "%c0%ae%c0%ae%2f",
    "%C3%BC", "%E2%80%AE", "%F0%9F%99%82", "%ff%fe",
    "~root", ".", "%2F", "x%0d%0aSet-Cookie:%20a",
]


@pytest.mark.parametrize("ticket_id", TRAVERSAL)
@pytest.mark.parametrize("method", ["GET", "PUT"])
def test_ticket_id_traversal_and_unicode(daemon, service, image, tmp_path,
                                         ticket_id, method):
    path, data = image
    t = add(daemon, path, len(data))
    canary = tmp_path / "canary"
    canary.write_bytes(b"canary")
    with Unchanged(daemon, t, tmp_path, daemon.confdir, "/etc/passwd"):
        req = put_request(ticket_id, b"T" * 4096, method=method) \
            if method == "PUT" else (
                "GET /images/{} HTTP/1.1\r\nHost: x\r\n\r\n".format(
                    ticket_id)).encode()
        status, headers, body, _ = exchange(daemon, service, req)
        assert 400 <= status < 500, (status, body)
        assert status in (400, 403, 404), (status, body)
        assert b"root:" not in body
        assert "Set-Cookie" not in headers
    assert canary.read_bytes() == b"canary"


@pytest.mark.parametrize("target", [
    "/images/../images/{id}", "/images/./{id}", "/images//{id}",
    "/images/{id}/../{id}", "/images/{id}/..", "/images/{id}%2F..",
    "/images/{id}/", "/x/../images/{id}"])
def test_paths_around_a_valid_ticket(daemon, service, image, tmp_path,
                                     target):
    # Paths are not normalized: a valid id reached through "..", "." or
    # "//" is not the image.
    path, data = image
    t = add(daemon, path, len(data))
    with Unchanged(daemon, t, tmp_path, daemon.confdir):
        status, _, body, _ = exchange(daemon, service, put_request(
            "", b"P" * 4096).replace(
                b"/images/ ", target.format(id=t["uuid"]).encode() + b" ",
                1))
        assert status in (400, 403, 404, 405), (status, body)


def test_raw_unicode_in_request_line(daemon, service, image, tmp_path):
    path, data = image
    t = add(daemon, path, len(data))
    with Unchanged(daemon, t, tmp_path, daemon.confdir):
        for target in ("/images/\u00fc", "/images/" + t["uuid"] + "\u202e",
                       "/images/\U0001f642"):
            status, _, body, closed = exchange(daemon, service, (
                "GET {} HTTP/1.1\r\nHost: x\r\n\r\n".format(target)
            ).encode("utf-8"))
            assert status == 400 and closed, (status, body)


def test_unicode_ticket_id_is_just_an_id(daemon, service, image, tmp_path):
    # A unicode ticket id is allowed (any printable string without "/"),
    # reached only by its exact percent-encoded UTF-8 spelling.
    path, data = image
    uid = "\u00fcber-\u0442\u0435\u0441\u0442-\U0001f642-" + \
        os.urandom(8).hex()
    t = new_ticket("file://" + str(path), len(data), uuid=uid)
    quoted = "".join("%{:02X}".format(b) for b in uid.encode("utf-8"))
    body = json.dumps(t).encode()
    status, _, answer, _ = exchange(daemon, "control", (
        "PUT /tickets/{} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n"
        .format(quoted, len(body))).encode() + body)
    assert status == 200, answer
    con = connect(daemon, service, timeout=20)
    resp, body = request(con, "GET", "/images/" + quoted,
                         headers={"Range": "bytes=0-99"})
    assert resp.status == 206 and body == data[:100]
    con.close()
    # NFC/NFD look-alikes are different ids.
    import unicodedata
    nfd = unicodedata.normalize("NFD", uid)
    quoted = "".join("%{:02X}".format(b) for b in nfd.encode("utf-8"))
    con = connect(daemon, service, timeout=20)
    resp, body = request(con, "GET", "/images/" + quoted)
    assert resp.status == 403
    con.close()


def test_admin_client_unicode_ticket_id(daemon, image):
    # imageio.admin must either manage a unicode ticket id (the daemon
    # accepts it) or fail with its own Error, not crash with
    # UnicodeEncodeError from http.client.
    from imageio import admin
    path, data = image
    uid = "\u00fcber-" + os.urandom(8).hex()
    t = new_ticket("file://" + str(path), len(data), uuid=uid)
    with daemon.client() as c:
        try:
            c.add_ticket(t)
        except admin.Error:
            return
        assert c.get_ticket(uid)["uuid"] == uid
        c.mod_ticket(uid, {"timeout": 10})
        c.del_ticket(uid)


@pytest.mark.parametrize("uid", ["../../etc/x", "a/b", "x\n", "x\u202e",
                                 "", "\x00"])
def test_control_refuses_bad_ticket_ids(daemon, image, tmp_path, uid):
    path, data = image
    before = tree(tmp_path, daemon.confdir)
    t = new_ticket("file://" + str(path), len(data))
    t["uuid"] = uid
    body = json.dumps(t).encode()
    quoted = "".join("%{:02X}".format(b) for b in uid.encode()) or "x"
    status, _, answer, _ = exchange(daemon, "control", (
        "PUT /tickets/{} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n"
        .format(quoted, len(body))).encode() + body)
    assert status in (400, 404, 405), (status, answer)
    status, _, listing, _ = exchange(
        daemon, "control", b"GET /tickets/ HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    assert uid not in json.loads(listing)
    assert tree(tmp_path, daemon.confdir) == before


# Slow clients.

def _slow_client(daemon, service, result):
    """Send a request one byte per second; record when the daemon cut the
    connection (seconds after the first byte)."""
    sock = connect_raw(daemon, service, timeout=5)
    payload = ("GET /images/{} HTTP/1.1\r\nHost: x\r\nX-Slow: {}\r\n\r\n"
               .format("0" * 36, "s" * 40)).encode()
    start = time.monotonic()
    try:
        for i in range(len(payload)):
            if time.monotonic() - start > HEADERS_TIMEOUT + 10:
                result[service] = None
                return
            try:
                sock.sendall(payload[i:i + 1])
            except OSError:
                result[service] = time.monotonic() - start
                return
            # Readable means EOF or reset: the daemon gave up on us.
            r, _, _ = select.select([sock], [], [], 1.0)
            if r:
                # (Over TLS, readable may be a session ticket only.)
                sock.settimeout(0.0)
                try:
                    data = sock.recv(4096)
                except (ssl.SSLWantReadError, BlockingIOError):
                    continue
                except OSError:
                    data = b""
                finally:
                    sock.settimeout(5)
                if not data:
                    result[service] = time.monotonic() - start
                    return
                result[service + "-answer"] = data
        result[service] = "completed"
    finally:
        sock.close()


def _silent_tcp_client(daemon, result):
    """Connect to the TLS port and never start the handshake."""
    sock = socket.create_connection(("localhost", daemon.remote_port),
                                    timeout=HEADERS_TIMEOUT + 10)
    start = time.monotonic()
    try:
        data = sock.recv(1)
        result["handshake"] = time.monotonic() - start if not data \
            else data
    except socket.timeout:
        result["handshake"] = None
    except OSError:
        result["handshake"] = time.monotonic() - start
    finally:
        sock.close()


def test_slow_clients_disconnected(daemon, image, tmp_path):
    """Clients sending headers one byte per second, on both services, and
    one never starting TLS, are cut after about 10 s (header_timeout
    covers the handshake and the head) while other clients are served
    meanwhile."""
    path, data = image
    t = add(daemon, path, len(data), ops=["read"])
    result = {}
    threads = [threading.Thread(target=_slow_client,
                                args=(daemon, svc, result))
               for svc in ("remote", "local")]
    threads.append(threading.Thread(target=_silent_tcp_client,
                                    args=(daemon, result)))
    for th in threads:
        th.start()
    served = 0
    worst = 0
    start = time.monotonic()
    while any(th.is_alive() for th in threads) and \
            time.monotonic() - start < HEADERS_TIMEOUT + 15:
        for svc in ("remote", "local"):
            t0 = time.monotonic()
            con = connect(daemon, svc, timeout=10)
            resp, body = request(con, "GET", "/images/" + t["uuid"],
                                 headers={"Range": "bytes=0-65535"})
            con.close()
            assert resp.status == 206 and body == data[:65536]
            worst = max(worst, time.monotonic() - t0)
            served += 1
        time.sleep(0.5)
    for th in threads:
        th.join(15)
    for key in ("remote", "local", "handshake"):
        elapsed = result.get(key)
        assert isinstance(elapsed, float), (key, result)
        assert HEADERS_TIMEOUT - 2 <= elapsed <= HEADERS_TIMEOUT + 10, \
            (key, elapsed)
    assert served >= 10, served
    assert worst < 5, worst


def test_stalled_body_disconnected(daemon, service, tmp_path):
    # A client that sends 100 KiB of a 4 MiB PUT and stalls is cut after
    # the ticket's inactivity_timeout (2 s); nothing past what it sent is
    # written; others are served meanwhile.
    size = 8 * MiB
    original = os.urandom(size)
    path = make_image(tmp_path / "image.raw", size, original)
    t = add(daemon, path, size, inactivity_timeout=2)
    sock = connect_raw(daemon, service, timeout=20)
    sent = 100 * KiB
    payload = os.urandom(sent)
    with sock:
        sock.sendall(("PUT /images/{} HTTP/1.1\r\nHost: x\r\n"
                      "Content-Length: {}\r\n\r\n".format(
                          t["uuid"], 4 * MiB)).encode() + payload)
        start = time.monotonic()
        other = connect(daemon, service, timeout=10)
        resp, body = request(other, "GET", "/images/" + t["uuid"],
                             headers={"Range": "bytes={}-{}".format(
                                 6 * MiB, 7 * MiB - 1)})
        assert resp.status == 206 and body == original[6 * MiB:7 * MiB]
        other.close()
        status = None
        try:
            resp = http.client.HTTPResponse(sock)
            resp.begin()
            status = resp.status
        except (http.client.HTTPException, OSError):
            pass
        elapsed = time.monotonic() - start
    assert status != 200
    assert 1.5 <= elapsed < 10, elapsed
    info = wait_idle(daemon, t["uuid"])
    assert not info["active"]
    with open(path, "rb") as f:
        got = f.read()
    assert got[sent:] == original[sent:]


def test_stalled_reader_disconnected(daemon, service, tmp_path):
    # A client that asks for 1 GiB and reads nothing: the daemon blocks
    # sending, gives up after the inactivity timeout and frees the ticket.
    size = 1024 * MiB
    path = make_image(tmp_path / "big.raw", size, os.urandom(MiB))
    t = add(daemon, path, size, inactivity_timeout=2)
    sock = connect_raw(daemon, service, timeout=20)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall("GET /images/{} HTTP/1.1\r\nHost: x\r\n\r\n".format(
            t["uuid"]).encode())
        start = time.monotonic()
        deadline = start + 2
        while not ticket_info(daemon, t["uuid"])["active"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        info = wait_idle(daemon, t["uuid"], timeout=15)
        elapsed = time.monotonic() - start
    assert 1.5 <= elapsed < 12, elapsed
    assert not info["active"]


# Greedy and bursty clients.

def test_max_connections_refused_cleanly(make_daemon, tmp_path):
    d = make_daemon("[daemon]\nmax_connections = 4\n")
    size = 256 * MiB
    head = os.urandom(MiB)
    path = make_image(tmp_path / "big.raw", size, head)
    t = add(d, path, size, ops=["read"])
    expected = hashlib.sha256(head + b"\0" * (size - MiB)).hexdigest()
    first = [connect(d, svc, timeout=30)
             for svc in ("remote", "local", "remote", "local")]
    running = []
    for con in first:
        con.request("GET", "/images/" + t["uuid"])
        resp = con.getresponse()
        assert resp.status == 200
        h = hashlib.sha256(resp.read(MiB))
        running.append((con, resp, h))
    # Four more, on both services, while the first four are mid-transfer.
    for svc in ("remote", "local", "remote", "local"):
        con = connect(d, svc, timeout=10)
        resp, body = request(con, "GET", "/images/" + t["uuid"],
                             headers={"Range": "bytes=0-0"})
        assert resp.status == 503, body
        assert b"connections" in body.lower()
        con.close()
    # The first four were not disturbed.
    for con, resp, h in running:
        while True:
            chunk = resp.read(8 * MiB)
            if not chunk:
                break
            h.update(chunk)
        assert h.hexdigest() == expected
        con.close()
    deadline = time.monotonic() + 10
    while ticket_info(d, t["uuid"])["connections"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    con = d.unix(timeout=10)
    resp, body = request(con, "GET", "/images/" + t["uuid"],
                         headers={"Range": "bytes=0-99"})
    assert resp.status == 206 and body == head[:100]


def test_connection_close_frees_ticket_slot(make_daemon, tmp_path):
    """One client, one request at a time, each on a new connection that the
    client asks to close (Connection: close, or ?close=y).  With
    max_connections = 1 every request must be served: the daemon answered
    and said it closes the connection, so it must not still count it
    against the ticket when the client's next request arrives.  (The
    client opens its next connection ahead, as connection pools do; an
    open connection without a request is bound to no ticket.)  The race is
    lost in about 1% of requests here: up to 1000 tries per case, stopping
    at the first 503."""
    d = make_daemon("[daemon]\nmax_connections = 1\n")
    data = os.urandom(64 * KiB)
    path = make_image(tmp_path / "image.raw", len(data), data)
    t = add(d, path, len(data), ops=["read"])
    for svc, tries in (("local", 1000), ("remote", 300)):
        for how in ("header", "query"):
            deadline = time.monotonic() + 15
            nxt = connect(d, svc, timeout=20)
            nxt.connect()
            for i in range(tries):
                if time.monotonic() > deadline:
                    break
                con, nxt = nxt, connect(d, svc, timeout=20)
                nxt.connect()
                if how == "header":
                    resp, body = request(con, "GET", "/images/" + t["uuid"],
                                         headers={"Range": "bytes=0-511",
                                                  "Connection": "close"})
                else:
                    resp, body = request(
                        con, "GET", "/images/{}?close=y".format(t["uuid"]),
                        headers={"Range": "bytes=0-511"})
                con.close()
                assert resp.status == 206, (svc, how, i, resp.status, body)
                assert body == data[:512]
            nxt.close()


def _threads(pid):
    with open("/proc/{}/status".format(pid)) as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])


def _one_short_request(daemon, svc, t, data, i):
    offset = (i * 4099) % (len(data) - 512)
    con = connect(daemon, svc, timeout=20)
    try:
        resp, body = request(con, "GET", "/images/" + t["uuid"], headers={
            "Range": "bytes={}-{}".format(offset, offset + 511),
            "Connection": "close"})
        return resp.status == 206 and body == data[offset:offset + 512]
    finally:
        con.close()


def test_burst_of_short_connections(daemon, image, tmp_path):
    path, data = image
    t = add(daemon, path, len(data), ops=["read"])
    baseline = _threads(daemon.proc.pid)
    start = time.monotonic()
    # 200 sequential, on each service.
    for svc in ("remote", "local"):
        results = [_one_short_request(daemon, svc, t, data, i)
                   for i in range(200)]
        assert all(results), results.count(False)
    # 200 from 8 threads, on each service.
    for svc in ("remote", "local"):
        results = []
        lock = threading.Lock()

        def worker(k):
            for i in range(25):
                try:
                    ok = _one_short_request(daemon, svc, t, data, k * 25 + i)
                except Exception as e:
                    ok = repr(e)
                with lock:
                    results.append(ok)

        workers = [threading.Thread(target=worker, args=(k,))
                   for k in range(8)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
        assert len(results) == 200
        assert all(r is True for r in results), \
            [r for r in results if r is not True][:5]
    # 200 connections that say nothing and go.
    for i in range(100):
        for svc in ("remote", "local"):
            if svc == "remote":
                s = socket.create_connection(("localhost", daemon.remote_port))
            else:
                s = socket.socket(socket.AF_UNIX)
                s.connect(daemon.local_socket)
            s.close()
    assert time.monotonic() - start < 120
    # No thread or connection left behind.
    deadline = time.monotonic() + 15
    while _threads(daemon.proc.pid) > baseline + 2:
        assert time.monotonic() < deadline, _threads(daemon.proc.pid)
        time.sleep(0.1)
    assert ticket_info(daemon, t["uuid"])["connections"] == 0
    assert _one_short_request(daemon, "remote", t, data, 7)


# Framing edge cases (RFC 9112): a request whose end cannot be found is
# refused with 400 and the connection closed, so nothing left in it can
# be taken for the next request.

def _chunked_put(ticket_id, chunks, extra=""):
    return ("PUT /images/{} HTTP/1.1\r\nHost: x\r\n"
            "Transfer-Encoding: chunked\r\n{}\r\n".format(ticket_id, extra)
            ).encode() + chunks


@pytest.mark.parametrize("chunks,extra,message", [
    # RFC 9112 6.1: both framings at once is a smuggling pattern.
    (b"5\r\nhello\r\n0\r\n\r\n", "Content-Length: 5\r\n",
     b"Content-Length"),
    # Once a 500 from deep in the reader.
    (b"5;" + b"x" * (MAX_LINE + 10) + b"\r\nhello\r\n", "",
     b"chunk size line"),
])
def test_chunked_framing_refused(daemon, service, image, tmp_path, chunks,
                                 extra, message):
    path, data = image
    t = add(daemon, path, len(data))
    with Unchanged(daemon, t, tmp_path, daemon.confdir):
        status, _, body, closed = exchange(daemon, service, _chunked_put(
            t["uuid"], chunks, extra=extra))
        assert status == 400 and closed, body
        assert message in body
    assert_serving(daemon, path, data)


def test_too_many_trailers(daemon, service, image, tmp_path):
    path, data = image
    t = add(daemon, path, len(data))
    trailers = b"".join(b"X-T%d: v\r\n" % i for i in range(MAX_HEADERS + 5))
    # If the trailers after the 100th were taken for a next request, this
    # GET would be answered too.
    smuggled = "GET /images/{} HTTP/1.1\r\nHost: x\r\n\r\n".format(
        t["uuid"]).encode()
    sock = connect_raw(daemon, service, 20)
    with sock:
        # The chunk rewrites the bytes the image has: it is written before
        # the trailers are read.
        sock.sendall(_chunked_put(t["uuid"], b"5\r\n" + data[:5] +
                                  b"\r\n0\r\n" + trailers + b"\r\n" +
                                  smuggled))
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        body = resp.read()
        assert resp.status == 400, body
        assert b"trailer" in body
        assert resp.will_close or _closed(sock, 1.0)
    assert_serving(daemon, path, data)


def test_continue_after_range_check(daemon, service, image, tmp_path):
    # A client asking for 100 Continue is told 416 without being invited
    # to send a body that cannot be written.
    path, data = image
    t = add(daemon, path, len(data))
    with Unchanged(daemon, t, tmp_path, daemon.confdir):
        sock = connect_raw(daemon, service, 20)
        with sock:
            sock.sendall((
                "PUT /images/{} HTTP/1.1\r\nHost: x\r\n"
                "Content-Range: bytes {}-{}/*\r\nContent-Length: 4096\r\n"
                "Expect: 100-continue\r\n\r\n".format(
                    t["uuid"], len(data), len(data) + 4095)).encode())
            first = b""
            while b"\r\n" not in first:
                got = sock.recv(4096)
                assert got, first
                first += got
            assert first.startswith(b"HTTP/1.1 416 "), first


# Unauthenticated clients holding workers, slots and the selector.

def _cpu_seconds(pid):
    with open("/proc/{}/stat".format(pid)) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("target", ["PUT /nothing", "PUT /info/"])
def test_trickled_refused_bodies_hold_no_threads(daemon, target):
    # 40 requests refused before their bodies (404, 405), whose bodies
    # then trickle in a byte every 0.5 s: each is answered at once, and
    # the daemon does not hold a worker thread per connection while it
    # drops the bodies.
    before = _threads(daemon.proc.pid)
    socks = []
    try:
        for _ in range(40):
            s = connect_raw(daemon, "local", timeout=5)
            s.sendall("{} HTTP/1.1\r\nHost: x\r\nContent-Length: 100"
                      "\r\n\r\n".format(target).encode())
            socks.append(s)
        for s in socks:
            resp = http.client.HTTPResponse(s)
            resp.begin()
            assert resp.status in (404, 405)
            resp.read()
        # Worker threads that served the 40 requests at once exit after
        # 5 s idle (imageio.workers.WORKER_IDLE); none waits for the
        # trickling bodies.
        for _ in range(14):
            for s in socks:
                s.sendall(b"x")
            time.sleep(0.5)
        assert _threads(daemon.proc.pid) < before + 10
    finally:
        for s in socks:
            s.close()


def test_trickled_refused_body_deadline(make_daemon):
    # The refused body must arrive within header_timeout in all, however
    # it trickles; a client that sends it whole keeps its connection.
    d = make_daemon("[daemon]\nheader_timeout = 2\n")
    s = connect_raw(d, "local", timeout=10)
    s.sendall(b"PUT /nothing HTTP/1.1\r\nHost: x\r\nContent-Length: 100"
              b"\r\n\r\n")
    resp = http.client.HTTPResponse(s)
    resp.begin()
    assert resp.status == 404
    resp.read()
    start = time.monotonic()
    closed = False
    for _ in range(40):
        try:
            s.sendall(b"x")
        except OSError:
            closed = True
            break
        if _closed(s, 0.25):
            closed = True
            break
    assert closed and time.monotonic() - start < 6
    s.close()
    # Whole body: the next request on the connection is served.
    s = connect_raw(d, "local", timeout=10)
    s.sendall(b"PUT /nothing HTTP/1.1\r\nHost: x\r\nContent-Length: 5"
              b"\r\n\r\nhello" + b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n")
    got = b""
    deadline = time.monotonic() + 5
    while got.count(b"HTTP/1.1 404") < 2 and time.monotonic() < deadline:
        got += s.recv(65536)
    assert got.count(b"HTTP/1.1 404") == 2, got
    s.close()


def test_unbound_keepalive_connections_evicted_at_cap(make_daemon, tmp_path):
    # max_clients keep-alive connections that never used a ticket
    # (OPTIONS /images/*, 404s): a ticket holder must still get in.
    d = make_daemon("[daemon]\nmax_clients = 8\n")
    data = os.urandom(64 * KiB)
    path = make_image(tmp_path / "image.raw", len(data), data)
    t = add(d, path, len(data), ops=["read"])
    pingers = []
    for i in range(8):
        con = d.unix(timeout=10)
        resp, _ = request(con, "OPTIONS" if i % 2 else "GET",
                          "/images/*" if i % 2 else "/nothing")
        pingers.append(con)
    start = time.monotonic()
    con = d.unix(timeout=10)
    resp, body = request(con, "GET", "/images/" + t["uuid"],
                         headers={"Range": "bytes=0-4095"})
    assert resp.status == 206 and body == data[:4096]
    assert time.monotonic() - start < 5
    con.close()
    for p in pingers:
        p.close()


def _rss_kib(pid):
    with open("/proc/{}/status".format(pid)) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])


def test_full_unix_socket_does_not_stall_selector(daemon, tmp_path):
    # A local client that keeps its socket full (pipelined requests, two
    # threads writing) must not keep the selector receiving for ever:
    # memory stays bounded and idle connections are served meanwhile.
    data = os.urandom(64 * KiB)
    path = make_image(tmp_path / "image.raw", len(data), data)
    t = add(daemon, path, len(data), ops=["read"])
    stop = threading.Event()
    s = connect_raw(daemon, "local", timeout=10)
    junk = b"OPTIONS /images/* HTTP/1.1\r\nHost: x\r\n\r\n" * 20000

    def blast():
        try:
            while not stop.is_set():
                s.sendall(junk)
        except OSError:
            pass

    def drain():
        try:
            while not stop.is_set() and s.recv(1024 * KiB):
                pass
        except OSError:
            pass

    idle = daemon.unix(timeout=10)
    idle.connect()
    rss = _rss_kib(daemon.proc.pid)
    threads = [threading.Thread(target=f) for f in (blast, blast, drain)]
    for th in threads:
        th.start()
    try:
        time.sleep(1)
        start = time.monotonic()
        resp, body = request(idle, "GET", "/images/" + t["uuid"],
                             headers={"Range": "bytes=0-99"})
        assert resp.status == 206 and body == data[:100]
        assert time.monotonic() - start < 3
        assert _rss_kib(daemon.proc.pid) - rss < 256 * 1024
    finally:
        stop.set()
        s.shutdown(socket.SHUT_RDWR)
        for th in threads:
            th.join(20)
        s.close()
    idle.close()


def test_control_characters_in_path_do_not_forge_log_lines(daemon):
    s = connect_raw(daemon, "local", timeout=10)
    with s:
        s.sendall(b"GET /x%0A2026-01-01%2000:00:00,000%20INFO%20FORGED "
                  b"HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = http.client.HTTPResponse(s)
        resp.begin()
        assert resp.status == 404
        resp.read()
    time.sleep(0.2)
    for line in daemon.log().splitlines():
        assert not line.startswith("2026-01-01"), line


def test_refused_requests_log_rate_limited(daemon):
    before = daemon.log().count("/flood-")
    con = daemon.unix(timeout=10)
    for i in range(300):
        resp, _ = request(con, "GET", "/flood-{}".format(i))
        assert resp.status == 404
    con.close()
    time.sleep(0.2)
    assert daemon.log().count("/flood-") - before < 30


@pytest.mark.parametrize("where", ["images", "control"])
def test_deeply_nested_json_is_bad_request(daemon, image, where):
    path, data = image
    t = add(daemon, path, len(data))
    body = b"[" * 30000 + b"]" * 30000
    if where == "images":
        s = connect_raw(daemon, "local", timeout=10)
        target = "/images/" + t["uuid"]
    else:
        s = connect_raw(daemon, "control", timeout=10)
        target = "/tickets/" + t["uuid"]
    with s:
        s.sendall("{} {} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n"
                  "Content-Type: application/json\r\n\r\n".format(
                      "PATCH", target, len(body)).encode() + body)
        resp = http.client.HTTPResponse(s)
        resp.begin()
        assert resp.status == 400, resp.read()
        assert b"JSON" in resp.read()
