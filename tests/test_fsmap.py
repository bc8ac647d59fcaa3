"""buselab.fsmap against the tools that made the disks: mkfs.ext4 / dumpe2fs / debugfs, sgdisk, sfdisk,
mkfs.vfat / fsck.fat / mtools. No mocks: every expected location comes from one of those tools.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from helpers import require_root, require_tool

from buselab.fsmap import KINDS, FsMap, Label, Limits, RefreshTimer, build_map
from buselab.fsmap.jbd2 import JournalArea, describe_blocks, descriptor_tags

# --- making disks and asking the tools about them ----------------------------------------------


def run(*cmd: str, **kw) -> str:
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, **kw).stdout


def fill_source(root: Path) -> Path:
    """A directory tree for mkfs.ext4 -d: small files, a subdirectory, a big file and a sparse one."""
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "hello.txt").write_text("hello\n")
    (root / "dir" / "big.bin").write_bytes(random.Random(1).randbytes(300_000))
    for i in range(30):
        (root / "dir" / "sub" / f"f{i}.txt").write_text(f"file {i}\n")
    with open(root / "sparse.bin", "wb") as f:  # every other 4 KiB written: more extents than i_block holds
        for i in range(0, 40, 2):
            f.seek(i * 4096)
            f.write(random.Random(i).randbytes(4096))
    return root


def mkfs_ext(tmp: Path, name: str, size: str, *options: str, source: Path | None = None) -> Path:
    require_tool("mkfs.ext4", "dumpe2fs", "debugfs")
    image = tmp / f"{name}.img"
    args = ["mkfs.ext4", "-q", "-F", *options]
    if source is not None:
        args += ["-d", str(source)]
    run(*args, str(image), size)
    return image


def image_map(image: Path, **kw) -> FsMap:
    fd = os.open(image, os.O_RDONLY)
    try:
        return build_map(lambda offset, length: os.pread(fd, length, offset), os.fstat(fd).st_size, **kw)
    finally:
        os.close(fd)


def dumpe2fs(image: Path) -> tuple[dict[str, str], list[dict]]:
    """dumpe2fs's header fields and, per group, where it says each structure is."""
    text = run("dumpe2fs", str(image), stderr=subprocess.DEVNULL)
    header: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            header[key.strip()] = value.strip()
    groups = []
    for chunk in re.split(r"\n(?=Group \d+:)", text)[1:]:
        g: dict = {"group": int(re.match(r"Group (\d+)", chunk).group(1))}
        first, last = re.search(r"\(Blocks (\d+)-(\d+)\)", chunk).groups()
        g["blocks"] = (int(first), int(last))
        if m := re.search(r"(Primary|Backup) superblock at (\d+)", chunk):
            g["superblock"] = int(m.group(2))
        if m := re.search(r"Group descriptors? at (\d+)(?:-(\d+))?", chunk):
            g["gdt"] = (int(m.group(1)), int(m.group(2) or m.group(1)))
        if m := re.search(r"Reserved GDT blocks at (\d+)-(\d+)", chunk):
            g["reserved"] = (int(m.group(1)), int(m.group(2)))
        g["block_bitmap"] = int(re.search(r"Block bitmap at (\d+)", chunk).group(1))
        g["inode_bitmap"] = int(re.search(r"Inode bitmap at (\d+)", chunk).group(1))
        a, b = re.search(r"Inode table at (\d+)-(\d+)", chunk).groups()
        g["inode_table"] = (int(a), int(b))
        free = re.search(r"Free blocks: ?(.*)", chunk).group(1).strip()
        g["free"] = [_range(part) for part in free.split(", ") if part]
        groups.append(g)
    return header, groups


def _range(text: str) -> tuple[int, int]:
    a, _, b = text.partition("-")
    return int(a), int(b or a)


def debugfs_stat(image: Path, what: str) -> tuple[int, dict[str, list[tuple[int, int]]]]:
    """(inode, {"data": [(first, last)], "tree": [(block, block)]}) from `debugfs -R "stat PATH"`."""
    text = run("debugfs", "-R", f"stat {what}", str(image), stderr=subprocess.DEVNULL)
    ino = int(re.search(r"Inode: (\d+)", text).group(1))
    body = text.split("EXTENTS:\n", 1)[-1] if "EXTENTS:" in text else text.split("BLOCKS:\n", 1)[-1]
    out: dict[str, list[tuple[int, int]]] = {"data": [], "tree": []}
    for key, value in re.findall(r"\(([^)]*)\):(\d+(?:-\d+)?)", body):
        (out["tree"] if not key[0].isdigit() else out["data"]).append(_range(value))
    return ino, out


def block_size(header: dict[str, str]) -> int:
    return int(header["Block size"])


def label_at(fsmap: FsMap, block: int, bs: int) -> Label:
    return fsmap.label(block * bs, bs)


# --- ext2/3/4 against dumpe2fs -------------------------------------------------------------------

EXT_VARIANTS = {
    "ext4-1k-flex": ("256M", ["-b", "1024"]),
    "ext4-4k": ("128M", ["-b", "4096", "-g", "4096"]),
    "ext4-no-flex": ("64M", ["-b", "1024", "-O", "^flex_bg"]),
    "ext4-32bit-desc": ("64M", ["-b", "1024", "-O", "^64bit"]),
    "ext4-meta-bg": ("256M", ["-b", "1024", "-O", "meta_bg,^resize_inode"]),
    "ext4-sparse-super2": ("64M", ["-b", "1024", "-O", "sparse_super2", "-E", "num_backup_sb=2"]),
    "ext4-no-sparse-super": ("32M", ["-b", "1024", "-O", "^sparse_super,^resize_inode"]),
    "ext3": ("64M", ["-t", "ext3", "-b", "1024"]),
    "ext2": ("64M", ["-t", "ext2", "-b", "1024"]),
}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return fill_source(tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module", params=sorted(EXT_VARIANTS))
def ext_image(request, tmp_path_factory, source):
    size, options = EXT_VARIANTS[request.param]
    image = mkfs_ext(tmp_path_factory.mktemp(request.param), request.param, size, *options, source=source)
    header, groups = dumpe2fs(image)
    return request.param, image, header, groups, image_map(image)


def test_superblocks_where_dumpe2fs_says(ext_image):
    name, _, header, groups, fsmap = ext_image
    kind = "ext2" if name == "ext2" else "ext3" if name == "ext3" else "ext4"
    bs = block_size(header)
    assert fsmap.label(1024, 1024) == Label(f"{kind} superblock (primary)", "superblock")
    expected = {g["group"]: g["superblock"] for g in groups if "superblock" in g}
    found = {r.group: r.block for r in fsmap.regions if r.kind == "superblock"}
    assert found.keys() == expected.keys()
    for group, block in expected.items():
        if group:
            assert label_at(fsmap, block, bs) == Label(f"{kind} superblock backup, group {group}", "superblock")
    assert len(expected) > 1, "the image should have backups to compare"


def test_descriptors_and_reserved_gdt_where_dumpe2fs_says(ext_image):
    _, _, header, groups, fsmap = ext_image
    bs = block_size(header)
    seen = 0
    for g in groups:
        if "gdt" in g:
            for block in range(g["gdt"][0], g["gdt"][1] + 1):
                label = label_at(fsmap, block, bs)
                assert label.kind == "group-desc" and "group descriptors of group" in label.text, (g["group"], label)
                where = "(primary)" if g["group"] == 0 else f"backup in group {g['group']})"
                assert label.text.endswith(where) or "meta_bg" in label.text, label
                seen += 1
        if "reserved" in g:
            first, last = g["reserved"]
            for block in (first, last):
                label = label_at(fsmap, block, bs)
                assert label.kind == "group-desc" and "reserved GDT blocks" in label.text, label
    # Nothing else is labelled a descriptor
    mapped = sum(r.length // bs for r in fsmap.regions if r.kind == "group-desc" and "reserved" not in r.label)
    assert mapped == seen


def test_bitmaps_and_inode_tables_where_dumpe2fs_says(ext_image):
    name, _, header, groups, fsmap = ext_image
    kind = "ext2" if name == "ext2" else "ext3" if name == "ext3" else "ext4"
    bs = block_size(header)
    for g in groups:
        n = g["group"]
        assert label_at(fsmap, g["block_bitmap"], bs) == Label(f"{kind} group {n} block bitmap", "bitmap")
        assert label_at(fsmap, g["inode_bitmap"], bs) == Label(f"{kind} group {n} inode bitmap", "bitmap")
        first, last = g["inode_table"]
        for block in (first, (first + last) // 2, last):
            assert label_at(fsmap, block, bs) == Label(f"{kind} group {n} inode table", "inode-table")
        region = fsmap.region_at(first * bs)
        assert (region.offset, region.end) == (first * bs, (last + 1) * bs)
    summary = {g["group"]: g for g in fsmap.filesystems[0].groups}
    for g in groups:
        assert summary[g["group"]]["inode_table"] == list(g["inode_table"])
        assert summary[g["group"]]["first_block"] == g["blocks"][0]


def test_free_blocks_are_what_dumpe2fs_lists(ext_image):
    _, _, header, groups, fsmap = ext_image
    bs = block_size(header)
    expected = set()
    for g in groups:
        for a, b in g["free"]:
            expected.update(range(a, b + 1))
    found = set()
    for r in fsmap.regions:
        if r.kind == "free":
            found.update(range(r.offset // bs, r.end // bs))
    assert found == expected


def test_files_and_directories_are_labelled_with_inode_and_path(ext_image):
    name, image, header, _, fsmap = ext_image
    bs = block_size(header)
    ino, blocks = debugfs_stat(image, "/hello.txt")
    assert label_at(fsmap, blocks["data"][0][0], bs) == Label(f"file data (inode {ino}, /hello.txt)", "data")
    ino, blocks = debugfs_stat(image, "/dir/big.bin")
    for first, last in blocks["data"]:
        for block in (first, last):
            assert label_at(fsmap, block, bs) == Label(f"file data (inode {ino}, /dir/big.bin)", "data")
    tree = "indirect block" if name in ("ext2", "ext3") else "extent tree"
    for first, _ in blocks["tree"]:
        assert label_at(fsmap, first, bs).kind == "extent-tree"
        assert f"{tree} (inode {ino}, /dir/big.bin)" in label_at(fsmap, first, bs).text
    kind = "ext2" if name == "ext2" else "ext3" if name == "ext3" else "ext4"
    for path in ("/", "/dir", "/dir/sub"):
        ino, blocks = debugfs_stat(image, path)
        first = blocks["data"][0][0]
        assert label_at(fsmap, first, bs) == Label(f"{kind} directory (inode {ino}, {path})", "directory")
    ino, blocks = debugfs_stat(image, "/dir/sub/f17.txt")
    assert label_at(fsmap, blocks["data"][0][0], bs).text == f"file data (inode {ino}, /dir/sub/f17.txt)"


def test_sparse_file_extent_tree_block(ext_image):
    name, image, header, _, fsmap = ext_image
    bs = block_size(header)
    ino, blocks = debugfs_stat(image, "/sparse.bin")
    assert blocks["tree"], "twenty extents do not fit in the inode: debugfs should show a tree block"
    for first, _ in blocks["tree"]:
        label = label_at(fsmap, first, bs)
        assert label.kind == "extent-tree" and f"(inode {ino}, /sparse.bin)" in label.text, label
    data_blocks = {b for a, z in blocks["data"] for b in range(a, z + 1)}
    mapped = {
        b for r in fsmap.regions if r.inode == ino and r.kind == "data" for b in range(r.offset // bs, r.end // bs)
    }
    assert mapped == data_blocks


def test_journal_where_debugfs_says(ext_image):
    name, image, header, _, fsmap = ext_image
    if name == "ext2":
        assert not any(r.kind == "journal" for r in fsmap.regions)
        return
    bs = block_size(header)
    ino, blocks = debugfs_stat(image, "<8>")
    assert ino == 8
    first = blocks["data"][0][0]
    assert label_at(fsmap, first, bs) == Label("jbd2 superblock (v2), log empty, sequence 1", "journal")
    total = 0
    for a, b in blocks["data"]:
        for block in (a, b):
            assert label_at(fsmap, block, bs).kind == "journal"
        total += b - a + 1
    assert total == int(header["Total journal blocks"])
    journal = fsmap.filesystems[0].info["journal"]
    assert journal["blocks"] == total and journal["start"] == 0


def test_the_whole_file_system_is_covered(ext_image):
    _, _, header, _, fsmap = ext_image
    bs = block_size(header)
    blocks = int(header["Block count"])
    pos = 0
    for r in fsmap.regions:
        assert r.offset == pos, f"a gap before {r}"
        assert r.kind in KINDS
        pos = r.end
    assert pos == blocks * bs
    unmapped = [r for r in fsmap.regions if r.kind == "unknown"]
    assert unmapped == [], unmapped[:3]  # every used block has an owner on a freshly made file system
    assert fsmap.notes == []


# --- speed ---------------------------------------------------------------------------------------------


def test_lookup_and_parse_are_fast(tmp_path, source):
    image = mkfs_ext(tmp_path, "big", "2G", "-b", "1024", source=source)  # 256 groups
    started = time.perf_counter()
    fsmap = image_map(image)
    built = time.perf_counter() - started
    assert fsmap.filesystems[0].info["groups"] == 256
    rnd = random.Random(7)
    requests = [
        (rnd.randrange(0, fsmap.size - (1 << 17)), rnd.choice((512, 4096, 65536, 131072))) for _ in range(20000)
    ]
    label = fsmap.label
    started = time.perf_counter()
    for offset, length in requests:
        label(offset, length)
    per_lookup = (time.perf_counter() - started) / len(requests)
    print(
        f"2 GiB ext4, 256 groups: built in {built * 1e3:.0f} ms, {len(fsmap.regions)} regions, {per_lookup * 1e6:.2f} µs a lookup"
    )
    assert per_lookup < 10e-6
    assert built < 2.0


def test_a_256m_ext4_parses_in_well_under_a_second(tmp_path, source):
    image = mkfs_ext(tmp_path, "e256", "256M", source=source)
    started = time.perf_counter()
    image_map(image, scan_journal=True)
    assert time.perf_counter() - started < 0.5


# --- a journal with transactions: mount, write, sync, read the image as it is ------------------------


def _mount_and_write(image: Path, mnt: Path) -> None:
    run("mount", "-o", "loop", str(image), str(mnt))
    try:
        (mnt / "d").mkdir()
        for i in range(12):
            (mnt / "d" / f"f{i}").write_text(f"{i}\n" * (i + 1))
            run("sync")
        for i in range(0, 12, 3):
            (mnt / "d" / f"f{i}").unlink()
        run("sync")
        (mnt / "gone").mkdir()
        for i in range(40):
            (mnt / "gone" / f"a-rather-long-file-name-{i:04}").write_text("x")
        run("sync")
        shutil.rmtree(mnt / "gone")  # frees the journalled directory blocks: a revoke record
        run("sync")
        shutil.copyfile(image, image.with_suffix(".copy"))  # the journal as it is, before unmount checkpoints it
    finally:
        run("umount", str(mnt))


def logdump(image: Path) -> list[tuple[str, int, int, int | None]]:
    """(what, sequence, journal block, fs block) of every block `debugfs logdump` finds in the live log."""
    text = run("debugfs", "-R", "logdump -a", str(image), stderr=subprocess.DEVNULL)
    found = []
    sequence = None
    names = {1: "descriptor", 2: "commit", 5: "revoke"}
    for line in text.splitlines():
        if m := re.search(r"Found expected sequence (\d+), type (\d+) .* at block (\d+)", line):
            sequence = int(m.group(1))
            found.append((names[int(m.group(2))], sequence, int(m.group(3)), None))
        elif m := re.search(r"FS block (\d+) logged at journal block (\d+)", line):
            found.append(("logged", sequence, int(m.group(2)), int(m.group(1))))
    return found


@pytest.mark.root
@pytest.mark.parametrize("options", [["-t", "ext4"], ["-t", "ext3"], ["-t", "ext4", "-O", "^metadata_csum"]])
def test_jbd2_blocks_decoded_as_logdump_finds_them(tmp_path, options):
    require_root()
    require_tool("mount", "losetup", "debugfs")
    image = mkfs_ext(tmp_path, "j", "32M", "-b", "4096", *options)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _mount_and_write(image, mnt)
    copy = image.with_suffix(".copy")
    expected = logdump(copy)
    kinds = {what for what, *_ in expected}
    assert kinds == {"descriptor", "commit", "logged", "revoke"}, expected[:5]
    _, blocks = debugfs_stat(copy, "<8>")
    bs = block_size(dumpe2fs(copy)[0])

    def disk_block(journal_block: int) -> int:
        n = journal_block
        for first, last in blocks["data"]:
            if n <= last - first:
                return first + n
            n -= last - first + 1
        raise AssertionError(journal_block)

    scanned = image_map(copy, scan_journal=True)
    plain = image_map(copy)
    in_place = image_map(copy, replay_journal=False)
    data = copy.read_bytes()
    for what, sequence, jblock, target in expected:
        offset = disk_block(jblock) * bs
        label = scanned.label(offset, bs)
        assert label.kind == "journal"
        if what == "logged":
            assert label.text.startswith(f"jbd2 logged copy of block {target} ("), label
            assert label.text.endswith(f", transaction {sequence}")
            continue
        assert label.text.startswith(f"jbd2 {what}, transaction {sequence}"), (what, sequence, label)
        # Without a scan, the request's own bytes say the same
        assert plain.label(offset, bs).text.endswith(" journal (inode 8)")
        decoded = plain.label(offset, bs, data[offset : offset + bs])
        assert decoded.text.startswith(f"jbd2 {what}, transaction {sequence}"), decoded
        # A commit changes what the replayed map shows; the other journal blocks do not
        assert plain.needs_refresh(offset, bs, data[offset : offset + bs]) == (what == "commit")
        assert plain.needs_refresh(offset, bs)  # without the bytes: maybe a commit
        assert not in_place.needs_refresh(offset, bs, data[offset : offset + bs])
    # One request holding a whole transaction: descriptor, its logged blocks, the commit
    descriptor = next(e for e in expected if e[0] == "descriptor")
    commit = next(e for e in expected if e[0] == "commit" and e[1] == descriptor[1])
    first, last = disk_block(descriptor[2]), disk_block(commit[2])
    if last > first:  # the transaction is contiguous on the disk
        whole = plain.label(first * bs, (last - first + 1) * bs, data[first * bs : (last + 1) * bs])
        logged = sum(1 for e in expected if e[0] == "logged" and e[1] == descriptor[1])
        assert whole.text == f"jbd2 descriptor, {logged} logged blocks, commit, transaction {descriptor[1]}"


def test_jbd2_decoder_on_hand_made_blocks():
    """Blocks built per journal.rst: a csum_v3 + 64bit descriptor with 3 tags, a commit, a revoke."""
    bs = 1024
    area = JournalArea(0, bs, [(0, 64 * bs, 0)], incompat=0x2 | 0x10, first=1, maxlen=64)
    magic = (0xC03B3998).to_bytes(4, "big")

    def block(blocktype: int, sequence: int, body: bytes = b"") -> bytes:
        raw = magic + blocktype.to_bytes(4, "big") + sequence.to_bytes(4, "big") + body
        return raw + bytes(bs - len(raw))

    tags = b""
    for target, flags in ((1000, 0), (1001, 2), (5 << 32 | 7, 2 | 8)):
        tags += (target & 0xFFFFFFFF).to_bytes(4, "big") + flags.to_bytes(4, "big")
        tags += (target >> 32).to_bytes(4, "big") + bytes(4)
        if not flags & 2:
            tags += bytes(16)  # the UUID follows a tag without SAME_UUID
    descriptor = block(1, 57, tags)
    assert descriptor_tags(area, descriptor) == [1000, 1001, 5 << 32 | 7]
    assert describe_blocks(area, bs, descriptor) == "jbd2 descriptor, transaction 57 (3 blocks)"
    assert describe_blocks(area, bs, block(2, 57)) == "jbd2 commit, transaction 57"
    revoke = block(5, 58, (16 + 2 * 8).to_bytes(4, "big") + (1).to_bytes(8, "big") + (2).to_bytes(8, "big"))
    assert describe_blocks(area, bs, revoke) == "jbd2 revoke, transaction 58 (2 blocks)"
    plain = bytes(bs)  # zeros: what mkfs writes over the journal
    assert describe_blocks(area, 5 * bs, plain) == "jbd2 unused block, journal block 5 (zeros)"
    logged = b"inode table copy".ljust(bs, b"\x01")  # a metadata block's copy, no jbd2 header
    assert describe_blocks(area, 5 * bs, logged) == "jbd2 logged block, journal block 5"
    whole = descriptor + plain * 3 + block(2, 57)
    assert describe_blocks(area, 10 * bs, whole) == "jbd2 descriptor, 3 logged blocks, commit, transaction 57"
    # A request that starts mid-block is decoded from the next block boundary
    assert describe_blocks(area, 10 * bs - 512, bytes(512) + block(2, 9)) == "jbd2 commit, transaction 9"


# --- recovery in memory: committed transactions not yet written in place ------------------------------


@pytest.mark.parametrize("revoke", [False, True], ids=["committed", "revoked"])
def test_replay_shows_what_e2fsck_recovery_would(tmp_path, source, revoke):
    """debugfs writes transactions into the journal (jo/jw/jc) without touching the blocks in place."""
    require_tool("e2fsck")
    image = mkfs_ext(tmp_path, "rp", "64M", "-b", "1024", source=source)
    ino, blocks = debugfs_stat(image, "/")
    root = blocks["data"][0][0]
    raw = image.read_bytes()[root * 1024 : (root + 1) * 1024]
    assert b"hello.txt" in raw
    (tmp_path / "renamed").write_bytes(raw.replace(b"hello.txt", b"howdy.txt"))
    (tmp_path / "bogus").write_bytes(raw.replace(b"hello.txt", b"bogus.txt"))
    (tmp_path / "empty").write_bytes(b"")
    commands = [f"jw -b {root} {tmp_path / 'renamed'}"]
    if revoke:
        commands.append(f"jw -r {root} {tmp_path / 'empty'}")
    commands.append(f"jw -b {root} {tmp_path / 'bogus'} -c")  # never committed: recovery ignores it
    script = "".join(f"jo\n{c}\njc\n" for c in commands)
    (tmp_path / "cmds").write_text(script)
    run("debugfs", "-w", "-f", str(tmp_path / "cmds"), str(image))
    hello, blocks = debugfs_stat(image, "/hello.txt")
    data_offset = blocks["data"][0][0] * 1024

    in_place = image_map(image, replay_journal=False)
    assert in_place.label(data_offset, 1).text == f"file data (inode {hello}, /hello.txt)"
    replayed = image_map(image)
    expected = "/hello.txt" if revoke else "/howdy.txt"
    assert replayed.label(data_offset, 1).text == f"file data (inode {hello}, {expected})"
    journal = replayed.filesystems[0].info["journal"]
    assert journal["replayed_transactions"] == (2 if revoke else 1)
    assert journal["replayed_blocks"] == (0 if revoke else 1)

    recovered = tmp_path / "recovered.img"
    shutil.copyfile(image, recovered)
    subprocess.run(["e2fsck", "-E", "journal_only", "-y", str(recovered)], capture_output=True, check=False)
    after = image_map(recovered)
    assert after.filesystems[0].info["needs_recovery"] is False

    def outside_journal(fsmap: FsMap) -> list:
        return [(r.offset, r.length, r.kind, r.label) for r in fsmap.regions if r.kind != "journal"]

    assert outside_journal(after) == outside_journal(replayed)


# --- refreshing --------------------------------------------------------------------------------------------


def test_needs_refresh_for_metadata_not_for_file_data(tmp_path, source):
    image = mkfs_ext(tmp_path, "r", "64M", "-b", "1024", source=source)
    header, groups = dumpe2fs(image)
    bs = block_size(header)
    fsmap = image_map(image)
    assert fsmap.needs_refresh(1024, 1024)  # superblock
    assert fsmap.needs_refresh(groups[3]["superblock"] * bs, bs)
    assert fsmap.needs_refresh(groups[0]["gdt"][0] * bs, bs)
    assert fsmap.needs_refresh(groups[2]["inode_table"][0] * bs + 512, 256)
    assert fsmap.needs_refresh(groups[1]["block_bitmap"] * bs, bs)
    _, blocks = debugfs_stat(image, "/dir")
    assert fsmap.needs_refresh(blocks["data"][0][0] * bs, bs)
    _, blocks = debugfs_stat(image, "/sparse.bin")
    assert fsmap.needs_refresh(blocks["tree"][0][0] * bs, bs)
    _, blocks = debugfs_stat(image, "/dir/big.bin")
    assert not fsmap.needs_refresh(blocks["data"][0][0] * bs, 4 * bs)
    free = next(r for r in fsmap.regions if r.kind == "free" and r.offset > 1 << 20)
    assert not fsmap.needs_refresh(free.offset, 4096)
    assert fsmap.needs_refresh(free.offset - 512, 4096) == fsmap.needs_refresh(free.offset - 512, 1)


def test_a_new_file_system_shows_after_a_refresh(tmp_path):
    require_tool("mkfs.ext4")
    image = tmp_path / "blank.img"
    image.write_bytes(bytes(16 << 20))
    empty = image_map(image)
    assert empty.filesystems == [] and empty.label(1 << 20, 4096).kind == "unknown"
    assert empty.needs_refresh(1024, 1024)  # where a superblock would appear
    assert empty.needs_refresh(0, 512)
    assert not empty.needs_refresh(1 << 20, 4096)
    run("mkfs.ext4", "-q", "-F", str(image))
    fresh = image_map(image)
    assert fresh.filesystems[0].type == "ext4" and fresh.label(1024, 1024).kind == "superblock"


def test_refresh_timer_waits_for_quiet_and_not_forever():
    timer = RefreshTimer(quiet=0.5, max_wait=3.0)
    assert not timer.due(0.0)
    timer.note(10.0)
    assert not timer.due(10.2)
    timer.note(10.4)
    assert not timer.due(10.8)
    assert timer.due(10.9)
    timer.done(10.9)
    assert not timer.pending and not timer.due(20.0)
    for t in range(30):  # a steady stream of metadata writes: still rebuilt by max_wait
        timer.note(20.0 + t * 0.1)
    assert timer.due(23.0)
    timer.note(23.5)
    timer.done(23.2)  # a write noted while the rebuild read the disk keeps it pending
    assert timer.pending


# --- damaged and odd disks ----------------------------------------------------------------------------------


def test_damaged_metadata_never_raises(tmp_path, source):
    image = mkfs_ext(tmp_path, "d", "16M", "-b", "1024", source=source)
    pristine = image.read_bytes()
    rnd = random.Random(14)
    for _ in range(150):
        raw = bytearray(pristine)
        for _ in range(rnd.randrange(1, 40)):
            at = rnd.randrange(0, 1 << 20)
            raw[at : at + 4] = rnd.randbytes(4)
        at = rnd.randrange(1024, 4096)  # and once in the superblock or the descriptors
        raw[at : at + 4] = rnd.randbytes(4)
        started = time.perf_counter()
        fsmap = build_map(lambda o, n, raw=raw: bytes(raw[o : o + n]), len(raw), scan_journal=True)
        assert time.perf_counter() - started < 5
        assert fsmap.label(1024, 1024).kind in KINDS


def test_a_superblock_that_claims_exabytes_costs_no_more_than_the_disk(tmp_path, source):
    image = mkfs_ext(tmp_path, "x", "16M", "-b", "1024", source=source)
    raw = bytearray(image.read_bytes())
    raw[1024 + 0x150 : 1024 + 0x154] = (1 << 28).to_bytes(4, "little")  # s_blocks_count_hi: 2**60 blocks
    started = time.perf_counter()
    fsmap = build_map(lambda o, n: bytes(raw[o : o + n]), len(raw))
    assert time.perf_counter() - started < 2
    assert fsmap.filesystems[0].info["groups"] > 1 << 40
    assert any("only groups 0-1 of" in note for note in fsmap.notes), fsmap.notes
    assert fsmap.label(1024, 1024).kind == "superblock"


def test_limits_bound_the_work_and_say_so(tmp_path, source):
    image = mkfs_ext(tmp_path, "l", "64M", "-b", "1024", source=source)
    fd = os.open(image, os.O_RDONLY)
    try:
        fsmap = build_map(
            lambda o, n: os.pread(fd, n, o), os.fstat(fd).st_size, limits=Limits(max_inodes=20, max_dirs=1)
        )
    finally:
        os.close(fd)
    assert any("limit" in note for note in fsmap.notes)
    assert fsmap.filesystems[0].info["inodes_mapped"] <= 20
    assert fsmap.label(1024, 1024).kind == "superblock"


def test_a_truncated_image_is_noted(tmp_path, source):
    image = mkfs_ext(tmp_path, "t", "64M", "-b", "1024", source=source)
    with open(image, "r+b") as f:
        f.truncate(40 << 20)
    fsmap = image_map(image)
    assert any("disk holds" in note for note in fsmap.notes)
    assert fsmap.regions[-1].end == 40 << 20


def test_bigalloc(tmp_path, source):
    image = mkfs_ext(tmp_path, "ba", "128M", "-b", "4096", "-O", "bigalloc", "-C", "16384", source=source)
    fsmap = image_map(image)
    ino, blocks = debugfs_stat(image, "/dir/big.bin")
    assert label_at(fsmap, blocks["data"][0][0], 4096).text == f"file data (inode {ino}, /dir/big.bin)"
    assert fsmap.filesystems[0].type == "ext4"


# --- partition tables ----------------------------------------------------------------------------------------


def make_vfat(tmp: Path, name: str, sectors: int, *options: str) -> Path:
    require_tool("mkfs.vfat")
    image = tmp / f"{name}.img"
    run("mkfs.vfat", "-C", *options, str(image), str(sectors // 2))
    return image


def test_gpt_with_ext4_and_vfat_partitions(tmp_path, source):
    require_tool("sgdisk", "sfdisk", "mkfs.ext4", "mkfs.vfat", "mcopy", "dd")
    disk = tmp_path / "gpt.img"
    with open(disk, "wb") as f:
        f.truncate(96 << 20)
    run(
        "sgdisk",
        "-n",
        "1:2048:+40M",
        "-t",
        "1:8300",
        "-c",
        "1:root",
        "-n",
        "2:0:+30M",
        "-t",
        "2:ef00",
        "-c",
        "2:esp",
        str(disk),
    )
    table = json.loads(run("sfdisk", "--json", str(disk)))["partitiontable"]
    parts = table["partitions"]
    ext_start, fat_start = parts[0]["start"] * 512, parts[1]["start"] * 512
    run("mkfs.ext4", "-q", "-F", "-b", "1024", "-E", f"offset={ext_start}", "-d", str(source), str(disk), "40M")
    fat = make_vfat(tmp_path, "esp", parts[1]["size"])
    (tmp_path / "hello.txt").write_text("hi\n")
    run("mcopy", "-i", str(fat), str(tmp_path / "hello.txt"), "::/hello.txt")
    run("dd", f"if={fat}", f"of={disk}", "bs=512", f"seek={parts[1]['start']}", "conv=notrunc", "status=none")

    fsmap = image_map(disk)
    assert fsmap.table == "GPT"
    assert [(p.number, p.offset, p.size) for p in fsmap.partitions] == [
        (k + 1, p["start"] * 512, p["size"] * 512) for k, p in enumerate(parts)
    ]
    assert [p.contents for p in fsmap.partitions] == ["ext4", "vfat"]
    assert [p.name for p in fsmap.partitions] == ["root", "esp"]
    assert fsmap.label(0, 512) == Label("protective MBR", "partition-table")
    assert fsmap.label(512, 512) == Label("GPT header (primary)", "partition-table")
    assert fsmap.label(1024, 512).text == "GPT partition entries (primary)"
    last_lba = table["lastlba"] + 33  # sfdisk's last usable LBA; the backup header is 33 sectors on
    assert fsmap.label(last_lba * 512, 512) == Label("GPT header (backup)", "partition-table")
    assert fsmap.label((last_lba - 32) * 512, 512).text == "GPT partition entries (backup)"
    assert fsmap.label(ext_start + 1024, 1024) == Label("partition 1 (ext4): ext4 superblock (primary)", "superblock")
    assert fsmap.label(ext_start - 4096, 512) == Label("unpartitioned space", "free")
    fat_info = fsck_fat(fat)
    assert fsmap.label(fat_start + fat_info["fat"], 512) == Label("partition 2 (vfat): vfat FAT #1", "fat")
    cluster = mshowfat(fat, "::/hello.txt")[0]
    at = fat_start + fat_info["data"] + (cluster - 2) * fat_info["cluster"]
    assert fsmap.label(at, 512) == Label("partition 2 (vfat): file data (/hello.txt)", "data")
    # The ext4 partition is mapped as a whole-disk ext4 would be, shifted
    header, groups = dumpe2fs_offset(disk, ext_start)
    bs = block_size(header)
    for g in groups:
        assert fsmap.label(ext_start + g["inode_table"][0] * bs, bs) == Label(
            f"partition 1 (ext4): ext4 group {g['group']} inode table", "inode-table"
        )
    assert fsmap.needs_refresh(fat_start, 512) and fsmap.needs_refresh(ext_start + 1024, 1)


def dumpe2fs_offset(disk: Path, offset: int) -> tuple[dict[str, str], list[dict]]:
    part = disk.with_suffix(".part")
    with open(disk, "rb") as src, open(part, "wb") as dst:
        src.seek(offset)
        dst.write(src.read(40 << 20))
    return dumpe2fs(part)


def test_mbr_with_logical_partitions(tmp_path):
    require_tool("sfdisk", "mkfs.ext4")
    disk = tmp_path / "mbr.img"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    script = "label: dos\n,16M,83\n,8M,c\n,,5\n,12M,83\n,,83\n"
    subprocess.run(["sfdisk", "-q", str(disk)], input=script, text=True, check=True, capture_output=True)
    parts = json.loads(run("sfdisk", "--json", str(disk)))["partitiontable"]["partitions"]
    logical = next(p for p in parts if p["node"].endswith("5"))
    run("mkfs.ext4", "-q", "-F", "-t", "ext2", "-E", f"offset={logical['start'] * 512}", str(disk), "12M")
    fsmap = image_map(disk)
    assert fsmap.table == "MBR"
    numbers = [int(re.search(r"(\d+)$", p["node"]).group(1)) for p in parts if p["type"] != "5"]
    assert [p.number for p in fsmap.partitions] == numbers == [1, 2, 5, 6]
    by_number = {p.number: p for p in fsmap.partitions}
    for p in parts:
        n = int(re.search(r"(\d+)$", p["node"]).group(1))
        if n in by_number:
            assert (by_number[n].offset, by_number[n].size) == (p["start"] * 512, p["size"] * 512)
    assert by_number[5].contents == "ext2"
    assert fsmap.label(0, 512) == Label("MBR (partition table)", "partition-table")
    assert fsmap.label(logical["start"] * 512 + 1024, 1).text == "partition 5 (ext2): ext2 superblock (primary)"
    assert fsmap.label(by_number[1].offset + 4096, 512).text == "partition 1 (Linux): contents not recognised"
    ebrs = [r for r in fsmap.regions if r.label.startswith("EBR of logical partition")]
    assert len(ebrs) == 2
    # A file system made in the empty partition would show: its start is watched, its middle not
    assert fsmap.needs_refresh(by_number[1].offset + 1024, 1024)
    assert not fsmap.needs_refresh(by_number[1].offset + (4 << 20), 4096)
    assert fsmap.needs_refresh(logical["start"] * 512 + 1024, 1)  # partition 5's superblock
    assert fsmap.needs_refresh(ebrs[1].offset, 512)


# --- FAT against fsck.fat -v and mtools -------------------------------------------------------------------------------


def fsck_fat(image: Path) -> dict[str, int]:
    require_tool("fsck.fat")
    text = run("fsck.fat", "-v", "-n", str(image))
    out = {
        "fat": int(re.search(r"First FAT starts at byte (\d+)", text).group(1)),
        "fat_bytes": int(re.search(r"(\d+) bytes per FAT", text).group(1)),
        "data": int(re.search(r"Data area starts at byte (\d+)", text).group(1)),
        "clusters": int(re.search(r"(\d+) data clusters", text).group(1)),
        "cluster": int(re.search(r"(\d+) bytes per cluster", text).group(1)),
        "fats": int(re.search(r"(\d+) FATs", text).group(1)),
    }
    if m := re.search(r"Root directory starts at byte (\d+)", text):
        out["root"] = int(m.group(1))
    if m := re.search(r"Root directory start at cluster (\d+)", text):
        out["root_cluster"] = int(m.group(1))
    return out


def mshowfat(image: Path, path: str) -> list[int]:
    """The clusters of a file, in chain order, from mtools' mshowfat ('<2-5><9>')."""
    require_tool("mshowfat")
    text = run("mshowfat", "-i", str(image), path)
    clusters = []
    for a, b in re.findall(r"<(\d+)(?:-(\d+))?>", text):
        clusters += range(int(a), int(b or a) + 1)
    return clusters


@pytest.mark.parametrize(
    "bits,sectors,options",
    [(12, 2880, []), (16, 65536, []), (32, 131072, ["-F", "32"])],
    ids=["fat12", "fat16", "fat32"],
)
def test_fat_layout_as_fsck_fat_reports(tmp_path, bits, sectors, options):
    require_tool("mkfs.vfat", "mcopy", "mmd")
    image = make_vfat(tmp_path, f"fat{bits}", sectors, *options)
    run("mmd", "-i", str(image), "::/Docs")
    (tmp_path / "a.txt").write_text("a long name\n")
    (tmp_path / "big.bin").write_bytes(random.Random(3).randbytes(90_000))
    run("mcopy", "-i", str(image), str(tmp_path / "a.txt"), "::/Docs/A long file name.txt")
    run("mcopy", "-i", str(image), str(tmp_path / "big.bin"), "::/BIG.BIN")
    info = fsck_fat(image)
    fsmap = image_map(image)
    fs = fsmap.filesystems[0]
    assert fs.type == "vfat" and fs.info["fat_type"] == f"FAT{bits}"
    assert fs.info["clusters"] == info["clusters"]
    assert fsmap.label(0, 512) == Label("vfat boot sector", "boot")
    for k in range(info["fats"]):
        start = info["fat"] + k * info["fat_bytes"]
        region = fsmap.region_at(start)
        assert (region.label, region.kind, region.offset, region.length) == (
            f"vfat FAT #{k + 1}",
            "fat",
            start,
            info["fat_bytes"],
        )
    if bits == 32:
        assert fsmap.label(512, 512).text == "vfat FSInfo sector"
        assert fsmap.label(6 * 512, 512).text == "vfat backup boot sector"
        root = info["data"] + (info["root_cluster"] - 2) * info["cluster"]
        assert fsmap.label(root, 32) == Label("vfat directory (/)", "directory")
    else:
        assert fsmap.label(info["root"], 32) == Label("vfat root directory (/)", "directory")

    def at(cluster: int) -> int:
        return info["data"] + (cluster - 2) * info["cluster"]

    assert fsmap.label(at(mshowfat(image, "::/Docs")[0]), 1) == Label("vfat directory (/Docs)", "directory")
    clusters = mshowfat(image, "::/BIG.BIN")
    for c in clusters:
        assert fsmap.label(at(c), 1) == Label("file data (/BIG.BIN)", "data")
    lfn = mshowfat(image, "::/Docs/A long file name.txt")
    assert fsmap.label(at(lfn[0]), 1).text == "file data (/Docs/A long file name.txt)"
    used = set(clusters) | set(lfn) | set(mshowfat(image, "::/Docs"))
    if bits == 32:
        used.add(info["root_cluster"])
    free = {
        c
        for r in fsmap.regions
        if r.kind == "free"
        for c in range(2 + (r.offset - info["data"]) // info["cluster"], 2 + (r.end - info["data"]) // info["cluster"])
    }
    assert free == set(range(2, info["clusters"] + 2)) - used
    assert not any(r.kind == "unknown" for r in fsmap.regions)
