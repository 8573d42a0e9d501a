"""GET /images/{id}/extents through the real daemon: ranges at odd offsets
checked against SEEK_DATA and qemu-img map, bad values, and a million
extents streamed while the daemon's memory stays flat."""

import errno
import http.client
import json
import os
import time

import pytest

from harness import nbdserver
from conftest import add, connect, connect_raw, new_ticket, request

KiB = 1024
MiB = 1024**2
GiB = 1024**3


def get_extents(con, ticket_id, query=""):
    resp, body = request(con, "GET", "/images/{}/extents{}".format(
        ticket_id, query))
    assert resp.status == 200, body
    return json.loads(body)


def seek_extents(path, start, end):
    """(start, length, zero) covering [start, end) from SEEK_DATA and
    SEEK_HOLE, merged: the reference, independent of the daemon."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = start
        while pos < end:
            try:
                data = min(os.lseek(fd, pos, os.SEEK_DATA), end)
            except OSError as e:
                assert e.errno == errno.ENXIO
                data = end
            if data > pos:
                out.append((pos, data - pos, True))
            if data < end:
                hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
                out.append((data, hole - data, False))
                data = hole
            pos = data
    finally:
        os.close(fd)
    merged = []
    for e in out:
        if merged and merged[-1][2] == e[2]:
            merged[-1] = (merged[-1][0], merged[-1][1] + e[1], e[2])
        else:
            merged.append(e)
    return merged


def cut(extents, start, end):
    """Dict extents limited to [start, end)."""
    out = []
    for e in extents:
        s, t = max(e["start"], start), min(e["start"] + e["length"], end)
        if s < t:
            out.append(dict(e, start=s, length=t - s))
    return out


# Odd pieces: unaligned starts and lengths, a piece inside one extent, one
# that ends past the image (clipped), an empty one, one past the end.
PIECES = [(0, None), (1, 4095), (4097, 3 * 8192 + 5), (8191, 2),
          (12345, 1 * MiB + 3), (5 * MiB - 7, 10 * MiB), (77, 0),
          (None, 4096)]


@pytest.fixture
def striped(tmp_path):
    """A 5 MiB - 3 file: 8 KiB data, 8 KiB hole, ..., and a data tail."""
    size = 5 * MiB - 3
    path = tmp_path / "striped.raw"
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(0, size - 16 * KiB, 16 * KiB):
            os.pwrite(f.fileno(), b"d" * 8 * KiB, i)
        os.pwrite(f.fileno(), b"t", size - 1)
    return path, size


def test_file_ranges_match_seek_data(daemon, service, striped):
    path, size = striped
    t = add(daemon, path, size, ops=["read"])
    con = connect(daemon, service)
    whole = get_extents(con, t["uuid"])
    assert [(e["start"], e["length"], e["zero"]) for e in whole] == \
        seek_extents(path, 0, size)
    for start, length in PIECES:
        query = "?"
        if start is not None:
            query += "start={}&".format(start)
        if length is not None:
            query += "length={}".format(length)
        got = get_extents(con, t["uuid"], query)
        s = start or 0
        end = size if length is None else min(s + length, size)
        assert [(e["start"], e["length"], e["zero"]) for e in got] == \
            seek_extents(path, s, end), (start, length)
        assert got == cut(whole, s, end)
    # Past the end: nothing, not an error.
    assert get_extents(con, t["uuid"], "?start={}".format(size + 1)) == []


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
def test_long_answer_streamed(daemon, tmp_path, version):
    # 8,192 extents, ~500 KB of JSON: past the size sent with
    # Content-Length.  HTTP/1.1 gets it chunked, HTTP/1.0 (no chunked
    # framing) until the connection closes.
    size = 64 * MiB
    path = tmp_path / "many.raw"
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(0, size, 16 * KiB):
            os.pwrite(f.fileno(), b"d" * 8 * KiB, i)
    t = add(daemon, path, size, ops=["read"])
    sock = connect_raw(daemon, "local")
    with sock:
        sock.sendall("GET /images/{}/extents {}\r\nHost: x\r\n\r\n".format(
            t["uuid"], version).encode())
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        assert resp.status == 200
        if version == "HTTP/1.1":
            assert resp.getheader("Transfer-Encoding") == "chunked"
        else:
            assert resp.getheader("Transfer-Encoding") is None
            assert resp.getheader("Connection") == "close"
        assert resp.getheader("Content-Length") is None
        got = json.loads(resp.read())
    assert [(e["start"], e["length"], e["zero"]) for e in got] == \
        seek_extents(path, 0, size)
    assert len(got) == 8192


def test_nbd_qcow2_ranges_match_qemu_img_map(daemon, service, tmp_path):
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    nbdserver.qemu_img("create", "-f", "qcow2", base, "16M")
    nbdserver.qemu_io(base, "qcow2", "write -P 1 0 3M", "write -P 3 9M 64k")
    nbdserver.qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2",
                       top)
    nbdserver.qemu_io(top, "qcow2", "write -P 2 1M 1M", "write -z 4M 1M",
                      "write -P 4 12M 192k")
    expected = []
    for e in nbdserver.qemu_img_map(top, "qcow2"):
        item = {"start": e["start"], "length": e["length"],
                "zero": e["zero"], "hole": not e["present"]}
        if expected and (expected[-1]["zero"], expected[-1]["hole"]) == \
                (item["zero"], item["hole"]):
            expected[-1]["length"] += item["length"]
        else:
            expected.append(item)
    with nbdserver.qemu_nbd(top, "qcow2", sock=tmp_path / "s.sock",
                            allocation_depth=True,
                            read_only=True).start() as s:
        t = daemon.add_ticket(new_ticket(s.url(), 16 * MiB, ops=["read"]))
        con = connect(daemon, service)
        assert get_extents(con, t["uuid"]) == expected
        for start, length in [(MiB - 1, 2 * MiB + 2), (3 * MiB + 511, 1),
                              (4 * MiB + 4097, 8 * MiB), (9 * MiB, 65535),
                              (15 * MiB + 1, 2 * MiB)]:
            got = get_extents(con, t["uuid"], "?start={}&length={}".format(
                start, length))
            assert got == cut(expected, start, start + length), \
                (start, length)


@pytest.mark.parametrize("query", [
    "?start=-1", "?start=abc", "?length=-5", "?length=1e3", "?start=",
    "?length=0x10", "?start=" + "9" * 30])
def test_bad_range_400(daemon, service, striped, query):
    path, size = striped
    t = add(daemon, path, size, ops=["read"])
    con = connect(daemon, service)
    resp, body = request(con, "GET", "/images/{}/extents{}".format(
        t["uuid"], query))
    assert resp.status == 400, body
    assert b"expected an integer" in body
    # The connection goes on.
    assert get_extents(con, t["uuid"], "?length=1") == [
        {"start": 0, "length": 1, "zero": False, "hole": False}]


def test_dirty_range(daemon, tmp_path):
    image = tmp_path / "disk.qcow2"
    nbdserver.qemu_img("create", "-f", "qcow2", image, "8M")
    nbdserver.qemu_io(image, "qcow2", "write -P 1 0 2M")
    nbdserver.qemu_img("bitmap", "--add", image, "b1")
    nbdserver.qemu_io(image, "qcow2", "write -P 2 1M 64k")
    with nbdserver.qemu_nbd(image, "qcow2", sock=tmp_path / "s.sock",
                            bitmap="b1", read_only=True).start() as s:
        t = daemon.add_ticket(new_ticket(s.url(), 8 * MiB, ops=["read"],
                                         dirty=True))
        con = connect(daemon, "local")
        got = get_extents(con, t["uuid"],
                          "?context=dirty&start={}&length={}".format(
                              MiB - 3, 64 * KiB + 6))
        assert got == [
            {"start": MiB - 3, "length": 3, "dirty": False, "zero": False},
            {"start": MiB, "length": 64 * KiB, "dirty": True,
             "zero": False},
            {"start": MiB + 64 * KiB, "length": 3, "dirty": False,
             "zero": False}]


def vm_hwm(pid):
    """Peak resident memory of ``pid`` in bytes."""
    with open("/proc/{}/status".format(pid)) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * KiB
    raise AssertionError("no VmHWM")


# An nbdkit sh plugin answering block status from a formula: 4 KiB runs,
# data then hole, without storing anything (nbdkit's extentlist filter
# takes minutes to load 500,000 lines).  mawk's %d stops at 2^31: %.0f.
STRIPES = """\
#!/bin/sh
case "$1" in
  get_size) echo {size} ;;
  pread) dd if=/dev/zero count=$3 iflag=count_bytes status=none ;;
  can_extents) exit 0 ;;
  extents) awk -v c=$3 -v o=$4 'BEGIN {{
      for (p = o - o % 4096; p < o + c; p += 4096)
          printf "%.0f 4096%s\\n", p, ((p / 4096) % 2 ? " hole,zero" : "") }}' ;;
  *) exit 2 ;;
esac
"""


def test_million_extents_streamed_flat_memory(make_daemon, tmp_path):
    # 1,000,000 extents of 4 KiB, about 62 MB of JSON.  ("hole" needs
    # qemu:allocation-depth, which nbdkit does not offer.)
    count = 1000000
    size = count * 4 * KiB
    script = tmp_path / "stripes.sh"
    script.write_text(STRIPES.format(size=size))
    script.chmod(0o755)
    d = make_daemon()
    started = time.monotonic()
    with nbdserver.nbdkit("sh", script, read_only=True,
                          sock=tmp_path / "s.sock").start() as s:
        t = d.add_ticket(new_ticket(s.url(), size, ops=["read"]))
        con = d.unix()
        # A small answer first: the backend is open, memory settled.
        assert len(get_extents(con, t["uuid"], "?length=8192")) == 2
        before = vm_hwm(d.proc.pid)
        con.request("GET", "/images/{}/extents".format(t["uuid"]))
        resp = con.getresponse()
        assert resp.status == 200
        assert resp.getheader("Transfer-Encoding") == "chunked"
        got = json.loads(resp.read())
        grown = vm_hwm(d.proc.pid) - before
    took = time.monotonic() - started
    assert len(got) == count
    for i in (0, 1, 2, count // 2, count - 1):
        assert got[i] == {"start": i * 4 * KiB, "length": 4 * KiB,
                          "zero": i % 2 == 1, "hole": False}
    assert sum(e["length"] for e in got) == size
    # The answer as one list in memory took over 400 MiB; batches take a
    # few MiB.
    assert grown < 48 * MiB, "daemon peak RSS grew {} MiB".format(
        grown // MiB)
    print("1,000,000 extents in {:.1f} s, daemon peak RSS +{:.1f} MiB"
          .format(took, grown / MiB))
