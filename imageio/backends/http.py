"""Proxy backend: the image is served by another imageio daemon.

The ticket's url is ``https://host:port/images/ID``.  One keep-alive
connection to the remote daemon per (client connection, ticket), verified
with ``[backend_http] ca_file`` (or ``[tls] ca_file``).  When the remote
daemon runs on this host and offers a local unix socket, requests go
there instead of through TLS.  A range moves as one GET (``reader``) or one
PUT (``writer``) whose body ``imageio.ops`` streams in buffer-sized chunks
through the connection's aligned buffer; nothing holds a whole body in
memory.  The transfer client's workers use the same backend
(``put_with``/``get_with``: the body moves between this connection's
socket and an NBD export in C).  Requests go through ``imageio.httpclient``,
the one HTTP client.
"""

import ipaddress
import json
import logging
import ssl
import urllib.parse

from .. import compression
from .. import errors
from .. import streams
from .. import httpclient
from .. import tls
from .. import urls
from ..extents import DirtyExtent, Extent, check_range as check_extents_range
from .base import Backend

log = logging.getLogger("backends.http")

TIMEOUT = 60


def open(ticket, cfg):
    """The proxy backend for a ticket: only adapts the ticket and the
    daemon's configuration to ``HTTPBackend``'s plain parameters."""
    return HTTPBackend(ticket.url, cafile=cfg.backend_http.ca_file or
                       cfg.tls.ca_file, size=ticket.size,
                       ca_hint="check [backend_http] ca_file")


class _DataPath:
    """The transfer client's data path of an HTTPBackend: the body moves
    between this connection's socket and another backend (an NBD export)
    in C, plain or zstd-coded (``coding``)."""

    def put_with(self, offset, length, send_body, flush=False):
        """PUT ``length`` bytes at ``offset``: ``send_body(sink)`` sends
        exactly the body to a ``streams.Sink``.  Raises errors.HTTPError
        subclasses for error answers (with the daemon's message);
        transport failures raise errors.RemoteFailed (a retriable
        BadGateway)."""
        if self.coding:
            framing = ("Transfer-Encoding",
                       "{}, chunked".format(self.coding))
        else:
            framing = ("Content-Length", str(length))
        headers = [framing, ("Content-Range", "bytes {}-{}/*".format(
            offset, offset + length - 1))]
        con = self._con
        with con.guard("write"):
            con.send_head("PUT", "{}?flush={}".format(
                self._path, "y" if flush else "n"), headers)
            sock = con.sock
            if self.coding:
                # Compressed as read, sent in chunks (docs/api.md).
                writer = streams.ChunkedWriter(sock)
                sink = streams.EncodingSink(
                    compression.Encoder(writer.write, length), self._timeout)
                send_body(sink)
                sink.close()
                writer.close()
            else:
                send_body(streams.Sink(sock, self._timeout))
            con.complete(con.read_head(), self._size)

    def get_with(self, offset, length, recv_body):
        """GET ``length`` bytes at ``offset``: ``recv_body(source)`` reads
        exactly the body from a source like ``streams.Body``.  Raises
        like ``put_with``."""
        headers = [("Range", "bytes={}-{}".format(offset,
                                                  offset + length - 1))]
        if self.coding:
            headers += [("TE", self.coding), ("Connection", "TE")]
        con = self._con
        with con.guard("read"):
            con.send_head("GET", self._path, headers)
            head = con.read_head()
            if head.status >= 300:
                con.finish(head, self._size)
            coding = head.headers.get("transfer-encoding", "").lower()
            if coding == "zstd, chunked" and self.coding:
                self._get_zstd(head, offset, length, recv_body)
            else:
                announced = con.content_length(head)
                if announced != length:
                    raise errors.BadGateway(
                        "Remote imageio daemon sent {} bytes for a {} bytes "
                        "range".format(announced, length))
                source = con.body(length)
                recv_body(source)
                if source.remaining:
                    raise errors.PartialContent(length,
                                                length - source.remaining)
            con.finish(head, self._size)

    def _get_zstd(self, head, offset, length, recv_body):
        """A ``zstd, chunked`` response body: decoded into the callback's
        buffers, at most ``length`` bytes, validated to the stream's end."""
        expected = "bytes {}-{}/".format(offset, offset + length - 1)
        if not head.headers.get("content-range", "").startswith(expected):
            raise errors.BadGateway(
                "Remote imageio daemon sent range {!r} for {!r}".format(
                    head.headers.get("content-range"), expected))
        if self._zstd_input is None:
            self._zstd_input = bytearray(compression.INPUT_SIZE)
        source = streams.DecodingSource(self._con.chunked_body(), length,
                                        True, self._zstd_input,
                                        compression.decoder())
        try:
            recv_body(source)
            if source.received != length:
                raise errors.PartialContent(length, source.received)
            # Reads the rest of the stream: its end is checked, and the
            # connection is ready for the next response.
            source.readinto(memoryview(bytearray(1)))
        except (errors.BadRequest, errors.RangeNotSatisfiable) as e:
            raise errors.RemoteFailed(
                "Remote imageio daemon {} sent a bad zstd stream: {}".format(
                    self._con.where, e.message))

    def write(self, data, offset):
        """Write bytes-like ``data`` at ``offset`` (not flushed)."""
        self.put_with(offset, len(data), lambda sink: sink.write(data))


class HTTPBackend(_DataPath, Backend):
    """An HTTP client toward an imageio daemon's ``/images/ID``.

    Built from plain parameters: the transfer ``url``, the CA file
    (``cafile``, system CAs when empty) or ``secure=False`` to skip
    verification, the image ``size`` (asked from the daemon when None) and
    whether to use the daemon's ``unix_socket`` when it runs on this host.
    ``clone()`` opens another connection to the same image.
    """

    name = "http"

    # Overlapping requests to the remote with the client side pays: both
    # wait for a peer.
    overlap = True

    def __init__(self, url, cafile=None, secure=True, size=None,
                 use_unix_socket=True, timeout=TIMEOUT,
                 ca_hint="check the CA file", options=None,
                 ssl_context=None):
        urls.validate_https_url(url)
        self._url_text = url
        self._url = urllib.parse.urlsplit(url)
        self._path = self._url.path
        self._cafile = cafile
        self._secure = secure
        self._use_unix_socket = use_unix_socket
        self._timeout = timeout
        self._ca_hint = ca_hint
        # (algorithms, windows) of /checksum/algorithms, asked once.
        self._checksum_info = None
        if ssl_context is not None:
            # A clone's: loading the CA file again costs milliseconds.
            self._context = ssl_context
        elif secure:
            self._context = tls.client_context(cafile)
        else:
            self._context = ssl._create_unverified_context()
        self._con = httpclient.Connection(
            self._url.hostname, self._url.port or 443, self._context,
            timeout=timeout, ca_hint=ca_hint)
        self.features = frozenset()
        self.max_readers = 1
        self.max_writers = 1
        self.unix_socket = None
        self.options = {}
        # Transfer codings the daemon offers (OPTIONS "encodings"), and the
        # one put_with/get_with use (None: plain bytes); see use_zstd().
        self.encodings = frozenset()
        self.coding = None
        self._zstd_input = None
        self._size = size
        self._options(options)
        if self._size is None:
            self._size = self._remote_size()

    def clone(self):
        """Another connection to the same image, with the same options."""
        other = HTTPBackend(self._url_text, cafile=self._cafile,
                            secure=self._secure, size=self._size,
                            use_unix_socket=self._use_unix_socket,
                            timeout=self._timeout, ca_hint=self._ca_hint,
                            options=self.options, ssl_context=self._context)
        other.coding = self.coding
        other._checksum_info = self._checksum_info
        return other

    def use_zstd(self):
        """Send and receive data zstd-coded from now on, if the daemon
        offers it and the connection is not its unix socket (where
        compressing only costs CPU).  Returns True if enabled."""
        if compression.ZSTD not in self.encodings:
            log.info("Not compressing: the daemon does not offer zstd "
                     "(OPTIONS has no \"encodings\"); sending plain bytes")
            return False
        if self.is_local:
            log.info("Not compressing: using the daemon's unix socket")
            return False
        self.coding = compression.ZSTD
        return True

    @property
    def is_local(self):
        """True when requests go through the daemon's unix socket."""
        return self._con.is_local

    # Connection handling

    def _options(self, info=None):
        if info is None:
            info = self._con.request_json("OPTIONS", self._path)
            if not isinstance(info, dict):
                raise errors.BadGateway(
                    "Remote imageio daemon {} answered invalid OPTIONS"
                    .format(self._con.where))
        self.options = info
        self.features = frozenset(
            f for f in info.get("features", ()) if f in
            ("extents", "zero", "flush", "checksum"))
        self.max_readers = int(info.get("max_readers", 1))
        self.max_writers = int(info.get("max_writers", 1))
        encodings = info.get("encodings", ())
        self.encodings = frozenset(
            e for e in encodings if isinstance(e, str)) \
            if isinstance(encodings, list) else frozenset()
        if self._size is None and isinstance(info.get("size"), int):
            self._size = info["size"]
        unix = info.get("unix_socket")
        self.unix_socket = unix
        if unix and self._use_unix_socket and self._is_local():
            con = httpclient.Connection(None, None, unix_socket=unix,
                                        timeout=self._timeout)
            try:
                con.connect()
            except errors.Error as e:
                log.debug("Cannot use remote unix socket %r: %s", unix, e)
                return
            self._con.close()
            self._con = con
            log.info("Using the remote daemon's local socket %r", unix)

    def _remote_size(self):
        # The established daemon's OPTIONS has no size: a one byte range
        # answers it in Content-Range ("bytes 0-0/SIZE").
        head, _ = self._con.request("GET", self._path,
                                    headers={"Range": "bytes=0-0"})
        total = head.headers.get("content-range", "").rpartition("/")[2]
        try:
            return int(total)
        except ValueError:
            raise errors.BadGateway(
                "Remote imageio daemon {} did not report the image size"
                .format(self._con.where))

    def _is_local(self):
        host = self._url.hostname
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def _exchange(self, during, method, target, headers=()):
        """The response head of a request; error statuses raise."""
        head = self._con.exchange(method, target, headers, during=during)
        if head.status >= 300:
            self._con.finish(head, self._size)
        return head

    # The backend interface

    def size(self):
        return self._size

    def reader(self, offset, length):
        """The range as one GET, read in order (a ``Source``); closing it
        before the end closes the connection."""
        return _Reader(self._con, self._get_range(offset, length), length)

    def readinto(self, buf, offset, length):
        view = memoryview(buf)[:length]
        with self.reader(offset, length) as source:
            got = 0
            while got < length:
                got += source.readinto(view[got:])
        return view

    def _get_range(self, offset, length):
        head = self._exchange("read", "GET", self._path, {
            "Range": "bytes={}-{}".format(offset, offset + length - 1)})
        announced = self._con.content_length(head)
        if announced != length:
            self._con.close()
            raise errors.BadGateway(
                "Remote imageio daemon sent {} bytes for a {} bytes range"
                .format(announced, length))
        return self._con.body(length)

    def writer(self, offset, length):
        """The range as one PUT whose body is written in order (a
        ``Sink``); the response is checked when it closes.  Raises
        BadGateway when the remote cannot be reached."""
        headers = {
            "Content-Range": "bytes {}-{}/*".format(
                offset, offset + length - 1),
            "Content-Length": str(length),
        }
        for attempt in (1, 2):
            fresh = self._con.sock is None
            with self._con.guard("write"):
                try:
                    self._con.send_head("PUT", self._path + "?flush=n",
                                        headers)
                    break
                except ConnectionError:
                    # A kept-alive connection the remote closed meanwhile;
                    # nothing of the body was sent yet.
                    self._con.close()
                    if fresh or attempt == 2:
                        raise
        return _Writer(self._con, self._size)

    def _patch(self, msg):
        self._con.request("PATCH", self._path, body=json.dumps(msg).encode(),
                          headers={"Content-Type": "application/json"},
                          size=self._size)

    def zero(self, offset, length, punch_hole):
        # The remote ticket decides about punching holes (its "sparse").
        self._patch({"op": "zero", "offset": offset, "size": length,
                     "flush": False})

    def flush(self):
        self._patch({"op": "flush"})

    def extents(self, offset=0, length=None, context="zero"):
        end = check_extents_range(offset, length, self.size())
        query = urllib.parse.urlencode(
            {"context": context, "start": offset, "length": end - offset})
        items = self._con.request_json(
            "GET", "{}/extents?{}".format(self._path, query),
            size=self._size)
        try:
            if context == "dirty":
                got = [DirtyExtent(e["start"], e["length"], e["dirty"],
                                   e["zero"]) for e in items]
            else:
                got = [Extent(e["start"], e["length"], e["zero"],
                              e.get("hole", False)) for e in items]
        except (KeyError, TypeError):
            raise errors.BadGateway(
                "Remote imageio daemon answered invalid extents")
        # The established service ignores start and length and answers
        # the whole image: keep the asked range.
        return [e._replace(start=max(e.start, offset),
                           length=min(e.start + e.length, end)
                           - max(e.start, offset))
                for e in got
                if e.start < end and e.start + e.length > offset]

    def checksum(self, algorithm, block_size, offset=None, length=None):
        """Let the remote daemon compute the checksum next to the data:
        the whole image's, or (``offset`` and ``length``, when
        ``checksum_windows()``) the block hash of a window of whole
        blocks."""
        params = {"algorithm": algorithm, "block_size": block_size}
        if offset is not None:
            params.update(offset=offset, length=length)
        query = urllib.parse.urlencode(params)
        return self._con.request_json(
            "GET", "{}/checksum?{}".format(self._path, query))

    def _checksum_answer(self):
        if self._checksum_info is None:
            try:
                answer = self._con.request_json(
                    "GET", "{}/checksum/algorithms".format(self._path))
                self._checksum_info = (
                    list(answer.get("algorithms", [])),
                    answer.get("windows") is True)
            except (errors.HTTPError, AttributeError, TypeError):
                self._checksum_info = ([], False)
        return self._checksum_info

    def checksum_algorithms(self):
        """The algorithms the remote daemon's checksum accepts ([] when it
        does not say)."""
        return list(self._checksum_answer()[0])

    def checksum_windows(self):
        """Whether the remote daemon hashes a window of the image (this
        project's daemon does; the established one hashes whole images
        only)."""
        return self._checksum_answer()[1]

    def close(self):
        self._con.close()


class _Reader(streams.Source):
    """A GET response's body of a range, as a ``Source`` read in Python
    (fd -1: the proxy's bytes pass through its buffer); the connection is
    closed if it is left before the end."""

    timeout = TIMEOUT

    def __init__(self, con, body, length):
        self._con = con
        self._body = body

    def readinto(self, view):
        if not self._body.remaining:
            return 0
        try:
            n = self._body.readinto(view)
        except OSError as e:
            self._con.close()
            raise self._con.failure("read", e)
        if n == 0:
            self._con.close()
            raise errors.BadGateway(
                "Remote imageio daemon {} closed the connection during "
                "read".format(self._con.where))
        return n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._body.remaining:
            # The rest of the body is still coming: the connection cannot
            # serve another request.
            self._con.close()


class _Writer:
    """A PUT's body as a ``Sink`` (Python writes: fd -1); the response is
    read when the body is complete."""

    fd = -1
    timeout = TIMEOUT

    def __init__(self, con, size):
        self._con = con
        self._size = size

    def write(self, data):
        try:
            self._con.sock.sendall(data)
        except OSError as e:
            self._con.close()
            raise self._con.failure("write", e)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            # The body is incomplete: the remote must not take it.
            self._con.close()
            return False
        with self._con.guard("write"):
            self._con.complete(self._con.read_head(), self._size)
        return False
