"""The control socket and `buselab ctl`, driving a buselab subprocess while real clients use it."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from helpers import nbdsh, require_tool

from buselab.client import NBDClient
from buselab.control import default_control_path

MiB = 1 << 20


def ctl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "buselab", "ctl", *args], capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"buselab ctl {' '.join(args)} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
    return proc


def ctl_json(path: str, *args: str) -> dict:
    reply = json.loads(ctl(path, *args, "--json").stdout)
    assert reply["ok"], reply
    return reply["result"]


@pytest.fixture
def controlled(buselab_server, tmp_path):
    """buselab_server with a control socket: returns (served, control path)."""

    def start(args: list[str]):
        path = str(tmp_path / "control.sock")
        served = buselab_server([*args, "--control", path])
        return served, path

    return start


def still_running(proc: subprocess.Popen, seconds: float = 0.3) -> bool:
    try:
        proc.wait(seconds)
    except subprocess.TimeoutExpired:
        return True
    return False


# --- pause and step with real clients --------------------------------------------------------


def test_qemu_io_read_is_held_while_paused_and_answered_after_one_step(controlled):
    require_tool("qemu-io")
    served, path = controlled(["ram", "--size", "8M"])
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4k", served.uri], check=True, capture_output=True)
    assert ctl(path, "pause").stdout.startswith("paused")
    reader = subprocess.Popen(
        ["qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 4k", served.uri],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        held = ctl_json(path, "wait", "--count", "1", "--timeout", "20")
        assert [(h["op"], h["offset"], h["length"]) for h in held] == [("READ", 0, 4096)]
        assert still_running(reader), "the read was answered while paused"
        status = ctl(path, "status").stdout
        assert "PAUSED, 1 held" in status
        assert ctl(path, "step").stdout.startswith("stepped READ 0+4096")
        # The read is answered; qemu-io goes on to flush as it closes, and
        # that FLUSH is held in turn (we are still paused).
        (held,) = ctl_json(path, "wait", "--timeout", "20")
        assert held["op"] == "FLUSH"
        ctl(path, "resume")
        out, _ = reader.communicate(timeout=20)
        assert reader.returncode == 0 and "read 4096/4096 bytes at offset 0" in out, out
    finally:
        if reader.poll() is None:
            reader.kill()


def test_nbdsh_read_is_held_and_a_step_can_fail_it(controlled):
    served, path = controlled(["ram", "--size", "8M"])
    ctl(path, "pause")
    script = (
        "try:\n    h.pread(4096, 0)\n    print('no error')\nexcept nbd.Error as e:\n    print('errno', e.errno)\n"
        "print(h.pread(4, 0))\n"
    )
    proc = subprocess.Popen([*nbdsh(), "-u", served.uri, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        ctl(path, "wait", "--timeout", "20")
        assert still_running(proc)
        assert "failed with EIO" in ctl(path, "step", "--fail", "EIO").stdout
        ctl(path, "step", "--wait", "20")  # the second read: released normally
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "errno EIO" in out and "(b'\\x00\\x00\\x00\\x00')" in out, out


def test_breakpoint_on_flush_from_a_real_client(controlled):
    served, path = controlled(["ram", "--size", "8M"])
    assert ctl(path, "break", "add", "op=flush").stdout.startswith("added breakpoint 1: op=flush")
    proc = subprocess.Popen(
        [*nbdsh(), "-u", served.uri, "-c", "h.pwrite(b'j' * 512, 0); h.flush(); print('flushed')"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        (held,) = ctl_json(path, "wait", "--timeout", "20")
        assert held["op"] == "FLUSH" and held["breakpoint"] == 1
        status = ctl_json(path, "status")
        assert status["paused"] and status["last_break"]["op"] == "FLUSH"
        assert status["breakpoints"][0]["hits"] == 1
        ctl(path, "step")
        out, _ = proc.communicate(timeout=20)
        assert "flushed" in out
    finally:
        if proc.poll() is None:
            proc.kill()
    ctl(path, "resume")
    assert "removed breakpoint 1" in ctl(path, "break", "rm", "1").stdout


def test_breakpoint_on_a_payload_pattern_from_qemu_io(controlled):
    require_tool("qemu-io")
    served, path = controlled(["ram", "--size", "8M"])
    ctl(path, "break", "add", "pattern=text:MAGIC!")
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 64k", served.uri], check=True, capture_output=True)
    assert not ctl_json(path, "status")["paused"]
    with NBDClient.connect_unix(served.socket) as client:
        # qemu-io cannot write a text pattern: our own client does, on a thread.
        writer = threading.Thread(target=client.write, args=(4096, b"..MAGIC!.."))
        writer.start()
        (held,) = ctl_json(path, "wait", "--timeout", "20")
        assert held["op"] == "WRITE" and held["offset"] == 4096
        assert writer.is_alive()
        ctl(path, "resume")
        writer.join(20)
        assert not writer.is_alive()
        assert client.read(4096, 10) == b"..MAGIC!.."


# --- filters and power cut --------------------------------------------------------------------


def test_live_error_filter_and_powercut_with_real_clients(controlled):
    require_tool("qemu-io")
    served, path = controlled(["ram", "--size", "8M", "--filter", "cache"])
    # Writes before the FLUSH survive the power cut, writes after it do not.
    script = (
        "h.pwrite(b'A' * 65536, 0)\n"
        "h.flush()\n"
        "h.pwrite(b'B' * 65536, 65536)\n"
        "h.pwrite(b'C' * 4096, 0)\n"
        "assert h.pread(4, 0) == b'CCCC'\n"
    )
    subprocess.run([*nbdsh(), "-u", served.uri, "-c", script], check=True, timeout=30)
    assert "dirty_bytes 69632" in ctl(path, "filter", "list").stdout  # 64 KiB of B and 4 KiB of C
    out = ctl(path, "powercut").stdout
    assert out.startswith("power cut: 68.0 KiB"), out
    ctl(path, "poweron")  # a power cut is a crash: nothing is served until the power is back
    check = subprocess.run(
        [
            *nbdsh(),
            "-u",
            served.uri,
            "-c",
            "print(h.pread(65536, 0) == b'A' * 65536, h.pread(65536, 65536) == bytes(65536))",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.stdout.split() == ["True", "True"], check.stdout + check.stderr
    # An error filter added live: qemu-io sees EIO; removed, it reads again.
    assert "added filter 2: error:errno=EIO,op=read" in ctl(path, "filter", "add", "error:op=read,errno=EIO").stdout
    read = subprocess.run(["qemu-io", "-f", "raw", "-c", "read 0 4k", served.uri], capture_output=True, text=True)
    assert "Input/output error" in read.stdout + read.stderr
    ctl(path, "filter", "rm", "error")
    read = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "read -P 0x41 0 4k", served.uri], capture_output=True, text=True
    )
    assert read.returncode == 0 and "Pattern verification failed" not in read.stdout, read.stdout


# --- switching backends with a real client ---------------------------------------------------------


def test_ctl_switch_ram_to_file_keeps_every_byte(controlled, tmp_path):
    require_tool("nbdcopy")
    served, path = controlled(["ram", "--size", "16M"])
    source = tmp_path / "source.img"
    source.write_bytes(os.urandom(6 * MiB) + bytes(4 * MiB) + os.urandom(6 * MiB))
    subprocess.run(["nbdcopy", str(source), served.uri], check=True, timeout=60)
    target = tmp_path / "disk.img"
    out = ctl(path, "switch", "file", str(target)).stdout
    assert out.startswith("switched: ram (sparse, in memory) -> file ") and "copied 12.0 MiB" in out, out
    back = tmp_path / "back.img"
    subprocess.run(["nbdcopy", served.uri, str(back)], check=True, timeout=60)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
    assert ctl_json(path, "status")["kind"] == "file"
    # A bigger target makes the disk bigger, and the reply says so.
    bigger = tmp_path / "bigger.img"
    with bigger.open("wb") as f:
        f.truncate(32 * MiB)  # holds no data yet: no --overwrite needed
    out = ctl(path, "switch", "file", str(bigger)).stdout
    assert "the disk grew from 16.0 MiB to 32.0 MiB" in out, out
    assert ctl_json(path, "status")["size"] == 32 * MiB
    served.stop()
    assert hashlib.sha256(target.read_bytes()).hexdigest() == digest


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["switch", "tape"], "unknown backend 'tape'"),
        (["switch", "ram", "--size", "1M"], "smaller than the disk"),
        (["switch", "null"], "null keeps no data"),
        (["step", "--fail", "EFOO"], "bad errno 'EFOO'"),
        (["break", "add", "range=0-1G"], "past the end"),
        (["break", "add", "op=frobnicate"], "unknown op 'frobnicate'"),
        (["filter", "add", "error:errno=EFOO"], "bad errno 'EFOO'"),
        (["filter", "add", "warp:speed=9"], "unknown filter 'warp'"),
        (["filter", "add", "error:range=0-1T,errno=EIO"], "past the end of the 8388608-byte disk (in filter error:"),
        (["filter", "rm", "7"], "no filter '7'"),
        (["break", "rm", "3"], "no breakpoint '3'"),
        (["powercut"], "no cache filter"),
        (["cow", "commit"], "not cow"),
        (["step"], "not paused"),
    ],
)
def test_bad_commands_are_refused_in_one_line_and_change_nothing(shared_server, args, words):
    served, path = shared_server
    proc = ctl(path, *args, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr  # like every user error (README)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("buselab: error: ") and words in lines[0], proc.stderr
    assert "--filter" not in lines[0]  # nothing here came from the command line's --filter
    assert "Traceback" not in proc.stderr and not proc.stdout
    with NBDClient.connect_unix(served.socket) as client:
        assert client.read(0, 9) == b"precious!"  # the device keeps serving, nothing lost
    status = ctl_json(path, "status")
    assert status["kind"] == "ram" and not status["paused"] and not status["filters"] and not status["breakpoints"]


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    """One server for the bad-input cases (they change nothing, which is the point)."""
    from helpers import start_buselab

    tmp = tmp_path_factory.mktemp("bad-ctl")
    path = str(tmp / "control.sock")
    served = start_buselab(["ram", "--size", "8M", "--control", path], tmp)
    with NBDClient.connect_unix(served.socket) as client:
        client.write(0, b"precious!")
    yield served, path
    served.stop()


def test_ctl_without_a_server_and_with_bad_usage(tmp_path):
    proc = ctl(str(tmp_path / "nothing.sock"), "status", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no control socket" in proc.stderr
    assert "no buselab is running there" in proc.stderr and "leave it out" in proc.stderr, proc.stderr
    proc = ctl(str(tmp_path / "x.sock"), "frobnicate", check=False)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("buselab: error: "), proc.stderr


def test_refused_with_json_prints_the_reply_and_exits_2(shared_server):
    _, path = shared_server
    proc = ctl(path, "filter", "rm", "7", "--json", check=False)
    assert proc.returncode == 2 and not proc.stderr, proc.stderr
    reply = json.loads(proc.stdout)
    assert reply["ok"] is False and "no filter '7'" in reply["error"]


def test_ctl_into_a_closed_pipe_is_quiet(shared_server):
    # `buselab ctl status | head -3` where head has gone before buselab writes.
    _, path = shared_server
    for args in (["status"], ["status", "--json"], ["events", "--limit", "500"]):
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "buselab", "ctl", path, *args],
                stdout=write_end,
                stderr=subprocess.PIPE,
                text=True,
                timeout=60,
            )
        finally:
            os.close(write_end)
        assert proc.returncode == 0 and proc.stderr == "", (args, proc.stderr)


def test_rm_all_and_the_added_lines(controlled):
    served, path = controlled(["ram", "--size", "8M"])
    assert ctl(path, "filter", "add", "delay:5ms").stdout.startswith("added filter 1: delay:")
    assert ctl(path, "filter", "add", "readonly").stdout == "added filter 2: readonly [on]\n"
    assert ctl(path, "break", "add", "op=flush").stdout == "added breakpoint 1: op=flush [on] 0 hits\n"
    assert ctl(path, "break", "add", "range=0-1M").stdout == "added breakpoint 2: range=0-1M [on] 0 hits\n"
    assert ctl(path, "filter", "rm", "all").stdout == "removed filters 2, 1\n"
    assert ctl(path, "break", "rm", "all").stdout == "removed breakpoints 1, 2\n"
    status = ctl_json(path, "status")
    assert not status["filters"] and not status["breakpoints"]
    with NBDClient.connect_unix(served.socket) as client:
        client.write(0, b"writable again")  # the readonly filter is really gone
        assert client.read(0, 14) == b"writable again"
    assert ctl(path, "filter", "rm", "all").stdout == "no filters to remove\n"
    assert ctl_json(path, "filter", "rm", "all") == {"removed": []}


# --- the protocol itself, and the default socket ---------------------------------------------------


def test_json_lines_and_the_words_form(shared_server):
    _, path = shared_server
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    reader = sock.makefile("rb")

    def say(line: str) -> dict:
        sock.sendall(line.encode() + b"\n")
        return json.loads(reader.readline())

    try:
        assert say("pause") == {"ok": True, "result": {"paused": True, "held": 0}}
        assert say('{"cmd": "resume", "id": 5}') == {"ok": True, "result": {"paused": False, "released": 0}, "id": 5}
        reply = say("break add op=write fua")
        assert reply["ok"] and reply["result"]["spec"] == "op=write,fua"
        assert say("break rm all")["result"] == {"removed": [reply["result"]["id"]]}
        assert say("{not json")["ok"] is False
        assert "unknown command 'dance'" in say("dance")["error"]
        assert say('{"cmd": "status", "colour": "red"}')["error"] == "status does not take colour"
        assert say('["status"]')["ok"] is False
        assert say("help")["ok"]
    finally:
        sock.close()


def test_a_control_socket_is_always_on_at_the_default_path(buselab_server):
    served = buselab_server(["ram", "--size", "4M"])
    path = default_control_path(served.proc.pid)
    deadline = time.monotonic() + 10
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"no control socket at {path}"
        time.sleep(0.05)
    assert os.stat(path).st_mode & 0o777 == 0o600
    status = json.loads(ctl(str(served.proc.pid), "status", "--json").stdout)["result"]
    assert status["control"] == path and status["size"] == 4 * MiB
    assert served.stop(signal.SIGINT) == 0
    assert not os.path.exists(path)
