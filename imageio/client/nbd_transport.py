"""``--transport nbd``: the client's data over the daemon's NBD endpoint
(docs/nbd.md), its control (OPTIONS, extents, the daemon's checksum) over
HTTP as always.

``NbdPath`` wraps a connected ``backends.http.HTTPBackend``: the data path
the workers use (``put_with``, ``get_with``, ``zero``, ``flush``) goes to
an NBD connection to the ticket's export; everything else is the HTTP
backend's.  The endpoint comes from OPTIONS (``"nbd"``): the unix socket
when the daemon runs on this host, else TCP with TLS, verified with the
same CA as HTTPS.
"""

import os
import shutil
import tempfile
import urllib.parse

from .. import errors
from ..backends import nbd as nbd_backend


class NbdPath:

    def __init__(self, http, cafile=None, secure=True, buffer_size=None,
                 _url=None, _cadir=None):
        self._http = http
        self._owns_cadir = False
        if _url is None:
            _url, _cadir = self._endpoint(http, cafile, secure)
            self._owns_cadir = _cadir is not None
        self._url = _url
        self._cadir = _cadir
        self._buffer_size = buffer_size or 8 * 1024**2
        try:
            self._nbd = nbd_backend.connect(_url,
                                            buffer_size=self._buffer_size)
        except BaseException:
            self._remove_cadir()
            raise

    def _endpoint(self, http, cafile, secure):
        info = http.options.get("nbd")
        if not isinstance(info, dict):
            raise errors.Error(
                "The daemon does not serve NBD (OPTIONS has no \"nbd\"): "
                "use --transport http")
        ticket = urllib.parse.urlsplit(http._url_text).path.rsplit("/", 1)[1]
        # The same host (the HTTP side took the daemon's unix socket):
        # the NBD unix socket too.
        if info.get("socket") and http.is_local:
            return "nbd+unix:///{}?socket={}".format(
                ticket, urllib.parse.quote(info["socket"])), None
        host = http._url.hostname
        if ":" in host:
            host = "[{}]".format(host)
        if not info.get("tls"):
            return "nbd://{}:{}/{}".format(host, info["port"], ticket), None
        if not secure:
            raise errors.Error(
                "--insecure cannot be used with --transport nbd: NBD over "
                "TLS needs the CA (--cafile)")
        cadir = tempfile.mkdtemp(prefix="imageio-nbd-ca-")
        try:
            if cafile:
                shutil.copy(cafile, os.path.join(cadir, "ca-cert.pem"))
            else:
                import ssl
                shutil.copy(ssl.get_default_verify_paths().cafile or
                            "/etc/ssl/certs/ca-certificates.crt",
                            os.path.join(cadir, "ca-cert.pem"))
        except BaseException:
            shutil.rmtree(cadir, ignore_errors=True)
            raise
        return "nbds://{}:{}/{}?tls-certificates={}".format(
            host, info["port"], ticket, urllib.parse.quote(cadir)), cadir

    def __getattr__(self, name):
        return getattr(self._http, name)

    @property
    def transport(self):
        return "nbd"

    def clone(self):
        return NbdPath(self._http.clone(), buffer_size=self._buffer_size,
                       _url=self._url, _cadir=self._cadir)

    # The data path.

    def put_with(self, offset, length, send_body, flush=False):
        sink = _Sink(self._nbd, offset)
        send_body(sink)
        if sink.pos != offset + length:
            raise errors.PartialContent(length, sink.pos - offset)
        if flush:
            self._nbd.flush()

    def get_with(self, offset, length, recv_body):
        source = _Source(self._nbd, offset, length)
        recv_body(source)
        if source.remaining:
            raise errors.PartialContent(length, length - source.remaining)

    def zero(self, offset, length, punch_hole):
        self._nbd.zero(offset, length, punch_hole)

    def flush(self):
        self._nbd.flush()

    def close(self):
        try:
            self._nbd.close()
            self._http.close()
        finally:
            self._remove_cadir()

    def _remove_cadir(self):
        if self._owns_cadir and self._cadir:
            shutil.rmtree(self._cadir, ignore_errors=True)
            self._cadir = None


class _Sink:
    """Bytes written in order at ``pos`` of the NBD export (a Sink)."""

    fd = -1
    timeout = None

    def __init__(self, nbd, offset):
        self._nbd = nbd
        self.pos = offset

    def write(self, data):
        n = len(data)
        if n:
            self._nbd.write(data, self.pos)
            self.pos += n


class _Source:
    """``length`` bytes at ``offset`` of the NBD export, read in order
    straight into the caller's buffer (a Source)."""

    fd = -1
    timeout = None

    def __init__(self, nbd, offset, length):
        self._nbd = nbd
        self._pos = offset
        self.remaining = length

    def readinto(self, view):
        n = min(len(view), self.remaining)
        if n:
            self._nbd.readinto(view, self._pos, n)
            self._pos += n
            self.remaining -= n
        return n

    def consumed(self, n):  # pragma: no cover - fd is never >= 0
        self.remaining -= n
