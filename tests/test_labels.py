"""Requests labelled with the structure they touch, and the map kept current (engine/labels.py)."""

from __future__ import annotations

import subprocess
import time

from helpers import connect, require_tool, serve

from buselab.engine.labels import Labeller
from buselab.storage.backends.ram import RamBackend

MiB = 1 << 20


def ext4_image(tmp_path, size=16 * MiB) -> bytes:
    require_tool("mkfs.ext4")
    image = tmp_path / "ext4.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", str(image), str(size // 1024) + "k"], check=True)
    return image.read_bytes()


def test_a_file_system_written_over_nbd_is_mapped_and_its_requests_labelled(tmp_path):
    data = ext4_image(tmp_path)
    with serve(RamBackend(len(data)), tmp_path) as session:
        labeller = Labeller(session.engine)
        labeller.rebuild()
        assert labeller.map is not None and not labeller.map.filesystems  # zeros: nothing known yet
        client = connect(session)
        for offset in range(0, len(data), MiB):  # what mkfs would send: the whole image
            client.write(offset, data[offset : offset + MiB])
        labeller.run_pass(now=100.0)  # a write to the first 64 KiB: the map must be read again
        assert labeller.builds == 1  # ... once the writes have settled, not at once
        labeller.run_pass(now=105.0)
        assert labeller.builds == 2 and labeller.map.filesystems
        client.read(1024, 1024)  # the superblock
        client.read(0, 4096)
        labeller.run_pass(now=106.0)
        records = session.engine.telemetry.recent()
        superblock_read = records[-2]
        assert str(labeller.label(superblock_read.seq)) == "ext4 superblock (primary)"
        assert labeller.label_of(records[-1]).kind == "superblock"
        # the two reads, and the first 1 MiB write (relabelled below)
        assert labeller.structures["superblock"] == [3, MiB + 1024 + 4096]
        # The whole-image writes found no map when they were labelled; once the map is read
        # they say what they wrote (the first MiB holds the superblock: the most telling).
        first_write = records[0]
        assert first_write.offset == 0 and labeller.label(first_write.seq).kind == "superblock"
        assert "unknown" not in labeller.structures, labeller.structures
        assert sum(n for n, _ in labeller.structures.values()) == len(data) // MiB + 2
        client.close()


def test_a_read_of_what_was_just_written_is_named_once_the_map_is_read_again(tmp_path):
    """mount right after mkfs: its reads come before the map is read again. Once it is, they
    say what they read; a read of bytes written after it (blkid before mkfs) keeps its label."""
    data = ext4_image(tmp_path)
    with serve(RamBackend(len(data)), tmp_path) as session:
        labeller = Labeller(session.engine)
        labeller.rebuild()
        client = connect(session)
        client.read(1024, 1024)  # zeros: no superblock yet
        for offset in range(0, len(data), MiB):
            client.write(offset, data[offset : offset + MiB])
        client.read(1024, 1024)  # the new superblock, before the map knows it
        free = next(b for b in range(len(data) - 4096, 0, -4096) if data[b : b + 4096] == bytes(4096))
        client.read(free, 4096)  # the new file system's free space (the image's writes wrote its zeros)
        labeller.run_pass(now=100.0)
        before, *_, after, free_read = session.engine.telemetry.recent()
        assert labeller.label(after.seq).kind in ("unknown", "free"), labeller.label(after.seq)
        labeller.run_pass(now=105.0)  # the writes settled: the map is read again
        assert labeller.builds == 2 and labeller.map.filesystems
        assert str(labeller.label(after.seq)) == "ext4 superblock (primary)"
        assert labeller.label(before.seq).kind in ("unknown", "free"), labeller.label(before.seq)
        assert labeller.label(free_read.seq).text.endswith("free blocks"), labeller.label(free_read.seq)
        client.close()


def test_written_ranges_merge_and_answer_overlaps():
    from buselab.engine.labels import _Ranges

    ranges = _Ranges()
    for start in (0, 4096, 8192):  # a sequential writer: one range
        ranges.add(start, start + 4096)
    ranges.add(100_000, 104_096)
    assert (ranges.starts, ranges.ends) == ([0, 100_000], [12_288, 104_096])
    ranges.add(12_288, 100_000)  # fills the gap: one again
    assert (ranges.starts, ranges.ends) == ([0], [104_096])
    ranges.add(200_000, 200_512)
    assert ranges.overlaps(104_000, 104_100) and ranges.overlaps(199_000, 200_001)
    assert not ranges.overlaps(104_096, 200_000) and not ranges.overlaps(200_512, 300_000)


def test_labels_come_from_a_thread_that_keeps_up(tmp_path):
    data = ext4_image(tmp_path)
    backend = RamBackend(len(data))
    backend.write(0, data)
    with serve(backend, tmp_path) as session:
        labeller = Labeller(session.engine, interval=0.05)
        labeller.start()
        try:
            client = connect(session)
            client.read(1024, 1024)
            seq = session.engine.telemetry.recent()[-1].seq
            deadline = time.monotonic() + 10
            while labeller.label(seq) is None:
                assert time.monotonic() < deadline, "the labeller never labelled the request"
                time.sleep(0.02)
            assert labeller.label(seq).kind == "superblock"
            client.close()
        finally:
            labeller.stop()


def test_a_new_files_data_written_into_free_blocks_says_whose_it_is_once_the_map_is_read_again(tmp_path):
    """The data lands first, in blocks the map calls free; the bitmap and inode come after it."""
    require_tool("debugfs")
    before = ext4_image(tmp_path)
    image = tmp_path / "ext4.img"
    source = tmp_path / "hello.txt"
    source.write_bytes(b"hello, block layer\n" * 1000)
    subprocess.run(["debugfs", "-w", "-R", f"write {source} hello.txt", str(image)], check=True, capture_output=True)
    after = image.read_bytes()
    changed = [b for b in range(0, len(after), 4096) if after[b : b + 4096] != before[b : b + 4096]]
    backend = RamBackend(len(before))
    backend.write(0, before)
    with serve(backend, tmp_path) as session:
        labeller = Labeller(session.engine)
        labeller.rebuild()
        data_blocks = [b for b in changed if labeller.map.label(b, 4096).kind == "free"]
        assert data_blocks, "debugfs wrote the file's data into blocks the old map calls free"
        client = connect(session)
        for offset in data_blocks + [b for b in changed if b not in data_blocks]:  # data first, as ext4 does
            client.write(offset, after[offset : offset + 4096])
        labeller.run_pass(now=200.0)
        data_write = session.engine.telemetry.recent()[0]
        first = labeller.label(data_write.seq)  # what the map knew then: free, so newly allocated
        assert first.kind == "free" and first.text.endswith("newly allocated (free in the bitmap on disk)"), first
        untouched = next(b for b in range(len(before) - 4096, 0, -4096) if labeller.map.label(b, 4096).kind == "free")
        client.read(untouched, 4096)  # a read of a free block nothing wrote is just that
        labeller.run_pass(now=200.1)
        read = session.engine.telemetry.recent()[-1]
        assert labeller.label(read.seq).text.endswith(" free blocks"), labeller.label(read.seq)
        labeller.run_pass(now=205.0)  # the metadata writes settled: the map is read again
        label = labeller.label(data_write.seq)
        assert label.kind == "data" and "hello.txt" in label.text, label
        client.close()
