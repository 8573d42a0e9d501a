"""Pure HTTP parsing: request line, headers, Range and Content-Range.

No sockets here, so every function can be tested and fuzzed on its own.
Each raises errors.BadRequest (or RangeNotSatisfiable) with a message a
client can act on.
"""

import functools
import re
import urllib.parse

from . import errors

MAX_LINE = 8192
MAX_HEADERS = 100
# A whole request head: bounds the work of re-parsing a head that arrives
# in many small pieces (parse_head scans it again each time a line ends).
MAX_HEAD = 64 * 1024

# RFC 9110 token characters.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VERSION = re.compile(r"^HTTP/1\.[01]$")
_BYTES_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
# Numbers beyond this are certainly not offsets in an image.
_MAX_NUMBER_DIGITS = 19


def parse_request_line(line):
    """Parse b"GET /path?query HTTP/1.1\\r\\n" into (method, path, query,
    version); ``query`` is a dict of the last value of each name."""
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise errors.BadRequest("Invalid request line: not ASCII")
    text = text.rstrip("\r\n")
    parts = text.split(" ")
    if len(parts) != 3:
        raise errors.BadRequest(
            "Invalid request line {!r}: expected 'METHOD TARGET VERSION'"
            .format(text[:100]))
    method, target, version = parts
    if not _TOKEN.match(method):
        raise errors.BadRequest("Invalid method {!r}".format(method[:50]))
    if not _VERSION.match(version):
        raise errors.BadRequest(
            "Unsupported HTTP version {!r}".format(version[:20]))
    if not (target.startswith("/") or target == "*"):
        raise errors.BadRequest(
            "Invalid request target {!r}".format(target[:100]))
    path, query = _split_target(target)
    return method, path, query, version


def _split_target(target):
    path, _, qs = target.partition("?")
    if "%" in path:
        try:
            path = urllib.parse.unquote(path, errors="strict")
        except UnicodeDecodeError:
            raise errors.BadRequest(
                "Invalid request target: bad percent-encoding")
    query = {}
    if qs:
        for name, value in urllib.parse.parse_qsl(qs, keep_blank_values=True):
            query[name] = value
    return path, query


def parse_header_line(line):
    """Parse b"Name: value\\r\\n" into (lowercase name, value)."""
    try:
        text = line.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes all
        raise errors.BadRequest("Invalid header")
    text = text.rstrip("\r\n")
    name, sep, value = text.partition(":")
    if not sep or not _TOKEN.match(name):
        raise errors.BadRequest("Invalid header line {!r}".format(text[:100]))
    value = value.strip(" \t")
    if any(c in value for c in "\r\n\0"):
        raise errors.BadRequest("Invalid header {!r}".format(name))
    return name.lower(), value


def _number(text, what):
    if len(text) > _MAX_NUMBER_DIGITS:
        raise errors.BadRequest("Invalid {}: number too large".format(what))
    return int(text)


def parse_range(value, size):
    """Parse a Range header for an image of ``size`` bytes.

    Return (offset, length).  Only one ``bytes=first-last`` or
    ``bytes=first-`` range is supported; multiple ranges, suffix ranges and
    ranges starting at or past the end raise RangeNotSatisfiable.  A
    ``last`` past the end means the rest of the image (RFC 9110 14.1.2):
    the client learns what it gets from Content-Range.
    """
    value = value.strip()
    if not value.startswith("bytes="):
        raise errors.RangeNotSatisfiable(
            "Unsupported range unit in {!r}: expected bytes=first-last"
            .format(value[:100]), size=size)
    if "," in value:
        raise errors.RangeNotSatisfiable(
            "Multiple ranges are not supported: {!r}".format(value[:100]),
            size=size)
    m = _BYTES_RANGE.match(value)
    if not m:
        raise errors.RangeNotSatisfiable(
            "Unsupported range {!r}: expected bytes=first-last or "
            "bytes=first-".format(value[:100]), size=size)
    first = _number(m.group(1), "Range")
    if m.group(2):
        last = _number(m.group(2), "Range")
        if last < first:
            raise errors.RangeNotSatisfiable(
                "Invalid range {!r}: last < first".format(value), size=size)
        # nbdkit's curl plugin (1.32) asks one byte past each block, the
        # last block too: refusing that range would fail its reads.
        last = min(last, size - 1)
    else:
        last = size - 1
    if first >= size:
        raise errors.RangeNotSatisfiable(
            "Range {!r} is outside the image (size {})".format(value, size),
            size=size)
    return first, last - first + 1


def parse_content_range(value):
    """Parse ``bytes first-last/total`` (total may be ``*``).

    Return (offset, length, total or None).
    """
    m = _CONTENT_RANGE.match(value.strip())
    if not m:
        raise errors.BadRequest(
            "Invalid Content-Range {!r}: expected bytes first-last/size or "
            "bytes first-last/*".format(value[:100]))
    first = _number(m.group(1), "Content-Range")
    last = _number(m.group(2), "Content-Range")
    if last < first:
        raise errors.BadRequest(
            "Invalid Content-Range {!r}: last < first".format(value))
    total = None if m.group(3) == "*" else _number(m.group(3), "Content-Range")
    return first, last - first + 1, total


def parse_content_length(value):
    """Parse a Content-Length value into a non-negative int."""
    value = value.strip()
    if not value.isdigit() or not value.isascii():
        raise errors.BadRequest(
            "Invalid Content-Length {!r}".format(value[:50]))
    return _number(value, "Content-Length")


def parse_bool(value, name):
    """Parse a query flag: y/yes/true/1 or n/no/false/0."""
    v = value.lower()
    if v in ("y", "yes", "true", "1"):
        return True
    if v in ("n", "no", "false", "0"):
        return False
    raise errors.BadRequest(
        "Invalid value for {!r}: {!r}, expected y or n".format(name, value))


def parse_chunk_size(line):
    """Parse a chunked transfer encoding size line (hex, extensions
    ignored)."""
    try:
        text = line.decode("ascii").strip()
    except UnicodeDecodeError:
        raise errors.BadRequest("Invalid chunk size line")
    size = text.split(";", 1)[0].strip()
    if not size or len(size) > 16 or any(
            c not in "0123456789abcdefABCDEF" for c in size):
        raise errors.BadRequest("Invalid chunk size {!r}".format(text[:50]))
    return int(size, 16)


# Characters kept as they are in an RFC 6266 quoted filename fallback.
_ASCII_FILENAME = re.compile(r'[^ !#-\[\]-~]')


@functools.lru_cache(maxsize=256)
def content_disposition(filename):
    """The Content-Disposition value for a download named ``filename``:
    an ASCII ``filename="..."`` fallback for old clients, plus RFC 6266 /
    RFC 8187 ``filename*=UTF-8''...`` when the name is not plain ASCII.
    Header bytes are Latin-1 on the wire: a raw non-Latin-1 name cannot be
    sent, and a raw CR/LF would inject a header."""
    if not filename:
        return "attachment"
    fallback = _ASCII_FILENAME.sub("_", filename)
    value = 'attachment; filename="{}"'.format(fallback)
    if fallback != filename:
        value += "; filename*=UTF-8''" + urllib.parse.quote(
            filename, safe="!#$&+-.^_`|~")
    return value


class Head:
    """A parsed request head: what ``parse_head`` returns."""

    __slots__ = ("method", "path", "query", "version", "headers")

    def __init__(self, method, path, query, version, headers):
        self.method = method
        self.path = path
        self.query = query
        self.version = version
        self.headers = headers


# Headers a request may carry once: a second one is a smuggling attempt or
# a broken client, never something to merge.
_SINGLE = ("content-length", "range", "content-range", "transfer-encoding",
           "host")


def parse_head(buf, start=0):
    """Parse a request head (request line, headers, empty line) at
    ``buf[start:]``.

    Resumable and pure, as h11's readers: call it again with more bytes
    appended until it returns something other than None.  Return None when
    the head is not complete yet, else (Head, end) where ``end`` is the
    offset just after the head in ``buf``.  Empty lines before the request
    line are skipped (RFC 9112 2.2).

    Raises BadRequest for a malformed head, HeadersTooLarge (431) when a
    line is longer than MAX_LINE or there are more than MAX_HEADERS
    headers, before the whole head has arrived whenever that is known.
    """
    pos = start
    if buf[pos:pos + 1] not in (b"\r", b"\n"):
        end = buf.find(b"\r\n\r\n", pos, pos + MAX_HEAD)
        if end >= 0:
            head = _fast_head(buf, pos, end)
            if head is not None:
                return head, end + 4
    return _parse_lines(buf, start)


def _split_head(buf, start, too_large):
    """The lines of the head at ``buf[start:]`` up to its empty line:
    (lines, end), or None while it is not complete.  ``too_large(what,
    first)`` raises for a head over MAX_HEAD ("head"), a line over
    MAX_LINE ("line", ``first`` when it is the first line) or more than
    MAX_HEADERS headers ("headers"), as soon as that is known."""
    pos = start
    lines = []
    while True:
        i = buf.find(b"\n", pos, start + MAX_HEAD + 1)
        if i < 0 and len(buf) - start > MAX_HEAD:
            too_large("head", not lines)
        if i < 0:
            if len(buf) - pos > MAX_LINE:
                too_large("line", not lines)
            return None
        if i + 1 - pos > MAX_LINE:
            too_large("line", not lines)
        line = bytes(buf[pos:i + 1])
        pos = i + 1
        if lines and line in (b"\r\n", b"\n"):
            return lines, pos
        lines.append(line)
        if len(lines) > MAX_HEADERS + 1:
            too_large("headers", False)


def _request_too_large(what, first):
    if what == "head":
        raise errors.HeadersTooLarge(
            "Request head too large: at most {} bytes allowed".format(
                MAX_HEAD))
    if what == "line":
        raise errors.HeadersTooLarge(
            "Request line too long" if first
            else "Request header line too long")
    raise errors.HeadersTooLarge(
        "Too many headers: at most {} allowed".format(MAX_HEADERS))


def _response_too_large(what, first):
    raise errors.BadGateway("Invalid response: {}".format({
        "head": "head over {} bytes".format(MAX_HEAD),
        "line": "line too long",
        "headers": "more than {} headers".format(MAX_HEADERS)}[what]))


def _parse_lines(buf, start):
    """parse_head line by line: every head, and every error's words."""
    pos = start
    # Stray CRLFs between requests.
    while True:
        if buf[pos:pos + 2] == b"\r\n":
            pos += 2
        elif buf[pos:pos + 1] == b"\n":
            pos += 1
        else:
            break
    found = _split_head(buf, pos, _request_too_large)
    if found is None:
        return None
    lines, pos = found
    return _make_head(lines), pos


# The fast path's view of a request line and a header line: what
# parse_request_line and parse_header_line accept, narrowed to printable
# ASCII targets and values without control characters.
_FAST_REQUEST = re.compile(
    r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) (/[!-~]*|\*) (HTTP/1\.[01])")
_FAST_HEADER = re.compile(
    r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*)")


def _fast_head(buf, pos, end):
    """The Head of the CRLF-delimited head ``buf[pos:end]``, parsed in one
    pass (most requests); None when any part of it is unusual (a bare LF,
    a control character, a long line, a duplicate header, too many
    headers): the line-by-line parser then decides, and words the error.
    Both accept the same heads and return the same Head."""
    # One copy: decoded from a view of the buffer, not from a slice of it.
    with memoryview(buf) as view:
        text = str(view[pos:end], "latin-1")
    lines = text.split("\r\n")
    if len(lines) > MAX_HEADERS + 1:
        return None
    m = _FAST_REQUEST.fullmatch(lines[0])
    if m is None or len(lines[0]) + 2 > MAX_LINE:
        return None
    method, target, version = m.groups()
    headers = {}
    match = _FAST_HEADER.fullmatch
    for i in range(1, len(lines)):
        line = lines[i]
        m = match(line)
        if m is None or len(line) + 2 > MAX_LINE:
            return None
        name = m.group(1).lower()
        if name in headers:
            return None
        headers[name] = m.group(2).rstrip(" \t")
    # Last, as parse_head: a bad percent-encoding is an error only in an
    # otherwise well-formed head.
    path, query = _split_target(target)
    return Head(method, path, query, version, headers)


def _make_head(lines):
    method, path, query, version = parse_request_line(lines[0])
    headers = {}
    for line in lines[1:]:
        name, value = parse_header_line(line)
        if name in headers:
            if name in _SINGLE:
                raise errors.BadRequest("Duplicate header {!r}".format(name))
            headers[name] += ", " + value
        else:
            headers[name] = value
    return Head(method, path, query, version, headers)


# Responses (the HTTP client of imageio.httpclient: the proxy backend and
# the transfer client).  The same limits as request heads; errors are
# BadGateway: the peer that sent them is the remote daemon.

_STATUS_LINE = re.compile(r"^(HTTP/1\.[01]) ([1-5][0-9][0-9])(?: (.*))?$")
# Response headers that may not come twice.
_SINGLE_RESPONSE = ("content-length", "content-range", "transfer-encoding")


class ResponseHead:
    """A parsed response head: what ``parse_response_head`` returns."""

    __slots__ = ("version", "status", "reason", "headers")

    def __init__(self, version, status, reason, headers):
        self.version = version
        self.status = status
        self.reason = reason
        self.headers = headers


def parse_response_head(buf, start=0):
    """Parse a response head (status line, headers, empty line) at
    ``buf[start:]``, as parse_head does a request head: None while it is
    not complete, else (ResponseHead, end).  Raises BadGateway for a
    malformed head, a line longer than MAX_LINE, more than MAX_HEADERS
    headers or a head over MAX_HEAD bytes, as soon as that is known."""
    found = _split_head(buf, start, _response_too_large)
    if found is None:
        return None
    lines, pos = found
    text = lines[0].decode("latin-1").rstrip("\r\n")
    m = _STATUS_LINE.match(text)
    if m is None:
        raise errors.BadGateway(
            "Invalid response status line {!r}".format(text[:80]))
    version, status, reason = m.group(1), int(m.group(2)), m.group(3) or ""
    headers = {}
    for line in lines[1:]:
        try:
            name, value = parse_header_line(line)
        except errors.BadRequest as e:
            raise errors.BadGateway("Invalid response: {}".format(e.message))
        if name in headers:
            if name in _SINGLE_RESPONSE:
                raise errors.BadGateway(
                    "Invalid response: duplicate header {!r}".format(name))
            headers[name] += ", " + value
        else:
            headers[name] = value
    return ResponseHead(version, status, reason, headers), pos
