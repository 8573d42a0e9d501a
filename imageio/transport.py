"""One object per client connection: how bytes get to and from it.

Chosen once at accept (nbdkit's ``conn->recv/send/close``), so nothing
downstream asks "is this TLS?": ``fd`` is the raw socket fd when C code may
move bytes on it directly (sendfile, splice, recv into a file), -1 on TLS,
where only the ``ssl`` module may touch the stream.  The TLS handshake is
the transport's too (``start_tls``, ``handshake``): at accept for HTTPS, or
in place after NBD's STARTTLS; nothing above this module imports ``ssl``.
"""

import selectors
import socket
import ssl


class Transport:
    """A connected socket, plain or TLS (an ``ssl.SSLSocket``)."""

    __slots__ = ("sock", "is_tls")

    def __init__(self, sock):
        self.sock = sock
        self.is_tls = isinstance(sock, ssl.SSLSocket)

    def start_tls(self, context):
        """Become the server side of TLS with ``context`` (an
        ``ssl.SSLContext``) on a non-blocking socket; the handshake is
        then driven by ``handshake()`` as the socket becomes ready."""
        self.sock = context.wrap_socket(self.sock, server_side=True,
                                        do_handshake_on_connect=False)
        self.is_tls = True

    def handshake(self):
        """Advance the TLS handshake of a non-blocking socket: None when it
        is done, else the selector event it waits for (EVENT_READ or
        EVENT_WRITE).  Raises OSError (ssl.SSLError included) when it
        failed."""
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            return selectors.EVENT_READ
        except ssl.SSLWantWriteError:
            return selectors.EVENT_WRITE
        return None

    def recv_nowait(self, n):
        """Up to ``n`` bytes available now on a non-blocking socket: b""
        when the peer closed, None when nothing is there yet (TLS: no
        whole record)."""
        try:
            return self.sock.recv(n)
        except (BlockingIOError, ssl.SSLWantReadError,
                ssl.SSLWantWriteError):
            return None

    @property
    def fd(self):
        return -1 if self.is_tls else self.sock.fileno()

    def fileno(self):
        """The socket's fd, for poll and selectors (TLS included)."""
        return self.sock.fileno()

    def recv(self, n):
        return self.sock.recv(n)

    def recv_into(self, view):
        return self.sock.recv_into(view)

    def recv_fill(self, view):
        """For a body that owes at least ``len(view)`` bytes.  On TLS,
        fill all of ``view`` (fewer bytes only when the peer closed, or
        when a failure follows bytes already read: it comes again on the
        next call), record after record in this one call: ``recv_into``
        returns one TLS record (16 KiB) and the layers above it cost ~3 us
        a call here, 0.2 CPU-s per GiB received over HTTPS.  On a plain
        socket, one ``recv_into`` (its bulk goes through C loops)."""
        if not self.is_tls:
            return self.sock.recv_into(view)
        read = self.sock.read
        n = len(view)
        got = read(n, view)
        if not got:
            return 0
        while got < n:
            try:
                k = read(n - got, view[got:])
            except OSError:
                # What arrived is the caller's; the failure comes again
                # on its next call.
                return got
            if not k:
                break
            got += k
        return got

    def sendall(self, data):
        self.sock.sendall(data)

    def send_parts(self, parts):
        """Send bytes-like ``parts`` in order: one TLS record, or one
        ``sendmsg`` on a plain socket, where there would be several."""
        if self.is_tls:
            self.sock.sendall(b"".join(parts))
            return
        parts = [memoryview(p) for p in parts]
        while parts:
            n = self.sock.sendmsg(parts)
            while parts and n >= len(parts[0]):
                n -= len(parts[0])
                parts.pop(0)
            if parts and n:
                parts[0] = parts[0][n:]

    def pending(self):
        """Bytes decrypted and waiting inside TLS: readable without the
        socket being readable."""
        return self.sock.pending() if self.is_tls else 0

    def settimeout(self, timeout):
        self.sock.settimeout(timeout)

    def gettimeout(self):
        return self.sock.gettimeout()

    def setblocking(self, flag):
        self.sock.setblocking(flag)

    def shutdown(self, how=socket.SHUT_RDWR):
        self.sock.shutdown(how)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def wrap(sock):
    """A Transport for ``sock`` (a Transport is returned as it is)."""
    return sock if isinstance(sock, Transport) else Transport(sock)
