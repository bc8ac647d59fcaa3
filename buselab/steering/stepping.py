"""The gate's controls as the lab's keys and `buselab ctl` use them: pause, resume, step.

A step releases the oldest held request, or fails it with an errno without
running it, or runs it late. Every change is an event in the telemetry, so the
lab's stream shows it. Input that makes no sense raises `SteeringError`.
"""

from __future__ import annotations

import logging
import time

from ..engine.engine import Engine
from ..engine.gate import HeldRequest
from ..protocol import constants as c
from ..storage.spec import parse_errno
from .errors import SteeringError
from .results import HeldInfo, PauseResult, ResumeResult, StepResult

log = logging.getLogger("buselab")

STEP_ACTIONS = ("release", "fail", "delay")
MAX_DELAY_MS = 3_600_000


def held_info(item: HeldRequest, now: float | None = None) -> HeldInfo:
    bp = item.breakpoint
    return HeldInfo.of(
        item.req,
        conn=getattr(item.replier, "number", 0),
        waited=round((now or time.monotonic()) - item.held_since, 3),
        breakpoint=getattr(bp, "id", None) if bp is not None else None,
    )


class Stepper:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.gate = engine.gate
        self.last_step: StepResult | None = None  # the request last stepped, for status
        self.last_stepped: HeldRequest | None = None  # ... and the request itself (payload included), for the lab

    def _event(self, message: str) -> None:
        self.engine.telemetry.event(message)
        log.info("%s", message)

    @property
    def paused(self) -> bool:
        """The user's pause (or a breakpoint's): requests that arrive are held."""
        return self.gate.halted

    def pause(self) -> PauseResult:
        was = self.gate.halted
        self.gate.pause()
        if not was:
            self._event("paused: new requests are held")
        return PauseResult(paused=True, held=len(self.gate.held()))

    def resume(self) -> ResumeResult:
        was = self.gate.halted
        released = self.gate.resume()
        if was or released:
            self._event(f"resumed: released {released} held request{'s' if released != 1 else ''}")
        return ResumeResult(paused=False, released=released)

    def held(self) -> list[HeldInfo]:
        now = time.monotonic()
        return [held_info(item, now) for item in self.gate.held()]

    def oldest_wait(self) -> float:
        """Seconds the oldest held request has waited (for the header)."""
        return self.gate.oldest_wait()

    def step(
        self,
        action: str = "release",
        *,
        errno: int | str | None = None,
        delay_ms: float | str | None = None,
        wait: float | str = 0.0,
    ) -> StepResult:
        """Release the oldest held request; or fail it with `errno`; or run it `delay_ms` late.

        `wait` seconds: wait that long for a request to be held if none is yet.
        """
        action = (action or "release").lower()
        if action not in STEP_ACTIONS:
            raise SteeringError(f"unknown step action {action!r}: choose one of {', '.join(STEP_ACTIONS)}")
        gate_action: tuple[str, float] | None = None
        if action == "fail":
            gate_action = ("fail", parse_errno(errno if errno is not None else "EIO"))
        elif action == "delay":
            try:
                ms = float(delay_ms) if delay_ms is not None else -1.0
            except (TypeError, ValueError):
                raise SteeringError(f"bad delay {delay_ms!r}: give milliseconds, e.g. 500") from None
            if not 0 < ms <= MAX_DELAY_MS:
                raise SteeringError(f"bad delay {delay_ms!r}: give milliseconds between 1 and {MAX_DELAY_MS}")
            gate_action = ("delay", ms / 1000)
        elif errno is not None or delay_ms is not None:
            raise SteeringError("errno goes with step --fail, a delay with step --delay")
        self._wait_for_held(1, seconds(wait, "wait"), strict=False)
        if not self.gate.halted and not self.gate.held():
            raise SteeringError("not paused: pause first (or set a breakpoint), then step")
        item = self.gate.step(gate_action)
        if item is None:
            raise SteeringError("nothing is held: no request has arrived since the pause (try step --wait 5)")
        self.last_stepped = item
        held = held_info(item)
        info = StepResult(
            **{name: getattr(held, name) for name in HeldInfo.__dataclass_fields__},
            action=action,
            errno=c.ERRNO_NAMES[int(gate_action[1])] if action == "fail" and gate_action else None,
            delay_ms=gate_action[1] * 1000 if action == "delay" and gate_action else None,
            still_held=len(self.gate.held()),
        )
        self.last_step = info
        how = {
            "release": "",
            "fail": f", failed with {info.errno}",
            "delay": f", delayed {info.delay_ms or 0:g} ms",
        }[action]
        self._event(f"stepped {info.op} {info.offset}+{info.length}{how}")
        return info

    def wait_held(self, count: int | str = 1, timeout: float | str = 10.0) -> list[HeldInfo]:
        """Wait until at least `count` requests are held; the held list, or SteeringError on timeout."""
        try:
            count = int(count)
        except (TypeError, ValueError):
            raise SteeringError(f"bad count {count!r}: give a whole number") from None
        if count < 1:
            raise SteeringError("count must be at least 1")
        self._wait_for_held(count, seconds(timeout, "timeout"), strict=True)
        return self.held()

    def _wait_for_held(self, count: int, timeout: float, *, strict: bool) -> None:
        if not self.gate.wait_held(count, timeout) and strict:
            n = len(self.gate.held())
            raise SteeringError(f"{n} request{'s' if n != 1 else ''} held after {timeout:g} s, not {count}")


def seconds(value: object, what: str) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SteeringError(f"bad {what} {value!r}: give seconds") from None
    if not 0 <= number <= 3600:
        raise SteeringError(f"bad {what} {value!r}: give 0 to 3600 seconds")
    return number
