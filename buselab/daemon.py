"""Running as a daemon: --pidfile, --fork and --exit-with-parent, as qemu-nbd and nbdkit do them.

--fork forks before anything else runs (no thread exists yet, so the child is a
whole process). The parent waits on a pipe: the child writes one byte once it
serves (sockets listening, device attached, pidfile written), and the parent
then exits 0. If the child fails before that, it says why on the stderr it still
shares with the parent and exits; the parent sees the pipe close without the
byte and exits with the child's status. So `buselab ram --fork ... && nbdinfo URI`
never races the server, and an error is never lost in a detached process.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

from .errors import UserError

log = logging.getLogger("buselab")

_READY = b"R"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_POLL = 0.5  # seconds between looks at the parent where prctl is missing


# --- --pidfile -------------------------------------------------------------------------------------


@contextlib.contextmanager
def pidfile(path: str | None) -> Iterator[None]:
    """Write our pid to `path` (whole or not at all), and remove it on the way out if it is still ours."""
    if path is None:
        yield
        return
    path = os.path.abspath(path)  # a daemon may change directory; the removal must find it
    pid = os.getpid()
    temp = f"{path}.{pid}.tmp"
    try:
        with open(temp, "w") as f:
            f.write(f"{pid}\n")
        os.replace(temp, path)  # a reader never sees an empty or half-written file
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise UserError(f"cannot write --pidfile {path}: {exc.strerror}") from None
    try:
        yield
    finally:
        try:
            with open(path) as f:
                ours = f.read().strip() == str(pid)
            if ours:  # another server may have taken the name since: leave its file alone
                os.unlink(path)
        except OSError:
            pass


# --- --fork ----------------------------------------------------------------------------------------


def fork_until_serving() -> Callable[[], None]:
    """Fork; return (in the child) the function to call once serving. The parent never returns.

    Call it before any thread starts. The child starts a new session (no controlling
    terminal, so the shell's ^C and hangup are not for it).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        os._exit(_parent_waits(pid, read_end))
    os.close(read_end)
    os.setsid()

    def serving() -> None:
        try:
            os.write(write_end, _READY)
        finally:
            os.close(write_end)
        _detach_stdio()

    return serving


def _parent_waits(pid: int, read_end: int) -> int:
    while True:
        try:
            got = os.read(read_end, 1)
            break
        except InterruptedError:
            continue
        except KeyboardInterrupt:
            # ^C while the child starts: it is in its own session and did not get it.
            os.kill(pid, signal.SIGTERM)
            got = b""
            break
    if got == _READY:
        return 0
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        print(f"buselab: the server was killed by signal {-code} before it served", file=sys.stderr)
        return 128 - code
    return code or 1  # it never served: that is a failure even if it exited 0


def _detach_stdio() -> None:
    """Stdin, stdout and stderr to /dev/null: `$(buselab ram --fork)` must not wait for a daemon's stdout."""
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError):
            os.dup2(devnull, fd)
    os.close(devnull)


# --- --exit-with-parent ----------------------------------------------------------------------------


def exit_with_parent(stop: threading.Event, parent: int) -> None:
    """Set `stop` when the process `parent` (our parent when we started) goes away.

    Linux: the kernel sends SIGTERM (prctl PR_SET_PDEATHSIG), which the stop-signal
    handler turns into a clean stop. Elsewhere a thread looks at getppid() every
    PARENT_POLL seconds. Either way, a parent that already left is noticed at once.
    """
    if not _set_parent_death_signal(signal.SIGTERM):
        threading.Thread(target=_watch_parent, args=(stop, parent), name="buselab-parent", daemon=True).start()
    if os.getppid() != parent:  # gone before the prctl took effect
        log.warning("the parent process (%d) has already exited: stopping (--exit-with-parent)", parent)
        stop.set()


def _set_parent_death_signal(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(stop: threading.Event, parent: int) -> None:
    while not stop.wait(PARENT_POLL):
        if os.getppid() != parent:
            log.warning("the parent process (%d) exited: stopping (--exit-with-parent)", parent)
            stop.set()
            return


# --- serving without a front end -------------------------------------------------------------------


def serve_quietly(session, seconds: float | None = None) -> int:
    """Serve, printing nothing, until a stop is asked for (signal, --run's command ending, `seconds`)."""
    deadline = None if seconds is None else time.monotonic() + seconds
    try:
        while not session.stop_requested.wait(0.5):
            if deadline is not None and time.monotonic() >= deadline:
                break
    finally:
        session.stop()
    return 0
