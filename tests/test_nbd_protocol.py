"""imageio.nbd.protocol: the NBD wire format, pure, against proto.md's
byte layouts (and fuzzed: malformed input is a ProtocolError or
ValueError, never anything else)."""

import struct

import pytest
from hypothesis import given, settings, strategies as st

from imageio.nbd import protocol as p


def test_greeting():
    g = p.greeting()
    assert g[:8] == b"NBDMAGIC" and g[8:16] == b"IHAVEOPT"
    assert struct.unpack(">H", g[16:]) == (3,)  # FIXED_NEWSTYLE|NO_ZEROES


def test_client_flags():
    assert p.parse_client_flags(struct.pack(">I", 1)) is False
    assert p.parse_client_flags(struct.pack(">I", 3)) is True
    with pytest.raises(p.ProtocolError):
        p.parse_client_flags(struct.pack(">I", 0))
    with pytest.raises(p.ProtocolError):
        p.parse_client_flags(struct.pack(">I", 1 | 8))


def test_option_header_and_reply():
    assert p.parse_option_header(b"IHAVEOPT" + struct.pack(">II", 7, 12)) \
        == (7, 12)
    with pytest.raises(p.ProtocolError):
        p.parse_option_header(b"XHAVEOPT" + struct.pack(">II", 7, 12))
    with pytest.raises(p.ProtocolError):
        p.parse_option_header(b"IHAVEOPT" + struct.pack(">II", 7, 2**20))
    r = p.option_reply(7, p.REP_ACK)
    assert struct.unpack(">QIII", r) == (0x3e889045565a9, 7, 1, 0)


def test_info_request():
    data = struct.pack(">I", 3) + b"abc" + struct.pack(">HH", 1, 3)
    assert p.parse_info_request(data) == ("abc", [3])
    for bad in (b"", data[:-1], data + b"x",
                struct.pack(">I", 100) + b"abc" + struct.pack(">H", 0)):
        with pytest.raises(ValueError):
            p.parse_info_request(bad)


def test_meta_context_request():
    q = b"base:allocation"
    data = (struct.pack(">I", 1) + b"x" + struct.pack(">I", 1) +
            struct.pack(">I", len(q)) + q)
    assert p.parse_meta_context_request(data) == ("x", ["base:allocation"])
    with pytest.raises(ValueError):
        p.parse_meta_context_request(data[:-1])


def test_request_and_replies():
    raw = struct.pack(">IHHQQI", 0x25609513, 1, 1, 77, 4096, 512)
    assert p.parse_request(raw) == (1, 1, 77, 4096, 512)
    with pytest.raises(p.ProtocolError):
        p.parse_request(b"\0" * 28)
    assert struct.unpack(">IIQ", p.simple_reply(77, 22)) == \
        (0x67446698, 22, 77)
    h = p.data_chunk_header(77, 4096, 10, True)
    assert struct.unpack(">IHHQIQ", h) == (0x668e33ef, 1, 1, 77, 18, 4096)
    bs = p.block_status_chunk(77, 1, [(4096, 3), (512, 0)])
    magic, flags, kind, cookie, length = struct.unpack(">IHHQI", bs[:20])
    assert (kind, length) == (5, 4 + 16)
    assert struct.unpack(">IIIII", bs[20:]) == (1, 4096, 3, 512, 0)
    err = p.error_chunk(77, 5, "boom")
    assert struct.unpack(">IH", err[20:26]) == (5, 4) and err[26:] == b"boom"


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_parsers_on_any_bytes(data):
    for parse in (p.parse_info_request, p.parse_meta_context_request):
        try:
            parse(data)
        except (ValueError, UnicodeDecodeError):
            pass
    if len(data) >= 16:
        try:
            p.parse_option_header(data[:16])
        except p.ProtocolError:
            pass
    if len(data) >= 28:
        try:
            p.parse_request(data[:28])
        except p.ProtocolError:
            pass
