"""The control socket: steering a running buselab from scripts (`buselab ctl`).

Every serving buselab listens on a Unix socket (`--control PATH`, by default
`default_control_path()`: $XDG_RUNTIME_DIR/buselab/PID.ctl when that directory
is ours, else /tmp/buselab-UID/PID.ctl, in a directory only we can enter).
The protocol is one JSON object per line each way; see `protocol.py`.
"""

from __future__ import annotations

import os
import socket
import stat
import tempfile

from ..errors import UserError
from ..processes import pid_alive

__all__ = ["control_dir", "default_control_path", "ensure_private_dir", "find_control_sockets", "prune_stale_sockets"]


def control_dir() -> str:
    """Where default control sockets live for this user."""
    uid = os.getuid()
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        try:
            st = os.stat(runtime)
        except OSError:
            st = None
        # Under sudo XDG_RUNTIME_DIR may still be the invoking user's: not ours.
        if st is not None and stat.S_ISDIR(st.st_mode) and st.st_uid == uid:
            return os.path.join(runtime, "buselab")
    return os.path.join(tempfile.gettempdir(), f"buselab-{uid}")


def default_control_path(pid: int | None = None) -> str:
    """The control socket a buselab with this pid (default: us) listens on without --control."""
    return os.path.join(control_dir(), f"{pid or os.getpid()}.ctl")


def ensure_private_dir(path: str) -> None:
    """Make `path` a directory only we can use, or refuse if someone else owns it."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError as exc:
        raise UserError(f"cannot create {path} for the control socket ({exc.strerror}): give --control PATH") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise UserError(
            f"{path} is not a private directory of yours (owner or permissions): remove it or give --control PATH"
        )


def socket_is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _default_sockets(directory: str) -> list[tuple[int, str]]:
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    out = []
    for name in names:
        stem, _, ext = name.partition(".")
        if ext == "ctl" and stem.isdigit():
            out.append((int(stem), os.path.join(directory, name)))
    return sorted(out)


def prune_stale_sockets(directory: str | None = None) -> None:
    """Remove default sockets whose buselab is gone (killed with SIGKILL, say)."""
    for pid, path in _default_sockets(directory or control_dir()):
        if not pid_alive(pid):
            try:
                os.unlink(path)
            except OSError:
                pass


def find_control_sockets() -> list[str]:
    """Live default control sockets of this user, oldest pid first; stale ones are removed."""
    prune_stale_sockets()
    return [path for _, path in _default_sockets(control_dir()) if socket_is_live(path)]
