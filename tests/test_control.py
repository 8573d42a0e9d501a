"""The control service of a real daemon process."""

import json
import os
import stat
import uuid

import pytest

from conftest import new_ticket


def request(daemon, method, path, body=None, headers=None):
    con = daemon.control()
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        con.request(method, path, body=body, headers=headers or {})
        resp = con.getresponse()
        return resp.status, resp.read()
    finally:
        con.close()


@pytest.fixture
def ticket(daemon, tmp_path):
    path = tmp_path / "image"
    path.write_bytes(b"x" * 4096)
    t = new_ticket("file://" + str(path), 4096)
    status, _ = request(daemon, "PUT", "/tickets/" + t["uuid"], t)
    assert status == 200
    yield t
    request(daemon, "DELETE", "/tickets/" + t["uuid"])


def test_put_get(daemon, ticket):
    status, body = request(daemon, "GET", "/tickets/" + ticket["uuid"])
    assert status == 200
    info = json.loads(body)
    for key in ("uuid", "size", "url", "timeout", "ops"):
        assert info[key] == ticket[key]
    for key in ("active", "canceled", "connections", "expires", "idle_time",
                "sparse", "dirty", "inactivity_timeout"):
        assert key in info
    assert info["inactivity_timeout"] == 60


def test_get_unknown(daemon):
    status, body = request(daemon, "GET", "/tickets/" + str(uuid.uuid4()))
    assert status == 404
    assert b"No such ticket" in body


def test_list(daemon, ticket):
    status, body = request(daemon, "GET", "/tickets/")
    assert status == 200
    assert ticket["uuid"] in json.loads(body)


def test_patch_timeout(daemon, ticket):
    path = "/tickets/" + ticket["uuid"]
    status, _ = request(daemon, "PATCH", path, {"timeout": 0})
    assert status == 200
    # Expired: images refuse it...
    con = daemon.unix()
    con.request("GET", "/images/" + ticket["uuid"])
    resp = con.getresponse()
    assert resp.status == 403
    assert b"expired" in resp.read()
    con.close()
    # ...and a new timeout re-enables it.
    status, _ = request(daemon, "PATCH", path, {"timeout": 300})
    assert status == 200
    info = json.loads(request(daemon, "GET", path)[1])
    assert info["timeout"] == 300


def test_patch_unknown(daemon):
    status, _ = request(daemon, "PATCH", "/tickets/nosuch", {"timeout": 1})
    assert status == 404


def test_delete_idempotent(daemon, ticket):
    path = "/tickets/" + ticket["uuid"]
    assert request(daemon, "DELETE", path)[0] == 204
    assert request(daemon, "GET", path)[0] == 404
    assert request(daemon, "DELETE", path)[0] == 204


def test_delete_all(daemon, tmp_path):
    ids = []
    for i in range(3):
        t = new_ticket("file:///var/tmp/nosuch-{}".format(i), 1)
        assert request(daemon, "PUT", "/tickets/" + t["uuid"], t)[0] == 200
        ids.append(t["uuid"])
    assert request(daemon, "DELETE", "/tickets/")[0] == 204
    assert json.loads(request(daemon, "GET", "/tickets/")[1]) == []


@pytest.mark.parametrize("body,status,word", [
    (b"{not json", 400, b"JSON"),
    (b"\xff\xfe", 400, b"JSON"),
    (b"[1, 2]", 400, b"object"),
    (b'{"url": "file:///x"}', 400, b"'uuid'"),
    (b" " * (64 * 1024 + 1), 413, b"too large"),
])
def test_put_bad_body_changes_nothing(daemon, body, status, word):
    ticket_id = str(uuid.uuid4())
    got, text = request(daemon, "PUT", "/tickets/" + ticket_id, body)
    assert got == status
    assert word in text
    assert request(daemon, "GET", "/tickets/" + ticket_id)[0] == 404


def test_put_uuid_mismatch(daemon):
    t = new_ticket("file:///var/tmp/x", 1)
    status, body = request(daemon, "PUT", "/tickets/other", t)
    assert status == 400
    assert b"uuid" in body


def test_put_unsupported_url(daemon):
    t = new_ticket("ftp://host/x", 1)
    status, body = request(daemon, "PUT", "/tickets/" + t["uuid"], t)
    assert status == 400
    assert b"'url'" in body


def test_method_not_allowed(daemon):
    status, _ = request(daemon, "POST", "/tickets/x", b"{}")
    assert status == 405


def test_unknown_path(daemon):
    assert request(daemon, "GET", "/nosuch")[0] == 404


def test_control_socket_mode(daemon):
    st = os.stat(daemon.control_socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660


def test_control_over_tcp(make_daemon):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = make_daemon("[control]\ntransport = tcp\nport = {}\n".format(port))
    t = new_ticket("file:///var/tmp/x", 1)
    with d.client() as c:
        c.add_ticket(t)
        assert c.get_ticket(t["uuid"])["size"] == 1
        c.del_ticket(t["uuid"])
    assert "http://127.0.0.1:{}".format(port) in d.log()


def test_readd_with_other_url_stops_old_writer(daemon, tmp_path):
    # A ticket re-added with another image: the connection streaming a
    # PUT into the old image is stopped before the PUT /tickets answers,
    # and the DELETE that follows answers 204 with no writer left behind.
    import socket as socketlib
    import time
    old_path = tmp_path / "old.raw"
    new_path = tmp_path / "new.raw"
    size = 64 * 1024**2
    for p in (old_path, new_path):
        with open(p, "wb") as f:
            f.truncate(size)
    t = new_ticket("file://" + str(old_path), size)
    assert request(daemon, "PUT", "/tickets/" + t["uuid"], t)[0] == 200
    s = socketlib.socket(socketlib.AF_UNIX)
    s.settimeout(10)
    s.connect(daemon.local_socket)
    s.sendall(("PUT /images/{} HTTP/1.1\r\nHost: x\r\n"
               "Transfer-Encoding: chunked\r\n\r\n").format(t["uuid"])
              .encode())
    chunk = b"\x55" * 65536
    s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    time.sleep(0.3)
    t2 = dict(t, url="file://" + str(new_path))
    assert request(daemon, "PUT", "/tickets/" + t["uuid"], t2)[0] == 200
    # The old writer is gone: what it sends now lands nowhere.
    late = b"\xaa" * 65536
    try:
        for _ in range(64):
            s.sendall(b"%x\r\n%s\r\n" % (len(late), late))
    except OSError:
        pass
    s.close()
    assert request(daemon, "DELETE", "/tickets/" + t["uuid"])[0] == 204
    with open(old_path, "rb") as f:
        assert b"\xaa" not in f.read()
    with open(new_path, "rb") as f:
        assert f.read().count(b"\0") == size
