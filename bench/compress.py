"""Compressed transfers over a 1 Gbit/s link (docs/benchmarks.md,
"Compression").

    flock -x /tmp/imageio-cpu.lock .venv/bin/python -m bench.compress [--reps N]

The link: a network namespace holding the daemon, joined to this one by a
veth pair whose both ends are shaped with ``tc qdisc ... tbf rate 1gbit``
(the only shaper this kernel has).  The daemon's local service is off, so
every client goes over the link (TLS, as from another host).

The image: an ext4 file system of 2 GiB built by ``mkfs.ext4 -d`` from a
tree of /usr's binaries, libraries, headers and Python sources (hard links,
about 1.4 GB: the whole of /usr does not fit in 2 GiB here) into a sparse
file, cached in ``IMAGEIO_BENCH_CACHE`` (default /var/tmp/imageio-bench)
and copied for the run into ``--dir`` (default /dev/shm: the shared disk is
not what is measured).

Rows, each run ``--reps`` times, interleaved: curl GET of the whole image
with and without ``--compressed``; curl PUT of the whole image, plain and
zstd-coded; the established ovirt-imageio 2.5.1 client's upload and
download; ``ovirt-img`` upload and download with and without
``--compress`` (when imageio.client is installed).  Then, on the unshaped
unix socket of a daemon outside the namespace: curl GET not asking for
compression, from this tree's daemon and from the daemon of ``--base
COMMIT`` (before compression existed), to show that not asking costs
nothing.  Every download and upload is checked
byte for byte on the first repeat.
"""

import argparse
import json
import os
import shutil
import statistics
import resource
import subprocess
import sys
import tempfile
import time
import uuid

from harness.daemonproc import Daemon, TOP

from imageio import tls

from . import cpu, peers

ROOT = TOP

GiB = 1024**3
IMAGE_SIZE = 2 * GiB
CACHE = os.environ.get("IMAGEIO_BENCH_CACHE", "/var/tmp/imageio-bench")
# What goes into the file system: the parts of /usr a guest's root holds
# most of (programs, shared libraries, headers, Python).
USR_PARTS = ["bin", "sbin", "libexec", "include", "lib/x86_64-linux-gnu",
             "lib/python3", "lib/python3.11"]
RATE = "1gbit"
SERVER_ADDR = "169.254.91.2"
CLIENT_ADDR = "169.254.91.1"
TIMEOUT = 600

CLIENT_SCRIPT = """
import sys
from {module} import client
op, url, path, cafile = sys.argv[1:5]
kw = {{"compress": True}} if sys.argv[5:] == ["compress"] else {{}}
if op == "upload":
    client.upload(path, url, cafile, **kw)
else:
    client.download(url, path, cafile, fmt="raw", **kw)
"""


# Link rows to run (--only); empty: all.
ONLY = []


def run(argv, **kw):
    kw.setdefault("timeout", TIMEOUT)
    r = subprocess.run(argv, capture_output=True, **kw)
    if r.returncode != 0:
        raise RuntimeError("{} failed: {}".format(
            " ".join(map(str, argv[:3])), r.stderr.decode()[-2000:]))
    return r


def build_image():
    """The cached ext4 image; built the first time (about a minute)."""
    path = os.path.join(CACHE, "usr-ext4-2g.raw")
    if os.path.exists(path):
        return path
    os.makedirs(CACHE, exist_ok=True)
    tree = tempfile.mkdtemp(prefix="usr-tree-", dir=CACHE)
    try:
        for part in USR_PARTS:
            src = os.path.join("/usr", part)
            if os.path.isdir(src):
                dst = os.path.join(tree, part)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                # Hard links: the tree costs no copy.
                run(["cp", "-al", src, dst])
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.truncate(IMAGE_SIZE)
        run(["mkfs.ext4", "-q", "-F", "-d", tree, tmp])
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    return path


def allocated(path):
    return os.stat(path).st_blocks * 512


class Link:
    """A namespace for the daemon, a veth pair shaped to RATE both ways."""

    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.ns = "imageio-bench-" + tag
        self.host_dev, self.ns_dev = "ibz{}a".format(tag), "ibz{}b".format(tag)

    def __enter__(self):
        ip = ["ip"]
        run(ip + ["netns", "add", self.ns])
        try:
            run(ip + ["link", "add", self.host_dev, "type", "veth", "peer",
                      "name", self.ns_dev])
            run(ip + ["link", "set", self.ns_dev, "netns", self.ns])
            run(ip + ["addr", "add", CLIENT_ADDR + "/24", "dev",
                      self.host_dev])
            run(ip + ["link", "set", self.host_dev, "up"])
            run(ip + ["-n", self.ns, "addr", "add", SERVER_ADDR + "/24",
                      "dev", self.ns_dev])
            run(ip + ["-n", self.ns, "link", "set", self.ns_dev, "up"])
            run(ip + ["-n", self.ns, "link", "set", "lo", "up"])
            for prefix, dev in (([], self.host_dev),
                                (["ip", "netns", "exec", self.ns],
                                 self.ns_dev)):
                run(prefix + ["tc", "qdisc", "add", "dev", dev, "root", "tbf",
                              "rate", RATE, "burst", "512kb", "latency",
                              "20ms"])
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        # Deleting the namespace removes the pair.
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True,
                       timeout=30)
        subprocess.run(["ip", "link", "del", self.host_dev],
                       capture_output=True, timeout=30)


def start_daemon(workdir, link=None, tree=None):
    """Our daemon: in the link's namespace (remote service on the link,
    local service off), or here with its unix socket.  ``tree``: run that
    source tree's daemon (with its .venv) instead of this one's."""
    if link:
        tls.create_dev_pki(os.path.join(workdir, "pki/key.pem"),
                           os.path.join(workdir, "pki/cert.pem"),
                           os.path.join(workdir, "pki/ca.pem"),
                           hosts=("server",), addresses=(SERVER_ADDR,))
        extra = ("[remote]\nhost = {}\nport = 54322\n[local]\nenable = false\n"
                 .format(SERVER_ADDR))
        prefix = ["ip", "netns", "exec", link.ns]
    else:
        extra, prefix = "", []
    extra += "[logger_root]\nlevel = INFO\nhandlers = stderr\n"
    # The daemon runs ``sys.executable -m imageio.daemon`` in ``top``: this
    # venv's Python then imports that tree's imageio (the current
    # directory comes first on sys.path).
    d = Daemon(workdir, extra, prefix=prefix, top=tree or TOP)
    return d.start()


def ticket(daemon, path, ops=("read", "write")):
    t = {"uuid": str(uuid.uuid4()), "size": IMAGE_SIZE,
         "url": "file://" + path, "timeout": 3600, "ops": list(ops)}
    daemon.add_ticket(t)
    return t


def fresh_target(path):
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
    return path


def same(a, b):
    return subprocess.run(["cmp", "-s", a, b], timeout=TIMEOUT).returncode == 0


class Bench:

    def __init__(self, image, workdir, daemon, url, reps):
        self.image = image
        self.workdir = workdir
        self.daemon = daemon
        self.url = url
        self.reps = reps
        self.results = {}
        self.target = os.path.join(workdir, "target.raw")
        self.out = os.path.join(workdir, "out.raw")

    def measure(self, name, func, check):
        """Time func() once; check (first repeat) that it moved the image
        byte for byte."""
        before = cpu.process_tree_seconds(self.daemon.proc.pid)
        children = _children_seconds()
        start = time.monotonic()
        func()
        elapsed = time.monotonic() - start
        used = cpu.process_tree_seconds(self.daemon.proc.pid) - before
        client = _children_seconds() - children
        rows = self.results.setdefault(name, [])
        if not rows and not check():
            raise RuntimeError("{}: data differs".format(name))
        rows.append((elapsed, used))
        print("{:32s} {:7.2f} s  daemon cpu {:6.2f} s  client cpu {:6.2f} s"
              .format(name, elapsed, used, client), flush=True)


def _children_seconds():
    # The client (curl, zstd, python and its qemu-nbd): waited-for
    # children of this process.
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def curl_base(daemon, t, ca):
    return ["curl", "--fail", "-sS", "--cacert", ca,
            "https://{}:54322/images/{}".format(SERVER_ADDR, t["uuid"])]


def rows_link(b, ca, established_python, our_client):
    t = ticket(b.daemon, b.image, ops=["read"])
    w = ticket(b.daemon, b.target)
    get = curl_base(b.daemon, t, ca)
    put = curl_base(b.daemon, w, ca)
    url = put[-1]
    check_out = lambda: same(b.out, b.image)  # noqa: E731
    check_target = lambda: same(b.target, b.image)  # noqa: E731

    def put_plain():
        fresh_target(b.target)
        run(put + ["-T", b.image])

    def put_zstd():
        fresh_target(b.target)
        zstd = subprocess.Popen(["zstd", "-q", "-1", "-T2", "-c", b.image],
                                stdout=subprocess.PIPE)
        try:
            run(put + ["-T", "-", "-H", "Transfer-Encoding: zstd, chunked"],
                stdin=zstd.stdout)
        finally:
            zstd.stdout.close()
            zstd.wait(TIMEOUT)

    def client(python, module, op, compress=False):
        script = CLIENT_SCRIPT.format(module=module)
        args = [python, "-c", script, op, url,
                b.image if op == "upload" else b.out, ca]
        if compress:
            args.append("compress")

        def go():
            if op == "upload":
                fresh_target(b.target)
            elif os.path.exists(b.out):
                os.unlink(b.out)
            run(args, cwd=ROOT)
        return go

    rows = [
        ("curl GET", lambda: run(get + ["-o", b.out]), check_out),
        ("curl GET --compressed",
         lambda: run(get + ["--compressed", "-o", b.out]), check_out),
        ("curl PUT", put_plain, check_target),
        ("zstd | curl PUT (zstd-coded)", put_zstd, check_target),
        ("established client upload",
         client(established_python, "ovirt_imageio", "upload"),
         check_target),
        ("established client download",
         client(established_python, "ovirt_imageio", "download"),
         check_out),
    ]
    if our_client:
        rows += [
            ("ovirt-img upload", client(sys.executable, "imageio", "upload"),
             check_target),
            ("ovirt-img upload --compress",
             client(sys.executable, "imageio", "upload", True),
             check_target),
            ("ovirt-img download",
             client(sys.executable, "imageio", "download"), check_out),
            ("ovirt-img download --compress",
             client(sys.executable, "imageio", "download", True),
             check_out),
        ]
    if ONLY:
        rows = [r for r in rows if any(o in r[0] for o in ONLY)]
    for _ in range(b.reps):
        for name, func, check in rows:
            b.measure(name, func, check)


def export_tree(commit, workdir):
    """``commit``'s source tree with its extensions built, in workdir."""
    tree = os.path.join(workdir, "base-tree")
    os.makedirs(tree)
    archive = subprocess.Popen(["git", "-C", ROOT, "archive", commit],
                               stdout=subprocess.PIPE)
    run(["tar", "-x", "-C", tree], stdin=archive.stdout)
    archive.wait(TIMEOUT)
    run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=tree)
    return tree


def rows_unix(image, workdir, reps, base_tree=None, base_name=None):
    """curl over the unix socket: this tree's daemon not asking for
    compression and asking, and the base tree's (before compression
    existed), interleaved."""
    daemons = [("this tree", start_daemon(os.path.join(workdir, "here")))]
    if base_tree:
        daemons.append((base_name, start_daemon(
            os.path.join(workdir, "base"), tree=base_tree)))
    out = os.path.join(workdir, "unix-out.raw")
    results = {}
    try:
        tickets = [(label, d, ticket(d, image, ops=["read"]))
                   for label, d in daemons]
        for rep in range(reps):
            for label, d, t in tickets:
                for name, extra in (("curl GET (unix)", []),
                                    ("curl GET --compressed (unix)",
                                     ["--compressed"])):
                    if label != "this tree" and extra:
                        continue
                    name = "{}, {}".format(name, label)
                    start = time.monotonic()
                    before = cpu.process_tree_seconds(d.proc.pid)
                    run(["curl", "--fail", "-sS", "--unix-socket",
                         d.local_socket, "-o", out] + extra
                        + ["http://localhost/images/" + t["uuid"]])
                    elapsed = time.monotonic() - start
                    used = cpu.process_tree_seconds(d.proc.pid) - before
                    if rep == 0 and not same(out, image):
                        raise RuntimeError(name + ": data differs")
                    results.setdefault(name, []).append((elapsed, used))
                    print("{:32s} {:7.2f} s  daemon cpu {:6.2f} s".format(
                        name, elapsed, used), flush=True)
    finally:
        for _, d in daemons:
            d.stop()
    return results


def summary(results):
    lines = ["| row | seconds (median, min-max) | MB/s of image | "
             "daemon CPU s |", "|---|---|---|---|"]
    for name, rows in results.items():
        times = [r[0] for r in rows]
        cpus = [r[1] for r in rows]
        med = statistics.median(times)
        lines.append("| {} | {:.2f} ({:.2f}-{:.2f}) | {:.0f} | {:.2f} |"
                     .format(name, med, min(times), max(times),
                             IMAGE_SIZE / med / 1e6, statistics.median(cpus)))
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--base", metavar="COMMIT",
                   help="also run the unix socket rows on this commit's "
                   "daemon (exported and built in a temporary directory), "
                   "e.g. the commit before compression")
    p.add_argument("--skip-link", action="store_true")
    p.add_argument("--only", action="append", metavar="TEXT",
                   help="only the link rows whose name contains TEXT")
    p.add_argument("--dir", default="/dev/shm",
                   help="where the image, targets and downloads live "
                   "(default /dev/shm: memory, so the link and the CPU are "
                   "measured, not a shared disk)")
    args = p.parse_args()
    ONLY[:] = args.only or []

    cached = build_image()
    established = os.path.join(os.path.dirname(peers.ensure_established()),
                               "python")
    try:
        import imageio.client  # noqa: F401
        our_client = hasattr(imageio.client, "upload")
    except ImportError:
        our_client = False
    results = {}
    workdir = tempfile.mkdtemp(prefix="imageio-bench-compress-",
                               dir=args.dir)
    try:
        image = os.path.join(workdir, "usr-ext4-2g.raw")
        run(["cp", "--sparse=always", cached, image])
        print("image {}: {} bytes, {} allocated".format(
            image, IMAGE_SIZE, allocated(image)), flush=True)
        if not args.skip_link:
            with Link() as link:
                d = start_daemon(os.path.join(workdir, "link"), link)
                try:
                    b = Bench(image, workdir, d, None, args.reps)
                    rows_link(b, d.ca_file, established, our_client)
                    results.update(b.results)
                finally:
                    d.stop()
        base = export_tree(args.base, workdir) if args.base else None
        results.update(rows_unix(image, workdir, args.reps, base,
                                 args.base))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(summary(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
