import pytest

from imageio import errors
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
