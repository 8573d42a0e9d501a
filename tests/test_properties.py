"""Property-based tests: whatever the input, parsers either return a
consistent result or raise the error the HTTP layer turns into a 4xx."""

import json
import os
import tempfile

from hypothesis import given, settings, strategies as st

from imageio import config
from imageio import errors
from imageio import httpparse as hp
from imageio import tickets

HTTP_ERRORS = (errors.BadRequest, errors.RangeNotSatisfiable)


@given(st.text(max_size=60), st.integers(min_value=1, max_value=2**62))
def test_range_any_text(value, size):
    try:
        offset, length = hp.parse_range(value, size)
    except HTTP_ERRORS:
        return
    assert 0 <= offset < size
    assert 1 <= length and offset + length <= size


@given(st.integers(0, 2**63), st.one_of(st.none(), st.integers(0, 2**63)),
       st.integers(1, 2**62))
def test_range_numbers(first, last, size):
    value = "bytes={}-{}".format(first, "" if last is None else last)
    try:
        offset, length = hp.parse_range(value, size)
    except errors.RangeNotSatisfiable:
        assert first >= size or (last is not None and last < first)
        return
    assert offset == first
    end = size - 1 if last is None else min(last, size - 1)
    assert length == end - first + 1


@given(st.text(max_size=60))
def test_content_range_any_text(value):
    try:
        offset, length, total = hp.parse_content_range(value)
    except errors.BadRequest:
        return
    assert offset >= 0 and length >= 1


@given(st.integers(0, 2**62), st.integers(0, 2**62))
def test_content_range_roundtrip(first, extra):
    value = "bytes {}-{}/*".format(first, first + extra)
    assert hp.parse_content_range(value) == (first, extra + 1, None)


@given(st.binary(max_size=200))
def test_request_line_any_bytes(line):
    try:
        method, path, query, version = hp.parse_request_line(line)
    except errors.BadRequest:
        return
    assert version in ("HTTP/1.0", "HTTP/1.1")
    assert path.startswith("/") or path == "*"


@given(st.binary(max_size=200))
def test_header_line_any_bytes(line):
    try:
        name, value = hp.parse_header_line(line)
    except errors.BadRequest:
        return
    assert name == name.lower() and name
    assert "\r" not in value and "\n" not in value


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10)

ticket_like = st.fixed_dictionaries({}, optional={
    "uuid": json_values | st.text(max_size=40),
    "size": json_values | st.integers(-10, 2**64),
    "url": json_values | st.sampled_from(
        ["file:///x", "nbd:unix:/s", "https://h:1/images/x", "ftp://x",
         "file:relative", "nbd://h/e"]),
    "timeout": json_values | st.integers(-10, 10**6),
    "ops": json_values | st.lists(st.sampled_from(
        ["read", "write", "delete", ""]), max_size=3),
    "sparse": json_values,
    "dirty": json_values,
    "inactivity_timeout": json_values,
    "filename": json_values,
    "transfer_id": json_values,
})


@settings(max_examples=300)
@given(ticket_like)
def test_ticket_validation(d):
    try:
        clean = tickets.validate(d)
    except errors.BadRequest as e:
        assert "Invalid ticket" in str(e)
        return
    assert isinstance(clean["size"], int) and clean["size"] >= 0
    assert isinstance(clean["timeout"], int) and clean["timeout"] >= 0
    assert set(clean["ops"]) <= {"read", "write"} and clean["ops"]
    assert isinstance(clean["uuid"], str) and clean["uuid"]
    # A valid ticket is usable.
    tickets.Ticket(clean).info()


@given(json_values)
def test_ticket_modify(changes):
    store = tickets.Store(config.load(files=[]))
    store.add({"uuid": "t", "size": 1, "url": "file:///x", "timeout": 10,
               "ops": ["read"]})
    try:
        store.modify("t", changes)
    except errors.BadRequest:
        assert store.get("t").timeout == 10
        return
    assert store.get("t").timeout == changes["timeout"]


@given(st.text(max_size=30), st.sampled_from(
    [("daemon", "max_connections"), ("tls", "enable"),
     ("daemon", "poll_interval"), ("remote", "host")]))
def test_config_values(raw, where):
    section, option = where
    if "\r" in raw or "\n" in raw:
        # A value is one line of the file.
        return
    with tempfile.TemporaryDirectory() as d:
        os.mkdir(os.path.join(d, "conf.d"))
        path = os.path.join(d, "conf.d", "50.conf")
        with open(path, "w") as f:
            f.write("[{}]\n{} = {}\n".format(section, option, raw))
        try:
            cfg = config.load(d)
        except errors.ConfigError as e:
            assert path in str(e)
            return
        value = getattr(getattr(cfg, section), option)
        assert type(value) is type(config.DEFAULTS[section][option])


@given(json_values)
def test_patch_json_fields(msg):
    # The PATCH validators used by the images handler.
    from imageio.handlers import images
    if not isinstance(msg, dict):
        return
    for name in ("offset", "size"):
        try:
            v = images._int_field(msg, name, 0)
        except errors.BadRequest as e:
            assert name in str(e)
        else:
            assert isinstance(v, int) and v >= 0
    try:
        images._bool_field(msg, "flush", False)
    except errors.BadRequest as e:
        assert "flush" in str(e)


def test_json_roundtrip_sanity():
    assert json.loads(json.dumps({"a": 1})) == {"a": 1}


# Pieces of request heads, mostly usual, some not: parse_head's one-pass
# path must give what the line-by-line parser gives, or leave the head to
# it.
_request_lines = st.sampled_from([
    "GET /images/abc HTTP/1.1", "PUT /images/a%20b?flush=n&x= HTTP/1.0",
    "OPTIONS * HTTP/1.1", "HEAD /images/%ff HTTP/1.1", "GET  /x HTTP/1.1",
    "get /x HTTP/1.1", "GET /x\tHTTP/1.1", "GET /\x01 HTTP/1.1",
    "GET /x HTTP/2.0", "GET x HTTP/1.1", ""])
_header_lines = st.sampled_from([
    "Host: example", "Range: bytes=0-4095", "RANGE: bytes=1-2",
    "X:", "X: \t v \t", "X-Y:v", "X: v\x00", "X: v\x01", "X: caf\xe9",
    "X: a\rb", "Bad Name: v", "NoColon", ": v", "X-Long: " + "a" * 8190,
    "Content-Length: 3", "content-length: 4", "Accept: a", "accept: b",
    "Transfer-Encoding: chunked", ""])
_endings = st.sampled_from(["\r\n"] * 8 + ["\n", "\r\r\n"])


@settings(max_examples=1000)
@given(_request_lines, st.lists(_header_lines, max_size=5),
       st.lists(_endings, min_size=6, max_size=6),
       st.sampled_from([""] * 4 + ["\r\n", "\n"]), st.binary(max_size=8))
def test_head_fast_path_agrees(request, headers, endings, lead, rest):
    lines = [request] + headers
    text = lead + "".join(line + end for line, end in zip(lines, endings))
    buf = bytearray(text.encode("latin-1") + b"\r\n" + rest)

    def outcome(parse):
        try:
            result = parse(buf, 0)
        except errors.HTTPError as e:
            return type(e), e.message
        if result is None:
            return None
        head, end = result
        return (head.method, head.path, head.query, head.version,
                head.headers, end)

    assert outcome(hp.parse_head) == outcome(hp._parse_lines)


@given(st.binary(max_size=400), st.integers(0, 3))
@settings(max_examples=500, deadline=None)
def test_response_head_any_bytes(data, split):
    # Whatever a remote daemon sends: a head, None (not complete yet), or
    # BadGateway; never another exception.  Complete heads parse the same
    # whether they come with more bytes after them or not.
    from imageio import errors
    try:
        result = hp.parse_response_head(data)
    except errors.BadGateway:
        return
    if result is not None:
        head, end = result
        again, end2 = hp.parse_response_head(data[:end] + b"tail")
        assert (again.status, again.headers, end2) == \
            (head.status, head.headers, end)


@given(st.sampled_from([b"HTTP/1.1 200 OK", b"HTTP/1.0 404 Not Found",
                        b"HTTP/1.1 507"]),
       st.lists(_header_lines, max_size=5))
@settings(max_examples=300, deadline=None)
def test_response_head_usual(status, headers):
    from imageio import errors
    # (An empty header line would end the head there.)
    data = status + b"\r\n" + b"".join(
        h.encode("latin-1") + b"\r\n" for h in headers if h) + b"\r\n"
    try:
        result = hp.parse_response_head(data)
    except errors.BadGateway:
        return
    assert result is not None and result[1] == len(data)
