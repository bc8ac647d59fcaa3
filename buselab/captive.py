"""Captive mode, as nbdkit's --run: serve, run a command against the disk, stop when it ends.

    buselab ram --size 1G --run 'qemu-img convert -n disk.qcow2 "$uri"'

The command runs through /bin/sh with these set (nbdkit's names and meaning):

    $uri, $nbd    the NBD URI (TCP before Unix, as nbdkit), export name included
    $port         the TCP port, or empty
    $unixsocket   the Unix socket's path, or empty
    $exportname   the export name
    $dev          /dev/nbdN when a device is attached, else empty; $nbd is then the device

When it exits buselab stops cleanly and exits with its status; a command killed by
signal N gives 128+N (nbdkit's rule since 1.24). With the lab open the lab stays
after the command ends (so the picture can be read) until q, and the command's
output goes to the lab's event stream instead of over the screen; without the lab
the command has buselab's stdin, stdout and stderr, and buselab prints nothing of
its own, so `size=$(buselab ram --run 'nbdinfo --size "$uri"')` is just the number.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from urllib.parse import urlsplit

from .session import Session, export_uri

log = logging.getLogger("buselab")

SHELL = "/bin/sh"
STOP_WAIT = 5.0  # seconds a command gets after SIGTERM (buselab itself was stopped) before SIGKILL
KEEP_LINES = 200  # the command's last output lines, printed again after the lab closes


def command_environment(session: Session, base: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ plus $uri, $nbd, $port, $unixsocket, $exportname, $dev for this session."""
    env = dict(os.environ if base is None else base)
    name = session.engine.export_name
    host = port = unix = ""
    for address in session.network.addresses:
        if address.startswith("nbd://") and not port:
            parts = urlsplit(address)
            host, port = parts.netloc.rpartition(":")[0], str(parts.port)
        elif address.startswith("nbd+unix:///?socket=") and not unix:
            unix = address[len("nbd+unix:///?socket=") :]
    if host in ("0.0.0.0", "[::]"):  # listening on every address: the command connects through loopback
        host = "localhost"
    if port:  # nbdkit's choice when there are both: TCP
        uri = export_uri(f"nbd://{host}:{port}", name)
    elif unix:
        uri = export_uri(f"nbd+unix:///?socket={unix}", name)
    else:
        uri = ""
    device = session.kernel.device if session.kernel is not None else ""
    env.update(uri=uri, nbd=device or uri, port=port, unixsocket=unix, exportname=name, dev=device)
    return env


class Captive:
    """The --run command: started once buselab serves, watched until it exits."""

    def __init__(self, command: str, session: Session, *, lab: bool) -> None:
        self.command = command
        self.session = session
        self.lab = lab  # the lab is on screen: the command may not write over it
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.output: deque[str] = deque(maxlen=KEEP_LINES)
        self._done = threading.Event()
        self._relay: threading.Thread | None = None  # with the lab: the command's output to the event stream

    def start(self) -> None:
        quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
        try:
            self.proc = subprocess.Popen(
                [SHELL, "-c", self.command], env=command_environment(self.session), **(quiet if self.lab else {})
            )
        except OSError as exc:  # no /bin/sh, out of processes
            self.returncode = 127
            self._done.set()
            log.error("cannot run the --run command: %s", exc.strerror)
            self.session.stop_requested.set()
            return
        self.session.engine.telemetry.event(f"--run: started `{self.command}` (pid {self.proc.pid})")
        if self.lab:
            self._relay = threading.Thread(target=self._relay_output, name="buselab-run-output", daemon=True)
            self._relay.start()
        threading.Thread(target=self._wait, name="buselab-run", daemon=True).start()

    def _relay_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.output.append(line)
            self.session.engine.telemetry.event(f"--run: {line}")

    def _wait(self) -> None:
        assert self.proc is not None
        code = self.proc.wait()
        self.returncode = 128 - code if code < 0 else code
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        if self._relay is not None:
            self._relay.join(1.0)  # its last lines before the news that it ended (a grandchild may hold the pipe)
        if self.lab:
            # Short, and the news first: the stream's column cuts a long line.
            self.session.engine.telemetry.event(f"--run: {how}; press q to quit (still serving)")
            self.session.notice = f"The --run command {how}. The disk is still served: press q to quit."
        else:
            if code < 0:
                print(f"buselab: the --run command {how}", file=sys.stderr)
            self.session.stop_requested.set()  # captive: the server's life is the command's
        self._done.set()

    def finish(self) -> int:
        """The command's status (128+N if signal N ended it); a command still running is stopped first.

        It is still running when buselab was stopped (a signal, q in the lab): it gets SIGTERM,
        and SIGKILL if it has not gone STOP_WAIT seconds later.
        """
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._done.wait()
        if self.lab and self.output:
            print("\n".join(self.output))  # what scrolled by in the lab, now on the terminal
        assert self.returncode is not None
        return self.returncode
