import pytest

from imageio import errors
from imageio import httpparse
from imageio import httpparse as hp


def test_request_line():
    assert hp.parse_request_line(b"GET /images/abc?close=y HTTP/1.1\r\n") \
        == ("GET", "/images/abc", {"close": "y"}, "HTTP/1.1")
    assert hp.parse_request_line(b"OPTIONS * HTTP/1.1\r\n")[1] == "*"
    assert hp.parse_request_line(b"GET /images/a%20b HTTP/1.0\r\n")[1] \
        == "/images/a b"


@pytest.mark.parametrize("line", [
    b"GET /x\r\n", b"GET  /x HTTP/1.1\r\n", b"G@T /x HTTP/1.1\r\n",
    b"GET x HTTP/1.1\r\n", b"GET /x HTTP/2.0\r\n", b"GET /\xff HTTP/1.1\r\n",
    b"",
])
def test_bad_request_line(line):
    with pytest.raises(errors.BadRequest):
        hp.parse_request_line(line)


def test_header_line():
    assert hp.parse_header_line(b"Content-Length:  42 \r\n") == \
        ("content-length", "42")
    with pytest.raises(errors.BadRequest):
        hp.parse_header_line(b"No colon here\r\n")
    with pytest.raises(errors.BadRequest):
        hp.parse_header_line(b"Bad Name: x\r\n")


@pytest.mark.parametrize("value,result", [
    ("bytes=0-0", (0, 1)),
    ("bytes=0-99", (0, 100)),
    ("bytes=10-", (10, 90)),
    ("bytes=99-99", (99, 1)),
    # last past the end: the rest of the image (RFC 9110 14.1.2).
    ("bytes=0-100", (0, 100)),
    ("bytes=98-99999", (98, 2)),
])
def test_range(value, result):
    assert hp.parse_range(value, 100) == result


@pytest.mark.parametrize("value", [
    "bytes=100-", "bytes=100-100", "bytes=-10", "bytes=0-1,5-6", "items=0-1",
    "bytes=5-4", "bytes=a-b", "bytes=" + "9" * 30 + "-",
])
def test_range_not_satisfiable(value):
    with pytest.raises((errors.RangeNotSatisfiable, errors.BadRequest)) as e:
        hp.parse_range(value, 100)
    if isinstance(e.value, errors.RangeNotSatisfiable):
        assert e.value.size == 100


def test_content_range():
    assert hp.parse_content_range("bytes 0-99/*") == (0, 100, None)
    assert hp.parse_content_range("bytes 100-199/1000") == (100, 100, 1000)
    for bad in ("bytes 5-4/*", "bytes */100", "0-99/*", "bytes 0-/*"):
        with pytest.raises(errors.BadRequest):
            hp.parse_content_range(bad)


def test_content_length():
    assert hp.parse_content_length("0") == 0
    assert hp.parse_content_length(" 123 ") == 123
    for bad in ("-1", "1.5", "", "0x10", "١٢"):
        with pytest.raises(errors.BadRequest):
            hp.parse_content_length(bad)


def test_chunk_size():
    assert hp.parse_chunk_size(b"1f\r\n") == 31
    assert hp.parse_chunk_size(b"0;ext=1\r\n") == 0
    for bad in (b"\r\n", b"zz\r\n", b"-1\r\n", b"1" * 20 + b"\r\n"):
        with pytest.raises(errors.BadRequest):
            hp.parse_chunk_size(bad)


def test_bad_percent_encoding():
    # Found by tests/fuzz_http.py: crashed the connection thread.
    with pytest.raises(errors.BadRequest):
        hp.parse_request_line(b"PUT /images/%%%%%%%%%%%%%%%%abc HTTP/1.1\r\n")
    with pytest.raises(errors.BadRequest):
        hp.parse_request_line(b"GET /images/%ff%fe HTTP/1.1\r\n")


# parse_head: resumable, fed one byte at a time as a slow client sends.

HEAD = (b"\r\nPUT /images/abc?flush=n HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 5\r\nX-A: 1\r\nx-a: 2\r\n\r\nhello")


def test_parse_head_one_byte_at_a_time():
    end_of_head = HEAD.index(b"\r\n\r\n") + 4
    buf = bytearray()
    for i, byte in enumerate(HEAD):
        buf.append(byte)
        result = httpparse.parse_head(buf)
        if i + 1 < end_of_head:
            assert result is None, i
        else:
            head, end = result
            assert end == end_of_head
            break
    assert head.method == "PUT"
    assert head.path == "/images/abc"
    assert head.query == {"flush": "n"}
    assert head.version == "HTTP/1.1"
    assert head.headers == {"host": "x", "content-length": "5",
                            "x-a": "1, 2"}


def test_parse_head_whole_head_at_once():
    # The usual case: a whole head in one piece, a header repeated.
    buf = bytearray(HEAD[2:] + b"GET /next")
    head, end = httpparse.parse_head(buf)
    assert buf[end:] == b"hello" + b"GET /next"
    assert (head.method, head.path, head.query, head.version) == \
        ("PUT", "/images/abc", {"flush": "n"}, "HTTP/1.1")
    assert head.headers == {"host": "x", "content-length": "5",
                            "x-a": "1, 2"}


def test_parse_head_bare_lf_and_start():
    buf = b"junkGET / HTTP/1.0\nA: b\n\nrest"
    head, end = httpparse.parse_head(buf, start=4)
    assert head.method == "GET" and head.headers == {"a": "b"}
    assert buf[end:] == b"rest"


@pytest.mark.parametrize("data,status", [
    (b"GET /" + b"a" * httpparse.MAX_LINE, 431),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * httpparse.MAX_LINE, 431),
    (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * (httpparse.MAX_HEADERS + 1), 431),
    # Whole heads: what the one-pass path sees first.
    (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * (httpparse.MAX_HEADERS + 1)
     + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * httpparse.MAX_LINE + b"\r\n\r\n", 431),
    (b"GET /images/%ff HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nContent-Length: 1\r\ncontent-length: 1\r\n\r\n",
     400),
    (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", 400),
    (b"GET /\r\n\r\n", 400),
])
def test_parse_head_errors(data, status):
    # Raised as soon as the limit is passed, without waiting for the end.
    with pytest.raises(errors.HTTPError) as e:
        httpparse.parse_head(bytearray(data))
    assert e.value.status == status


def test_parse_head_too_large_in_total():
    line = b"X: " + b"y" * 1000 + b"\r\n"
    data = b"GET / HTTP/1.1\r\n" + line * 70
    with pytest.raises(errors.HeadersTooLarge):
        httpparse.parse_head(data)


# Response heads (imageio.httpclient).

def test_response_head():
    buf = (b"HTTP/1.1 206 Partial Content\r\nContent-Length: 5\r\n"
           b"Content-Range: bytes 0-4/10\r\nX-A: 1\r\nx-a: 2\r\n\r\nhello")
    head, end = hp.parse_response_head(buf)
    assert (head.version, head.status, head.reason) == \
        ("HTTP/1.1", 206, "Partial Content")
    assert head.headers == {"content-length": "5",
                            "content-range": "bytes 0-4/10",
                            "x-a": "1, 2"}
    assert buf[end:] == b"hello"


def test_response_head_incomplete():
    whole = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    for i in range(len(whole)):
        assert hp.parse_response_head(whole[:i]) is None
    assert hp.parse_response_head(whole)[1] == len(whole)


@pytest.mark.parametrize("buf,words", [
    (b"this is not http\r\n\r\n", "status line"),
    (b"HTTP/2 200 OK\r\n\r\n", "status line"),
    (b"HTTP/1.1 99 Low\r\n\r\n", "status line"),
    (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "Invalid header"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
     "duplicate"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"v" * hp.MAX_LINE + b"\r\n\r\n",
     "line too long"),
    (b"HTTP/1.1 200 OK\r\n" + b"X: v\r\n" * (hp.MAX_HEADERS + 1) + b"\r\n",
     "headers"),
])
def test_response_head_refused(buf, words):
    with pytest.raises(errors.BadGateway) as e:
        hp.parse_response_head(buf)
    assert words in str(e.value)


def test_response_head_limits_known_before_the_end():
    # A line that is already too long, with no end in sight.
    with pytest.raises(errors.BadGateway):
        hp.parse_response_head(b"HTTP/1.1 200 OK\r\nX: " + b"v" * 9000)
    with pytest.raises(errors.BadGateway):
        hp.parse_response_head(b"HTTP/1.1 200 OK\r\n" +
                               b"X: " + b"v" * 8000 + b"\r\n" * 0 +
                               (b"Y: " + b"w" * 100 + b"\r\n") * 700)
