"""The guide in docs/ cannot rot: its runnable shell blocks run, its JSON
examples parse.

Convention (see docs/admin.md, "Conventions"): a fenced block whose info
string is ``sh runnable`` is run as written, in order with the other
runnable blocks of the same page, each with ``bash -e -o pipefail``, from a
directory that looks like the top of the source tree (an ``examples/``
directory) while a daemon started there with ``ovirt-imageio -c examples``
is running.  Blocks of one page share files, tickets and servers; each page
starts from scratch.

So that the test never collides with a daemon, an NBD server or files of
whoever else uses this machine, it runs every page in a private temporary
directory and replaces, in the blocks and in its copy of ``examples/``:

- the TCP ports the guide uses (``PORTS``) with free ports;
- ``/var/tmp/`` with a directory of its own.

Nothing else is changed: the commands are the guide's.

Every ```json block must parse, and every one that looks like a ticket
(it has "uuid" and "url") must pass the daemon's ticket validation.
"""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from imageio import tickets
from harness import net

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(TOP, "docs")
EXAMPLES = os.path.join(TOP, "examples")

# Ports the guide uses: the remote service of the example daemon, a second
# daemon's remote service and control service, NBD servers, the example
# daemon's metrics listener, a Prometheus server.
PORTS = ("54322", "54323", "54324", "10809", "10810", "10811", "54325",
         "9090")

# Bound for one block (some copy a 1 GiB sparse image over HTTPS).
BLOCK_TIMEOUT = 240
DAEMON_START_TIMEOUT = 30

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


class Block:

    def __init__(self, path, line, info, text):
        self.path = path
        self.line = line
        self.info = info.split()
        self.text = text

    @property
    def lang(self):
        return self.info[0] if self.info else ""

    @property
    def runnable(self):
        return self.lang == "sh" and "runnable" in self.info[1:]

    def where(self):
        return "{}:{}".format(os.path.relpath(self.path, TOP), self.line)


def parse_blocks(path):
    """Fenced code blocks of a markdown file, in order."""
    blocks = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m or (m.group("fence")[0] == "`" and "`" in m.group("info")):
            i += 1
            continue
        fence = m.group("fence")
        start = i + 1  # The opening fence's line number.
        body = []
        i += 1
        while i < len(lines):
            line = lines[i]
            stripped = line.strip()
            if stripped.startswith(fence[0] * len(fence)) and \
                    set(stripped) == {fence[0]}:
                break
            body.append(line)
            i += 1
        blocks.append(Block(path, start, m.group("info").strip(),
                            "\n".join(body) + "\n"))
        i += 1
    return blocks


def doc_files():
    return sorted(glob.glob(os.path.join(DOCS, "*.md")))


def runnable_docs():
    return [p for p in doc_files()
            if any(b.runnable for b in parse_blocks(p))]


def _ids(paths):
    return [os.path.basename(p) for p in paths]


# Parsing the markdown (the test's own machinery).

def test_parse_blocks(tmp_path):
    md = tmp_path / "x.md"
    md.write_text(
        "text\n"
        "```sh runnable\n"
        "echo one\n"
        "```\n"
        "````json\n"
        "{\"a\": \"```\"}\n"
        "````\n"
        "~~~\n"
        "plain\n"
        "~~~\n"
        "inline ```code``` is not a fence\n")
    blocks = parse_blocks(str(md))
    assert [(b.lang, b.runnable, b.text, b.line) for b in blocks] == [
        ("sh", True, "echo one\n", 2),
        ("json", False, "{\"a\": \"```\"}\n", 5),
        ("", False, "plain\n", 8),
    ]


def test_docs_exist():
    names = _ids(doc_files())
    for name in ("admin.md", "api.md"):
        assert name in names
    assert runnable_docs(), "no runnable blocks in docs/"


# JSON examples.

@pytest.mark.parametrize("path", doc_files(), ids=_ids(doc_files()))
def test_json_blocks(path):
    for block in parse_blocks(path):
        if block.lang != "json":
            continue
        try:
            value = json.loads(block.text)
        except ValueError as e:
            pytest.fail("{}: invalid JSON: {}".format(block.where(), e))
        if isinstance(value, dict) and "uuid" in value and "url" in value:
            try:
                tickets.validate(value)
            except Exception as e:
                pytest.fail("{}: invalid ticket: {}".format(block.where(), e))


# Links between the pages, and to files of the tree.

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path):
    """GitHub's anchors for the headings of a markdown file."""
    result = set()
    with open(path, encoding="utf-8") as f:
        text = f.read()
    # Headings inside code blocks are not headings.
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    for line in text.splitlines():
        m = re.match(r"#{1,6} (.*)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower())
            result.add(slug.replace(" ", "-"))
    return result


def test_anchors():
    assert anchors(os.path.join(DOCS, "urls.md")) >= {
        "holes---allocation-depth", "https-proxying", "nbd"}


@pytest.mark.parametrize("path", doc_files(), ids=_ids(doc_files()))
def test_links(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # External.
        file, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) \
            if file else path
        assert os.path.exists(dest), "{}: broken link {}".format(
            os.path.basename(path), target)
        if anchor:
            assert anchor in anchors(dest), "{}: no anchor {}".format(
                os.path.basename(path), target)


# Runnable blocks.

def free_port():
    return str(net.free_port())


class Workspace:
    """A private copy of the top of the tree for one page: ``examples/``
    (configuration and ticket files, no pki or run state), ``bin/`` with the
    project's commands for this Python, and the substitutions."""

    def __init__(self):
        # Short: unix socket paths under it must stay under 108 bytes.
        self.dir = tempfile.mkdtemp(prefix="imageio-docs-", dir="/tmp")
        self.vartmp = os.path.join(self.dir, "var") + "/"
        os.makedirs(self.vartmp)
        ports = set()
        self.subs = [("/var/tmp/", self.vartmp)]
        for p in PORTS:
            port = free_port()
            while port in ports:
                port = free_port()
            ports.add(port)
            self.subs.append((p, port))
        self._copy_examples()
        self.bin = os.path.join(self.dir, "bin")
        self._write_commands()
        self.daemon = None
        self.daemon_log = os.path.join(self.dir, "daemon.log")
        self.groups = []

    def substitute(self, text):
        for old, new in self.subs:
            text = text.replace(old, new)
        return text

    def _copy_examples(self):
        dst = os.path.join(self.dir, "examples")
        for root, dirs, files in os.walk(EXAMPLES):
            rel = os.path.relpath(root, EXAMPLES)
            # Runtime state of whoever ran the examples here.
            dirs[:] = [d for d in dirs if rel != "." or d not in
                       ("run", "pki")]
            os.makedirs(os.path.join(dst, rel), exist_ok=True)
            for name in files:
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    text = f.read()
                with open(os.path.join(dst, rel, name), "w",
                          encoding="utf-8") as f:
                    f.write(self.substitute(text))

    def _write_commands(self):
        # The installed entry points, bound to the Python running the tests
        # and this source tree; python3 too, for the guide's one-liners.
        os.makedirs(self.bin)
        commands = {
            "ovirt-imageio": "-m imageio.daemon",
            "ovirt-imageioctl": "-m imageio.admin.ctl",
            "ovirt-img": "-m imageio.client.cli",
            "python3": "",
            "python": "",
        }
        for name, args in commands.items():
            path = os.path.join(self.bin, name)
            with open(path, "w") as f:
                f.write("#!/bin/sh\nexec {} {} \"$@\"\n".format(
                    sys.executable, args))
            os.chmod(path, 0o755)

    def env(self):
        env = dict(os.environ)
        env["PATH"] = self.bin + os.pathsep + env.get("PATH", "")
        env["PYTHONPATH"] = TOP + (
            os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.pop("NOTIFY_SOCKET", None)
        return env

    def start_daemon(self):
        """``ovirt-imageio -c examples``, as the guide starts it."""
        log = open(self.daemon_log, "w")
        self.daemon = subprocess.Popen(
            ["ovirt-imageio", "-c", "examples"], cwd=self.dir,
            env=self.env(), stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        while time.monotonic() < deadline:
            if " Ready" in self.read(self.daemon_log):
                return
            if self.daemon.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError("daemon did not start:\n" +
                           self.read(self.daemon_log))

    def run(self, block):
        """Run ``block``; return (exit code or None on timeout, output)."""
        script = os.path.join(self.dir, "block-{}.sh".format(block.line))
        with open(script, "w") as f:
            f.write(self.substitute(block.text))
        out_path = script + ".out"
        # Output to a file, not a pipe: servers a block leaves running
        # (qemu-nbd --fork, nbdkit) must not keep the test waiting.
        with open(out_path, "w") as out:
            proc = subprocess.Popen(
                ["bash", "-e", "-o", "pipefail", script], cwd=self.dir,
                env=self.env(), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        self.groups.append(proc.pid)
        try:
            rc = proc.wait(BLOCK_TIMEOUT)
        except subprocess.TimeoutExpired:
            rc = None
        return rc, self.read(out_path)

    @staticmethod
    def read(path):
        try:
            with open(path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def close(self):
        # What the blocks left running: their process groups, and servers
        # that wrote pid files into the workspace.
        for pgid in self.groups:
            _signal_group(pgid, signal.SIGKILL)
        for path in glob.glob(os.path.join(self.dir, "**", "*.pid"),
                              recursive=True):
            try:
                pid = int(self.read(path).strip())
            except ValueError:
                continue
            _kill_if_ours(pid, self.dir)
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(30)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _signal_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_if_ours(pid, workdir):
    """Kill ``pid`` only if its command line names our workspace: a stale
    pid file must not kill someone else's process."""
    try:
        with open("/proc/{}/cmdline".format(pid), "rb") as f:
            cmdline = f.read().decode("utf-8", "replace")
    except OSError:
        return
    if workdir in cmdline:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("path", runnable_docs(), ids=_ids(runnable_docs()))
def test_runnable_blocks(path):
    blocks = [b for b in parse_blocks(path) if b.runnable]
    ws = Workspace()
    try:
        ws.start_daemon()
        for block in blocks:
            rc, out = ws.run(block)
            # Shown with pytest -s, or on failure.
            print("=== {} (exit {})\n{}".format(block.where(), rc, out))
            if rc != 0:
                pytest.fail(
                    "{}: block {} (exit {}):\n--- block ---\n{}"
                    "--- output ---\n{}\n--- daemon log (tail) ---\n{}"
                    .format(block.where(),
                            "timed out" if rc is None else "failed", rc,
                            ws.substitute(block.text), out[-6000:],
                            ws.read(ws.daemon_log)[-4000:]))
    finally:
        ws.close()
