"""The `buselab` command line: sizes, one-line user errors, headless stats and clean stops."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import require_tool

from buselab.client import NBDClient
from buselab.errors import UserError
from buselab.sizes import human_bytes, parse_size

MiB = 1 << 20


# --- sizes --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [
        ("512K", 512 << 10),
        ("128M", 128 << 20),
        ("1G", 1 << 30),
        ("1T", 1 << 40),
        ("4096", 4096),
        ("1.5K", 1536),
        ("64m", 64 << 20),
        ("64MiB", 64 << 20),
        ("2GB", 2 << 30),
        (" 8M ", 8 << 20),
        ("9007199254740993", 2**53 + 1),  # exact, no float rounding
        ("0.5K", 512),
    ],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "-1", "0", "0K", "1.3", "12Q", "1 2M", "M", "1e6"])
def test_parse_size_rejects(text):
    with pytest.raises(UserError) as info:
        parse_size(text)
    assert "size" in str(info.value)
    assert "\n" not in str(info.value)


def test_human_bytes():
    assert human_bytes(64 * MiB) == "64.0 MiB"
    assert human_bytes(1 << 40) == "1.0 TiB"


# --- subprocess helpers ----------------------------------------------------------------------------


def buselab(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "buselab", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("buselab: error: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# --- sizes end to end ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size, expected", [("512K", 512 << 10), ("128M", 128 << 20), ("1G", 1 << 30), ("1T", 1 << 40)])
def test_ram_sizes_served(buselab_server, size, expected):
    served = buselab_server(["ram", "--size", size])
    with NBDClient.connect_unix(served.socket) as client:
        assert client.size == expected
        client.write(expected - 4096, b"end!")
        assert client.read(expected - 4096, 4) == b"end!"
    assert served.stop() == 0


def test_ram_default_is_128_mib(buselab_server):
    served = buselab_server(["ram"])
    with NBDClient.connect_unix(served.socket) as client:
        assert client.size == 128 * MiB


def test_file_created_at_size(buselab_server, tmp_path):
    path = tmp_path / "new.img"
    served = buselab_server(["lo", str(path), "--size", "2M"])
    assert path.stat().st_size == 2 * MiB
    with NBDClient.connect_unix(served.socket) as client:
        assert client.size == 2 * MiB


def test_tcp_listen(tmp_path):
    port = free_port()
    log = tmp_path / "log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "buselab", "ram", "--size", "1M", "--listen", f"127.0.0.1:{port}", "--headless"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                client = NBDClient.connect_tcp("127.0.0.1", port)
                break
            except OSError:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "buselab did not listen on TCP"
                time.sleep(0.05)
        with client:
            assert client.size == MiB
        wait_for_line(log, "serving")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        assert f"nbd://127.0.0.1:{port}" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- user errors: exit 2, one line, no traceback -------------------------------------------------------


@pytest.mark.parametrize(
    "size, words",
    [("12Q", ["bad size", "12Q"]), ("0", ["bad size"]), ("-5M", ["bad size", "negative"]), ("lots", ["bad size"])],
)
def test_bad_size(tmp_path, size, words):
    assert_one_line_error(buselab("ram", f"--size={size}", "--unix", str(tmp_path / "s"), "--headless"), *words)


def test_port_in_use(tmp_path):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    try:
        proc = buselab("ram", "--size", "1M", "--listen", f"127.0.0.1:{port}", "--headless")
        assert_one_line_error(proc, "in use", str(port))
    finally:
        blocker.close()


def test_missing_file_without_size(tmp_path):
    path = tmp_path / "missing.img"
    proc = buselab("file", str(path), "--unix", str(tmp_path / "s"), "--headless")
    assert_one_line_error(proc, str(path), "--size")
    assert not path.exists()


def test_file_size_mismatch(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    proc = buselab("file", str(path), "--size", "2M", "--unix", str(tmp_path / "s"), "--headless")
    assert_one_line_error(proc, str(path), "--size")
    assert path.stat().st_size == 1 << 20


@pytest.mark.parametrize(
    "source, words",
    [
        ("import definitely_not_a_module\n", ["failed to import", "ModuleNotFoundError"]),
        ("def broken(:\n", ["failed to import", "SyntaxError"]),
        ("raise RuntimeError('boom')\n", ["failed to import", "boom"]),
        ("x = 1\n", ["0 disk classes"]),
        ("class D:\n    size = 0\n    read = write = lambda *a: None\n", ["size is 0"]),
    ],
)
def test_plugin_failures(tmp_path, source, words):
    plugin = tmp_path / "bad.py"
    plugin.write_text(source)
    proc = buselab("plugin", str(plugin), "--unix", str(tmp_path / "s"), "--headless")
    assert_one_line_error(proc, *words)


def test_plugin_missing_file(tmp_path):
    proc = buselab("plugin", str(tmp_path / "nope.py"), "--unix", str(tmp_path / "s"), "--headless")
    assert_one_line_error(proc, "does not exist")


def test_unix_path_that_is_a_file(tmp_path):
    path = tmp_path / "taken"
    path.write_text("not a socket")
    proc = buselab("ram", "--size", "1M", "--unix", str(path), "--headless")
    assert_one_line_error(proc, str(path))
    assert path.read_text() == "not a socket"


def test_unix_socket_in_use_by_a_running_server(buselab_server, tmp_path):
    served = buselab_server(["ram", "--size", "1M"])
    proc = buselab("ram", "--size", "1M", "--unix", served.socket, "--headless")
    assert_one_line_error(proc, "in use")
    with NBDClient.connect_unix(served.socket) as client:  # the first server is untouched
        assert client.size == MiB


def test_bad_listen_address(tmp_path):
    assert_one_line_error(buselab("ram", "--listen", "127.0.0.1:http", "--headless"), "--listen")
    assert_one_line_error(buselab("ram", "--listen", "127.0.0.1:99999", "--headless"), "out of range")


def test_null_needs_size(tmp_path):
    assert_one_line_error(buselab("null", "--unix", str(tmp_path / "s"), "--headless"), "--size")


def test_ram_too_big_for_the_address_space(tmp_path):
    assert_one_line_error(buselab("ram", "--size", "1024P", "--unix", str(tmp_path / "s"), "--headless"), "--size")


# --- headless: stats lines, SIGINT / SIGTERM ----------------------------------------------------------------

STATS_LINE = re.compile(
    r"^\d\d:\d\d:\d\d ram 64\.0 MiB \| \d+ clients? \| (?P<reqs>[\d,]+) req/s"
    r" read (?P<read>[\d.]+) MB/s write (?P<write>[\d.]+) MB/s"
    r" \| p50 (?P<p50>[\d.]+ [µm]?s|-) p99 (?P<p99>[\d.]+ [µm]?s|-)"
    r" \| in flight (?P<in_flight>[\d,]+), max (?P<max_in_flight>[\d,]+)"
    r" \| totals: requests (?P<requests>[\d,]+), flush (?P<flush>[\d,]+), trim (?P<trim>[\d,]+),"
    r" errors (?P<errors>[\d,]+)$",
    re.MULTILINE,
)


def wait_for_line(log: Path, text: str, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text(errors="replace")
        if text in content:
            return content
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in:\n{log.read_text(errors='replace')}")


def test_headless_prints_stats_lines(buselab_server):
    served = buselab_server(["ram", "--size", "64M"])
    with NBDClient.connect_unix(served.socket) as client:
        client.write(0, bytes(4096))
        client.flush()
        deadline = time.monotonic() + 10
        while len(STATS_LINE.findall(served.output())) < 2:
            assert time.monotonic() < deadline, served.output()
            time.sleep(0.1)
    out = served.output()
    assert out.startswith("buselab: serving ram")
    assert served.socket in out.splitlines()[0]
    assert re.search(r"\| 1 client \|", out), out
    assert re.search(r"flush 1, trim 0", out), out
    assert served.stop() == 0


FLUSH_MARKER_PLUGIN = """
class Marked:
    size = 1 << 20

    def __init__(self):
        self.data = bytearray(self.size)

    def read(self, offset, length):
        return bytes(self.data[offset : offset + length])

    def write(self, offset, data):
        self.data[offset : offset + len(data)] = data

    def flush(self):
        with open({marker!r}, "a") as f:
            f.write("flush\\n")

    def close(self):
        with open({marker!r}, "a") as f:
            f.write("close\\n")
"""


def marked_plugin(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "marker"
    plugin = tmp_path / "marked.py"
    plugin.write_text(FLUSH_MARKER_PLUGIN.format(marker=str(marker)))
    return plugin, marker


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_cleanly_with_the_backend_flushed(buselab_server, tmp_path, sig):
    plugin, marker = marked_plugin(tmp_path)
    served = buselab_server(["plugin", str(plugin)])
    wait_for_line(served.log, "buselab: serving")
    with NBDClient.connect_unix(served.socket) as client:
        client.write(0, b"x")
    assert not marker.exists()
    assert served.stop(sig) == 0
    out = served.output()
    assert "stopped cleanly" in out
    assert "Traceback" not in out
    lines = marker.read_text().splitlines()
    assert "flush" in lines and lines[-1] == "close"
    assert not os.path.exists(served.socket)  # no stale socket left behind


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_right_after_listening_still_stops_cleanly(tmp_path, sig):
    # A supervisor may stop buselab the moment its socket appears. The handlers used to be
    # installed only after session.start(), so a signal in that window killed buselab
    # (SIGINT: exit 130, SIGTERM: killed) without flushing.
    plugin, marker = marked_plugin(tmp_path)
    sock = str(tmp_path / "nbd.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "buselab", "plugin", str(plugin), "--unix", sock, "--headless"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.001)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"exit {proc.returncode}: {out!r}"
    assert marker.read_text().splitlines()[-1] == "close"


def test_file_backend_flushed_on_sigterm(buselab_server, tmp_path):
    path = tmp_path / "disk.img"
    served = buselab_server(["file", str(path), "--size", "4M"])
    wait_for_line(served.log, "buselab: serving")
    data = os.urandom(MiB)
    with NBDClient.connect_unix(served.socket) as client:
        client.write(MiB, data)
    assert served.stop(signal.SIGTERM) == 0
    assert path.read_bytes()[MiB : 2 * MiB] == data


def test_version_and_help():
    proc = buselab("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("buselab ")
    proc = buselab("--help")
    assert proc.returncode == 0
    for command in ("ram", "file", "lo", "null", "plugin", "demo"):
        assert command in proc.stdout


def test_demo_headless_drives_real_traffic(tmp_path):
    proc = buselab("demo", "--headless", "--seconds", "2.5", "--pace", "0.0005", timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if " | " in line]
    assert lines, proc.stdout
    rates = [float(m.group(1).replace(",", "")) for m in re.finditer(r"\| ([\d,]+) req/s", proc.stdout)]
    assert max(rates) > 0, proc.stdout  # the built-in workload really sent requests
    assert "errors 0" in lines[-1]
    assert "stopped cleanly" in proc.stdout


def test_null_backend_served(buselab_server):
    served = buselab_server(["null", "--size", "1G"])
    with NBDClient.connect_unix(served.socket) as client:
        assert client.size == 1 << 30
        client.write(0, b"forgotten")
        assert client.read(0, 9) == bytes(9)


def test_read_only_file(buselab_server, tmp_path):
    path = tmp_path / "ro.img"
    path.write_bytes(b"\x07" * MiB)
    served = buselab_server(["file", str(path), "--readonly"])
    with NBDClient.connect_unix(served.socket) as client:
        assert client.flags & 2  # NBD_FLAG_READ_ONLY
        assert client.read(0, 4) == b"\x07" * 4
    assert served.stop() == 0
    assert path.read_bytes() == b"\x07" * MiB
    proc = buselab("file", str(tmp_path / "absent.img"), "--readonly", "--size", "1M", "--unix", str(tmp_path / "s"))
    assert_one_line_error(proc, "readonly")


def test_device_after_options_is_taken_as_the_device(tmp_path):
    # `file PATH --size 64M /dev/nbdX`: argparse alone calls the device "unrecognized".
    # On this machine (no nbd driver) or as non-root, the error must then be about the device.
    proc = buselab("file", str(tmp_path / "d.img"), "--size", "1M", "/dev/nbd3", "--headless")
    line = assert_one_line_error(proc)
    assert "unrecognized" not in line
    assert "nbd" in line or "root" in line or "sudo" in line


def test_stray_argument_is_still_refused(tmp_path):
    proc = buselab("ram", "--size", "1M", "/dev/nbd3", "extra")
    assert proc.returncode == 2
    assert "unrecognized arguments: extra" in proc.stderr


# --- usage errors: one line, exit 2, no usage dump ------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["ram", "--size", "-5M"], ["--size=-5M", "buselab ram --help"]),
        (["ram", "--size"], ["--size", "expected one argument", "buselab ram --help"]),
        (["ram", "--frobnicate"], ["unrecognized arguments: --frobnicate", "buselab ram --help"]),
        (["bogus"], ["invalid choice: 'bogus'", "buselab --help"]),
        (["file"], ["PATH", "buselab file --help"]),
        (["ctl"], ["give a COMMAND", "buselab ctl --help"]),
        (["ctl", "bogus"], ["unknown command 'bogus'", "buselab ctl --help"]),
        (["ctl", "/nonexistent/x.sock", "frobnicate"], ["invalid choice: 'frobnicate'", "buselab ctl --help"]),
        (["ctl", "/nonexistent/x.sock", "break", "add"], ["SPEC", "buselab ctl break add --help"]),
        (["ctl", "/nonexistent/x.sock", "step", "--fail"], ["--fail", "buselab ctl step --help"]),
    ],
)
def test_usage_errors_are_one_line(args, words):
    proc = buselab(*args)
    assert_one_line_error(proc, *words)
    assert "usage:" not in proc.stderr + proc.stdout


def test_the_help_named_in_a_usage_error_exists():
    proc = buselab("ctl", "/nonexistent/x.sock", "break", "add")
    help_command = re.search(r"see `buselab (.*)`\)$", proc.stderr.strip()).group(1).split()
    shown = buselab(*help_command)
    assert shown.returncode == 0 and "SPEC" in shown.stdout, shown.stdout + shown.stderr


# --- a reader that goes away: no traceback ------------------------------------------------------------------


def test_headless_keeps_serving_after_its_stdout_reader_leaves(tmp_path):
    # `buselab ram --headless | head -2`: once head exits, the stats lines have nowhere to go.
    # buselab must neither crash nor stop serving the disk; a signal still stops it cleanly.
    sock = str(tmp_path / "nbd.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "buselab", "ram", "--size", "1M", "--unix", sock, "--headless"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = proc.stdout.readline()
        assert first.startswith("buselab: serving ram"), first
        assert " req/s " in proc.stdout.readline()
        proc.stdout.close()  # head -2 exits
        time.sleep(2.5)  # at least two more stats lines are written into the closed pipe
        assert proc.poll() is None, proc.stderr.read()
        with NBDClient.connect_unix(sock) as client:
            client.write(0, b"still here")
            assert client.read(0, 10) == b"still here"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        err = proc.stderr.read()
        assert "Traceback" not in err and "BrokenPipe" not in err and err == "", err
        assert not os.path.exists(sock)  # stopped cleanly: the socket is gone
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- the stats line: rates per second, labelled totals ----------------------------------------------------


def test_stats_line_separates_rates_from_totals(buselab_server):
    served = buselab_server(["ram", "--size", "64M"])

    def lines() -> list[re.Match]:
        return list(STATS_LINE.finditer(served.output()))

    def wait_for(check, what: str) -> re.Match:
        deadline = time.monotonic() + 15
        while True:
            found = [m for m in lines() if check(m)]
            if found:
                return found[-1]
            assert time.monotonic() < deadline, f"no stats line {what}:\n{served.output()}"
            time.sleep(0.1)

    idle = wait_for(lambda m: m["requests"] == "0", "before any request")
    assert (idle["reqs"], idle["read"], idle["write"], idle["p50"], idle["p99"]) == ("0", "0.00", "0.00", "-", "-")
    with NBDClient.connect_unix(served.socket) as client:
        for i in range(8):
            client.write(i * MiB, bytes(MiB))
        client.flush()
        client.trim(0, MiB)
        busy = wait_for(lambda m: float(m["write"]) > 0, "with writes")
        assert int(busy["reqs"].replace(",", "")) > 0 and re.fullmatch(r"[\d.]+ [µm]?s", busy["p50"]), busy[0]
        assert int(busy["max_in_flight"]) >= 1, busy[0]
    # After the traffic: rates and latency go back to nothing, the totals stay.
    # (The interval the traffic ended in may still count its last request as "max 1".)
    after = wait_for(
        lambda m: m.start() > busy.end() and m["reqs"] == "0" and m["max_in_flight"] == "0", "after the traffic"
    )
    assert (after["read"], after["write"], after["p50"], after["p99"]) == ("0.00", "0.00", "-", "-"), after[0]
    assert (after["in_flight"], after["max_in_flight"]) == ("0", "0"), after[0]
    assert (after["requests"], after["flush"], after["trim"], after["errors"]) == ("10", "1", "1", "0"), after[0]
    assert served.stop() == 0


# --- the export name in the printed URI ------------------------------------------------------------------


def test_printed_uris_name_the_export(tmp_path):
    require_tool("nbdinfo")
    port = free_port()
    sock = str(tmp_path / "nbd.sock")
    log = tmp_path / "log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "buselab", "ram", "--size", "1M", "--export-name", "disk 1/a",
             "--listen", f"127.0.0.1:{port}", "--unix", sock, "--headless"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        first = wait_for_line(log, "\n").splitlines()[0]
        tcp_uri, unix_uri = f"nbd://127.0.0.1:{port}/disk%201%2Fa", f"nbd+unix:///disk%201%2Fa?socket={sock}"
        assert first.endswith(f"on {tcp_uri}, {unix_uri}"), first
        for uri in (tcp_uri, unix_uri):  # a real client reads the export name out of the printed URI
            info = subprocess.run(["nbdinfo", uri], capture_output=True, text=True, timeout=30)
            assert info.returncode == 0, info.stderr
            assert 'export="disk 1/a"' in info.stdout, info.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
