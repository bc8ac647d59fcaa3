"""The release artifacts: an sdist and a wheel built from the tree, and the wheel installed in a clean venv.

`python -m build` makes the sdist, then the wheel from the sdist (so a file the sdist
forgets breaks the wheel too). The wheel goes into a fresh venv with binary packages
only and no C compiler on hand (CC=false): what a user without build tools gets.
Needs PyPI (the build's setuptools, buselab's dependencies); about 30 s.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from helpers import clean_env, copy_tree, missing

import buselab

# The VM harness lives in tests/vm: make `tests.vm` importable (as tests/test_vm_smoke.py does).
_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.append(_REPO)

from tests.vm.fixtures import vm, vm_image  # noqa: E402, F401  (pytest fixtures)


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    try:
        import build  # noqa: F401
    except ImportError:
        missing("the build package is not installed (scripts/venv installs it with .[test])")
    work = tmp_path_factory.mktemp("packaging")
    src = work / "src"
    src.mkdir()
    copy_tree(src)
    out = work / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(),
    )
    if proc.returncode != 0 and "Could not find a version that satisfies" in proc.stdout + proc.stderr:
        missing("PyPI is not reachable to set up the build environment")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _one(dist: Path, pattern: str) -> Path:
    found = list(dist.glob(pattern))
    assert len(found) == 1, found
    return found[0]


def test_sdist_carries_license_examples_docs(dist):
    sdist = _one(dist, f"buselab-{buselab.__version__}.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for needed in (
        "LICENSE",
        "README.md",
        "pyproject.toml",
        "setup.py",
        "examples/mydisk.py",
        "docs/PLUGINS.md",
        "docs/SYSTEMD.md",
        "buselab/trace/_fastlines.c",
        "buselab/ui/lab.tcss",
        "tests/helpers.py",
    ):
        assert needed in names, f"{needed} is not in the sdist"
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".so"))]


def test_wheel_carries_license_and_depends_on_pyroute2(dist):
    wheel = _one(dist, f"buselab-{buselab.__version__}-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = f"buselab-{buselab.__version__}.dist-info"
        metadata = z.read(f"{info}/METADATA").decode()
        entry_points = z.read(f"{info}/entry_points.txt").decode()
    assert f"{info}/licenses/LICENSE" in names
    assert "buselab/cli.py" in names and "buselab/ui/lab.tcss" in names
    assert "License-Expression: MIT" in metadata
    assert "Requires-Dist: pyroute2" in metadata.replace(">=", " ").replace(
        "Requires-Dist: pyroute2 ", "Requires-Dist: pyroute2"
    )
    assert "buselab = buselab.cli:main" in entry_points


@pytest.fixture(scope="module")
def clean_venv(dist, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed from binary packages only, and no compiler on hand."""
    wheel = _one(dist, f"buselab-{buselab.__version__}-*.whl")
    work = tmp_path_factory.mktemp("venv")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120, env=clean_env())
    install = subprocess.run(
        [str(venv / "bin/python"), "-m", "pip", "install", "-q", "--only-binary", ":all:", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(CC="false", CXX="false"),  # a package that wanted compiling would fail here
        cwd=work,  # not the checkout: nothing may come from the tree
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    return venv


def test_wheel_installs_in_a_clean_venv_without_a_compiler(clean_venv, tmp_path):
    env = clean_env()
    version = subprocess.run(
        [str(clean_venv / "bin/buselab"), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert (version.returncode, version.stdout) == (0, f"buselab {buselab.__version__}\n"), version.stderr
    # netlink out of the box: pyroute2 came with it, and the kernel transport's netlink module loads.
    where = subprocess.run(
        [str(clean_venv / "bin/python"), "-c", "import buselab, buselab.transport.netlink; print(buselab.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert where.returncode == 0, where.stderr
    assert where.stdout.startswith(str(clean_venv))


@pytest.mark.vm
@pytest.mark.timeout(900)
def test_wheel_attaches_by_netlink_in_the_vm(clean_venv, vm, tmp_path) -> None:  # noqa: F811
    """The installed wheel, nothing else, attaches /dev/nbd0 by netlink; --run gets $dev and $nbd."""
    # The guest sees the host's /tmp hidden under its own, except this test's tmp_path: the venv
    # goes there. A copied venv runs as `venv/bin/python -m` (its scripts' #! name the old place).
    venv = tmp_path / "venv"
    shutil.copytree(clean_venv, venv, symlinks=True)
    buselab_bin = f"{venv}/bin/python -m buselab"
    command = 'echo "dev=$dev nbd=$nbd uri=$uri"; blockdev --getsize64 "$dev"'
    script = (
        "unset PYTHONPATH VIRTUAL_ENV\n"  # the host's, passed on by the harness: not for a clean install
        f"cd /tmp && {buselab_bin} ram --size 16M /dev/nbd0 --run '{command}' 2>&1\n"
        'echo "status=$?"\n'
        'echo "size after=$(cat /sys/block/nbd0/size)"\n'
    )
    result = vm(script, timeout=600)
    print(result.output)
    lines = result.output.splitlines()
    assert "buselab: attached /dev/nbd0 via netlink" in lines, result.output
    assert "dev=/dev/nbd0 nbd=/dev/nbd0 uri=" in lines
    assert str(16 << 20) in lines
    assert "status=0" in lines and "size after=0" in lines  # detached cleanly when the command ended
