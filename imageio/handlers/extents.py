"""/images/{ticket}/extents: where the data is.

``?start=S&length=L`` asks for one range (clipped to the image), answered
from the backend for that range alone.  Any answer is built and sent in
batches, so the daemon's memory stays flat whatever the number of extents:
users of the established service hit whole-image answers built in memory
on 8 TiB disks.
"""

from .. import errors
from .. import extents
from .access import CORS, Resource, open_image, query_int

# Extents a batch aims at: about 600 KiB of JSON.
BATCH = 10000
# Bytes asked from the backend per batch: adapted to the density met so
# far, within these bounds.  The upper bound caps the extents a backend
# returns in one list where a sparse stretch meets a dense one (2 GiB of
# 4 KiB runs: 512k extents, once, before the step shrinks).
FIRST_STEP = 64 * 1024**2
MIN_STEP = 1024**2
MAX_STEP = 2 * 1024**3


class Extents(Resource):

    def get(self, req, resp, ticket_id):
        ticket, backend, _ = open_image(req.conn, ticket_id, "read",
                                        self.store, self.cfg, buffer=False)
        context = req.query.get("context", "zero")
        if context not in ("zero", "dirty"):
            raise errors.BadRequest(
                "Invalid context {!r}: expected 'zero' or 'dirty'".format(
                    context))
        if context == "dirty" and not ticket.dirty:
            raise errors.NotFound(
                "Dirty extents are not available: the ticket was not "
                "created with dirty=true")
        if "extents" not in backend.features:
            raise errors.NotFound("Backend does not support extents")
        with ticket.operation():
            size = min(ticket.size, backend.size())
            start, end = _range(req.query, size)
            batches = _encode(_merged(_walk(backend, start, end, context)),
                              context)
            _send(resp, batches)


def _range(query, size):
    """[start, end) asked by ``start`` and ``length``, clipped to the
    image; BadRequest for values that are not integers >= 0."""
    start = query_int(query, "start", 0)
    length = query_int(query, "length", None)
    start = min(start, size)
    end = size if length is None else min(start + length, size)
    return start, end


def _walk(backend, start, end, context):
    """Lists of extents covering [start, end), asked from the backend
    piece by piece; each piece sized to hold about BATCH extents."""
    return extents.windows(
        lambda pos, n: backend.extents(pos, n, context), start, end,
        FIRST_STEP, target=BATCH, min_step=MIN_STEP, max_step=MAX_STEP)


def _merged(batches):
    """Batches with extents of equal flags merged across batch ends; the
    last extent of each batch waits for the next."""
    out = []
    for e in extents.merged(e for batch in batches for e in batch):
        out.append(e)
        if len(out) >= BATCH:
            yield out
            out = []
    if out:
        yield out


# Byte for byte what json.dumps gives for the same dicts, without building
# them (a million extents: seconds saved).
_ZERO = '{{"start": {}, "length": {}, "zero": {}, "hole": {}}}'
_DIRTY = '{{"start": {}, "length": {}, "dirty": {}, "zero": {}}}'
_BOOL = ("false", "true")


def _encode(batches, context):
    """JSON text of the list, one bytes piece per batch."""
    form = _ZERO if context == "zero" else _DIRTY
    sep = "["
    for batch in batches:
        text = ", ".join(form.format(e[0], e[1], _BOOL[e[2]], _BOOL[e[3]])
                         for e in batch)
        yield (sep + text).encode("ascii")
        sep = ", "
    yield b"[]\n" if sep == "[" else b"]\n"


def _send(resp, pieces):
    """A short answer goes with Content-Length; a long one is sent in
    chunks as it is made."""
    head = []
    size = 0
    for piece in pieces:
        head.append(piece)
        size += len(piece)
        if size > 256 * 1024:
            break
    else:
        resp.send_with_body(200, b"".join(head), _headers())
        return
    headers = _headers()
    if resp.request is not None and resp.request.version == "HTTP/1.0":
        # No chunked framing in HTTP/1.0: the body ends at the close.
        resp.close = True
        resp.send_headers(200, None, headers)
        out = _UntilClose(resp.sink())
    else:
        headers["Transfer-Encoding"] = "chunked"
        resp.send_headers(200, None, headers)
        out = resp.chunked_writer()
    for piece in head:
        out.write(piece)
    for piece in pieces:
        out.write(piece)
    out.close()


class _UntilClose:
    """A body delimited by closing the connection (HTTP/1.0)."""

    def __init__(self, sink):
        self.write = sink.write

    def close(self):
        pass


def _headers():
    headers = dict(CORS)
    headers["Content-Type"] = "application/json"
    return headers
