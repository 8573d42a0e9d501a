"""A real Prometheus server for tests: scrapes targets on loopback, answers
PromQL through its HTTP API.

Started with a generated configuration and its data in a test's tmp_path,
waited for with bounded timeouts, stopped by the PID we started.
"""

import json
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

from .net import free_port

START_TIMEOUT = 30
STOP_TIMEOUT = 10
# Short, so a test sees its traffic within seconds.
SCRAPE_INTERVAL = "1s"

CONFIG = """\
global:
  scrape_interval: {interval}
  scrape_timeout: {interval}
  evaluation_interval: {interval}
scrape_configs:
  - job_name: imageio
    static_configs:
      - targets: [{targets}]
"""


class Prometheus:
    """``start()``, then ``query(expr)``, ``wait_for(expr, check)``,
    ``url``; ``stop()``."""

    def __init__(self, workdir, targets):
        self.workdir = str(workdir)
        self.targets = list(targets)
        self.port = None
        self.proc = None
        self.log_path = os.path.join(self.workdir, "prometheus.log")

    @property
    def url(self):
        return "http://127.0.0.1:{}".format(self.port)

    def start(self, timeout=START_TIMEOUT):
        os.makedirs(self.workdir, exist_ok=True)
        conf = os.path.join(self.workdir, "prometheus.yml")
        with open(conf, "w") as f:
            f.write(CONFIG.format(
                interval=SCRAPE_INTERVAL,
                targets=", ".join(json.dumps(t) for t in self.targets)))
        # Prometheus does not take port 0: a port free a moment ago.
        self.port = free_port()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["prometheus", "--config.file=" + conf,
                 "--storage.tsdb.path=" + os.path.join(self.workdir, "data"),
                 "--web.listen-address=127.0.0.1:{}".format(self.port)],
                stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("prometheus exited with {}:\n{}".format(
                    self.proc.returncode, self.log()))
            try:
                with urllib.request.urlopen(self.url + "/-/ready",
                                            timeout=2) as r:
                    if r.status == 200:
                        return self
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("prometheus not ready in {}s:\n{}".format(
            timeout, self.log()))

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def query(self, expr):
        """The result list of an instant query; raises on a query error."""
        url = "{}/api/v1/query?{}".format(
            self.url, urllib.parse.urlencode({"query": expr}))
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                reply = json.load(r)
        except urllib.error.HTTPError as e:
            raise AssertionError("query {!r} failed: {} {}".format(
                expr, e.code, e.read().decode(errors="replace")))
        assert reply["status"] == "success", reply
        return reply["data"]["result"]

    def value(self, expr):
        """The value of a query with one series, as float (None if no
        series)."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    def wait_for(self, expr, check, timeout=20):
        """Wait until ``check(result)`` holds for the query ``expr``; return
        the result."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if check(result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(
                    "{!r} did not reach the expected value in {}s: {}".format(
                        expr, timeout, result))
            time.sleep(0.25)

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)
