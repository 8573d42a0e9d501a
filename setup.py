"""Build the imageio package and its Cython extensions.

Every ``imageio/_io/*.pyx`` module is an extension; ``nbd.pyx`` links
against libnbd.  Set ``IMAGEIO_EXT=name[,name]`` to build only some of them
while iterating on one module.
"""

import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup

# Extensions that need extra C libraries.
LIBRARIES = {
    "nbd": ["nbd"],
    "zstd": ["zstd"],
}


def extensions():
    only = os.environ.get("IMAGEIO_EXT")
    only = set(only.split(",")) if only else None
    exts = []
    for path in sorted(glob.glob("imageio/_io/*.pyx")):
        name = os.path.splitext(os.path.basename(path))[0]
        if only and name not in only:
            continue
        exts.append(Extension(
            "imageio._io." + name,
            [path],
            libraries=LIBRARIES.get(name, []),
            extra_compile_args=["-O2", "-D_GNU_SOURCE"],
        ))
    return cythonize(
        exts,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "embedsignature": True,
        },
    )


setup(
    packages=find_packages(include=["imageio", "imageio.*"]),
    package_data={"imageio._io": ["*.pyx", "*.pxd", "*.pxi"]},
    ext_modules=extensions(),
)
