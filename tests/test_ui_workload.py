"""The demo's built-in workload keeps going through what the lab invites: injected
errors (an error filter, a step that fails a request) and a broken connection.

Each test serves a RAM disk on a Unix socket in tmp_path, runs DemoWorkload on
it flat out (pace=0), and checks with the server's own telemetry that requests
keep arriving after the errors.
"""

from __future__ import annotations

import socket
import time

import pytest
from helpers import socket_path

from buselab.session import ServeOptions, Session
from buselab.storage.registry import open_backend
from buselab.ui.header import header_text
from buselab.ui.model import LabModel
from buselab.workload import DemoWorkload

SIZE = 16 << 20


@pytest.fixture
def workload(session):
    w = DemoWorkload(socket_path(session), pace=0)
    session.demo_workload = w
    yield w
    w.stop()


def wait_for(what, check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def served(session: Session) -> int:
    return session.engine.telemetry.snapshot().total_requests


def test_the_demo_counts_injected_errors_and_keeps_sending_requests(session, workload):
    workload.start()
    wait_for("the first requests", lambda: served(session) > 50)
    steering = session.steering
    steering.add_filter("error:rate=0.05,errno=EIO")
    wait_for("an injected error", lambda: workload.error_count >= 3)
    rounds, before = workload.rounds, served(session)
    # Still going: more rounds, many more requests, more errors; one connection all along.
    wait_for("more requests after the errors", lambda: served(session) > before + 2000)
    wait_for("another round", lambda: workload.rounds > rounds)
    assert workload._thread is not None and workload._thread.is_alive()
    assert workload.connects == 1 and session.engine.telemetry.snapshot().connections == 1
    assert any("EIO" in e for e in workload.errors)
    assert sum(session.engine.telemetry.snapshot().errors) >= workload.error_count - 1
    # The lab's header says so, with the count.
    header = header_text(LabModel(session)).plain
    assert "errors)" in header and "demo round" in header
    # Every request failing is survived as well; off again, the story is error free.
    steering.add_filter("error:rate=1,errno=ENOSPC")
    wait_for("ENOSPC", lambda: any("ENOSPC" in e for e in workload.errors))
    for f in steering.layers:
        steering.remove_filter(str(f.id))
    before = served(session)
    wait_for("requests after the filters went", lambda: served(session) > before + 50)
    errors = workload.error_count  # (a request in flight as the filters went may still have failed)
    before = served(session)
    wait_for("more requests", lambda: served(session) > before + 500)
    assert workload.error_count == errors, list(workload.errors)[-3:]
    assert workload._thread.is_alive()


def test_the_demo_reconnects_when_its_connection_breaks(session, workload):
    workload.start()
    wait_for("a connection", lambda: workload.client is not None and served(session) > 20)
    client = workload.client
    assert client is not None
    client.sock.shutdown(socket.SHUT_RDWR)  # as if the server had dropped it
    wait_for("a second connection", lambda: workload.connects >= 2)
    before = served(session)
    wait_for("requests on the new connection", lambda: served(session) > before + 200)
    assert any("connection lost" in e for e in workload.errors)


def test_the_demo_waits_for_a_server_that_is_not_there_yet(tmp_path):
    sock = str(tmp_path / "late.sock")
    w = DemoWorkload(sock, pace=0)
    w.start()
    try:
        wait_for("a failed connect", lambda: w.error_count >= 1)
        assert w.phase == "reconnecting"
        s = Session(open_backend("ram", size=SIZE), ServeOptions(unix=[sock]))
        s.start()
        try:
            wait_for("the late server's first requests", lambda: served(s) > 100)
        finally:
            w.stop()
            s.stop()
    finally:
        w.stop()
