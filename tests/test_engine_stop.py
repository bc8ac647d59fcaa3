"""Stopping and quiescing while the gate is paused: nothing hangs, no pause is lost."""

from __future__ import annotations

import threading
import time

from buselab.client import NBDClient
from buselab.engine.engine import Engine
from buselab.session import ServeOptions, Session
from buselab.storage.backends.ram import RamBackend


def test_quiesce_resumes_when_nobody_paused():
    engine = Engine(RamBackend(1 << 20))
    with engine.quiesce():
        assert engine.gate.halted
    assert not engine.gate.halted
    engine.close()


def test_quiesce_keeps_a_pause_made_meanwhile():
    # A user pressing p during a long backend switch must stay paused afterwards.
    engine = Engine(RamBackend(1 << 20))
    with engine.quiesce():
        engine.gate.pause()
    assert engine.gate.halted
    engine.close()


class SlowReads(RamBackend):
    """Reads take a while: the answer of a released request comes after stop() has moved on."""

    def read(self, offset: int, length: int):
        time.sleep(0.3)
        return super().read(offset, length)


def test_session_stop_while_paused_answers_the_held_read(tmp_path):
    sock = str(tmp_path / "nbd.sock")
    session = Session(SlowReads(1 << 20), ServeOptions(unix=[sock]))
    session.start()
    client = NBDClient.connect_unix(sock)
    client.write(0, b"kept" * 1024)
    session.engine.gate.pause()
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(client.read(0, 4096)), daemon=True)
    reader.start()
    deadline = time.monotonic() + 5
    while not session.engine.gate.held() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert session.engine.gate.held(), "the read was not held"
    stopper = threading.Thread(target=session.stop, daemon=True)
    stopper.start()
    stopper.join(15)
    assert not stopper.is_alive(), "Session.stop hung on a paused gate"
    reader.join(5)
    assert got == [b"kept" * 1024]
    client.sock.close()
