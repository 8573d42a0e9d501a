"""End-to-end transfers with the project's client (TARGETS.md "End-to-end
transfers with the project's own client"), side by side in one run:

- imageio: ``ovirt-img`` + this daemon, its default command line
  (verification on);
- imageio-no-verify: the same with ``--no-verify``, an extra row;
- established: ``ovirt_imageio.client`` 2.5.1 + the established daemon
  (its own virtualenv, bench/peers.py);
- qemu-img: ``qemu-img convert`` of the same qcow2 to raw locally, the
  limit of the pipe (no daemon).

    python -m bench.client [--size BYTES] [--repeats N] [--scenario S ...]
                           [--netns] [--verify]

Scenarios: ``upload`` (the qcow2 to a sparse raw file ticket), ``download``
(to qcow2), ``upload_1t`` (a 1 TiB qcow2 holding 1 GiB). The source: a
qcow2 of ``--size`` bytes (2 GiB) with about half random data in runs of
1-16 MiB, on /dev/shm.  ``--netns``: the clients run in another network
namespace and reach the daemons over HTTPS (no unix socket).  ``--verify``
is accepted and does nothing: the default command line is always measured.
Rounds interleave the stacks; every result is checked with ``qemu-img
compare``; prints times (best, spread) and ratios, and writes JSON with
``--out``.
"""

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

from harness import nbdserver

from . import cpu, images, peers, tls

MiB = 1024**2
GiB = 1024 * MiB
TiB = 1024 * GiB
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVIRT_IMG = os.path.join(ROOT, ".venv", "bin", "ovirt-img")

ESTABLISHED_SCRIPT = peers.ESTABLISHED_CLIENT


qemu_img = nbdserver.qemu_img


def source_image(size=2 * GiB, seed=3):
    """A qcow2 of ``size`` bytes, about half random data in runs of 1-16
    MiB between holes of 1-16 MiB (made once, reused)."""
    path = os.path.join(images.SHM_DIR, f"client-src-{size // MiB}M.qcow2")
    layout = {"size": size, "seed": seed, "version": 1}
    stamp = path + ".layout.json"
    try:
        with open(stamp) as f:
            if json.load(f) == layout and os.path.exists(path):
                return path
    except (OSError, ValueError):
        pass
    os.makedirs(images.SHM_DIR, exist_ok=True)
    rnd = random.Random(seed)
    raw = path + ".raw.tmp"
    with open(raw, "wb") as f:
        f.truncate(size)
        pos = 0
        while pos < size:
            n = min(rnd.randint(1, 16) * MiB, size - pos)
            f.seek(pos)
            done = 0
            while done < n:
                k = min(8 * MiB, n - done)
                f.write(rnd.randbytes(k))
                done += k
            pos += n + rnd.randint(1, 16) * MiB
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, path)
    os.unlink(raw)
    with open(stamp, "w") as f:
        json.dump(layout, f)
    return path


def sparse_source(size=TiB, runs=256, run=4 * MiB):
    """A qcow2 of 1 TiB holding ``runs`` runs of random data (1 GiB)."""
    path = os.path.join(images.SHM_DIR, f"client-src-{size // GiB}G-"
                        f"{runs}.qcow2")
    if os.path.exists(path):
        return path
    qemu_img("create", "-f", "qcow2", path, size)
    rnd = random.Random(4)
    step = size // runs
    data = os.path.join(images.SHM_DIR, "client-run.bin")
    with open(data, "wb") as f:
        f.write(rnd.randbytes(run))
    cmds = []
    for i in range(runs):
        cmds += ["-c", f"write -s {data} {i * step} {run}"]
    subprocess.run(["qemu-io", "-f", "qcow2"] + cmds + [path], check=True,
                   capture_output=True)
    os.unlink(data)
    return path


class ClientNamespace:
    """A network namespace for the clients, joined to this one by a veth
    pair (no shaping): the daemons listen on the host end, ``host``.  The
    clients see a private tmpfs over the daemons' run directories, so no
    client can take the unix socket: every byte goes over HTTPS."""

    host = "10.219.0.1"
    peer = "10.219.0.2"

    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.ns = "imageio-client-" + tag
        self.dev, self.ns_dev = "icl{}a".format(tag), "icl{}b".format(tag)
        self.hidden = []
        ip = ["ip"]
        steps = [
            ip + ["netns", "add", self.ns],
            ip + ["link", "add", self.dev, "type", "veth", "peer", "name",
                  self.ns_dev],
            ip + ["link", "set", self.ns_dev, "netns", self.ns],
            ip + ["addr", "add", self.host + "/24", "dev", self.dev],
            ip + ["link", "set", self.dev, "up"],
            ip + ["-n", self.ns, "addr", "add", self.peer + "/24", "dev",
                  self.ns_dev],
            ip + ["-n", self.ns, "link", "set", self.ns_dev, "up"],
            ip + ["-n", self.ns, "link", "set", "lo", "up"],
        ]
        try:
            for argv in steps:
                subprocess.run(argv, check=True, capture_output=True,
                               timeout=30)
        except BaseException:
            self.close()
            raise

    def wrap(self, argv):
        mounts = "".join("mount -t tmpfs tmpfs {} && ".format(d)
                         for d in self.hidden)
        return ["ip", "netns", "exec", self.ns, "sh", "-c",
                mounts + 'exec "$@"', "sh"] + list(argv)

    def close(self):
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True,
                       timeout=30)
        subprocess.run(["ip", "link", "del", self.dev], capture_output=True,
                       timeout=30)


class Stacks:
    """Both daemons, started once; clients run in ``netns`` (a name or
    None)."""

    def __init__(self, workdir, netns=None):
        self.workdir = workdir
        addresses = (netns.host,) if netns else ()
        self.key, self.cert = tls.make_cert(workdir, addresses)
        self.netns = netns
        self.daemons = {}
        for kind in ("imageio", "established"):
            d = peers.Daemon(kind, os.path.join(workdir, kind), self.key,
                             self.cert)
            if netns:
                d.listen_host = netns.host
                netns.hidden.append(d.run_dir)
            d.start()
            self.daemons[kind] = d
        self.established_python = os.path.join(
            os.path.dirname(peers.ensure_established()), "python")

    def stop(self):
        for d in self.daemons.values():
            d.stop()

    def ticket(self, kind, name, path, size, ops):
        d = self.daemons[kind]
        d.add_ticket(name, path, size=size, ops=ops, sparse=True)
        host, port = d.https
        if self.netns:
            host = self.netns.host
        return f"https://{host}:{port}{d.path(name)}"

    def client(self, kind, op, url, path, verify=True):
        if kind == "established":
            argv = [self.established_python, "-c", ESTABLISHED_SCRIPT, op,
                    url, path, self.cert]
        else:
            argv = [OVIRT_IMG, op]
            argv += [path, url] if op == "upload" else [url, path]
            argv += ["--cafile", self.cert, "-o", "json"]
            if not verify:
                argv.append("--no-verify")
        if self.netns:
            argv = self.netns.wrap(argv)
        daemon = self.daemons[kind].pid
        d0 = cpu.process_tree_seconds(daemon)
        c0 = _children_seconds()
        t0 = time.perf_counter()
        r = subprocess.run(argv, capture_output=True, text=True, timeout=900)
        t = time.perf_counter() - t0
        # CPU of the client with its qemu-nbd, and of the daemon: what
        # bounds a transfer on a 2-core machine.
        self.last_cpu = (_children_seconds() - c0,
                         cpu.process_tree_seconds(daemon) - d0)
        if r.returncode != 0:
            raise RuntimeError(f"{kind} {op}: {r.stderr.strip()[-2000:]}")
        return t


def _children_seconds():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_scenario(stacks, scenario, src, repeats, verify):
    size = int(json.loads(qemu_img("info", "--output", "json", src))
               ["virtual-size"])
    # The default command line (verification on) is "imageio", what the
    # ratios use; --no-verify an extra row.
    kinds = ["imageio", "imageio-no-verify", "established", "qemu-img"]
    times = {k: [] for k in kinds}
    tmp = os.path.join(images.SHM_DIR, f"client-bench-{os.getpid()}")
    os.makedirs(tmp, exist_ok=True)
    try:
        for rep in range(repeats + 1):  # Round 0 warms up.
            for kind in kinds:
                t = _one(stacks, scenario, kind, src, size, tmp, rep)
                if rep:
                    times[kind].append(t)
                cpus = ""
                if kind != "qemu-img":
                    cpus = "  (cpu: client {:.2f} s, daemon {:.2f} s)".format(
                        *stacks.last_cpu)
                print(f"  {scenario:<10} {kind:<15} round {rep}: {t:.2f} s"
                      + cpus, file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return times


def _one(stacks, scenario, kind, src, size, tmp, rep):
    daemon = "established" if kind == "established" else "imageio"
    verify = kind != "imageio-no-verify"
    target = os.path.join(tmp, f"target-{kind}.raw")
    if os.path.exists(target):
        os.unlink(target)
    if kind == "qemu-img":
        out = os.path.join(tmp, "convert.raw")
        t0 = time.perf_counter()
        qemu_img("convert", "-f", "qcow2", "-O", "raw", src, out)
        t = time.perf_counter() - t0
        os.unlink(out)
        return t
    if scenario.startswith("upload"):
        with open(target, "wb") as f:
            f.truncate(size)
        url = stacks.ticket(daemon, f"up-{kind}-{rep}", target, size,
                            ("read", "write"))
        t = stacks.client(daemon, "upload", url, src, verify)
        _compare(src, "qcow2", target, "raw")
    else:
        # The image to download: the source, uploaded once per daemon.
        served = os.path.join(tmp, f"served-{daemon}.raw")
        if not os.path.exists(served):
            qemu_img("convert", "-f", "qcow2", "-O", "raw", src, served)
        url = stacks.ticket(daemon, f"down-{kind}-{rep}", served, size,
                            ("read",))
        out = os.path.join(tmp, f"download-{kind}.qcow2")
        if os.path.exists(out):
            os.unlink(out)
        t = stacks.client(daemon, "download", url, out, verify)
        _compare(src, "qcow2", out, "qcow2")
        os.unlink(out)
    if os.path.exists(target):
        os.unlink(target)
    return t


def _compare(a, fa, b, fb):
    r = subprocess.run(["qemu-img", "compare", "-f", fa, "-F", fb, a, b],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"qemu-img compare {a} {b}: {r.stdout} "
                           f"{r.stderr}")


def summary(times):
    best = {k: min(v) for k, v in times.items() if v}
    out = {"best": best, "median": {k: statistics.median(v)
                                    for k, v in times.items() if v},
           "spread": {k: [min(v), max(v)] for k, v in times.items() if v}}
    ours = best.get("imageio")
    if ours:
        out["ratio_to_established"] = ours / best["established"]
        out["ratio_to_qemu_img"] = ours / best["qemu-img"]
        if "imageio-no-verify" in best:
            out["verify_overhead"] = ours / best["imageio-no-verify"] - 1
            med = out["median"]
            out["verify_overhead_median"] = \
                med["imageio"] / med["imageio-no-verify"] - 1
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.client",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=2 * GiB)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scenario", action="append",
                   choices=("upload", "download", "upload_1t"))
    p.add_argument("--netns", action="store_true")
    p.add_argument("--verify", action="store_true",
                   help="no effect: the default (verifying) command line "
                   "is always measured, --no-verify beside it")
    p.add_argument("--out")
    args = p.parse_args(argv)
    scenarios = args.scenario or ["upload", "download"]
    workdir = tempfile.mkdtemp(prefix="imageio-bench-client-")
    netns = None
    if args.netns:
        netns = ClientNamespace()
    stacks = Stacks(workdir, netns)
    results = {}
    try:
        for s in scenarios:
            src = sparse_source() if s == "upload_1t" else \
                source_image(args.size)
            results[s] = summary(run_scenario(stacks, s, src, args.repeats,
                                              args.verify))
            print(json.dumps({s: results[s]}, indent=1))
    finally:
        stacks.stop()
        if netns:
            netns.close()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
