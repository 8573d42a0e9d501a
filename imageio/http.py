"""HTTP/1.1 connection loop, Request, Response and Router.

One thread per connection.  Parsing lives in ``httpparse`` (pure
functions); this module owns the socket.  Errors raised by handlers are
turned into responses in one place: ``Connection._dispatch``.
"""

import errno
import json
import logging
import re
import socket
import time

from . import backends
from . import errors
from . import httpparse
from . import metrics
from . import tickets

log = logging.getLogger("http")

REASONS = {
    200: "OK", 204: "No Content", 206: "Partial Content",
    400: "Bad Request", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 409: "Conflict", 411: "Length Required",
    413: "Payload Too Large", 415: "Unsupported Media Type",
    416: "Range Not Satisfiable",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented",
    502: "Bad Gateway", 503: "Service Unavailable",
    507: "Insufficient Storage",
}

# Bodies read into memory (JSON) are limited.
MAX_JSON_BODY = 64 * 1024
# Receive size for the line reader.
READ_SIZE = 64 * 1024
# After an error, unread request bodies up to this size are read and
# dropped so the connection survives; larger ones close the connection.
DRAIN_LIMIT = 1024**2
# After an error, how long the drain waits for more body bytes.  The count
# of unread bytes may be stale when C code failed mid-receive, so a client
# that sent everything must not be kept waiting for bytes that never come.
DRAIN_IDLE = 1.0
# Once a request starts arriving, its request line and headers must be
# complete within this time, however slowly a client trickles them in.
HEADERS_TIMEOUT = 30


class Reader:
    """Reads lines and bodies from a socket.

    Bytes received beyond a line stay in a small buffer and are returned
    first; large reads go straight from the socket into the caller's
    buffer (``readinto``), so bodies land in aligned buffers without a copy.
    """

    def __init__(self, sock):
        self._sock = sock
        self._buf = bytearray()
        self._pos = 0
        # Monotonic time by which the current request's headers must be
        # complete; None while waiting for a request.
        self.deadline = None

    def peek_buffered(self):
        return len(self._buf) - self._pos

    def readline(self, limit=httpparse.MAX_LINE):
        while True:
            i = self._buf.find(b"\n", self._pos)
            if i >= 0:
                line = bytes(self._buf[self._pos:i + 1])
                self._pos = i + 1
                self._compact()
                if len(line) > limit:
                    raise _LineTooLong()
                return line
            if len(self._buf) - self._pos > limit:
                raise _LineTooLong()
            chunk = self._recv_line_data()
            if not chunk:
                line = bytes(self._buf[self._pos:])
                self._buf.clear()
                self._pos = 0
                return line
            self._buf += chunk

    def _recv_line_data(self):
        if self.deadline is None:
            chunk = self._sock.recv(READ_SIZE)
            self.deadline = time.monotonic() + HEADERS_TIMEOUT
            return chunk
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("Request headers not received in time")
        timeout = self._sock.gettimeout()
        self._sock.settimeout(remaining if timeout is None
                              else min(timeout, remaining))
        try:
            return self._sock.recv(READ_SIZE)
        finally:
            self._sock.settimeout(timeout)

    def _compact(self):
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > READ_SIZE:
            del self._buf[:self._pos]
            self._pos = 0

    def readinto(self, view):
        """Read up to len(view) bytes; 0 at end of stream."""
        avail = len(self._buf) - self._pos
        if avail:
            n = min(avail, len(view))
            view[:n] = self._buf[self._pos:self._pos + n]
            self._pos += n
            self._compact()
            return n
        return self._sock.recv_into(view)

    def read(self, n):
        """Read exactly n bytes (fewer only at end of stream)."""
        out = bytearray(n)
        view = memoryview(out)
        got = 0
        while got < n:
            k = self.readinto(view[got:])
            if k == 0:
                break
            got += k
        return bytes(out[:got])


class _LineTooLong(Exception):
    pass


class Body:
    """A request body of known length, never read past its end: the
    source that backends' ``write_from`` reads.

    ``readinto(view)`` reads up to ``len(view)`` bytes (0 at the end);
    bytes the reader buffered beyond the headers come first.  ``fd`` is
    the raw socket fd once no buffered bytes remain and the socket is
    plain, else -1 (use ``readinto``); C code reading ``fd`` directly
    reports the bytes with ``consumed(n)``, so the connection knows the
    body was read and can serve the next request.  ``timeout`` (seconds)
    bounds a wait for the client; ``remaining`` is the unread byte count.
    """

    def __init__(self, reader, sock, length, timeout):
        self._reader = reader
        self._sock = sock
        self.timeout = timeout
        self.remaining = length
        self._plain = type(sock).__name__ != "SSLSocket"

    @property
    def fd(self):
        if self._plain and not self._reader.peek_buffered():
            return self._sock.fileno()
        return -1

    def consumed(self, n):
        """Account bytes read directly from ``fd`` by C code."""
        self.remaining -= n

    def readinto(self, view):
        if self.remaining <= 0:
            return 0
        if len(view) > self.remaining:
            view = view[:self.remaining]
        n = self._reader.readinto(view)
        self.remaining -= n
        return n


class ChunkedBody:
    """A chunked request body, read one chunk at a time: ``next_chunk()``
    returns the size of the next chunk (0 at the end); then the chunk's
    bytes are read through this object as through a ``Body``."""

    def __init__(self, reader, timeout):
        self._reader = reader
        self.timeout = timeout
        self.remaining = 0
        self.done = False
        self._first = True

    fd = -1

    def next_chunk(self):
        if self.remaining:
            raise errors.BadRequest("Chunk not fully read")
        if not self._first:
            if self._reader.readline() not in (b"\r\n", b"\n"):
                raise errors.BadRequest("Invalid chunked body: missing CRLF")
        self._first = False
        size = httpparse.parse_chunk_size(self._reader.readline())
        if size == 0:
            # Trailers, then an empty line.
            for _ in range(httpparse.MAX_HEADERS):
                if self._reader.readline() in (b"\r\n", b"\n", b""):
                    break
            self.done = True
        self.remaining = size
        return size

    def consumed(self, n):  # pragma: no cover - fd is never >= 0
        self.remaining -= n

    def readinto(self, view):
        if self.remaining <= 0:
            return 0
        if len(view) > self.remaining:
            view = view[:self.remaining]
        n = self._reader.readinto(view)
        self.remaining -= n
        return n


class Request:

    def __init__(self, conn, method, path, query, version, headers):
        self.conn = conn
        self.method = method
        self.path = path
        self.query = query
        self.version = version
        self.headers = headers
        self._body = None
        te = headers.get("transfer-encoding", "").lower()
        codings = [c.strip() for c in te.split(",")] if te else []
        # A request body's codings end with chunked (RFC 9112 6.1); the
        # only coding understood before it is zstd (imageio.compression).
        if codings and (codings[-1] != "chunked"
                        or codings[:-1] not in ([], ["zstd"])):
            raise errors.BadRequest(
                "Unsupported Transfer-Encoding {!r}: expected 'chunked' or "
                "'zstd, chunked'".format(te))
        self.chunked = bool(codings)
        # The coding of the chunked body's bytes, None for identity.
        self.transfer_coding = codings[0] if len(codings) > 1 else None
        if "content-length" in headers and not self.chunked:
            self.content_length = httpparse.parse_content_length(
                headers["content-length"])
        else:
            self.content_length = None if self.chunked else 0
        self.has_length = self.chunked or "content-length" in headers

    def path_for_log(self):
        """The request path with ticket ids shortened: ids are secrets."""
        parts = self.path.split("/")
        if len(parts) > 2 and parts[1] in ("images", "tickets") and parts[2]:
            parts[2] = tickets.short_id(parts[2])
        return "/".join(parts)

    @property
    def expects_continue(self):
        return self.headers.get("expect", "").lower() == "100-continue"

    def body(self):
        """The body: a Body, or a ChunkedBody.

        A client that sent ``Expect: 100-continue`` (curl -T does) waits
        for ``100 Continue`` before sending the body; it is sent here, when
        a handler that validated the request starts reading the body.
        """
        if self._body is None:
            if self.expects_continue and self.body_left():
                self.conn.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            timeout = self.conn.timeout
            if self.chunked:
                self._body = ChunkedBody(self.conn.reader, timeout)
            else:
                self._body = Body(self.conn.reader, self.conn.sock,
                                  self.content_length, timeout)
        return self._body

    def body_left(self):
        """Whether unread body bytes remain (the connection cannot be
        reused then)."""
        if self._body is None:
            return self.chunked or bool(self.content_length)
        if self.chunked:
            return not self._body.done
        return self._body.remaining > 0

    def read_json(self, limit=MAX_JSON_BODY):
        """Read and parse a JSON body of at most ``limit`` bytes."""
        if self.chunked:
            raise errors.LengthRequired(
                "Content-Length is required for JSON bodies")
        if self.content_length > limit:
            raise errors.PayloadTooLarge(
                "Body too large: {} bytes, at most {} allowed".format(
                    self.content_length, limit))
        body = self.body()
        data = self.conn.reader.read(self.content_length)
        body.remaining -= len(data)
        if len(data) < self.content_length:
            raise errors.PartialContent(self.content_length, len(data))
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise errors.BadRequest("Invalid JSON body: {}".format(e))


class Response:

    def __init__(self, conn, request=None):
        self.conn = conn
        self.request = request
        self.status = 200
        self.headers = {}
        self.started = False
        self.close = False

    def _head(self, status, length, headers):
        if self.started:
            raise RuntimeError("Response already started")
        self.status = status
        if headers:
            self.headers.update(headers)
        if length is not None:
            self.headers["Content-Length"] = str(length)
        if self.close:
            self.headers["Connection"] = "close"
        lines = ["HTTP/1.1 {} {}".format(status, REASONS.get(status, ""))]
        for name, value in self.headers.items():
            lines.append("{}: {}".format(name, value))
        lines.append("\r\n")
        self.started = True
        return "\r\n".join(lines).encode("latin-1")

    def send_headers(self, status, length, headers=None):
        """Send the status line and headers for a body of ``length``
        bytes; ``length=None`` for a body the caller frames itself (with a
        ``Transfer-Encoding`` header and a ``ChunkedWriter``)."""
        self.conn.sock.sendall(self._head(status, length, headers))

    def chunked_writer(self):
        """A ChunkedWriter for the body, after send_headers(status, None,
        {"Transfer-Encoding": "..., chunked"})."""
        return ChunkedWriter(self.conn.sock)

    def send_with_body(self, status, body, headers=None):
        """Send headers and a small body (bytes-like) together: one TLS
        record and one syscall where there would be two."""
        head = self._head(status, len(body), headers)
        sock = self.conn.sock
        if self.request is not None and self.request.method == "HEAD":
            # RFC 9110 9.3.2: the headers GET would send, never a body
            # (errors too: the client would read it as the next response).
            sock.sendall(head)
            return
        if type(sock).__name__ == "SSLSocket":
            sock.sendall(head + body)
            return
        parts = [memoryview(head), memoryview(body)]
        while parts:
            n = sock.sendmsg(parts)
            while parts and n >= len(parts[0]):
                n -= len(parts[0])
                parts.pop(0)
            if parts and n:
                parts[0] = parts[0][n:]

    def send(self, status, body=b"", content_type=None, headers=None):
        """Send a whole response."""
        if isinstance(body, str):
            body = body.encode("utf-8")
        if content_type and body:
            self.headers["Content-Type"] = content_type
        self.send_with_body(status, body, headers)

    def send_json(self, obj, status=200, headers=None):
        body = json.dumps(obj).encode("utf-8") + b"\n"
        self.send(status, body, "application/json", headers)

    def send_error(self, status, message, headers=None):
        self.send(status, message.rstrip("\n") + "\n",
                  "text/plain; charset=UTF-8", headers)

    def sink(self):
        """A backends.Sink writing to the client."""
        return backends.Sink(self.conn.sock, self.conn.timeout)


class ChunkedWriter:
    """Writes a response body in chunked framing (RFC 9112 7.1)."""

    def __init__(self, sock):
        self._sock = sock

    def write(self, data):
        """Send ``data`` (bytes-like) as one chunk; empty data sends
        nothing (an empty chunk would end the body)."""
        if len(data):
            # One sendall: one TLS record instead of three.
            self._sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))

    def close(self):
        """End the body."""
        self._sock.sendall(b"0\r\n\r\n")


class Router:
    """Maps path patterns to handler objects.

    A handler has methods named for the HTTP methods it serves (``get``,
    ``put``, ...), called with (request, response, *groups).
    """

    def __init__(self, routes):
        self._routes = [(re.compile("^" + pattern + "$"), handler)
                        for pattern, handler in routes]

    def dispatch(self, req, resp):
        for pattern, handler in self._routes:
            m = pattern.match(req.path)
            if m:
                # Methods are case-sensitive (RFC 9110 9.1): "put" is
                # not PUT, and must not slip past a filter allowing GET.
                method = None
                if req.method.isupper() and req.method.isalpha():
                    method = getattr(handler, req.method.lower(), None)
                if method is None:
                    raise errors.MethodNotAllowed(
                        "Method {} not allowed for {}".format(
                            req.method, req.path_for_log()))
                return method(req, resp, *m.groups())
        raise errors.NotFound("No resource {}".format(req.path_for_log()))


class Connection:
    """Serves HTTP requests on one client socket until it closes.

    ``timeout`` is the idle time allowed between requests and the socket
    timeout while a request runs; handlers may change it (a ticket's
    ``inactivity_timeout``).  ``context`` holds per-connection state the
    handlers keep (open backends, buffers); ``on_close`` callbacks run when
    the connection ends.
    """

    def __init__(self, sock, router, timeout=60, name="conn", service=""):
        self.sock = sock
        self.router = router
        self.timeout = timeout
        self.name = name
        # The service label of this connection's request metrics.
        self.service = service
        self.reader = Reader(sock)
        self.context = {}
        self._on_close = []
        self.closing = False
        # True while a request is being served.
        self.busy = False

    def on_close(self, func):
        self._on_close.append(func)

    def set_timeout(self, timeout):
        self.timeout = timeout
        self.sock.settimeout(timeout)

    def serve(self):
        try:
            self.sock.settimeout(self.timeout)
            while not self.closing:
                if not self._serve_one():
                    break
        except (ConnectionError, socket.timeout, TimeoutError) as e:
            log.debug("%s: connection ended: %s", self.name, e)
        except OSError as e:
            if e.errno not in (errno.EBADF, errno.ENOTCONN):
                log.warning("%s: connection failed: %s", self.name, e)
        except Exception:
            # A bug; the daemon goes on serving everyone else.
            log.exception("%s: unexpected error, closing connection",
                          self.name)
        finally:
            self.close()

    def close(self):
        for func in reversed(self._on_close):
            try:
                func()
            except Exception:
                log.exception("%s: error closing connection", self.name)
        self._on_close = []
        try:
            self.sock.close()
        except OSError:
            pass

    def shutdown(self):
        """Stop the connection from another thread."""
        self.closing = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _serve_one(self):
        resp = Response(self)
        # Buffered bytes mean the next request already started arriving.
        self.reader.deadline = time.monotonic() + HEADERS_TIMEOUT \
            if self.reader.peek_buffered() else None
        try:
            line = self.reader.readline()
        except _LineTooLong:
            resp.close = True
            resp.send_error(431, "Request line too long")
            return False
        if not line:
            return False
        if line in (b"\r\n", b"\n"):
            # Tolerate a stray CRLF between requests (RFC 9112 2.2).
            return True
        start = time.monotonic()
        method = None
        try:
            try:
                req = self._read_request(line)
            except errors.HTTPError as e:
                resp.close = True
                resp.send_error(e.status, e.message)
                return False
            except _LineTooLong:
                resp.close = True
                resp.send_error(431, "Request header line too long")
                return False

            self.reader.deadline = None
            resp.request = req
            method = req.method
            self.busy = True
            try:
                return self._handle(req, resp)
            finally:
                self.busy = False
        finally:
            metrics.request_done(self.service, method,
                                 resp.status if resp.started else None,
                                 time.monotonic() - start)

    def _handle(self, req, resp):
        conn_hdr = req.headers.get("connection", "").lower()
        if conn_hdr == "close" or (req.version == "HTTP/1.0"
                                   and conn_hdr != "keep-alive"):
            resp.close = True
        if req.query.get("close", "").lower() in ("y", "yes", "true", "1"):
            resp.close = True

        self._dispatch(req, resp)

        if resp.close or self.closing:
            return False
        if req.body_left():
            # The handler did not consume the body: we cannot find the
            # next request.
            return False
        return True

    def _read_request(self, line):
        method, path, query, version = httpparse.parse_request_line(line)
        headers = {}
        for _ in range(httpparse.MAX_HEADERS + 1):
            hline = self.reader.readline()
            if hline in (b"\r\n", b"\n"):
                break
            if not hline:
                raise ConnectionResetError("Client closed during headers")
            name, value = httpparse.parse_header_line(hline)
            if name in headers:
                if name in ("content-length", "range", "content-range",
                            "transfer-encoding", "host"):
                    raise errors.BadRequest(
                        "Duplicate header {!r}".format(name))
                headers[name] += ", " + value
            else:
                headers[name] = value
        else:
            raise errors.HeadersTooLarge(
                "Too many headers: at most {} allowed".format(
                    httpparse.MAX_HEADERS))
        return Request(self, method, path, query, version, headers)

    def _dispatch(self, req, resp):
        """Run the handler; turn every error into a response.  This is the
        one place where errors become HTTP statuses."""
        try:
            self.router.dispatch(req, resp)
            return
        except errors.Error as e:
            status, message = e.status, e.message
            headers = {}
            if isinstance(e, errors.RangeNotSatisfiable) and e.size is not None:
                headers["Content-Range"] = "bytes */{}".format(e.size)
            # Forbidden: SPEC says close.  The others: the rest of the body
            # cannot be found, so neither can the next request.
            if isinstance(e, (errors.Forbidden, errors.Canceled,
                              errors.PartialContent, errors.LengthRequired)):
                resp.close = True
            level = logging.WARNING if status >= 500 else logging.INFO
            log.log(level, "%s: %s %s: %d %s", self.name, req.method,
                    req.path_for_log(), status, message)
        except (ConnectionError, socket.timeout, TimeoutError):
            # The client is gone or stalled; nothing to answer.
            raise
        except OSError as e:
            status = 507 if e.errno in (errno.ENOSPC, errno.EDQUOT) else 500
            message = "I/O error: {}".format(e.strerror or e)
            headers = {}
            resp.close = True
            log.warning("%s: %s %s: %d %s", self.name, req.method,
                        req.path_for_log(), status, message)
        except Exception:
            log.exception("%s: %s %s failed", self.name, req.method,
                          req.path_for_log())
            status, message, headers = 500, "Internal server error", {}
            resp.close = True

        if resp.started:
            # Headers are out: the only honest answer is a cut connection.
            log.warning("%s: cannot report error after response started; "
                        "closing connection", self.name)
            self.closing = True
            return
        if req.body_left() and not self._drain(req):
            resp.close = True
        resp.headers.clear()
        resp.headers.update(self.error_headers)
        resp.send_error(status, message, headers)

    def _drain(self, req):
        """Read and drop a small unread body after an error, so the client
        gets our answer instead of a reset and the connection can go on.
        Return True if the body was read completely."""
        if req.chunked or (req.expects_continue and req._body is None):
            # A client waiting for 100 Continue may never send the body.
            return False
        body = req.body()
        if body.remaining > DRAIN_LIMIT:
            return False
        scratch = memoryview(bytearray(min(body.remaining, 65536)))
        self.sock.settimeout(DRAIN_IDLE)
        try:
            while body.remaining:
                if body.readinto(scratch) == 0:
                    return False
        except OSError:  # Including socket.timeout.
            return False
        finally:
            try:
                self.sock.settimeout(self.timeout)
            except OSError:
                pass
        return True

    # Handlers may add headers that every error response of this
    # connection carries (CORS on the images service).
    error_headers = {}

