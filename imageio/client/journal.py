"""The resume journal: work items confirmed written and flushed, one
``START LENGTH`` line each, in the user's state directory, after a first
line naming the source it was written for.  A transfer run again with
``--resume`` skips them; a finished transfer removes its journal."""

import hashlib
import json
import os
import threading
import time

from .. import errors

# Confirmed items are flushed (the target's data made durable) and then
# journaled at most this many seconds apart: a request answered 200 may
# still sit in a cache the next run cannot rely on.
FLUSH_INTERVAL = 1.0


def state_dir():
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "imageio")


def file_identity(path):
    """What tells a local file's content changed between two runs: its
    size, modification time (ns), inode and device."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "inode": st.st_ino, "device": st.st_dev}


def source_identity(name):
    """``file_identity`` of a local file; of an http(s) URL, what its
    server says of it (HEAD: length, Last-Modified, ETag)."""
    if not name.startswith(("http://", "https://")):
        return file_identity(name)
    import urllib.request
    identity = {"url": name}
    try:
        req = urllib.request.Request(name, method="HEAD")
        with urllib.request.urlopen(req, timeout=30) as resp:
            for header in ("Content-Length", "Last-Modified", "ETag"):
                if resp.headers.get(header):
                    identity[header.lower()] = resp.headers[header]
    except OSError:
        pass
    return identity


class Journal:
    """Items of one transfer (direction, local file, URL) confirmed
    written and flushed, for the source ``identity`` (a dict: for an
    upload the source's size, mtime and inode)."""

    def __init__(self, direction, filename, url, identity=None):
        local = filename if filename.startswith(("http://", "https://")) \
            else os.path.abspath(filename)
        key = "\0".join((direction, local, url))
        name = hashlib.sha256(key.encode()).hexdigest()[:24] + ".journal"
        self.path = os.path.join(state_dir(), name)
        self.filename = filename
        self.identity = identity or {}
        self._file = None
        self._flush = None
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._pending = []
        self._last_flush = time.monotonic()

    def load(self):
        """Return the set of (start, length) confirmed by an earlier run;
        raise errors.Error if that run's source differs from this one's
        (a resume would mix two images)."""
        done = set()
        try:
            with open(self.path) as f:
                head = f.readline()
                if not head.startswith("# ") or \
                        json.loads(head[2:]) != self.identity:
                    raise errors.Error(
                        "Cannot resume: {} changed since the interrupted "
                        "run (size, modification time or inode differ); "
                        "run again without --resume to start over".format(
                            self.filename))
                for line in f:
                    parts = line.split()
                    # A line cut by a kill is not a confirmation.
                    if len(parts) == 2 and line.endswith("\n"):
                        done.add((int(parts[0]), int(parts[1])))
        except FileNotFoundError:
            pass
        except ValueError:
            raise errors.Error("Cannot resume: the journal {} is "
                               "damaged; run again without --resume"
                               .format(self.path))
        return done

    def start(self, keep, flush=None):
        """Open for appending; ``keep=False`` forgets earlier runs.
        ``flush()`` makes the target's confirmed writes durable: items
        are journaled only after a flush that followed them."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._flush = flush
        if keep and os.path.exists(self.path):
            self._file = open(self.path, "a")
        else:
            self._file = open(self.path, "w")
            self._write("# " + json.dumps(self.identity, sort_keys=True))

    def _write(self, text):
        # Written through at once: a SIGKILL loses no journaled item.
        self._file.write(text + "\n")
        self._file.flush()

    def record(self, item):
        """``item`` was confirmed written; journaled after the next flush
        (called by the workers, outside their lock: one of them flushes
        at most every FLUSH_INTERVAL seconds)."""
        with self._lock:
            self._pending.append(item)
            now = time.monotonic()
            if self._flush is not None and \
                    now - self._last_flush < FLUSH_INTERVAL:
                return
            batch, self._pending = self._pending, []
            self._last_flush = now
        self._commit(batch)

    def _commit(self, batch):
        # One flush at a time (one connection); a batch is journaled only
        # after a flush that began after its items were confirmed.
        with self._flush_lock:
            if self._flush is not None:
                self._flush()
            self._journal(batch)

    def _journal(self, batch):
        with self._lock:
            if self._file is not None:
                for item in batch:
                    self._write("{} {}".format(item.start, item.length))

    def close(self):
        """Close without journaling items not yet flushed."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def remove(self):
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
