"""The lesson's VM, from the host: boot it, let it attach /dev/nbd0 to our server, run commands in it.

``buselab lesson NAME --vm`` needs no root and no nbd driver on the host: a qemu guest (software
emulation, as a normal user) with a Debian kernel attaches its own /dev/nbd0 to the host's
buselab through qemu's user network (the guest reaches the host's loopback as 10.0.2.2). The
guest's agent (agent.py) runs the lesson's commands there and reports the device's queue limits.

Other users of this machine can reach the host's loopback too, so both of the agent's
connections begin with a token only the guest knows (it is in a 0700 directory shared with the
VM): the agent's, and the NBD connection, which the host hands to the session only then. The
lesson's disk is served on no open port.

A ``GuestVm`` also stands in for the session's kernel attachment (``session.kernel``): it has
the ``device``, ``queue_limits()`` and ``detach()`` the lab and the lesson runner read, so the
readahead lesson explains with the guest's real max_sectors_kb.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .errors import KernelUnavailable, VmUnavailable
from .image import Image, build_image
from .machine import GUEST_CTL, ConsoleReader, qemu_binary, qemu_command, read_text, write_control

GUEST_DEVICE = "/dev/nbd0"
BOOT_TIMEOUT = 240.0  # seconds from qemu's start to an attached device (software emulation is slow)
LIMITS_REREAD = 3.0  # seconds a read of the guest's queue limits stays fresh
HOST_ADDRESS = "10.0.2.2"  # the host's loopback, as qemu's user network shows it to the guest


class VmStartError(Exception):
    """The VM could not be had or did not come up; the message is one line for the user."""


def image_for_lesson(what: str = "buselab lesson --vm") -> Image:
    """The VM image (built once per user), or VmStartError saying what is missing and how to get it."""
    qemu = qemu_binary()
    if shutil.which(qemu) is None:
        hint = (
            "apt-get install qemu-system-x86"
            if qemu == "qemu-system-x86_64"
            else "BUSELAB_VM_QEMU names it, and it is not there (unset BUSELAB_VM_QEMU, or name a qemu that is)"
        )
        raise VmStartError(f"{what} needs {qemu}: {hint}")
    try:
        return build_image()
    except KernelUnavailable as exc:
        raise VmStartError(
            f"{what} needs a Debian kernel package (linux-image-amd64) and could not get it"
            f" ({_first_line(exc)}): run `apt-get update` (as root) or point BUSELAB_VM_CACHE at a prebuilt image cache"
        ) from None
    except VmUnavailable as exc:
        raise VmStartError(f"{what} cannot build its VM image: {_first_line(exc)}") from None


class GuestVm:
    """A running guest whose /dev/nbd0 is attached to this process: ``serve_nbd(sock)`` serves
    the guest's NBD connection (the NBD handshake and then the driver's requests)."""

    def __init__(
        self, image: Image, serve_nbd: Callable[[socket.socket], object], *, mem: str = "1G", cpus: int = 2
    ) -> None:
        self.image = image
        self.serve_nbd = serve_nbd
        self.mem = mem
        self.cpus = cpus
        self.device = f"{GUEST_DEVICE} in the VM"  # what the lab's header says it serves
        self.guest_device = GUEST_DEVICE
        self.kernel_release = ""
        self.console_log: Path | None = None  # where the console went when the boot failed
        self._proc: subprocess.Popen[bytes] | None = None
        self._console: ConsoleReader | None = None
        self._ctl: Path | None = None
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[threading.Event, list[dict]]] = {}
        self._pending_lock = threading.Lock()
        self._limits: dict[str, int | str] = {}
        self._limits_at = 0.0
        self._limits_asked = False
        self._gone = threading.Event()
        self._stopped = False

    # -- starting ------------------------------------------------------------------------------------
    def start(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Boot, wait until the guest's /dev/nbd0 is attached; VmStartError (nothing left running) if not."""
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> None:
        token = secrets.token_hex(16)
        listener = socket.create_server(("127.0.0.1", 0))
        nbd_listener = socket.create_server(("127.0.0.1", 0))
        started = time.monotonic()
        threading.Thread(
            target=self._accept_nbd,
            args=(nbd_listener, token, started + timeout),
            name="buselab-vm-nbd-accept",
            daemon=True,
        ).start()
        try:
            self._ctl = Path(tempfile.mkdtemp(prefix="buselab-vm-ctl-"))  # 0700: the token stays ours
            config = {
                "host": HOST_ADDRESS,
                "agent_port": listener.getsockname()[1],
                "nbd_port": nbd_listener.getsockname()[1],
                "token": token,
                "device": GUEST_DEVICE,
            }
            (self._ctl / "agent.json").write_text(json.dumps(config))
            script = f"exec {shlex.quote(sys.executable)} -m buselab.vm.agent {GUEST_CTL}/agent.json\n"
            write_control(self._ctl, script, modules=("nbd nbds_max=1", "virtio_net"), network=True)
            # restrict=off: the guest must reach the host's loopback; it gets no default route,
            # so 10.0.2.0/24 (the host and qemu's own services) is all it can reach.
            cmd = qemu_command(self.image, self._ctl, mem=self.mem, cpus=self.cpus, netdev="user,id=n0,restrict=off")
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            self._console = ConsoleReader(self._proc, started)
            self._sock = self._accept(listener, token, started + timeout)
        finally:
            listener.close()
        hello = self._read_message(started + timeout)
        if "error" in hello:
            raise VmStartError(f"the VM could not attach {GUEST_DEVICE}: {hello['error']}")
        self._limits = hello.get("limits") or {}
        self._limits_at = time.monotonic()
        self.kernel_release = hello.get("kernel", "")
        threading.Thread(target=self._read_replies, name="buselab-vm-agent", daemon=True).start()

    def _accept(self, listener: socket.socket, token: str, deadline: float) -> socket.socket:
        listener.settimeout(0.2)
        while True:
            self._check_running(deadline, "its agent never called back")
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            sock.settimeout(None)
            self._reader = sock.makefile("rb")
            try:
                hello = self._read_message(deadline, sock)
            except VmStartError:
                sock.close()
                continue
            if hello.get("hello") == token:  # anyone on this machine may connect: only our guest knows it
                return sock
            sock.close()

    def _accept_nbd(self, listener: socket.socket, token: str, deadline: float) -> None:
        """Serve the first connection that starts with the token (the agent's NBD connection); then
        listen no more. Anyone else who connects meanwhile is hung up on, unserved."""
        proof = (token + "\n").encode()
        listener.settimeout(0.2)
        try:
            while not self._stopped and time.monotonic() < deadline:
                try:
                    sock, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                try:
                    sock.settimeout(5.0)
                    said = sock.recv(len(proof), socket.MSG_WAITALL)
                except OSError:
                    said = b""
                if said != proof:
                    sock.close()
                    continue
                sock.settimeout(None)
                self.serve_nbd(sock)
                return
        finally:
            listener.close()

    def _read_message(self, deadline: float, sock: socket.socket | None = None) -> dict:
        """One line from the agent while the boot is under way (qemu watched, the deadline kept)."""
        sock = sock or self._sock
        assert sock is not None
        result: list[bytes] = []
        done = threading.Event()

        def read() -> None:
            with contextlib.suppress(OSError):
                result.append(self._reader.readline())
            done.set()

        threading.Thread(target=read, daemon=True).start()
        while not done.wait(0.2):
            self._check_running(deadline, f"{GUEST_DEVICE} was not attached in time")
        if not result or not result[0]:
            raise VmStartError("the VM's agent hung up before it said anything" + self._why())
        try:
            return json.loads(result[0])
        except ValueError:
            raise VmStartError("the VM's agent said something unreadable") from None

    def _check_running(self, deadline: float, late: str) -> None:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise VmStartError(f"the VM stopped while booting (qemu exit {self._proc.returncode})" + self._why())
        if time.monotonic() > deadline:
            raise VmStartError(f"the VM did not come up: {late}" + self._why())

    def _why(self) -> str:
        """Where the console went, and the last line the guest or its script printed."""
        console = self._console.text() if self._console is not None else ""
        output = read_text(self._ctl / "output") if self._ctl is not None else ""
        last = next((line.strip() for line in reversed((console + output).splitlines()) if line.strip()), "")
        with contextlib.suppress(OSError):
            fd, name = tempfile.mkstemp(prefix="buselab-vm-console-", suffix=".log")
            with os.fdopen(fd, "w") as f:
                f.write(console + "\n--- agent ---\n" + output)
            self.console_log = Path(name)
        where = f"; console in {self.console_log}" if self.console_log else ""
        return (f": {last}" if last else "") + where

    # -- talking to the agent ------------------------------------------------------------------------
    def _read_replies(self) -> None:
        try:
            for line in self._reader:
                with contextlib.suppress(ValueError):
                    reply = json.loads(line)
                    if reply.get("limits") is not None:
                        self._limits = reply["limits"]
                        self._limits_at = time.monotonic()
                    with self._pending_lock:
                        waiter = self._pending.pop(reply.get("id"), None)
                    if waiter is not None:
                        waiter[1].append(reply)
                        waiter[0].set()
        except OSError:
            pass
        self._gone.set()
        with self._pending_lock:
            for event, _ in self._pending.values():
                event.set()  # no reply: the caller sees the VM gone
            self._pending.clear()

    def _ask(self, request: dict, timeout: float | None = None) -> dict | None:
        if self._sock is None or self._gone.is_set():
            return None
        ident = next(self._ids)
        waiter: tuple[threading.Event, list[dict]] = (threading.Event(), [])
        with self._pending_lock:
            self._pending[ident] = waiter
        try:
            with self._send_lock:
                self._sock.sendall((json.dumps({"id": ident, **request}) + "\n").encode())
        except OSError:
            return None
        waiter[0].wait(timeout)
        return waiter[1][0] if waiter[1] else None

    def run(self, line: str, env: dict[str, str] | None = None) -> tuple[int, str]:
        """Run a shell command as root in the guest: (exit status, stdout and stderr)."""
        reply = self._ask({"run": line, "env": env or {}})
        if reply is None:
            return 255, "the VM is gone"
        return int(reply.get("status", 255)), reply.get("output", "")

    def queue_limits(self) -> dict[str, int | str]:
        """The guest's /dev/nbd0 queue limits, as of the last command (re-read in the background)."""
        if time.monotonic() - self._limits_at > LIMITS_REREAD and not self._limits_asked:
            self._limits_asked = True

            def reread() -> None:
                self._ask({"limits": True}, timeout=30)
                self._limits_asked = False

            threading.Thread(target=reread, daemon=True).start()
        return dict(self._limits)

    # -- stopping ------------------------------------------------------------------------------------
    def detach(self, timeout: float = 10.0) -> None:
        """What session.stop() calls on a kernel attachment: the VM goes, and its device with it."""
        self.stop(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Power the guest off (qemu killed if it lingers) and forget the control share. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)  # the agent ends, and the guest powers off
            self._sock.close()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            # Nothing in the guest is worth keeping (the disk lives here, in the server):
            # qemu stops at once on SIGTERM.
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._console is not None:
            self._console.join()
        if self._ctl is not None:
            shutil.rmtree(self._ctl, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and not self._gone.is_set()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
