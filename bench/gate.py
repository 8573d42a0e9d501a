"""The performance gate: a short run of the end-to-end scenarios that fails
when a ratio ours/peer is on the wrong side of its threshold.

    python -m bench.gate [--out DIR] [--no-retry] [-k SCENARIO ...]

Runs the scenarios named in bench/thresholds.toml (quick mode: 4 repeats
per server interleaved across servers after a warm-up round, 8 for the
ranged GETs of 1000 requests a round, a 1 GiB bulk image; about 4 minutes
on the 2-core machine (20 s of it NBD GETs through qemu-nbd, 1.5-2 minutes the 100 GiB NBD
checksum), plus about 1 minute of ovirt-img uploads and downloads, plus
about 1.5 minutes of nbdcopy through the daemon's NBD service, plus
~15 s to create the test images the first time), checks
every ratio, retries the failing scenarios once (a real regression fails
twice, a noisy neighbour rarely does), prints a table and exits:

    0  every gated ratio is within its threshold
    1  a ratio is below its threshold, or could not be measured (our daemon
       or a peer did not run): the gate never passes on missing data

Results (JSON, report.md, report.png) go to bench/results/gate-<timestamp>/.
Absolute figures are never gated.
"""

import argparse
import datetime
import os
import sys

from . import report, run

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODULES = run.E2E


def _module_of(scenario):
    for module in MODULES:
        with open(os.path.join(ROOT, module)) as f:
            if f"def test_{scenario}(" in f.read():
                return module
    raise SystemExit(f"gate: no test_{scenario} in {', '.join(MODULES)}")


def _scenario_nodes(scenarios):
    # Scenario "x" is measured by the test function "test_x".
    return [f"{_module_of(s)}::test_{s}" for s in scenarios]


def _measure(out, scenarios, size):
    os.environ["IMAGEIO_BENCH_SIZE"] = str(size)
    code, json_path, skipped = run.run_pytest(
        out, _scenario_nodes(scenarios), quick=True)
    results = {}
    if os.path.exists(json_path):
        _, results, _ = report.load_results(json_path)
        report.write(json_path, out, skipped=skipped)
    return results, skipped


def _print(checks, title):
    print(f"\n{title}")
    print(f"{'scenario':<18} {'peer':<12} {'metric':<10} {'ratio':>7} "
          f"{'threshold':>11} {'target':>8}  result")
    for c in checks:
        op = "<=" if c["metric"] == "cpu" else ">="
        ratio = f"{c['ratio']:.2f}" if c["ratio"] is not None else "-"
        if not c["gate"]:
            result = "not gated"
        elif c["ratio"] is None:
            result = "FAIL (not measured)"
        else:
            result = "ok" if c["ok"] else "FAIL"
        print(f"{c['scenario']:<18} {c['peer']:<12} {c['metric']:<10} "
              f"{ratio:>7} {op + ' ' + str(c['threshold']):>11} "
              f"{c['target']:>8}  {result}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.gate",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="results directory "
                   "(default bench/results/gate-<timestamp>)")
    p.add_argument("--no-retry", action="store_true",
                   help="fail on the first measurement")
    p.add_argument("--size-mib", type=int, default=1024,
                   help="size of the bulk image in MiB (default 1024: half "
                   "the full suite's, to keep the gate short; ratios do "
                   "not depend on it)")
    p.add_argument("-k", dest="only", action="append",
                   help="gate only this scenario (repeatable)")
    args = p.parse_args(argv)

    thresholds = [t for t in report.load_thresholds()
                  if t.get("gate", True)
                  and (not args.only or t["scenario"] in args.only)]
    if not thresholds:
        print("gate: no thresholds selected", file=sys.stderr)
        return 1
    scenarios = list(dict.fromkeys(t["scenario"] for t in thresholds))
    out = args.out or os.path.join(
        HERE, "results",
        "gate-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))

    results, skipped = _measure(out, scenarios, args.size_mib * 1024**2)
    checks = report.evaluate(results, thresholds)
    _print(checks, "gate: first measurement (best repeat of each server)")

    failing = [c for c in checks if not c["ok"]]
    ours_ran = any(report.OURS in row for row in results.values())
    if not ours_ran:
        print(f"\ngate: {report.OURS} produced no measurement: not retrying")
    if failing and ours_ran and not args.no_retry:
        again = list(dict.fromkeys(c["scenario"] for c in failing))
        print(f"\ngate: measuring again: {', '.join(again)}")
        retry_results, retry_skipped = _measure(
            os.path.join(out, "retry"), again, args.size_mib * 1024**2)
        retried = report.evaluate(
            retry_results, [t for t in thresholds if t["scenario"] in again])
        by_key = {(c["scenario"], c["peer"], c["metric"]): c
                  for c in retried}
        checks = [by_key.get((c["scenario"], c["peer"], c["metric"]), c)
                  if not c["ok"] else c for c in checks]
        skipped += retry_skipped
        _print(checks, "gate: after the retry")

    failing = [c for c in checks if not c["ok"]]
    if skipped:
        print("\ngate: not measured or failed:")
        for line in skipped:
            print(f"  {line}")
    print(f"\ngate: results in {out}")
    if failing:
        print(f"gate: FAILED: {len(failing)} of {len(checks)} ratios below "
              "threshold or not measured")
        return 1
    print(f"gate: passed: {len(checks)} ratios within thresholds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
