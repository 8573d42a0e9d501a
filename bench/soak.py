"""Soak: one daemon, several tickets, several client processes doing mixed
GET/PUT/PATCH/extents/checksum/OPTIONS for minutes; memory must stay flat,
errors must be 0 and the images' checksums must equal what was written.

    .venv/bin/python -m bench.soak --minutes 5

Not run in CI.  Every client process owns a disjoint set of 1 MiB blocks
of every image (block % clients == client), writes them with content that
is a pure function of (ticket, block, generation) in unaligned pieces,
zeroes some, and reads its own blocks back to verify them; it also reads
random ranges anywhere, lists extents, asks for checksums and options, on
HTTPS and on the unix socket, reconnecting now and then.  At the end the
parent rebuilds every image from the clients' last generations, hashes it
locally (the daemon's block hash: blake2b-32 over 4 MiB blocks) and
compares with ``GET /images/ID/checksum`` and with the bytes on storage.

The daemon's RSS (VmRSS from /proc/PID/status), threads and open fds are
sampled every 10 s; the report gives start, after the first minute
(warm-up: buffers and thread pools), end and max.
"""

import argparse
import hashlib
import http.client
import json
import multiprocessing
import os
import random
import shutil
import socket
import ssl
import sys
import tempfile
import time
import traceback

from . import peers
from . import tls

KiB = 1024
MiB = 1024**2
BLOCK = MiB
CHECKSUM_BLOCK = 4 * MiB


# Content.

def block_data(ticket, block, gen):
    """The bytes of ``block`` of ``ticket`` at generation ``gen`` (0 is
    zeroes: never written, or zeroed)."""
    if not gen:
        return bytes(BLOCK)
    return random.Random((ticket << 40) | (block << 20) | gen).randbytes(
        BLOCK)


def block_hash(chunks):
    """The daemon's checksum of an image given as an iterable of bytes."""
    outer = hashlib.blake2b(digest_size=32)
    buf = bytearray()
    for chunk in chunks:
        buf += chunk
        while len(buf) >= CHECKSUM_BLOCK:
            outer.update(hashlib.blake2b(
                bytes(buf[:CHECKSUM_BLOCK]), digest_size=32).digest())
            del buf[:CHECKSUM_BLOCK]
    if buf:
        outer.update(hashlib.blake2b(bytes(buf), digest_size=32).digest())
    return outer.hexdigest()


# Process sampling.

def proc_sample(pid):
    out = {}
    with open("/proc/{}/status".format(pid)) as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:", "Threads:")):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0])
    out["fds"] = len(os.listdir("/proc/{}/fd".format(pid)))
    return out


# Clients.

class Client:

    def __init__(self, index, nclients, tickets, daemon_info, deadline,
                 seed):
        self.index = index
        self.nclients = nclients
        self.tickets = tickets          # [(uuid, size)]
        self.info = daemon_info
        self.deadline = deadline
        self.rng = random.Random(seed)
        self.gens = {t: {} for t in range(len(tickets))}
        self.counts = {}
        self.bytes = {"read": 0, "written": 0}
        self.errors = []
        self.cons = {}
        self.uses = {}
        self.next_gen = 0

    # Connections.

    def _connect(self, transport):
        if transport == "unix":
            con = peers.UnixHTTPConnection(self.info["unix"], timeout=60)
        else:
            ctx = ssl.create_default_context(cafile=self.info["cert"])
            con = http.client.HTTPSConnection(
                self.info["host"], self.info["port"], context=ctx,
                timeout=60)
        return con

    def con(self, t):
        con = self.cons.get(t)
        if con is None or self.uses[t] > self.rng.randint(20, 200):
            if con is not None:
                con.close()
            con = self._connect(self.rng.choice(("unix", "https")))
            self.cons[t] = con
            self.uses[t] = 0
        self.uses[t] += 1
        return con

    def drop(self, t):
        con = self.cons.pop(t, None)
        if con is not None:
            con.close()

    def request(self, t, method, url, body=None, headers=None):
        con = self.con(t)
        try:
            con.request(method, url, body=body, headers=headers or {})
            resp = con.getresponse()
            data = resp.read()
        except Exception:
            self.drop(t)
            raise
        if resp.will_close:
            self.drop(t)
        return resp.status, data

    def error(self, what):
        if len(self.errors) < 50:
            self.errors.append(what)
        else:
            self.errors.append("...")
            del self.errors[50:]

    # Operations.

    def own_blocks(self, t):
        nblocks = self.tickets[t][1] // BLOCK
        return list(range(self.index, nblocks, self.nclients))

    def expected(self, t, block):
        return block_data(t, block, self.gens[t].get(block, 0))

    def op_put(self, t):
        uid = self.tickets[t][0]
        block = self.rng.choice(self.own_blocks(t))
        # Generations only need to be new: blocks have one owner.
        self.next_gen += 1
        gen = self.next_gen
        data = block_data(t, block, gen)
        # 1-3 unaligned pieces; flush on the last one, sometimes.
        cuts = sorted(self.rng.sample(range(1, BLOCK), self.rng.randint(0, 2)))
        bounds = [0] + cuts + [BLOCK]
        for i in range(len(bounds) - 1):
            first = block * BLOCK + bounds[i]
            last = block * BLOCK + bounds[i + 1] - 1
            flush = "y" if i == len(bounds) - 2 and self.rng.random() < 0.5 \
                else "n"
            status, body = self.request(
                t, "PUT", "/images/{}?flush={}".format(uid, flush),
                body=data[bounds[i]:bounds[i + 1]],
                headers={"Content-Range": "bytes {}-{}/*".format(
                    first, last)})
            if status != 200:
                # Unknown content now: stop verifying this block.
                self.gens[t][block] = None
                self.error("PUT {} {}-{}: {} {!r}".format(
                    t, first, last, status, body[:200]))
                return
            self.bytes["written"] += last - first + 1
        self.gens[t][block] = gen

    def op_zero(self, t):
        uid = self.tickets[t][0]
        block = self.rng.choice(self.own_blocks(t))
        msg = {"op": "zero", "offset": block * BLOCK, "size": BLOCK,
               "flush": self.rng.random() < 0.3}
        status, body = self.request(t, "PATCH", "/images/" + uid,
                                    body=json.dumps(msg).encode())
        if status != 200:
            self.gens[t][block] = None
            self.error("PATCH zero {} {}: {} {!r}".format(
                t, block, status, body[:200]))
            return
        self.gens[t][block] = 0

    def op_flush(self, t):
        status, body = self.request(
            t, "PATCH", "/images/" + self.tickets[t][0],
            body=json.dumps({"op": "flush"}).encode())
        if status != 200:
            self.error("PATCH flush {}: {} {!r}".format(t, status, body))

    def op_verify(self, t):
        uid = self.tickets[t][0]
        block = self.rng.choice(self.own_blocks(t))
        if self.gens[t].get(block, 0) is None:
            return
        start = self.rng.randrange(BLOCK)
        length = self.rng.randint(1, BLOCK - start)
        offset = block * BLOCK + start
        status, body = self.request(t, "GET", "/images/" + uid, headers={
            "Range": "bytes={}-{}".format(offset, offset + length - 1)})
        if status != 206:
            self.error("GET {} {}+{}: {} {!r}".format(
                t, offset, length, status, body[:200]))
            return
        self.bytes["read"] += len(body)
        if body != self.expected(t, block)[start:start + length]:
            self.error("GET {} {}+{}: wrong data".format(t, offset, length))

    def op_read_any(self, t):
        uid, size = self.tickets[t]
        length = self.rng.randint(1, 4 * MiB)
        offset = self.rng.randrange(size - length)
        status, body = self.request(t, "GET", "/images/" + uid, headers={
            "Range": "bytes={}-{}".format(offset, offset + length - 1)})
        if status != 206 or len(body) != length:
            self.error("GET any {} {}+{}: {} {}".format(
                t, offset, length, status, len(body)))
        self.bytes["read"] += len(body)

    def op_extents(self, t):
        uid, size = self.tickets[t]
        status, body = self.request(t, "GET", "/images/{}/extents".format(uid))
        if status != 200:
            self.error("extents {}: {} {!r}".format(t, status, body[:200]))
            return
        pos = 0
        for e in json.loads(body):
            if e["start"] != pos:
                self.error("extents {}: gap at {}".format(t, pos))
                return
            pos += e["length"]
        if pos != size:
            self.error("extents {}: end {} != {}".format(t, pos, size))

    def op_checksum(self, t):
        status, body = self.request(
            t, "GET", "/images/{}/checksum".format(self.tickets[t][0]))
        if status != 200 or "checksum" not in json.loads(body):
            self.error("checksum {}: {} {!r}".format(t, status, body[:200]))

    def op_options(self, t):
        status, body = self.request(t, "OPTIONS",
                                    "/images/" + self.tickets[t][0])
        if status != 200:
            self.error("options {}: {} {!r}".format(t, status, body[:200]))

    OPS = [("verify", 30), ("put", 25), ("read_any", 15), ("extents", 10),
           ("zero", 5), ("flush", 5), ("options", 5), ("checksum", 2)]

    def run(self):
        names = [n for n, _ in self.OPS]
        weights = [w for _, w in self.OPS]
        while time.monotonic() < self.deadline:
            t = self.rng.randrange(len(self.tickets))
            name = self.rng.choices(names, weights)[0]
            try:
                getattr(self, "op_" + name)(t)
            except Exception as e:
                self.error("{} {}: {}".format(name, t, "".join(
                    traceback.format_exception_only(type(e), e)).strip()))
            self.counts[name] = self.counts.get(name, 0) + 1
        for t in list(self.cons):
            self.drop(t)
        return {"index": self.index, "gens": self.gens,
                "counts": self.counts, "bytes": self.bytes,
                "errors": self.errors}


def client_main(args):
    index, nclients, tickets, info, deadline_wall, seed, queue = args
    # Wall clock across processes; monotonic within.
    deadline = time.monotonic() + max(0, deadline_wall - time.time())
    try:
        queue.put(Client(index, nclients, tickets, info, deadline,
                         seed).run())
    except Exception:
        queue.put({"index": index, "gens": {}, "counts": {}, "bytes": {},
                   "errors": [traceback.format_exc()]})


# The run.

def start_qemu_nbd(path, sock, log):
    qemu_nbd = shutil.which("qemu-nbd")
    if not qemu_nbd:
        return None
    proc = peers.spawn([qemu_nbd, "--persistent", "--shared=16",
                        "--format", "raw", "--cache", "none", "--socket",
                        sock, path], log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None
        if os.path.exists(sock):
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(sock)
                return proc
            except OSError:
                pass
        time.sleep(0.05)
    peers.stop_process(proc)
    return None


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.soak",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--clients", type=int, default=4,
                   help="client processes (default 4; at most 8: one "
                        "connection per ticket each)")
    p.add_argument("--tickets", type=int, default=3,
                   help="file tickets (default 3); one NBD ticket more "
                        "when qemu-nbd is installed")
    p.add_argument("--size-mib", type=int, default=64,
                   help="image size in MiB (default 64)")
    p.add_argument("--dir", default="/var/tmp",
                   help="where the images live (default /var/tmp)")
    p.add_argument("--json", help="also write the report here")
    p.add_argument("--keep", action="store_true",
                   help="keep the work dir (daemon log, images)")
    args = p.parse_args(argv)
    if not 1 <= args.clients <= 8:
        p.error("--clients must be 1..8")

    work = tempfile.mkdtemp(prefix="imageio-soak-", dir=args.dir)
    size = args.size_mib * MiB
    key, cert = tls.make_cert(os.path.join(work, "pki"))
    daemon = peers.Daemon("imageio", os.path.join(work, "daemon"), key, cert)
    nbd_proc = None
    report = {"minutes": args.minutes, "clients": args.clients,
              "size": size, "workdir": work}
    try:
        daemon.start()
        images = []
        for i in range(args.tickets):
            path = os.path.join(work, "image{}.raw".format(i))
            with open(path, "wb") as f:
                f.truncate(size)
            images.append(("file", path, None))
        nbd_path = os.path.join(work, "nbd.raw")
        with open(nbd_path, "wb") as f:
            f.truncate(size)
        nbd_sock = os.path.join(work, "nbd.sock")
        nbd_proc = start_qemu_nbd(nbd_path, nbd_sock,
                                  os.path.join(work, "qemu-nbd.log"))
        if nbd_proc:
            images.append(("nbd", nbd_path,
                           "nbd+unix:///?socket=" + nbd_sock))
        tickets = []
        for i, (kind, path, url) in enumerate(images):
            uid = daemon.add_ticket("t{}".format(i), path, size=size,
                                    ops=("read", "write"), url=url)
            tickets.append((uid, size))
        report["tickets"] = [kind for kind, _, _ in images]

        pid = daemon.pid
        samples = [(0.0, proc_sample(pid))]
        info = {"unix": daemon.unix_socket, "host": daemon.https[0],
                "port": daemon.https[1], "cert": cert}
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        start = time.time()
        deadline = start + args.minutes * 60
        procs = [ctx.Process(target=client_main, args=((
            i, args.clients, tickets, info, deadline, 1000 + i, queue),))
            for i in range(args.clients)]
        for pr in procs:
            pr.start()
        print("soak: {} clients, {} tickets ({}), {} MiB each, {} min; "
              "daemon pid {}".format(args.clients, len(tickets),
                                     ", ".join(report["tickets"]),
                                     args.size_mib, args.minutes, pid),
              flush=True)
        results = []
        next_sample = time.time() + 10
        while len(results) < len(procs):
            try:
                results.append(queue.get(timeout=1))
            except Exception:
                pass
            if time.time() >= next_sample:
                s = proc_sample(pid)
                samples.append((time.time() - start, s))
                print("  {:6.0f}s rss {} KiB, threads {}, fds {}".format(
                    time.time() - start, s["VmRSS"], s["Threads"],
                    s["fds"]), flush=True)
                next_sample += 10
            if time.time() > deadline + 300:
                raise RuntimeError("clients did not finish")
        for pr in procs:
            pr.join(30)
        # Let connection threads notice the clients are gone.
        time.sleep(2)
        samples.append((time.time() - start, proc_sample(pid)))

        errors = [e for r in results for e in r["errors"]]
        counts = {}
        for r in results:
            for k, v in r["counts"].items():
                counts[k] = counts.get(k, 0) + v
        moved = {"read": sum(r["bytes"].get("read", 0) for r in results),
                 "written": sum(r["bytes"].get("written", 0)
                                for r in results)}

        # The images as written, hashed locally, against the daemon.
        checks = []
        con = peers.UnixHTTPConnection(daemon.unix_socket, timeout=300)
        for t, (uid, _) in enumerate(tickets):
            gens = {}
            for r in results:
                gens.update(r["gens"].get(t, {}))
            unknown = [b for b, g in gens.items() if g is None]
            expected = block_hash(block_data(t, b, gens.get(b, 0) or 0)
                                  for b in range(size // BLOCK))
            con.request("GET", "/images/{}/checksum".format(uid))
            resp = con.getresponse()
            body = resp.read()
            daemon_sum = json.loads(body)["checksum"] \
                if resp.status == 200 else "HTTP {}".format(resp.status)
            with open(images[t][1], "rb") as f:
                stored = block_hash(iter(lambda: f.read(CHECKSUM_BLOCK),
                                         b""))
            checks.append({"ticket": t, "kind": images[t][0],
                           "local": expected, "daemon": daemon_sum,
                           "storage": stored,
                           "blocks_written": sum(1 for g in gens.values()
                                                 if g and g > 0),
                           "unknown_blocks": len(unknown),
                           "equal": expected == daemon_sum == stored
                           and not unknown})
        con.close()

        by_time = sorted(samples)
        warm = next((s for t, s in by_time if t >= 60), by_time[-1][1])
        report.update({
            "requests": counts, "total_requests": sum(counts.values()),
            "bytes": moved, "errors": len(errors),
            "error_samples": errors[:20],
            "rss_kib": {"start": by_time[0][1]["VmRSS"],
                        "after_1min": warm["VmRSS"],
                        "end": by_time[-1][1]["VmRSS"],
                        "max": max(s["VmRSS"] for _, s in by_time)},
            "threads": {"start": by_time[0][1]["Threads"],
                        "end": by_time[-1][1]["Threads"]},
            "fds": {"start": by_time[0][1]["fds"],
                    "end": by_time[-1][1]["fds"]},
            "checksums": checks,
            "checksums_equal": all(c["equal"] for c in checks),
        })
    finally:
        daemon.stop()
        if nbd_proc:
            peers.stop_process(nbd_proc)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(json.dumps({k: v for k, v in report.items()
                      if k not in ("checksums",)}, indent=2))
    for c in report["checksums"]:
        print("  ticket {ticket} ({kind}): {blocks_written} blocks written, "
              "daemon {daemon:.16}.. local {local:.16}.. storage "
              "{storage:.16}.. equal={equal}".format(**c))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    ok = report["errors"] == 0 and report["checksums_equal"]
    print("soak: {}".format("OK" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
