"""Progress for people (a tqdm bar) and for programs (JSON lines)."""

import json
import sys
import threading
import time

FORMAT_TEXT = "text"
FORMAT_JSON = "json"


class ProgressBar:
    """Bytes transferred, with the arguments of the established client's
    ``ProgressBar``; ``update(n)`` is tqdm's interface, so a tqdm object
    can be passed wherever a progress is taken.

    ``format="text"`` draws a tqdm bar (bytes, rate, time left) on
    ``output``; ``format="json"`` writes one JSON object a line with
    ``transferred``, ``size``, ``elapsed`` (s), ``rate`` (bytes/s) and
    ``phase``, at most one a percent, and a last one when closed.
    """

    def __init__(self, phase=None, error_phase="command failed", size=None,
                 output=sys.stdout, format=FORMAT_TEXT, step=None, width=79,
                 now=time.monotonic):
        if format not in (FORMAT_TEXT, FORMAT_JSON):
            raise ValueError("Unknown progress format {!r}".format(format))
        self._phase = phase
        self._error_phase = error_phase
        self._size = size
        self._output = output
        self._format = format
        self._width = width
        self._now = now
        self._start = now()
        self._lock = threading.Lock()
        self._done = 0
        self._percent = -1
        self._closed = False
        self._bar = None
        if format == FORMAT_TEXT:
            import tqdm
            self._bar = tqdm.tqdm(total=size, unit="B", unit_scale=True,
                                  unit_divisor=1024, file=output,
                                  ncols=width, desc=phase, leave=True)
        else:
            self._emit()

    @property
    def phase(self):
        return self._phase

    @phase.setter
    def phase(self, s):
        with self._lock:
            if self._closed or s == self._phase:
                return
            self._phase = s
            if self._bar is not None:
                self._bar.set_description(s)
            else:
                self._emit()

    @property
    def size(self):
        return self._size

    @size.setter
    def size(self, n):
        with self._lock:
            if self._closed or n == self._size:
                return
            self._size = n
            if self._bar is not None:
                self._bar.total = n
                self._bar.refresh()
            else:
                self._emit()

    @property
    def transferred(self):
        return self._done

    def update(self, n):
        with self._lock:
            if self._closed:
                return
            self._done += n
            if self._bar is not None:
                self._bar.update(n)
            elif self._size:
                percent = int(self._done * 100 / self._size)
                if percent > self._percent:
                    self._percent = percent
                    self._emit()

    def _emit(self):
        state = (self._done, self._size, self._phase)
        if state == getattr(self, "_last", None):
            return
        self._last = state
        elapsed = self._now() - self._start
        self._output.write(json.dumps({
            "transferred": self._done, "size": self._size,
            "elapsed": round(elapsed, 3),
            "rate": round(self._done / elapsed) if elapsed > 0 else 0,
            "phase": self._phase}) + "\n")
        self._output.flush()

    def close(self):
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._bar is not None:
                self._bar.close()
            else:
                self._emit()

    def __enter__(self):
        return self

    def __exit__(self, t, v, tb):
        if t is not None and self._error_phase:
            self.phase = self._error_phase
        self.close()
