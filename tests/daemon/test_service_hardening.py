"""Running as a service: what the daemon does with privileges, logs, keys
and error messages, through the real daemon process."""

import glob
import re
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

import pytest

from conftest import add, connect, make_image, new_ticket, request
from harness import nbdserver
from harness.daemonproc import Daemon

MiB = 1024**2

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def proc_status(pid):
    with open("/proc/{}/status".format(pid)) as f:
        return dict((k, v.split()) for k, v in
                    (line.split(":", 1) for line in f if ":" in line))


@pytest.fixture
def public_dir():
    """A directory any user can reach (tmp_path's parents are 0700)."""
    path = tempfile.mkdtemp(prefix="imageio-svc-", dir="/var/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def service_user():
    """A throwaway system user with its own primary group and a
    supplementary group: (user, group, supplementary group)."""
    tag = uuid.uuid4().hex[:8]
    user, group, extra = "imgu" + tag, "imgg" + tag, "imgs" + tag
    created = []
    try:
        for g in (group, extra):
            subprocess.run(["groupadd", "-r", g], check=True)
            created.append(("groupdel", g))
        subprocess.run(["useradd", "-r", "-M", "-s", "/usr/sbin/nologin",
                        "-g", group, "-G", extra, user], check=True)
        created.append(("userdel", user))
        yield user, group, extra
    finally:
        for cmd, name in reversed(created):
            subprocess.run([cmd, name], check=False)


@needs_root
def test_drop_privileges_keeps_supplementary_groups(public_dir, service_user):
    import grp
    user, group, extra = service_user
    extra_gid = grp.getgrnam(extra).gr_gid
    confdir = os.path.join(public_dir, "conf")
    d = Daemon(confdir, "[daemon]\ndrop_privileges = true\n"
               "user_name = {}\ngroup_name = {}\n".format(user, group))
    d.start()
    try:
        status = proc_status(d.proc.pid)
        assert str(extra_gid) in status.get("Groups", []), status["Groups"]
        # An image readable only through the supplementary group is
        # served.
        data = os.urandom(MiB)
        path = os.path.join(public_dir, "image.raw")
        with open(path, "wb") as f:
            f.write(data)
        os.chown(path, 0, extra_gid)
        os.chmod(path, 0o640)
        t = add(d, path, MiB, ops=("read",))
        con = connect(d, "local")
        resp, body = request(con, "GET", "/images/" + t["uuid"])
        assert resp.status == 200, body
        assert body == data
        con.close()
    finally:
        d.stop()


@needs_root
def test_log_rotation_after_drop(public_dir, service_user):
    user, group, _ = service_user
    logdir = os.path.join(public_dir, "log")
    # As systemd's LogsDirectory= makes it for a unit without User=:
    # root's, 0755.
    os.mkdir(logdir, 0o755)
    logfile = os.path.join(logdir, "daemon.log")
    confdir = os.path.join(public_dir, "conf")
    d = Daemon(confdir, (
        "[daemon]\ndrop_privileges = true\n"
        "user_name = {}\ngroup_name = {}\n"
        "[handlers]\nkeys = stderr, logfile\n"
        "[logger_root]\nlevel = DEBUG\nhandlers = stderr, logfile\n"
        "[handler_logfile]\n"
        "class = logging.handlers.RotatingFileHandler\n"
        "args = ({!r},)\n"
        "kwargs = {{\"maxBytes\": 2048, \"backupCount\": 3}}\n"
        "level = DEBUG\nformatter = long\n").format(user, group, logfile))
    d.start()
    try:
        # Enough requests to rotate several times, after the drop.
        for i in range(30):
            with d.client() as c:
                c.list_tickets()
        con = connect(d, "local")
        request(con, "GET", "/images/no-such-ticket")
        con.close()
        # The last line logged after the rotations reached the log file.
        deadline = time.monotonic() + 10
        while True:
            rotated = glob.glob(logfile + ".*")
            with open(logfile) as f:
                current = f.read()
            last = [line for line in d.log().splitlines()
                    if "No such ticket" in line]
            if rotated and last and last[-1] in current:
                break
            assert time.monotonic() < deadline, (rotated, d.log()[-2000:])
            time.sleep(0.1)
        assert "PermissionError" not in d.log()
    finally:
        d.stop()


def open_paths(pid):
    paths = []
    fd_dir = "/proc/{}/fd".format(pid)
    for fd in os.listdir(fd_dir):
        try:
            paths.append(os.readlink(os.path.join(fd_dir, fd)))
        except OSError:
            pass
    return paths


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connections_to(pid, port):
    """How many of ``pid``'s open sockets are TCP connections to
    127.0.0.1:``port``."""
    inodes = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if int(fields[2].split(":")[1], 16) == port:
                inodes.add("socket:[{}]".format(fields[9]))
    return len([p for p in open_paths(pid) if p in inodes])


def test_delete_answers_after_backend_closed(daemon, tmp_path):
    # An LV is deactivated right after DELETE answers: the ticket's
    # backend must be closed by then.  The NBD server is slow to close
    # (nbdkit's delay filter), so a DELETE answering before the close is
    # seen holding the connection.
    port = free_port()
    srv = nbdserver.nbdkit("memory", "size={}".format(MiB), "delay-close=2",
                           port=port, filters=["delay"])
    with srv.start():
        t = new_ticket(srv.url(), MiB)
        daemon.add_ticket(t)
        con = connect(daemon, "local")
        resp, body = request(con, "GET", "/images/" + t["uuid"],
                             headers={"Range": "bytes=0-4095"})
        assert resp.status == 206, body
        assert connections_to(daemon.proc.pid, port) == 1
        with daemon.client() as c:
            c.del_ticket(t["uuid"])
        assert connections_to(daemon.proc.pid, port) == 0
        con.close()


def test_tcp_control_warns_at_start(make_daemon, daemon):
    port = free_port()
    d = make_daemon("[control]\ntransport = tcp\nport = {}\n".format(port))
    warnings = [line for line in d.log().splitlines()
                if "WARNING" in line and "transport = tcp" in line]
    assert warnings and "without authentication" in warnings[0], d.log()
    # The unix transport, the default, says nothing of the kind.
    assert "without authentication" not in daemon.log()


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs, unmounted at the end."""
    path = str(tmp_path / "tmpfs")
    os.mkdir(path)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", path],
                   check=True)
    yield path
    subprocess.run(["umount", "-l", path], check=False)


@needs_root
def test_full_disk_names_operation_not_path(daemon, small_fs):
    # The upload fills the filesystem: 507, naming the failed operation,
    # its offset and length, and not where the image lives.
    size = 8 * MiB
    path = make_image(os.path.join(small_fs, "image.raw"), size)
    t = add(daemon, path, size)
    con = connect(daemon, "local")
    resp, body = request(con, "PUT", "/images/" + t["uuid"],
                         body=os.urandom(size))
    con.close()
    text = body.decode()
    assert resp.status == 507, text
    assert re.search(r"write at offset \d+ length \d+ failed: "
                     r"No space left on device", text), text
    assert small_fs not in text and "image.raw" not in text, text


def test_dead_nbd_server_hides_socket_path(daemon, tmp_path):
    sock = str(tmp_path / "nbd.sock")
    t = new_ticket("nbd:unix:{}".format(sock), MiB)
    daemon.add_ticket(t)
    con = connect(daemon, "local")
    resp, body = request(con, "GET", "/images/" + t["uuid"])
    con.close()
    text = body.decode()
    assert resp.status >= 500, text
    assert "NBD server" in text, text
    assert sock not in text and str(tmp_path) not in text, text
    # The log keeps the detail.
    assert sock in daemon.log()


def test_short_read_hides_path(daemon, tmp_path):
    # The image shrank under the ticket: the read comes short.
    path = make_image(str(tmp_path / "shrunk.raw"), MiB)
    t = add(daemon, path, 2 * MiB)
    con = connect(daemon, "local")
    resp, body = request(con, "GET",
                         "/images/{}/checksum".format(t["uuid"]))
    con.close()
    text = body.decode()
    assert resp.status >= 500, text
    assert str(tmp_path) not in text, text


def s_client(port, *args):
    """An openssl s_client handshake with the daemon: (ok, output)."""
    r = subprocess.run(
        ["openssl", "s_client", "-connect", "localhost:{}".format(port),
         *args], input=b"", capture_output=True, timeout=20)
    out = r.stdout.decode(errors="replace")
    return "Cipher is (NONE)" not in out and "Cipher is" in out, out


@pytest.mark.skipif(not shutil.which("openssl"), reason="needs openssl")
def test_tls1_1_lowers_security_only_for_tls1_1(make_daemon):
    d = make_daemon("[tls]\nenable_tls1_1 = true\n")
    port = d.remote_port
    # A TLS 1.1 client is served (OpenSSL 3 needs security level 0)...
    ok, out = s_client(port, "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0")
    assert ok and "TLSv1.1" in out, out
    # ...but a TLS 1.2 client keeps the default level: SHA-1 signatures
    # are refused.
    ok, out = s_client(port, "-tls1_2", "-sigalgs", "ECDSA+SHA1",
                       "-cipher", "DEFAULT:@SECLEVEL=0")
    assert not ok, out
    ok, out = s_client(port, "-tls1_2")
    assert ok, out
    # And the daemon serves modern clients as before.
    con = d.https()
    resp, body = request(con, "GET", "/info/")
    assert resp.status == 200, body
    con.close()


def test_world_readable_key_warns(tmp_path):
    from imageio import tls
    pki = tmp_path / "pki"
    tls.create_dev_pki(str(pki / "key.pem"), str(pki / "cert.pem"),
                       str(pki / "ca.pem"))
    assert os.stat(pki / "key.pem").st_mode & 0o777 == 0o600
    os.chmod(pki / "key.pem", 0o644)
    d = Daemon(tmp_path).start()
    try:
        warnings = [line for line in d.log().splitlines()
                    if "WARNING" in line and "key.pem" in line]
        assert warnings and "other users" in warnings[0], d.log()
    finally:
        d.stop()
    # A key only its owner reads: no warning.
    os.chmod(pki / "key.pem", 0o600)
    d = Daemon(tmp_path).start()
    try:
        assert "other users" not in d.log()
    finally:
        d.stop()


def test_dev_pki_does_not_follow_planted_symlink(tmp_path):
    # Someone who may write where the PKI goes plants a link: the key must
    # not be written through it (into their file, or over one of ours).
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "pki").mkdir()
    os.symlink(victim, tmp_path / "pki" / "key.pem.tmp")
    d = Daemon(tmp_path)
    with pytest.raises(RuntimeError) as e:
        d.start()
    assert "key.pem.tmp" in str(e.value)
    assert victim.read_bytes() == b"precious"
    assert not (tmp_path / "pki" / "key.pem").exists()
