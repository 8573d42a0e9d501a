"""A client connection as the selector (imageio.connections) serves it,
whatever the protocol: HTTP (imageio.http) and NBD (imageio.nbd.server)
subclass ``Served`` and add ``serve_one``.

The selector reads a connection's next unit (an HTTP head, an NBD option
or request header) with ``reader.parse_head`` on each readable event and
hands it to a worker, which calls ``serve_one``, then ``next_head`` while
the client's next unit is already there; ``idle`` when it goes back to
wait, ``close`` at the end, ``shutdown`` from another thread.
"""

import errno
import logging
import select
import socket

from . import transport

log = logging.getLogger("http")


class Served:
    """``timeout`` is the idle time allowed between units and the socket
    timeout while one is served; handlers may change it (a ticket's
    ``inactivity_timeout``).  ``context`` holds per-connection state the
    handlers keep (open backends, buffers); ``on_close`` callbacks run when
    the connection ends, ``on_idle`` ones each time it goes back to wait
    (buffers return to their pool there)."""

    # Set by a protocol that asked for TLS in place (NBD's STARTTLS): the
    # selector drives the handshake before reading on.
    tls_pending = False

    def __init__(self, sock, reader, timeout, name, service):
        self.sock = transport.wrap(sock)
        self.timeout = timeout
        self.name = name
        # The service label of this connection's request metrics.
        self.service = service
        self.reader = reader(self.sock)
        self.context = {}
        self._on_close = []
        self._on_idle = []
        self.closing = False
        # True while a unit is being served.
        self.busy = False
        # Set once the connection used a ticket (handlers.access): at
        # max_clients, connections that never did are the first to go.
        self.bound = False

    def on_close(self, func):
        self._on_close.append(func)

    def on_idle(self, func):
        """Run ``func()`` once, when the connection next goes idle."""
        self._on_idle.append(func)

    def set_timeout(self, timeout):
        self.timeout = timeout
        self.sock.settimeout(timeout)

    def next_head(self, linger):
        """The next request's head if it is buffered or arrives within
        ``linger`` seconds (a keep-alive client that sends its next
        request at once is served without a trip through the selector).
        Return None otherwise: the caller hands the connection back.
        Raises HTTPError for a malformed head, ConnectionError when the
        client closed."""
        if self.tls_pending:
            return None  # The selector drives the TLS handshake.
        head = self.reader.parse_head()
        if head is not None or self.reader.peek_buffered():
            return head
        if not self.sock.pending():
            p = select.poll()
            p.register(self.sock.fileno(), select.POLLIN)
            if not p.poll(linger * 1000):
                return None
        self.sock.settimeout(0)
        try:
            self.reader.fill()
        finally:
            self.sock.settimeout(self.timeout)
        if self.reader.eof and not self.reader.peek_buffered():
            raise ConnectionResetError("Client closed")
        return self.reader.parse_head()

    def idle(self):
        """The connection waits for its next request: run the on_idle
        callbacks."""
        funcs, self._on_idle = self._on_idle, []
        for func in funcs:
            try:
                func()
            except Exception:
                log.exception("%s: error releasing idle connection",
                              self.name)

    def log_failure(self, e):
        """Log why the connection ends (the caller closes it)."""
        if isinstance(e, (ConnectionError, socket.timeout, TimeoutError)):
            log.debug("%s: connection ended: %s", self.name, e)
        elif isinstance(e, OSError):
            if e.errno not in (errno.EBADF, errno.ENOTCONN):
                log.warning("%s: connection failed: %s", self.name, e)
        else:
            # A bug; the daemon goes on serving everyone else.
            log.exception("%s: unexpected error, closing connection",
                          self.name, exc_info=e)

    def close(self):
        self.idle()
        for func in reversed(self._on_close):
            try:
                func()
            except Exception:
                log.exception("%s: error closing connection", self.name)
        self._on_close = []
        self.sock.close()

    def shutdown(self):
        """Stop the connection from another thread."""
        self.closing = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
