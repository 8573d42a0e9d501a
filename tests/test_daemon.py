"""The daemon's life: start-up, errors, systemd notify, shutdown."""

import json
import os
import signal
import socket
import subprocess
import sys
import uuid

import pytest

from harness.daemonproc import Daemon, write_conf, BASE_CONF


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


def test_show_config(tmp_path):
    write_conf(str(tmp_path), "[daemon]\nmax_connections = 3\n")
    out = subprocess.run(
        [sys.executable, "-m", "imageio.daemon", "-c", str(tmp_path),
         "--show-config"], capture_output=True, text=True, timeout=20,
        check=True).stdout
    cfg = json.loads(out)
    # The drop-ins applied, typed, and paths resolved as the daemon uses
    # them: a program finds the sockets here.
    assert cfg["daemon"]["max_connections"] == 3
    assert cfg["remote"]["port"] == 0
    assert cfg["tls"]["enable"] is True
    assert cfg["control"]["socket"] == str(tmp_path / "run" / "control.sock")
    assert cfg["local"]["socket"] == str(tmp_path / "run" / "local.sock")
    # The established daemon's sections are all there.
    assert {"daemon", "tls", "remote", "local", "control", "backend_file",
            "backend_nbd", "backend_http"} <= set(cfg)
    # And nothing was started.
    assert not (tmp_path / "run").exists()


def test_show_config_bad_config(tmp_path):
    write_conf(str(tmp_path), "[remote]\nport = many\n")
    r = subprocess.run(
        [sys.executable, "-m", "imageio.daemon", "-c", str(tmp_path),
         "--show-config"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 1
    assert "port" in r.stderr and r.stdout == ""


def test_ticket_at_startup(tmp_path):
    data = os.urandom(1024**2 + 3)
    images = []
    for i in range(2):
        path = tmp_path / "disk{}.raw".format(i)
        path.write_bytes(data[i:])
        ticket = {"uuid": str(uuid.uuid4()), "size": len(data) - i,
                  "url": "file://{}".format(path), "timeout": 300,
                  "ops": ["read"]}
        (tmp_path / "t{}.json".format(i)).write_text(json.dumps(ticket))
        images.append(ticket)
    d = Daemon(tmp_path / "conf", args=[
        "-t", str(tmp_path / "t0.json"),
        "--ticket", str(tmp_path / "t1.json")]).start()
    try:
        # Served right after start, without the control service.
        for i, ticket in enumerate(images):
            con = d.https()
            con.request("GET", "/images/" + ticket["uuid"])
            resp = con.getresponse()
            assert resp.status == 200
            assert resp.read() == data[i:]
            con.close()
    finally:
        d.stop()


@pytest.mark.parametrize("content, word", [
    (None, "Cannot read ticket file"),
    ("{not json", "not JSON"),
    ('{"uuid": "x"}', "missing required field 'size'"),
])
def test_bad_ticket_file_stops_startup(tmp_path, content, word):
    path = tmp_path / "t.json"
    if content is not None:
        path.write_text(content)
    write_conf(str(tmp_path / "conf"))
    r = subprocess.run(
        [sys.executable, "-m", "imageio.daemon", "-c", str(tmp_path / "conf"),
         "-t", str(path)], capture_output=True, text=True, timeout=20)
    assert r.returncode == 1
    assert word in r.stderr and str(path) in r.stderr
    assert not (tmp_path / "conf" / "run" / "control.sock").exists()
