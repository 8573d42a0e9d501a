"""Test images for the end-to-end benchmarks.

The bulk image is 2 GiB, half random data and half holes, interleaved in
64 MiB segments (data, hole, data, hole, ...): the shape of a typical VM disk
image and the one TARGETS.md measures. It lives on /dev/shm (memory: the
benchmark measures the software, not a disk) and a second copy on /var/tmp
for the disk scenario. Images are reused across runs when their layout stamp
matches, since writing 1 GiB of random data takes a while on this machine.
"""

import json
import os
import random

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

SHM_DIR = os.environ.get("IMAGEIO_BENCH_SHM", "/dev/shm/imageio-bench")
DISK_DIR = os.environ.get("IMAGEIO_BENCH_DISK", "/var/tmp/imageio-bench")

BULK_SIZE = int(os.environ.get("IMAGEIO_BENCH_SIZE", 2 * GiB))
CHECKSUM_SIZE = 1 * GiB
SEGMENT = 64 * MiB


def _stamp(path):
    return path + ".layout.json"


def make_image(path, size, segment=SEGMENT, seed=0):
    """Create (or reuse) a raw image: random data and holes alternating.

    Segments at even indexes hold data, odd ones are holes. The data is a
    fixed pseudo-random stream (seed), incompressible and the same on every
    run. Returns path.
    """
    layout = {"size": size, "segment": segment, "seed": seed, "version": 1}
    try:
        with open(_stamp(path)) as f:
            if json.load(f) == layout and os.path.getsize(path) == size:
                return path
    except (OSError, ValueError):
        pass

    os.makedirs(os.path.dirname(path), exist_ok=True)
    rnd = random.Random(seed)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.truncate(size)
        offset = 0
        index = 0
        while offset < size:
            n = min(segment, size - offset)
            if index % 2 == 0:
                f.seek(offset)
                # Write in 8 MiB pieces to keep memory bounded.
                done = 0
                while done < n:
                    chunk = min(8 * MiB, n - done)
                    f.write(rnd.randbytes(chunk))
                    done += chunk
            offset += n
            index += 1
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    with open(_stamp(path), "w") as f:
        json.dump(layout, f)
    return path


def data_size(size, segment=SEGMENT):
    """Bytes of data (not holes) in an image made by make_image."""
    total = 0
    offset = 0
    index = 0
    while offset < size:
        n = min(segment, size - offset)
        if index % 2 == 0:
            total += n
        offset += n
        index += 1
    return total


def _bulk_name():
    # The size is in the name so that runs of different sizes (the gate
    # uses a smaller image) do not rewrite each other's image.
    return f"bulk-{BULK_SIZE // MiB}M.raw"


def bulk_image():
    """The 2 GiB half-sparse image on /dev/shm."""
    return make_image(os.path.join(SHM_DIR, _bulk_name()), BULK_SIZE)


def disk_image():
    """The same image on /var/tmp (a real disk)."""
    return make_image(os.path.join(DISK_DIR, _bulk_name()), BULK_SIZE)


def checksum_image():
    """A 1 GiB half-sparse image for the checksum scenario."""
    return make_image(os.path.join(SHM_DIR, "checksum.raw"), CHECKSUM_SIZE,
                      seed=1)


def put_target(name="put-target.raw", size=BULK_SIZE, directory=SHM_DIR):
    """An image to upload into, one per server so they never share a file.

    Created sparse with the right size; uploads overwrite it whole.
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    with open(path, "ab") as f:
        if os.fstat(f.fileno()).st_size != size:
            f.truncate(size)
    return path
