"""Extents: where an image's data is, and the one way to walk it.

A leaf module (nothing of imageio below it): the types every backend
returns, the range check they share, and the walks that the extents
handler, the checksum, compressed sends and the client's planner do over
them, written once.

- ``Extent(start, length, zero, hole)`` and ``DirtyExtent(start, length,
  dirty, zero)``: what ``backend.extents()`` returns.
- ``check_range(offset, length, size)``: the end of ``[offset, offset +
  length)``, or RangeNotSatisfiable outside the image; ``check_io`` the
  same for a read, write or zero.
- ``pieces(backend, offset, length)``: ``(start, length, zero)`` covering
  exactly the range, asked for that range alone.
- ``windows(extents_of, start, end, step)``: the extents of a range asked
  ``step`` bytes at a time (never the whole image at once), with the step
  adapted to the density met when asked to.
- ``merged(extents)``: adjacent extents with equal flags merged, as a
  generator (each one out once the next differs).
"""

import collections

from . import errors

Extent = collections.namedtuple("Extent", "start length zero hole")
DirtyExtent = collections.namedtuple("DirtyExtent", "start length dirty zero")


def check_range(offset, length, size):
    """Return the end of the extents range ``[offset, offset + length)``
    (``length=None``: ``size``); raise RangeNotSatisfiable outside
    ``[0, size]``."""
    end = size if length is None else offset + length
    if offset < 0 or end < offset or end > size:
        raise errors.RangeNotSatisfiable(
            "Extents range {}+{} is outside the image (size {})".format(
                offset, length, size), size=size)
    return end


def check_io(offset, length, size):
    """RangeNotSatisfiable unless ``[offset, offset + length)`` is inside
    an image of ``size`` bytes: the one check of a read, write or zero
    range (handlers and backends alike)."""
    if offset < 0 or length < 0 or offset + length > size:
        raise errors.RangeNotSatisfiable(
            "Requested range {}-{} is outside the image (size {})".format(
                offset, offset + length - 1, size), size=size)


def pieces(backend, offset, length):
    """Yield ``(start, length, zero)`` covering ``[offset, offset +
    length)`` from the backend's extents for that range alone (one data
    piece when the backend has no extents)."""
    end = offset + length
    if "extents" not in backend.features:
        if length:
            yield offset, length, False
        return
    for ext in backend.extents(offset, length, "zero"):
        ext_end = ext.start + ext.length
        start = max(ext.start, offset)
        stop = min(ext_end, end)
        if start < stop:
            yield start, stop - start, ext.zero
        if ext_end >= end:
            return


def windows(extents_of, start, end, step, target=None, min_step=None,
            max_step=None):
    """Yield lists of extents covering ``[start, end)``, from
    ``extents_of(offset, length)`` asked ``step`` bytes at a time.

    With ``target``, the step adapts so that a window holds about
    ``target`` extents (within ``min_step`` and ``max_step``): dense
    stretches are asked in small pieces, sparse ones in large.
    """
    pos = start
    while pos < end:
        n = min(step, end - pos)
        batch = list(extents_of(pos, n))
        yield batch
        pos += n
        if target is not None:
            if batch:
                step = int(step * target / len(batch))
            step = max(min_step, min(max_step, step))


def merged(extents):
    """Merge adjacent extents (tuples ``(start, length, flags...)``) whose
    flags are equal; a generator."""
    last = None
    for e in extents:
        if last is not None and tuple(last[2:]) == tuple(e[2:]) and \
                last[0] + last[1] == e[0]:
            last = _grow(last, e[1])
        else:
            if last is not None:
                yield last
            last = e
    if last is not None:
        yield last


def _grow(e, length):
    if hasattr(e, "_replace"):
        return e._replace(length=e.length + length)
    return (e[0], e[1] + length) + tuple(e[2:])
