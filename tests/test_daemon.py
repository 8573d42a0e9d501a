"""The daemon's life: start-up, errors, systemd notify, shutdown."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from daemonproc import Daemon, write_conf, BASE_CONF


def run_daemon(confdir, timeout=20):
    return subprocess.run(
        [sys.executable, "-m", "imageio.daemon", "-c", str(confdir)],
        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_and_removes_sockets(tmp_path, sig):
    d = Daemon(tmp_path).start()
    paths = [d.local_socket, d.control_socket]
    assert all(os.path.exists(p) for p in paths)
    assert d.stop(sig) == 0
    assert not any(os.path.exists(p) for p in paths)
    assert "Stopped" in d.log()


def test_logs_each_service_address(tmp_path):
    d = Daemon(tmp_path).start()
    try:
        log = d.log()
        # Port 0 picked a free port, and the log says which.
        assert "Listening remote service on https://" in log
        assert d.remote_port > 0
        assert "Listening local service on unix:" in log
        assert "Listening control service on unix:" in log
    finally:
        d.stop()


def test_systemd_notify(tmp_path):
    addr = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(addr)
        s.settimeout(20)
        d = Daemon(tmp_path / "conf", "[daemon]\nsystemd_enable = true\n",
                   env={"NOTIFY_SOCKET": addr})
        d.start()
        try:
            msg = s.recv(4096).decode()
            assert "READY=1" in msg.splitlines()
        finally:
            d.stop()
        assert "STOPPING=1" in s.recv(4096).decode()


def test_unknown_option_stops_startup(tmp_path):
    write_conf(str(tmp_path), "[remote]\nprot = 1234\n")
    r = run_daemon(tmp_path)
    assert r.returncode == 1
    assert "prot" in r.stderr and "[remote]" in r.stderr
    assert "60-extra.conf" in r.stderr


def test_tls_without_files_says_how_to_fix(tmp_path):
    conf = BASE_CONF.replace("create_dev_pki = true", "create_dev_pki = false")
    write_conf(str(tmp_path), base=conf)
    r = run_daemon(tmp_path)
    assert r.returncode == 1
    assert "key_file" in r.stderr
    assert "enable = false" in r.stderr


def test_tls_disabled_serves_plain_http(tmp_path):
    d = Daemon(tmp_path, "[tls]\nenable = false\n").start()
    try:
        assert d.addresses["remote"].startswith("http://")
        import http.client
        con = http.client.HTTPConnection("localhost", d.remote_port,
                                         timeout=10)
        con.request("GET", "/info/")
        assert con.getresponse().status == 200
        con.close()
    finally:
        d.stop()


def test_port_in_use_fails_cleanly(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        write_conf(str(tmp_path),
                   "[remote]\nhost = 127.0.0.1\nport = {}\n".format(port))
        r = run_daemon(tmp_path)
    assert r.returncode == 1
    assert "Address already in use" in r.stderr


def test_info(daemon):
    con = daemon.https()
    con.request("GET", "/info/")
    resp = con.getresponse()
    assert resp.status == 200
    import json
    assert "version" in json.loads(resp.read())
    con.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_drop_privileges(tmp_path):
    os.chmod(tmp_path, 0o755)
    d = Daemon(tmp_path, "[daemon]\ndrop_privileges = true\n"
               "user_name = nobody\ngroup_name = nogroup\n").start()
    try:
        with open("/proc/{}/status".format(d.proc.pid)) as f:
            status = f.read()
        uid_line = [l for l in status.splitlines() if l.startswith("Uid:")][0]
        import pwd
        nobody = pwd.getpwnam("nobody").pw_uid
        assert uid_line.split()[1:] == [str(nobody)] * 4
        import grp
        st = os.stat(d.control_socket)
        assert st.st_gid == grp.getgrnam("nogroup").gr_gid
        # Still serving after dropping privileges.
        with d.client() as c:
            assert c.list_tickets() == []
    finally:
        d.stop()
