"""Extents of the 1 TiB qcow2 with 100,000 extents, whole and in 1 GiB
pieces: time and the daemon's peak RSS, our daemon side by side with the
established ovirt-imageio 2.5.1 (docs/benchmarks.md, "Extents").

    flock -x /tmp/imageio-cpu.lock .venv/bin/python -m bench.extents [--reps N]

The image is bench/nbdpeers.py's ``nbd-sparse-1t.qcow2`` (50,000 clusters
of 64 KiB spread evenly, cached on /dev/shm), served by one qemu-nbd
(``--allocation-depth``, read-only) to both daemons over the same
``nbd:unix:`` URL.  Every measurement starts a fresh daemon, adds the
ticket, settles it with a small request, reads its ``VmHWM`` (peak RSS),
runs the scenario over the local unix socket on one keep-alive
connection, and reads ``VmHWM`` again: the growth is what the scenario
cost at its peak.  Scenarios, ``--reps`` times, the daemons interleaved:

- ``whole``: one ``GET .../extents``;
- ``pieces``: 1,024 ``GET .../extents?start=S&length=1GiB``.  The
  established service ignores ``start`` and ``length`` and answers the
  whole image to each (1,024 whole answers): it is measured on 16 pieces
  and its row says so.

Every answer is checked: 100,000 extents, the data ones at the layout's
offsets; the pieces joined equal the whole answer.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

from . import clients, nbdpeers, peers, tls

GiB = 1024**3
PIECE = GiB
ESTABLISHED_PIECES = 16


def vm_hwm(pid):
    """Peak resident memory of ``pid`` in bytes."""
    with open("/proc/{}/status".format(pid)) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM for {}".format(pid))


def check_whole(got, layout):
    data = [e for e in got if not e["zero"]]
    if (len(got) != layout.extents() or len(data) != layout.clusters
            or sum(e["length"] for e in got) != layout.size
            or [e["start"] for e in data] != list(layout.offsets())):
        raise AssertionError("wrong extents: {} extents, {} data".format(
            len(got), len(data)))


def joined(pieces):
    """Piece answers joined, neighbours with equal flags merged."""
    out = []
    for piece in pieces:
        for e in piece:
            if out and out[-1]["zero"] == e["zero"] and \
                    out[-1]["hole"] == e["hole"] and \
                    out[-1]["start"] + out[-1]["length"] == e["start"]:
                out[-1] = dict(out[-1], length=out[-1]["length"] + e["length"])
            else:
                out.append(e)
    return out


def run_once(kind, scenario, export, layout, workdir, key, cert):
    d = peers.Daemon(kind, os.path.join(workdir, "{}-{}".format(
        kind, scenario)), key, cert)
    os.makedirs(d.workdir, exist_ok=True)
    d.start()
    try:
        d.add_ticket("t", None, size=layout.size, url=export.url)
        path = d.path("t")
        conn = clients.connect(d, "unix", timeout=600)
        try:
            conn.request("OPTIONS", path)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200, resp.status
            before = vm_hwm(d.pid)
            started = time.monotonic()
            if scenario == "whole":
                got = clients.get_json(conn, path + "/extents")
                requests = 1
            else:
                count = layout.size // PIECE if kind == "imageio" \
                    else ESTABLISHED_PIECES
                parts = [clients.get_json(
                    conn, "{}/extents?start={}&length={}".format(
                        path, i * PIECE, PIECE)) for i in range(count)]
                requests = count
            took = time.monotonic() - started
            peak = vm_hwm(d.pid)
        finally:
            conn.close()
    finally:
        d.stop()
    if scenario == "whole":
        check_whole(got, layout)
    elif kind == "imageio":
        check_whole(joined(parts), layout)
    return {"seconds": took, "requests": requests, "peak": peak,
            "grown": peak - before}


def spread(values):
    return "{:.2f} ({:.2f}-{:.2f})".format(
        statistics.median(values), min(values), max(values))


def mib(values):
    return "{:.0f} (+{:.1f})".format(
        statistics.median(v["peak"] for v in values) / 2**20,
        statistics.median(v["grown"] for v in values) / 2**20)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", help="write the raw results here")
    args = p.parse_args()
    layout = nbdpeers.SPARSE_1T
    image = layout.image()
    workdir = tempfile.mkdtemp(prefix="imageio-bench-extents-")
    try:
        key, cert = tls.make_cert(os.path.join(workdir, "pki"))
        export = nbdpeers.Export(image, os.path.join(workdir, "nbd.sock"),
                                 read_only=True,
                                 allocation_depth=True).start()
        results = {}
        try:
            for rep in range(args.reps):
                for scenario in ("whole", "pieces"):
                    for kind in ("imageio", "established"):
                        r = run_once(kind, scenario, export, layout,
                                     workdir, key, cert)
                        results.setdefault((scenario, kind), []).append(r)
                        print("rep {} {:7} {:11} {:7.2f} s  {:4} requests  "
                              "peak RSS {:6.1f} MiB (+{:.1f})".format(
                                  rep, scenario, kind, r["seconds"],
                                  r["requests"], r["peak"] / 2**20,
                                  r["grown"] / 2**20), flush=True)
        finally:
            export.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report(results, args.reps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"{}/{}".format(*k): v for k, v in results.items()},
                      f, indent=1)


def report(results, reps):
    print()
    print("| scenario | daemon | requests | time, s: median (min-max) | "
          "time vs established | peak RSS MiB (+growth) |")
    print("|---|---|---|---|---|---|")
    for scenario in ("whole", "pieces"):
        ours = results[(scenario, "imageio")]
        theirs = results[(scenario, "established")]
        t_ours = [r["seconds"] for r in ours]
        t_theirs = [r["seconds"] for r in theirs]
        if scenario == "pieces":
            # Per GiB of image covered: the established answers the whole
            # image to each piece request.
            per_ours = statistics.median(t_ours) / ours[0]["requests"]
            per_theirs = statistics.median(t_theirs) / theirs[0]["requests"]
            ratio = "{:.0f}x per request".format(per_theirs / per_ours)
        else:
            ratio = "{:.2f}x".format(statistics.median(t_theirs)
                                     / statistics.median(t_ours))
        print("| {} | imageio | {} | {} | {} | {} |".format(
            scenario, ours[0]["requests"], spread(t_ours), ratio, mib(ours)))
        print("| {} | established 2.5.1 | {} | {} | | {} |".format(
            scenario, theirs[0]["requests"], spread(t_theirs), mib(theirs)))
    print("({} repeats each, daemons interleaved)".format(reps))


if __name__ == "__main__":
    sys.exit(main())
