"""Socket activation: serve on listening sockets handed down by systemd or libnbd.

The protocol is sd_listen_fds(3)'s: LISTEN_PID names the process the sockets
are for, LISTEN_FDS how many there are (descriptors 3, 4, ...), and
LISTEN_FDNAMES optionally names them (colon-separated). libnbd's
`nbdinfo -- [ buselab ram ]` uses the same variables with one Unix socket.

The variables are removed from the environment once read (sd_listen_fds with
unset_environment), so a child -- a --run command, a plugin's helper -- does not
take the sockets for its own: LISTEN_PID would not match it, but a child that
execs without forking would keep our pid.
"""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass

from .errors import UserError

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START
_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


@dataclass
class Inherited:
    sock: socket.socket
    name: str  # from LISTEN_FDNAMES ("" when not given)


def inherited_sockets(environ: dict[str, str] | None = None) -> list[Inherited]:
    """The listening sockets passed to this process, or [] when none were; the variables are unset.

    A LISTEN_PID for another process means the variables leaked from an activated parent:
    they are not ours, so nothing is taken (and they are still removed). A descriptor that is
    not a listening stream socket is one clear error, not a server that never accepts.
    """
    env = os.environ if environ is None else environ
    pid_text, count_text, names_text = (env.get(name) for name in _VARIABLES)
    for name in _VARIABLES:
        env.pop(name, None)
    if pid_text is None or count_text is None:
        return []
    try:
        pid, count = int(pid_text), int(count_text)
    except ValueError:
        raise UserError(
            f"socket activation: LISTEN_PID={pid_text!r} LISTEN_FDS={count_text!r} are not numbers"
        ) from None
    if pid != os.getpid() or count <= 0:
        return []
    names = (names_text or "").split(":") if names_text else []
    found = []
    for i in range(count):
        fd = LISTEN_FDS_START + i
        found.append(Inherited(_listening_socket(fd), names[i] if i < len(names) else ""))
    return found


def _listening_socket(fd: int) -> socket.socket:
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise UserError(f"socket activation: descriptor {fd} is not open ({exc.strerror})") from None
    if not stat.S_ISSOCK(mode):
        raise UserError(f"socket activation: descriptor {fd} is not a socket")
    os.set_inheritable(fd, False)  # ours now: a --run command must not hold the listener open
    sock = socket.socket(fileno=fd)
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise UserError(f"socket activation: descriptor {fd} is not a listening stream socket (use ListenStream=)")
    # systemd may hand it over non-blocking; accept() must wait for clients, not fail with EAGAIN.
    sock.setblocking(True)
    return sock
