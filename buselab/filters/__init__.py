"""Filters: nbdkit-style layers stacked over any backend, given on the CLI or added live.

    --filter delay:read=5ms,write=10ms     --filter delay:random=1ms-20ms
    --filter error:rate=0.1,errno=EIO,op=read
    --filter error:range=0-1M,errno=ENOSPC,op=write
    --filter throttle:mbps=10,iops=500     --filter readonly     --filter cache

A spec is NAME[:KEY=VALUE[,KEY=VALUE...]]. Filters given first sit lowest
(nearest the backend), as with nbdkit's --filter. Each filter module's
docstring lists its keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..errors import UserError
from .base import Filter
from .cache import CacheFilter
from .delay import DelayFilter
from .error import ErrorFilter
from .readonly import ReadonlyFilter
from .spec import split_spec
from .throttle import ThrottleFilter

if TYPE_CHECKING:
    from ..engine.engine import Engine

FILTERS: dict[str, type] = {
    "delay": DelayFilter,
    "error": ErrorFilter,
    "throttle": ThrottleFilter,
    "readonly": ReadonlyFilter,
    "cache": CacheFilter,
}
_ALIASES = {"rate": "throttle", "ro": "readonly", "errors": "error", "latency": "delay", "writeback": "cache"}

__all__ = [
    "FILTERS",
    "Filter",
    "CacheFilter",
    "DelayFilter",
    "ErrorFilter",
    "ReadonlyFilter",
    "ThrottleFilter",
    "apply_filter_specs",
    "parse_filter_spec",
]


def parse_filter_spec(spec: str, size: int | None = None) -> Filter:
    """Build an (unattached) filter from a spec; UserError with one line if it makes no sense.

    With `size`, byte ranges are checked against the disk.
    """
    name, params = split_spec(spec)
    name = _ALIASES.get(name, name)
    cls = FILTERS.get(name)
    if cls is None:
        raise UserError(f"unknown filter {name!r} in {spec!r}: choose one of {', '.join(FILTERS)}")
    try:
        return cls.from_params(params, size)
    except UserError as exc:
        message = str(exc)
        raise UserError(message if spec in message else f"{message} (in --filter {spec})") from None


def apply_filter_specs(engine: Engine, specs: Iterable[str]) -> list[Filter]:
    """Stack filters from specs over the engine's backend, first spec lowest.

    Every spec is checked before any is applied, so a bad one changes nothing.
    """
    from ..engine.steering import Steering

    steering = Steering.attach(engine)
    filters = [parse_filter_spec(spec, engine.size) for spec in specs]
    return [steering.add_filter(f) for f in filters]
