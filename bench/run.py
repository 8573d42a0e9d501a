"""Run the benchmark suite and write a report.

    python -m bench.run [--quick] [--out DIR] [--servers KINDS] [-k EXPR]
                        [--e2e] [-- PYTEST ARGS]

Writes under bench/results/<timestamp>/ (or DIR): benchmark.json (raw
pytest-benchmark data), report.md (scenario, ours, each peer, ratios, CPU
s/GiB, targets), report.png (ours vs each peer per scenario) and logs/ (the
servers' logs), and prints the markdown. Exits with pytest's status (0
when everything ran or was skipped).
"""

import argparse
import datetime
import json
import os
import subprocess
import sys

from . import report

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
E2E = ["bench/test_e2e_file.py", "bench/test_e2e_nbd.py",
       "bench/test_e2e_sparse.py", "bench/test_e2e_client.py",
       "bench/test_e2e_nbdserve.py"]


def run_pytest(out_dir, targets, quick=False, servers=None, keyword=None,
               extra=(), quiet=False):
    """Run pytest-benchmark on targets; return (exit code, json, skips)."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "benchmark.json")
    skiplog = os.path.join(out_dir, "skipped.txt")
    if os.path.exists(skiplog):
        os.unlink(skiplog)
    env = dict(os.environ, IMAGEIO_BENCH_SKIPLOG=skiplog,
               IMAGEIO_BENCH_LOGS=os.path.join(out_dir, "logs"))
    if quick:
        env["IMAGEIO_BENCH_QUICK"] = "1"
    if servers:
        env["IMAGEIO_BENCH_SERVERS"] = servers
    cmd = [sys.executable, "-m", "pytest", *targets,
           "-p", "no:cacheprovider", "-p", "bench.skiplog",
           # Transfers of 2 GiB with several peers outlast the tests' limit.
           "-o", "timeout=1800",
           "-rs", "-q",
           f"--benchmark-json={json_path}",
           "--benchmark-columns=median,min,max,rounds",
           "--benchmark-sort=name"]
    if keyword:
        cmd += ["-k", keyword]
    cmd += list(extra)
    res = subprocess.run(cmd, cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL if quiet else None)
    skipped = []
    if os.path.exists(skiplog):
        with open(skiplog) as f:
            skipped = [line.rstrip("\n") for line in f if line.strip()]
    if not os.path.exists(json_path):
        # pytest-benchmark writes nothing when no benchmark ran; the report
        # still says what was skipped and why.
        with open(json_path, "w") as f:
            json.dump({"benchmarks": []}, f)
    return res.returncode, json_path, skipped


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Run the benchmarks and write a report.")
    p.add_argument("--quick", action="store_true",
                   help="fewer rounds and requests (about 2 minutes)")
    p.add_argument("--out", help="results directory "
                   "(default bench/results/<timestamp>)")
    p.add_argument("--servers", help="comma separated server kinds to run "
                   "(imageio,established,nginx,dd); default all")
    p.add_argument("-k", dest="keyword", help="pytest -k expression")
    p.add_argument("--e2e", action="store_true",
                   help="only the end-to-end scenarios, not the micro "
                   "benchmarks")
    p.add_argument("pytest_args", nargs="*",
                   help="more pytest arguments (after --)")
    args = p.parse_args(argv)

    out = args.out or os.path.join(
        HERE, "results", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    targets = E2E if args.e2e else ["bench"]
    code, json_path, skipped = run_pytest(
        out, targets, quick=args.quick, servers=args.servers,
        keyword=args.keyword, extra=args.pytest_args)
    md_path, png_path, md = report.write(json_path, out, skipped=skipped)
    print(md)
    print(f"bench: wrote {json_path}, {md_path}, {png_path}")
    return 0 if code == 5 else code


if __name__ == "__main__":
    sys.exit(main())
