"""Socket activation: libnbd's `[ buselab ... ]`, systemd-socket-activate, and sockets handed down by hand."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from helpers import require_tool

BUSELAB = [sys.executable, "-m", "buselab"]
# Runs "$@" as this same process with the socket on its stdin as descriptor 3, as systemd does
# (exec keeps the pid, so LISTEN_PID=$$ names the process buselab will be).
ACTIVATE = 'LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=nbd exec "$@" 3<&0 0</dev/null'


def test_nbdinfo_size_with_buselab_in_brackets():
    require_tool("nbdinfo")
    proc = subprocess.run(
        ["nbdinfo", "--size", "--", "[", *BUSELAB, "ram", "--size", "1M", "]"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "1048576\n"  # buselab said nothing on the stdout it shares with nbdinfo


def test_nbdcopy_out_of_buselab_in_brackets(tmp_path):
    require_tool("nbdcopy")
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(1 << 20))
    out = tmp_path / "out.img"
    proc = subprocess.run(
        ["nbdcopy", "--", "[", *BUSELAB, "file", str(image), "--readonly", "]", str(out)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == image.read_bytes()


def test_systemd_socket_activate_tcp_with_pidfile(tmp_path):
    """systemd-socket-activate listens, starts buselab on the first client, hands it the socket."""
    require_tool("systemd-socket-activate", "nbdinfo")
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    pidfile = tmp_path / "pid"
    log = open(tmp_path / "log", "wb")  # noqa: SIM115 - closed below
    out = open(tmp_path / "out", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "-E", "PYTHONPATH"]
        + [*BUSELAB, "ram", "--size", "3M", "--pidfile", str(pidfile)],
        stdout=out,
        stderr=log,  # systemd-socket-activate says what it does there
    )
    try:
        deadline = time.monotonic() + 15
        while True:  # until systemd-socket-activate listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "log").read_text()
                time.sleep(0.05)
        size = subprocess.run(
            ["nbdinfo", "--size", f"nbd://127.0.0.1:{port}"], capture_output=True, text=True, timeout=30
        )
        assert size.stdout == str(3 << 20) + "\n", size.stderr + (tmp_path / "log").read_text()
        # It execs buselab: the same process, which wrote its pid once serving.
        assert pidfile.read_text() == f"{proc.pid}\n"
        proc.terminate()
        assert proc.wait(15) == 0, (tmp_path / "log").read_text()
        assert not pidfile.exists()
        assert (tmp_path / "out").read_text() == ""  # quiet: stdout belongs to whoever activated it
        assert "buselab" not in (tmp_path / "log").read_text().split("Execing")[-1].split("\n", 1)[-1]
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        out.close()


def test_inherited_tcp_socket_with_run_hides_the_variables(tmp_path):
    """$uri names the inherited socket; LISTEN_* are gone from the command's environment."""
    require_tool("nbdinfo")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    script = 'echo "$uri"; env | grep ^LISTEN_ || echo no-listen-variables; nbdinfo --size "$uri"'
    proc = subprocess.run(
        ["sh", "-c", ACTIVATE, "sh", *BUSELAB, "ram", "--size", "1M", "--run", script],
        stdin=listener,
        capture_output=True,
        text=True,
        timeout=30,
    )
    listener.close()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"nbd://127.0.0.1:{port}", "no-listen-variables", "1048576"]


def test_inherited_unix_socket_is_left_for_its_owner(tmp_path):
    """buselab serves an inherited Unix socket and does not unlink it: its maker (systemd) does."""
    require_tool("nbdinfo")
    path = str(tmp_path / "activated.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()
    proc = subprocess.run(
        ["sh", "-c", ACTIVATE, "sh", *BUSELAB, "ram", "--size", "1M", "--run", 'nbdinfo --size "$uri"']
        + ["--unix-mode", "600"],
        stdin=listener,
        capture_output=True,
        text=True,
        timeout=30,
    )
    listener.close()
    assert (proc.returncode, proc.stdout) == (0, "1048576\n"), proc.stderr
    assert os.path.exists(path)


def test_descriptor_that_is_not_a_listening_socket_is_one_line(tmp_path):
    not_a_socket = tmp_path / "file"
    not_a_socket.write_text("x")
    with open(not_a_socket) as f:
        proc = subprocess.run(
            ["sh", "-c", ACTIVATE, "sh", *BUSELAB, "ram", "--size", "1M"],
            stdin=f,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert proc.returncode == 2
    assert proc.stderr == "buselab: error: socket activation: descriptor 3 is not a socket\n"
    connected, _ = socket.socketpair()
    proc = subprocess.run(
        ["sh", "-c", ACTIVATE, "sh", *BUSELAB, "ram", "--size", "1M"],
        stdin=connected,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "descriptor 3 is not a listening stream socket" in proc.stderr and proc.stderr.count("\n") == 1


def test_variables_for_another_process_are_ignored(tmp_path: Path):
    """LISTEN_PID of some other process (leaked from an activated parent): not ours, default listener."""
    proc = subprocess.run(
        ["sh", "-c", 'LISTEN_PID=1 LISTEN_FDS=1 exec "$@"', "sh", *BUSELAB, "ram", "--size", "1M"]
        + ["--unix", str(tmp_path / "s"), "--run", "env | grep ^LISTEN_ || echo clean"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (proc.returncode, proc.stdout) == (0, "clean\n"), proc.stderr


def test_the_unit_files_in_the_docs_verify(tmp_path):
    """docs/SYSTEMD.md's .socket and .service pair, as systemd-analyze reads them."""
    require_tool("systemd-analyze")
    doc = (Path(__file__).resolve().parent.parent / "docs" / "SYSTEMD.md").read_text()
    units = dict(re.findall(r"`(buselab\.(?:socket|service))`\n\n```ini\n(.*?)```", doc, re.S))
    assert set(units) == {"buselab.socket", "buselab.service"}
    fake = tmp_path / "buselab"  # ExecStart must name an executable that exists
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    for name, body in units.items():
        (tmp_path / name).write_text(body.replace("/usr/local/bin/buselab", str(fake)))
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "buselab.socket"), str(tmp_path / "buselab.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
