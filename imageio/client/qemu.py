"""qemu-img and a private qemu-nbd: how the client reads and writes any
image format qemu knows, as guest data over NBD."""

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import threading
import time

from .. import errors

# How long qemu-nbd may take to create its socket.
START_TIMEOUT = 20


class Error(errors.Error):
    """qemu-img or qemu-nbd failed; the message is qemu's own."""


def _run(argv, timeout=300):
    try:
        r = subprocess.run(argv, capture_output=True, text=True,
                           timeout=timeout)
    except FileNotFoundError:
        raise Error("{} is not installed (Debian: qemu-utils)".format(
            argv[0]))
    if r.returncode != 0:
        raise Error(_last_line(r.stderr) or "{} failed".format(argv[0]))
    return r.stdout


def _last_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def is_url(name):
    """Whether ``name`` is an http(s) URL (read by qemu's curl driver)."""
    return name.startswith(("http://", "https://"))


def find_member(tarname, member):
    """Return (offset, size) of ``member``'s data inside tar ``tarname``."""
    try:
        with tarfile.open(tarname) as tar:
            info = tar.getmember(member)
    except KeyError:
        raise Error("{}: no member {!r}".format(tarname, member))
    except (OSError, tarfile.TarError) as e:
        raise Error("{}: cannot read tar file: {}".format(tarname, e))
    return info.offset_data, info.size


def image_spec(filename, member=None):
    """The name qemu opens for ``filename`` (a ``json:`` spec for a tar
    member: qemu's raw driver with offset and size over the tar file)."""
    if member is None:
        return filename
    if is_url(filename):
        raise Error("--member needs a local tar file, not {}".format(
            filename))
    offset, size = find_member(filename, member)
    # No top driver: qemu probes the member's format.
    return "json:" + json.dumps({"file": {
        "driver": "raw", "offset": offset, "size": size,
        "file": {"driver": "file", "filename": filename}}})


def info(filename, member=None, fmt=None):
    """``qemu-img info`` as a dict (with member-offset/member-size for a
    tar member); ``fmt`` is the format to open it as (None: probed)."""
    spec = image_spec(filename, member)
    if member is None and not is_url(filename) and \
            not os.access(filename, os.R_OK):
        raise Error("Cannot read {}: {}".format(
            filename, "no such file" if not os.path.exists(filename)
            else "permission denied"))
    argv = ["qemu-img", "info", "--output", "json"]
    if fmt is not None:
        if member is not None:
            # The tar member through the raw driver, opened as ``fmt``.
            inner = json.loads(spec[len("json:"):])
            spec = "json:" + json.dumps({"driver": fmt,
                                         "file": inner["file"]})
        else:
            argv += ["-f", fmt]
    out = json.loads(_run(argv + [spec]))
    if member is not None:
        out["member-offset"], out["member-size"] = find_member(
            filename, member)
    return out


def measure(filename, dst_fmt, member=None):
    """``qemu-img measure`` of converting ``filename`` to ``dst_fmt``."""
    spec = image_spec(filename, member)
    return json.loads(_run(["qemu-img", "measure", "--output", "json",
                            "-O", dst_fmt, spec]))


def create(filename, fmt, size, backing_file=None, backing_format=None):
    """Create an empty image for a download."""
    argv = ["qemu-img", "create", "-q", "-f", fmt]
    if fmt == "qcow2":
        argv += ["-o", "compat=1.1"]
    if backing_file:
        argv += ["-b", backing_file, "-F",
                 backing_format or info(backing_file)["format"]]
    argv += [filename, str(size)]
    _run(argv)


@contextlib.contextmanager
def serve(filename, fmt=None, read_only=True, shared=8, member=None,
          bitmap=None, backing_chain=True):
    """Run a private qemu-nbd exporting ``filename``'s guest data on a
    unix socket in a new temporary directory; yield the NBD URL once it
    accepts connections.  The server is killed (by its PID) and the
    directory removed at the end."""
    with start(filename, fmt, read_only, shared, member, bitmap,
               backing_chain) as (url, ready):
        ready()
        yield url


@contextlib.contextmanager
def start(filename, fmt=None, read_only=True, shared=8, member=None,
          bitmap=None, backing_chain=True):
    """``serve()`` without waiting: yield ``(url, ready)``, qemu-nbd
    started; ``ready()`` waits until it accepts connections (Error if it
    failed) and may be called from any thread, any number of times.  The
    caller gets ready meanwhile: qemu-nbd takes ~10 ms to open the image."""
    tmp = tempfile.mkdtemp(prefix="imageio-client-")
    sock = os.path.join(tmp, "nbd.sock")
    spec = image_spec(filename, member)
    if fmt is None:
        fmt = info(filename, member)["format"]
    # --persistent: the readiness probe's connection must not end it.
    argv = ["qemu-nbd", "--persistent", "--socket", sock,
            "--shared", str(shared),
            "--allocation-depth", "--cache", "writeback"]
    if read_only:
        argv.append("--read-only")
    else:
        argv += ["--discard", "unmap", "--detect-zeroes", "unmap"]
    if bitmap:
        argv += ["--bitmap", bitmap]
    # A backing file is followed only for a qcow2 whose chain is asked
    # for: a raw disk never has one (a qcow2 header written by its guest
    # names a host file), and other formats' parents are not ours to read.
    # Nor for a URL's image: its backing file name would be opened here.
    follow = backing_chain and fmt == "qcow2" and not is_url(filename)
    reader = None
    if is_url(filename):
        reader, file = _url_reader(filename, tmp)
        top = {"driver": fmt, "file": file}
        if fmt != "raw":
            top["backing"] = None
        argv.append("json:" + json.dumps(top))
    elif member is not None:
        # The tar member through qemu's raw driver; the top driver from
        # the probed format.
        inner = json.loads(spec[len("json:"):])
        top = {"driver": fmt, "file": inner["file"]}
        if not follow and fmt != "raw":
            top["backing"] = None
        argv.append("json:" + json.dumps(top))
    elif follow or fmt == "raw":
        argv += ["--format", fmt, filename]
    else:
        argv.append("json:" + json.dumps({
            "driver": fmt, "backing": None,
            "file": {"driver": "file", "filename": filename}}))
    log_path = os.path.join(tmp, "qemu-nbd.log")
    try:
        proc = _start(argv, log_path, "qemu-nbd", env=_nbd_env())
    except BaseException:
        _stop(reader)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    lock = threading.Lock()
    waited = []

    def ready():
        with lock:
            if not waited:
                _wait_socket(proc, sock, log_path)
                waited.append(True)

    try:
        yield "nbd:unix:" + sock, ready
    finally:
        _stop(proc)
        _stop(reader)
        shutil.rmtree(tmp, ignore_errors=True)


def _start(argv, log_path, name, env=None):
    with open(log_path, "w") as log:
        try:
            return subprocess.Popen(argv, stdout=log, stderr=log,
                                    stdin=subprocess.DEVNULL, env=env,
                                    preexec_fn=_die_with_parent)
        except FileNotFoundError:
            raise Error("{} is not installed (Debian: qemu-utils)".format(
                name))


def _stop(proc):
    if proc is not None:
        proc.kill()
        proc.wait()


def _url_reader(url, tmp):
    """What qemu-nbd reads a URL's bytes through: nbdkit's curl plugin
    when installed (a process, returned to be stopped), else qemu's curl
    driver.  qemu 7.2's curl driver can stall for good under a client
    that reads while it waits on a slow target (an upload to a slow disk:
    no request for 24 s, the transfer hung); nbdkit's plugin serves each
    request on a thread of its own."""
    if shutil.which("nbdkit") is None:
        return None, {"driver": url.split(":", 1)[0], "url": url}
    sock = os.path.join(tmp, "curl.sock")
    log_path = os.path.join(tmp, "nbdkit.log")
    proc = _start(["nbdkit", "--foreground", "--readonly", "--unix", sock,
                   "curl", "url=" + url], log_path, "nbdkit")
    try:
        _wait_socket(proc, sock, log_path)
    except BaseException:
        _stop(proc)
        raise
    return proc, {"driver": "nbd",
                  "server": {"type": "unix", "path": sock}}


# qemu-nbd allocates a buffer per request (2 MiB here).  Above glibc's
# mmap threshold each is a fresh mmap: page faults and zeroed pages per
# request, and sending from fresh pages was 40% of an upload's CPU (perf:
# qemu-nbd's _copy_from_iter and page faults).  Keeping them in the heap
# took the client side from 1.15 to 0.78 CPU-s per 0.5 GiB of data.
MALLOC_TUNABLES = ("glibc.malloc.mmap_threshold=33554432:"
                   "glibc.malloc.trim_threshold=268435456")


def _nbd_env():
    env = dict(os.environ)
    mine = env.get("GLIBC_TUNABLES")
    env["GLIBC_TUNABLES"] = mine + ":" + MALLOC_TUNABLES if mine \
        else MALLOC_TUNABLES
    return env


def _die_with_parent():
    # In the child before exec: a client killed by SIGKILL cannot kill its
    # qemu-nbd, so the kernel does.  (The signal comes when the thread
    # that started qemu-nbd ends: serve() from a thread that outlives the
    # transfer.)
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _accepts(path):
    # The socket file exists before qemu-nbd listens and opens the image.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _wait_socket(proc, sock, log_path):
    deadline = time.monotonic() + START_TIMEOUT
    while not _accepts(sock):
        if proc.poll() is not None:
            with open(log_path) as f:
                raise Error(_last_line(f.read()) or "qemu-nbd failed")
        if time.monotonic() > deadline:
            raise Error("qemu-nbd did not start in {} s".format(
                START_TIMEOUT))
        time.sleep(0.01)
