"""imageio.accounting: transferred ranges counted once, the rate meter."""

import pytest

from imageio import accounting

MiB = 1024**2


def test_rangeset():
    r = accounting.RangeSet()
    for s, e in [(10, 20), (30, 40), (15, 35), (0, 5), (5, 10)]:
        r.add(s, e)
    assert r.ranges() == [(0, 40)]
    assert r.total() == 40
    r.add(50, 60)
    assert r.total(extra=[(55, 70)]) == 60
    assert r.total() == 50


def test_rangeset_random_against_reference():
    import random
    rnd = random.Random(42)
    r = accounting.RangeSet()
    covered = set()
    for _ in range(2000):
        s = rnd.randrange(0, 5000)
        e = s + rnd.randrange(0, 60)
        r.add(s, e)
        covered.update(range(s, e))
        assert r.total() == len(covered)
    ranges = r.ranges()
    # Sorted, merged, not touching.
    for (s1, e1), (s2, e2) in zip(ranges, ranges[1:]):
        assert e1 < s2


def test_rate_meter_spreads_a_long_request():
    m = accounting.RateMeter(window=5)
    # 100 MiB moved over 10 seconds, reported at once at the end.
    m.add(100 * MiB, 1000.0, 1010.0)
    # Only the last 5 seconds count: 10 MiB/s.
    assert m.rate(1010.0) == pytest.approx(10 * MiB, rel=0.05)
    assert m.rate(1020.0) == 0


def test_rate_meter_young_transfer():
    m = accounting.RateMeter(window=5)
    m.add(10 * MiB, 2000.0, 2001.0)
    # One second of activity is measured over one second.
    assert m.rate(2001.0) == pytest.approx(10 * MiB, rel=0.05)
    # Idle afterwards: the rate falls as the window moves on.
    assert m.rate(2004.5) < 4 * MiB
    assert m.rate(2007.0) == 0
