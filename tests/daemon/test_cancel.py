"""DELETE /tickets/ID against requests in flight, and long requests: a
DELETE answers only once no connection holds the ticket's backend, a
canceled ticket binds no new connection, and every request on it is 403.
Real daemon, real nbdkit (its delay filter makes operations slow)."""

import json
import threading
import time

import pytest

from harness import nbdserver
from conftest import new_ticket, request, add, connect, make_image

GiB = 1024**3


@pytest.fixture
def slow_zero(tmp_path):
    """An 8 GiB nbdkit memory export whose every zero request (at most
    1 GiB each) takes 0.5 s."""
    srv = nbdserver.nbdkit("memory", "8G", "delay-zero=500ms",
                           sock=str(tmp_path / "nbd.sock"),
                           filters=["delay"]).start()
    yield srv
    srv.stop()


def _delete(daemon, ticket_id):
    con = daemon.control()
    start = time.monotonic()
    resp, body = request(con, "DELETE", "/tickets/" + ticket_id)
    con.close()
    return resp.status, time.monotonic() - start


def test_delete_stops_huge_zero(daemon, service, slow_zero):
    # Zeroing 8 GiB takes 8 x 0.5 s.  A DELETE after the first step stops
    # it at the next one (the zero checks for cancel between 1 GiB steps)
    # and the PATCH gets 403, instead of the DELETE waiting out the whole
    # zero.
    t = new_ticket(slow_zero.url(), 8 * GiB)
    daemon.add_ticket(t)
    result = {}

    def patch():
        con = connect(daemon, service)
        resp, body = request(con, "PATCH", "/images/" + t["uuid"],
                             body=json.dumps({"op": "zero", "offset": 0,
                                              "size": 8 * GiB}))
        result["patch"] = resp.status, body

    th = threading.Thread(target=patch)
    th.start()
    time.sleep(0.7)
    status, elapsed = _delete(daemon, t["uuid"])
    th.join(20)
    assert status == 204
    assert elapsed < 2.5, elapsed
    assert result["patch"][0] == 403, result


@pytest.mark.parametrize("path", ["", "/checksum/algorithms", "/extents"])
def test_request_on_canceled_ticket_forbidden(daemon, service, tmp_path,
                                              path):
    # A keep-alive connection that used the ticket, then the ticket is
    # deleted: its next request (any kind) is 403, and the DELETE did not
    # wait for the idle connection (it was closed, backend released).
    image = make_image(tmp_path / "img.raw", 1024**2, b"x" * 4096)
    t = add(daemon, image, 1024**2)
    con = connect(daemon, service)
    resp, _ = request(con, "OPTIONS", "/images/" + t["uuid"])
    assert resp.status == 200
    status, elapsed = _delete(daemon, t["uuid"])
    assert status == 204 and elapsed < 2, elapsed
    con = connect(daemon, service)
    method = "OPTIONS" if not path else "GET"
    resp, body = request(con, method, "/images/" + t["uuid"] + path)
    assert resp.status == 403, body


@pytest.mark.slow
def test_chunked_upload_longer_than_header_timeout(daemon, tmp_path):
    # qemu-img convert ... | curl -T - : chunks keep coming for longer
    # than the header deadline; only the inactivity timeout applies
    # between them.  Both services at once, so the suite waits 70 s once.
    size = 1024**2
    chunks = [bytes([i + 1]) * 4096 for i in range(14)]

    def slow_chunks():
        for chunk in chunks:
            yield chunk
            time.sleep(5)  # 14 x 5 s = 70 s > 65 s.

    def upload(service, result):
        image = make_image(tmp_path / (service + ".raw"), size)
        t = add(daemon, image, size)
        con = connect(daemon, service, timeout=120)
        start = time.monotonic()
        con.request("PUT", "/images/" + t["uuid"], body=slow_chunks(),
                    encode_chunked=True)
        resp = con.getresponse()
        body = resp.read()
        with open(image, "rb") as f:
            written = f.read(len(chunks) * 4096)
        result[service] = (resp.status, body, time.monotonic() - start,
                           written)

    result = {}
    threads = [threading.Thread(target=upload, args=(svc, result))
               for svc in ("remote", "local")]
    for th in threads:
        th.start()
    for th in threads:
        th.join(150)
    for svc in ("remote", "local"):
        status, body, elapsed, written = result[svc]
        assert status == 200, (svc, body)
        assert elapsed > 65
        assert written == b"".join(chunks)
