"""Real NBD servers for tests: qemu-nbd and nbdkit as processes.

Each server is started on a unix socket (in a test's tmp_path) or on a free
loopback TCP port, waited for with a bounded timeout, and stopped by the PID
we started.  Also: images (qemu-img), TLS credentials (openssl) and PSK
files.
"""

import json
import os
import secrets
import signal
import subprocess
import tempfile
import time

START_TIMEOUT = 20
STOP_TIMEOUT = 10


from .net import free_port  # noqa: E402,F401 (where tests find it)


class Server:
    """An NBD server process.

    ``sock`` (unix socket path) or ``port`` (TCP on 127.0.0.1) says where it
    listens; ``export`` is the export name it serves.
    """

    def __init__(self, argv, sock=None, port=None, export="", log=None):
        self.argv = argv
        self.sock = str(sock) if sock else None
        self.port = port
        self.export = export
        self.log = str(log) if log else None
        self._temp_log = False
        self.proc = None

    def start(self, timeout=START_TIMEOUT):
        if self.log is None:
            fd, self.log = tempfile.mkstemp(prefix="nbdserver-", suffix=".log")
            os.close(fd)
            self._temp_log = True
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=logf,
                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("{} exited with {}: {}".format(
                    self.argv[0], self.proc.returncode, self._log_text()))
            if self._listening():
                # qemu-nbd listens before opening the image: a locked or
                # missing image makes it exit right after.
                time.sleep(0.05)
                if self.proc.poll() is None:
                    return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("{} did not start in {} seconds: {}".format(
            self.argv[0], timeout, self._log_text()))

    def _listening(self):
        # Checking that the socket accepts would open a client connection
        # that some servers log as a failed handshake; a bound unix socket
        # path, or a port in LISTEN state, is enough.
        if self.sock:
            if not os.path.exists(self.sock):
                return False
            # Listening sockets have __SO_ACCEPTCON (0x10000) in Flags.
            with open("/proc/net/unix") as f:
                for line in f.readlines()[1:]:
                    fields = line.split()
                    if (len(fields) >= 8 and fields[7] == self.sock
                            and int(fields[3], 16) & 0x10000):
                        return True
            return False
        with open("/proc/net/tcp") as f:
            hexport = ":{:04X}".format(self.port)
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[1].endswith(hexport) and fields[3] == "0A":
                    return True
        return False

    def _log_text(self):
        if self.log and os.path.exists(self.log):
            with open(self.log, errors="replace") as f:
                return f.read()[-2000:]
        return ""

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._temp_log and os.path.exists(self.log):
            os.unlink(self.log)

    def kill(self):
        """Kill the server abruptly (a server dying mid-transfer)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.stop()

    # URLs of every form.

    def url(self, form="uri", scheme=None, query=""):
        """The server's URL.

        form: "uri" (nbd+unix:// or nbd://), "legacy" (nbd:unix:... or
        nbd:HOST:PORT...), "uri-tcp-legacy" is the same as "uri" for TCP.
        """
        if form == "legacy":
            if self.sock:
                url = "nbd:unix:" + self.sock
            else:
                url = "nbd:127.0.0.1:{}".format(self.port)
            if self.export:
                url += ":exportname=" + self.export
            return url
        if self.sock:
            scheme = scheme or "nbd+unix"
            url = "{}:///{}?socket={}".format(scheme, self.export, self.sock)
            if query:
                url += "&" + query
        else:
            scheme = scheme or "nbd"
            url = "{}://127.0.0.1:{}/{}".format(scheme, self.port, self.export)
            if query:
                url += "?" + query
        return url


def _listen_args_qemu(sock, port):
    if sock:
        return ["--socket", str(sock)]
    return ["--bind", "127.0.0.1", "--port", str(port)]


def qemu_nbd(image, fmt="raw", sock=None, port=None, export="",
             read_only=False, allocation_depth=False, bitmap=None,
             cache=None, aio=None, shared=8, tls_dir=None, log=None):
    """A qemu-nbd server for ``image`` (not started)."""
    if sock is None and port is None:
        raise ValueError("sock or port required")
    argv = ["qemu-nbd", "--persistent", "--shared={}".format(shared),
            "--format", fmt]
    argv += _listen_args_qemu(sock, port)
    if export:
        argv += ["--export-name", export]
    if read_only:
        argv.append("--read-only")
    if allocation_depth:
        argv.append("--allocation-depth")
    if bitmap:
        argv += ["--bitmap", bitmap]
    if cache:
        argv += ["--cache", cache]
    if aio:
        argv += ["--aio", aio]
    if tls_dir:
        argv += ["--object",
                 "tls-creds-x509,id=tls0,dir={},endpoint=server,"
                 "verify-peer=off".format(tls_dir),
                 "--tls-creds", "tls0"]
    argv.append(str(image))
    return Server(argv, sock=sock, port=port, export=export, log=log)


def nbdkit(plugin, *args, sock=None, port=None, filters=(), export="",
           tls_dir=None, psk_file=None, read_only=False, log=None):
    """An nbdkit server (not started): ``plugin`` with ``args``."""
    if sock is None and port is None:
        raise ValueError("sock or port required")
    argv = ["nbdkit", "--foreground", "--exit-with-parent"]
    if sock:
        argv += ["--unix", str(sock)]
    else:
        argv += ["--ipaddr", "127.0.0.1", "--port", str(port)]
    if read_only:
        argv.append("--readonly")
    for f in filters:
        argv += ["--filter", f]
    if tls_dir:
        argv += ["--tls=require", "--tls-certificates", str(tls_dir)]
    if psk_file:
        argv += ["--tls=require", "--tls-psk", str(psk_file)]
    argv.append(plugin)
    argv += list(args)
    return Server(argv, sock=sock, port=port, export=export, log=log)


# Images.

def qemu_img(*args, timeout=600):
    """Run qemu-img; its stdout, or RuntimeError with its stderr."""
    res = subprocess.run(["qemu-img", *map(str, args)], capture_output=True,
                         text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError("qemu-img {}: {}".format(
            " ".join(map(str, args)), res.stderr.strip()))
    return res.stdout


def qemu_io(image, fmt, *commands):
    argv = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    argv.append(str(image))
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, timeout=120)


def qemu_img_map(image, fmt="qcow2"):
    """``qemu-img map --output json``: list of dicts."""
    out = subprocess.run(
        ["qemu-img", "map", "--output", "json", "-f", fmt, str(image)],
        check=True, stdout=subprocess.PIPE, timeout=120).stdout
    return json.loads(out)


# TLS.

def make_x509(directory):
    """Write ca-cert.pem, server-cert.pem, server-key.pem (and a copy of the
    CA for clients) into ``directory``; return it.

    Both nbdkit and qemu-nbd read these names; libnbd reads ca-cert.pem.
    """
    d = str(directory)
    os.makedirs(d, exist_ok=True)

    def openssl(*args):
        subprocess.run(["openssl"] + list(args), check=True, cwd=d,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=imageio test CA", "-keyout", "ca-key.pem",
            "-out", "ca-cert.pem",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
            "-keyout", "server-key.pem", "-out", "server.csr")
    with open(os.path.join(d, "server.ext"), "w") as f:
        f.write("basicConstraints=CA:FALSE\n"
                "keyUsage=critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth\n"
                "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem",
            "-CAkey", "ca-key.pem", "-CAcreateserial", "-days", "2",
            "-extfile", "server.ext", "-out", "server-cert.pem")
    os.chmod(os.path.join(d, "server-key.pem"), 0o600)
    return d


def make_psk(path, username="imageio"):
    """Write a PSK file (``username:hexkey``), return (path, username)."""
    with open(str(path), "w") as f:
        f.write("{}:{}\n".format(username, secrets.token_hex(32)))
    os.chmod(str(path), 0o600)
    return str(path), username
