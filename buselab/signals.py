"""SIGINT and SIGTERM as a request to stop, from before the first client can connect.

A supervisor may stop buselab the moment its socket appears; if the default
handlers were still in place then, SIGTERM would kill it without a flush. So
the CLI installs these before the session starts, and the headless loop and
the lab watch `session.stop_requested`.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def stop_on_signals(event: threading.Event) -> Iterator[threading.Event]:
    """While inside, SIGINT/SIGTERM set `event` instead of killing the process."""

    def handle(signum: int, _frame: object) -> None:
        # Not event.set() here: the handler runs in the main thread between two
        # bytecodes, possibly inside event.wait() while that holds the event's
        # (non-reentrant) lock -- a signal delivered to another thread is handled
        # just after the main thread's wait times out and retakes that lock --
        # and set() would then wait for ever on a lock its own thread holds.
        # A short-lived thread sets it as soon as the wait lets go.
        threading.Thread(target=event.set, name="buselab-stop-signal", daemon=True).start()

    previous = {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS}
    try:
        yield event
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
