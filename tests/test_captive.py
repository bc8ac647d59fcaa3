"""Captive mode (`--run CMD`, as nbdkit's): serve, run the command, exit with its status.

The commands are real NBD clients (nbdinfo, nbdcopy) run through /bin/sh by buselab.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import require_tool, tmux, tmux_capture

BUSELAB = [sys.executable, "-m", "buselab"]


def run(*args: str, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*BUSELAB, *args], capture_output=True, text=True, timeout=timeout, **kwargs)


def test_run_nbdinfo_prints_the_size_and_exits_0():
    require_tool("nbdinfo")
    proc = run("ram", "--size", "64M", "--run", 'nbdinfo --size "$uri"')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "67108864\n"  # nothing of buselab's own: stdout is the command's
    assert proc.stderr == ""


def test_run_exits_with_the_commands_status():
    require_tool("nbdinfo")
    proc = run("ram", "--size", "1M", "--run", 'nbdinfo --size "$uri" >/dev/null && exit 7')
    assert proc.returncode == 7, proc.stderr


def test_run_failing_client_status_passes_through():
    require_tool("nbdinfo")
    # A wrong export name: nbdinfo fails (status 1), and so does buselab.
    proc = run("ram", "--size", "1M", "--export-name", "disk", "--run", 'nbdinfo --size "$uri"-nope')
    assert proc.returncode == 1
    assert "nbdinfo" in proc.stderr


def test_run_killed_by_a_signal_gives_128_plus_n():
    proc = run("ram", "--size", "1M", "--run", "kill -TERM $$")
    assert proc.returncode == 128 + signal.SIGTERM
    assert proc.stderr.strip() == "buselab: the --run command was killed by signal 15"


def test_run_environment_on_tcp_with_an_export_name(tmp_path):
    require_tool("nbdinfo")
    script = (
        'printf "%s|%s|%s|%s|%s|%s\\n" "$uri" "$nbd" "$port" "$unixsocket" "$exportname" "$dev"; nbdinfo --size "$uri"'
    )
    proc = run("ram", "--size", "2M", "--listen", "127.0.0.1:0", "--export-name", "my disk", "--run", script)
    assert proc.returncode == 0, proc.stderr
    values, size = proc.stdout.splitlines()
    uri, nbd, port, unixsocket, exportname, dev = values.split("|")
    assert re.fullmatch(r"nbd://127\.0\.0\.1:\d+/my%20disk", uri), uri
    assert nbd == uri and uri.endswith(f":{port}/my%20disk")
    assert (unixsocket, exportname, dev) == ("", "my disk", "")
    assert size == str(2 << 20)


def test_run_without_listen_serves_on_a_private_socket_removed_afterwards():
    require_tool("nbdinfo")
    proc = run("ram", "--size", "1M", "--run", 'echo "$unixsocket"; test -S "$unixsocket" && nbdinfo --size "$uri"')
    assert proc.returncode == 0, proc.stderr
    path, size = proc.stdout.splitlines()
    assert size == "1048576"
    assert not os.path.exists(path) and not os.path.exists(os.path.dirname(path))


def test_run_nbdcopy_writes_through_buselab(tmp_path):
    require_tool("nbdcopy")
    source = tmp_path / "source.img"
    source.write_bytes(os.urandom(1 << 20))
    disk = tmp_path / "disk.img"
    proc = run("file", str(disk), "--size", "1M", "--run", f'nbdcopy {source} "$uri"')
    assert proc.returncode == 0, proc.stderr
    assert disk.read_bytes() == source.read_bytes()  # flushed and closed before buselab exited


def test_signal_to_buselab_stops_the_command_and_returns_its_status(tmp_path):
    started = tmp_path / "started"
    proc = subprocess.Popen(
        [*BUSELAB, "ram", "--size", "1M", "--run", f"touch {started}; exec sleep 60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 15
    while not started.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the command never started"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=15)  # not the 60 s of the sleep
    assert proc.returncode == 128 + signal.SIGTERM, err


def test_run_with_the_lab_stays_until_q(tmp_path: Path):
    """On a terminal the lab opens; when the command ends it stays, says so, and q ends it with the status."""
    require_tool("tmux", "nbdinfo")
    name = f"buselab-captive-{os.getpid()}"
    done = tmp_path / "status"
    command = " ".join([*BUSELAB, "ram", "--size", "8M", "--run", "'nbdinfo --size \"$uri\"; exit 3'"])
    shell = f"unset COLUMNS LINES; {command}; echo $? > {done}; echo the end; sleep 30"

    tmux(name, "new-session", "-d", "-s", name, "-x", "160", "-y", "50", shell, check=True)
    try:
        deadline = time.monotonic() + 30
        screen = ""
        while "press q to quit (still serving)" not in screen:
            assert time.monotonic() < deadline, f"the lab never said the command ended:\n{screen}"
            time.sleep(0.2)
            screen = tmux_capture(name)
        assert "--run: exited with status 3; press q to quit" in screen
        assert "The --run command exited with status 3" in screen  # and a notification that stays
        assert "--run: 8388608" in screen  # the command's output, in the lab's stream
        assert not done.exists()  # the lab is still up
        tmux(name, "send-keys", "-t", name, "q")
        while not done.exists():
            assert time.monotonic() < deadline + 15, "q did not end the lab"
            time.sleep(0.1)
        assert done.read_text().strip() == "3"
        while "the end" not in screen:
            assert time.monotonic() < deadline + 20, f"the shell never went on:\n{screen}"
            time.sleep(0.1)
            screen = tmux_capture(name)
        # The command's output is printed again on the terminal once the lab closed.
        assert re.search(r"^8388608$", screen, re.M), screen
    finally:
        tmux(name, "kill-server")


def test_run_headless_prints_stats_on_stderr_only():
    """--headless with --run: the stats lines go to stderr, stdout stays the command's."""
    proc = run("ram", "--size", "1M", "--headless", "--run", "sleep 1.5; echo done")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "done\n"
    assert "buselab: serving" in proc.stderr and "req/s" in proc.stderr
