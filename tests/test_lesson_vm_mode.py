"""`buselab lesson NAME --vm`: the lesson's disk attached at /dev/nbd0 in a qemu VM, no root needed.

The fast tests: what a machine without qemu, without the kernel package, or with a guest
that cannot boot is told (one line, nothing left running). The VM test: an unprivileged
user (nobody, by setpriv) runs the mkfs lesson from an installed buselab (a wheel installed
with pip, in a directory nobody may read) and a copy of the image cache, and every checkpoint
is reached in order. One boot.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import clean_env, copy_tree, missing, require_tool, wait_for

_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.append(_REPO)

from buselab.lessons import find_lesson  # noqa: E402
from buselab.vm import image as vm_image_module  # noqa: E402
from tests.vm.fixtures import vm_image  # noqa: E402, F401  (pytest fixture)
from tests.vm.vm import Image  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _buselab(*args: str, env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "buselab", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUSELAB_VM_")}
    env.update(extra)
    return env


def _one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if not line.startswith("buselab: booting")]
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


def test_without_qemu_one_line_says_how_to_get_it(tmp_path: Path) -> None:
    # A PATH with python's own directory only: no qemu on it (the lesson's tools are looked
    # for on the guest's PATH, which adds the system's directories).
    env = _env(PATH=str(Path(sys.executable).parent))
    done = _buselab("lesson", "mkfs", "--vm", "--auto", "--headless", env=env, cwd=tmp_path)
    assert _one_line_error(done) == (
        "buselab: error: buselab lesson --vm needs qemu-system-x86_64: apt-get install qemu-system-x86"
    )


def test_a_qemu_named_by_the_environment_that_is_not_there(tmp_path: Path) -> None:
    env = _env(BUSELAB_VM_QEMU=str(tmp_path / "no-such-qemu"))
    done = _buselab("lesson", "mkfs", "--vm", "--auto", "--headless", env=env, cwd=tmp_path)
    line = _one_line_error(done)
    assert line.startswith(f"buselab: error: buselab lesson --vm needs {tmp_path / 'no-such-qemu'}:"), line
    assert "BUSELAB_VM_QEMU" in line


def test_without_the_kernel_package_one_line_says_how_to_get_it(tmp_path: Path) -> None:
    require_tool("qemu-system-x86_64", "apt-get")
    # A versioned package apt has never heard of, and an empty cache: the download fails.
    env = _env(BUSELAB_VM_KERNEL="linux-image-0.0.0-buselab-none-amd64", BUSELAB_VM_CACHE=str(tmp_path / "cache"))
    done = _buselab("lesson", "mkfs", "--vm", "--auto", "--headless", env=env, cwd=tmp_path)
    line = _one_line_error(done)
    assert line.startswith(
        "buselab: error: buselab lesson --vm needs a Debian kernel package (linux-image-amd64) and could not get it"
    ), line
    assert "linux-image-0.0.0-buselab-none-amd64" in line and "apt-get update" in line


def test_a_guest_that_cannot_boot_is_one_line_and_leaves_nothing_running(tmp_path: Path) -> None:
    """An image whose kernel is not a kernel: qemu refuses it, the server stops, no qemu stays."""
    require_tool("qemu-system-x86_64")
    cache = tmp_path / "cache"
    kver = "9.9.9-buselab-broken-amd64"
    busybox = vm_image_module._static_busybox(cache, download=False) if _host_busybox() else None
    if busybox is None:
        missing("needs a static busybox on the host (busybox-static)")
    broken = cache / f"{kver}-{vm_image_module._recipe_key(busybox)}"
    broken.mkdir(parents=True)
    (broken / "vmlinuz").write_bytes(b"not a kernel\n" * 100)
    (broken / "initrd.img").write_bytes(b"")
    env = _env(BUSELAB_VM_KERNEL=f"linux-image-{kver}", BUSELAB_VM_CACHE=str(cache))
    done = _buselab("lesson", "mkfs", "--vm", "--auto", "--headless", env=env, cwd=tmp_path)
    line = _one_line_error(done)
    assert line.startswith("buselab: error: the VM stopped while booting (qemu exit 1)"), line
    assert "console in " in line
    log = Path(line.rsplit("console in ", 1)[1])
    assert "qemu" in log.read_text()
    log.unlink()
    left = subprocess.run(["pgrep", "-f", str(broken)], capture_output=True, text=True)
    assert left.stdout == "", f"qemu still running: {left.stdout}"


def _host_busybox() -> bool:
    try:
        vm_image_module._static_busybox(Path("/nonexistent"), download=False)
    except vm_image_module.VmUnavailable:
        return False
    return True


# --- as an unprivileged user, in the VM -------------------------------------------------------------


def _world_readable(path: Path) -> None:
    for place in [path, *path.rglob("*")]:
        if place.is_symlink():
            continue
        mode = place.stat().st_mode
        extra = stat.S_IRGRP | stat.S_IROTH
        if place.is_dir() or mode & stat.S_IXUSR:
            extra |= stat.S_IXGRP | stat.S_IXOTH
        place.chmod(mode | extra)


@pytest.fixture
def nobody_place() -> Iterator[Path]:
    """A directory nobody may read (pytest's tmp_path lies under root's private one)."""
    place = Path(tempfile.mkdtemp(prefix="buselab-nobody-"))
    place.chmod(0o755)
    try:
        yield place
    finally:
        shutil.rmtree(place, ignore_errors=True)


def _install(place: Path) -> Path:
    """buselab as a user gets it: a wheel built from the tree, installed with pip (--target)."""
    src = place / "src"
    src.mkdir()
    copy_tree(src)
    wheels = place / "wheels"
    site = place / "site"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    _pip([*pip, "wheel", "--no-deps", "-w", str(wheels), str(src)], place)
    _pip([*pip, "install", "--target", str(site), "--only-binary", ":all:", *map(str, wheels.glob("*.whl"))], place)
    shutil.rmtree(src)
    return site


def _pip(command: list[str], cwd: Path) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=clean_env(), cwd=cwd)
    if done.returncode != 0 and "Could not find a version that satisfies" in done.stdout + done.stderr:
        missing("PyPI is not reachable to install buselab's dependencies")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _image_cache(image: Image, place: Path) -> Path:
    """A copy of the image cache with just this image (and the static busybox it was made with)."""
    cache = place / "vm-cache"
    cache.mkdir()
    shutil.copytree(image.kernel.parent, cache / image.kernel.parent.name)
    source = image.kernel.parent.parent
    for extra in ("kernels", "busybox-static"):
        if (source / extra).is_dir():
            shutil.copytree(source / extra, cache / extra)
    return cache


@pytest.mark.vm
@pytest.mark.timeout(900)
def test_mkfs_lesson_in_the_vm_as_nobody_reaches_every_checkpoint(vm_image, nobody_place) -> None:  # noqa: F811
    require_tool("setpriv", "mkfs.ext4", "blkid", "dumpe2fs", "ss")
    if os.geteuid() != 0:
        missing("needs root to become nobody (setpriv)")
    # The system's own Python: root's (a pyenv under /root, say) may be out of nobody's reach.
    python = shutil.which("python3", path="/usr/bin:/usr/local/bin")
    if python is None:
        missing("needs a python3 in /usr/bin or /usr/local/bin for the unprivileged user")
    site = _install(nobody_place)
    cache = _image_cache(vm_image, nobody_place)
    _world_readable(nobody_place)
    env = {
        "HOME": "/nonexistent",
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(site),
        "BUSELAB_VM_CACHE": str(cache),
    }
    command = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", python, "-m", "buselab"]
    command += ["lesson", "mkfs", "--vm", "--auto", "--headless", "--hold", "0"]
    # Another user's cache (root's, 0700), and one nobody can read but not fill: one line each,
    # saying what to do.
    private = nobody_place / "private-cache"
    shutil.copytree(cache, private)
    for image_dir in private.iterdir():
        image_dir.chmod(0o700)
    empty = nobody_place / "empty-cache"
    empty.mkdir()
    for other, says in ((private, "cannot read the VM image cache"), (empty, "is not writable")):
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=120, env={**env, "BUSELAB_VM_CACHE": str(other)}, cwd="/"
        )
        line = _one_line_error(done)
        assert says in line and "set BUSELAB_VM_CACHE to a directory of your own" in line, line
    started = time.monotonic()
    out, err = nobody_place / "lesson.out", nobody_place / "lesson.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True, env=env, cwd="/")
    try:
        # Once the guest is attached, the lesson's disk is on no open port: other users of the
        # machine reach the loopback too, and only the guest knows the token (vm/guest.py).
        wait_for(lambda: "attached in the VM" in err.read_text() or proc.poll() is not None, timeout=300)
        if proc.poll() is None:
            listening = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
            ours = [line for line in listening.splitlines() if f"pid={proc.pid}," in line]
            assert not ours, f"the lesson listens on TCP after the guest attached: {ours}"
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done = subprocess.CompletedProcess(command, proc.returncode, out.read_text(), err.read_text())
    took = time.monotonic() - started
    print(done.stdout, done.stderr, f"[lesson --vm as nobody: {took:.1f} s]", sep="\n")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    which = subprocess.run(
        [*command[:5], "-c", "import buselab; print(buselab.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",  # as the lesson ran: no checkout on the path
    )
    assert which.stdout.startswith(f"{site}/buselab/"), which  # the installed buselab ran, not the checkout's

    lesson = find_lesson("mkfs")
    expected: list[str] = []
    for number, step in enumerate(lesson.steps, 1):
        expected.append(f"step {number}/{len(lesson.steps)}: {step.title}")
        if step.checkpoint is not None:
            expected.append("checkpoint")
    checkpoints = expected.count("checkpoint")
    expected.append(f"lesson mkfs: finished, {checkpoints} checkpoints reached")
    seen = [
        "checkpoint" if line.startswith("  checkpoint: ") else line
        for line in done.stdout.splitlines()
        if line.startswith(("step ", "  checkpoint: ", "lesson mkfs: "))
    ]
    assert seen == expected, done.stdout
    explained = [line for line in done.stdout.splitlines() if line.startswith("  checkpoint: ")]
    assert all("{" not in line for line in explained), explained
    # What the commands said, as a class would see it in the other terminal.
    assert "  blkid (exit 0):\n    nothing on /dev/nbd0 yet\n" in done.stdout, done.stdout
    assert re.search(r"^  dumpe2fs \(exit 0\):\n    Block size: +4096$", done.stdout, re.M), done.stdout
    assert "/dev/nbd0 attached in the VM" in done.stderr
    left = subprocess.run(["pgrep", "-u", "nobody", "-f", "qemu-system"], capture_output=True, text=True)
    assert left.stdout == "", f"qemu still running as nobody: {left.stdout}"


def test_vm_and_a_device_do_not_go_together_and_no_device_points_to_vm(tmp_path: Path) -> None:
    done = _buselab("lesson", "mkfs", "/dev/nbd0", "--vm", env=_env(), cwd=tmp_path)
    assert _one_line_error(done) == (
        "buselab: error: --vm attaches the disk at /dev/nbd0 inside the VM: leave /dev/nbd0 out"
    )
    done = _buselab("lesson", "mkfs", env=_env(), cwd=tmp_path)
    assert "`buselab lesson mkfs --vm`" in _one_line_error(done)
