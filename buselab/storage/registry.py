"""The one factory for storage: backends by kind and filters by spec.

The command line (`buselab ram`, `--filter`), a live switch (`ctl switch`, the
lab's `b`) and a live filter (`ctl filter add`, the lab's `f`) all make their
backends and filters here, so a kind or a filter is added in one place.
Errors are `UserError`s whose one line says what is wrong with the value; the
front end that took the value says where it came from.
"""

from __future__ import annotations

import os

from ..errors import UserError
from .backends.cow import CowBackend
from .base import Backend
from .filters.base import Filter
from .filters.cache import CacheFilter
from .filters.delay import DelayFilter
from .filters.error import ErrorFilter
from .filters.readonly import ReadonlyFilter
from .filters.throttle import ThrottleFilter
from .spec import split_spec

DEFAULT_RAM_SIZE = 128 << 20
BACKEND_KINDS = ("ram", "file", "lo", "null", "plugin", "nbd")  # what the command line serves
SWITCH_KINDS = ("ram", "file", "cow", "null", "plugin", "nbd")  # what a running disk can switch to

FILTERS: dict[str, type[Filter]] = {
    "delay": DelayFilter,
    "error": ErrorFilter,
    "throttle": ThrottleFilter,
    "readonly": ReadonlyFilter,
    "cache": CacheFilter,
}
_FILTER_ALIASES = {"rate": "throttle", "ro": "readonly", "errors": "error", "latency": "delay", "writeback": "cache"}


class FilterSpecError(UserError):
    """A filter spec that makes no sense. `reason` is one line; `spec` is the text as given.

    str() is the reason alone: the command line words it "(in --filter SPEC)", the
    control socket and the lab "(in filter SPEC)", each where it reports it.
    """

    def __init__(self, spec: str, reason: str) -> None:
        super().__init__(reason)
        self.spec = spec
        self.reason = reason

    def worded(self, where: str) -> str:
        """The reason with where the spec came from, unless the reason quotes the spec already."""
        return self.reason if self.spec in self.reason else f"{self.reason} (in {where} {self.spec})"


def parse_filter_spec(spec: str, size: int | None = None) -> Filter:
    """Build an (unstacked) filter from a spec; FilterSpecError if it makes no sense.

    With `size`, byte ranges are checked against the disk.
    """
    try:
        name, params = split_spec(spec)
        name = _FILTER_ALIASES.get(name, name)
        cls = FILTERS.get(name)
        if cls is None:
            raise UserError(f"unknown filter {name!r} in {spec!r}: choose one of {', '.join(FILTERS)}")
        return cls.from_params(params, size)  # type: ignore[attr-defined]
    except FilterSpecError:
        raise
    except UserError as exc:
        raise FilterSpecError(str(spec), str(exc)) from None


def open_backend(kind: str, *, size: int | None = None, path: str | None = None, readonly: bool = False) -> Backend:
    """Make a backend from command-line arguments. Raises UserError on bad input."""
    if kind == "ram":
        from .backends.ram import RamBackend

        backend: Backend = RamBackend(size or DEFAULT_RAM_SIZE)
    elif kind in ("file", "lo"):
        from .backends.file import FileBackend

        if not path:
            raise UserError(f"{kind} needs a PATH: a file or a block device")
        backend = FileBackend(path, size, readonly)
    elif kind == "null":
        from .backends.null import NullBackend

        if not size:
            raise UserError("null needs --size (there is nothing else to take it from)")
        backend = NullBackend(size)
    elif kind == "plugin":
        from .backends.plugin import PluginBackend

        if not path:
            raise UserError("plugin needs FILE[:CLASS]")
        backend = PluginBackend(path, size)
    elif kind == "nbd":
        from .backends.nbd_proxy import NbdProxyBackend

        if not path:
            raise UserError("nbd needs a URI: nbd://HOST[:PORT]/NAME or nbd+unix:///NAME?socket=PATH")
        backend = NbdProxyBackend(path, size)
    else:
        raise UserError(f"unknown backend {kind!r}: choose one of {', '.join(BACKEND_KINDS)}")
    if readonly:
        backend.readonly = True
    return backend


def switch_kind(kind: object) -> str:
    """The backend kind a switch asks for, normalised ('lo' is 'file'); UserError if unknown."""
    name = str(kind or "").strip().lower()
    name = "file" if name == "lo" else name
    if name not in SWITCH_KINDS:
        raise UserError(f"unknown backend {name!r}: choose one of {', '.join(SWITCH_KINDS)}")
    return name


def open_switch_target(
    kind: str, path: str | None, size: int | None, current_size: int, current: Backend
) -> tuple[Backend, bool]:
    """The backend a live switch moves the disk into, and whether it starts out all zeros (fresh).

    `current` is the base backend being replaced (a file cannot be switched onto itself).
    A `cow` without a path is an overlay over `current`: see `overlay`.
    """
    if kind == "ram":
        from .backends.ram import RamBackend

        return RamBackend(size or current_size), True
    if kind == "null":
        from .backends.null import NullBackend

        return NullBackend(size or current_size), True
    if not path:
        what = {"plugin": "a PATH (FILE[:CLASS] or an installed backend's NAME)", "nbd": "a URI (nbd://HOST/NAME)"}
        raise UserError(f"switch {kind} needs {what.get(kind, 'a PATH')}")
    if kind == "nbd":
        from .backends.nbd_proxy import NbdProxyBackend

        return NbdProxyBackend(path, size), False
    if kind == "plugin":
        from .backends.plugin import PluginBackend

        return PluginBackend(path, size), False
    if kind == "cow":
        return CowBackend.over_file(path), False
    from .backends.file import FileBackend

    old_path = getattr(current, "path", None)
    if old_path and os.path.exists(path) and os.path.exists(old_path) and os.path.samefile(path, old_path):
        raise UserError(f"{path} is the file being served already")
    exists = os.path.exists(path)
    return FileBackend(path, size or (None if exists else current_size)), not exists


def overlay(base: Backend) -> CowBackend:
    """A copy-on-write overlay over `base`: changes kept in memory until commit or discard."""
    return CowBackend(base)
