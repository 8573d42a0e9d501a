"""Ticket URLs: which backend serves a URL, and the parsing and validation
of file, NBD and HTTPS URLs (SPEC section 4).  A leaf: the ticket store
validates URLs here without importing a backend (or libnbd).
"""

import os
import pwd
import re
import urllib.parse

from . import errors
from . import redact


def scheme_of(url):
    """Return the backend module name serving ``url``, or None."""
    if url.startswith("file:"):
        return "file"
    if url.startswith(("nbd:", "nbd+unix:", "nbds:", "nbds+unix:")):
        return "nbd"
    if url.startswith("https:"):
        return "http"
    return None


def validate(url):
    """Raise errors.BadRequest if ``url`` cannot be served."""
    kind = scheme_of(url)
    if kind is None:
        raise errors.BadRequest(
            "Invalid ticket: unsupported url {!r}: expected file:, nbd:, "
            "nbd+unix:, nbds:, nbds+unix: or https:".format(url))
    {"file": parse_file_url, "nbd": parse_nbd_url,
     "http": validate_https_url}[kind](url)


def parse_file_url(url):
    """Return the path of a file: url."""
    u = urllib.parse.urlsplit(url)
    if u.scheme != "file" or not u.path.startswith("/"):
        raise errors.BadRequest(
            "Invalid file url {!r}: expected file:///absolute/path".format(url))
    return urllib.parse.unquote(u.path)


def validate_https_url(url):
    """Raise errors.BadRequest unless ``url`` is an imageio transfer URL
    (the proxy backend's)."""
    u = urllib.parse.urlsplit(url)
    if u.scheme != "https" or not u.hostname or \
            not u.path.startswith("/images/") or \
            len(u.path) <= len("/images/"):
        raise errors.BadRequest(
            "Invalid proxy url {!r}: expected https://host:port/images/ID"
            .format(url))


# NBD: qemu's legacy forms and the NBD URI standard.

# nbd:unix:/path[:exportname=NAME]
_LEGACY_UNIX = re.compile(r"nbd:unix:(?P<path>/[^:]*)(?::exportname=(?P<name>.*))?")

# nbd:HOST:PORT[:exportname=NAME]; HOST may be an IPv6 address, bracketed or
# not (the non-greedy match finds the first ":PORT" that completes the URL).
_LEGACY_TCP = re.compile(
    r"nbd:(?P<host>[^/].*?):(?P<port>\d+)(?::exportname=(?P<name>.*))?")

_URI_SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix")

class Address:
    """Where an export is: ``kind`` is "uri", "unix" or "tcp"."""

    def __init__(self, kind, url, path=None, host=None, port=None,
                 export="", tls_username=None):
        self.kind = kind
        self.url = url
        self.path = path
        self.host = host
        self.port = port
        self.export = export
        self.tls_username = tls_username

    def connect(self, handle, dirty):
        if self.kind == "unix":
            handle.connect_unix(self.path, self.export, dirty=dirty)
        elif self.kind == "tcp":
            handle.connect_tcp(self.host, self.port, self.export, dirty=dirty)
        else:
            handle.connect(self.url, dirty=dirty,
                           tls_username=self.tls_username)


def parse_nbd_url(url):
    """Return the ``Address`` of an nbd URL; raise errors.BadRequest."""
    if url.startswith("nbd:") and not url.startswith("nbd://"):
        m = _LEGACY_UNIX.fullmatch(url)
        if m:
            return Address("unix", url, path=m.group("path"),
                           export=m.group("name") or "")
        if url.startswith("nbd:unix:"):
            raise errors.BadRequest(
                "Invalid NBD url {!r}: expected nbd:unix:/socket"
                "[:exportname=NAME]".format(redact.url(url)))
        m = _LEGACY_TCP.fullmatch(url)
        if m:
            host = m.group("host")
            if host.startswith("[") and host.endswith("]"):
                host = host[1:-1]
            return Address("tcp", url, host=host, port=int(m.group("port")),
                           export=m.group("name") or "")
        raise errors.BadRequest(
            "Invalid NBD url {!r}: expected nbd:unix:/socket[:exportname=NAME], "
            "nbd:HOST:PORT[:exportname=NAME] or an NBD URI "
            "(nbd://, nbds://, nbd+unix://, nbds+unix://)".format(redact.url(url)))

    try:
        u = urllib.parse.urlsplit(url)
        u.port  # Raises ValueError for a bad port.
    except ValueError as e:
        raise errors.BadRequest(
            "Invalid NBD url {!r}: {}".format(redact.url(url), e))
    if u.scheme not in _URI_SCHEMES:
        raise errors.BadRequest(
            "Invalid NBD url {!r}: unsupported scheme {!r}".format(
                redact.url(url), u.scheme))
    query = urllib.parse.parse_qs(u.query)
    if u.scheme.endswith("+unix"):
        sockets = query.get("socket", [])
        if len(sockets) != 1 or not sockets[0]:
            raise errors.BadRequest(
                "Invalid NBD url {!r}: {}:// needs exactly one socket=PATH "
                "query parameter".format(redact.url(url), u.scheme))
        if u.hostname:
            raise errors.BadRequest(
                "Invalid NBD url {!r}: {}:// takes no host".format(
                    redact.url(url), u.scheme))
    else:
        if not u.hostname:
            raise errors.BadRequest(
                "Invalid NBD url {!r}: missing host".format(redact.url(url)))
        if "socket" in query:
            raise errors.BadRequest(
                "Invalid NBD url {!r}: socket= is only for nbd+unix:// "
                "and nbds+unix://".format(redact.url(url)))
    # The NBD URI standard: the export name is the path without its
    # first "/".
    export = urllib.parse.unquote(u.path[1:] if u.path.startswith("/")
                                  else u.path)
    tls_username = None
    if u.scheme.startswith("nbds") and not u.username:
        # libnbd 1.14 ignores the tls-username parameter and otherwise
        # uses getlogin(), which fails in a daemon.
        names = query.get("tls-username")
        tls_username = names[0] if names else _login_name()
    return Address("uri", url, export=export, tls_username=tls_username)


def _login_name():
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())
