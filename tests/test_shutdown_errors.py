"""Stopping with data that cannot be written back: one clear line, exit 0, never a traceback."""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import textwrap

import pytest
from helpers import nbdsh

from buselab.client import NBDClient
from buselab.engine.engine import Engine
from buselab.protocol import constants as c
from buselab.session import ServeOptions, Session
from buselab.storage.backends.ram import RamBackend
from buselab.storage.base import BackendError
from buselab.storage.registry import open_backend
from buselab.ui.lab import run_lab

LOST_4K = "cache: 4,096 bytes (4.0 KiB) of unflushed cached writes were lost: writing them back failed: BackendError: "


@pytest.mark.parametrize(
    ("below", "why"),
    [
        ("error:rate=1,errno=EIO,op=write", "injected EIO by the error filter"),
        ("readonly", "the readonly filter refuses writes"),
    ],
)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stopping_with_unwritable_cached_writes_says_what_was_lost(buselab_server, below, why, sig):
    served = buselab_server(["ram", "--size", "8M", "--filter", below, "--filter", "cache"])
    write = subprocess.run(
        [*nbdsh(), "-u", served.uri, "-c", "h.pwrite(b'x' * 4096, 0)"], capture_output=True, text=True, timeout=30
    )
    assert write.returncode == 0, write.stderr
    assert served.stop(sig) == 0
    out = served.output()
    assert "Traceback" not in out
    problems = [line for line in out.splitlines() if "fail" in line or "lost" in line]
    assert problems == [f"buselab: {LOST_4K}{why}"]


def test_stopping_with_nothing_dirty_says_nothing(buselab_server):
    served = buselab_server(["ram", "--size", "8M", "--filter", "error:rate=1,errno=EIO,op=write", "--filter", "cache"])
    run = subprocess.run([*nbdsh(), "-u", served.uri, "-c", "h.pread(4096, 0)"], capture_output=True, timeout=30)
    assert run.returncode == 0
    assert served.stop(signal.SIGTERM) == 0
    assert "lost" not in served.output() and "failed" not in served.output()


def test_a_plugin_whose_close_raises_is_one_line_at_shutdown(buselab_server, tmp_path):
    path = tmp_path / "closing.py"
    path.write_text(
        textwrap.dedent(
            """\
            class ClosingDisk:
                size = 1 << 20

                def read(self, offset, length):
                    return bytes(length)

                def write(self, offset, data):
                    pass

                def close(self):
                    raise RuntimeError("the lid is stuck")
            """
        )
    )
    served = buselab_server(["plugin", str(path)])
    with NBDClient.connect_unix(served.socket) as client:
        client.write(0, b"data")
    assert served.stop(signal.SIGTERM) == 0
    out = served.output()
    assert "Traceback" not in out
    problems = [line for line in out.splitlines() if "fail" in line]
    assert problems == [
        "buselab: closing the backend at shutdown failed: RuntimeError: the lid is stuck (closing.py:11 in close)"
    ]


def test_quitting_the_lab_with_unwritable_cached_writes(tmp_path, caplog, capsys):
    caplog.set_level("WARNING", logger="buselab")
    sock = str(tmp_path / "nbd.sock")
    session = Session(open_backend("ram", size=8 << 20), ServeOptions(unix=[sock], filters=["readonly", "cache"]))
    session.start()
    try:
        with NBDClient.connect_unix(sock) as client:
            client.write(8192, b"y" * 8192)
        assert run_lab(session, seconds=0.5, headless=True) == 0
    finally:
        session.stop()
    assert session.stopped
    messages = [r.getMessage() for r in caplog.records if r.name == "buselab"]
    assert messages == [
        LOST_4K.replace("4,096 bytes (4.0 KiB)", "8,192 bytes (8.0 KiB)") + "the readonly filter refuses writes"
    ]


# --- Engine.close on its own ------------------------------------------------------------------


class Failing(RamBackend):
    def __init__(self, *, flush: Exception | None = None, close: Exception | None = None) -> None:
        super().__init__(1 << 20)
        self.flush_error, self.close_error = flush, close
        self.closed = False

    def flush(self):
        if self.flush_error:
            raise self.flush_error

    def close(self):
        self.closed = True
        if self.close_error:
            raise self.close_error


@pytest.mark.parametrize(
    ("flush", "close", "expected"),
    [
        (None, None, []),
        (BackendError(c.EIO, "no flush"), None, ["flush at shutdown failed: BackendError: no flush (in flush)"]),
        (
            None,
            OSError(5, "no close"),
            ["closing the backend at shutdown failed: OSError: [Errno 5] no close (in close)"],
        ),
        (
            BackendError(c.EIO, "no flush"),
            KeyError("k"),
            [
                "closing the backend at shutdown failed: KeyError: 'k' (in close)",
                "flush at shutdown failed: BackendError: no flush (in flush)",
            ],
        ),
    ],
)
def test_engine_close_never_raises(caplog, flush, close, expected):
    caplog.set_level("WARNING", logger="buselab")
    backend = Failing(flush=flush, close=close)
    engine = Engine(backend)
    engine.close()
    engine.close()  # idempotent: nothing twice
    assert backend.closed
    # Each line says where it was raised: here, this file's Failing.flush or Failing.close.
    messages = [
        re.sub(r"\(test_shutdown_errors\.py:\d+ in ", "(in ", r.getMessage())
        for r in caplog.records
        if r.name == "buselab"
    ]
    assert messages == expected
    assert all(r.levelno == logging.WARNING and not r.exc_info for r in caplog.records)
