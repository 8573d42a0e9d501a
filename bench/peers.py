"""The servers a benchmark compares: our daemon, the established
ovirt-imageio 2.5.1 and nginx, each run as a process on loopback.

The same code drives both daemons (``Daemon(kind="imageio"|"established")``):
one generated config dir, ``ovirt-imageio -c CONFDIR``, tickets added over the
control unix socket, stopped by PID. nginx serves the same image files with
``sendfile on`` over a unix socket (plain HTTP) and over HTTPS on loopback
with the same key and certificate as the daemons.

Every server exposes the same small surface to the scenarios: ``https``
(host, port), ``unix_socket``, ``path(name)`` for an image's URL path,
``cpu_seconds()`` and ``label``.
"""

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

from harness import net

from . import cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(ROOT, "bench")

ESTABLISHED_VERSION = "2.5.1"
ESTABLISHED_VENV = os.environ.get(
    "IMAGEIO_BENCH_ESTABLISHED_VENV",
    os.path.join(BENCH_DIR, ".venv-established"))
IMAGEIO_DAEMON = os.environ.get(
    "IMAGEIO_BENCH_DAEMON",
    os.path.join(ROOT, ".venv", "bin", "ovirt-imageio"))
NGINX = os.environ.get("IMAGEIO_BENCH_NGINX", shutil.which("nginx")
                       or "/usr/sbin/nginx")

START_TIMEOUT = 30


class Unavailable(Exception):
    """A server could not be set up or started; the reason says why."""


# --- helpers -----------------------------------------------------------------

free_port = net.free_port


def _die_with_parent():
    # Runs in the child before exec: get SIGTERM if the benchmark process
    # dies, so no server outlives a crashed or killed run.
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(argv, log_path, cwd=None, env=None):
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            cwd=cwd, env=env, preexec_fn=_die_with_parent)
    finally:
        log.close()


def stop_process(proc, timeout=15):
    """SIGTERM the process we started, SIGKILL if it does not exit."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def tail(path, lines=20):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


# http.client over a unix socket (the local and control services).
UnixHTTPConnection = net.UnixHTTPConnection


def _can_connect_tcp(host, port):
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _can_connect_unix(path):
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            s.connect(path)
            return True
    except OSError:
        return False


# --- the established service's virtualenv ------------------------------------

# The established client as a user's script calls its library API, run
# with the established venv's python: op url path cafile [fmt].
ESTABLISHED_CLIENT = """\
import sys
from ovirt_imageio import client
op, url, path, cafile = sys.argv[1:5]
if op == "upload":
    client.upload(path, url, cafile)
else:
    client.download(url, path, cafile,
                    fmt=sys.argv[5] if len(sys.argv) > 5 else "qcow2")
"""


def ensure_established():
    """Create bench/.venv-established with ovirt-imageio 2.5.1 if missing.

    Returns the path of its ovirt-imageio script. The package compiles a
    small C extension, so gcc must be installed.
    """
    exe = os.path.join(ESTABLISHED_VENV, "bin", "ovirt-imageio")
    python = os.path.join(ESTABLISHED_VENV, "bin", "python")
    if os.access(exe, os.X_OK) and _established_version(python) == \
            ESTABLISHED_VERSION:
        return exe
    print(f"bench: creating {ESTABLISHED_VENV} with ovirt-imageio "
          f"{ESTABLISHED_VERSION}", file=sys.stderr)
    base = shutil.which("python3") or sys.executable
    try:
        if not os.path.exists(python):
            subprocess.run([base, "-m", "venv", ESTABLISHED_VENV],
                           check=True, capture_output=True)
        subprocess.run(
            [python, "-m", "pip", "install", "-q",
             f"ovirt-imageio=={ESTABLISHED_VERSION}"],
            check=True, capture_output=True)
    except subprocess.CalledProcessError as e:
        raise Unavailable(
            f"cannot install ovirt-imageio {ESTABLISHED_VERSION} into "
            f"{ESTABLISHED_VENV}: {e.stderr.decode(errors='replace')[-2000:]}")
    return exe


def _established_version(python):
    try:
        out = subprocess.run(
            [python, "-c",
             "import importlib.metadata as m;"
             "print(m.version('ovirt-imageio'))"],
            capture_output=True, check=True, text=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# --- the daemons -------------------------------------------------------------

DAEMON_CONF = """\
# Generated by bench/peers.py for a benchmark run.
[daemon]
systemd_enable = false
drop_privileges = false
run_dir = {run_dir}

[tls]
enable = true
key_file = {key}
cert_file = {cert}

[backend_http]
# A proxy ticket's https:// URL points at another daemon on loopback, with
# the same self-signed certificate.
ca_file = {cert}

[remote]
host = {host}
port = {port}

[local]
enable = true
socket = {local_socket}

[control]
transport = unix
socket = {control_socket}

[handlers]
keys = logfile

[logger_root]
level = INFO
handlers = logfile
propagate = 0

[handler_logfile]
args = ('{log}',)
level = DEBUG
formatter = long
"""


class Daemon:
    """An ovirt-imageio compatible daemon run from a generated config dir.

    kind "established": ovirt-imageio 2.5.1 from its own virtualenv;
    kind "imageio": this project's daemon from .venv. Both take the same
    configuration and the same tickets.
    """

    LABELS = {"imageio": "imageio", "established": "established 2.5.1"}
    # Where the remote service listens (bench/client.py --netns: the host
    # end of a veth pair, for clients in another network namespace).
    listen_host = "127.0.0.1"

    def __init__(self, kind, workdir, key, cert, role=None):
        if kind not in self.LABELS:
            raise ValueError(f"unknown daemon kind {kind!r}")
        self.kind = kind
        self.label = self.LABELS[kind]
        # A second instance of the same kind (the backend a proxy forwards
        # to) has a role, e.g. "backend".
        if role:
            self.label += f" ({role})"
        self.workdir = workdir
        self.key = key
        self.cert = cert
        self.proc = None
        self.tickets = {}  # name -> ticket id
        self.confdir = os.path.join(workdir, "conf")
        self.run_dir = os.path.join(workdir, "run")
        self.log = os.path.join(workdir, "daemon.log")
        self.output = os.path.join(workdir, "output.log")
        self.unix_socket = os.path.join(self.run_dir, "local.sock")
        self.control_socket = os.path.join(self.run_dir, "control.sock")
        self.https = ("127.0.0.1", None)

    @property
    def pid(self):
        return self.proc.pid

    def executable(self):
        if self.kind == "established":
            return ensure_established()
        if not os.access(IMAGEIO_DAEMON, os.X_OK):
            raise Unavailable(f"{IMAGEIO_DAEMON} not found: run ./dev setup")
        return IMAGEIO_DAEMON

    def write_config(self):
        os.makedirs(os.path.join(self.confdir, "conf.d"), exist_ok=True)
        os.makedirs(self.run_dir, exist_ok=True)
        port = free_port()
        self.https = (self.listen_host, port)
        conf = DAEMON_CONF.format(
            host=self.listen_host,
            run_dir=self.run_dir, key=self.key, cert=self.cert, port=port,
            local_socket=self.unix_socket,
            control_socket=self.control_socket, log=self.log)
        with open(os.path.join(self.confdir, "conf.d", "daemon.conf"),
                  "w") as f:
            f.write(conf)
        # Experiments: more configuration for our daemon only, e.g.
        # IMAGEIO_BENCH_EXTRA_CONF=$'[backend_nbd]\nbuffer_size = 4194304'.
        extra = os.environ.get("IMAGEIO_BENCH_EXTRA_CONF")
        if extra and self.kind == "imageio":
            with open(os.path.join(self.confdir, "conf.d", "zz-extra.conf"),
                      "w") as f:
                f.write(extra + "\n")

    def start(self):
        exe = self.executable()
        self.write_config()
        for path in (self.unix_socket, self.control_socket):
            if os.path.exists(path):
                os.unlink(path)
        self.proc = spawn([exe, "-c", self.confdir], self.output,
                          cwd=self.workdir)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise Unavailable(
                    f"{self.label} exited with {self.proc.returncode} at "
                    f"start-up:\n{tail(self.output)}{tail(self.log)}")
            if self._ready():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise Unavailable(
                    f"{self.label} not ready after {START_TIMEOUT} s:\n"
                    f"{tail(self.output)}{tail(self.log)}")
            time.sleep(0.1)

    def _ready(self):
        if not _can_connect_unix(self.control_socket):
            return False
        try:
            status, _ = self.control("GET", "/tickets/" + str(uuid.uuid4()))
        except OSError:
            return False
        return (status == 404
                and _can_connect_tcp(*self.https)
                and _can_connect_unix(self.unix_socket))

    def stop(self):
        stop_process(self.proc)

    def control(self, method, path, body=None):
        conn = UnixHTTPConnection(self.control_socket, timeout=30)
        try:
            headers = {}
            if body is not None:
                body = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def add_ticket(self, name, image, size=None, ops=("read",), url=None,
                   **attrs):
        """Add a ticket for image (a file path), or for url (e.g. another
        daemon's https://.../images/ID, making this daemon a proxy, or an
        nbd: URL); path(name) is its URL path. attrs are more ticket
        attributes (e.g. sparse=True)."""
        if size is None:
            size = os.path.getsize(image)
        ticket_id = str(uuid.uuid4())
        ticket = {
            "uuid": ticket_id,
            "size": size,
            "url": url or "file://" + image,
            "timeout": 3600,
            "ops": list(ops),
            **attrs,
        }
        status, body = self.control("PUT", f"/tickets/{ticket_id}", ticket)
        if status != 200:
            raise Unavailable(
                f"{self.label}: adding ticket failed: {status} {body!r}")
        self.tickets[name] = ticket_id
        return ticket_id

    def path(self, name):
        return f"/images/{self.tickets[name]}"

    def cpu_seconds(self):
        return cpu.process_tree_seconds(self.proc.pid)


# --- nginx -------------------------------------------------------------------

NGINX_CONF = """\
# Generated by bench/peers.py for a benchmark run.
daemon off;
master_process on;
worker_processes auto;
user root root;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;

events {{
    worker_connections 256;
}}

http {{
    access_log off;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;

    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 300s;

    server {{
        listen unix:{unix_socket};
        location /images/ {{
            alias {dir}/images/;
        }}
    }}

    server {{
        listen 127.0.0.1:{https_port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location /images/ {{
            alias {dir}/images/;
        }}
    }}
}}
"""


class Nginx:
    """nginx with sendfile serving image files: the HTTP limit.

    Runs in the foreground (daemon off) with its master and one worker per
    core, all as children of the process we start; CPU covers the workers.
    Images are symlinks in its own directory, served at /images/NAME.
    """

    label = "nginx"
    kind = "nginx"

    def __init__(self, workdir, key, cert):
        self.workdir = workdir
        self.key = key
        self.cert = cert
        self.proc = None
        self.unix_socket = os.path.join(workdir, "http.sock")
        self.https = ("127.0.0.1", None)
        self.conf = os.path.join(workdir, "nginx.conf")
        self.output = os.path.join(workdir, "output.log")
        self.log = os.path.join(workdir, "error.log")

    @property
    def pid(self):
        return self.proc.pid

    def start(self):
        if not os.access(NGINX, os.X_OK):
            raise Unavailable("nginx not installed (apt-get install "
                              "nginx-light)")
        for d in ("tmp", "images"):
            os.makedirs(os.path.join(self.workdir, d), exist_ok=True)
        if os.path.exists(self.unix_socket):
            os.unlink(self.unix_socket)
        self.https = ("127.0.0.1", free_port())
        with open(self.conf, "w") as f:
            f.write(NGINX_CONF.format(
                dir=self.workdir, unix_socket=self.unix_socket,
                https_port=self.https[1], key=self.key, cert=self.cert))
        self.proc = spawn(
            [NGINX, "-p", self.workdir, "-e", self.log, "-c", self.conf],
            self.output, cwd=self.workdir)
        deadline = time.monotonic() + START_TIMEOUT
        while not (_can_connect_unix(self.unix_socket)
                   and _can_connect_tcp(*self.https)):
            if self.proc.poll() is not None:
                raise Unavailable(
                    f"nginx exited with {self.proc.returncode}:\n"
                    f"{tail(self.output)}{tail(self.log)}")
            if time.monotonic() > deadline:
                self.stop()
                raise Unavailable(f"nginx not ready:\n{tail(self.log)}")
            time.sleep(0.05)

    def stop(self):
        stop_process(self.proc)

    def add_ticket(self, name, image, size=None, ops=("read",), url=None):
        if set(ops) - {"read"} or url:
            raise Unavailable("nginx peer serves GET only")
        link = os.path.join(self.workdir, "images", name)
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(image, link)

    def path(self, name):
        return f"/images/{name}"

    def cpu_seconds(self):
        return cpu.process_tree_seconds(self.proc.pid)


# --- all servers of a run ----------------------------------------------------

class Servers:
    """Starts each server on first use and stops all of them at the end.

    A server that cannot start is remembered as unavailable with the reason,
    so its scenarios are skipped (and reported) instead of failing the run.
    """

    KINDS = ("imageio", "established", "nginx")
    # "KIND-backend": a second daemon of KIND, the backend of a proxy.

    def __init__(self, workdir=None):
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="imageio-bench-")
        from . import tls
        self.key, self.cert = tls.make_cert(os.path.join(self.workdir, "pki"))
        self._servers = {}
        self._failed = {}

    def get(self, kind):
        if kind in self._failed:
            raise Unavailable(self._failed[kind])
        if kind not in self._servers:
            workdir = os.path.join(self.workdir, kind)
            os.makedirs(workdir, exist_ok=True)
            if kind == "nginx":
                server = Nginx(workdir, self.key, self.cert)
            elif kind.endswith("-backend"):
                server = Daemon(kind[:-len("-backend")], workdir, self.key,
                                self.cert, role="backend")
            else:
                server = Daemon(kind, workdir, self.key, self.cert)
            try:
                server.start()
            except Unavailable as e:
                self._failed[kind] = str(e)
                raise
            self._servers[kind] = server
        return self._servers[kind]

    def running(self):
        return list(self._servers.values())

    def stop(self, logs_dir=None):
        """Stop every server we started; copy their logs to logs_dir
        (default $IMAGEIO_BENCH_LOGS) when given."""
        logs_dir = logs_dir or os.environ.get("IMAGEIO_BENCH_LOGS")
        for kind, server in self._servers.items():
            server.stop()
        if logs_dir:
            os.makedirs(logs_dir, exist_ok=True)
            for kind in os.listdir(self.workdir):
                d = os.path.join(self.workdir, kind)
                if not os.path.isdir(d):
                    continue
                for name in os.listdir(d):
                    if name.endswith(".log"):
                        shutil.copy(os.path.join(d, name),
                                    os.path.join(logs_dir, f"{kind}-{name}"))
        self._servers.clear()
        if self._own_workdir and not os.environ.get("IMAGEIO_BENCH_KEEP"):
            shutil.rmtree(self.workdir, ignore_errors=True)
