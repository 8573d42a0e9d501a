"""The resume journal: work items confirmed written, one ``START LENGTH``
line each, in the user's state directory.  A transfer run again with
``--resume`` skips them; a finished transfer removes its journal."""

import hashlib
import os


def state_dir():
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "imageio")


class Journal:
    """Items of one transfer (direction, local file, URL) confirmed
    written."""

    def __init__(self, direction, filename, url):
        key = "\0".join((direction, os.path.abspath(filename), url))
        name = hashlib.sha256(key.encode()).hexdigest()[:24] + ".journal"
        self.path = os.path.join(state_dir(), name)
        self._file = None

    def load(self):
        """Return the set of (start, length) confirmed by an earlier run."""
        done = set()
        try:
            with open(self.path) as f:
                for line in f:
                    parts = line.split()
                    # A line cut by a kill is not a confirmation.
                    if len(parts) == 2 and line.endswith("\n"):
                        done.add((int(parts[0]), int(parts[1])))
        except FileNotFoundError:
            pass
        return done

    def start(self, keep):
        """Open for appending; ``keep=False`` forgets earlier runs."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._file = open(self.path, "a" if keep else "w")

    def record(self, item):
        # Written through at once: a SIGKILL loses no confirmed item.
        self._file.write("{} {}\n".format(item.start, item.length))
        self._file.flush()

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    def remove(self):
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
