"""The streams bytes move through: the Source/Sink protocol and its kinds,
used by the server (request bodies, responses), the proxy and the client
(the HTTP client's bodies) alike.  Beside the transport: below HTTP, above
nothing but the transport, the pure parser and the zstd decoder.

The protocol, written once:

Source (what ``ops.write`` reads: a request body, a response body, decoded
bytes, bytes in memory)
    ``readinto(view) -> int``: up to ``len(view)`` bytes, 0 at the end
    (a short count is not the end).  ``fd``: a raw socket fd that C code
    may read the rest from directly when >= 0 (plain socket, nothing
    buffered in Python), else -1; C code that read ``n`` bytes from
    ``fd`` reports them with ``consumed(n)``, so the source knows where
    its end is.  ``timeout``: seconds C code may wait for the peer.
    ``remaining`` (known-length sources): bytes not read yet.

Sink (what ``ops.read`` writes to: a socket, an encoder)
    ``write(data)``: all of ``data`` (bytes-like, reusable once it
    returns).  ``fd``: a raw socket fd C code may send to directly
    (sendfile, splice) when >= 0, else -1.  ``timeout`` as for sources.

Kinds: ``Reader`` (a connection's buffered reader: heads, lines, bodies),
``Body`` (known length), ``ChunkedBody`` (chunked framing), ``Sink`` (a
socket), ``ChunkedWriter`` (chunked framing out), ``EncodingSink``
(zstd out), ``DecodingSource`` (zstd in), ``MemorySource``.
"""

import time

from . import errors
from . import httpparse
from . import transport
from ._io import zstd as _zstd

# Receive size for the line reader.
READ_SIZE = 64 * 1024
# fill() stops once this much is buffered: a head is at most MAX_HEAD, so
# a client that keeps its socket full cannot grow the buffer or keep the
# selector thread receiving for ever.
FILL_LIMIT = httpparse.MAX_HEAD + READ_SIZE
# Once a request starts arriving, its request line and headers must be
# complete within this time, however slowly a client trickles them in
# (blocking use; the daemon uses [daemon] header_timeout).
HEADERS_TIMEOUT = 30
# After an error in the middle of a body, how long in all the drain waits
# for the rest of it.  The count of unread bytes may be stale when C code
# failed mid-receive, so a client that sent everything must not be kept
# waiting for bytes that never come.  (A body refused before its first
# byte is dropped as it arrives, by the selector: Reader.discarding.)
DRAIN_IDLE = 1.0


class Source:
    """A source of bytes (see the protocol above): the defaults."""

    fd = -1
    timeout = None

    def readinto(self, view):
        raise NotImplementedError

    def consumed(self, n):
        """Account ``n`` bytes read directly from ``fd`` by C code."""
        self.remaining -= n


class _Framed(Source):
    """A body read from a Reader, never past ``remaining``."""

    def readinto(self, view):
        if self.remaining <= 0:
            return 0
        if len(view) > self.remaining:
            view = view[:self.remaining]
        n = self._reader.readinto(view, fill=True)
        self.remaining -= n
        return n


class Reader:
    """Reads request heads, lines and bodies from a connection.

    Bytes received beyond a head or line stay in a small buffer and are
    returned first; large reads go straight from the socket into the
    caller's buffer (``readinto``), so bodies land in aligned buffers
    without a copy.
    """

    def __init__(self, sock):
        self._sock = transport.wrap(sock)
        self._buf = bytearray()
        self._pos = 0
        # The peer closed its side (seen by fill()).
        self.eof = False
        # Bytes of a refused request's body still to drop as they arrive
        # (before the next head).
        self.discarding = 0
        # The refused request's response said "Connection: close": close
        # once its body is dropped (closing with unread bytes would reset
        # the connection under the client before it reads the answer).
        self.close_after_discard = False
        # A partial head: where it started, how much of it had arrived at
        # the last full parse, and how far it was searched for its end.
        self._head_at = -1
        self._parsed = 0
        self._searched = 0

    def peek_buffered(self):
        return len(self._buf) - self._pos

    # Request heads.

    def parse_head(self):
        """The next request head if all of it is buffered, else None.
        Raises HTTPError for a malformed head (httpparse.parse_head).

        A head arriving in many small pieces is not parsed again from its
        start for each piece: only when its end (an empty line) has
        arrived, or when it has doubled since the last parse (which finds
        a too-long line or too many headers early), so the work stays
        linear in the head's size.
        """
        if self.discarding and not self.discard():
            return None
        if self.close_after_discard:
            raise ConnectionResetError(
                "Closing after the refused request's body")
        avail = len(self._buf) - self._pos
        if avail == 0:
            return None
        if self._head_at != self._pos:
            self._head_at, self._parsed, self._searched = self._pos, 0, 0
        elif avail < 2 * self._parsed and avail < httpparse.MAX_HEAD:
            since = self._pos + max(0, self._searched - 3)
            self._searched = avail
            if self._buf.find(b"\n\r\n", since) < 0 \
                    and self._buf.find(b"\n\n", since) < 0:
                return None
        self._parsed = self._searched = avail
        result = httpparse.parse_head(self._buf, self._pos)
        if result is None:
            if avail >= FILL_LIMIT:
                # Only line ends (parse_head skips them between requests),
                # filling what fill() may buffer: nothing will come of it.
                raise errors.HeadersTooLarge(
                    "Request head too large: at most {} bytes allowed"
                    .format(httpparse.MAX_HEAD))
            return None
        head, self._pos = result
        self._head_at = -1
        self._compact()
        return head

    def discard(self):
        """Drop buffered bytes of a refused body; True once all of it is
        gone."""
        n = min(self.discarding, len(self._buf) - self._pos)
        if n:
            self._pos += n
            self.discarding -= n
            self._compact()
        return self.discarding == 0

    def only_blank(self):
        """Whether the buffered bytes are only line ends (a client may
        send a stray CRLF after a request)."""
        return not self._buf[self._pos:].strip(b"\r\n")

    def fill(self, limit=FILL_LIMIT):
        """Receive the bytes available now from a non-blocking socket, until
        ``limit`` bytes are buffered; return how many.  Sets ``eof`` when
        the peer closed.  Bytes of a refused body are dropped as they
        come."""
        total = 0
        while True:
            if self.discarding:
                self.discard()
            if len(self._buf) - self._pos >= limit:
                return total
            data = self._sock.recv_nowait(READ_SIZE)
            if data is None:
                return total
            if not data:
                self.eof = True
                return total
            self._buf += data
            total += len(data)
            if len(data) < READ_SIZE and not self._sock.pending():
                return total

    def read_head(self, deadline=None):
        """Block until a whole head is buffered (None at end of stream,
        or HTTPError); the head must be complete by ``deadline``
        (monotonic) once its first byte arrived.  For blocking use of a
        connection (Connection.serve); the daemon reads heads in the
        selector (imageio.connections)."""
        while True:
            head = self.parse_head()
            if head is not None:
                return head
            if self.peek_buffered() and not self.only_blank() \
                    and deadline is None:
                deadline = time.monotonic() + HEADERS_TIMEOUT
            chunk = self._recv_until(deadline)
            if not chunk:
                if self.peek_buffered() and not self.only_blank():
                    raise ConnectionResetError("Client closed during head")
                return None
            self._buf += chunk

    def read_response_head(self):
        """Block until a whole response head is buffered (the client side
        of a connection: imageio.httpclient); ConnectionResetError when
        the peer closes first, BadGateway for a malformed head."""
        while True:
            if self._pos < len(self._buf):
                result = httpparse.parse_response_head(self._buf, self._pos)
                if result is not None:
                    head, self._pos = result
                    self._compact()
                    return head
            chunk = self._sock.recv(READ_SIZE)
            if not chunk:
                raise ConnectionResetError(
                    "connection closed before the response")
            self._buf += chunk

    def _recv_until(self, deadline):
        if deadline is None:
            return self._sock.recv(READ_SIZE)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("Request headers not received in time")
        timeout = self._sock.gettimeout()
        self._sock.settimeout(remaining if timeout is None
                              else min(timeout, remaining))
        try:
            return self._sock.recv(READ_SIZE)
        finally:
            self._sock.settimeout(timeout)

    # Lines and bodies.

    def readline(self, limit=httpparse.MAX_LINE):
        """Read one line inside a body (chunk sizes, trailers): it waits
        only for the socket's timeout, so a streamed upload may last as
        long as its data keeps coming."""
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
            chunk = self._sock.recv(READ_SIZE)
            if not chunk:
                line = bytes(self._buf[self._pos:])
                self._buf.clear()
                self._pos = 0
                return line
            self._buf += chunk

    def _compact(self):
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > READ_SIZE:
            del self._buf[:self._pos]
            self._pos = 0

    def readinto(self, view, fill=False):
        """Read up to len(view) bytes; 0 at end of stream.  ``fill``: the
        stream owes at least len(view) bytes (a body's rest), so read
        until the view is full (fewer only when the peer closed)."""
        avail = len(self._buf) - self._pos
        if avail:
            n = min(avail, len(view))
            view[:n] = self._buf[self._pos:self._pos + n]
            self._pos += n
            self._compact()
            return n
        if fill:
            return self._sock.recv_fill(view)
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


class Body(_Framed):
    """A body of known length (a request's, or a response's in the HTTP
    client), never read past its end: the source that ``ops.write`` reads.

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
        self._transport = transport.wrap(sock)
        self.timeout = timeout
        self.remaining = length

    @property
    def fd(self):
        if self._reader.peek_buffered():
            return -1
        return self._transport.fd


class ChunkedBody(_Framed):
    """A chunked request body, read one chunk at a time: ``next_chunk()``
    returns the size of the next chunk (0 at the end); then the chunk's
    bytes are read through this object as through a ``Body``."""

    def __init__(self, reader, timeout):
        self._reader = reader
        self.timeout = timeout
        self.remaining = 0
        self.done = False
        self._first = True

    def next_chunk(self):
        if self.remaining:
            raise errors.BadRequest("Chunk not fully read")
        if not self._first:
            if self._readline("chunk end") not in (b"\r\n", b"\n"):
                raise errors.BadRequest("Invalid chunked body: missing CRLF")
        self._first = False
        size = httpparse.parse_chunk_size(self._readline("chunk size line"))
        if size == 0:
            # Trailers, then an empty line.
            for _ in range(httpparse.MAX_HEADERS):
                if self._readline("trailer line") in (b"\r\n", b"\n", b""):
                    break
            else:
                # The rest would be parsed as the next request.
                raise errors.BadRequest(
                    "Too many trailer lines: at most {} allowed".format(
                        httpparse.MAX_HEADERS))
            self.done = True
        self.remaining = size
        return size

    def _readline(self, what):
        try:
            return self._reader.readline()
        except _LineTooLong:
            raise errors.BadRequest(
                "Invalid chunked body: {} longer than {} bytes".format(
                    what, httpparse.MAX_LINE))


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


class Sink:
    """Where ops.read() sends bytes: a socket (a GET's client, a PUT's
    daemon in the HTTP client).

    ``fd`` is the raw socket fd when bytes can go to it directly (plain
    socket: sendfile/splice/send from C), else -1 (TLS: use ``write``).
    The fd may be non-blocking (a socket with a timeout): C loops must poll
    on EAGAIN for at most ``timeout`` seconds.
    """

    def __init__(self, sock, timeout=None):
        self._sock = transport.wrap(sock)
        self.timeout = timeout
        self.fd = self._sock.fd

    def write(self, data):
        """Send all of ``data`` (bytes-like)."""
        self._sock.sendall(data)


class EncodingSink:
    """A Sink compressing what is written to it with ``encoder`` (a
    compression.Encoder sending one zstd stream); ``close()`` ends the
    stream."""

    fd = -1

    def __init__(self, encoder, timeout=None):
        self.timeout = timeout
        self.write = encoder.data
        self.close = encoder.close


class DecodingSource(Source):
    """The decoded bytes of a zstd-coded chunked body (``body``, a
    ChunkedBody), decoded by ``decoder`` (imageio._io.zstd.Decoder).

    Yields at most ``limit`` bytes; ``exact`` means the stream must decode
    to exactly ``limit`` bytes (a Content-Range).  Before returning the last
    bytes it checks that the stream ends there, at a frame boundary, with no
    more output: a bad stream raises before its end can be written.
    """

    def __init__(self, body, limit, exact, inbuf, decoder):
        self._body = body
        self.timeout = body.timeout
        self._limit = limit
        self._left = limit
        self._exact = exact
        self._decoder = decoder
        self._in = memoryview(inbuf)
        self._start = self._end = 0
        self._done = False

    @property
    def received(self):
        """Decoded bytes returned so far."""
        return self._limit - self._left

    def readinto(self, view):
        if self._done:
            return 0
        n = 0
        if self._left:
            n = self._decode_some(view[:self._left])
            self._left -= n
            if n and self._left:
                return n
        # The range is full or the stream ended: it must end here.
        self._finish()
        self._done = True
        return n

    def _decode_some(self, view):
        """Decode into view; return the count, 0 at the end of input."""
        while True:
            consumed, produced = self._decode(view)
            if produced:
                return produced
            if not consumed and not self._fill():
                return 0

    def _finish(self):
        probe = memoryview(bytearray(1))
        while True:
            consumed, produced = self._decode(probe)
            if produced:
                if self._exact:
                    raise errors.BadRequest(
                        "zstd body decodes to more than the Content-Range "
                        "({} bytes)".format(self._limit))
                raise errors.RangeNotSatisfiable(
                    "zstd body decodes past the end of the image")
            if not consumed and not self._fill():
                break
        if not self._decoder.frame_done:
            raise errors.BadRequest(
                "zstd body is truncated: it ends inside a frame")
        if self._exact and self._left:
            raise errors.BadRequest(
                "zstd body decodes to {} bytes, the Content-Range has {}"
                .format(self._limit - self._left, self._limit))

    def _decode(self, view):
        try:
            consumed, produced = self._decoder.decode(
                self._in[self._start:self._end], view)
        except _zstd.Error as e:
            raise errors.BadRequest("Invalid zstd body: {}".format(e))
        self._start += consumed
        return consumed, produced

    def _fill(self):
        """Read more compressed bytes; False at the end of the body."""
        if self._start:
            left = self._end - self._start
            self._in[:left] = self._in[self._start:self._end]
            self._start, self._end = 0, left
        if self._end == len(self._in):
            raise errors.BadRequest(
                "Invalid zstd body: no progress over {} bytes".format(
                    len(self._in)))
        body = self._body
        if not body.remaining:
            if body.done or body.next_chunk() == 0:
                return False
        n = body.readinto(self._in[self._end:])
        if not n:
            raise errors.BadRequest("Request body ended inside a chunk")
        self._end += n
        return True


class MemorySource(Source):
    """Bytes in memory as a source."""

    def __init__(self, view):
        self._view = view
        self._pos = 0

    def readinto(self, view):
        n = min(len(view), len(self._view) - self._pos)
        view[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n
