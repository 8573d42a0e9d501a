"""The client's planner: extents to work items and tasks (pure)."""

import pytest

from imageio.client import transfer

MiB = 1024**2
W = 8 * MiB  # the request size / window


def covered(items):
    return [(i.start, i.length, i.zero) for i in items]


def test_data_split_at_windows_zero_cut_at_window_edges():
    extents = [(0, MiB, False), (MiB, 30 * MiB, True), (31 * MiB, 10 * MiB,
                                                         False)]
    items = transfer.plan(extents, W)
    assert covered(items) == [
        (0, MiB, False),
        (MiB, 7 * MiB, True),             # zero head, in window 0
        (8 * MiB, 16 * MiB, True),        # whole windows 1-2
        (24 * MiB, 7 * MiB, True),        # zero tail, in window 3
        (31 * MiB, MiB, False),
        (32 * MiB, 8 * MiB, False),
        (40 * MiB, MiB, False),
    ]
    assert covered(transfer.plan(extents, W, skip_zero=True)) == [
        (0, MiB, False), (31 * MiB, MiB, False), (32 * MiB, 8 * MiB, False),
        (40 * MiB, MiB, False)]


@pytest.mark.parametrize("extents", [
    [(0, 3 * MiB, True)],
    [(0, 64 * MiB, True)],
    [(MiB, 5 * MiB, True)],
    [(0, 8 * MiB, False), (8 * MiB, 8 * MiB, True)],
])
def test_zero_extents_whole_windows(extents):
    items = transfer.plan(extents, W)
    assert sum(i.length for i in items) == sum(e[1] for e in extents)
    for i in items:
        inside = i.start // W == (i.start + i.length - 1) // W
        aligned = i.start % W == 0 and i.length % W == 0
        assert inside or aligned


def test_tasks_never_share_a_window():
    import random
    rnd = random.Random(7)
    extents, pos = [], 0
    for _ in range(300):
        n = rnd.choice([4096, 65536, MiB, 3 * MiB + 4096, 20 * MiB])
        extents.append((pos, n, rnd.random() < 0.5))
        pos += n
    items = transfer.plan(transfer.merged(extents), W)
    tasks = list(transfer.tasks(items, W))
    assert [i for t in tasks for i in t] == items
    owner = {}
    for n, task in enumerate(tasks):
        for i in task:
            for w in range(i.start // W, (i.start + i.length - 1) // W + 1):
                assert owner.setdefault(w, n) == n
        starts = [i.start for i in task]
        assert starts == sorted(starts)


def test_source_extents_in_pieces_as_the_whole(tmp_path):
    # The upload asks for the source's extents piece by piece while the
    # workers copy; merged, they are the extents of the whole image.
    from harness import nbdserver
    from imageio.backends import nbd as nbd_backend
    image = tmp_path / "src.qcow2"
    nbdserver.qemu_img("create", "-f", "qcow2", str(image), str(64 * MiB))
    nbdserver.qemu_io(str(image), "qcow2", "write -P 1 0 64k",
                      "write -P 2 3M 2M", "write -z 9M 1M",
                      "write -P 3 17M 100k", "write -P 4 63M 1M")
    with nbdserver.qemu_nbd(str(image), fmt="qcow2",
                            sock=tmp_path / "nbd.sock").start() as server:
        nbd = nbd_backend.connect(server.url())
        try:
            whole = list(transfer.merged((e.start, e.length, e.zero)
                                         for e in nbd.extents()))
            for step in (MiB, 5 * MiB, 64 * MiB):
                pieces = list(transfer.merged(
                    transfer.source_extents(nbd, 64 * MiB, step)))
                assert pieces == whole
        finally:
            nbd.close()
    assert [e for e in whole if not e[2]][0] == (0, 64 * 1024, False)
