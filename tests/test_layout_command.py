"""`buselab layout TARGET`: an image file, and the same image over NBD from a buselab subprocess."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import require_tool

from buselab.cli import main


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    require_tool("mkfs.ext4", "dumpe2fs")
    root = tmp_path_factory.mktemp("layout")
    src = root / "src"
    (src / "dir").mkdir(parents=True)
    (src / "hello.txt").write_text("hello\n")
    (src / "dir" / "data.bin").write_bytes(bytes(range(256)) * 400)
    path = root / "disk.img"
    run("mkfs.ext4", "-q", "-F", "-b", "1024", "-d", str(src), str(path), "64M")
    return path


def layout(capfd, *args: str) -> tuple[int, str, str]:
    code = main(["layout", *args])
    out, err = capfd.readouterr()
    return code, out, err


def dumpe2fs_groups(path: Path) -> list[dict]:
    text = run("dumpe2fs", str(path))
    groups = []
    for chunk in re.split(r"\n(?=Group \d+:)", text)[1:]:
        g = {"group": int(re.match(r"Group (\d+)", chunk).group(1))}
        g["blocks"] = tuple(int(x) for x in re.search(r"\(Blocks (\d+)-(\d+)\)", chunk).groups())
        if m := re.search(r"Backup superblock at (\d+)", chunk):
            g["backup"] = int(m.group(1))
        g["inode_table"] = tuple(int(x) for x in re.search(r"Inode table at (\d+)-(\d+)", chunk).groups())
        groups.append(g)
    return groups


def test_text_lists_each_group_where_dumpe2fs_says(capfd, image):
    code, out, err = layout(capfd, str(image))
    assert code == 0 and err == ""
    sections = re.split(r"\n(?=  group \d+:)", out)
    by_group = {int(re.match(r"  group (\d+):", s).group(1)): s for s in sections[1:]}
    groups = dumpe2fs_groups(image)
    assert sorted(by_group) == [g["group"] for g in groups]
    for g in groups:
        section = by_group[g["group"]]
        first, last = g["blocks"]
        assert section.startswith(f"  group {g['group']}: blocks {first}-{last}, offset {first * 1024}")
        a, b = g["inode_table"]
        assert re.search(rf"inode table( \(in group \d+\))?\s+blocks {a}-{b}\s+offset {a * 1024}\s", section), section
        if "backup" in g:
            assert re.search(rf"superblock \(backup\)\s+block {g['backup']}\s+offset {g['backup'] * 1024}\s", section)
        elif g["group"]:
            assert "superblock" not in section
    assert "superblock (primary)" in by_group[0]
    assert re.search(r"journal: inode 8, 4\.0 MiB", out)
    assert re.search(r"inode \d+\s+file\s+6 B\s+/hello\.txt\s+block \d+", out)


def test_json_keys(capfd, image):
    code, out, _ = layout(capfd, str(image), "--json")
    assert code == 0
    doc = json.loads(out)
    assert set(doc) == {"target", "size", "table", "table_info", "partitions", "filesystems", "regions", "notes"}
    assert doc["target"] == str(image) and doc["size"] == image.stat().st_size and doc["table"] is None
    (fs,) = doc["filesystems"]
    assert set(fs) == {"type", "offset", "size", "block_size", "partition", "info", "groups", "files", "notes"}
    assert fs["type"] == "ext4" and fs["block_size"] == 1024 and fs["offset"] == 0
    assert {"groups", "inodes_per_group", "features", "journal", "uuid"} <= set(fs["info"])
    group = fs["groups"][1]
    assert {"group", "first_block", "last_block", "superblock", "block_bitmap", "inode_table", "free_blocks"} <= set(
        group
    )
    hello = next(f for f in fs["files"] if f["path"] == "/hello.txt")
    assert set(hello) == {"inode", "path", "type", "size", "extents", "tree_blocks"} and hello["size"] == 6
    pos = 0
    for region in doc["regions"]:
        assert {"offset", "length", "kind", "label"} <= set(region)
        assert region["offset"] == pos
        pos += region["length"]
    assert pos == doc["size"]
    logical, physical, count = hello["extents"][0]
    at = next(r for r in doc["regions"] if r["offset"] <= physical * 1024 < r["offset"] + r["length"])
    assert at["label"] == f"file data (inode {hello['inode']}, /hello.txt)" and at["inode"] == hello["inode"]


def test_regions_and_files_options(capfd, image):
    code, out, _ = layout(capfd, str(image), "--regions", "--files", "-1")
    assert code == 0
    assert re.search(r"^\s+1024-2047\s+1\.0 KiB\s+superblock\s+ext4 superblock \(primary\)$", out, re.M)
    assert "/dir/data.bin" in out and "files: " in out and "(--files N)" not in out
    code, out, _ = layout(capfd, str(image), "--files", "1")
    assert "the first 1 shown (--files N)" in out


def test_over_nbd_the_same_map(capfd, image, buselab_server):
    code, out, _ = layout(capfd, str(image), "--json")
    local = json.loads(out)
    served = buselab_server(["file", str(image), "--readonly", "--export-name", "disk"])
    code, out, err = layout(capfd, f"nbd+unix:///disk?socket={served.socket}", "--json")
    assert code == 0, err
    remote = json.loads(out)
    assert remote.pop("target").startswith("nbd+unix:///disk")
    local.pop("target")
    assert remote == local


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_over_nbd_tcp(capfd, image, buselab_server):
    port = free_port()
    buselab_server(["file", str(image), "--readonly", "--listen", f"127.0.0.1:{port}"])
    code, out, err = layout(capfd, f"nbd://127.0.0.1:{port}/")
    assert code == 0, err
    assert out.startswith(f"nbd://127.0.0.1:{port}/: 64.0 MiB")
    assert "  group 7: blocks 57345-65535" in out


@pytest.mark.parametrize(
    "target,code,message",
    [
        ("{tmp}/missing.img", 2, "{tmp}/missing.img: no such file or device"),
        ("{tmp}", 2, "is a directory"),
        ("{tmp}/blank.img", 1, "holds no partition table or file system that buselab knows"),
        ("{tmp}/empty.img", 2, "is empty"),
        ("nbd+unix:///?socket={tmp}/nobody.sock", 2, "cannot reach nbd+unix:///?socket="),
        ("nbd+unix:///", 2, "needs ?socket=PATH"),
        ("nbd://127.0.0.1:1/", 2, "cannot reach nbd://127.0.0.1:1/: Connection refused"),
        ("nbds://example/", 2, "TLS (nbds) is not supported"),
        ("http://example/", 2, "not an NBD URI"),
    ],
)
def test_errors_are_one_line(capfd, tmp_path, target, code, message):
    (tmp_path / "blank.img").write_bytes(bytes(1 << 20))
    (tmp_path / "empty.img").write_bytes(b"")
    got, out, err = layout(capfd, target.format(tmp=tmp_path))
    assert got == code
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("buselab: error: ")
    assert message.format(tmp=tmp_path) in lines[0]


def test_a_closed_pipe_is_not_an_error(image):
    proc = subprocess.run(
        f"{sys.executable} -m buselab layout --regions {image} | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.startswith(f"{image}: 64.0 MiB")
    assert proc.stderr == ""


def test_gpt_disk_text(capfd, tmp_path):
    require_tool("sgdisk", "mkfs.ext4")
    disk = tmp_path / "gpt.img"
    with open(disk, "wb") as f:
        f.truncate(48 << 20)
    run("sgdisk", "-n", "1:2048:+20M", "-t", "1:8300", "-c", "1:data", str(disk))
    run("mkfs.ext4", "-q", "-F", "-E", f"offset={2048 * 512}", str(disk), "20M")
    code, out, _ = layout(capfd, str(disk))
    assert code == 0
    assert "GPT partition table (sector size 512, disk GUID " in out
    assert re.search(r"GPT header \(primary\)\s+sector 1\s+offset 512\s", out)
    assert 'partition 1 "data": Linux filesystem, offset 1048576 (1.0 MiB), 20.0 MiB, holds ext4' in out
    assert "partition 1: ext4, 20.0 MiB at offset 1048576" in out


def test_fat_text_where_fsck_fat_says(capfd, tmp_path):
    require_tool("mkfs.vfat", "fsck.fat", "mcopy")
    image = tmp_path / "fat.img"
    run("mkfs.vfat", "-C", str(image), "32768")
    (tmp_path / "note.txt").write_text("note\n")
    run("mcopy", "-i", str(image), str(tmp_path / "note.txt"), "::/note.txt")
    report = run("fsck.fat", "-v", "-n", str(image))
    fat_sector = int(re.search(r"First FAT starts at byte \d+ \(sector (\d+)\)", report).group(1))
    fat_sectors = int(re.search(r"bytes per FAT \(= (\d+) sectors\)", report).group(1))
    data_sector = int(re.search(r"Data area starts at byte \d+ \(sector (\d+)\)", report).group(1))
    code, out, _ = layout(capfd, str(image))
    assert code == 0
    assert "vfat (FAT16), 32.0 MiB at offset 0" in out
    first, last = fat_sector, fat_sector + fat_sectors - 1
    assert re.search(rf"vfat FAT #1\s+sectors {first}-{last}\s+offset {first * 512}\s", out), out
    assert re.search(rf"data area \(cluster 2 on\)\s+sector {data_sector} on\s", out)
    assert re.search(r"file\s+5 B\s+/note\.txt\s+cluster \d+$", out, re.M)
