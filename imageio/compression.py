"""zstd on the wire: which coding a request asked for, the encoder that
streams an image's extents, and the decoder behind compressed PUTs.

The scheme (docs/api.md, "Compression"):

- A whole-image GET whose ``Accept-Encoding`` allows zstd (``curl
  --compressed``) is answered ``Content-Encoding: zstd``.  A ranged GET never
  is: a range of a content-coded response would count encoded bytes.
- A GET (ranged or not) whose ``TE`` allows zstd is answered
  ``Transfer-Encoding: zstd, chunked``: the coding is the message's, so
  ``Range`` and ``Content-Range`` still count image bytes.
- A PUT with ``Transfer-Encoding: zstd, chunked`` carries zstd frames whose
  decoded bytes are written at the ``Content-Range`` (or from 0).

Compression uses the ``zstandard`` package (its compress calls release the
GIL; zstd's own worker threads compress large images); decoding uses
``imageio._io.zstd``, which bounds output per call and knows when a frame
ends.
"""

import os
import struct
import threading

from . import errors
from . import extents
from . import ops
from . import streams
from ._io import zstd as _zstd

ZSTD = "zstd"

# What OPTIONS advertises as "encodings".
ENCODINGS = [ZSTD]

# zstd level -1: 367 MiB/s a core here and a guest file system still
# shrinks 2.8x (level 1: 310 MiB/s, 3.2x).  On two cores shared by the
# client, qemu-nbd and the daemon, a 1 Gbit/s link is no longer the limit
# at level 1 but the CPU is: -1 moved the ext4 image faster (upload 6.4-7.2 s
# vs 7.6-7.9 s, download 6.5-6.7 vs 7.0-7.2; docs/benchmarks.md,
# "Compression").
LEVEL = -1

# Largest history window a frame we decode may ask for (8 MiB: every zstd
# level up to 19 without --long).  Bounds the decoder's memory.
WINDOW_LOG_MAX = 23

# Transfers at least this large compress on zstd worker threads, so reading
# and sending overlap compressing.
THREADS_MIN = 64 * 1024**2
THREADS_MAX = 4

# Zero runs at least this long are sent as zstd RLE blocks (4 bytes per
# 128 KiB, no compression work); shorter ones are fed to the compressor
# from a shared zero buffer.
ZERO_FRAME_MIN = 1024**2
_ZEROS = memoryview(bytes(ZERO_FRAME_MIN))

# Without worker threads, a data piece at least this long is compressed
# as a frame of its own in one call: zstd's one-shot path, 20% faster than
# feeding a stream piece by piece (its pieces sit in different buffers, so
# zstd works in "external dictionary" mode), the same ratio.
ONESHOT_MIN = 256 * 1024

# Compressed output is sent in chunks of at least this size.
SEND_SIZE = 256 * 1024

# A compressed PUT is decoded this much at a time; a PUT that decodes to at
# most this size is validated whole before any of it is written.
DECODE_SIZE = 4 * 1024**2

# Compressed input read from the body at a time.
INPUT_SIZE = 256 * 1024

# Unread compressed body drained after a bad stream, so the client reads
# the 400 instead of a reset connection (and the connection survives).
DRAIN_LIMIT = 1024**2


# Negotiation.

def _codings(value):
    """{coding: q} from an Accept-Encoding or TE value."""
    result = {}
    for item in value.lower().split(","):
        name, _, params = item.partition(";")
        name = name.strip()
        if not name:
            continue
        q = 1.0
        for param in params.split(";"):
            key, _, val = param.partition("=")
            if key.strip() == "q":
                try:
                    q = float(val)
                except ValueError:
                    q = 0.0
        result[name] = q
    return result


def _allows(value, coding, wildcard):
    if not value:
        return False
    codings = _codings(value)
    q = codings.get(coding, codings.get("*", 0.0) if wildcard else 0.0)
    return q > 0


def response_coding(headers, ranged, version="HTTP/1.1"):
    """How to encode a GET response: ``"content"`` (Content-Encoding: zstd),
    ``"transfer"`` (Transfer-Encoding: zstd, chunked) or None (identity).

    ``headers`` are the request's (lower-case names).  HTTP/1.0 has no
    chunked framing, so its clients get identity.
    """
    if version != "HTTP/1.1":
        return None
    if _allows(headers.get("te", ""), ZSTD, wildcard=False):
        return "transfer"
    if not ranged and _allows(headers.get("accept-encoding", ""), ZSTD,
                              wildcard=True):
        return "content"
    return None


# Encoding.

_BLOCK = 128 * 1024
_FRAME_MAGIC = struct.pack("<I", 0xFD2FB528)
# Frame header descriptor: 8-byte content size, not single segment (so the
# window stays 128 KiB however long the run), no checksum, no dictionary.
_FRAME_DESCRIPTOR = b"\xc0"
# Window descriptor: 2**(10 + 7) = 128 KiB.
_WINDOW_DESCRIPTOR = b"\x38"


def _rle_block(size, last):
    # Block header: bit 0 last block, bits 1-2 type (1 = RLE), bits 3-23
    # the regenerated size; then the byte to repeat.
    header = int(last) | (1 << 1) | (size << 3)
    return struct.pack("<I", header)[:3] + b"\0"


# 1 GiB of zeroes in 32 KiB of blocks.
_RLE_GROUP = 8192
_RLE_BLOCKS = _rle_block(_BLOCK, False) * _RLE_GROUP


def zero_frame(length):
    """Yield the parts of one zstd frame decoding to ``length`` (> 0) zero
    bytes, made of RLE blocks: 32 KiB of frame per GiB of zeroes."""
    yield (_FRAME_MAGIC + _FRAME_DESCRIPTOR + _WINDOW_DESCRIPTOR
           + struct.pack("<Q", length))
    full = (length - 1) // _BLOCK
    while full:
        n = min(full, _RLE_GROUP)
        yield _RLE_BLOCKS[:4 * n]
        full -= n
    yield _rle_block(length - ((length - 1) // _BLOCK) * _BLOCK, True)


_local = threading.local()


def _compressor(level, threads):
    """A ZstdCompressor for this thread: the last one released with the
    same settings (its context and tables are allocated once per thread,
    not per request), else a new one."""
    # Imported here: only encoders need it, and the client starts faster
    # without it.
    import zstandard
    free = getattr(_local, "free", None)
    if free is not None and free[0] == (level, threads):
        _local.free = None
        return free[1]
    return zstandard.ZstdCompressor(level=level, threads=threads,
                                    write_checksum=True)


def _release(key, cctx):
    # Only a closed encoder gives its compressor back, so two encoders of
    # one thread never share one.
    if cctx is not None:
        _local.free = (key, cctx)


def threads_for(length):
    """zstd worker threads for a transfer of ``length`` bytes: none for
    small ones; for large ones the cores not busy now (at least 1, so
    compression overlaps reading and sending)."""
    if length < THREADS_MIN:
        return 0
    free = (os.cpu_count() or 1) - os.getloadavg()[0]
    return max(1, min(THREADS_MAX, int(free)))


class Encoder:
    """Writes a zstd stream of data and zero runs to ``write(bytes)``.

    Data goes through zstd (with a content checksum per frame); long zero
    runs become RLE frames of their own.
    """

    def __init__(self, write, length, level=LEVEL):
        self._write = write
        self._threads = threads_for(length)
        self._key = (level, self._threads)
        self._cctx = _compressor(level, self._threads)
        self._obj = None
        self._pending = []
        self._pending_size = 0

    def data(self, view):
        """Compress ``view`` (bytes-like, may be reused once this
        returns)."""
        if not self._threads and len(view) >= ONESHOT_MIN:
            self._end_frame()
            self._send(self._cctx.compress(view))
            return
        if self._obj is None:
            self._obj = self._cctx.compressobj()
        self._send(self._obj.compress(view))

    def zeros(self, length):
        """Encode ``length`` zero bytes."""
        if length >= ZERO_FRAME_MIN:
            self._end_frame()
            for part in zero_frame(length):
                self._send(part)
            return
        while length:
            n = min(length, len(_ZEROS))
            self.data(_ZEROS[:n])
            length -= n

    def close(self):
        """End the stream: the last frame and any pending output."""
        self._end_frame()
        self._flush()
        _release(self._key, self._cctx)
        self._cctx = None

    def _end_frame(self):
        if self._obj is not None:
            self._send(self._obj.flush())
            self._obj = None

    def _send(self, data):
        if data:
            self._pending.append(data)
            self._pending_size += len(data)
            if self._pending_size >= SEND_SIZE:
                self._flush()

    def _flush(self):
        if self._pending:
            data = b"".join(self._pending)
            self._pending = []
            self._pending_size = 0
            self._write(data)


def send(backend, buf, offset, length, write, progress):
    """Send ``[offset, offset + length)`` of the image as one zstd stream
    to ``write``; ``progress(n)`` after each piece (raises Canceled).

    Zero extents become RLE frames without being read; data extents go
    through the copy engine (``ops.read``) into the encoder, so reading
    the next chunk overlaps compressing this one where the backend waits
    for storage, as every other transfer does.
    """
    encoder = Encoder(write, length)
    sink = streams.EncodingSink(encoder)
    for start, size, zero in extents.pieces(backend, offset, length):
        if zero:
            encoder.zeros(size)
            progress(size)
        else:
            ops.read(backend, sink, start, size, buf, progress)
    encoder.close()


# Decoding.

def decoder():
    """A zstd decoder whose window is bounded by WINDOW_LOG_MAX."""
    return _zstd.Decoder(WINDOW_LOG_MAX)


def receive(body, backend, buf, scratch, inbuf, offset, limit, exact,
            check):
    """Decode a zstd-coded chunked ``body`` and write it at ``offset``.

    Decodes ``len(scratch)`` bytes at a time and writes each piece once
    decoded; a body that decodes to at most that is validated whole before
    anything is written.  ``check()`` is called between pieces (raises
    Canceled).  Returns the decoded size.  Raises BadRequest (bad,
    truncated or oversized stream) or RangeNotSatisfiable (past the image
    end).
    """
    source = streams.DecodingSource(body, limit, exact, inbuf, decoder())
    view = memoryview(scratch)
    pos = offset
    while True:
        n = _read_full(source, view)
        if n:
            ops.write(backend, streams.MemorySource(view[:n]), pos, n, buf,
                      lambda _: check())
            pos += n
        if n < len(view):
            return pos - offset


def _read_full(source, view):
    done = 0
    while done < len(view):
        got = source.readinto(view[done:])
        if not got:
            break
        done += got
    return done


def drain(body):
    """Read and drop up to DRAIN_LIMIT more bytes of a chunked body, so the
    client can read our answer; errors end the drain quietly."""
    scratch = memoryview(bytearray(64 * 1024))
    left = DRAIN_LIMIT
    try:
        while not body.done and left > 0:
            if not body.remaining and body.next_chunk() == 0:
                return
            n = body.readinto(scratch[:min(len(scratch), left)])
            if not n:
                return
            left -= n
    except (errors.Error, OSError):
        pass
