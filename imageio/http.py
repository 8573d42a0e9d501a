"""HTTP/1.1: serves one request per call, Request, Response and Router.

A connection holds no thread of its own: between requests it waits in
``connections``' selector, and a worker thread serves each request that
arrives (``Connection.serve_one``); ``serve`` is the blocking loop for a
socket owned by one thread (tests, fuzzing).  Parsing lives in
``httpparse`` (pure functions), the request and response bodies in
``streams``.  Errors raised by handlers are turned into responses in one
place: ``Connection._dispatch``.
"""

import errno
import json
import logging
import re
import socket
import time

from . import errors
from . import httpparse
from . import ratelog
from . import served
from . import redact
from . import streams


_metrics_module = None


def _metrics():
    # Imported on first use: the client shares this module and has no
    # metrics; prometheus_client alone is a third of its start-up.  Kept
    # in a global: an import statement per request costs a package lookup.
    global _metrics_module
    if _metrics_module is None:
        from . import metrics
        _metrics_module = metrics
    return _metrics_module


log = logging.getLogger("http")

# Requests refused to clients that never used a ticket: a line per kind
# and interval, with the count of the ones left out.
_refused_log = ratelog.RateLimitedLog(log)

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
# After an error, unread request bodies up to this size are read and
# dropped so the connection survives; larger ones close the connection.
DRAIN_LIMIT = 1024**2


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
        if self.chunked and "content-length" in headers:
            # RFC 9112 6.1: a request smuggling pattern; refuse it (the
            # connection closes, as for every malformed head).
            raise errors.BadRequest(
                "Content-Length and Transfer-Encoding: chunked must not be "
                "used together")
        if "content-length" in headers and not self.chunked:
            self.content_length = httpparse.parse_content_length(
                headers["content-length"])
        else:
            self.content_length = None if self.chunked else 0
        self.has_length = self.chunked or "content-length" in headers

    def path_for_log(self):
        """The request path with ticket ids shortened (ids are secrets) and
        control characters escaped (a decoded ``%0A`` would start a forged
        log line)."""
        parts = self.path.split("/")
        if len(parts) > 2 and parts[1] in ("images", "tickets") and parts[2]:
            parts[2] = redact.short_id(parts[2])
        return ratelog.printable("/".join(parts))

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
                self._body = streams.ChunkedBody(self.conn.reader, timeout)
            else:
                self._body = streams.Body(self.conn.reader, self.conn.sock,
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
        except RecursionError:
            raise errors.BadRequest("Invalid JSON body: nested too deeply")


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
        return streams.ChunkedWriter(self.conn.sock)

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
        sock.send_parts((head, body))

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
        """A streams.Sink writing to the client."""
        return streams.Sink(self.conn.sock, self.conn.timeout)


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


class Connection(served.Served):
    """One client connection, served one request per ``serve_one`` call
    (nbdkit's protocol_recv_request_send_reply).

    ``imageio.connections`` reads request heads in its selector and calls
    ``serve_one`` in a worker; ``serve`` is the blocking loop over the
    same steps, for a socket owned by one thread (tests, fuzzing).

    ``timeout`` is the idle time allowed between requests and the socket
    timeout while a request runs; handlers may change it (a ticket's
    ``inactivity_timeout``).  ``context`` holds per-connection state the
    handlers keep (open backends, buffers); ``on_close`` callbacks run when
    the connection ends, ``on_idle`` ones each time it goes back to wait
    for a request (buffers return to their pool there).
    """

    def __init__(self, sock, router, timeout=60, name="conn", service=""):
        super().__init__(sock, streams.Reader, timeout, name, service)
        self.router = router

    def serve(self):
        """Serve requests until the client closes (blocking)."""
        try:
            self.sock.settimeout(self.timeout)
            while not self.closing:
                try:
                    head = self.reader.read_head()
                except errors.HTTPError as e:
                    self.serve_error(e)
                    break
                if head is None or not self.serve_one(head):
                    break
                self.idle()
        except Exception as e:
            self.log_failure(e)
        finally:
            self.close()

    def serve_error(self, e):
        """Answer a request whose head could not be parsed; the connection
        cannot go on (where would the next request start?)."""
        resp = Response(self)
        resp.close = True
        try:
            resp.send_error(e.status, e.message)
        finally:
            _metrics().request_done(self.service, None,
                                 resp.status if resp.started else None, 0.0)

    def serve_one(self, head):
        """Serve the request of ``head`` (httpparse.Head); return True if
        the connection may serve another one."""
        resp = Response(self)
        start = time.monotonic()
        method = None
        try:
            try:
                req = Request(self, head.method, head.path, head.query,
                              head.version, head.headers)
            except errors.HTTPError as e:
                resp.close = True
                resp.send_error(e.status, e.message)
                return False
            resp.request = req
            method = req.method
            self.busy = True
            try:
                return self._handle(req, resp)
            finally:
                self.busy = False
        finally:
            # The one per-request hook: after the response.
            _metrics().request_done(self.service, method,
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

        if self.closing:
            return False
        if resp.close:
            # After a refused body is dropped (Reader.close_after_discard)
            # the connection closes; until then it waits like an idle one.
            return bool(self.reader.close_after_discard
                        and self.reader.discarding)
        if req.body_left():
            # The handler did not consume the body: we cannot find the
            # next request.
            return False
        return True

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
            if e.close:
                resp.close = True
            if status >= 500:
                log.warning("%s: %s %s: %d %s", self.name, req.method,
                            req.path_for_log(), status,
                            ratelog.printable(message))
            elif self.bound:
                log.info("%s: %s %s: %d %s", self.name, req.method,
                         req.path_for_log(), status,
                         ratelog.printable(message))
            else:
                # Refused before any ticket: anyone on the open port can
                # send these, as fast as they like.
                _refused_log.info(
                    (self.service, status), "%s: %s %s: %d %s", self.name,
                    req.method, req.path_for_log(), status,
                    ratelog.printable(message))
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
        if req.body_left() and not self._drain(req, resp.close):
            resp.close = True
        resp.headers.clear()
        resp.headers.update(self.error_headers)
        resp.send_error(status, message, headers)

    def _drain(self, req, close=False):
        """Drop a small unread body after an error, so the client gets our
        answer instead of a reset and the connection can go on.  Return
        False if the connection must close instead.

        A body refused before its first byte was read (404, 405, ...) is
        dropped as it arrives, with no thread waiting for it: the reader
        discards it before the next head, under the next head's deadline
        (imageio.connections).  A body the handler had started to read is
        read here, for at most streams.DRAIN_IDLE seconds in all."""
        if req.chunked or (req.expects_continue and req._body is None):
            # A client waiting for 100 Continue may never send the body.
            return False
        if req._body is None:
            if req.content_length > DRAIN_LIMIT:
                return False
            self.reader.discarding = req.content_length
            self.reader.discard()
            req.body().remaining = 0
            if close:
                self.reader.close_after_discard = True
            return True
        body = req.body()
        if body.remaining > DRAIN_LIMIT:
            return False
        scratch = memoryview(bytearray(min(body.remaining, 65536)))
        deadline = time.monotonic() + streams.DRAIN_IDLE
        try:
            while body.remaining:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.sock.settimeout(left)
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

