"""imageio.streams over socketpairs: the Reader's bounds and costs."""

import socket

import pytest

from imageio import errors
from imageio import streams
from imageio import httpparse


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    # Room for more than fill() may take, so the test sees the bound.
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024**2)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024**2)
    yield a, b
    a.close()
    b.close()


def test_fill_stops_at_limit(pair):
    # A client keeping its socket full: the selector's fill() takes at
    # most FILL_LIMIT, not everything queued.
    server, client = pair
    client.setblocking(False)
    sent = 0
    try:
        while sent < 2 * 1024**2:
            sent += client.send(b"x" * 65536)
    except BlockingIOError:
        pass
    assert sent > 1024**2
    server.setblocking(False)
    reader = streams.Reader(server)
    reader.fill()
    # A head is at most 64 KiB: a few reads past it, not a megabyte.
    assert reader.peek_buffered() <= 256 * 1024


def test_parse_head_work_is_linear(pair, monkeypatch):
    # A head arriving a few bytes at a time is not parsed from its start
    # on every piece.
    server, client = pair
    server.setblocking(False)
    head = b"GET /x HTTP/1.1\r\n" + b"".join(
        b"X-Pad-%d: %s\r\n" % (i, b"v" * 500) for i in range(90)) + b"\r\n"
    parsed = []
    real = httpparse.parse_head

    def counting(buf, start=0):
        parsed.append(len(buf) - start)
        return real(buf, start)

    monkeypatch.setattr(httpparse, "parse_head", counting)
    reader = streams.Reader(server)
    result = None
    for i in range(0, len(head), 7):
        client.sendall(head[i:i + 7])
        reader.fill()
        result = reader.parse_head()
        if result is not None:
            break
    assert result is not None and result.path == "/x"
    assert len(result.headers) == 90
    # Doubling: about log2(len(head)) parses, bytes examined ~2x the head.
    assert len(parsed) < 25
    assert sum(parsed) < 3 * len(head)


def test_parse_head_still_refuses_early(pair):
    # A line too long is found before the head ends (doubling rule).
    server, client = pair
    server.setblocking(False)
    reader = streams.Reader(server)
    client.sendall(b"GET /x HTTP/1.1\r\nX-Long: ")
    reader.fill()
    assert reader.parse_head() is None
    with pytest.raises(errors.HeadersTooLarge):
        for _ in range(100):
            client.sendall(b"v" * 1000)
            reader.fill()
            reader.parse_head()


def test_only_line_ends_refused_at_fill_limit(pair):
    # Stray CRLFs between requests are skipped, but not without bound.
    server, client = pair
    server.setblocking(False)
    reader = streams.Reader(server)
    with pytest.raises(errors.HeadersTooLarge):
        for _ in range(100):
            client.sendall(b"\r\n" * 4096)
            reader.fill()
            reader.parse_head()


def test_discard_drops_refused_body_before_next_head(pair):
    server, client = pair
    server.setblocking(False)
    reader = streams.Reader(server)
    reader.discarding = 10
    client.sendall(b"0123")
    reader.fill()
    assert reader.parse_head() is None
    assert reader.discarding == 6
    client.sendall(b"456789GET /y HTTP/1.1\r\n\r\n")
    reader.fill()
    head = reader.parse_head()
    assert head.path == "/y" and reader.discarding == 0


def test_close_after_discard(pair):
    server, client = pair
    server.setblocking(False)
    reader = streams.Reader(server)
    reader.discarding = 3
    reader.close_after_discard = True
    client.sendall(b"abcGET /y HTTP/1.1\r\n\r\n")
    reader.fill()
    with pytest.raises(ConnectionResetError):
        reader.parse_head()
