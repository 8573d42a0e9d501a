"""Proxy backend: the image is served by another imageio daemon.

The ticket's url is ``https://host:port/images/ID``.  One keep-alive
connection to the remote daemon per (client connection, ticket), verified
with ``[backend_http] ca_file`` (or ``[tls] ca_file``).  When the remote
daemon runs on this host and offers a local unix socket, requests go
there instead of through TLS.  A range moves as one GET (``reader``) or one
PUT (``writer``) whose body ``imageio.ops`` streams in buffer-sized chunks
through the connection's aligned buffer; nothing holds a whole body in
memory.
"""

import http.client
import ipaddress
import json
import logging
import socket
import ssl
import urllib.parse

from .. import compression
from .. import errors
from .. import http as http_layer
from .. import tls
from .. import transport
from . import DirtyExtent, Extent, Sink, check_extents_range
from .base import Backend

log = logging.getLogger("backends.http")

TIMEOUT = 60

_STATUS_ERRORS = {
    400: errors.BadRequest,
    403: errors.Forbidden,
    404: errors.NotFound,
    405: errors.MethodNotAllowed,
    409: errors.Conflict,
    413: errors.PayloadTooLarge,
    416: errors.RangeNotSatisfiable,
    507: errors.InsufficientStorage,
}


def validate_url(url):
    u = urllib.parse.urlsplit(url)
    if u.scheme != "https" or not u.hostname or \
            not u.path.startswith("/images/") or \
            len(u.path) <= len("/images/"):
        raise errors.BadRequest(
            "Invalid proxy url {!r}: expected https://host:port/images/ID"
            .format(url))


def open(ticket, cfg):
    """The proxy backend for a ticket: only adapts the ticket and the
    daemon's configuration to ``HTTPBackend``'s plain parameters."""
    return HTTPBackend(ticket.url, cafile=cfg.backend_http.ca_file or
                       cfg.tls.ca_file, size=ticket.size,
                       ca_hint="check [backend_http] ca_file")


class _UnixHTTPConnection(http.client.HTTPConnection):

    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


class HTTPBackend(Backend):
    """An HTTP client toward an imageio daemon's ``/images/ID``.

    Built from plain parameters: the transfer ``url``, the CA file
    (``cafile``, system CAs when empty) or ``secure=False`` to skip
    verification, the image ``size`` (asked from the daemon when None) and
    whether to use the daemon's ``unix_socket`` when it runs on this host.
    ``clone()`` opens another connection to the same image.
    """

    name = "http"


    def __init__(self, url, cafile=None, secure=True, size=None,
                 use_unix_socket=True, timeout=TIMEOUT,
                 ca_hint="check the CA file", options=None,
                 ssl_context=None):
        validate_url(url)
        self._url_text = url
        self._url = urllib.parse.urlsplit(url)
        self._path = self._url.path
        self._cafile = cafile
        self._secure = secure
        self._use_unix_socket = use_unix_socket
        self._timeout = timeout
        self._ca_hint = ca_hint
        if ssl_context is not None:
            # A clone's: loading the CA file again costs milliseconds.
            self._context = ssl_context
        elif secure:
            self._context = tls.client_context(cafile)
        else:
            self._context = ssl._create_unverified_context()
        self._con = http.client.HTTPSConnection(
            self._url.hostname, self._url.port or 443,
            context=self._context, timeout=timeout)
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
        return isinstance(self._con, _UnixHTTPConnection)

    # Connection handling

    def _options(self, info=None):
        if info is None:
            resp = self._request("OPTIONS", self._path)
            info = self._json(resp)
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
            try:
                con = _UnixHTTPConnection(unix, self._timeout)
                con.connect()
            except OSError as e:
                log.debug("Cannot use remote unix socket %r: %s", unix, e)
                return
            self._con.close()
            self._con = con
            log.info("Using the remote daemon's local socket %r", unix)

    def _remote_size(self):
        # The established daemon's OPTIONS has no size: a one byte range
        # answers it in Content-Range ("bytes 0-0/SIZE").
        resp = self._request("GET", self._path, headers={"Range": "bytes=0-0"})
        resp.read()
        total = (resp.getheader("Content-Range") or "").rpartition("/")[2]
        try:
            return int(total)
        except ValueError:
            raise errors.BadGateway(
                "Remote imageio daemon {} did not report the image size"
                .format(self._where()))

    def _is_local(self):
        host = self._url.hostname
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def _request(self, method, path, body=None, headers=None):
        """Send a request (``body`` bytes or None) and return the response
        with an OK status; the caller reads its body.

        A kept-alive connection the remote closed meanwhile is reopened
        once: these requests are idempotent.
        """
        try:
            try:
                resp = self._roundtrip(method, path, body, headers)
            except (ConnectionError, http.client.RemoteDisconnected):
                self._con.close()
                resp = self._roundtrip(method, path, body, headers)
        except ssl.SSLCertVerificationError as e:
            self._con.close()
            raise errors.BadGateway(
                "Cannot verify the remote imageio daemon {}: {}; {}".format(
                    self._where(), e.verify_message or e, self._ca_hint))
        except (OSError, http.client.HTTPException) as e:
            self._con.close()
            err = errors.BadGateway(
                "Cannot reach the remote imageio daemon {}: {}".format(
                    self._where(), e or type(e).__name__))
            err.retriable = True
            raise err
        self._check(resp)
        return resp

    def _roundtrip(self, method, path, body, headers):
        self._con.request(method, path, body=body, headers=headers or {})
        return self._con.getresponse()

    def _where(self):
        return "{}:{}".format(self._url.hostname, self._url.port or 443)

    def _check(self, resp):
        if resp.status < 300:
            return
        message = resp.read(4096).decode("utf-8", "replace").strip()
        self._con.close()
        cls = _STATUS_ERRORS.get(resp.status)
        text = "Remote imageio daemon: {}".format(message or resp.reason)
        if cls is errors.RangeNotSatisfiable:
            raise cls(text, size=self._size)
        if cls is not None:
            raise cls(text)
        err = errors.BadGateway("{} (HTTP {})".format(text, resp.status))
        err.retriable = resp.status >= 500
        raise err

    def _json(self, resp):
        try:
            data = resp.read()
            return json.loads(data)
        except (OSError, http.client.HTTPException) as e:
            self._con.close()
            raise errors.BadGateway(
                "Remote imageio daemon {} failed: {}".format(self._where(), e))
        except ValueError:
            self._con.close()
            raise errors.BadGateway(
                "Remote imageio daemon {} answered invalid JSON".format(
                    self._where()))

    # The backend interface

    def size(self):
        return self._size

    # Overlapping requests to the remote with the client side pays: both
    # wait for a peer.
    overlap = True

    def reader(self, offset, length):
        """The range as one GET, read in order (a ``Source``); closing it
        before the end closes the connection."""
        return _Reader(self, self._get_range(offset, length), length)

    def readinto(self, buf, offset, length):
        resp = self._get_range(offset, length)
        view = memoryview(buf)[:length]
        got = 0
        while got < length:
            got += self._readinto(resp, view[got:])
        return view

    def _get_range(self, offset, length):
        resp = self._request("GET", self._path, headers={
            "Range": "bytes={}-{}".format(offset, offset + length - 1)})
        if resp.length is not None and resp.length != length:
            self._con.close()
            raise errors.BadGateway(
                "Remote imageio daemon sent {} bytes for a {} bytes range"
                .format(resp.length, length))
        return resp

    def _readinto(self, resp, view):
        try:
            n = resp.readinto(view)
        except (OSError, http.client.HTTPException) as e:
            self._con.close()
            raise errors.BadGateway(
                "Remote imageio daemon {} failed during read: {}".format(
                    self._where(), e))
        if n == 0:
            self._con.close()
            raise errors.BadGateway(
                "Remote imageio daemon {} closed the connection during "
                "read".format(self._where()))
        return n

    def writer(self, offset, length):
        """The range as one PUT whose body is written in order (a
        ``Sink``); the response is checked when it closes.  Raises
        BadGateway when the remote cannot be reached."""
        headers = {
            "Content-Range": "bytes {}-{}/*".format(
                offset, offset + length - 1),
            "Content-Length": str(length),
        }
        try:
            try:
                self._put_headers(headers)
            except ConnectionError:
                # A kept-alive connection the remote closed meanwhile;
                # nothing of the body was sent yet.
                self._con.close()
                self._put_headers(headers)
        except (OSError, http.client.HTTPException) as e:
            self._con.close()
            raise errors.BadGateway(
                "Cannot reach the remote imageio daemon {}: {}".format(
                    self._where(), e))
        return _Writer(self)

    def _finish_put(self):
        try:
            resp = self._con.getresponse()
        except (OSError, http.client.HTTPException) as e:
            self._con.close()
            raise errors.BadGateway(
                "Remote imageio daemon {} failed during write: {}".format(
                    self._where(), e))
        self._check(resp)
        resp.read()

    def _send_body(self, view):
        try:
            self._con.send(view)
        except OSError as e:
            self._con.close()
            raise errors.BadGateway(
                "Remote imageio daemon {} failed during write: {}".format(
                    self._where(), e))

    def _put_headers(self, headers):
        self._con.putrequest("PUT", self._path + "?flush=n")
        for name, value in headers.items():
            self._con.putheader(name, value)
        self._con.endheaders()

    def _patch(self, msg):
        body = json.dumps(msg).encode()
        resp = self._request("PATCH", self._path, body=body, headers={
            "Content-Type": "application/json"})
        resp.read()

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
        resp = self._request("GET", "{}/extents?{}".format(self._path, query))
        items = self._json(resp)
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

    def checksum(self, algorithm, block_size):
        """Let the remote daemon compute the checksum next to the data."""
        query = urllib.parse.urlencode(
            {"algorithm": algorithm, "block_size": block_size})
        resp = self._request("GET", "{}/checksum?{}".format(
            self._path, query))
        return self._json(resp)

    def checksum_algorithms(self):
        """The algorithms the remote daemon's checksum accepts ([] when it
        does not say)."""
        try:
            resp = self._request("GET", "{}/checksum/algorithms".format(
                self._path))
            return list(self._json(resp).get("algorithms", []))
        except (errors.HTTPError, AttributeError, TypeError):
            return []

    # The client's data path.  The body moves between this connection's
    # socket and another backend (an NBD export) in C: this class writes
    # the request head and reads the response head, never more of the
    # body than the head's last recv() brought.

    def put_with(self, offset, length, send_body, flush=False):
        """PUT ``length`` bytes at ``offset``: ``send_body(sink)`` sends
        exactly the body to a ``backends.Sink``.  Raises errors.HTTPError
        subclasses for error answers; transport failures raise
        errors.BadGateway with ``retriable = True``."""
        if self.coding:
            framing = "Transfer-Encoding: {}, chunked".format(self.coding)
        else:
            framing = "Content-Length: {}".format(length)
        head = ("PUT {}?flush={} HTTP/1.1\r\nHost: {}\r\n"
                "{}\r\nContent-Range: bytes {}-{}/*\r\n\r\n"
                .format(self._path, "y" if flush else "n", self._host(),
                        framing, offset, offset + length - 1))
        sock = self._data_socket()
        try:
            sock.sendall(head.encode("latin-1"))
            if self.coding:
                # Compressed as read, sent in chunks (docs/api.md).
                writer = http_layer.ChunkedWriter(sock)
                sink = compression.EncodingSink(writer.write, length,
                                                self._timeout)
                send_body(sink)
                sink.close()
                writer.close()
            else:
                send_body(Sink(sock, self._timeout))
            status, headers, rest = self._read_head(sock)
            self._read_small_body(sock, headers, rest)
        except errors.Error:
            self._con.close()
            raise
        except OSError as e:
            self._con.close()
            raise self._transport_failure("write", e)
        self._answered(status, headers)

    def get_with(self, offset, length, recv_body):
        """GET ``length`` bytes at ``offset``: ``recv_body(source)`` reads
        exactly the body from a source like ``http.Body``.  Raises
        like ``put_with``."""
        ask = "TE: {}\r\nConnection: TE\r\n".format(self.coding) \
            if self.coding else ""
        head = ("GET {} HTTP/1.1\r\nHost: {}\r\nRange: bytes={}-{}\r\n{}"
                "\r\n".format(self._path, self._host(), offset,
                              offset + length - 1, ask))
        sock = self._data_socket()
        try:
            sock.sendall(head.encode("latin-1"))
            status, headers, rest = self._read_head(sock)
            if status >= 300:
                message = self._read_small_body(sock, headers, rest)
                self._answered(status, headers, message)
            coding = headers.get("transfer-encoding", "").lower()
            if coding == "zstd, chunked" and self.coding:
                self._get_zstd(sock, rest, offset, length, headers,
                               recv_body)
                self._answered(status, headers)
                return
            announced = int(headers.get("content-length", -1))
            if announced != length:
                raise errors.BadGateway(
                    "Remote imageio daemon sent {} bytes for a {} bytes "
                    "range".format(announced, length))
            source = _BodySource(sock, rest, self._timeout)
            recv_body(source)
            if source.received != length:
                raise errors.PartialContent(length, source.received)
        except errors.Error:
            self._con.close()
            raise
        except OSError as e:
            self._con.close()
            raise self._transport_failure("read", e)
        self._answered(status, headers)

    def _get_zstd(self, sock, rest, offset, length, headers, recv_body):
        """A ``zstd, chunked`` response body: decoded into the callback's
        buffers, at most ``length`` bytes, validated to the stream's end."""
        expected = "bytes {}-{}/".format(offset, offset + length - 1)
        if not headers.get("content-range", "").startswith(expected):
            raise errors.BadGateway(
                "Remote imageio daemon sent range {!r} for {!r}".format(
                    headers.get("content-range"), expected))
        if self._zstd_input is None:
            self._zstd_input = bytearray(compression.INPUT_SIZE)
        body = http_layer.ChunkedBody(
            _LineReader(_BodySource(sock, rest, self._timeout)),
            self._timeout)
        source = compression.DecodingSource(body, length, True,
                                            self._zstd_input)
        try:
            recv_body(source)
            if source.received != length:
                raise errors.PartialContent(length, source.received)
            # Reads the rest of the stream: its end is checked, and the
            # connection is ready for the next response.
            source.readinto(memoryview(bytearray(1)))
        except (errors.BadRequest, errors.RangeNotSatisfiable) as e:
            err = errors.BadGateway(
                "Remote imageio daemon {} sent a bad zstd stream: {}".format(
                    self._where(), e.message))
            err.retriable = True
            raise err

    def write(self, data, offset):
        """Write bytes-like ``data`` at ``offset`` (not flushed)."""
        self.put_with(offset, len(data), lambda sink: sink.write(data))

    def _host(self):
        return self._url.netloc

    def _data_socket(self):
        if self._con.sock is None:
            try:
                self._con.connect()
            except ssl.SSLCertVerificationError as e:
                self._con.close()
                raise errors.BadGateway(
                    "Cannot verify the remote imageio daemon {}: {}; {}"
                    .format(self._where(), e.verify_message or e,
                            self._ca_hint))
            except OSError as e:
                self._con.close()
                raise self._transport_failure("connect", e)
        return self._con.sock

    def _transport_failure(self, during, e):
        err = errors.BadGateway(
            "Remote imageio daemon {} failed during {}: {}".format(
                self._where(), during, e or type(e).__name__))
        err.retriable = True
        return err

    def _read_head(self, sock):
        buf = bytearray()
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionResetError(
                    "connection closed before the response")
            buf += chunk
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(buf) > 65536:
                raise errors.BadGateway(
                    "Remote imageio daemon {} sent a response head over 64 "
                    "KiB".format(self._where()))
        lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split(None, 2)[1])
        except (IndexError, ValueError):
            raise errors.BadGateway(
                "Remote imageio daemon {} sent an invalid status line {!r}"
                .format(self._where(), lines[0][:80]))
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers, buf[end + 4:]

    def _read_small_body(self, sock, headers, rest):
        length = int(headers.get("content-length", 0))
        body = bytearray(rest[:length])
        while len(body) < length:
            chunk = sock.recv(length - len(body))
            if not chunk:
                raise ConnectionResetError("connection closed in the body")
            body += chunk
        return body.decode("utf-8", "replace").strip()

    def _answered(self, status, headers, message=""):
        if headers.get("connection", "").lower() == "close":
            self._con.close()
        if status < 300:
            return
        self._con.close()
        cls = _STATUS_ERRORS.get(status)
        text = "Remote imageio daemon: {}".format(message or status)
        if cls is errors.RangeNotSatisfiable:
            raise cls(text, size=self._size)
        if cls is not None:
            raise cls(text)
        err = errors.BadGateway("{} (HTTP {})".format(text, status))
        err.retriable = status >= 500
        raise err

    def close(self):
        self._con.close()


class _BodySource:
    """A response body for ``get_with``'s callback: the bytes the head's
    last recv() brought first, then the socket (its raw ``fd`` for C loops
    when the socket is plain)."""

    def __init__(self, sock, rest, timeout):
        self._sock = sock
        self._rest = memoryview(bytes(rest))
        self._plain = not transport.wrap(sock).is_tls
        self.timeout = timeout
        self.received = 0

    @property
    def fd(self):
        if self._plain and not self._rest:
            return self._sock.fileno()
        return -1

    def readinto(self, view):
        if self._rest:
            n = min(len(view), len(self._rest))
            view[:n] = self._rest[:n]
            self._rest = self._rest[n:]
        else:
            n = self._sock.recv_into(view)
        self.received += n
        return n

    def consumed(self, n):
        self.received += n


class _LineReader:
    """``readline`` and ``readinto`` over a _BodySource, the reader
    http.ChunkedBody parses a chunked response with."""

    def __init__(self, source):
        self._source = source
        self._buf = bytearray()

    def readline(self, limit=64 * 1024):
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                line = bytes(self._buf[:i + 1])
                del self._buf[:i + 1]
                return line
            if len(self._buf) > limit:
                raise errors.BadGateway("Chunk header line too long")
            chunk = bytearray(8192)
            n = self._source.readinto(memoryview(chunk))
            if not n:
                line = bytes(self._buf)
                self._buf.clear()
                return line
            self._buf += chunk[:n]

    def readinto(self, view):
        if self._buf:
            n = min(len(view), len(self._buf))
            view[:n] = self._buf[:n]
            del self._buf[:n]
            return n
        return self._source.readinto(view)


class _Reader:
    """A GET response of a range, as a ``Source`` (Python reads: fd -1)."""

    fd = -1
    timeout = TIMEOUT

    def __init__(self, backend, resp, length):
        self._backend = backend
        self._resp = resp
        self._left = length

    def readinto(self, view):
        if not self._left:
            return 0
        n = self._backend._readinto(self._resp, view[:self._left])
        self._left -= n
        return n

    def consumed(self, n):  # pragma: no cover - fd is never >= 0
        self._left -= n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._left:
            # The rest of the body is still coming: the connection cannot
            # serve another request.
            self._backend._con.close()


class _Writer:
    """A PUT's body as a ``Sink`` (Python writes: fd -1); the response is
    read when the body is complete."""

    fd = -1
    timeout = TIMEOUT

    def __init__(self, backend):
        self._backend = backend

    def write(self, data):
        self._backend._send_body(data)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self._backend._finish_put()
        else:
            self._backend._con.close()
