"""What a ticket counts: bytes transferred (overlapping ranges once), the
operations running on it, and its transfer rate.  Pure bookkeeping, no
locks: the ticket's lock guards them (imageio.tickets).
"""

import bisect

class RangeSet:
    """Byte ranges as sorted, merged [start, end) pairs: counts overlapping
    transfers once.  Adding a range costs O(log n) plus the ranges it
    merges, so millions of small random reads stay cheap."""

    def __init__(self):
        self._starts = []
        self._ends = []
        self._total = 0

    def add(self, start, end):
        if end <= start:
            return
        # Ranges i..j-1 overlap or touch [start, end).
        i = bisect.bisect_left(self._ends, start)
        j = bisect.bisect_right(self._starts, end)
        if i < j:
            start = min(start, self._starts[i])
            end = max(end, self._ends[j - 1])
            for k in range(i, j):
                self._total -= self._ends[k] - self._starts[k]
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]
        self._total += end - start

    def ranges(self):
        return list(zip(self._starts, self._ends))

    def total(self, extra=()):
        """Bytes covered, including ``extra`` ranges not yet added."""
        if not extra:
            return self._total
        tmp = RangeSet()
        tmp._starts = list(self._starts)
        tmp._ends = list(self._ends)
        tmp._total = self._total
        for s, e in extra:
            tmp.add(s, e)
        return tmp._total


class Operation:
    """A running transfer registered with its ticket, for accounting."""

    def __init__(self, offset, length):
        self.offset = offset
        self.length = length
        self.done = 0
        # Bytes of ``done`` already given to the ticket's RateMeter, and
        # when: set by the ticket under its lock.
        self.metered = 0
        self.metered_at = None


# Seconds over which a ticket's ``rate`` is measured.
RATE_WINDOW = 5


class RateMeter:
    """Bytes per second over the last ``RATE_WINDOW`` seconds.

    Bytes are reported with the span of time they moved in (``add``) and
    spread evenly over it into one-second buckets, so a long request that
    reports 10 GiB at once counts them over the minute it took, not in the
    second it ended.  Fed when operations end and when the rate is asked,
    never per chunk.  Not thread-safe: the ticket's lock guards it.
    """

    def __init__(self, window=RATE_WINDOW):
        self._window = window
        self._buckets = [0.0] * window
        # The second (int) that _buckets[-1] holds.
        self._last = None
        # Start of the current burst of activity: a transfer that began 1 s
        # ago is measured over 1 s, not over the whole window.
        self._since = None
        self._end = None

    def _advance(self, second):
        if self._last is None or second - self._last >= self._window:
            self._buckets = [0.0] * self._window
        elif second > self._last:
            shift = second - self._last
            self._buckets = self._buckets[shift:] + [0.0] * shift
        else:
            return
        self._last = second

    def add(self, nbytes, start, end):
        """Account ``nbytes`` moved between monotonic times ``start`` and
        ``end`` (seconds)."""
        if nbytes <= 0:
            return
        if self._end is None or start - self._end > self._window:
            self._since = start
        self._end = end if self._end is None else max(self._end, end)
        self._advance(int(end))
        first = self._last - self._window + 1  # The oldest second held.
        if end <= start:
            if int(end) >= first:
                self._buckets[int(end) - first] += nbytes
            return
        per_second = nbytes / (end - start)
        t = max(start, float(first))
        while t < end:
            second = int(t)
            stop = min(end, second + 1.0)
            self._buckets[second - first] += per_second * (stop - t)
            t = stop

    def rate(self, now):
        """Bytes per second over the window ending at ``now``."""
        if self._last is None:
            return 0.0
        self._advance(int(now))
        span = now - (self._last - self._window + 1)
        if self._since is not None:
            span = min(span, now - self._since)
        if span <= 0:
            return 0.0
        return sum(self._buckets) / max(span, 0.1)
