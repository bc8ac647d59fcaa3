"""Steering: the control plane of one engine, what the lab's keys and `buselab ctl` call.

It puts three parts behind one object, each in its own module:

- `stepping.Stepper`: pause, resume, step (release, fail with an errno, or
  delay the oldest held request), wait for requests to be held;
- `breakpoints.BreakpointTable`: breakpoints, which arm the gate;
- `restack.Restacker`: the stack -- filters added, removed and toggled, the
  base backend switched with its contents copied, power cut and power on, cow
  commit and discard.

The session makes one Steering for its engine and hands it to the control
server and the lab; nothing finds it through the engine. Every result is a
dataclass from `results.py`. Input that makes no sense raises a UserError with
one line (SteeringError, or the BreakpointError, FilterSpecError or StackError
of the part that refused it) and changes nothing.
"""

from __future__ import annotations

import threading

from ..engine.engine import Engine
from ..engine.gate import HeldRequest
from ..protocol.transmission import Request
from ..storage import registry
from ..storage.base import Backend
from ..storage.stack import Layer
from .breakpoints import Breakpoint, BreakpointTable
from .restack import Restacker, existing_data, export_data
from .results import (
    BreakHit,
    BreakpointInfo,
    CowCommitResult,
    CowDiscardResult,
    Event,
    ExistingData,
    FilterInfo,
    HeldInfo,
    PauseResult,
    PowercutResult,
    PoweronResult,
    Removed,
    ResumeResult,
    SteeringStatus,
    StepResult,
    SwitchProgress,
    SwitchResult,
    activity_fields,
)
from .stepping import Stepper


class Steering:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.stepper = Stepper(engine)
        self.breakpoints = BreakpointTable(lambda: engine.size)
        self.breakpoints.on_hit = self._announce_hit
        self.restacker = Restacker(engine)
        self._break_lock = threading.Lock()  # one change to the breakpoints at a time

    # -- the gate -------------------------------------------------------------------------
    @property
    def gate(self):
        return self.engine.gate

    @property
    def paused(self) -> bool:
        return self.stepper.paused

    def pause(self) -> PauseResult:
        return self.stepper.pause()

    def resume(self) -> ResumeResult:
        return self.stepper.resume()

    def held(self) -> list[HeldInfo]:
        return self.stepper.held()

    def oldest_wait(self) -> float:
        return self.stepper.oldest_wait()

    def step(self, action: str = "release", **how: object) -> StepResult:
        return self.stepper.step(action, **how)  # type: ignore[arg-type]

    def wait_held(self, count: int | str = 1, timeout: float | str = 10.0) -> list[HeldInfo]:
        return self.stepper.wait_held(count, timeout)

    @property
    def last_step(self) -> StepResult | None:
        return self.stepper.last_step

    @property
    def last_stepped(self) -> HeldRequest | None:
        return self.stepper.last_stepped

    # -- breakpoints ------------------------------------------------------------------------
    def add_breakpoint(self, spec: str) -> BreakpointInfo:
        with self._break_lock:
            bp = self.breakpoints.add(spec)
            self.gate.set_matcher(self.breakpoints.matcher())
        self.stepper._event(f"breakpoint {bp.id} set: {bp.spec}")
        return bp.info()

    def list_breakpoints(self) -> list[BreakpointInfo]:
        return self.breakpoints.infos()

    def remove_breakpoint(self, ref: int | str) -> Removed:
        with self._break_lock:
            removed = self.breakpoints.remove(ref)
            self.gate.set_matcher(self.breakpoints.matcher())
        for bp in removed:
            self.stepper._event(f"breakpoint {bp.id} removed: {bp.spec}")
        return Removed([bp.id for bp in removed])

    def set_breakpoint_enabled(self, ref: int | str, enabled: bool) -> BreakpointInfo:
        with self._break_lock:
            bp = self.breakpoints.set_enabled(ref, enabled)
            self.gate.set_matcher(self.breakpoints.matcher())
        self.stepper._event(f"breakpoint {bp.id} {'enabled' if enabled else 'disabled'}: {bp.spec}")
        return bp.info()

    def toggle_breakpoint(self, ref: int | str) -> BreakpointInfo:
        return self.set_breakpoint_enabled(ref, not self.breakpoints.find(ref).enabled)

    @property
    def last_break(self) -> BreakHit | None:
        """The request that last hit a breakpoint."""
        return self.breakpoints.last_hit

    def _announce_hit(self, bp: Breakpoint, req: Request) -> None:
        # On the serving thread, for a request that is about to be held: an event is an append.
        self.engine.telemetry.event(
            f"breakpoint {bp.id} ({bp.spec}) hit by {req.name} {req.offset}+{req.length}: paused"
        )

    # -- the stack ---------------------------------------------------------------------------
    @property
    def base(self) -> Backend:
        return self.restacker.base

    @property
    def layers(self) -> list[Layer]:
        """The filters' layers, bottom (nearest the backend) first."""
        return self.restacker.layers

    @property
    def switching(self) -> SwitchProgress | None:
        return self.restacker.switching

    def add_filter(self, spec: str, position: int | str | None = None) -> FilterInfo:
        return self.restacker.add_filter(spec, position)

    def remove_filter(self, ref: int | str) -> FilterInfo:
        return self.restacker.remove_filter(ref)

    def remove_all_filters(self) -> Removed:
        return self.restacker.remove_all_filters()

    def set_filter_enabled(self, ref: int | str, enabled: bool) -> FilterInfo:
        return self.restacker.set_filter_enabled(ref, enabled)

    def toggle_filter(self, ref: int | str) -> FilterInfo:
        return self.restacker.toggle_filter(ref)

    def list_filters(self) -> list[FilterInfo]:
        return self.restacker.list_filters()

    def switch_backend(
        self,
        kind: str,
        path: str | None = None,
        *,
        size: int | str | None = None,
        copy: bool = True,
        overwrite: bool = False,
    ) -> SwitchResult:
        return self.restacker.switch_backend(kind, path, size=size, copy=copy, overwrite=overwrite)

    def switch_would_overwrite(self, kind: str, path: str | None) -> ExistingData | None:
        """What a copying switch to `kind` at `path` would overwrite (a file's data, a block
        device), or None; the lab asks before it passes overwrite=True. It reads the
        target's first bytes: call it off the UI thread."""
        if not path:
            return None
        kind = registry.switch_kind(kind)
        if kind == "nbd":
            backend, _ = registry.open_switch_target(kind, path, None, self.engine.size, self.restacker.stack.base)
            try:
                return export_data(backend, path)
            finally:
                backend.close()
        if kind != "file":
            return None
        return existing_data(path)

    def powercut(self) -> PowercutResult:
        return self.restacker.powercut()

    def poweron(self) -> PoweronResult:
        return self.restacker.poweron()

    def cow_commit(self) -> CowCommitResult:
        return self.restacker.cow_commit()

    def cow_discard(self) -> CowDiscardResult:
        return self.restacker.cow_discard()

    # -- the whole picture ---------------------------------------------------------------------
    def status(self) -> SteeringStatus:
        engine = self.engine
        base = self.base
        telemetry = engine.telemetry
        snap = telemetry.snapshot()
        gate = engine.gate
        held = [h.replier.number for h in gate.held()]
        activity = telemetry.activity(snap=snap, held=held, releasing=gate.releasing)
        return SteeringStatus(
            backend=base.describe(),
            kind=base.kind,
            size=engine.size,
            paused=self.paused,
            held=self.held(),
            oldest_wait=round(self.oldest_wait(), 3),
            filters=self.list_filters(),
            breakpoints=self.list_breakpoints(),
            last_break=self.last_break,
            last_step=self.last_step,
            switching=self.switching,
            requests=snap.total_requests,
            connections=len(engine.telemetry.connections),
            **activity_fields(activity),
            powered_off=self.restacker.powered_off,
            cow_changed_bytes=self.restacker.cow_changed_bytes(),
        )

    def events(self, after: float = 0.0, limit: int = 50) -> list[Event]:
        events = [(t, m) for t, m in list(self.engine.telemetry.events) if t > after]
        return [Event(time=t, message=m) for t, m in events[-max(1, int(limit)) :]]
