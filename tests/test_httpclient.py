"""imageio.httpclient against a canned server on a unix socket: the one
HTTP client of the proxy backend and the transfer client."""

import os
import socket
import threading

import pytest

from imageio import errors
from imageio import httpclient


class Canned:
    """A unix socket server answering each connection's requests with
    the next canned responses (bytes), recording what it received."""

    def __init__(self, path, answers):
        self.path = path
        self.answers = list(answers)
        self.received = []
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        self.sock.listen(4)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while self.answers:
            try:
                con, _ = self.sock.accept()
            except OSError:
                return
            with con:
                while self.answers:
                    data = con.recv(65536)
                    if not data:
                        break
                    self.received.append(data)
                    answer = self.answers.pop(0)
                    if answer is None:
                        break  # Close without answering.
                    con.sendall(answer)

    def close(self):
        self.sock.close()


@pytest.fixture
def server(tmp_path):
    made = []

    def make(*answers):
        s = Canned(str(tmp_path / "s{}.sock".format(len(made))), answers)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def connection(srv):
    return httpclient.Connection(None, None, unix_socket=srv.path,
                                 timeout=5)


def test_request_small_body(server):
    srv = server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    con = connection(srv)
    head, body = con.request("OPTIONS", "/images/x")
    assert head.status == 200 and body == b"{}"
    assert srv.received[0].startswith(b"OPTIONS /images/x HTTP/1.1\r\n")


def test_request_chunked_body(server):
    srv = server(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"3\r\n[1,\r\n2\r\n2]\r\n0\r\n\r\n")
    assert connection(srv).request_json("GET", "/x") == [1, 2]


@pytest.mark.parametrize("status,cls", [
    (403, errors.Forbidden), (404, errors.NotFound),
    (416, errors.RangeNotSatisfiable), (507, errors.InsufficientStorage)])
def test_error_status_carries_the_daemon_message(server, status, cls):
    msg = b"write at offset 0 length 4096 failed: No space left on device\n"
    srv = server(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s"
                 % (status, len(msg), msg))
    with pytest.raises(cls) as e:
        connection(srv).request("PUT", "/x", b"data")
    assert "No space left on device" in str(e.value)
    assert not getattr(e.value, "retriable", False)


def test_server_error_is_retriable(server):
    srv = server(b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy")
    with pytest.raises(errors.BadGateway) as e:
        connection(srv).request("GET", "/x")
    assert e.value.retriable and "busy" in str(e.value)


def test_keepalive_closed_by_server_is_reopened_once(server):
    srv = server(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na", None,
                 b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb")
    con = connection(srv)
    assert con.request("GET", "/1")[1] == b"a"
    # The server closes the kept-alive connection without answering: the
    # request goes again on a new one.
    assert con.request("GET", "/2")[1] == b"b"


def test_closed_before_response_on_fresh_connection_fails(server):
    srv = server(None)
    with pytest.raises(errors.BadGateway) as e:
        connection(srv).request("GET", "/x")
    assert e.value.retriable


def test_malformed_response_head(server):
    srv = server(b"HTTP/1.1 200 OK\r\n" + b"X: v\r\n" * 200 + b"\r\n")
    with pytest.raises(errors.BadGateway) as e:
        connection(srv).request("GET", "/x")
    assert "headers" in str(e.value)


def test_body_source_exposes_fd_once_buffer_is_empty(server):
    data = os.urandom(100000)
    srv = server(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data)
                 + data)
    con = connection(srv)
    con.send_head("GET", "/x")
    head = con.read_head()
    body = con.body(con.content_length(head))
    got = bytearray()
    view = memoryview(bytearray(65536))
    while body.remaining:
        n = body.readinto(view)
        assert n
        got += view[:n]
    assert bytes(got) == data
    assert body.fd == con.sock.fileno()  # Plain socket: C loops may read.


def test_unreachable(tmp_path):
    con = httpclient.Connection(None, None,
                                unix_socket=str(tmp_path / "none.sock"))
    with pytest.raises(errors.BadGateway) as e:
        con.request("GET", "/x")
    assert "Cannot reach" in str(e.value) and e.value.retriable
