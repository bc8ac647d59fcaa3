"""The user's own disk: a Python class, as BUSE's `struct buse_operations` was.

    class MyDisk:
        size = 64 * 1024 * 1024
        def read(self, offset, length): ...        # returns bytes
        def write(self, offset, data): ...
        def flush(self): ...                       # optional
        def trim(self, offset, length): ...        # optional
        def write_zeroes(self, offset, length): ...# optional

`buselab plugin mydisk.py[:MyDisk]` loads it. A backend installed in its own
package is found by name, `buselab plugin NAME`, through the `buselab.backends`
entry-point group (`NAME = "package.module:MyDisk"` in its pyproject.toml). Without a class name the file
must define exactly one class with `read` and `write`; `size` may be a class
attribute or set in `__init__`, and an `__init__` with a `size` parameter gets
`--size`. Which optional methods exist decides what the server advertises.

To fail a request, raise `OSError` or `BackendError`. Any other exception is
a bug: the engine logs it with the line of this file that raised it (the full
traceback with -v), the first ten times, and the client gets EIO.

A `read` that returns something other than `length` bytes (a str, None, too
few bytes) fails the request with EIO as a `BackendFault` naming the plugin's
file and the line of its `read`; the engine logs each kind of fault once and
the lab's inspector shows the reason on the failed request.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import os
import sys
from typing import Any

from ...errors import UserError
from ...protocol import constants as c
from ..base import Backend, BackendFault, Capabilities


def _looks_like_disk(obj: Any) -> bool:
    # `size` is not required here: many disks set self.size in __init__.
    return inspect.isclass(obj) and all(callable(getattr(obj, name, None)) for name in ("read", "write"))


ENTRY_POINT_GROUP = "buselab.backends"


def installed_backends() -> dict[str, importlib.metadata.EntryPoint]:
    """Backends that packages declare in the `buselab.backends` entry-point group, by name."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _is_name(spec: str) -> bool:
    """Could `spec` be an installed backend's name rather than a file (no path, no .py)?"""
    return bool(spec) and os.sep not in spec and ":" not in spec and not spec.endswith(".py")


def load_installed(name: str) -> type | None:
    """The class an installed package registers as `name`, or None when no package does."""
    ep = installed_backends().get(name)
    if ep is None:
        return None
    where = f"installed backend {name} ({ep.value}" + (f" from {ep.dist.name})" if ep.dist else ")")
    try:
        cls = ep.load()
    except Exception as exc:  # the package's code: any error at all is theirs to see
        raise UserError(f"{where} failed to import: {type(exc).__name__}: {exc}") from exc
    if not _looks_like_disk(cls):
        raise UserError(f"{where} is not a class with read(offset, length) and write(offset, data)")
    return cls


def load_plugin_class(spec: str) -> type:
    path, _, class_name = spec.partition(":")
    if not os.path.isfile(path):
        installed = load_installed(spec) if _is_name(spec) else None
        if installed is not None:
            return installed
        if _is_name(spec):
            names = ", ".join(sorted(installed_backends())) or "none"
            raise UserError(
                f"plugin {spec}: no such file, and no installed backend of that name"
                f" (installed in the {ENTRY_POINT_GROUP} entry points: {names})"
            )
        raise UserError(f"plugin file {path} does not exist")
    module_name = f"buselab_plugin_{abs(hash(os.path.abspath(path)))}"
    try:
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise UserError(f"{path} is not a Python file buselab can load")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        loader_spec.loader.exec_module(module)
    except UserError:
        raise
    except Exception as exc:  # the user's code: any error at all is theirs to see
        raise UserError(f"plugin {path} failed to import: {type(exc).__name__}: {exc}") from exc
    if class_name:
        cls = getattr(module, class_name, None)
        if cls is None or not inspect.isclass(cls):
            raise UserError(f"plugin {path} has no class {class_name}")
        if not _looks_like_disk(cls):
            raise UserError(f"{class_name} in {path} needs size, read(offset, length) and write(offset, data)")
        return cls
    candidates = [obj for obj in vars(module).values() if _looks_like_disk(obj) and obj.__module__ == module_name]
    if len(candidates) != 1:
        names = ", ".join(cls.__name__ for cls in candidates) or "none"
        raise UserError(f"{path} defines {len(candidates)} disk classes ({names}): name one as {path}:ClassName")
    return candidates[0]


class PluginBackend(Backend):
    kind = "plugin"

    def __init__(self, spec: str, size: int | None = None) -> None:
        self.spec = spec
        cls = load_plugin_class(spec)
        # The engine points at the line in this file when the plugin raises
        # (an installed backend's is its module's, wherever the package is).
        self.source_file = os.path.abspath(spec.partition(":")[0])
        if not os.path.isfile(self.source_file):
            self.source_file = os.path.abspath(inspect.getsourcefile(cls) or self.source_file)
        if size is not None and not _takes_size(cls):
            raise UserError(f"plugin class {cls.__name__} takes no size argument: drop --size")
        try:
            self.disk = cls(size=size) if size is not None else cls()
        except Exception as exc:
            raise UserError(f"plugin class {cls.__name__} failed to start: {type(exc).__name__}: {exc}") from exc
        raw_size = getattr(self.disk, "size", None)
        if raw_size is None:
            raise UserError(f"plugin class {cls.__name__} has no size: set self.size to the disk's size in bytes")
        try:
            self.size = int(raw_size() if callable(raw_size) else raw_size)
        except Exception as exc:
            raise UserError(f"plugin {cls.__name__}.size must be a number of bytes, not {raw_size!r}") from exc
        if self.size <= 0:
            raise UserError(f"plugin {cls.__name__}.size is {self.size}: a disk needs at least one byte")
        self.name = cls.__name__
        has = lambda name: callable(getattr(self.disk, name, None))  # noqa: E731
        self.caps = Capabilities(
            flush=has("flush"),
            fua=has("flush"),  # FUA is emulated as write + flush
            trim=has("trim"),
            zero=True,  # emulated with writes when the plugin has no write_zeroes
            cache=False,
            multi_conn=bool(getattr(self.disk, "can_multi_conn", False)),
        )

    def describe(self) -> str:
        return f"plugin {self.name} ({self.spec.partition(':')[0]})"

    def read(self, offset: int, length: int) -> bytes:
        data = self.disk.read(offset, length)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            got = "None" if data is None else type(data).__name__
            raise self._fault("read", f"returned {got}", f", expected bytes of length {length}")
        if memoryview(data).nbytes != length:
            got = memoryview(data).nbytes
            raise self._fault("read", f"returned too {'few' if got < length else 'many'} bytes", f": {got} of {length}")
        return data

    def _fault(self, operation: str, what: str, detail: str) -> BackendFault:
        """The plugin's `operation` broke the contract: `what` it did (a kind of fault), `detail` of this request."""
        kind = f"plugin {self.source_line(operation)} {operation}() {what}"
        return BackendFault(c.EIO, kind + detail, kind)

    def source_line(self, operation: str) -> str:
        """The file and first line of the plugin's method, as "mydisk.py:12" (the path as given)."""
        method = getattr(self.disk, operation, None)
        func = inspect.unwrap(getattr(method, "__func__", method))  # type: ignore[arg-type]
        code = getattr(func, "__code__", None)
        if code is None:  # not a Python function (a builtin, a callable object)
            return self.spec.partition(":")[0]
        filename = code.co_filename
        if os.path.abspath(filename) == self.source_file:
            filename = self.spec.partition(":")[0]  # as the user wrote it
        return f"{filename}:{code.co_firstlineno}"

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        self.disk.write(offset, bytes(data))
        if fua:
            self.disk.flush()

    def flush(self) -> None:
        if self.caps.flush:
            self.disk.flush()

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self.disk.trim(offset, length)
        if fua:
            self.flush()

    def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool, fua: bool = False) -> None:
        if callable(getattr(self.disk, "write_zeroes", None)):
            self.disk.write_zeroes(offset, length)
            if fua:
                self.flush()
        else:
            super().write_zeroes(offset, length, may_trim=may_trim, fast=fast, fua=fua)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            close = getattr(self.disk, "close", None)
            if callable(close):
                close()


def _takes_size(cls: type) -> bool:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False
    return "size" in params
