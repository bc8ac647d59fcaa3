"""Shared test helpers.

Tests that need a system tool call `require_tool`: it skips with a reason when
the tool is missing, and fails instead when BUSELAB_REQUIRE_ALL=1 (CI sets it),
so CI can never go green by skipping.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REQUIRE_ALL = os.environ.get("BUSELAB_REQUIRE_ALL") == "1"


def missing(reason: str) -> None:
    """Skip (or, under BUSELAB_REQUIRE_ALL=1, fail) because something is missing."""
    if REQUIRE_ALL:
        pytest.fail(f"BUSELAB_REQUIRE_ALL=1 but {reason}")
    pytest.skip(reason)


def require_tool(*names: str) -> None:
    for name in names:
        if shutil.which(name) is None:
            missing(f"{name} is not installed")


def require_root() -> None:
    if os.geteuid() != 0:
        missing("needs root")


@dataclass
class Served:
    """A buselab subprocess serving NBD on a Unix socket."""

    proc: subprocess.Popen
    socket: str
    log: Path

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def wait_for_socket(path: str, proc: subprocess.Popen, log: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"buselab exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                return
            except OSError:
                pass
            finally:
                probe.close()
        time.sleep(0.05)
    raise RuntimeError(f"buselab did not listen on {path} in {timeout}s:\n{log.read_text(errors='replace')}")


def start_buselab(args: list[str], tmp_path: Path, name: str = "nbd") -> Served:
    """Run `buselab ARGS --unix SOCK --headless` and wait until it accepts."""
    sock = str(tmp_path / f"{name}.sock")
    log = tmp_path / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "buselab", *args, "--unix", sock, "--headless"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    wait_for_socket(sock, proc, log)
    return Served(proc, sock, log)


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
    """A started Session serving a 16 MiB RAM disk on tmp_path/nbd.sock (as `.sock`); stopped afterwards."""
    from buselab.session import ServeOptions, Session
    from buselab.storage.registry import open_backend

    sock = str(tmp_path / "nbd.sock")
    s = Session(open_backend("ram", size=16 << 20), ServeOptions(unix=[sock]))
    s.start()
    s.sock = sock  # type: ignore[attr-defined]
    yield s
    s.stop()
