"""Backends: one module per ticket URL scheme, one interface.

Like nbdcopy's ``struct rw_ops``: backends offer primitives, the one copy
engine (``imageio.ops``) chunks, overlaps and reports, and neither it nor
the handlers ask which kind of backend they hold.  A backend is opened once
per (client connection, ticket) and reused across that connection's
requests.

The interface: every backend subclasses ``base.Backend``, which gives
each capability below a documented default, so neither the copy engine nor
the handlers probe for one:

``size() -> int``
    Size of the image in bytes.

``features -> frozenset``
    Subset of {"extents", "zero", "flush"} that this backend supports.

``max_readers``, ``max_writers`` (int)
    Connections the backend supports for this image at once.

``readinto(buf, offset, length) -> memoryview``
    Read exactly ``length`` bytes at ``offset`` (at most ``len(buf)``
    counting the O_DIRECT alignment around them: ``imageio.ops`` chunks
    fit) and return a view holding them: of ``buf``, or of a shared zero
    buffer for a hole.  ``buf`` is an ``imageio._io.buffer.AlignedBuffer``.

``write(data, offset)``
    Write all of ``data`` (bytes-like) at ``offset``.  Does not flush.

``overlap`` (bool)
    Whether this backend's I/O waits for a disk or a peer, so that
    ``imageio.ops`` overlaps it with the other side of a transfer (False
    where a read is a memory copy and the handoff would cost more than it
    hides).

``zero(offset, length, punch_hole)``
    Make the range read as zeroes.  ``punch_hole=True`` may deallocate.

``flush()``
    Make all written data durable.

``extents(offset=0, length=None, context="zero") -> list``
    ``Extent`` (or, for ``context="dirty"``, ``DirtyExtent``) tuples
    covering ``[offset, offset + length)`` (``length=None``: to the end) in
    order, adjacent ones with equal flags merged; found for that range
    only, never by walking the image from the start.  A range outside
    ``[0, size()]`` raises ``errors.RangeNotSatisfiable``; a context the
    backend cannot answer raises ``errors.NotFound``.

``close()``
    Release the backend; idempotent.

Optional fast paths and streams, ``None`` in ``base.Backend``, used by
``imageio.ops`` when a backend has them:

``send_to(fd, offset, length, buf, timeout, progress)``
    Send the range to the plain socket ``fd`` in C (sendfile, libnbd
    requests in flight), calling ``progress(n)`` about once per ``len(buf)``
    bytes; what ``progress`` raises stops it.  The fd may be non-blocking:
    C loops poll on EAGAIN for at most ``timeout`` seconds.

``recv_from(fd, offset, length, buf, timeout, progress) -> int``
    Receive up to ``length`` bytes from the plain socket ``fd`` and write
    them at ``offset`` in C; returns the bytes received (fewer only when the
    peer closed).

``reader(offset, length)``, ``writer(offset, length)``
    Context managers giving the range as one stream: a ``Source`` read in
    order, a ``Sink`` written in order (the proxy's GET and PUT).

Backend failures raise ``OSError`` (or ``errors.BackendError``); the HTTP
layer turns them into a ``500`` naming the operation, offset and length
(``507`` for ``ENOSPC``).
"""

from .. import errors
from .. import urls



def open_backend(ticket, cfg):
    """Open the backend serving ``ticket``.

    ``ticket`` has ``url``, ``ops`` (list), ``sparse``, ``dirty``; ``cfg`` is
    the daemon configuration.  Raises ``errors.BackendError`` when the image
    cannot be reached.
    """
    kind = urls.scheme_of(ticket.url)
    return _module(kind).open(ticket, cfg)


def load_all():
    """Import every backend module now (before the daemon drops its
    privileges)."""
    for kind in ("file", "nbd", "http"):
        _module(kind)


def _module(kind):
    if kind == "file":
        from . import file as module
    elif kind == "nbd":
        from . import nbd as module
    elif kind == "http":
        from . import http as module
    else:
        raise errors.BadRequest("Unsupported url scheme: {}".format(kind))
    return module
