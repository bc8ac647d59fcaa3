"""A plugin with a bug: the log says which line raised, only ten times, and the count goes on."""

from __future__ import annotations

import textwrap

import pytest

from buselab.client import NBDClient, NBDError
from buselab.engine import engine as engine_module
from buselab.engine.engine import Engine
from buselab.protocol import constants as c
from buselab.protocol.transmission import Request
from buselab.storage.backends.plugin import PluginBackend
from buselab.storage.base import where
from buselab.storage.registry import parse_filter_spec

PLUGIN = textwrap.dedent(
    """\
    import json


    class BuggyDisk:
        size = 1 << 20

        def read(self, offset, length):
            if offset == 0:
                return self.compute(length)
            return json.loads("not json")  # raises inside the standard library

        def compute(self, length):
            return bytes(length) if length < 0 else 1 / 0

        def write(self, offset, data):
            pass
    """
)
DIVIDE_LINE = PLUGIN.splitlines().index("        return bytes(length) if length < 0 else 1 / 0") + 1
JSON_LINE = PLUGIN.splitlines().index('        return json.loads("not json")  # raises inside the standard library') + 1


@pytest.fixture
def plugin_path(tmp_path):
    path = tmp_path / "buggydisk.py"
    path.write_text(PLUGIN)
    return str(path)


def read_request(offset: int = 0, length: int = 4096) -> Request:
    return Request(cmd=c.CMD_READ, flags=0, handle=1, offset=offset, length=length)


def test_the_log_names_the_plugin_line_and_stops_after_ten(buselab_server, plugin_path):
    served = buselab_server(["plugin", plugin_path])
    with NBDClient.connect_unix(served.socket) as client:
        for _ in range(14):
            with pytest.raises(NBDError) as info:
                client.read(0, 4096)
            assert info.value.errno == c.EIO
        with pytest.raises(NBDError):
            client.read(8192, 4096)  # a different error, after the log went quiet
    assert served.stop() == 0
    out = served.output()
    failures = [line for line in out.splitlines() if "failed in the backend" in line]
    assert (
        failures
        == [
            f"buselab: READ 0+4096 failed in the backend: ZeroDivisionError: division by zero"
            f" (buggydisk.py:{DIVIDE_LINE} in compute)"
        ]
        * 10
    )
    assert out.count("further backend errors are not logged (10 so far)") == 1
    assert "json" not in out.lower() and "Traceback" not in out


def test_verbose_logs_the_whole_traceback(buselab_server, plugin_path):
    served = buselab_server(["-v", "plugin", plugin_path])
    with NBDClient.connect_unix(served.socket) as client, pytest.raises(NBDError):
        client.read(0, 4096)
    assert served.stop() == 0
    out = served.output()
    assert f"ZeroDivisionError: division by zero (buggydisk.py:{DIVIDE_LINE} in compute)" in out
    assert "Traceback (most recent call last)" in out
    assert f'buggydisk.py", line {DIVIDE_LINE}, in compute' in out and "1 / 0" in out


def test_the_plugin_line_wins_over_the_library_frame_below_it_and_through_filters(plugin_path):
    engine = Engine(PluginBackend(plugin_path))
    engine.stack.add(parse_filter_spec("cache", engine.size))  # a filter over the plugin: its file is still found
    assert engine.execute(read_request(8192)) == (c.EIO, None)
    event = engine.telemetry.events[-1][1]
    assert event.startswith("backend error on READ at 8192: JSONDecodeError: ")
    assert event.endswith(f"(buggydisk.py:{JSON_LINE} in read)")


def test_where_falls_back_to_user_code_then_to_the_innermost_frame():
    def inner():
        raise ValueError("x")

    try:
        inner()
    except ValueError as exc:
        assert where(exc).startswith("test_plugin_errors.py:") and where(exc).endswith(" in inner")
    assert where(ValueError("never raised")) == ""


def test_errors_keep_counting_with_a_rare_event_after_the_log_goes_quiet(plugin_path, monkeypatch, caplog):
    caplog.set_level("WARNING", logger="buselab")
    engine = Engine(PluginBackend(plugin_path))
    for _ in range(40):
        assert engine.execute(read_request()) == (c.EIO, None)
    assert engine.backend_errors == 40
    assert len(caplog.records) == 11  # ten errors and the note
    events = [message for _, message in engine.telemetry.events]
    assert len(events) == 11  # no flood of events either
    assert events[-1].startswith("further backend errors are not logged (10 so far)")
    # Once the interval has passed, the next error brings one event with the count so far.
    monkeypatch.setattr(engine_module, "_ERROR_EVENT_EVERY", 0.0)
    engine.execute(read_request())
    assert engine.telemetry.events[-1][1].startswith("41 backend errors so far (not logged), last: ZeroDivisionError")
    assert len(caplog.records) == 11
