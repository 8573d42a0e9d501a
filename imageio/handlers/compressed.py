"""zstd-coded GET responses and PUT bodies of /images/{ticket}
(imageio.compression has the codec; docs/api.md the scheme)."""

import logging

from .. import buffers
from .. import compression
from .. import errors
from .. import extents
from .. import streams

log = logging.getLogger("images")


def get(req, resp, ticket, backend, buf, offset, length, status, headers,
        coding):
    """Send ``[offset, offset + length)`` zstd-coded: ``coding`` is
    ``"content"`` (Content-Encoding) or ``"transfer"`` (Transfer-Encoding),
    from compression.response_coding()."""
    headers = dict(headers)
    if coding == "content":
        headers["Content-Encoding"] = compression.ZSTD
        headers["Transfer-Encoding"] = "chunked"
    else:
        headers["Transfer-Encoding"] = compression.ZSTD + ", chunked"
    log.debug("%s: sending %d bytes at %d zstd-coded (%s)", req.conn.name,
              length, offset, coding)
    with ticket.operation(offset, length) as op:
        resp.send_headers(status, None, headers)
        writer = resp.chunked_writer()
        compression.send(backend, buf, offset, length, writer.write,
                         op.progress)
        writer.close()


# Memory a zstd-coded PUT holds beyond the transfer buffer: the decoded
# pieces, the input, and the largest history window a frame may ask for.
DECODE_MEMORY = (compression.DECODE_SIZE + compression.INPUT_SIZE
                 + 2**compression.WINDOW_LOG_MAX)


def put(req, ticket, backend, buf, offset, exact_length, cfg):
    """Write the zstd-coded chunked body at ``offset``; ``exact_length``
    is the Content-Range's length (the body must decode to exactly it), or
    None (from ``offset`` up to the image end).  The bytes count as
    transferred only once the whole stream decoded and validated.  Returns
    the decoded size."""
    if exact_length is None:
        limit = ticket.size - offset
    else:
        limit = exact_length
        extents.check_io(offset, limit, ticket.size)
    # Per request, so an idle connection holds none (4 MiB: zeroing it
    # costs a fraction of a millisecond); counted with the decoder's
    # largest window against max_buffer_memory like every transfer's
    # buffer.
    pool = buffers.pool(cfg)
    pool.reserve(DECODE_MEMORY)
    try:
        scratch = bytearray(compression.DECODE_SIZE)
        inbuf = bytearray(compression.INPUT_SIZE)
        body = req.body()
        with ticket.operation(offset, limit) as op:
            try:
                size = compression.receive(
                    body, backend, buf, scratch, inbuf, offset, limit,
                    exact_length is not None, ticket.check)
            except (errors.BadRequest, errors.RangeNotSatisfiable):
                _drain(req.conn, body)
                raise
            op.progress(size)
    finally:
        pool.unreserve(DECODE_MEMORY)
    log.debug("%s: wrote %d bytes at %d from a zstd-coded body",
              req.conn.name, size, offset)
    return size


def _drain(conn, body):
    # Like http.Connection's drain: a client that stopped sending is not
    # waited for.
    conn.sock.settimeout(streams.DRAIN_IDLE)
    try:
        compression.drain(body)
    finally:
        try:
            conn.sock.settimeout(conn.timeout)
        except OSError:
            pass
