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
