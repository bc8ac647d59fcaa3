"""Backends on their own: ram, file, null, plugin, and open_backend."""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
from helpers import require_root, require_tool

from buselab.errors import UserError
from buselab.protocol import constants as c
from buselab.storage.backends.file import FileBackend
from buselab.storage.backends.null import NullBackend
from buselab.storage.backends.plugin import PluginBackend
from buselab.storage.backends.ram import PAGE, RamBackend
from buselab.storage.base import BackendError, wire_errno
from buselab.storage.registry import open_backend

HOLE = c.STATE_HOLE | c.STATE_ZERO
MiB = 1 << 20
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "mydisk.py"


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def resident(mm, offset: int = 0, length: int | None = None) -> int:
    """Bytes of mm[offset:offset+length] that are in memory (mincore)."""
    address = ctypes.addressof(ctypes.c_char.from_buffer(mm))  # the temporary export ends here
    length = len(mm) - offset if length is None else length
    first = offset // PAGE * PAGE
    pages = (offset + length - first + PAGE - 1) // PAGE
    vec = ctypes.create_string_buffer(pages)
    if _libc.mincore(address + first, pages * PAGE, vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    return sum(b & 1 for b in vec.raw) * PAGE


def process_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def covered(extents: list[tuple[int, int]]) -> int:
    return sum(n for n, _ in extents)


# --- ram -------------------------------------------------------------------------------


def test_ram_round_trip_across_pages():
    ram = RamBackend(4 * MiB)
    data = os.urandom(3 * PAGE + 123)
    ram.write(PAGE - 7, data)
    assert bytes(ram.read(PAGE - 7, len(data))) == data
    assert bytes(ram.read(0, PAGE - 7)) == bytes(PAGE - 7)
    ram.write(0, memoryview(b"abc"))
    assert bytes(ram.read(0, 3)) == b"abc"


def test_ram_default_size_is_128_mib():
    assert RamBackend().size == 128 * MiB
    assert open_backend("ram").size == 128 * MiB


def test_ram_capabilities():
    caps = RamBackend(MiB).caps
    assert caps.flush and caps.fua and caps.trim and caps.zero and caps.extents and caps.multi_conn


def test_ram_one_terabyte_stays_small():
    before = process_rss()
    ram = RamBackend(1 << 40)
    try:
        assert ram.size == 1 << 40
        end = (1 << 40) - 4096
        ram.write(end, b"x" * 4096)
        ram.write(1 << 39, b"middle")
        assert bytes(ram.read(end, 4096)) == b"x" * 4096
        assert bytes(ram.read(1 << 39, 6)) == b"middle"
        assert bytes(ram.read(1 << 30, 16)) == bytes(16)
        assert ram.extents(end - 8192, 12288) == [(8192, HOLE), (4096, 0)]
        assert ram.extents(1 << 30, 1 << 30) == [(1 << 30, HOLE)]
        assert resident(ram._data, (1 << 39) - MiB, 2 * MiB) == PAGE
        assert resident(ram._data, end - MiB, MiB + PAGE) == PAGE
        assert process_rss() - before < 32 * MiB
    finally:
        ram.close()


def test_ram_trim_gives_pages_back_and_reads_zeros():
    ram = RamBackend(64 * MiB)
    ram.write(MiB, os.urandom(8 * MiB))
    assert resident(ram._data) >= 8 * MiB
    assert ram.allocated_bytes() == 8 * MiB
    ram.trim(MiB, 8 * MiB)
    assert resident(ram._data) < MiB
    assert ram.allocated_bytes() == 0
    assert bytes(ram.read(MiB, 8 * MiB)) == bytes(8 * MiB)
    assert ram.extents(0, 64 * MiB) == [(64 * MiB, HOLE)]


def test_ram_write_zeroes_may_trim_gives_pages_back():
    ram = RamBackend(16 * MiB)
    ram.write(0, b"\xff" * (4 * MiB))
    ram.write_zeroes(0, 4 * MiB, may_trim=True, fast=False)
    assert resident(ram._data) < MiB
    assert bytes(ram.read(0, 4 * MiB)) == bytes(4 * MiB)
    assert ram.extents(0, 4 * MiB) == [(4 * MiB, HOLE)]


def test_ram_no_hole_zero_keeps_data_allocated():
    ram = RamBackend(16 * MiB)
    ram.write(0, b"\xff" * (4 * MiB))
    ram.write_zeroes(0, 4 * MiB, may_trim=False, fast=False)
    assert bytes(ram.read(0, 4 * MiB)) == bytes(4 * MiB)
    assert ram.extents(0, 4 * MiB) == [(4 * MiB, 0)]
    assert resident(ram._data) >= 4 * MiB
    # NO_HOLE on a hole allocates it.
    ram.write_zeroes(8 * MiB, PAGE, may_trim=False, fast=False)
    assert ram.extents(8 * MiB, PAGE) == [(PAGE, 0)]


def test_ram_unaligned_trim_zeroes_edges_and_keeps_neighbours():
    ram = RamBackend(MiB)
    ram.write(0, b"\xaa" * (4 * PAGE))
    ram.trim(100, 2 * PAGE)
    data = bytes(ram.read(0, 4 * PAGE))
    assert data[:100] == b"\xaa" * 100
    assert data[100 : 100 + 2 * PAGE] == bytes(2 * PAGE)
    assert data[100 + 2 * PAGE :] == b"\xaa" * (2 * PAGE - 100)
    # Only the whole page inside the range became a hole.
    assert ram.extents(0, 4 * PAGE) == [(PAGE, 0), (PAGE, HOLE), (2 * PAGE, 0)]


def test_ram_extents_report_holes_and_data():
    ram = RamBackend(MiB)
    assert ram.extents(0, MiB) == [(MiB, HOLE)]
    ram.write(2 * PAGE, b"x")
    ram.write(5 * PAGE + 10, b"y" * PAGE)  # touches pages 5 and 6
    assert ram.extents(0, 8 * PAGE) == [(2 * PAGE, HOLE), (PAGE, 0), (2 * PAGE, HOLE), (2 * PAGE, 0), (PAGE, HOLE)]
    # Unaligned queries start and end where asked.
    assert ram.extents(PAGE + 1, PAGE) == [(PAGE - 1, HOLE), (1, 0)]
    assert covered(ram.extents(123, 7 * PAGE)) == 7 * PAGE


def test_ram_fast_zero_is_fast():
    ram = RamBackend(MiB)
    ram.write_zeroes(0, MiB, may_trim=True, fast=True)  # must not raise ENOTSUP


# --- file ----------------------------------------------------------------------------------


def test_file_created_sparse_at_size(tmp_path):
    path = tmp_path / "disk.img"
    disk = FileBackend(str(path), 8 * MiB)
    try:
        assert path.stat().st_size == 8 * MiB
        assert path.stat().st_blocks == 0
        assert disk.size == 8 * MiB
        assert not disk.is_block_device
        assert disk.extents(0, 8 * MiB) == [(8 * MiB, HOLE)]
        caps = disk.caps
        assert caps.flush and caps.fua and caps.trim and caps.zero and caps.extents and caps.multi_conn
    finally:
        disk.close()


def test_file_existing_used_as_is(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(b"q" * 12288)
    disk = FileBackend(str(path))
    assert disk.size == 12288
    assert disk.read(4096, 4) == b"qqqq"
    disk.close()
    disk = FileBackend(str(path), 12288)  # matching --size is fine
    disk.close()


def test_file_size_mismatch_is_a_user_error(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(4096))
    with pytest.raises(UserError) as info:
        FileBackend(str(path), 8192)
    assert "4096" in str(info.value) and "8192" in str(info.value)
    assert path.stat().st_size == 4096  # left alone


@pytest.mark.parametrize(
    "setup, size, readonly, words",
    [
        ("missing", None, False, "does not exist"),
        ("missing", MiB, True, "readonly"),
        ("dir", MiB, False, "directory"),
        ("empty", None, False, "empty"),
        ("nodir", MiB, False, "directory does not exist"),
    ],
)
def test_file_user_errors(tmp_path, setup, size, readonly, words):
    path = tmp_path / "disk.img"
    if setup == "dir":
        path.mkdir()
    elif setup == "empty":
        path.touch()
    elif setup == "nodir":
        path = tmp_path / "no" / "such" / "disk.img"
    with pytest.raises(UserError) as info:
        FileBackend(str(path), size, readonly)
    message = str(info.value)
    assert words in message.replace("--readonly", "readonly")
    assert "\n" not in message


def test_file_char_device_is_refused():
    with pytest.raises(UserError, match="neither"):
        FileBackend("/dev/null", MiB)


def test_file_pread_pwrite(tmp_path):
    path = tmp_path / "disk.img"
    disk = FileBackend(str(path), MiB)
    data = os.urandom(10000)
    disk.write(5000, data)
    disk.write(0, memoryview(b"head"), fua=True)
    assert disk.read(5000, 10000) == data
    assert disk.read(0, 4) == b"head"
    disk.close()
    raw = path.read_bytes()
    assert raw[5000:15000] == data
    assert raw[:4] == b"head"


def test_file_trim_punches_holes(tmp_path):
    path = tmp_path / "disk.img"
    disk = FileBackend(str(path), 4 * MiB)
    disk.write(0, b"\x77" * (4 * MiB))
    disk.flush()
    allocated = path.stat().st_blocks * 512
    assert allocated >= 4 * MiB
    assert disk.extents(0, 4 * MiB) == [(4 * MiB, 0)]
    disk.trim(MiB, 2 * MiB)
    assert path.stat().st_blocks * 512 <= allocated - 2 * MiB
    assert disk.read(MiB, 2 * MiB) == bytes(2 * MiB)
    assert disk.read(0, MiB) == b"\x77" * MiB
    assert disk.extents(0, 4 * MiB) == [(MiB, 0), (2 * MiB, HOLE), (MiB, 0)]
    disk.close()


def test_file_write_zeroes(tmp_path):
    path = tmp_path / "disk.img"
    disk = FileBackend(str(path), 4 * MiB)
    disk.write(0, b"\x01" * (4 * MiB))
    disk.write_zeroes(0, MiB, may_trim=True, fast=False)
    disk.write_zeroes(2 * MiB, MiB, may_trim=False, fast=False, fua=True)
    assert disk.read(0, MiB) == bytes(MiB)
    assert disk.read(MiB, MiB) == b"\x01" * MiB
    assert disk.read(2 * MiB, MiB) == bytes(MiB)
    extents = disk.extents(0, 4 * MiB)
    assert extents[0] == (MiB, HOLE)  # may_trim: punched
    assert all(f == 0 for _, f in extents[1:])  # NO_HOLE: zeroed, still allocated
    disk.close()


def test_file_flush_and_fua_reach_the_disk(tmp_path, monkeypatch):
    path = tmp_path / "disk.img"
    disk = FileBackend(str(path), MiB)
    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd))[1])
    disk.write(0, b"data")
    assert synced == []
    disk.flush()
    assert synced == [disk._fd]
    flags_seen: list[int] = []
    real_pwritev = os.pwritev
    monkeypatch.setattr(
        os, "pwritev", lambda fd, bufs, off, flags=0: (flags_seen.append(flags), real_pwritev(fd, bufs, off, flags))[1]
    )
    disk.write(0, b"fua!", fua=True)
    disk.write(0, b"plain")
    assert flags_seen[0] & os.RWF_DSYNC
    assert not flags_seen[1] & os.RWF_DSYNC
    synced.clear()
    disk.trim(0, 4096, fua=True)
    assert synced
    disk.close()


def test_file_close_syncs(tmp_path, monkeypatch):
    disk = FileBackend(str(tmp_path / "d.img"), MiB)
    synced: list[int] = []
    monkeypatch.setattr(os, "fdatasync", synced.append)
    fd = disk._fd
    disk.close()
    assert synced == [fd]
    disk.close()  # idempotent
    assert synced == [fd]


def test_file_shrunk_under_us_is_eio_not_short_data(tmp_path):
    path = tmp_path / "disk.img"
    disk = FileBackend(str(path), MiB)
    os.truncate(path, 4096)
    with pytest.raises(BackendError) as info:
        disk.read(0, 8192)
    assert info.value.errno == c.EIO
    disk.close()


def test_file_readonly_opens_read_only(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(b"r" * 4096)
    disk = open_backend("file", path=str(path), readonly=True)
    assert disk.readonly
    with pytest.raises(OSError) as info:
        disk.write(0, b"x")
    assert wire_errno(info.value) in (c.EPERM, c.EIO)  # EBADF: the fd really is read-only
    assert path.read_bytes() == b"r" * 4096
    disk.close()


# --- null -------------------------------------------------------------------------------------


def test_null_backend():
    null = NullBackend(1 << 40)
    null.write(0, b"gone")
    assert bytes(null.read(0, 4)) == bytes(4)
    assert bytes(null.read(123, c.MAX_PAYLOAD)) == bytes(c.MAX_PAYLOAD)
    null.write_zeroes(0, 1 << 40, may_trim=False, fast=True)
    null.trim(0, 1 << 40)
    null.flush()
    assert null.extents(4096, 8192) == [(8192, HOLE)]
    assert null.caps.flush and null.caps.trim and null.caps.zero
    with pytest.raises(UserError, match="--size"):
        open_backend("null")
    assert open_backend("null", size=MiB).size == MiB


# --- open_backend and wire_errno --------------------------------------------------------------


def test_open_backend_errors():
    with pytest.raises(UserError, match="unknown backend"):
        open_backend("tape")
    with pytest.raises(UserError, match="PATH"):
        open_backend("file")
    with pytest.raises(UserError, match="FILE"):
        open_backend("plugin")


def test_open_backend_lo_is_file(tmp_path):
    disk = open_backend("lo", path=str(tmp_path / "x.img"), size=MiB)
    assert isinstance(disk, FileBackend)
    disk.close()


def test_open_backend_readonly_ram():
    assert open_backend("ram", size=MiB, readonly=True).readonly


@pytest.mark.parametrize(
    "exc, expected",
    [
        (BackendError(c.ENOSPC), c.ENOSPC),
        (OSError(errno.EACCES, "x"), c.EPERM),
        (OSError(errno.EROFS, "x"), c.EPERM),
        (OSError(errno.EIO, "x"), c.EIO),
        (OSError(errno.EDQUOT, "x"), c.ENOSPC),
        (OSError(errno.EFBIG, "x"), c.ENOSPC),
        (OSError(errno.ENOSPC, "x"), c.ENOSPC),
        (OSError(errno.EOPNOTSUPP, "x"), c.ENOTSUP),
        (OSError(errno.ENOENT, "x"), c.EIO),
        (OSError("no errno"), c.EIO),
        (MemoryError(), c.ENOMEM),
        (ValueError("bug"), c.EIO),
    ],
)
def test_wire_errno(exc, expected):
    assert wire_errno(exc) == expected


# --- plugin ------------------------------------------------------------------------------------

FULL = """
class Disk:
    def __init__(self, size=1 << 20):
        self.size = size
        self.data = bytearray(size)
        self.flushes = 0
        self.trims = []
        self.zeroes = []
    def read(self, offset, length):
        return bytes(self.data[offset:offset + length])
    def write(self, offset, data):
        self.data[offset:offset + len(data)] = data
    def flush(self):
        self.flushes += 1
    def trim(self, offset, length):
        self.trims.append((offset, length))
    def write_zeroes(self, offset, length):
        self.zeroes.append((offset, length))
        self.data[offset:offset + length] = bytes(length)
"""

MINIMAL = """
class Tiny:
    size = 8192
    can_multi_conn = True
    def __init__(self):
        self.data = bytearray(self.size)
    def read(self, offset, length):
        return bytes(self.data[offset:offset + length])
    def write(self, offset, data):
        self.data[offset:offset + len(data)] = data
"""


def plugin_file(tmp_path: Path, source: str, name: str = "disk.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


def test_plugin_full_by_path(tmp_path):
    backend = PluginBackend(plugin_file(tmp_path, FULL))
    assert backend.size == 1 << 20
    assert backend.name == "Disk"
    caps = backend.caps
    assert caps.flush and caps.fua and caps.trim and caps.zero
    assert not caps.multi_conn and not caps.extents
    backend.write(10, b"hello")
    assert backend.read(8, 9) == b"\0\0hello\0\0"
    backend.write(0, b"f", fua=True)
    assert backend.disk.flushes == 1
    backend.flush()
    assert backend.disk.flushes == 2
    backend.trim(0, 4096)
    assert backend.disk.trims == [(0, 4096)]
    backend.write_zeroes(10, 3, may_trim=True, fast=False)
    assert backend.disk.zeroes == [(10, 3)]
    assert backend.read(10, 5) == b"\0\0\0lo"
    backend.close()
    assert backend.disk.flushes == 3  # close flushes


def test_plugin_size_argument(tmp_path):
    backend = PluginBackend(plugin_file(tmp_path, FULL), 3 * 4096)
    assert backend.size == 3 * 4096


def test_plugin_minimal_caps_and_emulated_zeroes(tmp_path):
    backend = PluginBackend(plugin_file(tmp_path, MINIMAL) + ":Tiny")
    caps = backend.caps
    assert not caps.flush and not caps.fua and not caps.trim
    assert caps.zero  # emulated with writes
    assert caps.multi_conn  # the class said so
    backend.write(0, b"\xff" * 8192)
    backend.write_zeroes(100, 5000, may_trim=True, fast=False)
    assert backend.read(0, 8192) == b"\xff" * 100 + bytes(5000) + b"\xff" * (8192 - 5100)
    with pytest.raises(BackendError) as info:
        backend.write_zeroes(0, 10, may_trim=True, fast=True)
    assert info.value.errno == c.ENOTSUP


def test_plugin_minimal_refuses_size(tmp_path):
    with pytest.raises(UserError, match="--size"):
        PluginBackend(plugin_file(tmp_path, MINIMAL), MiB)


def test_plugin_named_class_among_several(tmp_path):
    path = plugin_file(tmp_path, FULL + MINIMAL)
    assert PluginBackend(path + ":Tiny").size == 8192
    assert PluginBackend(path + ":Disk").size == 1 << 20


def test_plugin_helper_classes_without_read_write_are_ignored(tmp_path):
    source = "import collections\nclass Helper:\n    pass\nPoint = collections.namedtuple('Point', 'x y')\n" + MINIMAL
    assert PluginBackend(plugin_file(tmp_path, source)).name == "Tiny"


def test_plugin_read_of_wrong_length_or_type_is_eio(tmp_path):
    source = """
    class Bad:
        size = 4096
        def read(self, offset, length):
            return b"short" if offset == 0 else "text" * (length // 4)
        def write(self, offset, data):
            pass
    """
    backend = PluginBackend(plugin_file(tmp_path, source))
    for offset in (0, 8):
        with pytest.raises(BackendError) as info:
            backend.read(offset, 16)
        assert info.value.errno == c.EIO


@pytest.mark.parametrize(
    "source, spec_suffix, words",
    [
        (None, "", "does not exist"),
        ("def broken(:\n", "", "failed to import: SyntaxError"),
        ("raise RuntimeError('boom')\n", "", "failed to import: RuntimeError: boom"),
        ("import no_such_module_here\n", "", "ModuleNotFoundError"),
        ("x = 1\n", "", "0 disk classes"),
        (FULL + MINIMAL, "", "2 disk classes (Disk, Tiny)"),
        (FULL, ":Nope", "no class Nope"),
        ("Nope = 3\n", ":Nope", "no class Nope"),
        ("class Nope:\n    size = 1\n", ":Nope", "needs"),
        ("class D:\n    size = 0\n    read = write = lambda *a: None\n", "", "size is 0"),
        ("class D:\n    size = -4\n    read = write = lambda *a: None\n", "", "size is -4"),
        ("class D:\n    size = 'big'\n    read = write = lambda *a: None\n", "", "must be a number"),
        ("class D:\n    read = write = lambda *a: None\n", "", "has no size"),
        (
            "class D:\n    size = 1\n    def __init__(self): raise OSError('no')\n    read = write = lambda *a: None\n",
            "",
            "failed to start",
        ),
    ],
)
def test_plugin_errors_are_one_clear_line(tmp_path, source, spec_suffix, words):
    path = str(tmp_path / "missing.py") if source is None else plugin_file(tmp_path, source)
    with pytest.raises(UserError) as info:
        PluginBackend(path + spec_suffix)
    message = str(info.value)
    assert words in message
    assert "\n" not in message
    assert "Traceback" not in message


def test_example_mydisk(tmp_path):
    backend = open_backend("plugin", path=str(EXAMPLE))
    assert backend.size == 64 * MiB
    caps = backend.caps
    assert caps.flush and caps.fua and caps.trim and caps.zero
    data = os.urandom(3 * 4096 + 17)
    backend.write(4000, data)
    assert backend.read(4000, len(data)) == data
    assert backend.read(0, 4000) == bytes(4000)
    # Data at rest is not the data written.
    stored = b"".join(backend.disk.blocks.values())
    assert data[200:300] not in stored
    backend.trim(0, 8192)
    assert backend.read(0, 8192) == bytes(8192)
    assert backend.read(8192, 4000 + len(data) - 8192) == data[8192 - 4000 :]
    backend.write_zeroes(8192, 4096, may_trim=True, fast=False)
    assert backend.read(8192, 4096) == bytes(4096)
    assert len(backend.disk.blocks) == 1  # only the last partly written block is left
    backend.close()


def test_example_mydisk_takes_size():
    backend = open_backend("plugin", path=f"{EXAMPLE}:MyDisk", size=16 * MiB)
    assert backend.size == 16 * MiB


# --- file backend on a block device (root: a loop device stands in for /dev/sdX or /dev/nbdN) -------


@pytest.fixture
def loop_device(tmp_path):
    require_root()
    require_tool("losetup")
    image = tmp_path / "loop.img"
    image.write_bytes(b"\x42" * (4 * MiB))
    device = subprocess.run(
        ["losetup", "-f", "--show", str(image)], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True, timeout=30)


def test_file_backend_on_a_block_device(loop_device):
    with pytest.raises(UserError, match="block device"):
        FileBackend(loop_device, 8 * MiB)  # a block device has its own size
    disk = FileBackend(loop_device)
    try:
        assert disk.is_block_device
        assert disk.size == 4 * MiB
        assert not disk.caps.extents  # no SEEK_HOLE on block devices: report all as data
        assert disk.read(0, 4) == b"\x42" * 4
        data = os.urandom(8192)
        disk.write(MiB, data, fua=True)
        disk.flush()
        assert disk.read(MiB, 8192) == data
        disk.write_zeroes(2 * MiB, MiB, may_trim=False, fast=False)
        assert disk.read(2 * MiB, MiB) == bytes(MiB)
        disk.trim(3 * MiB, MiB)  # advisory; must not fail
        assert disk.read(MiB - 1, 1) == b"\x42"
        assert "block device" in disk.describe()
    finally:
        disk.close()
