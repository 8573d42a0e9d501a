"""imageio.transport over socketpairs: plain and TLS, the handshake the
transport drives itself (non-blocking, as the selector does)."""

import selectors
import socket
import ssl
import threading

import pytest

from imageio import tls
from imageio import transport


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    key, cert, ca = (str(d / n) for n in ("key.pem", "cert.pem", "ca.pem"))
    tls.create_dev_pki(key, cert, ca)
    return key, cert, ca


def server_context(pki):
    key, cert, _ = pki
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


def test_plain_fd_and_parts():
    a, b = socket.socketpair()
    with a, b:
        t = transport.wrap(a)
        assert transport.wrap(t) is t
        assert not t.is_tls and t.fd == a.fileno()
        t.send_parts((b"head ", memoryview(b"and body")))
        assert b.recv(100) == b"head and body"
        t.setblocking(False)
        assert t.recv_nowait(10) is None
        b.close()
        assert t.recv_nowait(10) == b""


def test_start_tls_handshake_nonblocking(pki):
    _, _, ca = pki
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        t = transport.wrap(a)
        t.start_tls(server_context(pki))
        assert t.is_tls and t.fd == -1
        client_ctx = ssl.create_default_context(cafile=ca)
        out = {}

        def client():
            with client_ctx.wrap_socket(b, server_hostname="localhost") as c:
                c.sendall(b"ping")
                out["reply"] = c.recv(10)

        th = threading.Thread(target=client)
        th.start()
        sel = selectors.DefaultSelector()
        events = 0
        while True:
            want = t.handshake()
            if want is None:
                break
            assert want in (selectors.EVENT_READ, selectors.EVENT_WRITE)
            events += 1
            sel.register(t.fileno(), want)
            assert sel.select(10)
            sel.unregister(t.fileno())
        assert events >= 1  # It waited for the client at least once.
        data = None
        while data is None:
            sel.register(t.fileno(), selectors.EVENT_READ)
            sel.select(10)
            sel.unregister(t.fileno())
            data = t.recv_nowait(10)
        assert data == b"ping"
        t.setblocking(True)
        t.sendall(b"pong")
        th.join(10)
        assert out["reply"] == b"pong"


def test_failed_handshake_raises_oserror(pki):
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        t = transport.wrap(a)
        t.start_tls(server_context(pki))
        b.sendall(b"GET / HTTP/1.1\r\n\r\n")  # Not TLS.
        with pytest.raises(OSError):
            for _ in range(100):
                if t.handshake() is None:
                    break


def tls_pair(pki):
    """A server Transport over TLS and its client SSLSocket, handshaken,
    both blocking with a timeout."""
    _, _, ca = pki
    a, b = socket.socketpair()
    client_ctx = ssl.create_default_context(cafile=ca)
    result = {}

    def connect():
        result["c"] = client_ctx.wrap_socket(b, server_hostname="localhost")

    th = threading.Thread(target=connect)
    th.start()
    s = server_context(pki).wrap_socket(a, server_side=True)
    th.join(10)
    s.settimeout(10)
    result["c"].settimeout(10)
    return transport.wrap(s), result["c"]


def test_tls_recv_fill_reads_record_after_record(pki):
    # Three 16 KiB TLS records, then the peer closes after 5 more bytes:
    # recv_fill fills the whole view in one call (recv_into gives one
    # record), and gives what came before the close.
    t, c = tls_pair(pki)
    payload = bytes(range(256)) * 192
    for i in range(3):
        c.sendall(payload[i * 16384:(i + 1) * 16384])
    c.sendall(b"tail!")
    c.close()
    view = memoryview(bytearray(len(payload)))
    assert t.recv_fill(view) == len(payload)
    assert bytes(view) == payload
    rest = memoryview(bytearray(100))
    assert t.recv_fill(rest) == 5
    assert bytes(rest[:5]) == b"tail!"
    assert t.recv_fill(rest) == 0
    t.close()


def test_plain_recv_fill_is_one_recv():
    a, b = socket.socketpair()
    with a, b:
        t = transport.wrap(a)
        b.sendall(b"12345")
        view = memoryview(bytearray(10))
        assert t.recv_fill(view) == 5
