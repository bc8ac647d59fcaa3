"""What steering answers: one dataclass per kind of result the lab and `buselab ctl` receive.

The lab reads their attributes; the control socket sends `to_json()`, whose keys
are the field names (a field may name its JSON key in its metadata, as `from_`
does) and which leaves out optional fields that are None. The JSON is what
`buselab ctl --json` printed before these classes existed; README's "Control
socket" section lists it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..protocol import constants as c
from ..protocol.transmission import Request
from ..sizes import human_bytes


def _key(name: str) -> dict[str, Any]:
    return {"json": name}


_OPTIONAL = {"optional": True}  # left out of the JSON when None


def to_json(value: Any) -> Any:
    """A result (or a list of them) as plain JSON-able values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if item is None and f.metadata.get("optional"):
                continue
            out[f.metadata.get("json", f.name)] = to_json(item)
        return out
    if isinstance(value, list | tuple):
        return [to_json(item) for item in value]
    if isinstance(value, dict):
        return {key: to_json(item) for key, item in value.items()}
    return value


class Result:
    def to_json(self) -> Any:
        return to_json(self)


# -- requests ------------------------------------------------------------------------------


def flag_names(flags: int) -> list[str]:
    return [name for bit, name in ((c.CMD_FLAG_FUA, "FUA"), (c.CMD_FLAG_NO_HOLE, "NO_HOLE")) if flags & bit]


@dataclass(frozen=True)
class RequestInfo(Result):
    op: str
    offset: int
    length: int
    flags: list[str]
    handle: int

    @classmethod
    def of(cls, req: Request, **more: Any) -> Any:
        return cls(
            op=req.name, offset=req.offset, length=req.length, flags=flag_names(req.flags), handle=req.handle, **more
        )


@dataclass(frozen=True)
class HeldInfo(RequestInfo):
    """A request the gate holds."""

    conn: int = 0  # connection number
    waited: float = 0.0  # seconds held so far
    breakpoint: int | None = None  # the breakpoint that caught it


@dataclass(frozen=True)
class StepResult(HeldInfo):
    """The request a step released (or failed, or delayed)."""

    action: str = "release"
    errno: str | None = field(default=None, metadata=_OPTIONAL)  # with action "fail"
    delay_ms: float | None = field(default=None, metadata=_OPTIONAL)  # with action "delay"
    still_held: int = 0


@dataclass(frozen=True)
class BreakHit(RequestInfo):
    """The request that last hit a breakpoint (it is held)."""

    breakpoint: int = 0
    spec: str = ""
    time: float = 0.0  # wall clock


# -- the gate ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PauseResult(Result):
    paused: bool
    held: int


@dataclass(frozen=True)
class ResumeResult(Result):
    paused: bool
    released: int


# -- breakpoints and filters ---------------------------------------------------------------------


@dataclass(frozen=True)
class BreakpointInfo(Result):
    id: int
    spec: str
    enabled: bool
    hits: int


@dataclass(frozen=True)
class Removed(Result):
    """Ids of what `rm` (or `rm all`) took away."""

    removed: list[int]


@dataclass(frozen=True)
class FilterInfo(Result):
    id: int
    name: str
    spec: str
    enabled: bool
    stats: dict[str, Any]


# -- the backend ---------------------------------------------------------------------------------


@dataclass
class SwitchProgress(Result):
    """A switch copying the disk: moved on by the copy as it goes (the header shows it)."""

    to: str
    copied: int = 0  # bytes of data copied
    position: int = 0  # how far through the disk, holes included
    total: int = 0


@dataclass(frozen=True)
class SwitchResult(Result):
    from_: str = field(metadata=_key("from"))
    to: str
    kind: str
    size: int
    copied_bytes: int
    seconds: float | None = field(default=None, metadata=_OPTIONAL)  # none for a cow overlay: nothing copied
    # The disk's size before, when a bigger target made it bigger (new clients see the new size).
    grew_from: int | None = field(default=None, metadata=_OPTIONAL)


@dataclass(frozen=True)
class ExistingData(Result):
    """What a switch's copy would overwrite: a file that holds data, or a block device."""

    path: str
    what: str  # "file", "block device" or "NBD export"
    size: int | None  # None: a block device that could not be opened to ask
    signature: str  # what its first bytes look like: "ext4 file system", "GPT partition table", ..., "data"

    def describe(self) -> str:
        """'a file of 16.0 MiB (ext4 file system)'."""
        size = f" of {human_bytes(self.size)}" if self.size is not None else ""
        article = "an" if self.what[:1] in "aeiouNS" else "a"  # "an NBD export"
        return f"{article} {self.what}{size} ({self.signature})"

    def refusal(self) -> str:
        """The one line a switch that would copy over it answers."""
        return (
            f"{self.path} is {self.describe()}: copying the disk into it would overwrite that; "
            "add --overwrite if you mean it"
        )


@dataclass(frozen=True)
class PowercutResult(Result):
    lost_bytes: int
    lost_writes: int = 0  # writes (trims, zeroings) whose data the cut threw away
    lost_requests: list[int] = field(default_factory=list)  # their numbers, as the lab's stream shows them


@dataclass(frozen=True)
class PoweronResult(Result):
    """The power back after a power cut: the disk serves again, its cache empty."""

    off_seconds: float  # how long the power was off
    refused: int  # requests answered EIO meanwhile


@dataclass(frozen=True)
class CowCommitResult(Result):
    committed_bytes: int


@dataclass(frozen=True)
class CowDiscardResult(Result):
    discarded_bytes: int


@dataclass(frozen=True)
class Event(Result):
    time: float
    message: str


# -- the whole picture -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectionFlight(Result):
    """One connection's requests in flight: read and not answered (held ones included)."""

    conn: int
    peer: str
    in_flight: int  # now
    max_in_flight: int  # the most at once over the status' window


@dataclass(frozen=True)
class OpLatency(Result):
    """One op's latency over the status' window: the time its requests spent in buselab."""

    p50_ms: float
    p99_ms: float
    requests: int


@dataclass(frozen=True)
class SequentialShare(Result):
    """Of one op's requests looked at over the window: how many started where one before them
    (same connection and op, one of the 8 before) ended; a connection's first counts as neither."""

    sequential: int
    random: int
    share: float | None  # sequential / (sequential + random); None when there were none


def activity_fields(activity: Any) -> dict[str, Any]:
    """A telemetry Activity as SteeringStatus' in-flight, latency, sizes and sequential fields."""
    latency: dict[str, OpLatency] = {}
    sizes: dict[str, dict[str, int]] = {}
    sequential: dict[str, SequentialShare] = {}
    for cmd, op in activity.ops.items():
        name = c.CMD_NAMES.get(cmd, f"CMD{cmd}")
        if op.requests:
            latency[name] = OpLatency(round(op.p50 * 1e3, 6), round(op.p99 * 1e3, 6), op.requests)
        if op.sizes:
            sizes[name] = {str(bucket): n for bucket, n in op.sizes.items()}
        if op.sequential or op.random:
            share = op.sequential_share
            sequential[name] = SequentialShare(op.sequential, op.random, None if share is None else round(share, 4))
    return {
        "in_flight": activity.in_flight,
        "max_in_flight": activity.max_in_flight,
        "in_flight_by_connection": [
            ConnectionFlight(conn.conn, conn.peer, conn.in_flight, conn.max_in_flight) for conn in activity.connections
        ],
        "latency": latency,
        "sizes": sizes,
        "sequential": sequential,
        "window": round(activity.seconds, 3),
    }


@dataclass(frozen=True)
class SteeringStatus(Result):
    """What steering knows: the stack, the gate, breakpoints; and what the requests look like
    over the last seconds (`window`): in flight, latency, sizes, sequential share."""

    backend: str
    kind: str
    size: int
    paused: bool
    held: list[HeldInfo]
    oldest_wait: float
    filters: list[FilterInfo]
    breakpoints: list[BreakpointInfo]
    last_break: BreakHit | None
    last_step: StepResult | None
    switching: SwitchProgress | None
    requests: int
    connections: int
    in_flight: int = 0  # requests read and not answered now, held ones included
    max_in_flight: int = 0  # the most at once over the window
    in_flight_by_connection: list[ConnectionFlight] = field(default_factory=list)
    latency: dict[str, OpLatency] = field(default_factory=dict)  # by op name
    sizes: dict[str, dict[str, int]] = field(default_factory=dict)  # by op name: size bucket (bytes, up to) -> requests
    sequential: dict[str, SequentialShare] = field(default_factory=dict)  # by op name
    window: float = 0.0  # seconds that latency, max_in_flight, sizes and sequential cover
    powered_off: bool = False  # a power cut and no poweron since: every request fails with EIO
    cow_changed_bytes: int | None = field(default=None, metadata=_OPTIONAL)


@dataclass(frozen=True)
class Status(SteeringStatus):
    """`buselab ctl status`: steering's picture and where the session serves."""

    where: str = ""
    control: str | None = None  # the control socket's path
    control_error: str | None = None  # why there is none
    # requests and bytes since the start per kind of structure they touched (superblock,
    # journal, data, ...; "unknown" where the disk holds nothing buselab recognises)
    structures: dict[str, dict[str, int]] = field(default_factory=dict)
    queue_limits: dict[str, int | str] | None = None  # a kernel device's request queue (sysfs)

    @classmethod
    def of(cls, steering: SteeringStatus, **session: Any) -> Status:
        fields = {f.name: getattr(steering, f.name) for f in dataclasses.fields(SteeringStatus)}
        return cls(**fields, **session)
