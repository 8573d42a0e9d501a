"""The one HTTP/1.1 client, toward imageio daemons.

Used by the proxy backend (``backends.http``) and the transfer client's
workers alike: raw sockets, no ``http.client`` in the data path.  A request
head goes out in one send; a response head is parsed by the pure
``httpparse.parse_response_head`` (the same limits as request heads);
bodies are read through the same stream types the server reads requests
with (``streams.Reader``, ``streams.Body``, ``streams.ChunkedBody``), so a known-length
body on a plain socket exposes its raw fd to C loops.

Errors: an error status becomes the imageio error of that status
(``status_error``: the one mapping); a transport failure (refused, reset,
timed out, TLS) becomes ``RemoteFailed`` (a ``BadGateway`` that is
``retriable``); a certificate the CA does not verify is not retriable.
"""

import contextlib
import json
import socket
import ssl

from . import errors
from . import streams
from . import transport

# Error statuses an imageio daemon answers, and the error each becomes here.
STATUS_ERRORS = {
    400: errors.BadRequest,
    403: errors.Forbidden,
    404: errors.NotFound,
    405: errors.MethodNotAllowed,
    409: errors.Conflict,
    413: errors.PayloadTooLarge,
    416: errors.RangeNotSatisfiable,
    507: errors.InsufficientStorage,
}

# Error bodies read into a message: at most this much.
MAX_ERROR_BODY = 64 * 1024


def status_error(status, message, size=None):
    """The error for an error ``status`` with the daemon's ``message``
    (the whole body it sent, so the user sees why: "No space left on
    device", "Ticket expired")."""
    text = "Remote imageio daemon: {}".format(message or "HTTP {}".format(
        status))
    cls = STATUS_ERRORS.get(status)
    if cls is errors.RangeNotSatisfiable:
        return cls(text, size=size)
    if cls is not None:
        return cls(text)
    cls = errors.RemoteFailed if status >= 500 else errors.BadGateway
    return cls("{} (HTTP {})".format(text, status))


class Connection:
    """One keep-alive connection to a daemon: TCP (TLS with
    ``ssl_context``) to ``host``:``port``, or the daemon's ``unix_socket``.
    Connects on first use and again after ``close()``; ``where`` names the
    peer in messages."""

    def __init__(self, host, port, ssl_context=None, unix_socket=None,
                 timeout=60, ca_hint="check the CA file"):
        self.host = host
        self.port = port
        self.unix_socket = unix_socket
        self.timeout = timeout
        self._context = ssl_context
        self._ca_hint = ca_hint
        self.sock = None
        self.reader = None

    @property
    def where(self):
        if self.unix_socket:
            return "unix:{}".format(self.unix_socket)
        return "{}:{}".format(self.host, self.port)

    @property
    def is_local(self):
        return self.unix_socket is not None

    def connect(self):
        """Connect now if not connected; BadGateway when the daemon
        cannot be reached or verified."""
        if self.sock is not None:
            return self.sock
        try:
            if self.unix_socket:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(self.timeout)
                    sock.connect(self.unix_socket)
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection((self.host, self.port),
                                                timeout=self.timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self._context is not None:
                    try:
                        sock = self._context.wrap_socket(
                            sock, server_hostname=self.host)
                    except BaseException:
                        sock.close()
                        raise
        except ssl.SSLCertVerificationError as e:
            raise errors.BadGateway(
                "Cannot verify the remote imageio daemon {}: {}; {}".format(
                    self.where, e.verify_message or e, self._ca_hint))
        except OSError as e:
            raise errors.RemoteFailed(
                "Cannot reach the remote imageio daemon {}: {}".format(
                    self.where, e or type(e).__name__))
        self.sock = transport.wrap(sock)
        self.reader = streams.Reader(self.sock)
        return self.sock

    def close(self):
        if self.sock is not None:
            self.sock.close()
        self.sock = None
        self.reader = None

    def failure(self, during, e):
        """The RemoteFailed for a transport failure ``e`` during
        ``during``: retriable (the request may go again on a new
        connection)."""
        return errors.RemoteFailed(
            "Remote imageio daemon {} failed during {}: {}".format(
                self.where, during, e or type(e).__name__))

    @contextlib.contextmanager
    def guard(self, during):
        """Any failure inside closes the connection (its state is
        unknown); transport failures become RemoteFailed (retriable)."""
        try:
            yield
        except errors.Error:
            self.close()
            raise
        except OSError as e:
            self.close()
            raise self.failure(during, e)

    # Requests.

    def send_head(self, method, target, headers=(), body=b""):
        """Send a request head (and a small ``body``) in one write."""
        sock = self.connect()
        lines = ["{} {} HTTP/1.1".format(method, target),
                 "Host: {}".format("localhost" if self.unix_socket
                                   else self.host)]
        for name, value in (headers.items() if isinstance(headers, dict)
                            else headers):
            lines.append("{}: {}".format(name, value))
        if body:
            lines.append("Content-Length: {}".format(len(body)))
        lines.append("\r\n")
        sock.sendall("\r\n".join(lines).encode("latin-1") + body)

    def read_head(self):
        """The response head (httpparse.ResponseHead); ConnectionError
        when the daemon closed the connection first."""
        try:
            return self.reader.read_response_head()
        except errors.BadGateway as e:
            self.close()
            raise errors.BadGateway("Remote imageio daemon {}: {}".format(
                self.where, e.message))

    def read_small_body(self, head, limit=MAX_ERROR_BODY):
        """The whole body of a response that has a small one (JSON, an
        error message): BadGateway when it is larger than ``limit``."""
        if head.headers.get("transfer-encoding", "").lower() == "chunked":
            body = streams.ChunkedBody(self.reader, self.timeout)
            out = bytearray()
            while body.next_chunk():
                if len(out) + body.remaining > limit:
                    raise errors.BadGateway(
                        "Remote imageio daemon {} sent a body over {} bytes"
                        .format(self.where, limit))
                out += self.reader.read(body.remaining)
                body.remaining = 0
            return bytes(out)
        length = self.content_length(head)
        if length > limit:
            raise errors.BadGateway(
                "Remote imageio daemon {} sent a body of {} bytes, at most "
                "{} expected".format(self.where, length, limit))
        data = self.reader.read(length)
        if len(data) < length:
            raise ConnectionResetError("connection closed in the body")
        return data

    def content_length(self, head):
        try:
            return int(head.headers.get("content-length", 0))
        except ValueError:
            raise errors.BadGateway(
                "Remote imageio daemon {} sent an invalid Content-Length"
                .format(self.where))

    def body(self, length):
        """The next ``length`` bytes of the response body as a source
        (``streams.Body``: buffered bytes first, then the socket's fd for C
        loops where it is plain)."""
        return streams.Body(self.reader, self.sock, length, self.timeout)

    def chunked_body(self):
        return streams.ChunkedBody(self.reader, self.timeout)

    def finish(self, head, size=None):
        """After a response was read: close a connection the daemon
        closes; raise the error of an error status, with its message."""
        message = ""
        if head.status >= 300:
            try:
                message = self.read_small_body(head).decode(
                    "utf-8", "replace").strip()
            except (OSError, errors.Error):
                pass
        if head.status >= 300 or \
                head.headers.get("connection", "").lower() == "close":
            self.close()
        if head.status >= 300:
            raise status_error(head.status, message, size)

    def complete(self, head, size=None, limit=MAX_ERROR_BODY):
        """Read the rest of a response with a small body: its body, or
        the error of an error status; returns the body."""
        if head.status >= 300:
            self.finish(head, size)
        data = self.read_small_body(head, limit)
        self.finish(head, size)
        return data

    def exchange(self, method, target, headers=(), body=b"", during=None):
        """Send a request (head and a small ``body``) and read its
        response head.  A kept-alive connection the daemon closed
        meanwhile is reopened once: nothing was taken from it."""
        for attempt in (1, 2):
            fresh = self.sock is None
            with self.guard(during or method):
                try:
                    self.send_head(method, target, headers, body)
                    return self.read_head()
                except ConnectionError:
                    self.close()
                    if fresh or attempt == 2:
                        raise

    def request(self, method, target, body=b"", headers=(), size=None,
                limit=MAX_ERROR_BODY):
        """A request with a small body (or none) answered with a small
        body: returns (head, body bytes); error statuses raise
        (``status_error``).  Only for idempotent requests (see
        ``exchange``)."""
        head = self.exchange(method, target, headers, body)
        with self.guard(method):
            return head, self.complete(head, size, limit)

    def request_json(self, method, target, body=None, size=None,
                     limit=64 * 1024**2):
        """``request`` whose answer is JSON (decoded); ``body`` an object
        sent as JSON."""
        headers = {}
        data = b""
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        _, answer = self.request(method, target, data, headers, size, limit)
        try:
            return json.loads(answer)
        except ValueError:
            raise errors.BadGateway(
                "Remote imageio daemon {} answered invalid JSON".format(
                    self.where))
