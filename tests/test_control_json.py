"""The JSON each control command answers, key by key, as README's "The control socket's JSON" lists it.

Steering returns typed results; the control socket sends their `to_json()`. Scripts
that read `buselab ctl --json` depend on these keys, so any change to them fails here.
"""

from __future__ import annotations

import threading
import time

import pytest

from buselab.client import NBDClient, NBDError
from buselab.control.client import ControlClient
from buselab.session import ServeOptions, Session
from buselab.storage.backends.ram import RamBackend

MiB = 1 << 20
REQUEST = {"op", "offset", "length", "flags", "handle"}
HELD = REQUEST | {"conn", "waited", "breakpoint"}
BREAKPOINT = {"id", "spec", "enabled", "hits"}
FILTER = {"id", "name", "spec", "enabled", "stats"}
STATUS = {
    "backend", "kind", "size", "paused", "held", "oldest_wait", "filters", "breakpoints", "last_break",
    "last_step", "switching", "requests", "connections", "powered_off", "in_flight", "max_in_flight", "in_flight_by_connection",
    "latency", "sizes", "sequential", "window", "where", "control", "control_error", "structures", "queue_limits",
}  # fmt: skip
STRUCTURE = {"requests", "bytes"}
CONNECTION_FLIGHT = {"conn", "peer", "in_flight", "max_in_flight"}
OP_LATENCY = {"p50_ms", "p99_ms", "requests"}
SEQUENTIAL = {"sequential", "random", "share"}


@pytest.fixture
def served(tmp_path):
    sock, ctl = str(tmp_path / "nbd.sock"), str(tmp_path / "ctl.sock")
    session = Session(RamBackend(8 * MiB), ServeOptions(unix=[sock], control=ctl))
    session.start()
    with NBDClient.connect_unix(sock) as nbd, ControlClient(ctl, timeout=30) as control:
        yield session, nbd, control
    session.stop()


def test_every_command_answers_the_documented_keys(served, tmp_path):
    session, nbd, control = served
    call = control.call
    status = call("status")
    assert set(status) == STATUS
    assert status["last_break"] is None and status["switching"] is None and status["where"] == session.where
    for i in range(4):  # sequential reads: each starts where the one before ended
        nbd.read(i * 4096, 4096)
    status = call("status")
    assert status["in_flight"] == 0 and status["max_in_flight"] >= 1 and 0 < status["window"] <= 11
    (conn,) = status["in_flight_by_connection"]
    assert set(conn) == CONNECTION_FLIGHT and conn["in_flight"] == 0 and conn["max_in_flight"] >= 1
    assert set(status["latency"]) == {"READ"} and set(status["latency"]["READ"]) == OP_LATENCY
    assert status["latency"]["READ"]["requests"] == 4 and 0 < status["latency"]["READ"]["p50_ms"] < 1000
    assert status["sizes"] == {"READ": {"4096": 4}}
    assert status["sequential"] == {"READ": {"sequential": 3, "random": 0, "share": 1.0}}
    assert status["queue_limits"] is None  # no kernel device
    # The labeller counts what each request touched (here nothing it knows: "unknown"), off the
    # serve path, a few times a second.
    deadline = time.monotonic() + 10
    while status["structures"].get("unknown", {}).get("requests", 0) < 4:
        assert time.monotonic() < deadline, status["structures"]
        time.sleep(0.1)
        status = call("status")
    assert all(set(counts) == STRUCTURE for counts in status["structures"].values())
    assert status["structures"]["unknown"]["bytes"] >= 4 * 4096

    assert set(call("pause")) == {"paused", "held"}
    reader = threading.Thread(target=nbd.read, args=(0, 4096))
    reader.start()
    (held,) = call("wait", count=1, timeout=10)
    assert set(held) == HELD and held["op"] == "READ" and held["flags"] == [] and held["breakpoint"] is None
    assert [set(h) for h in call("held")] == [HELD]
    stepped = call("step")
    assert set(stepped) == HELD | {"action", "still_held"} and stepped["action"] == "release"
    reader.join(10)
    failing = threading.Thread(target=lambda: pytest.raises(NBDError, nbd.write, 0, b"x" * 512))
    failing.start()
    call("wait", count=1, timeout=10)
    stepped = call("step", fail="ENOSPC")
    assert set(stepped) == HELD | {"action", "errno", "still_held"} and stepped["errno"] == "ENOSPC"
    failing.join(10)
    assert set(call("resume")) == {"paused", "released"}
    assert set(call("status")["last_step"]) == HELD | {"action", "errno", "still_held"}

    bp = call("break.add", spec="op=flush")
    assert set(bp) == BREAKPOINT and bp["hits"] == 0
    flusher = threading.Thread(target=nbd.flush)
    flusher.start()
    call("wait", count=1, timeout=10)
    last_break = call("status")["last_break"]
    assert set(last_break) == REQUEST | {"breakpoint", "spec", "time"} and last_break["op"] == "FLUSH"
    call("resume")
    flusher.join(10)
    assert [set(b) for b in call("break.list")] == [BREAKPOINT]
    assert set(call("break.toggle", ref=bp["id"])) == BREAKPOINT
    assert call("break.rm", ref="all") == {"removed": [bp["id"]]}

    f = call("filter.add", spec="cache")
    assert set(f) == FILTER and f["spec"] == "cache" and isinstance(f["stats"], dict)
    assert [set(x) for x in call("filter.list")] == [FILTER]
    nbd.write(4096, b"y" * 4096)
    cut = call("powercut")
    assert set(cut) == {"lost_bytes", "lost_writes", "lost_requests"}
    assert cut["lost_bytes"] == 4096 and cut["lost_writes"] == 1 and len(cut["lost_requests"]) == 1
    assert set(call("poweron")) == {"off_seconds", "refused"}
    assert set(call("filter.disable", ref="cache")) == FILTER
    assert call("filter.rm", ref="all") == {"removed": [f["id"]]}

    switched = call("switch", kind="file", path=str(tmp_path / "disk.img"))
    assert set(switched) == {"from", "to", "kind", "size", "copied_bytes", "seconds"}
    cow = call("switch", kind="cow")
    assert set(cow) == {"from", "to", "kind", "size", "copied_bytes"}  # an overlay copies nothing
    assert set(call("status")) == STATUS | {"cow_changed_bytes"}
    nbd.write(0, b"z" * 4096)
    assert call("cow.discard") == {"discarded_bytes": 4096}
    assert call("cow.commit") == {"committed_bytes": 0}

    events = call("events", after=time.time() - 60, limit=5)
    assert len(events) == 5 and all(set(e) == {"time", "message"} for e in events)
