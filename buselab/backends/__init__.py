"""Backends: where the bytes of a buselab disk live."""

from __future__ import annotations

from .base import Backend, BackendError, Capabilities, wire_errno

__all__ = ["Backend", "BackendError", "Capabilities", "wire_errno", "open_backend", "BACKEND_KINDS"]

BACKEND_KINDS = ("ram", "file", "lo", "null", "plugin")
DEFAULT_RAM_SIZE = 128 << 20


def open_backend(kind: str, *, size: int | None = None, path: str | None = None, readonly: bool = False) -> Backend:
    """Make a backend from CLI-style arguments. Raises UserError on bad input."""
    from ..errors import UserError

    if kind == "ram":
        from .ram import RamBackend

        backend: Backend = RamBackend(size or DEFAULT_RAM_SIZE)
    elif kind in ("file", "lo"):
        from .file import FileBackend

        if not path:
            raise UserError(f"{kind} needs a PATH: a file or a block device")
        backend = FileBackend(path, size, readonly)
    elif kind == "null":
        from .null import NullBackend

        if not size:
            raise UserError("null needs --size (there is nothing else to take it from)")
        backend = NullBackend(size)
    elif kind == "plugin":
        from .plugin import PluginBackend

        if not path:
            raise UserError("plugin needs FILE[:CLASS]")
        backend = PluginBackend(path, size)
    else:
        raise UserError(f"unknown backend {kind!r}: choose one of {', '.join(BACKEND_KINDS)}")
    if readonly:
        backend.readonly = True
    return backend
