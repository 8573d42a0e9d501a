"""imageio.workers: threads follow the work, not the connections."""

import logging
import threading
import time

from imageio import ratelog
from imageio import workers


def test_threads_follow_active_tasks_and_exit_when_idle(monkeypatch):
    monkeypatch.setattr(workers, "WORKER_IDLE", 0.2)
    w = workers.Workers("t", ratelog.RateLimitedLog(logging.getLogger("t")))
    release = threading.Event()
    done = []
    for i in range(4):
        w.submit(lambda i=i: (release.wait(5), done.append(i)))
    time.sleep(0.1)
    assert w.count == 4
    release.set()
    deadline = time.monotonic() + 5
    while w.count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(done) == [0, 1, 2, 3]
    assert w.count == 0


def test_idle_thread_takes_the_next_task():
    w = workers.Workers("t", ratelog.RateLimitedLog(logging.getLogger("t")))
    names = []
    for _ in range(5):
        ev = threading.Event()
        w.submit(lambda ev=ev: (names.append(
            threading.current_thread().name), ev.set()))
        assert ev.wait(5)
        time.sleep(0.02)
    assert len(set(names)) == 1
    w.stop()


def test_task_failure_is_logged_not_fatal(caplog):
    w = workers.Workers("t", ratelog.RateLimitedLog(logging.getLogger("t")))
    ok = threading.Event()
    with caplog.at_level(logging.ERROR):
        w.submit(lambda: 1 / 0)
        w.submit(ok.set)
        assert ok.wait(5)
        deadline = time.monotonic() + 5
        while "worker task failed" not in caplog.text:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    w.stop()
