"""Tests of the benchmark harness itself (no servers, a few seconds): CPU
accounting, images, ratios and the gate's verdicts on made-up results."""

import json
import os
import subprocess
import sys
import time

from bench import cpu, images, report


def test_cpu_counts_live_children():
    # A child burning CPU for ~0.3 s is counted in its parent's tree.
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', "
            "'import time\\nt = time.process_time()\\n"
            "while time.process_time() - t < 0.3: pass\\n"
            "time.sleep(30)'])\n"
            "time.sleep(30)\n")
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 10
        while cpu.process_tree_seconds(parent.pid) < 0.3:
            assert time.monotonic() < deadline, "child CPU not counted"
            time.sleep(0.1)
    finally:
        # Kill the whole little tree we started.
        for pid in _tree(parent.pid):
            os.kill(pid, 9)
        parent.wait()


def _tree(pid):
    procs = cpu._all_processes()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(c for c, (ppid, _) in procs.items() if ppid == p)
    return out


def test_make_image_layout(tmp_path):
    path = str(tmp_path / "img.raw")
    seg = 1024 * 1024
    images.make_image(path, 5 * seg + 4096, segment=seg)
    assert os.path.getsize(path) == 5 * seg + 4096
    with open(path, "rb") as f:
        data = f.read()
    # Data, hole, data, hole, data, hole (the 4096 byte tail).
    for i in range(6):
        chunk = data[i * seg:(i + 1) * seg]
        assert (chunk.count(0) == len(chunk)) == (i % 2 == 1)
    assert images.data_size(5 * seg + 4096, seg) == 3 * seg
    # Reused while the stamp matches.
    mtime = os.path.getmtime(path)
    images.make_image(path, 5 * seg + 4096, segment=seg)
    assert os.path.getmtime(path) == mtime


def _bench(scenario, server, rep, value, cpu_, unit="MiB/s"):
    return {"name": f"test_{scenario}[{server}-{rep}]",
            "extra_info": {
                "scenario": scenario, "server": server, "label": server,
                "rep": rep, "unit": unit, "higher_is_better": unit != "s",
                "value": value, "cpu": cpu_, "client_cpu": 0.1,
                "cpu_unit": "s/GiB"}}


def _write(tmp_path, benchmarks):
    path = tmp_path / "benchmark.json"
    path.write_text(json.dumps({"benchmarks": benchmarks}))
    return str(path)


def test_ratios_and_gate(tmp_path):
    path = _write(tmp_path, [
        _bench("get_https", "imageio", 0, 1500, 0.30),
        _bench("get_https", "established", 0, 1000, 0.60),
        _bench("get_https", "imageio", 1, 900, 0.35),  # a noisy repeat
        _bench("get_https", "established", 1, 1100, 0.70),
        _bench("checksum_1g", "imageio", 0, 0.2, 0.2, unit="s"),
        _bench("checksum_1g", "established", 0, 0.5, 0.5, unit="s"),
    ])
    _, results, _ = report.load_results(path)
    ours = results["get_https"]["imageio"]
    peer = results["get_https"]["established"]
    # Best repeat against best repeat; lowest CPU against lowest.
    assert abs(report.throughput_ratio(ours, peer) - 1500 / 1100) < 1e-9
    assert abs(report.cpu_ratio(ours, peer) - 0.5) < 1e-9
    # Times: speed-up peer/ours.
    c = results["checksum_1g"]
    assert abs(report.throughput_ratio(c["imageio"], c["established"])
               - 2.5) < 1e-9

    thresholds = [
        {"scenario": "get_https", "peer": "established",
         "metric": "throughput", "target": 1.25, "threshold": 1.06},
        {"scenario": "get_https", "peer": "established",
         "metric": "cpu", "target": 0.4, "threshold": 0.45},
        {"scenario": "get_https", "peer": "nginx",
         "metric": "throughput", "target": 1.1, "threshold": 0.94},
        {"scenario": "checksum_1g", "peer": "established",
         "metric": "speedup", "target": 2.0, "threshold": 1.7},
    ]
    checks = report.evaluate(results, thresholds)
    assert [c["ok"] for c in checks] == [True, False, False, True]
    assert checks[2]["ratio"] is None  # nginx not measured: fails


def test_report_files(tmp_path):
    path = _write(tmp_path, [
        _bench("get_unix", "imageio", 0, 3000, 0.1),
        _bench("get_unix", "established", 0, 2000, 0.2),
        _bench("get_unix", "nginx", 0, 4000, 0.05),
    ])
    md_path, png_path, md = report.write(path, skipped=["x: why"])
    assert ("| GET image, unix socket | MiB/s | 3,000 | established 2.5.1 "
            "| 2,000 | **1.50×** | 0.1 | 0.2 | 0.50× | s/GiB |") in md, md
    assert "| nginx | 4,000 | **0.75×** |" in md
    assert "- x: why" in md
    assert os.path.getsize(png_path) > 1000
