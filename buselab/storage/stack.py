"""A stack: filters over a base backend, and the layer requests meet first.

    top ─▶ cache ─▶ error ─▶ delay ─▶ base (ram, file, cow, ...)

Each filter sits in a `Layer` that owns what a listing shows of it: its number
(for `filter rm 2`), the spec it was made from and whether it is enabled. A
disabled layer stays in the list and keeps knowing what is below it, but
requests go past it. `top` is a plain attribute, rewired on every change, so the
serve path reads it once per request for the price of an attribute.

A Stack is not thread-safe and does not wait for requests: whoever changes it
(steering) first quiesces the engine, so no request is inside a layer while
`inner` pointers move.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from ..errors import UserError
from .base import Backend
from .filters.base import Filter


class StackError(UserError):
    """A layer that is not there, or a position that does not exist."""


@dataclass(eq=False)
class Layer:
    id: int
    filter: Filter
    spec: str
    enabled: bool = True

    @property
    def name(self) -> str:
        return self.filter.name


class Stack:
    def __init__(self, base: Backend) -> None:
        if isinstance(base, Filter):
            raise TypeError("a Stack's base is a backend; add filters with Stack.add")
        self.base: Backend = base
        self.layers: list[Layer] = []  # bottom (nearest the base) first
        self.top: Backend = base
        self.parallel = bool(base.parallel)  # the base's, read by the serving threads per request
        self._ids = itertools.count(1)

    @property
    def size(self) -> int:
        return self.top.size

    def describe(self) -> str:
        return self.top.describe()

    # -- changes (the engine quiesced) ------------------------------------------------
    def add(self, new: Filter, position: int | None = None) -> Layer:
        """Put a filter on top, or at `position` (0 = lowest)."""
        index = len(self.layers) if position is None else self._position(position)
        layer = Layer(next(self._ids), new, new.spec)
        self.layers.insert(index, layer)
        self._rewire()
        return layer

    def remove(self, layer: Layer) -> None:
        self.layers.remove(layer)
        self._rewire()

    def set_enabled(self, layer: Layer, enabled: bool) -> None:
        layer.enabled = bool(enabled)
        self._rewire()

    def replace_base(self, base: Backend) -> Backend:
        """Put `base` under the filters; returns the old base."""
        old, self.base = self.base, base
        self._rewire()
        self.parallel = bool(base.parallel)
        return old

    # -- questions -------------------------------------------------------------------
    def find(self, ref: int | str) -> Layer:
        """A layer by number, or by name or spec (the topmost that has it)."""
        text = str(ref).strip()
        if text.isdigit():
            found = [layer for layer in self.layers if layer.id == int(text)]
        else:
            found = [layer for layer in reversed(self.layers) if layer.name == text.lower() or layer.spec == text]
        if not found:
            have = ", ".join(f"{layer.id}:{layer.spec}" for layer in self.layers) or "none"
            raise StackError(f"no filter {text!r} (filters: {have})")
        return found[0]

    def enabled(self, kind: type[Filter] = Filter) -> list[Filter]:
        """The enabled filters of a kind, bottom first."""
        return [layer.filter for layer in self.layers if layer.enabled and isinstance(layer.filter, kind)]

    def _position(self, position: object) -> int:
        try:
            index = int(position)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            raise StackError(f"bad position {position!r}: 0 is lowest") from None
        if not 0 <= index <= len(self.layers):
            raise StackError(f"bad position {index}: choose 0 (lowest) to {len(self.layers)} (top)")
        return index

    def _rewire(self) -> None:
        top = self.base
        for layer in self.layers:
            layer.filter.inner = top  # a disabled filter still knows what is below it
            if layer.enabled:
                top = layer.filter
        self.top = top
