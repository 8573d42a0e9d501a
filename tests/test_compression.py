"""zstd on the wire (docs/api.md, "Compression"), through the real daemon:
curl --compressed downloads, TE: zstd ranged reads, zstd-coded PUTs, and
bad streams refused with the image unchanged."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import zstandard

from harness import nbdserver
from conftest import add, connect, connect_raw, request, ticket_info
from harness.daemonproc import Daemon
from imageio import compression

MiB = 1024**2


def image_bytes():
    """Text, random bytes, a long hole (RLE frames) and short ones (fed to
    the compressor): what a guest disk looks like, in 9 MiB + 5."""
    text = b"".join(b"line %d of a log file, fairly compressible\n" % i
                    for i in range(40000))
    parts = [text[:2 * MiB], os.urandom(MiB), bytes(3 * MiB),
             os.urandom(64 * 1024), bytes(64 * 1024), text[:2 * MiB],
             bytes(MiB - 128 * 1024), os.urandom(5)]
    return b"".join(parts)


def write_sparse(path, data):
    """Write data with its zero runs of >= 64 KiB left as holes."""
    with open(path, "wb") as f:
        step = 64 * 1024
        for i in range(0, len(data), step):
            block = data[i:i + step]
            if len(block) == step and not any(block):
                continue
            f.seek(i)
            f.write(block)
        f.truncate(len(data))
    return path


@pytest.fixture(scope="module")
def content():
    return image_bytes()


@pytest.fixture
def image(tmp_path, content):
    return write_sparse(tmp_path / "disk.raw", content), content


def compress(data, **kw):
    kw.setdefault("write_checksum", True)
    return zstandard.ZstdCompressor(level=3, **kw).compress(data)


def decompress(data):
    return zstandard.ZstdDecompressor().decompressobj(
        read_across_frames=True).decompress(data)


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def url_of(daemon, service, t):
    if service == "remote":
        return ["--cacert", daemon.ca_file,
                "https://localhost:{}/images/{}".format(daemon.remote_port,
                                                        t["uuid"])]
    return ["--unix-socket", daemon.local_socket,
            "http://localhost/images/" + t["uuid"]]


def curl(*args):
    r = subprocess.run(["curl", "--fail", "-sS"] + list(args),
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    return r


# Raw HTTP, for codings http.client does not parse.

def exchange(daemon, service, head, body_chunks=()):
    """Send a request head (and chunked body parts); return (status,
    headers, decoded-chunked body) of the response."""
    s = connect_raw(daemon, service)
    try:
        s.sendall(head)
        for part in body_chunks:
            s.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        if body_chunks:
            s.sendall(b"0\r\n\r\n")
        f = s.makefile("rb")
        status = int(f.readline().split()[1])
        headers = {}
        while True:
            line = f.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = f.read(int(headers["content-length"]))
        else:
            assert headers["transfer-encoding"].endswith("chunked")
            body = b""
            while True:
                size = int(f.readline().strip(), 16)
                if size == 0:
                    assert f.readline() == b"\r\n"
                    break
                body += f.read(size)
                assert f.readline() == b"\r\n"
        return status, headers, body
    finally:
        s.close()


def get_head(t, extra=""):
    return ("GET /images/{} HTTP/1.1\r\nHost: localhost\r\n{}\r\n"
            .format(t["uuid"], extra)).encode()


def put_zstd(daemon, service, t, stream, content_range=None, pieces=3):
    """PUT ``stream`` as 'Transfer-Encoding: zstd, chunked' with
    http.client; return (status, body)."""
    headers = {"Transfer-Encoding": "zstd, chunked"}
    if content_range:
        headers["Content-Range"] = content_range
    step = max(1, len(stream) // pieces)
    parts = [stream[i:i + step] for i in range(0, len(stream), step)]
    con = connect(daemon, service)
    con.request("PUT", "/images/" + t["uuid"], body=iter(parts),
                headers=headers, encode_chunked=True)
    resp = con.getresponse()
    return resp.status, resp.read()


# The codec alone.

@pytest.mark.parametrize("headers,ranged,want", [
    ({"accept-encoding": "zstd"}, False, "content"),
    ({"accept-encoding": "gzip, zstd;q=0.1"}, False, "content"),
    ({"accept-encoding": "*"}, False, "content"),
    ({"accept-encoding": "*, zstd;q=0"}, False, None),
    ({"accept-encoding": "ZSTD;Q=1.0"}, False, "content"),
    ({"accept-encoding": "zstd;q=bogus"}, False, None),
    ({"accept-encoding": "zstd"}, True, None),
    ({"te": "zstd"}, True, "transfer"),
    ({"te": "trailers, zstd;q=0.5"}, False, "transfer"),
    # TE has no wildcard.
    ({"te": "*"}, True, None),
    ({"te": "zstd;q=0", "accept-encoding": "zstd"}, False, "content"),
    ({}, False, None),
])
def test_response_coding(headers, ranged, want):
    assert compression.response_coding(headers, ranged) == want


@pytest.mark.parametrize("length", [1, 128 * 1024 - 1, 128 * 1024,
                                    128 * 1024 + 1, 3 * MiB + 17])
def test_zero_frame(length, monkeypatch):
    # Groups of 3 blocks instead of 8192 (1 GiB): the group boundaries of
    # the long runs, in a few MiB.
    monkeypatch.setattr(compression, "_RLE_GROUP", 3)
    frame = b"".join(compression.zero_frame(length))
    # 4 bytes per 128 KiB block plus the header.
    assert len(frame) == 14 + 4 * -(-length // (128 * 1024))
    assert zstandard.frame_content_size(frame) == length
    out = zstandard.ZstdDecompressor().decompress(frame)
    assert out == bytes(length)


# OPTIONS

def test_options_advertises_zstd(daemon, service, image):
    path, data = image
    t = add(daemon, path, len(data))
    con = connect(daemon, service)
    for target in (t["uuid"], "*"):
        resp, body = request(con, "OPTIONS", "/images/" + target)
        assert json.loads(body)["encodings"] == ["zstd"]


# GET

def test_curl_compressed_download(daemon, service, tmp_path, image):
    path, data = image
    t = add(daemon, path, len(data), ops=["read"])
    out = tmp_path / "out"
    r = curl("--compressed", "-D", "-", "-o", str(out),
             *url_of(daemon, service, t))
    head = r.stdout.decode().lower()
    assert "content-encoding: zstd" in head
    assert "vary: accept-encoding" in head
    assert out.read_bytes() == data
    info = ticket_info(daemon, t["uuid"])
    assert info["transferred"] == len(data)


def test_curl_without_compressed_is_identity(daemon, service, tmp_path,
                                             image):
    path, data = image
    t = add(daemon, path, len(data))
    out = tmp_path / "out"
    r = curl("-D", "-", "-o", str(out), *url_of(daemon, service, t))
    assert "content-encoding" not in r.stdout.decode().lower()
    assert out.read_bytes() == data


def test_compressed_stream_is_standard(daemon, service, image):
    # Any zstd decoder reads it: python-zstandard and the zstd command.
    path, data = image
    t = add(daemon, path, len(data))
    status, headers, body = exchange(
        daemon, service, get_head(t, "Accept-Encoding: gzip, zstd\r\n"))
    assert status == 200
    assert headers["content-encoding"] == "zstd"
    # The long hole costs RLE blocks, not compressed zeroes: the stream is
    # far smaller than the random parts alone.
    assert len(body) < MiB + 64 * 1024 + 200 * 1024
    assert decompress(body) == data
    r = subprocess.run(["zstd", "-dc"], input=body, capture_output=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == data


@pytest.mark.parametrize("accept", ["gzip", "zstd;q=0", "br, gzip;q=0.5",
                                    "identity"])
def test_get_accept_encoding_without_zstd(daemon, service, image, accept):
    path, data = image
    t = add(daemon, path, len(data))
    con = connect(daemon, service)
    resp, body = request(con, "GET", "/images/" + t["uuid"],
                         headers={"Accept-Encoding": accept})
    assert resp.status == 200
    assert resp.getheader("Content-Encoding") is None
    assert body == data


def test_http10_gets_identity(daemon, service, image):
    # No chunked framing in HTTP/1.0: no compression either.
    path, data = image
    t = add(daemon, path, len(data))
    status, headers, body = exchange(daemon, service, (
        "GET /images/{} HTTP/1.0\r\nAccept-Encoding: zstd\r\nTE: zstd\r\n"
        "\r\n".format(t["uuid"])).encode())
    assert status == 200
    assert "content-encoding" not in headers
    assert body == data


def test_ranged_get_ignores_accept_encoding(daemon, service, image):
    # A range of a content-coded answer would count encoded bytes: a
    # client that asked for a range gets image bytes, as from any daemon.
    path, data = image
    t = add(daemon, path, len(data))
    con = connect(daemon, service)
    resp, body = request(con, "GET", "/images/" + t["uuid"],
                         headers={"Accept-Encoding": "zstd",
                                  "Range": "bytes=1000-3999999"})
    assert resp.status == 206
    assert resp.getheader("Content-Encoding") is None
    assert resp.getheader("Content-Range") == \
        "bytes 1000-3999999/{}".format(len(data))
    assert body == data[1000:4000000]


@pytest.mark.parametrize("first,last", [(0, 0), (1000, 3999999),
                                         (2 * MiB - 7, 7 * MiB + 3)])
def test_ranged_get_transfer_coded(daemon, service, image, first, last):
    path, data = image
    t = add(daemon, path, len(data))
    status, headers, body = exchange(
        daemon, service,
        get_head(t, "Range: bytes={}-{}\r\nTE: zstd\r\nConnection: TE\r\n"
                 .format(first, last)))
    assert status == 206
    assert headers["transfer-encoding"] == "zstd, chunked"
    assert "content-encoding" not in headers
    assert headers["content-range"] == "bytes {}-{}/{}".format(
        first, last, len(data))
    assert decompress(body) == data[first:last + 1]


def test_te_without_zstd_is_identity(daemon, service, image):
    path, data = image
    t = add(daemon, path, len(data))
    status, headers, body = exchange(
        daemon, service,
        get_head(t, "Range: bytes=0-99\r\nTE: trailers, gzip\r\n"))
    assert status == 206
    assert "transfer-encoding" not in headers
    assert body == data[:100]


def test_nbd_compressed_download(daemon, service, tmp_path, content):
    path = write_sparse(tmp_path / "nbd.raw", content)
    srv = nbdserver.qemu_nbd(path, "raw", sock=str(tmp_path / "nbd.sock"))
    srv.start()
    try:
        t = {"uuid": os.urandom(16).hex(), "size": len(content),
             "url": srv.url(), "timeout": 300, "ops": ["read"]}
        daemon.add_ticket(t)
        out = tmp_path / "out"
        curl("--compressed", "-o", str(out), *url_of(daemon, service, t))
        assert out.read_bytes() == content
    finally:
        srv.stop()


# PUT

@pytest.fixture
def target(tmp_path, content):
    """An image to write (zeroes), with its size and data to upload."""
    path = tmp_path / "target.raw"
    with open(path, "wb") as f:
        f.truncate(len(content))
    return path


def test_put_zstd_range(daemon, service, target, content):
    t = add(daemon, target, len(content), ops=["write"])
    first, last = 3 * MiB - 11, 8 * MiB + 5
    piece = content[first:last + 1]
    status, body = put_zstd(daemon, service, t, compress(piece),
                            "bytes {}-{}/*".format(first, last))
    assert status == 200, body
    expected = bytes(first) + piece + bytes(len(content) - last - 1)
    assert target.read_bytes() == expected
    assert ticket_info(daemon, t["uuid"])["transferred"] == len(piece)


def test_put_zstd_many_frames_whole(daemon, service, target, content):
    # No Content-Range: decoded bytes are written from 0.  Several frames,
    # including the daemon's own RLE zero frames.
    t = add(daemon, target, len(content), ops=["write"])
    stream = compress(content[:MiB]) + b"".join(
        compression.zero_frame(2 * MiB)) + compress(content[3 * MiB:])
    status, body = put_zstd(daemon, service, t, stream, pieces=7)
    assert status == 200, body
    assert target.read_bytes() == content[:MiB] + bytes(2 * MiB) + \
        content[3 * MiB:]


def test_put_zstd_then_more_requests(daemon, service, target, content):
    # The connection stays usable after a coded PUT and after a refused
    # one.
    t = add(daemon, target, len(content))
    con = connect(daemon, service)
    for stream, want in [(compress(content[:100]), 200), (b"junk" * 10, 400),
                         (compress(content[:100]), 200)]:
        con.request("PUT", "/images/" + t["uuid"], body=iter([stream]),
                    headers={"Transfer-Encoding": "zstd, chunked",
                             "Content-Range": "bytes 0-99/*"},
                    encode_chunked=True)
        resp = con.getresponse()
        resp.read()
        assert resp.status == want
    resp, body = request(con, "GET", "/images/" + t["uuid"],
                         headers={"Range": "bytes=0-99"})
    assert body == content[:100]


def _corrupt(stream):
    bad = bytearray(stream)
    bad[len(bad) // 2] ^= 0x40
    return bytes(bad)


BAD_STREAMS = {
    # A flipped bit: the frame checksum (or the block structure) fails.
    "corrupt": lambda piece: _corrupt(compress(piece)),
    "garbage": lambda piece: os.urandom(4096),
    "truncated": lambda piece: compress(piece)[:-1000],
    # Every byte there, but the frame's checksum missing.
    "truncated-checksum": lambda piece: compress(piece)[:-4],
    "short": lambda piece: compress(piece[:-1]),
    "trailing-garbage": lambda piece: compress(piece) + b"\x00garbage",
    # A 64 KiB body that decodes to 16 GiB: refused after the range, never
    # allocated.
    "bomb": lambda piece: b"".join(compression.zero_frame(16 * 1024**3)),
    "too-long": lambda piece: compress(piece + b"x"),
    "window-too-large": lambda piece: zstandard.ZstdCompressor(
        compression_params=zstandard.ZstdCompressionParameters.from_level(
            3, window_log=27)).compress(piece * 4),
}


@pytest.mark.parametrize("kind", sorted(BAD_STREAMS))
def test_put_bad_stream_changes_nothing(daemon, service, target, content,
                                        kind):
    t = add(daemon, target, len(content), ops=["write"])
    before = digest(target)
    piece = content[:2 * MiB]
    stream = BAD_STREAMS[kind](piece)
    status, body = put_zstd(daemon, service, t, stream,
                            "bytes 0-{}/*".format(len(piece) - 1))
    assert status == 400, body
    assert b"zstd" in body
    assert digest(target) == before
    assert ticket_info(daemon, t["uuid"])["transferred"] == 0


def test_put_bomb_past_image_end(daemon, service, target, content):
    t = add(daemon, target, len(content), ops=["write"])
    before = digest(target)
    # 512 KiB decoding to 16 GiB.
    stream = b"".join(compression.zero_frame(16 * 1024**3))
    status, body = put_zstd(daemon, service, t, stream)
    assert status == 416, body
    assert ticket_info(daemon, t["uuid"])["transferred"] == 0
    assert digest(target) == before


def test_put_content_encoding_refused(daemon, service, target, content):
    t = add(daemon, target, len(content), ops=["write"])
    before = digest(target)
    con = connect(daemon, service)
    stream = compress(content[:MiB])
    resp, body = request(con, "PUT", "/images/" + t["uuid"], body=stream,
                         headers={"Content-Encoding": "zstd"})
    assert resp.status == 415
    assert digest(target) == before


def test_put_unknown_transfer_coding(daemon, service, target, content):
    t = add(daemon, target, len(content), ops=["write"])
    status, body = put_zstd_coding(daemon, service, t, "gzip, chunked")
    assert status == 400
    assert b"Transfer-Encoding" in body


def put_zstd_coding(daemon, service, t, coding):
    head = ("PUT /images/{} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {}\r\n"
            "\r\n".format(t["uuid"], coding)).encode()
    # Refused at the head, before the body is read.
    status, _, body = exchange(daemon, service, head)
    return status, body


# The project's client: ovirt-img --compress.

OVIRT_IMG = os.path.join(os.path.dirname(sys.executable), "ovirt-img")


@pytest.fixture(scope="module")
def tcp_daemon(tmp_path_factory):
    """A daemon without its local service: the client must cross TLS, as
    from another host (on the unix socket it does not compress)."""
    d = Daemon(tmp_path_factory.mktemp("tcp-daemon"),
               "[local]\nenable = false\n").start()
    yield d
    d.stop()


def ovirt_img(*args):
    r = subprocess.run([OVIRT_IMG] + [str(a) for a in args],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r


def empty_target(d, tmp_path, size, **kw):
    """A zeroed image behind a read-write ticket of daemon ``d``: (path,
    the transfer URL over its remote service)."""
    target = tmp_path / "target.raw"
    with open(target, "wb") as f:
        f.truncate(size)
    t = add(d, target, size, **kw)
    return target, "https://localhost:{}/images/{}".format(d.remote_port,
                                                           t["uuid"])


@pytest.fixture
def aligned(content):
    # qcow2 sizes are multiples of 512.
    return content[:len(content) // 4096 * 4096]


@pytest.fixture
def qcow2_source(tmp_path, aligned):
    """A qcow2 with the test content (data, zero runs, holes)."""
    raw = write_sparse(tmp_path / "source.raw", aligned)
    path = tmp_path / "source.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2",
                    str(raw), str(path)], check=True, timeout=60)
    return path


def test_client_compressed_upload_download(tcp_daemon, tmp_path, aligned,
                                           qcow2_source):
    d = tcp_daemon
    target, url = empty_target(d, tmp_path, len(aligned), sparse=True)
    before = d.log().count("from a zstd-coded body")
    ovirt_img("upload", qcow2_source, url, "--cafile", d.ca_file,
              "--compress")
    assert target.read_bytes() == aligned
    # The data went zstd-coded: the source's two data extents (qcow2
    # clusters merge the small ones).
    assert d.log().count("from a zstd-coded body") - before >= 2
    out = tmp_path / "download.raw"
    before = d.log().count("zstd-coded (transfer)")
    ovirt_img("download", url, out, "--format", "raw", "--cafile",
              d.ca_file, "--compress")
    assert out.read_bytes() == aligned
    assert d.log().count("zstd-coded (transfer)") > before


def test_client_compress_falls_back_on_established(tmp_path, aligned,
                                                   qcow2_source):
    # The established daemon has no "encodings": plain bytes, same result.
    from bench import peers, tls as bench_tls
    work = str(tmp_path / "established")
    os.makedirs(work)
    key, cert = bench_tls.make_cert(work)
    d = peers.Daemon("established", work, key, cert)
    d.start()
    try:
        target = tmp_path / "target.raw"
        with open(target, "wb") as f:
            f.truncate(len(aligned))
        d.add_ticket("t", str(target), size=len(aligned),
                     ops=("read", "write"), sparse=True)
        url = "https://127.0.0.1:{}{}".format(d.https[1], d.path("t"))
        r = ovirt_img("upload", qcow2_source, url, "--cafile", cert,
                      "--compress", "-v")
        assert "does not offer zstd" in r.stderr
        assert target.read_bytes() == aligned
        out = tmp_path / "download.raw"
        ovirt_img("download", url, out, "--format", "raw", "--cafile", cert,
                  "--compress")
        assert out.read_bytes() == aligned
    finally:
        d.stop()


def test_client_does_not_compress_on_unix_socket(daemon, tmp_path, aligned,
                                                 qcow2_source):
    target, url = empty_target(daemon, tmp_path, len(aligned), sparse=True)
    r = ovirt_img("upload", qcow2_source, url, "--cafile", daemon.ca_file,
                  "--compress", "-v")
    assert "Not compressing: using the daemon's unix socket" in r.stderr
    assert target.read_bytes() == aligned


def test_library_compress_argument(tcp_daemon, tmp_path, aligned,
                                   qcow2_source):
    from imageio import client
    d = tcp_daemon
    target, url = empty_target(d, tmp_path, len(aligned))
    client.upload(str(qcow2_source), url, d.ca_file, compress=True)
    assert target.read_bytes() == aligned
    out = tmp_path / "d.qcow2"
    client.download(url, str(out), d.ca_file, compress=True)
    r = subprocess.run(["qemu-img", "compare", str(qcow2_source), str(out)],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stdout


@pytest.mark.parametrize("bufsize", [MiB, 4 * MiB])
@pytest.mark.parametrize("direct", [False, True])
def test_send_with_and_without_read_ahead(tmp_path, content, bufsize,
                                          direct):
    # A small buffer (a busy daemon's pool) and a large one; buffered
    # (no read-ahead) and O_DIRECT (the copy engine overlaps reading).
    from imageio._io.buffer import AlignedBuffer
    from imageio.backends.file import FileBackend
    path = write_sparse(tmp_path / "disk.raw", content)
    fd = os.open(str(path), os.O_RDONLY | (os.O_DIRECT if direct else 0))
    backend = FileBackend(fd, str(path), direct=direct, writable=False)
    try:
        out = []
        done = []
        compression.send(backend, AlignedBuffer(bufsize), 5,
                         len(content) - 10, out.append, done.append)
        assert decompress(b"".join(out)) == content[5:-5]
        assert sum(done) == len(content) - 10
    finally:
        backend.close()


def test_encoders_of_one_thread_never_share_a_compressor():
    # Compressors are reused per thread once an encoder is closed; two
    # encoders open at once, or one abandoned mid-stream, must still give
    # streams that decode to their own bytes.
    a_data, b_data = os.urandom(300 * 1024) * 3, b"xyz" * 200000
    a_out, b_out, c_out = [], [], []
    a = compression.Encoder(a_out.append, len(a_data))
    b = compression.Encoder(b_out.append, len(b_data))
    a.data(a_data[:400 * 1024])
    b.data(b_data)
    a.data(a_data[400 * 1024:])
    b.close()
    a.close()
    abandoned = compression.Encoder([].append, 1)
    abandoned.data(a_data)           # never closed: its compressor is lost
    c = compression.Encoder(c_out.append, len(a_data))
    c.data(a_data[:1000])            # small pieces: the streaming path
    c.data(a_data[1000:])
    c.close()
    assert decompress(b"".join(a_out)) == a_data
    assert decompress(b"".join(b_out)) == b_data
    assert decompress(b"".join(c_out)) == a_data
