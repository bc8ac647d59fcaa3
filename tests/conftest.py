"""Pytest fixtures shared by the test modules; plain helpers live in helpers.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Served, start_buselab


@pytest.fixture
def buselab_server(tmp_path: Path) -> Iterator:
    """Factory: buselab_server(['ram', '--size', '64M']) -> Served; stopped at teardown."""
    started: list[Served] = []

    def start(args: list[str], name: str = "nbd") -> Served:
        served = start_buselab(args, tmp_path, name)
        started.append(served)
        return served

    yield start
    for served in started:
        if served.proc.poll() is None:
            served.proc.kill()
            served.proc.wait()


@pytest.fixture
def session(tmp_path: Path) -> Iterator:
    """A started Session serving a 16 MiB RAM disk on tmp_path/nbd.sock (helpers.socket_path); stopped afterwards."""
    from buselab.session import ServeOptions, Session
    from buselab.storage.registry import open_backend

    s = Session(open_backend("ram", size=16 << 20), ServeOptions(unix=[str(tmp_path / "nbd.sock")]))
    s.start()
    yield s
    s.stop()


@pytest.fixture
def loop_disk(tmp_path: Path) -> Iterator:
    """(session, /dev/loopN): a loop device over nbdfuse over a started 64 MiB buselab RAM disk.

    A real block device on buselab where the kernel has no nbd driver (root); the labeller
    passes every 50 ms, so tests that wait on labels stay short.
    """
    import os

    from helpers import loop_device, nbdfuse, require_root, require_tool

    from buselab.session import ServeOptions, Session
    from buselab.storage.registry import open_backend

    require_root()
    require_tool("nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "dumpe2fs", "blkid")
    if not os.path.exists("/dev/fuse"):
        pytest.fail("/dev/fuse is missing")
    sock = str(tmp_path / "nbd.sock")
    session = Session(open_backend("ram", size=64 << 20), ServeOptions(unix=[sock]))
    session.labeller.interval = 0.05
    session.start()
    try:
        with nbdfuse(sock, tmp_path / "fuse") as image, loop_device(image) as loop:
            yield session, loop
    finally:
        session.stop()
