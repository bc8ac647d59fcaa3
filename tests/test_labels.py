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
        assert labeller.structures["superblock"] == [2, 1024 + 4096]
        # The whole-image writes were labelled with the map they found (none): "unknown".
        assert labeller.structures["unknown"][0] == len(data) // MiB
        client.close()


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
