"""The one backend interface, with its defaults (nbdcopy's ``struct
rw_ops``): every backend subclasses ``Backend``, so the copy engine
(``imageio.ops``) and the handlers use every capability as an attribute or
a method, and never probe for one.

Required (no default): ``size()``, ``readinto``, ``write``, ``clone``.
Everything else has a documented default below; a backend overrides what
it does better.
"""

import contextlib

from .. import errors
from .. import extents


def io_error(e, op, offset, length):
    """An OSError like ``e`` (same errno, so a full disk is still 507)
    whose message names the operation, offset and length, as clients see
    it: the strerror only, never the image's path or URL (a ticket holder
    is not told where the image lives; the backend logs that)."""
    if isinstance(e, IOFailed):
        return e  # Named already, by the call that failed.
    reason = e.strerror or type(e).__name__
    return IOFailed(e.errno, "{} at offset {} length {} failed: {}".format(
        op, offset, length, reason))


class IOFailed(OSError):
    """An image I/O error whose message names the operation (io_error)."""


class Backend:
    """A backend: primitives over one image (see ``imageio.backends``)."""

    # The backend kind, as metrics and logs name it.
    name = "backend"

    # Subset of {"extents", "zero", "flush"} this backend supports.
    features = frozenset()

    # Connections the backend supports for this image at once.
    max_readers = 1
    max_writers = 1

    # Whether I/O waits for a disk or a peer, so the copy engine overlaps
    # it with the other side of a transfer.
    overlap = False

    # Whether clones may serve one client's requests at once: writes
    # through any clone land in the same storage, partial blocks are
    # serialized between them, and a flush of any clone covers them all
    # (the NBD service pipelines a connection's requests over clones).
    shared_clones = False

    # Optional fast paths, None where the backend has none:
    #   send_to(fd, offset, length, buf, timeout, progress)
    #       the range to a plain socket, in C;
    #   recv_from(fd, offset, length, buf, timeout, progress) -> int
    #       up to length bytes from a plain socket, written in C;
    #   reader(offset, length), writer(offset, length)
    #       context managers giving the range as one Source or Sink stream
    #       (the proxy's GET and PUT);
    #   checksum(algorithm, block_size) -> dict
    #       the block hash computed next to the data (the proxy asks the
    #       daemon it fronts).
    send_to = None
    # Whether send_to takes a last argument ``tap(offset, view)`` that sees
    # every chunk it sends (read into ``buf`` for it).
    taps_sent = False
    recv_from = None
    # The name of the export's dirty bitmap context
    # ("qemu:dirty-bitmap:NAME") for a dirty ticket over an NBD export
    # that has one; the NBD service offers it to its clients.
    dirty_context = None
    reader = None
    writer = None
    checksum = None

    def size(self):
        raise NotImplementedError

    def readinto(self, buf, offset, length):
        raise NotImplementedError

    def write(self, data, offset):
        raise NotImplementedError

    def clone(self):
        """Another connection to the same image with the same options (a
        client's worker, a checksum reader)."""
        raise NotImplementedError

    def zero(self, offset, length, punch_hole):
        """Default: refuse (a backend without "zero" in ``features``)."""
        raise errors.BackendError(
            "{} backend cannot zero".format(self.name))

    def flush(self):
        """Default: nothing to make durable."""

    def leading_hole(self, offset, length):
        """How many bytes from ``offset`` (at most ``length``) are known,
        cheaply, to read as zeroes: NBD READ replies send a hole chunk
        for them.  Default: 0, nothing known."""
        return 0

    def extents(self, offset=0, length=None, context="zero"):
        """Default: the range is one data extent (what a backend that
        cannot tell holes apart says); no dirty extents."""
        if context != "zero":
            raise errors.NotFound(
                "Unknown extents context {!r}".format(context))
        end = extents.check_range(offset, length, self.size())
        if end == offset:
            return []
        return [extents.Extent(offset, end - offset, False, False)]

    def operation(self, op, nbytes):
        """A context manager for one copy engine call, yielding the
        backend the bytes move with (metrics.Metered counts it there)."""
        return contextlib.nullcontext(self)

    def close(self):
        """Release the backend; idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
