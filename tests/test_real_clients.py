"""Real NBD clients (libnbd's nbdinfo/nbdcopy, qemu-img, qemu-io, fio) against a `buselab` subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from helpers import require_tool

MiB = 1 << 20


def run(*args: str, timeout: float = 60, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args[0]} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def nbdinfo_json(uri: str) -> dict:
    require_tool("nbdinfo")
    data = json.loads(run("nbdinfo", "--json", uri).stdout)
    (export,) = data["exports"]
    export["structured"] = data["structured"]
    return export


def nbd_map(uri: str) -> list[tuple[int, int, int]]:
    require_tool("nbdinfo")
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(run("nbdinfo", "--map", "--json", uri).stdout)]


def qemu_io(uri: str, *commands: str, check: bool = True) -> subprocess.CompletedProcess:
    require_tool("qemu-io")
    args = ["qemu-io", "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    return run(*args, uri, check=check)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


HOLE, DATA = 3, 0


# --- nbdinfo ----------------------------------------------------------------------------------


def test_nbdinfo_ram(buselab_server):
    served = buselab_server(["ram", "--size", "64M"])
    info = nbdinfo_json(served.uri)
    assert info["export-size"] == 64 * MiB
    assert info["structured"] is True
    assert "base:allocation" in info["contexts"]
    assert info["is_read_only"] is False
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_multi_conn", "can_cache"):
        assert info[flag] is True, flag
    assert info["is_rotational"] is False
    assert (info["block_size_minimum"], info["block_size_preferred"], info["block_size_maximum"]) == (1, 4096, 32 * MiB)
    assert info["description"].startswith("buselab")
    # A client that really sends FLUSH gets it answered.
    assert run("nbdinfo", "--can", "flush", served.uri, check=False).returncode == 0


def test_nbdinfo_read_only(buselab_server):
    served = buselab_server(["ram", "--size", "1M", "--readonly"])
    info = nbdinfo_json(served.uri)
    assert info["is_read_only"] is True
    assert info["can_trim"] is False
    assert info["can_zero"] is False
    assert info["export-size"] == MiB
    assert run("nbdinfo", "--is", "readonly", served.uri, check=False).returncode == 0


def test_nbdinfo_sizes_and_export_name(buselab_server):
    served = buselab_server(["ram", "--size", "1T", "--export-name", "big"])
    require_tool("nbdinfo")
    assert run("nbdinfo", "--size", served.uri).stdout.strip() == str(1 << 40)
    listed = run("nbdinfo", "--list", "--json", served.uri).stdout
    assert [e["export-name"] for e in json.loads(listed)["exports"]] == ["big"]


def test_nbdinfo_plugin_caps(buselab_server, tmp_path):
    plugin = tmp_path / "tiny.py"
    plugin.write_text(
        "class Tiny:\n    size = 1 << 20\n    def __init__(self):\n        self.d = bytearray(self.size)\n"
        "    def read(self, o, n):\n        return bytes(self.d[o:o+n])\n"
        "    def write(self, o, b):\n        self.d[o:o+len(b)] = b\n"
    )
    info = nbdinfo_json(buselab_server(["plugin", str(plugin)]).uri)
    assert info["export-size"] == MiB
    assert info["can_flush"] is False
    assert info["can_fua"] is False
    assert info["can_trim"] is False
    assert info["can_multi_conn"] is False


# --- nbdcopy and qemu-img --------------------------------------------------------------------------


def test_nbdcopy_64_mib_in_and_out(buselab_server, tmp_path):
    require_tool("nbdcopy")
    served = buselab_server(["ram", "--size", "64M"])
    source = tmp_path / "in.img"
    source.write_bytes(os.urandom(64 * MiB))
    run("nbdcopy", str(source), served.uri, timeout=120)
    out = tmp_path / "out.img"
    run("nbdcopy", served.uri, str(out), timeout=120)
    assert out.stat().st_size == 64 * MiB
    assert sha256(out) == sha256(source)


def test_nbdcopy_keeps_holes_and_data(buselab_server, tmp_path):
    # nbdcopy trusts BLOCK_STATUS to skip holes: a wrong hole would lose data here.
    require_tool("nbdcopy")
    served = buselab_server(["ram", "--size", "32M"])
    qemu_io(served.uri, "write -P 0x11 0 4k", "write -P 0x22 5M 1M", "write -P 0x33 31M 1M")
    out = tmp_path / "out.img"
    run("nbdcopy", served.uri, str(out), timeout=60)
    raw = out.read_bytes()
    assert raw[:4096] == b"\x11" * 4096
    assert raw[5 * MiB : 6 * MiB] == b"\x22" * MiB
    assert raw[31 * MiB :] == b"\x33" * MiB
    assert raw[4096 : 5 * MiB] == bytes(5 * MiB - 4096)


def test_qemu_img_compare(buselab_server, tmp_path):
    require_tool("qemu-img", "nbdcopy")
    served = buselab_server(["ram", "--size", "16M"])
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(16 * MiB))
    run("nbdcopy", str(image), served.uri)
    same = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), served.uri, check=False)
    assert same.returncode == 0, same.stdout + same.stderr
    assert "identical" in same.stdout
    with open(image, "r+b") as f:
        f.seek(12345678)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    differ = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), served.uri, check=False)
    assert differ.returncode == 1
    assert "mismatch" in differ.stdout.lower()


def test_qemu_img_convert_to_file_backend(buselab_server, tmp_path):
    require_tool("qemu-img")
    disk = tmp_path / "backing.img"
    served = buselab_server(["file", str(disk), "--size", "8M"])
    source = tmp_path / "src.img"
    source.write_bytes(os.urandom(8 * MiB))
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), served.uri)
    assert run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), served.uri, check=False).returncode == 0
    assert "buselab: serving" in served.output()  # signal handlers are in place (see test_cli)
    assert served.stop() == 0
    assert sha256(disk) == sha256(source)


# --- qemu-io -------------------------------------------------------------------------------------


def test_qemu_io_patterns_discard_and_zero(buselab_server):
    served = buselab_server(["ram", "--size", "16M"])
    out = qemu_io(
        served.uri,
        "write -P 0xab 0 1M",
        "write -P 0xcd 1M 64k",
        "aio_write -P 0xef 4M 4k",
        "aio_flush",
        "read -P 0xab 0 1M",
        "read -P 0xcd 1M 64k",
        "read -P 0xef 4M 4k",
        "discard 0 64k",
        "read -P 0 0 64k",
        "read -P 0xab 64k 960k",
        "write -z 1M 4k",
        "read -P 0 1M 4k",
        "read -P 0xcd 1028k 60k",
        "write -z -u 4M 4k",
        "read -P 0 4M 4k",
        "write -f -P 0x77 8M 4k",
        "flush",
        "read -P 0x77 8M 4k",
    ).stdout
    assert "verification failed" not in out.lower()
    assert "error" not in out.lower()
    assert out.count("read ") == 9


def test_qemu_io_pattern_check_can_fail(buselab_server):
    # The pattern checks above mean something: a wrong pattern is reported.
    served = buselab_server(["ram", "--size", "1M"])
    proc = qemu_io(served.uri, "write -P 0x01 0 4k", "read -P 0x02 0 4k", check=False)
    assert "Pattern verification failed" in proc.stdout


def test_qemu_io_read_only_write_fails(buselab_server):
    served = buselab_server(["ram", "--size", "1M", "--readonly"])
    proc = qemu_io(served.uri, "write -P 0x01 0 4k", check=False)
    assert proc.returncode != 0 or "failed" in (proc.stdout + proc.stderr).lower()
    assert "wrote 4096" not in proc.stdout


# --- block status via nbdinfo --map -----------------------------------------------------------------


def test_nbdinfo_map_after_writes_and_trims(buselab_server):
    served = buselab_server(["ram", "--size", "64M"])
    assert nbd_map(served.uri) == [(0, 64 * MiB, HOLE)]
    qemu_io(served.uri, "write -P 1 1M 64k", "write -P 2 10M 4k", "write -z 20M 1M")
    assert nbd_map(served.uri) == [
        (0, MiB, HOLE),
        (MiB, 64 * 1024, DATA),
        (MiB + 64 * 1024, 9 * MiB - 64 * 1024, HOLE),
        (10 * MiB, 4096, DATA),
        (10 * MiB + 4096, 10 * MiB - 4096, HOLE),
        (20 * MiB, MiB, DATA),  # write -z without -u is NO_HOLE: stays allocated
        (21 * MiB, 43 * MiB, HOLE),
    ]
    qemu_io(served.uri, "discard 1M 64k", "write -z -u 20M 1M")
    assert nbd_map(served.uri) == [
        (0, 10 * MiB, HOLE),
        (10 * MiB, 4096, DATA),
        (10 * MiB + 4096, 54 * MiB - 4096, HOLE),
    ]


def test_nbdinfo_map_on_a_sparse_file(buselab_server, tmp_path):
    disk = tmp_path / "sparse.img"
    served = buselab_server(["file", str(disk), "--size", "16M"])
    assert nbd_map(served.uri) == [(0, 16 * MiB, HOLE)]
    qemu_io(served.uri, "write -P 9 4M 1M")
    assert nbd_map(served.uri) == [(0, 4 * MiB, HOLE), (4 * MiB, MiB, DATA), (5 * MiB, 11 * MiB, HOLE)]
    qemu_io(served.uri, "discard 4M 1M")
    assert nbd_map(served.uri) == [(0, 16 * MiB, HOLE)]


# --- fio ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rw", ["randwrite", "write"])
def test_fio_verify_crc32c_two_connections_iodepth_16(buselab_server, tmp_path, rw):
    require_tool("fio")
    served = buselab_server(["ram", "--size", "32M"])
    report = tmp_path / "fio.json"
    run(
        "fio",
        "--name=verify",
        "--ioengine=nbd",
        f"--uri={served.uri}",
        f"--rw={rw}",
        "--bs=4k" if rw == "randwrite" else "--bs=256k",
        "--size=16M",
        "--offset_increment=16M",  # job k owns [16M*k, 16M*(k+1))
        "--numjobs=2",  # one NBD connection per job
        "--iodepth=16",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--do_verify=1",
        "--verify_state_save=0",  # no *.state files left in the working directory
        "--output-format=json",
        f"--output={report}",
        timeout=120,
        cwd=tmp_path,
    )
    jobs = json.loads(report.read_text())["jobs"]
    assert len(jobs) == 2
    for job in jobs:
        assert job["error"] == 0
        assert job["write"]["io_bytes"] == 16 * MiB
        assert job["read"]["io_bytes"] == 16 * MiB  # the verify pass read everything back
    # Both regions really hold data now.
    assert nbd_map(served.uri) == [(0, 32 * MiB, DATA)]


# --- the README's plugin example -----------------------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "mydisk.py"


def test_example_plugin_with_real_clients(buselab_server):
    served = buselab_server(["plugin", str(EXAMPLE)])
    info = nbdinfo_json(served.uri)
    assert info["export-size"] == 64 * MiB
    assert info["can_flush"] is True and info["can_trim"] is True and info["can_zero"] is True
    out = qemu_io(
        served.uri,
        "write -P 0x3c 1000 100k",
        "read -P 0x3c 1000 100k",
        "discard 0 64k",
        "read -P 0 0 64k",
        "read -P 0x3c 64k 37864",  # up to 1000 + 100k
        "write -z 1M 8k",
        "read -P 0 1M 8k",
        "flush",
    ).stdout
    assert "verification failed" not in out.lower()
