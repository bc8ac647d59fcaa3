"""What is in flight: requests inside a backend, and replies sent but not yet counted.

Every serving thread (a connection, a replay, the gate's release worker) owns a
`Slot` and writes its two numbers without a lock -- it does so for every
request, so a lock there would cost more than the backend call of a RAM disk:

- `executing`: requests of this slot inside the backend (or released by the
  gate and not yet answered). `Engine.quiesce` waits until every slot has
  none, after pausing the gate, to change the stack under no request.
- `unrecorded`: replies already sent whose bookkeeping (telemetry, a trace's
  tap) is not done. A connection answers a lone request before it counts it, so
  a client can hold its reply a few microseconds before telemetry has seen it;
  `Engine.settle` waits until every slot has none, so a snapshot or a stopped
  recording agrees with what clients saw.

Waiting is on a Condition, never a sleep loop. The owner of a slot, after it
lowers a number, looks at `InFlight.waiters` (one attribute read) and only when
someone waits takes the Condition to wake them. A waiter registers before it
looks at the slots, so the two orders that matter are: the owner lowers its
number, then reads `waiters`; the waiter raises `waiters`, then reads the
numbers. Under the GIL one of them sees the other's write, so a wake-up is
never lost.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable


class Slot:
    """One serving thread's share of what is in flight; written only by its owner."""

    __slots__ = ("name", "executing", "unrecorded", "__weakref__")

    def __init__(self, name: str) -> None:
        self.name = name
        self.executing = 0
        self.unrecorded = 0

    def __repr__(self) -> str:
        return f"Slot({self.name!r}, executing={self.executing}, unrecorded={self.unrecorded})"


class InFlight:
    def __init__(self) -> None:
        # Weak: a slot whose owner is gone without closing it counts for nothing.
        self._slots: weakref.WeakSet[Slot] = weakref.WeakSet()
        self._cond = threading.Condition()
        self.waiters = 0  # threads inside wait(): owners wake them after lowering a number

    def open(self, name: str) -> Slot:
        slot = Slot(name)
        with self._cond:
            self._slots.add(slot)
        return slot

    def close(self, slot: Slot) -> None:
        """The owner is done: whatever it had in flight will never finish."""
        slot.executing = slot.unrecorded = 0
        with self._cond:
            self._slots.discard(slot)
            self._cond.notify_all()

    def wake(self) -> None:
        """Called by an owner after lowering a number, when `waiters` says someone waits."""
        with self._cond:
            self._cond.notify_all()

    def executing(self) -> int:
        return sum(slot.executing for slot in list(self._slots))

    def unrecorded(self) -> int:
        return sum(slot.unrecorded for slot in list(self._slots))

    def wait_until_idle(self, timeout: float) -> bool:
        """Until no request is inside a backend; False if `timeout` seconds pass first."""
        return self.wait_for(lambda: not any(slot.executing for slot in list(self._slots)), timeout)

    def wait_until_recorded(self, timeout: float) -> bool:
        """Until every reply sent has been counted; False if `timeout` seconds pass first."""
        return self.wait_for(lambda: not any(slot.unrecorded for slot in list(self._slots)), timeout)

    def wait_for(self, done: Callable[[], bool], timeout: float) -> bool:
        """Until `done()` (a question about the slots); False if `timeout` seconds pass first."""
        if done():  # the common case: nothing pending, no lock taken
            return True
        deadline = time.monotonic() + timeout
        with self._cond:
            self.waiters += 1
            try:
                while not done():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._cond.wait(left)
                return True
            finally:
                self.waiters -= 1
