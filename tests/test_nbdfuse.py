"""As root: buselab -> nbdfuse -> loop device -> ext4, the way a real disk is used.

Every mount, loop device and FUSE mount is undone in `finally` blocks, even when
a step fails, so a broken run leaves nothing attached.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import loop_device, nbdfuse, require_root, require_tool, sh

pytestmark = pytest.mark.root

MiB = 1 << 20


def needs() -> None:
    require_root()
    require_tool("nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "fsck.ext4", "mount", "umount")
    if not os.path.exists("/dev/fuse"):
        pytest.fail("/dev/fuse is missing")


@contextmanager
def mounted(device: str, where: Path) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    sh("mount", device, str(where))
    try:
        yield where
    finally:
        if sh("umount", str(where), check=False).returncode != 0:
            sh("umount", "-l", str(where), check=False)


def write_files(root: Path) -> dict[str, str]:
    sums = {}
    for i in range(12):
        data = os.urandom(64 * 1024 * (i + 1))
        name = f"dir{i % 3}/file{i}.bin"
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(data)
        sums[name] = hashlib.sha256(data).hexdigest()
    big = os.urandom(4 * MiB)
    (root / "big.bin").write_bytes(big)
    sums["big.bin"] = hashlib.sha256(big).hexdigest()
    os.sync()
    return sums


def check_files(root: Path, sums: dict[str, str]) -> None:
    for name, digest in sums.items():
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == digest, f"{name} changed"


def fsck_clean(device: str) -> str:
    proc = sh("fsck.ext4", "-fn", device, check=False)
    assert proc.returncode == 0, f"fsck.ext4 found problems:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def wait_for_text(log: Path, pattern: str, timeout: float = 15) -> re.Match:
    deadline = time.monotonic() + timeout
    while True:
        match = re.search(pattern, log.read_text(errors="replace"))
        if match:
            return match
        assert time.monotonic() < deadline, f"{pattern!r} not in {log.read_text(errors='replace')}"
        time.sleep(0.1)


def test_ext4_on_ram_disk_through_nbdfuse(buselab_server, tmp_path):
    needs()
    served = buselab_server(["ram", "--size", "64M"])
    with nbdfuse(served.socket, tmp_path / "fuse") as image:
        assert image.stat().st_size == 64 * MiB
        with loop_device(image) as device:
            sh("mkfs.ext4", "-q", "-F", device)
            with mounted(device, tmp_path / "mnt") as root:
                sums = write_files(root)
            fsck_clean(device)
            with mounted(device, tmp_path / "mnt") as root:
                check_files(root, sums)
                assert sorted(p.name for p in root.iterdir()) == ["big.bin", "dir0", "dir1", "dir2", "lost+found"]
    # FLUSH was advertised and reached buselab through loop -> FUSE -> NBD.
    wait_for_text(served.log, r"flush [1-9]\d*")


def test_ext4_on_file_backend_survives_a_restart(buselab_server, tmp_path):
    needs()
    disk = tmp_path / "disk.img"
    served = buselab_server(["file", str(disk), "--size", "64M"], name="first")
    wait_for_text(served.log, "buselab: serving")
    with nbdfuse(served.socket, tmp_path / "fuse1") as image:
        with loop_device(image) as device:
            sh("mkfs.ext4", "-q", "-F", device)
            with mounted(device, tmp_path / "mnt") as root:
                sums = write_files(root)
    assert served.stop(signal.SIGTERM) == 0

    # The file itself is now a clean ext4 image.
    fsck_clean(str(disk))

    again = buselab_server(["file", str(disk)], name="second")
    with nbdfuse(again.socket, tmp_path / "fuse2") as image:
        assert image.stat().st_size == 64 * MiB
        with loop_device(image) as device:
            fsck_clean(device)
            with mounted(device, tmp_path / "mnt") as root:
                check_files(root, sums)
                (root / "after-restart").write_text("still here")
            fsck_clean(device)
    wait_for_text(again.log, "buselab: serving")
    assert again.stop(signal.SIGINT) == 0
    fsck_clean(str(disk))
