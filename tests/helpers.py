"""Helpers shared by the test modules: the one place they come from.

Test modules import from here (``from helpers import ...``), never from one
another; conftest.py keeps only pytest fixtures. tests/test_helpers_shared.py
checks that.

Tests that need a system tool call `require_tool`: it skips with a reason when
the tool is missing, and fails instead when BUSELAB_REQUIRE_ALL=1 (CI sets it),
so CI can never go green by skipping.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from buselab.client import NBDClient
from buselab.engine.engine import Engine
from buselab.protocol import constants as c
from buselab.protocol.transmission import encode_request
from buselab.session import ServeOptions, Session
from buselab.storage.base import Backend
from buselab.transport.connection import Connection

REQUIRE_ALL = os.environ.get("BUSELAB_REQUIRE_ALL") == "1"
TIMEOUT = 15  # seconds: how long a test waits for a server before it calls it a hang


# --- what a test needs from the system ------------------------------------------------------


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


def nbdsh() -> list[str]:
    """nbdsh runs `python3 -m nbd`: with a python3 first on PATH that lacks libnbd's module, use the system one."""
    require_tool("nbdsh")
    if subprocess.run(["python3", "-c", "import nbd"], capture_output=True).returncode == 0:
        return ["nbdsh"]
    if subprocess.run(["/usr/bin/python3", "-c", "import nbd"], capture_output=True).returncode == 0:
        return ["/usr/bin/python3", "-m", "nbd"]
    missing("nbdsh is installed but its Python module (nbd) cannot be imported")
    raise AssertionError  # not reached


def wait_for(predicate, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


# --- buselab as a subprocess --------------------------------------------------------------------


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


# --- a Session in this process ------------------------------------------------------------------


def socket_path(session: Session) -> str:
    """The Unix socket a Session serves on: its one --unix path (tests start it with exactly one)."""
    paths = session.options.unix
    assert len(paths) == 1, f"expected a Session serving one Unix socket, it has {paths}"
    return paths[0]


@contextmanager
def serve(backend: Backend, tmp_path: Path, **options) -> Iterator[Session]:
    """A started Session serving `backend` on tmp_path/nbd.sock (see socket_path); stopped afterwards."""
    session = Session(backend, ServeOptions(unix=[str(tmp_path / "nbd.sock")], **options))
    session.start()
    try:
        yield session
    finally:
        session.stop()


def connect(session: Session, export_name: str = "") -> NBDClient:
    client = NBDClient.connect_unix(socket_path(session), export_name)
    client.sock.settimeout(TIMEOUT)
    return client


# --- speaking NBD byte by byte ---------------------------------------------------------------------


class RawClient:
    """An NBD client that sends exactly what it is told and parses replies by hand.

    It connects to a Unix socket `path`, or speaks over a connected `sock` (one
    end of a socketpair: see ConnectionHarness).
    """

    def __init__(
        self,
        path: str | None = None,
        *,
        sock: socket.socket | None = None,
        structured: bool = False,
        meta: bool = False,
        export_name: str = "",
        handshake: bool = True,
        timeout: float = TIMEOUT,
    ) -> None:
        if (path is None) == (sock is None):
            raise TypeError("RawClient needs a socket path or a connected socket, not both")
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(path)
        else:
            sock.settimeout(timeout)
        self.sock = sock
        self.timeout = timeout
        self.context_id: int | None = None
        self.size = self.flags = 0
        if handshake:
            self.handshake(structured=structured, meta=meta, export_name=export_name)

    # -- bytes -------------------------------------------------------------------------
    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise ConnectionError(f"server closed the connection after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def pending(self) -> bytes:
        """What the server has sent and we have not read, without waiting (b"" if nothing)."""
        timeout = self.sock.gettimeout()
        self.sock.settimeout(0)  # with a timeout set, recv would wait for data even with MSG_DONTWAIT
        try:
            return self.sock.recv(1 << 20)
        except BlockingIOError:
            return b""
        finally:
            self.sock.settimeout(timeout)

    def closed_by_server(self, timeout: float = TIMEOUT) -> bool:
        """True once the server has closed its end (EOF), after draining what it sent."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    # -- handshake -----------------------------------------------------------------------
    def option(self, opt: int, data: bytes = b"") -> None:
        self.send(struct.pack(">QII", c.IHAVEOPT, opt, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == c.OPTION_REPLY_MAGIC
        return opt, rtype, self.recv_exact(length)

    def replies_until_final(self) -> list[tuple[int, int, bytes]]:
        out = []
        while True:
            opt, rtype, payload = self.option_reply()
            out.append((opt, rtype, payload))
            if rtype == c.REP_ACK or rtype & c.REP_FLAG_ERROR:
                return out

    def greet(self, client_flags: int = 3) -> None:
        greeting = self.recv_exact(18)
        assert greeting == b"NBDMAGICIHAVEOPT\x00\x03"
        self.send(struct.pack(">I", client_flags))

    def handshake(self, *, structured: bool = False, meta: bool = False, export_name: str = "") -> None:
        self.greet()
        if structured:
            self.option(c.OPT_STRUCTURED_REPLY)
            assert self.replies_until_final()[-1][1] == c.REP_ACK
        if meta:
            query = b"base:allocation"
            name = export_name.encode()
            data = struct.pack(">I", len(name)) + name + struct.pack(">II", 1, len(query)) + query
            self.option(c.OPT_SET_META_CONTEXT, data)
            replies = self.replies_until_final()
            assert replies[-1][1] == c.REP_ACK, replies
            contexts = [r for r in replies if r[1] == c.REP_META_CONTEXT]
            assert len(contexts) == 1 and contexts[0][2][4:] == query
            self.context_id = struct.unpack_from(">I", contexts[0][2])[0]
        name = export_name.encode()
        self.option(c.OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        for _, rtype, payload in self.replies_until_final():
            assert not rtype & c.REP_FLAG_ERROR, payload
            if rtype == c.REP_INFO and struct.unpack_from(">H", payload)[0] == c.INFO_EXPORT:
                _, self.size, self.flags = struct.unpack(">HQH", payload)

    # -- transmission --------------------------------------------------------------------
    def request(self, cmd: int, handle: int, offset: int = 0, length: int = 0, flags: int = 0, payload=b"") -> None:
        self.send(encode_request(cmd, handle, offset, length, flags) + bytes(payload))

    def simple_reply(self) -> tuple[int, int]:
        """(error, handle) of the next simple reply; READ data is left unread."""
        magic, error, handle = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == c.SIMPLE_REPLY_MAGIC, f"bad reply magic {magic:#x}"
        return error, handle

    def chunk(self) -> tuple[int, int, int, bytes]:
        """(flags, type, handle, payload) of the next structured reply chunk."""
        magic, flags, rtype, handle, length = struct.unpack(">IHHQI", self.recv_exact(20))
        assert magic == c.STRUCTURED_REPLY_MAGIC, f"bad chunk magic {magic:#x}"
        return flags, rtype, handle, self.recv_exact(length)

    def read(self, offset: int, length: int, handle: int = 1) -> bytes:
        self.request(c.CMD_READ, handle, offset, length)
        error, got = self.simple_reply()
        assert (error, got) == (0, handle)
        return self.recv_exact(length)

    def close(self) -> None:
        try:
            self.request(c.CMD_DISC, 0)
        except OSError:
            pass
        self.sock.close()


# --- one Connection in memory ----------------------------------------------------------------------


class ConnectionHarness:
    """A real `Connection` serving an in-process Engine over a socketpair.

    The connection's `serve()` runs on a thread of its own; the test holds the
    other end of the socketpair as a RawClient (`client`). With `kernel=True`
    (the default) there is no handshake, as for the kernel's nbd driver: the
    client sends requests at once and gets simple replies. With `kernel=False`
    the client does the fixed-newstyle handshake first (optionally asking for
    structured replies and the base:allocation meta context), as a network
    client would. Use it as a context manager: on exit the client end is
    closed, the serving thread must end, and the engine is closed.

    With `start=False` (kernel mode only) the connection is made but not yet
    serving: what the client sends before `start()` is all waiting when the
    connection first reads, so it arrives as one batch.
    """

    def __init__(
        self,
        storage: Backend | Engine,
        *,
        kernel: bool = True,
        structured: bool = False,
        meta: bool = False,
        readonly: bool = False,
        timeout: float = 5.0,
        start: bool = True,
    ) -> None:
        if not start and not kernel:
            raise ValueError("a handshake needs the connection serving: start=False is for kernel mode")
        self.engine = storage if isinstance(storage, Engine) else Engine(storage, readonly=readonly)
        self.timeout = timeout
        server_end, client_end = socket.socketpair()
        self.connection = Connection(server_end, self.engine, "harness", kernel=kernel)
        self.thread = threading.Thread(target=self.connection.serve, name="harness-connection", daemon=True)
        if start:
            self.thread.start()
        try:
            self.client = RawClient(
                sock=client_end, handshake=not kernel, structured=structured, meta=meta, timeout=timeout
            )
        except BaseException:
            client_end.close()
            self.thread.join(timeout)
            self.engine.close()
            raise

    def start(self) -> None:
        """Start serving (for a harness made with start=False)."""
        self.thread.start()

    @property
    def backend(self) -> Backend:
        return self.engine.backend

    def send_in_background(self, data: bytes) -> threading.Thread:
        """Send `data` from another thread, so the test can read replies while a big batch goes out.

        (Sending it all first could fill both socket buffers: the server blocked sending
        replies nobody reads, the test blocked sending requests nobody reads.) Join the
        thread returned.
        """
        sender = threading.Thread(target=self.client.send, args=(data,), name="harness-sender", daemon=True)
        sender.start()
        return sender

    def wait_closed(self, timeout: float | None = None) -> str:
        """Wait until the connection has stopped serving; returns why it closed."""
        self.thread.join(self.timeout if timeout is None else timeout)
        assert not self.thread.is_alive(), f"the connection still serves after {timeout or self.timeout} s"
        return self.connection.closed_reason

    def disconnect(self) -> str:
        """Send DISC, and check the server sends nothing more and closes; returns why it closed."""
        self.client.request(c.CMD_DISC, 0)
        rest = bytearray()
        while chunk := self.client.sock.recv(65536):
            rest += chunk
        assert not rest, f"the server sent {len(rest)} bytes nobody asked for: {bytes(rest[:64])!r}..."
        return self.wait_closed()

    def close(self, check: bool = True) -> None:
        """Hang up, wait for the serving thread to end, close the engine (and its backend)."""
        try:
            self.client.sock.close()
            if self.thread.ident is None:
                self.thread.start()  # never started: let it see the hang-up and clean up
            self.thread.join(self.timeout)
        finally:
            self.engine.close()
        if check:
            assert not self.thread.is_alive(), "the connection did not stop serving once its client was gone"

    def __enter__(self) -> ConnectionHarness:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(check=exc_type is None)  # a failing test's own error is the one to see


# --- a real block device on buselab without the nbd driver (root): nbdfuse + a loop device ----


def sh(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@contextmanager
def nbdfuse(socket_path: str, where: Path) -> Iterator[Path]:
    """Expose the export as the file where/nbd; unmounted afterwards whatever happens."""
    where.mkdir(parents=True, exist_ok=True)
    pidfile = where.parent / f"{where.name}.pid"
    log = where.parent / f"{where.name}.nbdfuse.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["nbdfuse", "-P", str(pidfile), str(where / "nbd"), "--unix", socket_path], stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 15
        while not (pidfile.exists() and pidfile.read_text().strip()):
            if proc.poll() is not None:
                raise AssertionError(f"nbdfuse exited {proc.returncode}: {log.read_text()}")
            assert time.monotonic() < deadline, "nbdfuse did not start"
            time.sleep(0.05)
        yield where / "nbd"
    finally:
        if sh("fusermount3", "-u", str(where), check=False).returncode != 0:
            sh("umount", "-l", str(where), check=False)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def loop_device(path: Path) -> Iterator[str]:
    device = sh("losetup", "-f", "--show", str(path)).stdout.strip()
    assert device.startswith("/dev/loop"), device
    try:
        yield device
    finally:
        for _ in range(20):
            if sh("losetup", "-d", device, check=False).returncode == 0:
                break
            time.sleep(0.1)


# --- async tests (Textual's run_test) without pytest-asyncio ---------------------------------


def aio(test=None, *, timeout: float = 60.0):
    """Run an async test on its own event loop, failing it if it takes more than `timeout`
    seconds (a lab that hangs must not hang the suite). `@aio` or `@aio(timeout=90)`."""

    def wrap(test):
        @functools.wraps(test)
        def run(*args, **kwargs):
            return asyncio.run(asyncio.wait_for(test(*args, **kwargs), timeout))

        return run

    return wrap(test) if test is not None else wrap


# --- a real terminal: tmux on a private server ------------------------------------------------


def tmux(name: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """tmux on a private server (socket named after the test) with no config file.

    A tmux server that is already running (CI's own, a user's) would bring its
    options along: its window-size or default-size shrank our 160x50 window to
    80x24 once, and the narrow layout has no sequence-number column.
    """
    return subprocess.run(["tmux", "-L", name, "-f", "/dev/null", *args], **kwargs)


def tmux_capture(name: str) -> str:
    return tmux(name, "capture-pane", "-p", "-t", name, capture_output=True, text=True).stdout


def tmux_wait_for(name: str, predicate, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = tmux_capture(name)
        if predicate(screen):
            return screen
        time.sleep(0.2)
    raise AssertionError(f"the screen never got there; last capture:\n{screen}")


def tmux_seqs(screen: str) -> list[int]:
    """Sequence numbers of the stream rows on screen."""
    return [int(m) for m in re.findall(r"^│\s+(\d+) \d\d:\d\d:\d\d\.\d{3} ", screen, re.M)]


# --- the project as a fresh clone has it (test_packaging, test_lesson_vm_mode) ---------------------

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def copy_tree(dest: Path) -> None:
    """Copy into `dest` the files a fresh clone would have (tracked, or new and not ignored), not build leftovers."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        check=False,
    )
    if listed.returncode != 0:  # not a git checkout (an unpacked sdist): copy what is there
        leftovers = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", "*.so")
        shutil.copytree(PROJECT_ROOT, dest, ignore=leftovers, dirs_exist_ok=True)
        return
    for name in listed.stdout.decode().split("\0"):
        if name and (PROJECT_ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_ROOT / name, dest / name)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(extra)
    return env
