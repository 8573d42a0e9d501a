"""/images/{ticket}: OPTIONS, GET, PUT, PATCH."""

import logging

from .. import compression
from .. import errors
from .. import extents
from .. import httpparse
from .. import ops
from . import compressed
from .access import CORS, open_image

log = logging.getLogger("images")

ALL_FEATURES = ["extents", "zero", "flush", "checksum"]

# GETs up to this size are read before the response starts and sent with
# the headers.
SMALL_READ = 256 * 1024


class Images:

    def __init__(self, store, cfg, local_socket=None, nbd=None):
        self.store = store
        self.cfg = cfg
        self.local_socket = local_socket
        # The NBD service's endpoint when it is on (docs/nbd.md):
        # {"port": P, "tls": bool} and "socket" for its unix socket.
        self.nbd = nbd

    def options(self, req, resp, ticket_id):
        headers = dict(CORS)
        headers["Access-Control-Allow-Methods"] = "OPTIONS,GET,PUT,PATCH"
        headers["Access-Control-Allow-Headers"] = \
            "Content-Type,Content-Range,Range,Authorization"
        if ticket_id == "*":
            # The server as a whole.
            headers["Allow"] = "OPTIONS,GET,PUT,PATCH"
            info = {"features": ALL_FEATURES,
                    "encodings": compression.ENCODINGS}
            if self.local_socket:
                info["unix_socket"] = self.local_socket
            resp.send_json(info, headers=headers)
            return
        ticket, backend, _ = open_image(req.conn, ticket_id, None, self.store,
                                        self.cfg)
        # An operation, so a DELETE waits for this answer (or it is 403).
        with ticket.operation():
            self._send_options(resp, ticket, backend, headers)

    def _send_options(self, resp, ticket, backend, headers):
        writable = ticket.may("write")
        headers["Allow"] = "OPTIONS,GET,PUT,PATCH" if writable \
            else "OPTIONS,GET"
        features = [f for f in ("extents", "zero", "flush")
                    if f in backend.features
                    and (writable or f == "extents")]
        features.append("checksum")
        info = {
            "features": features,
            "size": ticket.size,
            "max_readers": backend.max_readers,
            # At least 1, as the established service answers even for a
            # read-only ticket: clients size their connection pool as
            # min(max_readers, max_writers) (virt-v2v's upload plugin),
            # and an empty pool waits forever instead of meeting the 403.
            "max_writers": max(1, backend.max_writers),
            "encodings": compression.ENCODINGS,
        }
        if self.local_socket:
            info["unix_socket"] = self.local_socket
        if self.nbd:
            # The export name is the ticket id (docs/nbd.md).
            info["nbd"] = self.nbd
        resp.send_json(info, headers=headers)

    def head(self, req, resp, ticket_id):
        """GET's answer without the body: qemu's curl driver, nbdkit's curl
        plugin and download managers learn the size and range support
        this way."""
        if req.body_left():
            raise errors.BadRequest("HEAD request must not have a body")
        ticket, _, _ = open_image(req.conn, ticket_id, "read", self.store,
                                  self.cfg)
        status, _, length, headers = _read_answer(req, ticket)
        with ticket.operation():
            resp.send_headers(status, length, headers)

    def get(self, req, resp, ticket_id):
        if req.body_left():
            raise errors.BadRequest("GET request must not have a body")
        ticket, backend, buf = open_image(req.conn, ticket_id, "read",
                                          self.store, self.cfg)
        status, offset, length, headers = _read_answer(req, ticket)
        coding = compression.response_coding(req.headers, status == 206,
                                             req.version)
        if coding and length:
            compressed.get(req, resp, ticket, backend, buf, offset, length,
                           status, headers, coding)
            return
        with ticket.operation(offset, length) as op:
            if length <= SMALL_READ:
                # Read first, then send headers and data together: cheaper
                # for small requests, and a read error is still a clean 500.
                data = backend.readinto(buf, offset, length) if length \
                    else b""
                resp.send_with_body(status, data, headers)
                op.progress(length)
            else:
                resp.send_headers(status, length, headers)
                ops.read(backend, resp.sink(), offset, length, buf,
                         op.progress)

    def put(self, req, resp, ticket_id):
        ticket, backend, buf = open_image(req.conn, ticket_id, "write",
                                          self.store, self.cfg)
        flush = httpparse.parse_bool(req.query.get("flush", "y"), "flush")
        if not req.has_length:
            raise errors.LengthRequired(
                "Content-Length or chunked Transfer-Encoding is required")
        offset = 0
        if "content-range" in req.headers:
            offset, length, _ = httpparse.parse_content_range(
                req.headers["content-range"])
            if not req.chunked and length != req.content_length:
                raise errors.BadRequest(
                    "Content-Range length {} does not match Content-Length "
                    "{}".format(length, req.content_length))
        encoding = req.headers.get("content-encoding", "identity").lower()
        if encoding != "identity":
            # Writing a coded body raw would corrupt the image.
            raise errors.UnsupportedMediaType(
                "Content-Encoding {!r} is not supported on PUT; send zstd "
                "as 'Transfer-Encoding: zstd, chunked'".format(encoding))
        if req.transfer_coding:
            exact = length if "content-range" in req.headers else None
            compressed.put(req, ticket, backend, buf, offset, exact,
                           self.cfg)
            if flush:
                with ticket.operation():
                    backend.flush()
            resp.send(200, headers=CORS)
            return
        if not req.chunked:
            # Before req.body(): a client waiting for 100 Continue gets 416
            # instead of sending a body that cannot be written.
            extents.check_io(offset, req.content_length, ticket.size)
        body = req.body()
        if req.chunked:
            self._put_chunked(ticket, backend, buf, body, offset)
        else:
            length = req.content_length
            with ticket.operation(offset, length) as op:
                if length:
                    ops.write(backend, body, offset, length, buf,
                              op.progress)
                if flush:
                    backend.flush()
        if flush and req.chunked:
            with ticket.operation():
                backend.flush()
        resp.send(200, headers=CORS)

    def _put_chunked(self, ticket, backend, buf, body, offset):
        with ticket.operation(offset, 0) as op:
            while True:
                size = body.next_chunk()
                if size == 0:
                    break
                extents.check_io(offset, size, ticket.size)
                op.op.length += size
                ops.write(backend, body, offset, size, buf, op.progress)
                offset += size

    def patch(self, req, resp, ticket_id):
        ticket, backend, _ = open_image(req.conn, ticket_id, "write",
                                        self.store, self.cfg)
        msg = req.read_json()
        if not isinstance(msg, dict):
            raise errors.BadRequest("Invalid PATCH body: expected an object")
        op = msg.get("op")
        if op == "zero":
            offset = _int_field(msg, "offset", 0)
            size = _int_field(msg, "size", None)
            flush = _bool_field(msg, "flush", False)
            extents.check_io(offset, size, ticket.size)
            if "zero" not in backend.features:
                raise errors.MethodNotAllowed("Backend does not support zero")
            with ticket.operation(offset, size) as running:
                ops.zero(backend, offset, size, ticket.sparse,
                         running.progress)
                if flush:
                    backend.flush()
        elif op == "flush":
            with ticket.operation():
                backend.flush()
        elif op is None:
            raise errors.BadRequest("Invalid PATCH body: missing field 'op'")
        else:
            raise errors.BadRequest(
                "Invalid PATCH body: unknown op {!r}; expected 'zero' or "
                "'flush'".format(op))
        resp.send(200, headers=CORS)


def _read_answer(req, ticket):
    """(status, offset, length, headers) answering a GET or HEAD."""
    size = ticket.size
    headers = dict(CORS)
    headers["Content-Type"] = "application/octet-stream"
    headers["Accept-Ranges"] = "bytes"
    headers["Content-Disposition"] = httpparse.content_disposition(
        ticket.filename)
    if "range" in req.headers:
        offset, length = httpparse.parse_range(req.headers["range"], size)
        headers["Content-Range"] = "bytes {}-{}/{}".format(
            offset, offset + length - 1, size)
        return 206, offset, length, headers
    # A whole-image answer depends on Accept-Encoding.
    headers["Vary"] = "Accept-Encoding"
    return 200, 0, size, headers


def _int_field(msg, name, default):
    if name not in msg:
        if default is None:
            raise errors.BadRequest(
                "Invalid PATCH body: missing field '{}'".format(name))
        return default
    value = msg[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise errors.BadRequest(
            "Invalid PATCH body: field '{}' must be an integer >= 0, got {!r}"
            .format(name, value))
    return value


def _bool_field(msg, name, default):
    value = msg.get(name, default)
    if not isinstance(value, bool):
        raise errors.BadRequest(
            "Invalid PATCH body: field '{}' must be a boolean, got {!r}"
            .format(name, value))
    return value
