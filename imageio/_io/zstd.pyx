"""Bounded zstd decoding straight into a caller's buffer, GIL released.

Why not the ``zstandard`` package for this side: its streaming readers and
writers accept a stream cut inside a frame without an error, and its
``decompressobj`` returns all the output of its input at once, so a tiny
body could make it allocate gigabytes.  ``ZSTD_decompressStream`` writes at
most the space it is given and says when a frame is complete, which is what
a server that must refuse truncated streams and decompression bombs needs.
(Compression uses ``zstandard``: it releases the GIL and runs zstd's worker
threads.)
"""

from cpython.buffer cimport (PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release,
                             PyObject_GetBuffer)

from imageio._io.libzstd cimport (
    ZSTD_DCtx, ZSTD_inBuffer, ZSTD_outBuffer, ZSTD_createDCtx, ZSTD_freeDCtx,
    ZSTD_DCtx_setParameter, ZSTD_d_windowLogMax, ZSTD_decompressStream,
    ZSTD_isError, ZSTD_getErrorName)

cdef enum:
    # Smaller calls keep the GIL: releasing it costs more than the work.
    NOGIL_MIN = 64 * 1024


class Error(ValueError):
    """The input is not a valid zstd stream (or needs a larger window than
    allowed)."""


cdef class Decoder:
    """Decodes one stream of zero or more concatenated zstd frames.

    ``window_log_max`` bounds the memory a frame may make the decoder
    allocate (2**window_log_max bytes of history).
    """

    cdef ZSTD_DCtx *_ctx
    cdef size_t _hint
    cdef readonly bint started

    def __cinit__(self, int window_log_max=23):
        self._ctx = ZSTD_createDCtx()
        if self._ctx == NULL:
            raise MemoryError("Cannot create zstd decoder")
        cdef size_t rc = ZSTD_DCtx_setParameter(
            self._ctx, ZSTD_d_windowLogMax, window_log_max)
        if ZSTD_isError(rc):
            raise ValueError(ZSTD_getErrorName(rc).decode())
        # No frame begun: an empty stream is complete.
        self._hint = 0
        self.started = False

    def __dealloc__(self):
        if self._ctx != NULL:
            ZSTD_freeDCtx(self._ctx)

    @property
    def frame_done(self):
        """True when the input so far ends at a frame boundary, with all of
        its output returned: the stream may end here."""
        return self._hint == 0

    def decode(self, src, dst):
        """Decode from ``src`` (bytes-like) into ``dst`` (writable
        bytes-like), writing at most ``len(dst)`` bytes.

        Returns ``(consumed, produced)``: input bytes used and output bytes
        written.  Raises ``Error`` for invalid input.
        """
        cdef Py_buffer inb, outb
        cdef ZSTD_inBuffer zin
        cdef ZSTD_outBuffer zout
        cdef size_t rc
        PyObject_GetBuffer(src, &inb, PyBUF_SIMPLE)
        try:
            PyObject_GetBuffer(dst, &outb, PyBUF_SIMPLE | PyBUF_WRITABLE)
            try:
                zin.src = inb.buf
                zin.size = inb.len
                zin.pos = 0
                zout.dst = outb.buf
                zout.size = outb.len
                zout.pos = 0
                if inb.len + outb.len < NOGIL_MIN:
                    rc = ZSTD_decompressStream(self._ctx, &zout, &zin)
                else:
                    with nogil:
                        rc = ZSTD_decompressStream(self._ctx, &zout, &zin)
            finally:
                PyBuffer_Release(&outb)
        finally:
            PyBuffer_Release(&inb)
        if ZSTD_isError(rc):
            raise Error(ZSTD_getErrorName(rc).decode())
        if zin.pos or zout.pos:
            self.started = True
            self._hint = rc
        return zin.pos, zout.pos
