"""Run the real daemon as a process for tests, and talk to it."""

import http.client
import os
import re
import signal
import ssl
import subprocess
import sys
import time

from imageio import admin
from imageio.admin import UnixHTTPConnection

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASE_CONF = """\
[daemon]
systemd_enable = false
drop_privileges = false
run_dir = run
inactivity_timeout = 60

[tls]
enable = true
create_dev_pki = true
key_file = pki/key.pem
cert_file = pki/cert.pem
ca_file = pki/ca.pem

[remote]
host = localhost
port = 0

[local]
socket = run/local.sock

[control]
transport = unix
socket = run/control.sock
remove_timeout = 10

[handlers]
keys = stderr

[logger_root]
level = DEBUG
handlers = stderr
"""

_LISTEN = re.compile(r"Listening ([\w-]+) service on (\S+)")


def write_conf(confdir, extra="", base=BASE_CONF):
    os.makedirs(os.path.join(confdir, "conf.d"), exist_ok=True)
    with open(os.path.join(confdir, "conf.d", "50-test.conf"), "w") as f:
        f.write(base)
    if extra:
        with open(os.path.join(confdir, "conf.d", "60-extra.conf"),
                  "w") as f:
            f.write(extra)


class Daemon:
    """The daemon as a process: ``start()``, then ``remote_port``,
    ``local_socket``, ``control_socket``, ``ca_file``; ``stop()``."""

    def __init__(self, confdir, extra="", env=None, prefix=(), args=(),
                 top=TOP):
        """``prefix``: a command to run the daemon under (e.g. ``ip netns
        exec NAME``); ``args``: more daemon arguments (``-t FILE``);
        ``top``: the source tree whose imageio runs (this one; a benchmark
        may run another commit's)."""
        self.top = top
        self.prefix = list(prefix)
        self.args = list(args)
        self.confdir = str(confdir)
        write_conf(self.confdir, extra)
        self.log_path = os.path.join(self.confdir, "daemon.log")
        self.env = env
        self.proc = None
        self.addresses = {}

    @property
    def ca_file(self):
        return os.path.join(self.confdir, "pki", "ca.pem")

    def start(self, timeout=20):
        env = dict(os.environ)
        if self.env:
            env.update(self.env)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            self.prefix + [sys.executable, "-m", "imageio.daemon", "-c",
                           self.confdir] + self.args,
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.top)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            if " Ready" in text:
                for name, addr in _LISTEN.findall(text):
                    self.addresses[name] = addr
                return self
            if self.proc.poll() is not None:
                raise RuntimeError("daemon exited with {}:\n{}".format(
                    self.proc.returncode, text))
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("daemon not ready in {}s:\n{}".format(
            timeout, self.log()))

    def log(self):
        with open(self.log_path) as f:
            return f.read()

    @property
    def remote_port(self):
        return int(self.addresses["remote"].rsplit(":", 1)[1])

    @property
    def local_socket(self):
        return self.addresses["local"].split(":", 1)[1]

    @property
    def nbd_port(self):
        """The NBD service's TCP port ([nbd] enable = true)."""
        return int(self.addresses["nbd"].rsplit(":", 1)[1])

    @property
    def nbd_socket(self):
        """The NBD service's unix socket ([nbd] socket)."""
        return self.addresses["nbd-local"].split(":", 1)[1]

    @property
    def control_socket(self):
        return self.addresses["control"].split(":", 1)[1]

    def config(self):
        return admin.load_config(self.confdir)

    def client(self):
        return admin.Client(self.config())

    def add_ticket(self, ticket):
        with self.client() as c:
            c.add_ticket(ticket)
        return ticket

    def https(self, timeout=60):
        ctx = ssl.create_default_context(cafile=self.ca_file)
        return http.client.HTTPSConnection(
            "localhost", self.remote_port, context=ctx, timeout=timeout)

    def unix(self, timeout=60):
        return UnixHTTPConnection(self.local_socket, timeout)

    def control(self, timeout=60):
        return UnixHTTPConnection(self.control_socket, timeout)

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self._log.close()
