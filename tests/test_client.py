"""ovirt-img and imageio.client against real daemons: this one (as a
process, real TLS) and, for upload/download/checksum, the established
ovirt-imageio 2.5.1; sources and targets through real qemu-nbd."""

import json
import os
import subprocess
import sys
import tarfile

import pytest

from conftest import new_ticket, wait_idle

MiB = 1024**2
SIZE = 64 * MiB
OVIRT_IMG = os.path.join(os.path.dirname(sys.executable), "ovirt-img")


def run(*args, check=True, timeout=120):
    return subprocess.run(list(args), capture_output=True, text=True,
                          check=check, timeout=timeout)


def ovirt_img(*args, timeout=120, env=None):
    return subprocess.run([OVIRT_IMG] + [str(a) for a in args],
                          capture_output=True, text=True, timeout=timeout,
                          env=env)


def write_pattern(path, fmt):
    """Data, an explicit zero range and holes, by qemu-io."""
    run("qemu-io", "-f", fmt,
        "-c", "write -P 0x55 0 1M",
        "-c", "write -P 0xaa 10M 3M",
        "-c", "write -z 20M 1M",
        "-c", "write -P 0x11 63M 1M", str(path))


@pytest.fixture
def qcow2(tmp_path):
    path = tmp_path / "source.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(path), str(SIZE))
    write_pattern(path, "qcow2")
    return path


def file_ticket(daemon, tmp_path, size=SIZE, name="target.raw", **kw):
    target = tmp_path / name
    with open(target, "wb") as f:
        f.truncate(size)
    t = new_ticket("file://" + str(target), size, sparse=True, **kw)
    daemon.add_ticket(t)
    return target, url_of(daemon, t)


def url_of(daemon, t):
    return "https://localhost:{}/images/{}".format(daemon.remote_port,
                                                   t["uuid"])


def allocated(path):
    return os.stat(path).st_blocks * 512


def compare(a, b, fa=None, fb=None):
    argv = ["qemu-img", "compare"]
    if fa:
        argv += ["-f", fa]
    if fb:
        argv += ["-F", fb]
    r = run(*(argv + [str(a), str(b)]), check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def json_lines(out):
    return [json.loads(line) for line in out.splitlines() if line.strip()]


# Formats, byte for byte.

def make_source(kind, tmp_path, qcow2):
    if kind == "raw":
        path = tmp_path / "source.raw"
        run("qemu-img", "convert", "-O", "raw", str(qcow2), str(path))
        return path, None
    if kind == "qcow2":
        return qcow2, None
    if kind == "compressed-qcow2":
        path = tmp_path / "source-c.qcow2"
        run("qemu-img", "convert", "-c", "-O", "qcow2", str(qcow2), str(path))
        return path, None
    if kind == "vmdk":
        path = tmp_path / "source.vmdk"
        run("qemu-img", "convert", "-O", "vmdk", str(qcow2), str(path))
        return path, None
    if kind == "backing-chain":
        top = tmp_path / "top.qcow2"
        run("qemu-img", "create", "-f", "qcow2", "-b", str(qcow2), "-F",
            "qcow2", str(top))
        run("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 30M 2M",
            "-c", "write -z 10M 1M", str(top))
        return top, None
    if kind == "ova":
        ova = tmp_path / "vm.ova"
        with tarfile.open(ova, "w") as tar:
            tar.add(str(qcow2), arcname="disk1.qcow2")
        return ova, "disk1.qcow2"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["raw", "qcow2", "compressed-qcow2",
                                  "vmdk", "backing-chain", "ova"])
def test_upload_formats(daemon, tmp_path, qcow2, kind):
    source, member = make_source(kind, tmp_path, qcow2)
    target, url = file_ticket(daemon, tmp_path)
    args = ["upload", source, url, "--cafile", daemon.ca_file, "-o", "json"]
    if member:
        args += ["--member", member]
    r = ovirt_img(*args)
    assert r.returncode == 0, r.stderr
    last = json_lines(r.stdout)[-1]
    assert last["transferred"] == last["size"] == SIZE
    if member:
        from imageio import client
        expected = tmp_path / "expected.raw"
        run("qemu-img", "convert", "-O", "raw", str(qcow2), str(expected))
        compare(expected, target, "raw", "raw")
        assert client.info(str(source), member)["format"] == "qcow2"
    else:
        compare(source, target, None, "raw")
    # Holes stay holes: 5 MiB of data (+ the 2 MiB of the chain's top).
    assert allocated(target) <= 8 * MiB


def test_upload_download_roundtrip_holes(daemon, tmp_path, qcow2):
    target, url = file_ticket(daemon, tmp_path)
    r = ovirt_img("upload", qcow2, url, "--cafile", daemon.ca_file)
    assert r.returncode == 0, r.stderr
    for fmt in ("qcow2", "raw"):
        out = tmp_path / ("download." + fmt)
        r = ovirt_img("download", url, out, "--format", fmt, "--cafile",
                      daemon.ca_file, "-o", "json")
        assert r.returncode == 0, r.stderr
        assert json_lines(r.stdout)[-1]["transferred"] == SIZE
        compare(qcow2, out, "qcow2", fmt)
        info = json.loads(run("qemu-img", "info", "--output", "json",
                              str(out)).stdout)
        assert info["format"] == fmt
        # Only the 5 MiB of data were written.
        assert allocated(out) <= 7 * MiB, fmt


def test_upload_uses_unix_socket_and_workers(daemon, tmp_path, qcow2):
    target, url = file_ticket(daemon, tmp_path)
    r = ovirt_img("upload", qcow2, url, "--cafile", daemon.ca_file,
                  "--max-workers", "4", "-v")
    assert r.returncode == 0, r.stderr
    assert "Using the remote daemon's local socket" in r.stderr
    compare(qcow2, target, "qcow2", "raw")


def test_checksum_local_and_remote_agree(daemon, tmp_path, qcow2):
    from imageio import client
    target, url = file_ticket(daemon, tmp_path)
    assert ovirt_img("upload", qcow2, url, "--insecure").returncode == 0
    local = json.loads(ovirt_img("checksum", qcow2).stdout)
    remote = json.loads(ovirt_img("checksum", url, "--cafile",
                                  daemon.ca_file).stdout)
    assert local == remote
    assert client.checksum(str(qcow2)) == local
    info = json.loads(ovirt_img("info", url, "--cafile",
                                daemon.ca_file).stdout)
    assert info["size"] == SIZE
    assert info["extents"]["data"] + info["extents"]["zero"] == SIZE


def test_verification_hashes_xxh3_as_the_data_moves(daemon, tmp_path,
                                                   qcow2):
    # This daemon lists xxh3_128 in /checksum/algorithms: the digest the
    # client logs as verified is the daemon's xxh3_128 block hash, for an
    # upload and for a download of the same image, and the output names
    # the algorithm.
    from imageio.backends.http import HTTPBackend
    target, url = file_ticket(daemon, tmp_path)
    r = ovirt_img("upload", qcow2, url, "--cafile", daemon.ca_file, "-v",
                  "-o", "json")
    assert r.returncode == 0, r.stderr
    assert json_lines(r.stdout)[-1]["phase"] == \
        "upload completed, verified (xxh3_128)"
    http = HTTPBackend(url, cafile=daemon.ca_file)
    try:
        assert "xxh3_128" in http.checksum_algorithms()
        remote = http.checksum("xxh3_128", 4 * MiB)["checksum"]
    finally:
        http.close()
    assert "Verified: xxh3_128 checksum {}".format(remote) in r.stderr
    out = tmp_path / "back.qcow2"
    r = ovirt_img("download", url, str(out), "--cafile", daemon.ca_file,
                  "-v", "-o", "json")
    assert r.returncode == 0, r.stderr
    assert "Verified: xxh3_128 checksum {}".format(remote) in r.stderr
    assert json_lines(r.stdout)[-1]["phase"] == \
        "download completed, verified (xxh3_128)"
    compare(qcow2, out)


@pytest.mark.parametrize("algorithm", ["xxh3_128", "blake3", "sha256",
                                       "blake2b"])
def test_checksum_algorithm_local_and_remote(daemon, tmp_path, qcow2,
                                             algorithm):
    target, url = file_ticket(daemon, tmp_path)
    assert ovirt_img("upload", qcow2, url, "--insecure").returncode == 0
    local = json.loads(ovirt_img("checksum", qcow2, "--algorithm",
                                 algorithm).stdout)
    remote = json.loads(ovirt_img("checksum", url, "--algorithm",
                                  algorithm, "--cafile",
                                  daemon.ca_file).stdout)
    assert local == remote
    assert local["algorithm"] == algorithm
    r = ovirt_img("checksum", qcow2, "--algorithm", "nope")
    assert_error(r, "Unsupported checksum algorithm")


def test_private_qemu_nbd_keeps_request_buffers_in_the_heap(tmp_path,
                                                            qcow2):
    # The caller's GLIBC_TUNABLES are kept, the malloc thresholds added.
    # (glibc splits the variable in place at start, so /proc shows each
    # tunable after a NUL.)
    from imageio.client import qemu
    os.environ["GLIBC_TUNABLES"] = "glibc.malloc.arena_max=2"
    try:
        with qemu.serve(str(qcow2), "qcow2") as url:
            sock = url[len("nbd:unix:"):].encode()
            environ = None
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open("/proc/{}/cmdline".format(pid), "rb") as f:
                        argv = f.read().split(b"\0")
                    if argv[0].endswith(b"qemu-nbd") and sock in argv:
                        with open("/proc/{}/environ".format(pid), "rb") as f:
                            environ = f.read()
                except OSError:
                    continue
    finally:
        del os.environ["GLIBC_TUNABLES"]
    assert environ is not None
    for tunable in ["glibc.malloc.arena_max=2"] + \
            qemu.MALLOC_TUNABLES.split(":"):
        assert tunable.encode() in environ


def test_client_import_leaves_out_metrics_and_compression():
    # What only the daemon (metrics) or an encoder (zstandard) needs is
    # not imported by the client: a third of its start-up.
    r = run(sys.executable, "-c",
            "import sys, imageio.client.cli; "
            "print(' '.join(m for m in ('prometheus_client', 'zstandard') "
            "if m in sys.modules))")
    assert r.stdout.strip() == ""


def test_incremental_download_of_dirty_bitmap(daemon, tmp_path):
    base = tmp_path / "base.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(base), str(SIZE))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x01 0 8M", str(base))
    # Backup of the base, then a bitmap tracks what changes after it.
    backup_base = tmp_path / "backup-base.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", str(base), str(backup_base))
    run("qemu-img", "bitmap", "--add", str(base), "b1")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x02 4M 1M",
        "-c", "write -z 6M 1M", "-c", "write -P 0x03 40M 2M", str(base))
    from harness.nbdserver import qemu_nbd
    sock = tmp_path / "nbd.sock"
    with qemu_nbd(str(base), fmt="qcow2", sock=sock, read_only=True,
                  bitmap="b1", allocation_depth=True).start():
        t = new_ticket("nbd:unix:" + str(sock), SIZE, ops=("read",),
                       dirty=True)
        daemon.add_ticket(t)
        url = url_of(daemon, t)
        out = tmp_path / "incr.qcow2"
        r = ovirt_img("download", url, out, "--incremental",
                      "--backing-file", backup_base, "--backing-format",
                      "qcow2", "--cafile", daemon.ca_file, "-o", "json")
        assert r.returncode == 0, r.stderr
        assert json_lines(r.stdout)[-1]["transferred"] == SIZE
    compare(base, out, "qcow2", "qcow2")
    # Only the dirty 4 MiB (and a zero cluster range) live in the top.
    m = json.loads(run("qemu-img", "map", "--output", "json",
                       str(out)).stdout)
    top_data = sum(e["length"] for e in m if e["depth"] == 0 and e["data"])
    assert top_data == 3 * MiB


# Verification and resume.

VERIFY_ALGORITHMS = [None, "xxh3_128", "blake3", "sha256", "blake2b"]


def algorithm_args(algorithm):
    return [] if algorithm is None else ["--algorithm", algorithm]


@pytest.mark.parametrize("algorithm", VERIFY_ALGORITHMS)
def test_verification_catches_target_that_loses_writes(daemon, tmp_path,
                                                       qcow2, algorithm):
    # An NBD target that accepts every write and keeps none: the daemon
    # answers 200 to each PUT, the checksums differ.
    from harness.nbdserver import nbdkit
    sock = tmp_path / "lossy.sock"
    server = nbdkit("null", "size={}".format(SIZE), sock=sock)
    with server.start():
        t = new_ticket("nbd:unix:" + str(sock), SIZE)
        daemon.add_ticket(t)
        r = ovirt_img("upload", qcow2, url_of(daemon, t), "--cafile",
                      daemon.ca_file, "-o", "json",
                      *algorithm_args(algorithm))
    assert r.returncode == 1
    line = r.stderr.strip().splitlines()[-1]
    assert "Verification failed" in line
    assert "local image {} checksum".format(algorithm or "xxh3_128") in line
    digests = [w.strip(",.'") for w in line.split() if len(w.strip(",.'"))
               in (32, 64)]
    assert len(digests) == 2 and digests[0] != digests[1]
    assert "completed" not in r.stdout


def test_verification_fails_upload_at_the_first_bad_window(daemon,
                                                          tmp_path):
    # A 256 MiB image is verified in 64 MiB windows, each read back from
    # the daemon as soon as it is written: a target that keeps no write
    # fails the upload naming the first block that differs (its block
    # hash, both sides), not only the whole image's digests.
    from harness.nbdserver import nbdkit
    size = 256 * MiB
    source = tmp_path / "source.raw"
    run("qemu-img", "create", "-f", "raw", str(source), str(size))
    run("qemu-io", "-f", "raw", "-c", "write -P 0x55 0 1M",
        "-c", "write -P 0x11 255M 1M", str(source))
    sock = tmp_path / "lossy.sock"
    with nbdkit("null", "size={}".format(size), sock=sock).start():
        t = new_ticket("nbd:unix:" + str(sock), size)
        daemon.add_ticket(t)
        r = ovirt_img("upload", source, url_of(daemon, t), "--cafile",
                      daemon.ca_file, "-o", "json")
    assert r.returncode == 1
    line = r.stderr.strip().splitlines()[-1]
    assert "Verification failed" in line
    assert "of bytes 0-{} differs".format(4 * MiB - 1) in line
    digests = [w.strip(",.'") for w in line.split() if len(w.strip(",.'"))
               in (32, 64)]
    assert len(digests) == 2 and digests[0] != digests[1]
    assert "completed" not in r.stdout


@pytest.fixture(scope="module")
def tls_only_daemon(tmp_path_factory):
    """A daemon without its local service: the client crosses TLS, as from
    another host, and its read-back goes through Python's TLS reads."""
    from harness.daemonproc import Daemon
    d = Daemon(tmp_path_factory.mktemp("tls-daemon"),
               "[local]\nenable = false\n").start()
    yield d
    d.stop()


def test_verification_over_tls_compressed_and_lossy(tls_only_daemon,
                                                    tmp_path, qcow2):
    # Over TLS (zstd-coded too), the windowed read-back verifies a good
    # upload with the daemon's own checksum and fails a target that drops
    # writes at its first block.
    from harness.nbdserver import nbdkit
    from imageio.backends.http import HTTPBackend
    d = tls_only_daemon
    target, url = file_ticket(d, tmp_path)
    r = ovirt_img("upload", qcow2, url, "--cafile", d.ca_file,
                  "--compress", "-v")
    assert r.returncode == 0, r.stderr
    assert "local socket" not in r.stderr
    http = HTTPBackend(url, cafile=d.ca_file)
    try:
        remote = http.checksum("xxh3_128", 4 * MiB)["checksum"]
    finally:
        http.close()
    assert "Verified: xxh3_128 checksum {}".format(remote) in r.stderr
    compare(qcow2, target, "qcow2", "raw")
    sock = tmp_path / "lossy.sock"
    with nbdkit("null", "size={}".format(SIZE), sock=sock).start():
        t = new_ticket("nbd:unix:" + str(sock), SIZE)
        d.add_ticket(t)
        r = ovirt_img("upload", qcow2, url_of(d, t), "--cafile",
                      d.ca_file, "--compress")
    assert r.returncode == 1
    assert "of bytes 0-{} differs".format(4 * MiB - 1) in r.stderr


@pytest.mark.parametrize("path", ["direct", "qemu-nbd"])
def test_download_verification_reads_back_the_local_image(
        daemon, tmp_path, monkeypatch, path):
    # The local image keeps no write: every byte received was right, the
    # image is not, and the download fails.  A new image is written by the
    # client itself (client.direct.DirectTarget, its writes dropped here);
    # one over a backing file through qemu-nbd (replaced by nbdkit's null
    # plugin).
    import contextlib
    from harness.nbdserver import nbdkit
    from imageio import client
    from imageio.client import direct, qemu, verify
    served = tmp_path / "served.raw"
    run("qemu-img", "create", "-f", "raw", str(served), str(SIZE))
    write_pattern(served, "raw")
    t = new_ticket("file://" + str(served), SIZE, ops=("read",))
    daemon.add_ticket(t)
    kw = {}
    if path == "direct":
        monkeypatch.setattr(direct.DirectTarget, "write",
                            lambda self, data, offset: None)
    else:
        base = tmp_path / "base.qcow2"
        run("qemu-img", "create", "-f", "qcow2", str(base), str(SIZE))
        kw = {"backing_file": str(base), "backing_format": "qcow2"}
        real_start = qemu.start

        @contextlib.contextmanager
        def lossy(filename, fmt=None, read_only=True, **kw):
            if read_only:
                # Not the download's target.
                with real_start(filename, fmt, read_only, **kw) as served:
                    yield served
                return
            sock = tmp_path / "local.sock"
            with nbdkit("null", "size={}".format(SIZE), sock=sock).start():
                yield "nbd:unix:" + str(sock), lambda: None

        monkeypatch.setattr(qemu, "start", lossy)
    with pytest.raises(verify.VerifyError) as e:
        client.download(url_of(daemon, t), str(tmp_path / "out.qcow2"),
                        daemon.ca_file, verify=True, **kw)
    assert "Verification failed" in str(e.value)


@pytest.mark.parametrize("algorithm", VERIFY_ALGORITHMS)
def test_verification_catches_target_changed_behind_the_transfer(
        daemon, tmp_path, algorithm):
    # Another writer changes the target after the client's writes, while
    # the daemon reads it back (its reads held 2 s; only verification
    # reads the target): every PUT was answered 200, the checksums
    # differ.
    import time
    source = tmp_path / "source.raw"
    run("qemu-img", "create", "-f", "raw", str(source), str(SIZE))
    run("qemu-io", "-f", "raw", "-c", "write -P 0x33 0 8M", str(source))
    from harness.nbdserver import nbdkit
    sock = tmp_path / "target.sock"
    disk = tmp_path / "target.raw"
    with open(disk, "wb") as f:
        f.truncate(SIZE)
    ops = tmp_path / "ops.log"
    server = nbdkit("file", str(disk), sock=sock, filters=["log", "delay"])
    server.argv += ["rdelay=2", "logfile={}".format(ops)]
    with server.start():
        t = new_ticket("nbd:unix:" + str(sock), SIZE, sparse=True)
        daemon.add_ticket(t)
        proc = subprocess.Popen(
            [OVIRT_IMG, "upload", str(source), url_of(daemon, t),
             "--cafile", daemon.ca_file, "-o", "json"] +
            algorithm_args(algorithm), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while " Read " not in (ops.read_text() if ops.exists() else ""):
            assert time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.02)
        with open(disk, "r+b") as f:
            f.seek(MiB)
            f.write(b"\x99" * 4096)
            f.flush()
            os.fsync(f.fileno())
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert_error(subprocess.CompletedProcess([], 1, out, err),
                 "Verification failed")
    assert "completed" not in out


def test_resume_after_sigkill_sends_only_the_rest(daemon, tmp_path):
    import signal
    source, disk, writes, server, state, env = slow_upload(tmp_path)
    with server.start():
        t = new_ticket(server.url(form="legacy"), SIZE)
        daemon.add_ticket(t)
        url = url_of(daemon, t)
        argv = [OVIRT_IMG, "upload", str(source), url, "--cafile",
                daemon.ca_file, "--max-workers", "1", "-o", "json"]
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        journals = wait_journal(state, 3)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # Its private qemu-nbd dies with it.
        assert wait_gone(str(source))
        confirmed = journal_items(journals[0])
        assert 3 <= len(confirmed) < SIZE // (8 * MiB)
        # The daemon ends the killed client's PUT first.
        wait_idle(daemon, t["uuid"])
        mark = len(writes.read_text())
        r = subprocess.run(argv + ["--resume"], env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    # The NBD server's own log: the second run wrote exactly what the
    # journal did not confirm.
    second = written(writes.read_text()[mark:])
    sent = sum(n for _, n in confirmed)
    assert second == SIZE - sent
    compare(source, disk, "raw", "raw")
    assert not list((state / "imageio").glob("*.journal"))


def slow_upload(tmp_path):
    """A 64 MiB source and a target behind nbdkit whose writes each wait
    200 ms (so a kill lands mid-transfer), logging every request; the
    client's journal under a state directory of the test's own.  Returns
    (source, target, log, server (not started), state, env)."""
    source = tmp_path / "source.raw"
    run("qemu-img", "create", "-f", "raw", str(source), str(SIZE))
    run("qemu-io", "-f", "raw", "-c", "write -P 0x33 0 64M", str(source))
    from harness.nbdserver import nbdkit
    disk = tmp_path / "target.raw"
    with open(disk, "wb") as f:
        f.truncate(SIZE)
    log = tmp_path / "ops.log"
    server = nbdkit("file", str(disk), sock=tmp_path / "slow.sock",
                    filters=["log", "delay"])
    server.argv += ["wdelay=200ms", "logfile={}".format(log)]
    state = tmp_path / "state"
    return source, disk, log, server, state, dict(
        os.environ, XDG_STATE_HOME=str(state))


def wait_journal(state, items, timeout=60):
    """The journals under ``state`` once the first holds ``items``."""
    import time
    journal_dir = state / "imageio"
    deadline = time.monotonic() + timeout
    journals = []
    while time.monotonic() < deadline:
        journals = list(journal_dir.glob("*.journal")) \
            if journal_dir.exists() else []
        if journals and len(journal_items(journals[0])) >= items:
            break
        time.sleep(0.05)
    return journals


def journal_items(path):
    """(start, length) of a journal's items (its first line names the
    source)."""
    return [tuple(map(int, line.split()))
            for line in path.read_text().splitlines()[1:]
            if len(line.split()) == 2]


def test_resume_refused_when_the_source_changed(daemon, tmp_path):
    import signal
    source, disk, ops, server, state, env = slow_upload(tmp_path)
    with server.start():
        t = new_ticket(server.url(form="legacy"), SIZE)
        daemon.add_ticket(t)
        argv = [OVIRT_IMG, "upload", str(source), url_of(daemon, t),
                "--cafile", daemon.ca_file, "--max-workers", "1",
                "--no-verify", "-o", "json"]
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        journals = wait_journal(state, 2)
        # Every journaled request was flushed before it was journaled:
        # the target's log, read after the journal and before the kill
        # (the daemon may flush when the client's connections close), has
        # a flush after the writes of those bytes.
        confirmed = sum(n for _, n in journal_items(journals[0]))
        log = ops.read_text()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert wait_gone(str(source))
        wait_idle(daemon, t["uuid"])
        assert " Flush " in log, log[-2000:]
        flushed = written(log[:log.rindex(" Flush ")])
        assert flushed >= confirmed > 0
        # The source changes between the runs, same size.
        run("qemu-io", "-f", "raw", "-c", "write -P 0x44 0 64M",
            str(source))
        r = subprocess.run(argv + ["--resume"], env=env,
                           capture_output=True, text=True, timeout=120)
        assert_error(r, "Cannot resume", "changed", "without --resume")
        # Run again from the start: the target is the new source.
        r = subprocess.run(argv, env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
    compare(source, disk, "raw", "raw")


def test_download_never_overwrites_an_existing_file(daemon, tmp_path,
                                                     qcow2):
    target, url = file_ticket(daemon, tmp_path)
    assert ovirt_img("upload", qcow2, url, "--insecure").returncode == 0
    out = tmp_path / "precious.qcow2"
    out.write_bytes(b"precious")
    assert_error(ovirt_img("download", url, out, "--cafile",
                           daemon.ca_file), "exists", "--overwrite")
    assert out.read_bytes() == b"precious"
    # --resume without a journal of an interrupted download into it: the
    # same.
    assert_error(ovirt_img("download", url, out, "--cafile",
                           daemon.ca_file, "--resume"), "exists")
    assert out.read_bytes() == b"precious"
    r = ovirt_img("download", url, out, "--cafile", daemon.ca_file,
                  "--overwrite")
    assert r.returncode == 0, r.stderr
    compare(qcow2, out, "qcow2", "qcow2")


def wait_gone(arg, timeout=10):
    """Wait until no process has ``arg`` on its command line."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = False
        for pid in os.listdir("/proc"):
            try:
                with open("/proc/{}/cmdline".format(pid), "rb") as f:
                    if arg.encode() in f.read().split(b"\0"):
                        found = True
                        break
            except (OSError, ValueError):
                continue
        if not found:
            return True
        time.sleep(0.1)
    return False


def written(log_text):
    """Bytes written according to nbdkit's log filter."""
    total = 0
    for line in log_text.splitlines():
        if " Write id=" in line and "count=" in line:
            total += int(line.split("count=")[1].split()[0], 0)
    return total


# Errors a user can act on: exit 1, one line on stderr.

def assert_error(r, *words):
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_error_unreachable_daemon(tmp_path, qcow2):
    from harness.net import free_port
    url = "https://localhost:{}/images/x".format(free_port())
    assert_error(ovirt_img("upload", qcow2, url, "--insecure"),
                 "Cannot reach", "localhost")


def test_error_expired_ticket(daemon, tmp_path, qcow2):
    url = "https://localhost:{}/images/no-such-ticket".format(
        daemon.remote_port)
    assert_error(ovirt_img("upload", qcow2, url, "--cafile",
                           daemon.ca_file), "No such ticket")


def test_error_wrong_ca(daemon, tmp_path, qcow2):
    from bench import tls
    _, other_ca = tls.make_cert(str(tmp_path / "other"))
    target, url = file_ticket(daemon, tmp_path)
    assert_error(ovirt_img("upload", qcow2, url, "--cafile", other_ca),
                 "Cannot verify", "--cafile")


def test_error_unreadable_file(daemon, tmp_path):
    target, url = file_ticket(daemon, tmp_path)
    assert_error(ovirt_img("upload", tmp_path / "missing.qcow2", url,
                           "--insecure"), "missing.qcow2")
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + bytes(1020))
    assert_error(ovirt_img("upload", bad, url, "--insecure"))


def test_error_target_too_small(daemon, tmp_path, qcow2):
    target, url = file_ticket(daemon, tmp_path, size=SIZE // 2)
    assert_error(ovirt_img("upload", qcow2, url, "--insecure"),
                 "too small")
    assert allocated(target) == 0


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_error_full_disk_on_download(daemon, tmp_path, qcow2, fmt):
    # The client writes the new image itself (client.direct): the full
    # disk is its own write's error, said once, not retried.
    target, url = file_ticket(daemon, tmp_path)
    assert ovirt_img("upload", qcow2, url, "--insecure").returncode == 0
    mnt = tmp_path / "small"
    mnt.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt))
    try:
        r = ovirt_img("download", url, mnt / ("out." + fmt), "--format",
                      fmt, "--insecure")
        assert_error(r)
        assert "space" in r.stderr.lower(), r.stderr
        assert "retrying" not in r.stderr, r.stderr
    finally:
        run("umount", str(mnt))


def test_error_daemon_dies_mid_transfer(make_daemon, tmp_path):
    d = make_daemon()
    source = tmp_path / "source.raw"
    run("qemu-img", "create", "-f", "raw", str(source), str(SIZE))
    run("qemu-io", "-f", "raw", "-c", "write -P 0x33 0 64M", str(source))
    from harness.nbdserver import nbdkit
    sock = tmp_path / "slow.sock"
    server = nbdkit("memory", str(SIZE), sock=sock, filters=["delay"])
    server.argv += ["wdelay=200ms"]
    with server.start():
        t = new_ticket("nbd:unix:" + str(sock), SIZE)
        d.add_ticket(t)
        # One worker, 32 delayed writes: about 6 seconds.
        proc = subprocess.Popen(
            [OVIRT_IMG, "upload", str(source), url_of(d, t), "--cafile",
             d.ca_file, "--max-workers", "1", "-o", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # Kill the daemon once data moves.
        while True:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            if json.loads(line)["transferred"] > 0:
                break
        d.proc.kill()
        rest, err = proc.communicate(timeout=60)
        out = line + rest
    assert proc.returncode == 1, err
    assert len(err.strip().splitlines()) == 1, err
    assert "failed during" in err or "Cannot reach" in err, err
    assert "completed" not in out


# The established daemon (ovirt-imageio 2.5.1) as the server.

@pytest.fixture(scope="module")
def established(tmp_path_factory):
    from bench import peers, tls
    work = str(tmp_path_factory.mktemp("established"))
    key, cert = tls.make_cert(work)
    d = peers.Daemon("established", work, key, cert)
    d.start()
    yield d, cert
    d.stop()


def test_established_daemon_upload_download_checksum(established, tmp_path,
                                                     qcow2):
    d, cert = established
    target = tmp_path / "target.raw"
    with open(target, "wb") as f:
        f.truncate(SIZE)
    d.add_ticket("t", str(target), size=SIZE, ops=("read", "write"),
                 sparse=True)
    url = "https://127.0.0.1:{}{}".format(d.https[1], d.path("t"))
    r = ovirt_img("upload", qcow2, url, "--cafile", cert, "-o", "json",
                  "-v")
    assert r.returncode == 0, r.stderr
    assert json_lines(r.stdout)[-1]["transferred"] == SIZE
    # It offers sha256, not blake3: verification falls back.
    assert "Verified: sha256 checksum" in r.stderr, r.stderr
    assert json_lines(r.stdout)[-1]["phase"] == \
        "upload completed, verified (sha256)"
    r = ovirt_img("upload", qcow2, url, "--cafile", cert, "--algorithm",
                  "blake3")
    assert_error(r, "does not offer", "blake3")
    compare(qcow2, target, "qcow2", "raw")
    out = tmp_path / "download.qcow2"
    r = ovirt_img("download", url, out, "--cafile", cert)
    assert r.returncode == 0, r.stderr
    compare(qcow2, out, "qcow2", "qcow2")
    remote = json.loads(ovirt_img("checksum", url, "--cafile", cert).stdout)
    assert remote == json.loads(ovirt_img("checksum", qcow2).stdout)
    remote = json.loads(ovirt_img("checksum", url, "--cafile", cert,
                                  "--algorithm", "sha256").stdout)
    assert remote == json.loads(ovirt_img("checksum", qcow2, "--algorithm",
                                          "sha256").stdout)


# A script written for the established client, the import changed.

EXAMPLE = '''
import sys
from imageio import client

op, url, path, cafile = sys.argv[1:5]
if op == "upload":
    with client.ProgressBar(format="json", output=sys.stdout) as pb:
        client.upload(path, url, cafile, progress=pb, max_workers=2)
elif op == "download":
    client.download(url, path, cafile, fmt="qcow2")
else:
    with client.ImageioClient(url, cafile=cafile) as c:
        size = c.size()
        extents = list(c.extents())
        assert sum(e.length for e in extents) == size
        buf = bytearray(4096)
        c.read(10 * 1024**2, buf)
        assert buf == b"\\xaa" * 4096
        c.write(0, b"\\x99" * 4096)
        c.zero(4096, 4096)
        c.flush()
    print(client.checksum(path)["checksum"])
    print(client.info(path)["format"], client.measure(path, "qcow2")["required"] > 0)
    print(len(list(client.extents(path))))
'''


def test_established_style_script(daemon, tmp_path, qcow2):
    script = tmp_path / "example.py"
    script.write_text(EXAMPLE)
    target, url = file_ticket(daemon, tmp_path)
    for op, path in (("upload", qcow2), ("download", tmp_path / "d.qcow2"),
                     ("client", qcow2)):
        r = run(sys.executable, str(script), op, url, str(path),
                daemon.ca_file, check=False)
        assert r.returncode == 0, r.stderr
    compare(qcow2, tmp_path / "d.qcow2", "qcow2", "qcow2")
    data = target.read_bytes()
    assert data[:4096] == b"\x99" * 4096
    assert data[4096:8192] == bytes(4096)


# Data safety (issue 22).

def test_download_with_backing_file_writes_remote_zeroes(daemon, tmp_path,
                                                         qcow2):
    # A full (not incremental) download on top of BASE: where the remote
    # reads zero, BASE has data.  The new image must read as the remote
    # does, not show BASE through holes (the hasher was fed zeroes, so
    # verification passed over the mix).
    target, url = file_ticket(daemon, tmp_path)
    assert ovirt_img("upload", qcow2, url, "--insecure").returncode == 0
    base = tmp_path / "base.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(base), str(SIZE))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0xee 0 64M", str(base))
    out = tmp_path / "out.qcow2"
    r = ovirt_img("download", url, out, "--backing-file", base,
                  "--backing-format", "qcow2", "--cafile", daemon.ca_file)
    assert r.returncode == 0, r.stderr
    compare(target, out, "raw", "qcow2")


def guest_raw_with_qcow2_header(tmp_path):
    """A raw guest disk whose guest wrote a qcow2 header naming a host
    file as its backing file."""
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"HOST-SECRET-" * 4096)
    disk = tmp_path / "guest.raw"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(secret), "-F",
        "raw", str(disk), str(SIZE))
    with open(disk, "r+b") as f:
        f.truncate(SIZE)
    return disk, secret


def test_upload_format_raw_never_follows_a_backing_file(daemon, tmp_path):
    from imageio import client
    disk, secret = guest_raw_with_qcow2_header(tmp_path)
    target, url = file_ticket(daemon, tmp_path)
    r = ovirt_img("upload", disk, url, "--format", "raw", "--cafile",
                  daemon.ca_file, "-v")
    assert r.returncode == 0, r.stderr
    assert "format raw (given)" in r.stderr, r.stderr
    assert target.read_bytes() == disk.read_bytes()
    assert b"HOST-SECRET" not in target.read_bytes()
    # The library, the same.
    target2, url2 = file_ticket(daemon, tmp_path, name="target2.raw")
    client.upload(str(disk), url2, daemon.ca_file, fmt="raw")
    assert target2.read_bytes() == disk.read_bytes()


def test_upload_probed_format_is_logged(daemon, tmp_path, qcow2):
    target, url = file_ticket(daemon, tmp_path)
    r = ovirt_img("upload", qcow2, url, "--cafile", daemon.ca_file, "-v")
    assert r.returncode == 0, r.stderr
    assert "format qcow2 (probed)" in r.stderr, r.stderr


def test_error_full_disk_on_upload_shows_the_daemon_message(daemon,
                                                            tmp_path):
    # The daemon's filesystem fills up: it answers 507 with its message,
    # which the client's one line must carry.
    source = tmp_path / "source.raw"
    run("qemu-img", "create", "-f", "raw", str(source), str(SIZE))
    run("qemu-io", "-f", "raw", "-c", "write -P 0x33 0 64M", str(source))
    mnt = tmp_path / "small"
    mnt.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt))
    try:
        target = mnt / "disk.raw"
        with open(target, "wb") as f:
            f.truncate(SIZE)
        t = new_ticket("file://" + str(target), SIZE, sparse=True)
        daemon.add_ticket(t)
        r = ovirt_img("upload", source, url_of(daemon, t), "--cafile",
                      daemon.ca_file)
        assert_error(r, "No space left on device")
        wait_idle(daemon, t["uuid"])
    finally:
        run("umount", "-l", str(mnt))


# A source given as an http:// URL, read by qemu's curl driver from a real
# HTTP server (nginx: python's http.server answers no Range requests,
# which the curl driver needs).

@pytest.fixture
def web(tmp_path):
    from harness.net import free_port
    root = tmp_path / "www"
    root.mkdir()
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text("""
user root;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log;
events {{ worker_connections 64; }}
http {{
    access_log {d}/nginx-access.log;
    client_body_temp_path {d}/tmp-body;
    proxy_temp_path {d}/tmp-proxy;
    fastcgi_temp_path {d}/tmp-fastcgi;
    uwsgi_temp_path {d}/tmp-uwsgi;
    scgi_temp_path {d}/tmp-scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
""".format(d=tmp_path, port=port, root=root))
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-g",
                             "daemon off;"], stderr=subprocess.PIPE)
    import socket
    import time
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            break
        except OSError:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
    yield root, "http://127.0.0.1:{}".format(port)
    proc.terminate()
    proc.wait()


def test_upload_from_http_url_verified(daemon, tmp_path, qcow2, web):
    root, base = web
    os.link(qcow2, root / "disk.qcow2")
    target, url = file_ticket(daemon, tmp_path)
    r = ovirt_img("upload", base + "/disk.qcow2", url, "--cafile",
                  daemon.ca_file, "-o", "json", "-v")
    assert r.returncode == 0, r.stderr
    assert "format qcow2 (probed)" in r.stderr
    assert "Verified: xxh3_128 checksum" in r.stderr
    assert json_lines(r.stdout)[-1]["transferred"] == SIZE
    compare(qcow2, target, "qcow2", "raw")
    # Only ranges were read: the curl driver, not a whole download.
    assert " 206 " in (tmp_path / "nginx-access.log").read_text()


def test_upload_from_http_url_never_follows_a_backing_file(daemon,
                                                            tmp_path, web):
    # A qcow2 served over HTTP whose header names a file of this host as
    # its backing file: that file is never read.
    root, base = web
    disk, secret = guest_raw_with_qcow2_header(tmp_path)
    os.link(disk, root / "disk.qcow2")
    target, url = file_ticket(daemon, tmp_path)
    r = ovirt_img("upload", base + "/disk.qcow2", url, "--cafile",
                  daemon.ca_file)
    assert r.returncode == 0, r.stderr
    assert b"HOST-SECRET" not in target.read_bytes()


def test_upload_from_http_url_resumed_and_verified(daemon, tmp_path, web):
    # Killed mid-transfer, run again with --resume: the rest is sent and
    # the source, hashed again one request at a time, verified.
    import signal
    import time
    root, base = web
    source = root / "disk.raw"
    run("qemu-img", "create", "-f", "raw", str(source), str(SIZE))
    run("qemu-io", "-f", "raw", "-c", "write -P 0x33 0 64M", str(source))
    from harness.nbdserver import nbdkit
    sock = tmp_path / "slow.sock"
    disk = tmp_path / "target.raw"
    with open(disk, "wb") as f:
        f.truncate(SIZE)
    server = nbdkit("file", str(disk), sock=sock, filters=["delay"])
    server.argv += ["wdelay=200ms"]
    state = tmp_path / "state"
    env = dict(os.environ, XDG_STATE_HOME=str(state))
    with server.start():
        t = new_ticket("nbd:unix:" + str(sock), SIZE)
        daemon.add_ticket(t)
        argv = [OVIRT_IMG, "upload", base + "/disk.raw", url_of(daemon, t),
                "--cafile", daemon.ca_file, "-o", "json"]
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        journal_dir = state / "imageio"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            journals = list(journal_dir.glob("*.journal")) \
                if journal_dir.exists() else []
            if journals and journal_items(journals[0]):
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        wait_idle(daemon, t["uuid"])
        r = subprocess.run(argv + ["--resume", "-v"], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "Resuming" in r.stderr and "Verified" in r.stderr, r.stderr
    compare(source, disk, "raw", "raw")
