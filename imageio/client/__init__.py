"""The transfer client: ``imageio.client`` mirrors the established
``ovirt_imageio.client`` API; ``ovirt-img`` is its command line."""

from ._api import (  # noqa: F401
    BUFFER_SIZE,
    MAX_WORKERS,
    ImageioClient,
    checksum,
    download,
    extents,
    info,
    measure,
    upload,
)
from .progress import ProgressBar  # noqa: F401
