"""The gate between arriving requests and the backend: pause, resume, step.

While the gate is closed (halted), requests are held: the client waits for
its reply, exactly as it would for a slow disk. `step` releases the oldest
one, `resume` all of them in arrival order. Breakpoints (a matcher that
steering installs) halt the gate when a request matches, and hold that
request. Released requests run on the gate's own worker thread, so neither
the UI nor a connection ever blocks on a backend because of the gate.

The gate knows the engine only as the `execute` function it is given, and
counts what it has released and not yet answered in its own in-flight slot
(`InFlight`), which is how `Engine.quiesce` knows it has finished.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..protocol.transmission import Request
from .inflight import InFlight

Execute = Callable[[Request], tuple[int, object]]


class Replier(Protocol):
    """Whoever can send a reply for a request: a connection."""

    number: int

    def complete(self, req: Request, start: float, error: int, data: object) -> None: ...


@dataclass
class HeldRequest:
    req: Request
    replier: Replier
    start: float  # perf_counter at arrival
    held_since: float = field(default_factory=time.monotonic)
    breakpoint: object = None  # what stopped it, when a breakpoint did
    action: tuple[str, float] | None = None  # set by step: ("fail", errno) or ("delay", seconds)


class Gate:
    def __init__(self, execute: Execute, inflight: InFlight) -> None:
        self._execute = execute
        self._inflight = inflight
        self._slot = inflight.open("gate")  # executing: released and not answered yet
        # Connections read `paused` for every request, so it stays one plain
        # attribute: True while requests must go through `hold` -- the gate is
        # halted (the user's pause), or breakpoints are armed, in which case
        # `hold` lets every request that matches none of them run at once.
        self.paused = False
        self.refusing = 0  # an errno: every request gets it without running (see refuse)
        self.halted = False
        self.matcher: Callable[[Request], object] | None = None
        self._held: deque[HeldRequest] = deque()
        self._lock = threading.Lock()
        self._held_more = threading.Condition(self._lock)  # notified when a request is held
        self.pauses = 0  # pause() calls so far: lets quiesce see a user's pause during it
        self._work: queue.SimpleQueue[HeldRequest | None] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._run, name="buselab-gate", daemon=True)
        self._worker.start()

    # -- called by connections ----------------------------------------------
    def hold(self, req: Request, replier: Replier, start: float) -> bool:
        """Hold a request if the gate is halted or it hits a breakpoint; False means run it now."""
        if self.refusing:
            replier.complete(req, start, self.refusing, None)
            return True
        hit = None
        if not self.halted:
            matcher = self.matcher
            if matcher is None:
                return False
            hit = matcher(req)
            if not hit:
                return False
        with self._lock:
            if hit:
                self.halted = self.paused = True
                self.pauses += 1
            elif not self.halted:
                return False
            if req.payload is not None:
                # The connection reuses its receive buffer for the next request.
                req.payload = bytes(req.payload)
            self._held.append(HeldRequest(req, replier, start, breakpoint=hit))
            self._held_more.notify_all()
            return True

    def refuse(self, error: int) -> None:
        """Answer every request from now on with `error` without running it (ESHUTDOWN when
        the server stops). Costs the serve loop nothing: it goes through `paused`, which it
        reads anyway."""
        with self._lock:
            self.refusing = error
            self.paused = True

    # -- called by the UI / control socket -----------------------------------
    def pause(self) -> None:
        with self._lock:
            self.halted = self.paused = True
            self.pauses += 1

    def release_all(self) -> int:
        """Disarm breakpoints and answer everything held: nothing may wait while we stop."""
        self.set_matcher(None)
        return self.resume()

    def set_matcher(self, matcher: Callable[[Request], object] | None) -> None:
        """Arm breakpoints: `matcher(req)` returns what matched (truthy) or None."""
        with self._lock:
            self.matcher = matcher
            self.paused = self.halted or matcher is not None or bool(self.refusing)

    def resume(self) -> int:
        with self._lock:
            self.halted = False
            self.paused = self.matcher is not None or bool(self.refusing)
            released = list(self._held)
            self._held.clear()
            self._slot.executing += len(released)
        for item in released:
            self._work.put(item)
        return len(released)

    def step(self, action: tuple[str, float] | None = None) -> HeldRequest | None:
        """Release the oldest held request; None if nothing is held.

        `action` may fail it without running it, ("fail", errno), or run it
        late, ("delay", seconds).
        """
        with self._lock:
            item = self._held.popleft() if self._held else None
            if item is not None:
                self._slot.executing += 1
        if item is not None:
            item.action = action
            self._work.put(item)
        return item

    @property
    def releasing(self) -> int:
        """Released requests still queued or running on the worker."""
        return self._slot.executing

    def wait_released(self, timeout: float = 10.0) -> bool:
        """Wait until released requests have been answered; False on timeout."""
        return self._inflight.wait_for(lambda: not self._slot.executing, timeout)

    def wait_held(self, count: int, timeout: float) -> bool:
        """Wait until at least `count` requests are held; False if `timeout` seconds pass first."""
        with self._held_more:
            return self._held_more.wait_for(lambda: len(self._held) >= count, timeout)

    def held(self) -> list[HeldRequest]:
        with self._lock:
            return list(self._held)

    def oldest_wait(self) -> float:
        with self._lock:
            return time.monotonic() - self._held[0].held_since if self._held else 0.0

    def forget_connection(self, replier: Replier) -> list[HeldRequest]:
        """A client went away: its held requests will never be answered."""
        with self._lock:
            dropped = [h for h in self._held if h.replier is replier]
            self._held = deque(h for h in self._held if h.replier is not replier)
        return dropped

    def close(self, timeout: float = 10.0) -> None:
        """Answer everything held, then stop the worker once it has drained."""
        self.release_all()
        self._work.put(None)
        if self._worker is not threading.current_thread():
            self._worker.join(timeout)

    # -- the worker ----------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            try:
                action = item.action
                if action is not None and action[0] == "fail":
                    item.replier.complete(item.req, item.start, int(action[1]), None)
                    continue
                if action is not None and action[0] == "delay":
                    time.sleep(action[1])
                error, data = self._execute(item.req)
                item.replier.complete(item.req, item.start, error, data)
            finally:
                with self._lock:
                    self._slot.executing -= 1
                if self._inflight.waiters:
                    self._inflight.wake()
