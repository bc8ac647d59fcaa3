"""A broken plugin is explained: the log says once per kind of fault which line of the plugin
broke the contract, and the lab's inspector shows why a failed request failed.

The plugin is a real file, served by a real Session (or the buselab command) to a real NBD
client; the lab is driven by Textual's Pilot.
"""

from __future__ import annotations

import logging
import textwrap
import threading

import pytest
from helpers import aio, connect, serve

from buselab.client import NBDClient, NBDError
from buselab.engine import engine as engine_module
from buselab.engine.telemetry import RequestRecord
from buselab.protocol import constants as c
from buselab.storage.backends.plugin import PluginBackend
from buselab.ui.lab import LabApp

PLUGIN = textwrap.dedent(
    """\
    import errno


    class BrokenDisk:
        size = 1 << 20

        def read(self, offset, length):
            if offset == 0:
                return "x" * length  # a str, not bytes
            if offset == 4096:
                return None  # forgot the return
            if offset == 8192:
                return bytes(length - 1)  # one byte short
            if offset == 12288:
                raise OSError(errno.EIO, "bad sector 3")  # the documented way to fail
            if offset == 20480:
                return bytes(length // 0)  # a bug
            return bytes(length)

        def write(self, offset, data):
            pass
    """
)
READ_LINE = PLUGIN.splitlines().index("    def read(self, offset, length):") + 1
RAISE_LINE = (
    PLUGIN.splitlines().index('            raise OSError(errno.EIO, "bad sector 3")  # the documented way to fail') + 1
)
BUG_LINE = PLUGIN.splitlines().index("            return bytes(length // 0)  # a bug") + 1
STR, NONE, SHORT, BAD_SECTOR, GOOD, BUG = 0, 4096, 8192, 12288, 16384, 20480


def fails_with_eio(client: NBDClient, offset: int, length: int = 4096) -> None:
    with pytest.raises(NBDError) as info:
        client.read(offset, length)
    assert info.value.errno == c.EIO


def kind(path: str, what: str) -> str:
    return f"plugin {path}:{READ_LINE} read() {what}"


@pytest.fixture
def plugin_here(tmp_path, monkeypatch):
    """The plugin as brokendisk.py in the current directory, as a user would name it."""
    (tmp_path / "brokendisk.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    return "brokendisk.py"


def test_the_log_says_once_per_kind_which_plugin_line_broke_the_contract(buselab_server, tmp_path):
    path = str(tmp_path / "brokendisk.py")
    (tmp_path / "brokendisk.py").write_text(PLUGIN)
    served = buselab_server(["plugin", path])
    with NBDClient.connect_unix(served.socket) as client:
        for _ in range(3):
            fails_with_eio(client, STR)
            fails_with_eio(client, NONE)
            fails_with_eio(client, SHORT)
            fails_with_eio(client, SHORT, 8192)  # another length, the same kind of fault
            fails_with_eio(client, BAD_SECTOR)
            assert client.read(GOOD, 4096) == bytes(4096)
    assert served.stop() == 0
    out = served.output()
    said = [line for line in out.splitlines() if "the client gets" in line]
    assert said == [
        f"buselab: {kind(path, 'returned str')}, expected bytes of length 4096: the client gets EIO"
        " (only the first is logged)",
        f"buselab: {kind(path, 'returned None')}, expected bytes of length 4096: the client gets EIO"
        " (only the first is logged)",
        f"buselab: {kind(path, 'returned too few bytes')}: 4095 of 4096: the client gets EIO (only the first is logged)",
    ]
    assert out.count(f"{path}:{READ_LINE}") == 3
    # A plugin that raises OSError fails the request on purpose: that is not a fault to log.
    assert "bad sector" not in out and "Traceback" not in out


def test_faults_are_counted_after_the_first_is_logged(plugin_here, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger="buselab")
    with serve(PluginBackend(plugin_here), tmp_path) as session, connect(session) as client:
        for _ in range(5):
            fails_with_eio(client, STR)
        fails_with_eio(client, SHORT)
        fails_with_eio(client, SHORT, 8192)
        engine = session.engine
        assert engine.faults == {
            kind("brokendisk.py", "returned str"): 5,
            kind("brokendisk.py", "returned too few bytes"): 2,
        }
        # The count reaches the lab as an event, at most every _ERROR_EVENT_EVERY seconds.
        monkeypatch.setattr(engine_module, "_ERROR_EVENT_EVERY", 0.0)
        fails_with_eio(client, STR)
        assert engine.telemetry.events[-1][1] == f"{kind('brokendisk.py', 'returned str')}: 6 times so far (not logged)"
    logged = [r.getMessage() for r in caplog.records if "the client gets" in r.getMessage()]
    assert logged == [
        f"{kind('brokendisk.py', 'returned str')}, expected bytes of length 4096: the client gets EIO"
        " (only the first is logged)",
        f"{kind('brokendisk.py', 'returned too few bytes')}: 4095 of 4096: the client gets EIO"
        " (only the first is logged)",
    ]


def test_a_request_released_from_the_gate_keeps_its_reason(plugin_here, tmp_path):
    with serve(PluginBackend(plugin_here), tmp_path) as session, connect(session) as client:
        gate = session.engine.gate
        gate.pause()
        failed: list[int] = []

        def read() -> None:
            try:
                client.read(NONE, 4096)
            except NBDError as exc:
                failed.append(exc.errno)

        reader = threading.Thread(target=read)
        reader.start()
        assert gate.wait_held(1, 10)
        gate.resume()  # the gate's worker runs it and records it
        reader.join(10)
        assert failed == [c.EIO]
        telemetry = session.engine.telemetry
        (record,) = telemetry.recent()
        assert record.error == c.EIO
        assert (
            telemetry.reason(record.seq) == f"{kind('brokendisk.py', 'returned None')}, expected bytes of length 4096"
        )
        # A request that fails before it reaches the backend has no reason to show.
        with pytest.raises(NBDError):
            client.read(session.engine.size, 4096)
        refused = telemetry.recent(record.seq)[-1]
        assert refused.error == c.EINVAL and telemetry.reason(refused.seq) is None


def test_a_bug_keeps_its_reason_after_the_log_went_quiet(plugin_here, tmp_path):
    with serve(PluginBackend(plugin_here), tmp_path) as session, connect(session) as client:
        for _ in range(12):
            fails_with_eio(client, BUG)
        assert session.engine.backend_errors == 12
        telemetry = session.engine.telemetry
        records = telemetry.recent()
        assert len(records) == 12
        reasons = {telemetry.reason(r.seq) for r in records}
        assert len(reasons) == 1  # the ten logged and the two that were not
        (reason,) = reasons
        assert reason.startswith("ZeroDivisionError: ") and reason.endswith(f"(brokendisk.py:{BUG_LINE} in read)")


def select(app: LabApp, pilot, predicate) -> RequestRecord:
    """Walk the stream up from the newest row until the selected request matches."""

    async def walk() -> RequestRecord:
        for _ in range(len(app.stream.rows) + 1):
            await pilot.press("up")
            record = app.stream.selected_record
            if record is not None and predicate(record):
                await pilot.pause()
                return record
        raise AssertionError("no such request in the stream")

    return walk()


def shown(app: LabApp) -> str:
    inspector = app.inspector
    return "\n".join(inspector.render_line(y).text for y in range(inspector.size.height))


@aio
async def test_the_inspector_shows_why_the_selected_request_failed(plugin_here, tmp_path):
    with serve(PluginBackend(plugin_here), tmp_path) as session, connect(session) as client:
        app = LabApp(session, auto_poll=False)
        async with app.run_test(size=(160, 50)) as pilot:
            fails_with_eio(client, STR)
            fails_with_eio(client, STR)  # the second of its kind: not logged, still explained
            assert client.read(GOOD, 4096) == bytes(4096)
            app.poll()
            await pilot.pause()

            record = await select(app, pilot, lambda r: r.error)
            assert record.op == "READ" and record.offset == STR
            reason = f"{kind('brokendisk.py', 'returned str')}, expected bytes of length 4096"
            text = app.inspector.text
            assert "failed: EIO (5)" in text
            assert f"why      {reason}\n" in text
            # On screen, wrapped to the pane's width but all there.
            screen = shown(app)
            assert "why" in screen
            assert " ".join(screen.split()).count(f"brokendisk.py:{READ_LINE} read() returned str") == 1
            assert "expected bytes of length 4096" in screen

            first = await select(app, pilot, lambda r: r.seq == record.seq - 1)  # the first, logged one
            assert first.error == c.EIO and f"why      {reason}\n" in app.inspector.text
            await pilot.press("end")
            await pilot.pause()
            assert app.inspector.record.offset == GOOD
            assert "why" not in app.inspector.text and "ok" in app.inspector.text


@aio
async def test_the_inspector_shows_the_reason_of_an_oserror_and_of_the_error_filter(plugin_here, tmp_path):
    backend = PluginBackend(plugin_here)
    with serve(backend, tmp_path, filters=["error:op=write,errno=ENOSPC"]) as session, connect(session) as client:
        app = LabApp(session, auto_poll=False)
        async with app.run_test(size=(160, 50)) as pilot:
            fails_with_eio(client, BAD_SECTOR)
            with pytest.raises(NBDError) as info:
                client.write(0, b"w" * 4096)
            assert info.value.errno == c.ENOSPC
            app.poll()
            await pilot.pause()

            await select(app, pilot, lambda r: r.op == "WRITE")
            assert "failed: ENOSPC" in app.inspector.text
            assert "why      injected ENOSPC by the error filter\n" in app.inspector.text

            await select(app, pilot, lambda r: r.op == "READ")
            assert "failed: EIO" in app.inspector.text
            assert (
                f"why      OSError: [Errno 5] bad sector 3 (brokendisk.py:{RAISE_LINE} in read)\n" in app.inspector.text
            )
            assert "bad sector 3" in shown(app)
