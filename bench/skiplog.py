"""pytest plugin (-p bench.skiplog): append one line per skipped or failed
test to the file named by $IMAGEIO_BENCH_SKIPLOG, so the report can say what
was not measured and why."""

import os


def pytest_runtest_logreport(report):
    path = os.environ.get("IMAGEIO_BENCH_SKIPLOG")
    if not path or not (report.skipped or report.failed):
        return
    if report.skipped:
        reason = report.longrepr
        if isinstance(reason, tuple):
            reason = reason[2]
        reason = str(reason).replace("Skipped: ", "").strip()
        line = reason.splitlines()[0] if reason else "skipped"
    else:
        crash = getattr(report.longrepr, "reprcrash", None)
        msg = crash.message if crash else str(report.longrepr)
        line = f"FAILED ({report.when}): " + msg.strip().splitlines()[0]
    with open(path, "a") as f:
        f.write(f"{report.nodeid}: {line}\n")
