"""A client for the control socket: what `buselab ctl` and tests use."""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from ..errors import UserError
from . import control_dir, default_control_path, find_control_sockets


class ControlError(UserError):
    """The server refused a command; the message is its one line."""


def resolve_control_path(target: str | None) -> str:
    """PATH, a PID, or nothing (the only running buselab of this user)."""
    if target:
        if target.isdigit() and not os.path.exists(target):
            return default_control_path(int(target))
        return target
    found = find_control_sockets()
    if len(found) == 1:
        return found[0]
    if not found:
        hint = ""
        if os.getuid() != 0 and os.path.isdir("/tmp/buselab-0"):
            hint = " (a buselab started with sudo has its socket in /tmp/buselab-0: use sudo)"
        raise UserError(f"no running buselab found in {control_dir()}{hint}: give the control socket PATH")
    raise UserError(f"{len(found)} buselabs are running ({', '.join(found)}): give the control socket PATH or PID")


class ControlClient:
    def __init__(self, path: str, timeout: float | None = 600.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except FileNotFoundError:
            self.sock.close()
            raise UserError(
                f"no control socket at {path}: no buselab is running there"
                " (check the PATH, or leave it out to reach the one buselab you are running)"
            ) from None
        except OSError as exc:
            self.sock.close()
            raise UserError(f"cannot connect to the control socket {path}: {exc.strerror or exc}") from None
        self._reader = self.sock.makefile("rb")

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Send one command; the whole reply object ({"ok": ..., "result"/"error": ...})."""
        message = {"cmd": cmd, **{k: v for k, v in args.items() if v is not None}}
        try:
            self.sock.sendall(json.dumps(message).encode() + b"\n")
            line = self._reader.readline()
        except TimeoutError:
            raise UserError(f"buselab did not answer {cmd} in time") from None
        except OSError as exc:
            raise UserError(f"the control socket {self.path} failed: {exc.strerror or exc}") from None
        if not line:
            raise UserError(f"buselab closed the control socket {self.path} without answering {cmd}")
        return json.loads(line)

    def call(self, cmd: str, **args: Any) -> Any:
        """Send one command; its result, or ControlError with the server's line."""
        reply = self.request(cmd, **args)
        if not reply.get("ok"):
            raise ControlError(reply.get("error") or "refused")
        return reply.get("result")

    def close(self) -> None:
        try:
            self._reader.close()
        finally:
            self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
