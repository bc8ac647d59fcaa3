"""A live switch never copies the disk over data without being told to.

`switch file PATH` (ctl, the control socket, the lab's `b`) copies the disk
into PATH. If PATH is a file that holds data, or any block device (a mistyped
/dev/sdX as root), the switch is refused in one line saying what is there and
how to go ahead (--overwrite); the lab asks instead, showing the size and what
the first bytes look like (ext4, GPT, MBR, FAT, ...). A new file, an empty one,
or a sparse one that holds no data yet is switched to without asking.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import aio, require_root, require_tool, socket_path, wait_for_socket
from textual.widgets import RadioButton

from buselab.client import NBDClient
from buselab.control.client import ControlClient
from buselab.session import ServeOptions, Session
from buselab.steering import SteeringError
from buselab.steering.restack import disk_signature, existing_data
from buselab.storage.backends.file import FileBackend
from buselab.storage.backends.ram import RamBackend
from buselab.ui.lab import LabApp
from buselab.ui.screens.backend import SwitchBackendScreen
from buselab.ui.screens.panel import ConfirmScreen

MiB = 1 << 20
SIZE = 8 * MiB


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def session(tmp_path: Path):
    s = Session(RamBackend(SIZE), ServeOptions(unix=[str(tmp_path / "nbd.sock")], control=str(tmp_path / "ctl.sock")))
    s.start()
    with NBDClient.connect_unix(socket_path(s)) as client:
        client.write(MiB, b"the disk's own data" * 100)
    yield s
    s.stop()


def disk_bytes(session: Session) -> bytes:
    with NBDClient.connect_unix(socket_path(session)) as client:
        return client.read(0, SIZE)


def ext4_image(path: Path, size: int = 2 * SIZE) -> Path:
    require_tool("mkfs.ext4")
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(path)], check=True, capture_output=True, timeout=60)
    return path


# --- what the first bytes say ---------------------------------------------------------------------


def boot_sector(**at: bytes) -> bytes:
    head = bytearray(4096)
    for offset, data in at.items():
        start = int(offset.removeprefix("at"))
        head[start : start + len(data)] = data
    return bytes(head)


@pytest.mark.parametrize(
    ("head", "signature"),
    [
        (boot_sector(at510=b"\x55\xaa"), "MBR partition table"),
        (boot_sector(at510=b"\x55\xaa", at512=b"EFI PART"), "GPT partition table"),
        (boot_sector(at3=b"mkfs.fat", at54=b"FAT16   ", at510=b"\x55\xaa"), "FAT16 file system"),
        (boot_sector(at3=b"mkfs.fat", at82=b"FAT32   ", at510=b"\x55\xaa"), "FAT32 file system"),
        (boot_sector(at3=b"NTFS    ", at510=b"\x55\xaa"), "NTFS file system"),
        (boot_sector(at1080=b"\x53\xef"), "ext2 file system"),
        (boot_sector(at1080=b"\x53\xef", at1116=struct.pack("<I", 0x4)), "ext3 file system"),
        (boot_sector(at1080=b"\x53\xef", at1116=struct.pack("<I", 0x4), at1120=struct.pack("<I", 0x2C2)), "ext4"),
        (boot_sector(at0=b"LUKS\xba\xbe"), "LUKS encrypted volume"),
        (boot_sector(at0=b"hello, world"), "data"),
        (bytes(4096), "data"),
        (b"short", "data"),
        (b"", "data"),
    ],
)
def test_disk_signature(head, signature):
    assert disk_signature(head).startswith(signature)


@pytest.mark.parametrize(("tool", "signature"), [("mkfs.ext2", "ext2"), ("mkfs.ext3", "ext3"), ("mkfs.ext4", "ext4")])
def test_disk_signature_of_a_real_ext_file_system(tmp_path, tool, signature):
    require_tool(tool)
    image = tmp_path / "fs.img"
    image.write_bytes(bytes(4 * MiB))
    subprocess.run([tool, "-q", "-F", str(image)], check=True, capture_output=True, timeout=60)
    assert disk_signature(image.read_bytes()[:4096]) == f"{signature} file system"


def test_disk_signature_of_real_swap(tmp_path):
    require_tool("mkswap")
    image = tmp_path / "swap.img"
    image.write_bytes(bytes(4 * MiB))
    subprocess.run(["mkswap", str(image)], check=True, capture_output=True, timeout=60)
    assert disk_signature(image.read_bytes()[:4096]) == "Linux swap"


def test_existing_data_is_none_for_nothing_to_lose(tmp_path):
    assert existing_data(str(tmp_path / "missing.img")) is None
    (tmp_path / "empty.img").write_bytes(b"")
    assert existing_data(str(tmp_path / "empty.img")) is None
    with open(tmp_path / "sparse.img", "wb") as f:
        f.truncate(SIZE)  # made with truncate: no data anywhere yet
    assert existing_data(str(tmp_path / "sparse.img")) is None
    (tmp_path / "data.img").write_bytes(b"x" * 5000)
    found = existing_data(str(tmp_path / "data.img"))
    assert found is not None and found.what == "file" and found.size == 5000 and found.signature == "data"


# --- steering refuses; overwrite=True goes ahead ---------------------------------------------------------


def test_switch_onto_a_file_with_data_is_refused_and_nothing_changes(session, tmp_path):
    target = ext4_image(tmp_path / "important.img")
    before = sha(target)
    steering = session.steering
    with pytest.raises(SteeringError) as info:
        steering.switch_backend("file", str(target))
    message = str(info.value)
    assert "\n" not in message
    assert str(target) in message and "16.0 MiB" in message and "ext4 file system" in message, message
    assert "--overwrite" in message, message
    assert sha(target) == before
    assert isinstance(steering.base, RamBackend)
    # lo is file too
    with pytest.raises(SteeringError):
        steering.switch_backend("lo", str(target))
    assert sha(target) == before
    # Without a copy nothing is written over it by the switch: serving an existing image is what that is for.
    steering.switch_backend("file", str(target), copy=False)
    assert sha(target) == before


def test_switch_with_overwrite_copies_over_the_data(session, tmp_path):
    target = ext4_image(tmp_path / "scratch.img", size=SIZE)
    expected = disk_bytes(session)
    result = session.steering.switch_backend("file", str(target), overwrite=True)
    assert result.copied_bytes > 0
    assert isinstance(session.steering.base, FileBackend)
    assert target.read_bytes() == expected == disk_bytes(session)


@pytest.mark.parametrize("made", ["missing", "empty", "sparse"])
def test_switch_onto_a_new_empty_or_sparse_file_needs_no_flag(session, tmp_path, made):
    target = tmp_path / "new.img"
    if made == "empty":
        target.write_bytes(b"")
    elif made == "sparse":
        with open(target, "wb") as f:
            f.truncate(SIZE)
    expected = disk_bytes(session)
    session.steering.switch_backend("file", str(target))
    assert target.read_bytes() == expected


def test_a_smaller_file_is_still_refused_for_its_size(session, tmp_path):
    small = tmp_path / "small.img"
    small.write_bytes(b"x" * MiB)
    with pytest.raises(SteeringError) as info:
        session.steering.switch_backend("file", str(small), overwrite=True)
    assert "smaller than the disk" in str(info.value)
    assert small.read_bytes() == b"x" * MiB


@pytest.mark.root
def test_a_block_device_is_refused_even_when_it_reads_as_zeros(session, tmp_path):
    require_root()
    require_tool("losetup")
    image = tmp_path / "backing.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    device = subprocess.run(
        ["losetup", "-f", "--show", str(image)], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()
    try:
        with pytest.raises(SteeringError) as info:
            session.steering.switch_backend("file", device)
        message = str(info.value)
        assert f"{device} is a block device of 8.0 MiB" in message and "--overwrite" in message, message
        assert image.read_bytes() == bytes(SIZE)
        assert isinstance(session.steering.base, RamBackend)
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True, timeout=30)


# --- buselab ctl -------------------------------------------------------------------------------------


def ctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "buselab", "ctl", *args], capture_output=True, text=True, timeout=60)


def test_ctl_switch_onto_a_file_with_data_exits_2_and_leaves_it(session, tmp_path):
    path = session.options.control
    target = ext4_image(tmp_path / "important.img")
    before = sha(target)
    proc = ctl(path, "switch", "file", str(target))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("buselab: error: "), proc.stderr
    assert str(target) in lines[0] and "ext4 file system" in lines[0] and "--overwrite" in lines[0], lines[0]
    assert proc.stdout == ""
    assert sha(target) == before and isinstance(session.steering.base, RamBackend)


def test_ctl_switch_overwrite_copies_over_it(session, tmp_path):
    path = session.options.control
    target = tmp_path / "old.img"
    target.write_bytes(b"old contents " * (SIZE // 13) + b"x" * (SIZE % 13))
    expected = disk_bytes(session)
    proc = ctl(path, "switch", "file", str(target), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("switched: ram (sparse, in memory) -> file "), proc.stdout
    assert target.read_bytes() == expected


def test_ctl_switch_onto_a_new_file_needs_no_flag(session, tmp_path):
    target = tmp_path / "new.img"
    proc = ctl(session.options.control, "switch", "file", str(target))
    assert proc.returncode == 0, proc.stderr
    assert target.read_bytes() == disk_bytes(session)


def test_the_control_socket_takes_overwrite_as_json_and_as_words(session, tmp_path):
    first, second = tmp_path / "a.img", tmp_path / "b.img"
    first.write_bytes(b"A" * SIZE)
    second.write_bytes(b"B" * SIZE)
    with ControlClient(session.options.control, timeout=30) as control:
        refused = control.request("switch", kind="file", path=str(first))
        assert not refused["ok"] and "--overwrite" in refused["error"]
        assert control.call("switch", kind="file", path=str(first), overwrite=True)["kind"] == "file"
    expected = disk_bytes(session)
    assert first.read_bytes() == expected
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(session.options.control)
        sock.sendall(f"switch file {second} overwrite=yes\n".encode())
        reply = sock.makefile().readline()
    assert '"ok": true' in reply, reply
    assert second.read_bytes() == expected


# --- the lab asks ---------------------------------------------------------------------------------------


async def settle(app: LabApp, pilot) -> None:
    await app.workers.wait_for_complete()
    await pilot.pause()
    app.poll()
    await pilot.pause()


@aio
async def test_the_lab_asks_before_copying_over_a_file_system(session, tmp_path):
    target = ext4_image(tmp_path / "important.img")
    before = sha(target)
    expected = disk_bytes(session)
    app = LabApp(session, auto_poll=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("b")
        form = app.screen
        assert isinstance(form, SwitchBackendScreen)
        form.query_one("#path").value = str(target)
        await pilot.press("ctrl+s")
        await settle(app, pilot)
        question = app.screen
        assert isinstance(question, ConfirmScreen), "no question before copying over a file system"
        text = question.question + " " + question.detail
        assert str(target) in text and "16.0 MiB" in text and "ext4 file system" in text, text
        await pilot.press("n")
        await settle(app, pilot)
        assert app.screen is form, "a no closed the form"
        assert "not switched" in form.status_text
        assert sha(target) == before and isinstance(session.steering.base, RamBackend)
        # A yes copies over it.
        await pilot.press("ctrl+s")
        await settle(app, pilot)
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await settle(app, pilot)
        assert not isinstance(app.screen, (ConfirmScreen, SwitchBackendScreen))
        base = session.steering.base
        assert isinstance(base, FileBackend) and Path(base.path) == target
        assert disk_bytes(session) == expected
        assert target.read_bytes()[:SIZE] == expected


@aio
async def test_the_lab_does_not_ask_for_a_new_file(session, tmp_path):
    target = tmp_path / "new.img"
    app = LabApp(session, auto_poll=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("b")
        app.screen.query_one("#path").value = str(target)
        await pilot.press("ctrl+s")
        await settle(app, pilot)
        assert not isinstance(app.screen, (ConfirmScreen, SwitchBackendScreen))
        assert isinstance(session.steering.base, FileBackend)
    assert os.path.getsize(target) == SIZE


# --- another server's export (`switch nbd URI`) ---------------------------------------------------------


@pytest.fixture
def exports(tmp_path: Path):
    """nbdkit serving what it is given (`memory 8M`, `file IMG`) on a Unix socket: its nbd+unix URI."""
    started: list[subprocess.Popen] = []

    def start(*plugin: str) -> str:
        require_tool("nbdkit")
        sock = tmp_path / f"nbdkit{len(started)}.sock"
        log = tmp_path / f"nbdkit{len(started)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), *plugin], stdout=out, stderr=subprocess.STDOUT)
        started.append(proc)
        wait_for_socket(str(sock), proc, log)
        return f"nbd+unix:///?socket={sock}"

    yield start
    for proc in started:
        proc.kill()  # nbdkit's clean stop waits for its clients; the tests have checked what it holds
        proc.wait(30)


def test_switch_into_an_export_holding_a_file_system_is_refused_and_nothing_changes(session, tmp_path, exports):
    image = ext4_image(tmp_path / "upstream.img")
    before = sha(image)
    uri = exports("file", str(image))
    with pytest.raises(SteeringError) as info:
        session.steering.switch_backend("nbd", uri)
    message = str(info.value)
    assert "\n" not in message
    assert uri in message and "an NBD export of 16.0 MiB (ext4 file system)" in message, message
    assert "--overwrite" in message, message
    assert sha(image) == before and isinstance(session.steering.base, RamBackend)
    assert session.steering.switch_would_overwrite("nbd", uri).signature == "ext4 file system"
    # Told to, it copies the disk over the export.
    expected = disk_bytes(session)
    session.steering.switch_backend("nbd", uri, overwrite=True)
    assert disk_bytes(session) == expected
    session.steering.switch_backend("ram")  # lets go of the export, flushed
    assert image.read_bytes()[:SIZE] == expected


def test_switch_into_an_empty_export_needs_no_flag(session, exports):
    uri = exports("memory", "16M")
    assert session.steering.switch_would_overwrite("nbd", uri) is None
    expected = disk_bytes(session)
    result = session.steering.switch_backend("nbd", uri)
    assert result.copied_bytes > 0 and disk_bytes(session) == expected
    session.steering.switch_backend("ram")  # lets go of the export before nbdkit is stopped


def test_an_export_written_only_with_zeros_still_counts_as_empty_but_one_byte_does_not(session, exports):
    uri = exports("memory", "16M")
    with NBDClient.connect_unix(uri.split("socket=", 1)[1]) as client:
        client.write(5 * MiB, bytes(4096))  # nbdkit memory keeps an all-zero page as a hole
        assert session.steering.switch_would_overwrite("nbd", uri) is None
        client.write(12 * MiB + 7, b"\x01")
    existing = session.steering.switch_would_overwrite("nbd", uri)
    assert existing is not None and existing.describe() == "an NBD export of 16.0 MiB (data)"


@aio
async def test_the_lab_asks_before_copying_into_an_export_with_data(session, tmp_path, exports):
    image = ext4_image(tmp_path / "upstream.img")
    before = sha(image)
    uri = exports("file", str(image))
    app = LabApp(session, auto_poll=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("b")
        form = app.screen
        assert isinstance(form, SwitchBackendScreen)
        next(b for b in form.query(RadioButton) if b.name == "nbd").value = True
        form.query_one("#path").value = uri
        await pilot.press("ctrl+s")
        await settle(app, pilot)
        question = app.screen
        assert isinstance(question, ConfirmScreen), "no question before copying over another server's export"
        text = question.question + " " + question.detail
        assert "NBD export of 16.0 MiB (ext4 file system)" in text, text
        await pilot.press("n")
        await settle(app, pilot)
        assert app.screen is form and isinstance(session.steering.base, RamBackend)
    assert sha(image) == before
