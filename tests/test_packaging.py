"""The systemd unit and the source distribution."""

import os
import shutil
import subprocess
import sys
import tarfile

from harness.daemonproc import TOP


def test_systemd_unit_verifies(tmp_path):
    unit = open(os.path.join(TOP, "data", "ovirt-imageio.service")).read()
    # Point ExecStart at the daemon of this environment: verify checks that
    # the binary exists.
    daemon = os.path.join(os.path.dirname(sys.executable), "ovirt-imageio")
    unit = unit.replace("/usr/bin/ovirt-imageio", daemon)
    path = tmp_path / "ovirt-imageio.service"
    path.write_text(unit)
    r = subprocess.run(["systemd-analyze", "verify", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Type=notify" in unit


def test_sdist_contains_sources(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation",
         "--outdir", str(tmp_path), TOP],
        capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    sdist = [p for p in os.listdir(tmp_path) if p.endswith(".tar.gz")][0]
    with tarfile.open(tmp_path / sdist) as tar:
        names = tar.getnames()
    top = names[0].split("/")[0]
    for want in ("setup.py", "pyproject.toml", "imageio/_io/buffer.pyx",
                 "imageio/_io/nbd.pyx", "imageio/_io/ring.pxi",
                 "imageio/_io/blockstatus.pxi", "imageio/_io/failure.pxi",
                 "imageio/_io/libnbd.pxd",
                 "examples/conf.d/daemon.conf", "data/ovirt-imageio.service",
                 "imageio/daemon.py"):
        assert "{}/{}".format(top, want) in names
    # Generated C files are built from the .pyx, not shipped.
    assert not any(n.endswith("imageio/_io/buffer.c") for n in names)


def test_sdist_builds_with_declared_dependencies_only(tmp_path):
    # An isolated build installs only what pyproject.toml declares.
    r = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--outdir",
         str(tmp_path / "dist"), TOP],
        capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    sdist = [p for p in os.listdir(tmp_path / "dist")][0]
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w",
         str(tmp_path / "wheel"), str(tmp_path / "dist" / sdist)],
        capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = os.listdir(tmp_path / "wheel")[0]
    import zipfile
    names = zipfile.ZipFile(tmp_path / "wheel" / wheel).namelist()
    assert any(n.startswith("imageio/_io/buffer.") and n.endswith(".so")
               for n in names)
    assert any(n.startswith("imageio/_io/nbd.") and n.endswith(".so")
               for n in names)
    shutil.rmtree(tmp_path)
