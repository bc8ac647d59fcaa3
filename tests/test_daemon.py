"""--pidfile, --fork and --exit-with-parent, checked with a real client (nbdinfo) and real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from helpers import require_tool, wait_for

from buselab.processes import pid_alive

BUSELAB = [sys.executable, "-m", "buselab"]


def nbdinfo_size(sock: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["nbdinfo", "--size", f"nbd+unix:///?socket={sock}"], capture_output=True, text=True, timeout=30
    )


def test_pidfile_holds_the_serving_pid_and_goes_on_exit(tmp_path):
    require_tool("nbdinfo")
    pidfile, sock = tmp_path / "buselab.pid", tmp_path / "s"
    proc = subprocess.Popen(
        [*BUSELAB, "ram", "--size", "1M", "--unix", str(sock), "--headless", "--pidfile", str(pidfile)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: pidfile.exists() or proc.poll() is not None)
        # Written once serving: a client can connect the moment the file is there.
        assert nbdinfo_size(sock).stdout == "1048576\n"
        assert pidfile.read_text() == f"{proc.pid}\n"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0, proc.stderr.read()
    assert not pidfile.exists()


def test_pidfile_that_cannot_be_written_is_one_line_and_nothing_served(tmp_path):
    sock = tmp_path / "s"
    proc = subprocess.run(
        [*BUSELAB, "ram", "--unix", str(sock), "--pidfile", str(tmp_path / "no" / "such" / "dir.pid")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("buselab: error: cannot write --pidfile ")
    assert proc.stderr.endswith(": No such file or directory\n") and proc.stderr.count("\n") == 1
    assert not sock.exists()  # it stopped what it had started


def test_fork_returns_once_serving(tmp_path):
    require_tool("nbdinfo")
    pidfile, sock = tmp_path / "buselab.pid", tmp_path / "s"
    started = time.monotonic()
    proc = subprocess.run(
        [*BUSELAB, "ram", "--size", "2M", "--unix", str(sock), "--fork", "--pidfile", str(pidfile)],
        capture_output=True,
        text=True,
        timeout=30,  # also proves the parent's stdout was let go: run() waits for EOF on it
    )
    assert proc.returncode == 0, proc.stderr
    assert (proc.stdout, proc.stderr) == ("", "")
    pid = int(pidfile.read_text())
    try:
        # No waiting, no retry: when --fork returns, the socket accepts.
        assert nbdinfo_size(sock).stdout == str(2 << 20) + "\n"
        assert pid != os.getpid() and pid_alive(pid)
        assert os.getsid(pid) == pid  # a session of its own: the shell's ^C and hangup are not for it
        # `buselab ctl PID` finds it by the pid --pidfile gives (its control socket is named after it).
        status = subprocess.run([*BUSELAB, "ctl", str(pid), "status"], capture_output=True, text=True, timeout=30)
        assert status.returncode == 0 and "2.0 MiB" in status.stdout, status
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not pid_alive(pid), timeout=20)
    assert not pidfile.exists() and not sock.exists()  # cleaned up by a clean stop
    assert time.monotonic() - started < 25


def test_fork_error_before_serving_reaches_the_parent(tmp_path):
    proc = subprocess.run(
        [*BUSELAB, "file", str(tmp_path / "missing.img"), "--unix", str(tmp_path / "s"), "--fork"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr == f"buselab: error: {tmp_path / 'missing.img'} does not exist: give --size to create it\n"


def test_fork_refuses_run_and_exit_with_parent():
    for extra in (["--run", "true"], ["--exit-with-parent"]):
        proc = subprocess.run([*BUSELAB, "ram", "--fork", *extra], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith("buselab: error: --fork and ")


def test_exit_with_parent_stops_cleanly_when_the_parent_goes(tmp_path):
    """A parent starts buselab, waits until it serves, and exits: buselab stops, cleanly."""
    pidfile, sock, log = tmp_path / "buselab.pid", tmp_path / "s", tmp_path / "log"
    parent = textwrap.dedent(
        f"""
        import os, subprocess, sys, time
        with open({str(log)!r}, "wb") as log:
            child = subprocess.Popen({BUSELAB!r} + ["ram", "--size", "1M", "--unix", {str(sock)!r},
                "--headless", "--exit-with-parent", "--pidfile", {str(pidfile)!r}], stdout=log, stderr=log)
        while not os.path.exists({str(pidfile)!r}):
            assert child.poll() is None
            time.sleep(0.02)
        print(child.pid)
        """
    )
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout)
    try:
        wait_for(lambda: not pid_alive(pid) or _zombie(pid), timeout=15)
    finally:
        if pid_alive(pid) and not _zombie(pid):  # failed: do not leave it serving
            os.kill(pid, signal.SIGKILL)
    assert not pidfile.exists() and not sock.exists()
    assert "stopped cleanly" in log.read_text(), log.read_text()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return False
