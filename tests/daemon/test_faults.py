"""Faults through the real daemon: full filesystem, NBD servers that die,
fail or crawl, clients that vanish, SIGTERM and kill -9 during transfers,
tickets expiring under a running transfer.

Every scenario checks integrity the same way: a request either failed
visibly (an error status with a message, or a cut connection) or the data
on storage is exactly what the client sent.  Never a 200 for bytes that
were not written.
"""

import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from harness import nbdserver
from harness import net
from conftest import (new_ticket, request, make_image, connect, connect_raw,
                      ticket_info, wait_idle)

KiB = 1024
MiB = 1024**2


# Helpers.

read_response = net.read_response


def put_head(ticket_id, length, offset=0, query=""):
    return ("PUT /images/{}{} HTTP/1.1\r\nHost: localhost\r\n"
            "Content-Length: {}\r\nContent-Range: bytes {}-{}/*\r\n\r\n"
            .format(ticket_id, query, length, offset,
                    offset + length - 1)).encode()


def send_quietly(sock, data, chunk=MiB):
    """Send what the daemon takes; stop when it closes the connection."""
    view = memoryview(data)
    sent = 0
    try:
        while sent < len(view):
            sock.sendall(view[sent:sent + chunk])
            sent += len(view[sent:sent + chunk])
    except OSError:
        pass
    return sent


def add(daemon, url_or_path, size, **kw):
    url = str(url_or_path)
    if url.startswith("/"):
        url = "file://" + url
    t = new_ticket(url, size, **kw)
    daemon.add_ticket(t)
    return t


def assert_serving(daemon, tmp_path):
    """The daemon serves a fresh ticket on both services."""
    data = os.urandom(64 * KiB)
    path = make_image(tmp_path / "other-{}.raw".format(time.monotonic_ns()),
                      len(data), data)
    t = add(daemon, path, len(data))
    for svc in ("remote", "local"):
        con = connect(daemon, svc, timeout=20)
        resp, body = request(con, "GET", "/images/" + t["uuid"])
        assert resp.status == 200, body
        assert body == data
        con.close()


def get_until_status(daemon, service, ticket_id, status, headers=None,
                     timeout=15):
    """Retry a GET on new connections until it answers ``status``."""
    deadline = time.monotonic() + timeout
    while True:
        con = connect(daemon, service, timeout=20)
        try:
            resp, body = request(con, "GET", "/images/" + ticket_id,
                                 headers=headers)
        except (http.client.HTTPException, OSError) as e:
            resp, body = None, e
        con.close()
        if resp is not None and resp.status == status:
            return body
        if time.monotonic() > deadline:
            raise AssertionError("GET never answered {}: last {} {!r}".format(
                status, resp and resp.status, body))
        time.sleep(0.2)


# A full filesystem during PUT.

@pytest.fixture
def small_fs(tmp_path):
    """An 8 MiB tmpfs, unmounted at the end (lazily: the daemon may still
    hold the image open on an idle connection)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs",
                    str(mnt)], check=True, timeout=30)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], timeout=30)


def test_full_filesystem_large_put(daemon, small_fs, tmp_path):
    # A sparse 32 MiB image on an 8 MiB filesystem; the client uploads it
    # all.  The daemon must answer 507 (or 500) with a message and close,
    # never 200.
    size = 32 * MiB
    path = make_image(small_fs / "image.raw", size)
    t = add(daemon, path, size)
    data = os.urandom(size)
    sock = connect_raw(daemon, "local", timeout=30)
    with sock:
        sock.sendall(put_head(t["uuid"], size))
        sender = threading.Thread(target=send_quietly, args=(sock, data))
        sender.start()
        status, body = read_response(sock)
        sock.shutdown(socket.SHUT_RDWR)
        sender.join(30)
    assert status in (507, 500), (status, body)
    assert b"space" in body.lower() or b"error" in body.lower(), body
    info = wait_idle(daemon, t["uuid"])
    assert not info["active"]
    # What was written, if anything, is the client's data: no garbage.
    with open(path, "rb") as f:
        written = f.read()
    nonzero = len(written.rstrip(b"\0"))
    assert written[:nonzero] == data[:nonzero]
    assert nonzero < size
    assert_serving(daemon, tmp_path)


@pytest.mark.parametrize("flush", ["y", "n"])
def test_full_filesystem_small_put(daemon, service, small_fs, tmp_path,
                                   flush):
    # The filesystem has 512 KiB left; the client sends 1 MiB (a body the
    # daemon can drain, so the client gets the answer on any transport).
    filler = small_fs / "filler"
    with open(filler, "wb") as f:
        f.write(b"\xff" * (7 * MiB + 512 * KiB))
    size = 4 * MiB
    path = make_image(small_fs / "image.raw", size)
    t = add(daemon, path, size)
    data = os.urandom(MiB)
    # Headers and body in one write: the daemon finds body bytes buffered
    # with the headers.  (A body arriving after the headers takes another
    # path: test_full_filesystem_put_answered_promptly.)
    sock = connect_raw(daemon, service, timeout=30)
    with sock:
        sock.sendall(put_head(t["uuid"], MiB, query="?flush=" + flush)
                     + data)
        status, body = read_response(sock)
    assert status in (507, 500), (status, body)
    assert body.strip(), "error without a message"
    wait_idle(daemon, t["uuid"])
    # Freeing space makes the same ticket writable again.
    filler.unlink()
    con = connect(daemon, service, timeout=30)
    resp, body = request(con, "PUT", "/images/" + t["uuid"], body=data,
                         headers={"Content-Range":
                                  "bytes 0-{}/*".format(MiB - 1)})
    assert resp.status == 200, body
    with open(path, "rb") as f:
        assert f.read(MiB) == data


# NBD server killed mid-PUT.

def test_nbd_server_killed_mid_put(daemon, tmp_path):
    size = 64 * MiB
    original = os.urandom(MiB)
    path = make_image(tmp_path / "disk.raw", size, original)
    sock_path = str(tmp_path / "nbd.sock")
    srv = nbdserver.qemu_nbd(path, "raw", sock=sock_path).start()
    try:
        t = add(daemon, srv.url(), size)
        data = os.urandom(size)
        sock = connect_raw(daemon, "local", timeout=30)
        with sock:
            sock.sendall(put_head(t["uuid"], size))
            sock.sendall(data[:16 * MiB])
            time.sleep(0.3)
            srv.kill()
            sender = threading.Thread(target=send_quietly,
                                      args=(sock, data[16 * MiB:]))
            sender.start()
            status, body = read_response(sock)
            sock.shutdown(socket.SHUT_RDWR)
            sender.join(30)
        # An error, or a cut connection: never a success.
        assert status != 200, body
        if status is not None:
            assert status >= 500 and body.strip(), (status, body)
        wait_idle(daemon, t["uuid"])
    finally:
        srv.kill()
    # A new server on the same socket: the next request reconnects.
    srv = nbdserver.qemu_nbd(path, "raw", sock=sock_path).start()
    with srv:
        new = os.urandom(MiB)
        deadline = time.monotonic() + 15
        while True:
            con = daemon.unix(timeout=20)
            try:
                resp, body = request(con, "PUT", "/images/" + t["uuid"],
                                     body=new, headers={
                                         "Content-Range": "bytes {}-{}/*"
                                         .format(32 * MiB, 33 * MiB - 1)})
            except (http.client.HTTPException, OSError) as e:
                resp, body = None, e
            if (resp is not None and resp.status == 200) \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert resp is not None and resp.status == 200, body
        body = get_until_status(daemon, "local", t["uuid"], 206, headers={
            "Range": "bytes={}-{}".format(32 * MiB, 33 * MiB - 1)})
        assert body == new
    with open(path, "rb") as f:
        f.seek(32 * MiB)
        assert f.read(MiB) == new


# nbdkit error filter: failures at a rate.

def test_nbd_write_errors_at_rate(daemon, service, tmp_path):
    # 20% of NBD writes fail with EIO.  Each PUT must either fail visibly
    # or have its bytes on storage exactly.  (inactivity_timeout=2 bounds
    # the cost of the slow error answers of
    # test_nbd_write_error_answered_promptly.)
    size = 16 * MiB
    path = make_image(tmp_path / "disk.raw", size)
    srv = nbdserver.nbdkit("file", "file={}".format(path),
                           "error-pwrite-rate=20%", "error=EIO",
                           sock=str(tmp_path / "nbd.sock"), filters=["error"])
    chunk = 256 * KiB
    ok, failed = [], []
    with srv.start():
        t = add(daemon, srv.url(), size, inactivity_timeout=2)
        con = connect(daemon, service, timeout=20)
        for i in range(30):
            offset = i * chunk
            data = os.urandom(chunk)
            try:
                resp, body = request(con, "PUT", "/images/" + t["uuid"],
                                     body=data, headers={
                                         "Content-Range": "bytes {}-{}/*"
                                         .format(offset, offset + chunk - 1)})
                status = resp.status
            except (http.client.HTTPException, OSError) as e:
                status, body = None, e
            if status == 200:
                ok.append((offset, data))
            else:
                assert status is None or (status >= 500 and body.strip()), \
                    (status, body)
                failed.append(offset)
            if status != 200 or resp.will_close:
                con.close()
                con = connect(daemon, service, timeout=20)
        con.close()
        wait_idle(daemon, t["uuid"])
    # Both outcomes happened (P(no failure in 30) = 0.8**30 ~ 1e-3).
    assert ok and failed, (len(ok), len(failed))
    with open(path, "rb") as f:
        for offset, data in ok:
            f.seek(offset)
            assert f.read(chunk) == data, "PUT at {} returned 200 but the " \
                "data is not on storage".format(offset)


def put_body_after_headers(daemon, ticket_id, data, timeout=8):
    """PUT over the unix socket the way a streaming client does: headers
    first, the body a moment later (so the daemon receives the body
    straight from the socket).  Return (status, body, seconds to the
    answer)."""
    sock = connect_raw(daemon, "local", timeout=timeout)
    with sock:
        sock.sendall(put_head(ticket_id, len(data)))
        time.sleep(0.3)
        start = time.monotonic()
        send_quietly(sock, data)
        status, body = read_response(sock)
        return status, body, time.monotonic() - start


def test_full_filesystem_put_answered_promptly(daemon, small_fs):
    # 512 KiB left, a 1 MiB body that the client sends whole, then waits
    # for the answer.  The daemon must answer 507 at once; it must not wait
    # for body bytes it already received.
    with open(small_fs / "filler", "wb") as f:
        f.write(b"\xff" * (7 * MiB + 512 * KiB))
    size = 4 * MiB
    path = make_image(small_fs / "image.raw", size)
    t = add(daemon, path, size)
    status, body, elapsed = put_body_after_headers(
        daemon, t["uuid"], os.urandom(MiB))
    assert status == 507, (status, body, elapsed)
    assert elapsed < 5, "507 took {:.1f}s".format(elapsed)


def test_nbd_write_error_answered_promptly(daemon, tmp_path):
    # Every NBD write fails; the client sent its whole 256 KiB body and
    # waits: the 500 must come at once, not after the inactivity timeout.
    size = 8 * MiB
    srv = nbdserver.nbdkit("memory", "size={}".format(size),
                           "error-pwrite-rate=100%", "error=EIO",
                           sock=str(tmp_path / "nbd.sock"), filters=["error"])
    with srv.start():
        t = add(daemon, srv.url(), size)
        status, body, elapsed = put_body_after_headers(
            daemon, t["uuid"], os.urandom(256 * KiB))
    assert status == 500, (status, body, elapsed)
    assert elapsed < 5, "500 took {:.1f}s".format(elapsed)


def test_nbd_read_errors_at_rate(daemon, tmp_path):
    # 20% of NBD reads fail.  Each GET either fails visibly (5xx, or a cut
    # body) or returns exactly the image's bytes.
    size = 16 * MiB
    image = os.urandom(size)
    path = make_image(tmp_path / "disk.raw", size, image)
    srv = nbdserver.nbdkit("file", "file={}".format(path),
                           "error-pread-rate=20%", "error=EIO", read_only=True,
                           sock=str(tmp_path / "nbd.sock"), filters=["error"])
    good = bad = 0
    with srv.start():
        t = add(daemon, srv.url(), size, ops=["read"])
        for i in range(30):
            # Small reads answer before the headers; large ones stream.
            length = 128 * KiB if i % 2 else 3 * MiB
            offset = (i * 397 * KiB) % (size - length)
            con = daemon.unix(timeout=30)
            try:
                resp, body = request(con, "GET", "/images/" + t["uuid"],
                                     headers={"Range": "bytes={}-{}".format(
                                         offset, offset + length - 1)})
            except http.client.IncompleteRead as e:
                assert len(e.partial) < length
                bad += 1
                continue
            except (http.client.HTTPException, OSError):
                bad += 1
                continue
            finally:
                con.close()
            if resp.status == 206:
                assert body == image[offset:offset + length], \
                    "206 with wrong data at {}+{}".format(offset, length)
                good += 1
            else:
                assert resp.status >= 500 and body.strip(), \
                    (resp.status, body)
                bad += 1
        wait_idle(daemon, t["uuid"])
    assert good and bad, (good, bad)


def test_nbd_slow_server(daemon, tmp_path):
    # Every NBD read and write takes 50 ms more: requests are slower but
    # complete, correctly.
    size = 8 * MiB
    path = make_image(tmp_path / "disk.raw", size)
    srv = nbdserver.nbdkit("file", "file={}".format(path),
                           "delay-read=50ms", "delay-write=50ms",
                           "delay-zero=50ms", "delay-extents=50ms",
                           sock=str(tmp_path / "nbd.sock"), filters=["delay"])
    data = os.urandom(4 * MiB)
    with srv.start():
        t = add(daemon, srv.url(), size)
        for svc in ("remote", "local"):
            con = connect(daemon, svc, timeout=60)
            start = time.monotonic()
            resp, body = request(con, "PUT", "/images/" + t["uuid"],
                                 body=data)
            assert resp.status == 200, body
            resp, body = request(con, "GET", "/images/" + t["uuid"],
                                 headers={"Range": "bytes=0-{}".format(
                                     len(data) - 1)})
            assert resp.status == 206
            assert body == data
            resp, body = request(con, "PATCH", "/images/" + t["uuid"],
                                 body=json.dumps({"op": "zero",
                                                  "offset": 6 * MiB,
                                                  "size": MiB}))
            assert resp.status == 200, body
            resp, body = request(con, "GET",
                                 "/images/{}/extents".format(t["uuid"]))
            assert resp.status == 200, body
            extents = json.loads(body)
            assert extents[0]["start"] == 0
            assert sum(e["length"] for e in extents) == size
            resp, body = request(con, "GET",
                                 "/images/{}/checksum".format(t["uuid"]))
            assert resp.status == 200, body
            # The delays were really there.
            assert time.monotonic() - start > 0.2
            con.close()
    with open(path, "rb") as f:
        assert f.read(len(data)) == data


# Clients that vanish.

def _log_grew_with(daemon, before, words):
    text = daemon.log()[before:]
    return any(w in text for w in words)


def test_client_disconnects_mid_get(daemon, service, tmp_path):
    size = 1024 * MiB
    head = os.urandom(MiB)
    path = make_image(tmp_path / "big.raw", size, head)
    t = add(daemon, path, size)
    log_pos = len(daemon.log())
    con = connect(daemon, service, timeout=30)
    con.request("GET", "/images/" + t["uuid"])
    resp = con.getresponse()
    assert resp.status == 200
    assert resp.read(MiB) == head
    assert ticket_info(daemon, t["uuid"])["active"]
    # Gone without a word, most of the image unread.
    con.sock.shutdown(socket.SHUT_RDWR)
    con.close()
    info = wait_idle(daemon, t["uuid"])
    assert not info["active"] and info["connections"] == 0
    # The daemon noticed and logged it.
    deadline = time.monotonic() + 5
    while not _log_grew_with(daemon, log_pos, (
            "connection ended", "connection failed", "Broken pipe",
            "reset", "closing connection")):
        assert time.monotonic() < deadline, daemon.log()[log_pos:]
        time.sleep(0.1)
    # And serves the next client, on the same ticket.
    con = connect(daemon, service)
    resp, body = request(con, "GET", "/images/" + t["uuid"],
                         headers={"Range": "bytes=0-{}".format(MiB - 1)})
    assert resp.status == 206 and body == head


def test_client_disconnects_mid_put(daemon, service, tmp_path):
    size = 64 * MiB
    original = os.urandom(size)
    path = make_image(tmp_path / "image.raw", size, original)
    t = add(daemon, path, size)
    log_pos = len(daemon.log())
    data = os.urandom(size)
    sent = 5 * MiB + 123
    sock = connect_raw(daemon, service, timeout=30)
    sock.sendall(put_head(t["uuid"], size))
    sock.sendall(data[:sent])
    time.sleep(0.2)
    sock.close()
    info = wait_idle(daemon, t["uuid"])
    assert not info["active"] and info["connections"] == 0
    deadline = time.monotonic() + 5
    while not _log_grew_with(daemon, log_pos, (
            "connection ended", "connection failed", "400", "short",
            "Short", "closed")):
        assert time.monotonic() < deadline, daemon.log()[log_pos:]
        time.sleep(0.1)
    # Nothing beyond what the client sent was touched: the rest of the
    # image is the original; what was written is the client's data.
    with open(path, "rb") as f:
        got = f.read()
    assert got[sent:] == original[sent:]
    for i in range(0, sent, MiB):
        block = got[i:min(i + MiB, sent)]
        assert block in (data[i:i + len(block)], original[i:i + len(block)])
    # The next client is served, on the same ticket.
    con = connect(daemon, service)
    resp, body = request(con, "PUT", "/images/" + t["uuid"],
                         body=data[:MiB],
                         headers={"Content-Range": "bytes 0-{}/*".format(
                             MiB - 1)})
    assert resp.status == 200, body
    resp, body = request(con, "GET", "/images/" + t["uuid"],
                         headers={"Range": "bytes=0-{}".format(MiB - 1)})
    assert body == data[:MiB]


# The daemon itself stopped or killed.

def test_sigterm_during_transfers(make_daemon, tmp_path):
    d = make_daemon()
    size = 1024 * MiB
    path = make_image(tmp_path / "big.raw", size, os.urandom(MiB))
    t = add(d, path, size)
    # A GET whose client reads, a GET whose client stopped reading (the
    # daemon blocks sending), a PUT stalled mid-body.
    reading = d.unix(timeout=30)
    reading.request("GET", "/images/" + t["uuid"])
    reading_resp = reading.getresponse()
    stuck = connect_raw(d, "remote", timeout=30)
    stuck.sendall("GET /images/{} HTTP/1.1\r\nHost: x\r\n\r\n".format(
        t["uuid"]).encode())
    stalled = connect_raw(d, "local", timeout=30)
    stalled.sendall(put_head(t["uuid"], 64 * MiB, offset=512 * MiB))
    stalled.sendall(os.urandom(MiB))
    reading_resp.read(4 * MiB)
    time.sleep(0.5)
    assert ticket_info(d, t["uuid"])["active"]

    stop_reading = threading.Event()

    def read_on():
        try:
            while not stop_reading.is_set() and reading_resp.read(MiB):
                pass
        except (http.client.HTTPException, OSError, ValueError):
            pass

    reader = threading.Thread(target=read_on)
    reader.start()
    start = time.monotonic()
    try:
        d.proc.send_signal(signal.SIGTERM)
        rc = d.proc.wait(15)
    finally:
        stop_reading.set()
        reader.join(10)
        stuck.close()
        stalled.close()
        reading.close()
    elapsed = time.monotonic() - start
    assert rc == 0, d.log()[-3000:]
    assert elapsed < 15
    log = d.log()
    assert "Stopped" in log
    # The sockets it created are gone.
    assert not os.path.exists(d.local_socket)
    assert not os.path.exists(d.control_socket)


def test_flushed_put_survives_kill9_file(make_daemon, tmp_path):
    d = make_daemon()
    size = 48 * MiB
    path = make_image(tmp_path / "image.raw", size)
    t = add(d, path, size)
    data = os.urandom(size - 3 * MiB - 17)
    offset = 3 * MiB + 17
    con = d.unix(timeout=60)
    resp, body = request(con, "PUT", "/images/{}?flush=y".format(t["uuid"]),
                         body=data, headers={
                             "Content-Range": "bytes {}-{}/*".format(
                                 offset, offset + len(data) - 1)})
    assert resp.status == 200, body
    # Killed right after the answer: nothing may still be in flight.
    d.proc.kill()
    d.proc.wait(10)
    with open(path, "rb") as f:
        f.seek(offset)
        assert hashlib.sha256(f.read()).digest() == \
            hashlib.sha256(data).digest()


def test_flushed_put_survives_kill9_nbd_qcow2(make_daemon, tmp_path):
    # qemu-nbd keeps qcow2 metadata in its cache until a flush: killing
    # both the daemon and qemu-nbd with SIGKILL right after a flush=y 200
    # must lose nothing.
    d = make_daemon()
    size = 32 * MiB
    image = tmp_path / "disk.qcow2"
    nbdserver.qemu_img("create", "-f", "qcow2", image, size)
    srv = nbdserver.qemu_nbd(image, "qcow2", sock=str(tmp_path / "nbd.sock"),
                             cache="writeback").start()
    pieces = [(0, os.urandom(MiB)), (5 * MiB + 4096, os.urandom(3 * MiB)),
              (31 * MiB, os.urandom(MiB))]
    try:
        t = add(d, srv.url(), size)
        con = d.unix(timeout=60)
        for offset, data in pieces:
            resp, body = request(
                con, "PUT", "/images/{}?flush=y".format(t["uuid"]),
                body=data, headers={"Content-Range": "bytes {}-{}/*".format(
                    offset, offset + len(data) - 1)})
            assert resp.status == 200, body
        d.proc.kill()
        srv.proc.kill()
        d.proc.wait(10)
        srv.proc.wait(10)
    finally:
        srv.kill()
    raw = tmp_path / "back.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw",
                    str(image), str(raw)], check=True, timeout=60,
                   stderr=subprocess.PIPE)
    with open(raw, "rb") as f:
        for offset, data in pieces:
            f.seek(offset)
            assert f.read(len(data)) == data


# Ticket deleted during a PUT (during a GET: tests/test_images.py).

@pytest.mark.parametrize("stall", [False, True], ids=["sending", "stalled"])
def test_ticket_deleted_during_put(daemon, service, tmp_path, stall):
    """DELETE while a client uploads: the upload stops (never a 200), the
    DELETE answers 204 in bounded time even when the client stalls
    mid-body (the daemon then shuts the connection down after its grace
    period), and the ticket is gone."""
    size = 512 * MiB
    path = make_image(tmp_path / "image.raw", size)
    t = add(daemon, path, size)
    data = os.urandom(8 * MiB)
    sock = connect_raw(daemon, service, timeout=30)
    stop = threading.Event()
    sent = [0]

    def feed():
        try:
            while not stop.is_set() and sent[0] < size:
                n = min(len(data), size - sent[0])
                sock.sendall(data[:n])
                sent[0] += n
                if stall and sent[0] >= 16 * MiB:
                    stop.wait(30)
        except OSError:
            pass

    with sock:
        sock.sendall(put_head(t["uuid"], size))
        feeder = threading.Thread(target=feed)
        feeder.start()
        deadline = time.monotonic() + 10
        while sent[0] < 16 * MiB:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        start = time.monotonic()
        with daemon.client() as c:
            c.del_ticket(t["uuid"])
        elapsed = time.monotonic() - start
        if service == "local":
            status, body = read_response(sock)
        else:
            # (Reading while the feeder writes the same TLS socket is not
            # safe: stop it first.)
            stop.set()
            feeder.join(30)
            status, body = read_response(sock)
        stop.set()
        feeder.join(30)
    assert elapsed < 10, elapsed
    assert status != 200, body
    if status is not None:
        assert status == 403 and body.strip(), (status, body)
    assert sent[0] < size
    con = connect(daemon, service)
    resp, body = request(con, "GET", "/images/" + t["uuid"],
                         headers={"Range": "bytes=0-0"})
    assert resp.status == 403


# Ticket expired during a transfer.

def test_ticket_expired_during_transfer(daemon, service, tmp_path):
    """What happens, by design: expiry refuses new requests, it does not
    interrupt a running one (DELETE does that).  The running GET completes
    with every byte; when it ends the ticket is expired (the operation's
    end extends it by the timeout, now 0), so the next request, on the
    same connection or a new one, gets 403; a new timeout re-enables it."""
    size = 256 * MiB
    head = os.urandom(MiB)
    path = make_image(tmp_path / "big.raw", size, head)
    t = add(daemon, path, size, ops=["read"])
    expected = hashlib.sha256(head + b"\0" * (size - MiB)).hexdigest()
    con = connect(daemon, service, timeout=30)
    con.request("GET", "/images/" + t["uuid"])
    resp = con.getresponse()
    assert resp.status == 200
    h = hashlib.sha256(resp.read(MiB))
    with daemon.client() as c:
        c.mod_ticket(t["uuid"], {"timeout": 0})
    received = MiB
    while True:
        chunk = resp.read(8 * MiB)
        if not chunk:
            break
        h.update(chunk)
        received += len(chunk)
    assert received == size
    assert h.hexdigest() == expected
    # Next request on the same connection: refused, connection closed.
    resp, body = request(con, "GET", "/images/" + t["uuid"],
                         headers={"Range": "bytes=0-0"})
    assert resp.status == 403
    assert b"expired" in body
    con.close()
    con = connect(daemon, service)
    resp, body = request(con, "GET", "/images/" + t["uuid"],
                         headers={"Range": "bytes=0-0"})
    assert resp.status == 403
    con.close()
    info = wait_idle(daemon, t["uuid"])
    assert not info["canceled"]
    # Re-enabled by a new timeout.
    with daemon.client() as c:
        c.mod_ticket(t["uuid"], {"timeout": 300})
    con = connect(daemon, service)
    resp, body = request(con, "GET", "/images/" + t["uuid"],
                         headers={"Range": "bytes=0-{}".format(MiB - 1)})
    assert resp.status == 206 and body == head


# An NBD server restarted between an unflushed write and the flush.

def _nbd_restart_scenario(daemon, tmp_path, connections):
    """PUT ?flush=n (answered 200) on ``connections[0]``, the NBD server
    (nbdkit's memory plugin: its data lives only in the process) restarts,
    then PATCH flush on ``connections[1]``.  The acknowledged bytes are
    gone, so the flush must fail; a GET must not be served from the new,
    empty server as if nothing happened on the writing connection."""
    size = 8 * MiB
    sock_path = str(tmp_path / "mem.sock")
    srv = nbdserver.nbdkit("memory", "size={}".format(size),
                           sock=sock_path).start()
    t = new_ticket(srv.url(), size)
    daemon.add_ticket(t)
    cons = [daemon.unix(timeout=20) for _ in range(2)]
    try:
        data = os.urandom(MiB)
        resp, body = request(cons[0], "PUT",
                             "/images/{}?flush=n".format(t["uuid"]),
                             body=data)
        assert resp.status == 200, body
        srv.kill()
        os.unlink(sock_path)  # A killed nbdkit leaves its socket behind.
        srv = nbdserver.nbdkit("memory", "size={}".format(size),
                               sock=sock_path).start()
        status, body = _flush(cons[connections], t)
        # An error naming the loss, or a cut connection: never a 200.
        assert status != 200, body
        if status is not None:
            assert status >= 500 and b"flush" in body.lower(), (status, body)
        # The writing connection does not go on as if nothing happened.
        status, body = _flush(cons[0], t)
        assert status != 200, body
    finally:
        for con in cons:
            con.close()
        srv.kill()
        with daemon.client() as c:
            c.del_ticket(t["uuid"])


def _flush(con, t):
    """(status, body) of PATCH flush, or (None, error) for a cut
    connection."""
    try:
        resp, body = request(con, "PATCH", "/images/" + t["uuid"],
                             body=json.dumps({"op": "flush"}).encode(),
                             headers={"Content-Type": "application/json"})
        return resp.status, body
    except (http.client.HTTPException, OSError) as e:
        return None, e


def test_nbd_restart_loses_unflushed_write_same_connection(daemon, tmp_path):
    _nbd_restart_scenario(daemon, tmp_path, 0)


def test_nbd_restart_loses_unflushed_write_other_connection(daemon,
                                                            tmp_path):
    _nbd_restart_scenario(daemon, tmp_path, 1)
