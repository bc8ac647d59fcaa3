"""Serving threads share one CPU while two or more connections are served.

Checked on the real threads of an in-process server: their affinity is read
back with os.sched_getaffinity(tid), so a pinning that did not happen (or
was not undone) fails the test.
"""

from __future__ import annotations

import os
import threading

from helpers import connect, missing, serve, wait_for

from buselab.storage.backends.ram import RamBackend
from buselab.transport import affinity

ALL = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()


def serving_tids() -> list[int]:
    return [t.native_id for t in threading.enumerate() if t.name.startswith("buselab-conn-") and t.native_id]


def affinities() -> list[set[int]]:
    return [os.sched_getaffinity(tid) for tid in serving_tids()]


def test_two_connections_share_one_cpu_and_one_alone_is_free(tmp_path):
    if not affinity.serving_threads.enabled:
        missing("pinning is off: needs 2+ CPUs and sched_setaffinity, and BUSELAB_SPREAD_THREADS unset")
    with serve(RamBackend(1 << 20), tmp_path) as session:
        first = connect(session)
        first.write(0, b"a" * 4096)
        assert affinities() == [ALL], "a single connection must not be pinned"
        second = connect(session)
        second.write(4096, b"b" * 4096)
        wait_for(lambda: len(serving_tids()) == 2)
        pinned = affinities()
        assert len(pinned[0]) == 1 and pinned[0] == pinned[1], pinned
        third = connect(session)
        third.read(0, 4096)
        wait_for(lambda: len(serving_tids()) == 3)
        assert all(a == pinned[0] for a in affinities()), "a thread that joins later is pinned with the others"
        third.close()
        second.close()
        wait_for(lambda: len(serving_tids()) == 1)
        wait_for(lambda: affinities() == [ALL])
        assert first.read(0, 4096) == b"a" * 4096
        first.close()
