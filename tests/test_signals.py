"""SIGINT/SIGTERM set the session's stop event, even when the signal lands mid-wait.

The main thread spends its life in `stop_requested.wait(1.0)`. A signal that
is handled while that wait holds the event's lock (it retakes it each time it
times out) once made the handler's `event.set()` wait for ever on a lock its
own thread held: the server ignored Ctrl-C and was killed with its device
attached. The child below recreates that moment on purpose.
"""

from __future__ import annotations

import subprocess
import sys

CHILD = r"""
import os, signal, threading
from buselab.signals import stop_on_signals

event = threading.Event()
with stop_on_signals(event):
    with event._cond:  # what Event.wait holds between its timeouts
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # bytecodes: the handler runs here, lock held
            pass
    print("set" if event.wait(5) else "not set", flush=True)
"""


def test_a_signal_handled_while_the_wait_holds_its_lock_still_stops():
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "set"
