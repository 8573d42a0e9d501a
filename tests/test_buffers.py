"""imageio.buffers: the bounded pool of transfer buffers."""

import threading
import time

import pytest

from imageio import buffers, errors

MiB = 1024**2


def test_bounded_smaller_under_pressure_then_503():
    pool = buffers.Pool(64 * MiB, wait=0.2)
    got = []
    start = time.monotonic()
    with pytest.raises(errors.ServiceUnavailable) as e:
        while True:
            got.append(pool.get(8 * MiB))
    assert time.monotonic() - start >= 0.2
    assert "max_buffer_memory" in str(e.value)
    sizes = [len(b) for b in got]
    assert sum(sizes) == 64 * MiB
    # Full buffers while the budget is large, then halved down to 1 MiB.
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[-1] == buffers.MIN_SIZE
    assert all(len(b) % 4096 == 0 for b in got)


def test_release_reuses_and_wakes_waiter():
    pool = buffers.Pool(2 * MiB, wait=5)
    a, b = pool.get(8 * MiB), pool.get(8 * MiB)
    assert len(a) == len(b) == buffers.MIN_SIZE
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.get(8 * MiB)))
    waiter.start()
    time.sleep(0.2)
    assert not got
    pool.release(a)
    waiter.join(5)
    assert got and got[0] is a
    assert pool.stats() == {"limit": 2 * MiB, "used": 2 * MiB,
                            "allocated": 2 * MiB}


def test_reserve_counts_against_the_limit():
    # Memory held outside the pool's buffers (a zstd PUT's decoder) is
    # counted with them: a transfer then waits, then gets 503.
    pool = buffers.Pool(16 * MiB, wait=0.2)
    pool.reserve(12 * MiB)
    buf = pool.get(8 * MiB)
    assert len(buf) <= 4 * MiB
    with pytest.raises(errors.ServiceUnavailable):
        pool.reserve(12 * MiB)
    pool.unreserve(12 * MiB)
    pool.release(buf)
    # A free buffer makes room for a reservation.
    pool.reserve(14 * MiB)
    assert pool.stats()["allocated"] <= 16 * MiB
    pool.unreserve(14 * MiB)
    assert pool.stats()["used"] == 0
