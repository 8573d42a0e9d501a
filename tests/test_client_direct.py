"""An upload reads the source file itself where ``qemu-img map`` places
its data (imageio.client.direct), and everything else through qemu-nbd:
compressed clusters, a backing file's data.  Real images made by qemu-img
and qemu-io, the real daemon, ``ovirt-img``; every result compared by
``qemu-img compare`` and verified by the client."""

import os
import re

import pytest

from imageio import errors
from imageio._io.buffer import AlignedBuffer
from imageio.client import direct

from test_client import MiB, SIZE, compare, file_ticket, ovirt_img, run, \
    write_pattern


def direct_bytes(stderr):
    m = re.search(r"Read (\d+) bytes from the source file directly", stderr)
    assert m, stderr
    return int(m.group(1))


def upload(daemon, tmp_path, source, *args):
    target, url = file_ticket(daemon, tmp_path)
    r = ovirt_img("upload", source, url, "--cafile", daemon.ca_file, "-v",
                  *args)
    assert r.returncode == 0, r.stderr
    assert "Verified:" in r.stderr
    return target, r.stderr


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_data_read_from_the_file(daemon, tmp_path, fmt):
    source = tmp_path / ("source." + fmt)
    run("qemu-img", "create", "-f", fmt, str(source), str(SIZE))
    write_pattern(source, fmt)
    target, err = upload(daemon, tmp_path, source)
    compare(source, target, fmt, "raw")
    # The pattern's data: 1 + 3 + 1 MiB; the zeroed range is not data.
    assert direct_bytes(err) == 5 * MiB
    # Nothing needed qemu-nbd: no connection was made (client.lazynbd).
    assert "Connected to nbd:" not in err


def test_compressed_clusters_through_qemu_nbd(daemon, tmp_path):
    # A qcow2 with compressed clusters beside plain ones: the map gives no
    # offset for a compressed one, so those come through qemu-nbd.
    plain = tmp_path / "plain.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(plain), str(SIZE))
    write_pattern(plain, "qcow2")
    source = tmp_path / "mixed.qcow2"
    run("qemu-img", "convert", "-c", "-f", "qcow2", "-O", "qcow2",
        str(plain), str(source))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 30M 2M", str(source))
    target, err = upload(daemon, tmp_path, source)
    compare(source, target, "qcow2", "raw")
    assert direct_bytes(err) == 2 * MiB
    assert "Connected to nbd:" in err


def test_backing_file_data_through_qemu_nbd(daemon, tmp_path):
    base = tmp_path / "base.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(base), str(SIZE))
    write_pattern(base, "qcow2")
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
        str(top))
    # Over the base's data and beside it.
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 10M 1M",
        "-c", "write -P 0x44 40M 2M", str(top))
    target, err = upload(daemon, tmp_path, top)
    compare(top, target, "qcow2", "raw")
    # 40M+2M is the top's alone; 10M+1M shares its request with the
    # base's 11M-13M, so that whole request comes through qemu-nbd.
    assert direct_bytes(err) == 2 * MiB


def test_source_cut_short_is_an_error_not_zeroes(tmp_path):
    # A source file that shrinks under the upload (someone else's write):
    # the read fails naming the file, never a short or zero-filled read.
    source = tmp_path / "source.raw"
    run("qemu-img", "create", "-f", "raw", str(source), str(SIZE))
    write_pattern(source, "raw")
    src = direct.DirectSource(str(source), "raw", SIZE)
    try:
        found = list(src.map())
        assert sum(n for _, n, _ in found) == SIZE
        assert src.covers(63 * MiB, MiB)
        assert not src.covers(20 * MiB, MiB)   # Zeroes: never read.
        buf = AlignedBuffer(4 * MiB)
        assert bytes(src.readinto(buf, 63 * MiB, MiB)) == b"\x11" * MiB
        os.truncate(source, 62 * MiB)
        with pytest.raises(errors.Error, match="source changed"):
            src.readinto(buf, 63 * MiB, MiB)
    finally:
        src.close()


def test_map_must_cover_the_image(tmp_path):
    # A map that ends before the size the upload was planned for (the
    # image shrank between qemu-img info and map) fails the plan.
    source = tmp_path / "source.raw"
    run("qemu-img", "create", "-f", "raw", str(source), str(SIZE))
    src = direct.DirectSource(str(source), "raw", SIZE + MiB)
    try:
        with pytest.raises(direct.MapError, match="covered"):
            list(src.map())
    finally:
        src.close()


def test_what_is_not_read_directly(tmp_path):
    raw = tmp_path / "a.raw"
    run("qemu-img", "create", "-f", "raw", str(raw), str(MiB))
    info = {"format": "raw"}
    assert direct.usable(str(raw), info)
    assert not direct.usable(str(raw), info, member="disk")
    assert not direct.usable("https://host/disk.raw", info)
    assert not direct.usable(str(raw), {"format": "vmdk"})
    assert not direct.usable(str(raw), {"format": "qcow2", "encrypted": True})
    assert not direct.usable(str(raw), {
        "format": "qcow2",
        "format-specific": {"data": {"data-file": "/elsewhere"}}})


def test_runs_past_the_cap_come_through_qemu_nbd(tmp_path, monkeypatch):
    # A map of more runs than MAX_RUNS (a qcow2 written in random order):
    # the runs past the cap are not placed, so their bytes are read
    # through qemu-nbd; the plan still has every extent.
    monkeypatch.setattr(direct, "MAX_RUNS", 2)
    source = tmp_path / "source.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(source), str(SIZE))
    # Written backwards: each cluster run lands after the next one's.
    run("qemu-io", "-f", "qcow2", "-c", "write -P 1 40M 1M",
        "-c", "write -P 2 20M 1M", "-c", "write -P 3 0 1M", str(source))
    src = direct.DirectSource(str(source), "qcow2", SIZE)
    try:
        found = list(src.map())
        assert sum(n for _, n, _ in found) == SIZE
        assert [s for s, n, z in found if not z] == [0, 20 * MiB, 40 * MiB]
        assert src.covers(0, MiB) and src.covers(20 * MiB, MiB)
        assert not src.covers(40 * MiB, MiB)
        src.reset()
        assert not src.covers(0, MiB)
    finally:
        src.close()


# Downloads: a new image laid out for the data (client.qcow2), written by
# the client itself (client.direct.DirectTarget).

def served_ticket(daemon, tmp_path, size, writes):
    from conftest import new_ticket
    from test_client import url_of
    served = tmp_path / "served.raw"
    run("qemu-img", "create", "-f", "raw", str(served), str(size))
    run("qemu-io", "-f", "raw", *[a for w in writes for a in ("-c", w)],
        str(served))
    t = new_ticket("file://" + str(served), size, ops=("read",))
    daemon.add_ticket(t)
    return served, url_of(daemon, t)


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_download_writes_the_data_itself(daemon, tmp_path, fmt):
    # Data at odd offsets and lengths (clusters shared by two extents,
    # the image's last partial cluster), a zeroed range and holes.
    size = 64 * MiB + 4608
    served, url = served_ticket(daemon, tmp_path, size, [
        "write -P 0x55 0 1M", "write -P 0x66 1M 4096",
        "write -P 0xaa 10M 3M", "write -P 0x11 12345 1000",
        "write -z 20M 1M", "write -P 0x22 64M 4608"])
    out = tmp_path / ("out." + fmt)
    r = ovirt_img("download", url, out, "--format", fmt, "--cafile",
                  daemon.ca_file, "-v")
    assert r.returncode == 0, r.stderr
    assert "directly" in r.stderr and "Verified:" in r.stderr
    compare(out, served, fmt, "raw")
    if fmt == "qcow2":
        check = run("qemu-img", "check", "--output=json", str(out))
        assert '"corruptions"' not in check.stdout or \
            '"corruptions": 0' in check.stdout, check.stdout
        # Only the data's clusters are allocated: holes stay holes.
        import json
        m = json.loads(run("qemu-img", "map", "--output=json",
                           str(out)).stdout)
        data = [(e["start"], e["length"]) for e in m if e["data"]]
        assert data == [(0, 1 * MiB + 64 * 1024), (10 * MiB, 3 * MiB),
                        (64 * MiB, 4608)]


def test_layout_with_several_refcount_blocks(tmp_path):
    # More than 32768 host clusters (2 GiB): the refcount blocks count
    # themselves; qemu-img check finds every cluster counted once.  The
    # data clusters are left unwritten (holes): nothing big is written.
    from imageio.client import qcow2
    path = tmp_path / "big.qcow2"
    extents = [(i * 512 * MiB, 256 * MiB) for i in range(12)]
    layout = qcow2.create(str(path), 8 * 1024**3, extents)
    assert layout.nblocks == 2
    r = run("qemu-img", "check", str(path), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No errors were found" in r.stdout
    import json
    m = json.loads(run("qemu-img", "map", "--output=json", str(path)).stdout)
    data = [(e["start"], e["length"]) for e in m if e["data"]]
    assert data == [(a, n) for a, n in extents]
    # Where qemu reads each run is where the layout says.
    placed = {e["start"]: e["offset"] for e in m if e["data"]}
    assert [placed[a] for a, _ in extents] == [h for _, _, h in layout.runs]
