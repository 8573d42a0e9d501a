import threading
import time

import pytest

from imageio import config
from imageio import errors
from imageio import tickets


class Clock:

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def ticket_dict(**kw):
    d = {"uuid": "a" * 36, "size": 1024, "url": "file:///var/tmp/x",
         "timeout": 300, "ops": ["read"]}
    d.update(kw)
    return d


@pytest.fixture
def store():
    return tickets.Store(config.load(files=[]))


def test_validate_defaults():
    t = tickets.validate(ticket_dict(), default_inactivity_timeout=42)
    assert t["sparse"] is False
    assert t["dirty"] is False
    assert t["inactivity_timeout"] == 42
    assert "transfer_id" not in t


def test_validate_ignores_unknown_fields():
    t = tickets.validate(ticket_dict(future_field=1))
    assert "future_field" not in t


@pytest.mark.parametrize("field", ["uuid", "size", "url", "timeout", "ops"])
def test_validate_missing_required(field):
    d = ticket_dict()
    del d[field]
    with pytest.raises(errors.BadRequest) as e:
        tickets.validate(d)
    assert "'{}'".format(field) in str(e.value)


@pytest.mark.parametrize("field,value", [
    ("size", "1024"), ("size", -1), ("size", True), ("size", 1.5),
    ("timeout", -1), ("timeout", None), ("ops", "read"),
    ("ops", ["read", "execute"]), ("ops", []), ("uuid", 42), ("uuid", ""),
    ("uuid", "../etc"), ("url", "ftp://host/x"), ("url", 5),
    ("sparse", "yes"), ("dirty", 1), ("inactivity_timeout", -5),
    ("transfer_id", 7), ("filename", ["x"]),
])
def test_validate_bad_field(field, value):
    with pytest.raises(errors.BadRequest) as e:
        tickets.validate(ticket_dict(**{field: value}))
    assert "'{}'".format(field) in str(e.value)


def test_validate_not_object():
    with pytest.raises(errors.BadRequest):
        tickets.validate(["not", "a", "ticket"])


def test_write_implies_read():
    t = tickets.Ticket(tickets.validate(ticket_dict(ops=["write"])))
    assert t.may("read") and t.may("write")
    t = tickets.Ticket(tickets.validate(ticket_dict(ops=["read"])))
    assert t.may("read") and not t.may("write")
    with pytest.raises(errors.Forbidden):
        t.authorize("write")


def test_expiry_extends_on_use():
    clock = Clock()
    t = tickets.Ticket(tickets.validate(ticket_dict(timeout=10)), clock)
    clock.now += 9
    with t.operation(0, 100):
        clock.now += 5  # active operations keep it alive
        t.authorize("read")
    clock.now += 9  # extended by timeout from the end of the operation
    t.authorize("read")
    clock.now += 2
    with pytest.raises(errors.Forbidden):
        t.authorize("read")


def test_mod_zero_expires_and_new_timeout_reenables(store):
    store.add(ticket_dict())
    store.modify("a" * 36, {"timeout": 0})
    with pytest.raises(errors.Forbidden):
        store.authorize("a" * 36, "read")
    # Kept until deleted, so it can be inspected and re-enabled.
    assert store.get("a" * 36).info()["timeout"] == 0
    store.modify("a" * 36, {"timeout": 100})
    store.authorize("a" * 36, "read")


@pytest.mark.parametrize("patch", [
    {}, {"timeout": -1}, {"timeout": "10"}, {"timeout": True}, [1],
])
def test_mod_invalid(store, patch):
    store.add(ticket_dict())
    with pytest.raises(errors.BadRequest):
        store.modify("a" * 36, patch)


def test_mod_unknown(store):
    with pytest.raises(errors.NotFound):
        store.modify("nosuch", {"timeout": 1})


def test_unknown_ticket_is_forbidden_for_images(store):
    with pytest.raises(errors.Forbidden):
        store.authorize("nosuch", "read")


def test_delete_unknown_succeeds(store):
    store.remove("nosuch", timeout=1)


def test_cancel_waits_for_operations(store):
    t = store.add(ticket_dict())
    started = threading.Event()
    stopped = []

    def transfer():
        with t.operation(0, 1024) as op:
            started.set()
            try:
                for _ in range(100):
                    time.sleep(0.01)
                    op.progress(1)
            except errors.Canceled:
                stopped.append(True)

    th = threading.Thread(target=transfer)
    th.start()
    started.wait()
    store.remove(t.uuid, timeout=5)
    th.join()
    assert stopped == [True]
    with pytest.raises(errors.Forbidden):
        store.authorize(t.uuid, "read")
    with pytest.raises(errors.Forbidden):
        t.authorize("read")


def test_cancel_conflict_when_operation_does_not_stop(store):
    t = store.add(ticket_dict())
    release = threading.Event()
    started = threading.Event()

    def stuck():
        with t.operation(0, 1):
            started.set()
            release.wait(10)

    th = threading.Thread(target=stuck)
    th.start()
    started.wait()
    try:
        with pytest.raises(errors.Conflict):
            store.remove(t.uuid, timeout=0.4)
        # Still there: the caller retries.
        assert store.get(t.uuid).info()["canceled"] is True
    finally:
        release.set()
        th.join()
    store.remove(t.uuid, timeout=1)
    with pytest.raises(errors.NotFound):
        store.get(t.uuid)


def test_cancel_closes_idle_connections(store):
    t = store.add(ticket_dict())
    closed = []

    def close(force):
        # As a real connection does once its socket is shut down.
        closed.append(force)
        t.remove_connection(1)

    t.add_connection(1, close)
    store.remove(t.uuid, timeout=1)
    assert closed == [False]


def test_cancel_waits_for_connections(store):
    # DELETE answers only once no connection holds the backend: a busy
    # connection (its closer refuses to close it) that finishes later.
    t = store.add(ticket_dict())
    t.add_connection(1, lambda force: None)
    threading.Timer(0.3, t.remove_connection, args=(1,)).start()
    start = time.monotonic()
    store.remove(t.uuid, timeout=5)
    assert 0.25 < time.monotonic() - start < 2
    assert t.connection_count() == 0


def test_cancel_conflict_when_connection_stays(store):
    t = store.add(ticket_dict())
    t.add_connection(1, lambda force: None)
    with pytest.raises(errors.Conflict) as e:
        store.remove(t.uuid, timeout=0.3)
    assert "1 connections open" in str(e.value)


def test_canceled_ticket_binds_no_connection(store):
    # A request that authorized just before the DELETE must not open the
    # backend after it.
    t = store.add(ticket_dict())
    t.authorize("read")
    store.remove(t.uuid, timeout=1)
    with pytest.raises(errors.Forbidden):
        t.add_connection(1, lambda force: None)
    with pytest.raises(errors.Forbidden):
        with t.operation():
            pass
    assert t.connection_count() == 0


def test_cancel_wakes_request_waiting_for_slot(store):
    t = store.add(ticket_dict())
    t.add_connection(1, lambda force: t.remove_connection(1))
    result = []

    def waiter():
        try:
            result.append(t.add_connection(2, lambda force: None, limit=1,
                                           wait=5))
        except errors.Forbidden as e:
            result.append(e)

    th = threading.Thread(target=waiter)
    th.start()
    time.sleep(0.2)
    store.remove(t.uuid, timeout=2)
    th.join(5)
    assert isinstance(result[0], errors.Forbidden), result
    assert t.connection_count() == 0


@pytest.mark.parametrize("name", [
    "disk\r\nX-Injected: 1", "a\nb", "nul\0", "tab\there", "del\x7f",
    "c1\x85",
])
def test_validate_filename_control_characters(name):
    with pytest.raises(errors.BadRequest) as e:
        tickets.validate(ticket_dict(filename=name))
    assert "'filename'" in str(e.value)


@pytest.mark.parametrize("name", ["disk.raw", "диск.raw", "a b\"c.qcow2",
                                  "\u00e9t\u00e9 \U0001f600.img"])
def test_validate_filename_unicode(name):
    assert tickets.validate(ticket_dict(filename=name))["filename"] == name


def test_cancel_forces_stuck_connections(store):
    t = store.add(ticket_dict())
    released = threading.Event()
    started = threading.Event()
    forced = []

    def close(force):
        if force:
            forced.append(True)
            released.set()
            t.remove_connection(1)

    t.add_connection(1, close)

    def blocked_send():
        with t.operation(0, 1):
            started.set()
            released.wait(10)

    th = threading.Thread(target=blocked_send)
    th.start()
    started.wait()
    start = time.monotonic()
    store.remove(t.uuid, timeout=2)
    th.join()
    assert forced == [True]
    assert time.monotonic() - start < 2


def test_transferred_counts_overlaps_once():
    t = tickets.Ticket(tickets.validate(ticket_dict(ops=["read"])))
    for offset, length in [(0, 100), (50, 100), (300, 10), (0, 10)]:
        with t.operation(offset, length) as op:
            op.progress(length)
    assert t.info()["transferred"] == 150 + 10


def test_transferred_includes_running_operation():
    t = tickets.Ticket(tickets.validate(ticket_dict(ops=["write"])))
    with t.operation(0, 100) as op:
        op.progress(40)
        info = t.info()
        assert info["active"] is True
        assert info["idle_time"] == 0
        assert info["transferred"] == 40
    assert t.info()["transferred"] == 40


def test_transferred_absent_for_read_write():
    t = tickets.Ticket(tickets.validate(ticket_dict(ops=["read", "write"])))
    assert "transferred" not in t.info()


def test_info_fields():
    clock = Clock()
    t = tickets.Ticket(tickets.validate(ticket_dict(
        transfer_id="tx-1", filename="disk.raw")), clock)
    clock.now += 7
    info = t.info()
    assert info["uuid"] == "a" * 36
    assert info["active"] is False
    assert info["canceled"] is False
    assert info["connections"] == 0
    assert info["expires"] == 1300
    assert info["idle_time"] == 7
    assert info["transfer_id"] == "tx-1"
    assert info["filename"] == "disk.raw"


def test_concurrent_accounting():
    t = tickets.Ticket(tickets.validate(ticket_dict(size=10**6,
                                                     ops=["read"])))

    def worker(base):
        for i in range(200):
            with t.operation(base + i * 10, 10) as op:
                op.progress(10)

    threads = [threading.Thread(target=worker, args=(k * 2000,))
               for k in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert t.info()["transferred"] == 8 * 2000
    assert t.info()["active"] is False


def test_refused_operation_does_not_extend_ticket():
    # A request refused inside its operation before moving a byte (a
    # malformed chunk size line) leaves the ticket as it was; one that
    # moved bytes before failing was activity and extends it.
    clock = Clock()
    t = tickets.Ticket(tickets.validate(ticket_dict(ops=["write"])), clock)
    clock.now += 7
    with pytest.raises(errors.BadRequest):
        with t.operation(0, 0):
            raise errors.BadRequest("Invalid chunk size line")
    info = t.info()
    assert info["expires"] == 1300 and info["idle_time"] == 7
    with pytest.raises(errors.PartialContent):
        with t.operation(0, 100) as op:
            op.progress(40)
            raise errors.PartialContent(100, 40)
    info = t.info()
    assert info["expires"] == 1307 and info["idle_time"] == 0
    assert info["transferred"] == 40


# Adding a ticket whose id exists.

def test_readd_different_ticket_cancels_old_connections(store):
    # A ticket re-added with another url (or ops) must not leave the old
    # one's connections writing: they are closed before the new one takes
    # the id, so a DELETE that follows answers for every connection.
    old = store.add(ticket_dict(url="file:///var/tmp/a", ops=["write"]))
    closed = []

    def close(force):
        closed.append(force)
        old.remove_connection(1)

    old.add_connection(1, close)
    new = store.add(ticket_dict(url="file:///var/tmp/b", ops=["write"]))
    assert new is not old
    assert closed == [False]
    assert old.canceled
    assert old.connection_count() == 0
    assert store.get(new.uuid) is new


def test_readd_different_ticket_conflict_when_old_stays(store):
    old = store.add(ticket_dict(url="file:///var/tmp/a"))
    old.add_connection(1, lambda force: None)
    store._cfg.control.remove_timeout = 0.3
    with pytest.raises(errors.Conflict):
        store.add(ticket_dict(url="file:///var/tmp/b"))
    # The id still names the old (canceled) ticket, not the new one.
    assert store.get(old.uuid) is old


def test_readd_same_ticket_extends_it(store):
    # The same ticket again (vdsm retrying an add) keeps the object, its
    # connections and accounting; only the timeout is renewed.
    old = store.add(ticket_dict(timeout=10))
    old.add_connection(1, lambda force: pytest.fail("closed"))
    again = store.add(ticket_dict(timeout=300))
    assert again is old
    assert not old.canceled
    assert old.timeout == 300
    assert old.connection_count() == 1
