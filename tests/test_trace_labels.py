"""Recorded requests carry their labels ("struct", "label"), made off the serve path.

A real Session serves a RAM disk; a real NBD client writes an ext4 file system mkfs.ext4 made,
reads its superblock, writes into its journal; the trace the session recorded says what each
request touched, as the lab's labeller does. Traces without labels (older ones) still load.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from helpers import connect, require_tool, serve

from buselab.fsmap import KINDS
from buselab.storage.backends.ram import RamBackend
from buselab.trace.format import TraceHeader, open_trace
from buselab.ui.export import export_stats

MiB = 1 << 20


def ext4_image(tmp_path: Path, size: int) -> bytes:
    require_tool("mkfs.ext4")
    image = tmp_path / "ext4.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", str(image), str(size // 1024) + "k"], check=True)
    return image.read_bytes()


def wait_for(condition, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_recording_labels_each_request_with_the_map_of_its_moment(tmp_path: Path):
    size = 32 * MiB
    data = ext4_image(tmp_path, size)
    trace = tmp_path / "run.jsonl.zst"
    with serve(RamBackend(size), tmp_path) as session:
        recorder = session.start_recording(str(trace))
        client = connect(session)
        client.read(0, 4096)  # zeros: the map knows nothing, the line carries no label
        for offset in range(0, size, MiB):  # mkfs, from a real client
            client.write(offset, data[offset : offset + MiB])
        wait_for(lambda: session.labeller.map is not None and session.labeller.map.filesystems, "no ext4 map")
        fsmap = session.labeller.map
        wait_for(lambda: recorder._map_sent is fsmap, "the recorder never sent the writer the new map")
        client.read(1024, 1024)  # the primary superblock
        journal = next(r for r in fsmap.regions if r.kind == "journal")
        client.write(journal.offset + 4096, bytes(4096))  # a zero block into the journal
        client.flush()
        table = next(r for r in fsmap.regions if r.kind == "inode-table")
        client.read(table.offset, 8192)
        client.close()
        wait_for(lambda: session.labeller.label(session.engine.telemetry.recent()[-1].seq) is not None, "no labels")
        lab = {r.seq: session.labeller.label(r.seq) for r in session.engine.telemetry.recent()}
        # The lab's export (`e`) breaks the ring's requests down the same way.
        telemetry = session.engine.telemetry
        exported = export_stats(session, telemetry.recent(), telemetry.snapshot())["recent"]["structures"]
        info = session.stop_recording()
    assert info is not None and info.error is None and info.complete
    with open_trace(str(trace)) as reader:
        assert reader.header.labels
        records = list(reader)
    # What was served before the map knew the file system has no label: the zeros read, and mkfs's
    # writes up to the labeller's rebuild (it waits for 0.5 s without metadata writes; on a busy
    # machine that can come before the last of them, which are then labelled: a prefix).
    mkfs = [r for r in records if r.op == "WRITE" and r.length == MiB]
    assert len(mkfs) == size // MiB and records[0].op == "READ" and mkfs[0].offset == 0
    assert all(r.struct is None and r.label is None for r in [records[0], mkfs[0]])
    unlabelled = [r.struct is None for r in mkfs]
    assert unlabelled == sorted(unlabelled, reverse=True), unlabelled
    superblock, journal_write, flush, table_read = records[-4:]
    assert (superblock.struct, superblock.label) == ("superblock", "ext4 superblock (primary)")
    assert journal_write.struct == "journal" and "journal" in journal_write.label
    assert flush.op == "FLUSH" and flush.struct is None  # FLUSH touches no structure
    assert table_read.struct == "inode-table" and "inode table" in table_read.label
    for record in (superblock, journal_write, table_read):  # the lab said the same
        said = lab[record.seq]
        assert said is not None and (said.kind, said.text) == (record.struct, record.label)
    assert journal_write.label.startswith("jbd2 ")  # decoded from the block's own bytes
    # The lab names mkfs's writes once the map knows the file system (the first MiB holds the
    # superblock); the trace could not, when it wrote them.
    assert exported["superblock"]["requests"] == 2 and exported["superblock"]["bytes"] == 1024 + MiB
    assert exported["inode-table"]["ops"]["READ"]["bytes"] == 8192
    journal_writes = [seq for seq, said in lab.items() if said is not None and said.kind == "journal"]
    assert exported["journal"]["ops"]["WRITE"]["requests"] == len(journal_writes) >= 2  # mkfs's, and ours
    assert exported["unknown"]["requests"] == 1  # the zeros read, before there was anything to read
    assert {r.struct for r in records if r.struct} <= set(KINDS)
    # The raw lines: the label's keys, in JSON (escaped as JSON escapes).
    lines = [json.loads(line) for line in _plain_lines(trace)]
    assert lines[0]["labels"] is True
    assert any(line.get("struct") == "superblock" for line in lines[1:])


def _plain_lines(path: Path) -> list[str]:
    import zstandard

    with open(path, "rb") as f:
        text = zstandard.ZstdDecompressor().stream_reader(f).read().decode()
    return text.splitlines()


def test_without_a_labeller_traces_are_as_before_and_old_traces_load(tmp_path: Path):
    header = TraceHeader(size=1 << 20, start=1000.0, backend="ram").to_json()
    assert "labels" not in header  # a recording without a labeller writes what version 1 always wrote
    path = tmp_path / "old.jsonl"
    old = {k: v for k, v in header.items()}
    line = '{"seq":1,"t":0.001,"op":"READ","flags":0,"offset":0,"length":4096,"latency":0.0001,"error":0,"conn":1,"handle":1}'
    bad = line[:-1] + ',"struct":7,"label":["x"]}'  # labels of the wrong type are dropped, not fatal
    path.write_text(json.dumps(old) + "\n" + line + "\n" + bad + "\n" + '{"end": true, "records": 2}\n')
    with open_trace(str(path)) as reader:
        assert not reader.header.labels
        records = list(reader)
    assert [(r.struct, r.label) for r in records] == [(None, None), (None, None)]


def test_the_c_formatter_labels_as_python_does(tmp_path: Path, monkeypatch) -> None:
    """Requests without data are labelled in C from the map's lookup table (_fastlines.c): the
    lines are byte for byte those the Python loop makes with FsMap.label."""
    import marshal
    import os
    import random
    import tempfile

    from helpers import missing

    from buselab.fsmap import Filesystem, FsMap, Region, build_map
    from buselab.protocol import constants as c
    from buselab.trace import writer
    from buselab.trace.labelling import RecordLabels, map_frame, read_map_frame
    from buselab.trace.wire import CRC, NO_DATA, RECORD, frame

    if writer.format_reads is None:
        missing("the C line formatter is not built (setup.py: needs a C compiler and Python's headers)")
    require_tool("mkfs.ext4")
    tree = tmp_path / "tree"
    for i in range(60):
        (tree / f"d{i % 6}").mkdir(parents=True, exist_ok=True)
        (tree / f"d{i % 6}" / f"f{i}").write_bytes(bytes([i]) * (1 + 3000 * (i % 7)))
    image = tmp_path / "disk.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "1024", "-d", str(tree), str(image), "16384k"], check=True)
    data = image.read_bytes()
    fsmap = build_map(lambda offset, length: data[offset : offset + length], len(data))
    assert len(fsmap.regions) > 50
    rng = random.Random(3)
    cmds = [c.CMD_READ, c.CMD_WRITE, c.CMD_FLUSH, c.CMD_TRIM, c.CMD_CACHE, c.CMD_WRITE_ZEROES, c.CMD_BLOCK_STATUS]
    records = []
    for seq in range(1, 3001):
        region = rng.choice(fsmap.regions)
        offset = rng.choice(
            [region.offset, region.end - 1, rng.randrange(len(data)), len(data) + 4096, (1 << 64) - 1, 0]
        )
        length = rng.choice([0, 512, 1024, 4096, 65536, 1 << 20])
        kind = rng.choice([CRC, NO_DATA])
        records.append(
            RECORD.pack(seq, 1e9, rng.choice(cmds), 0, offset, length, 1e-5, 0, 1, seq, kind, 77 if kind else 0, 0)
        )
    setup = {"header": {"size": len(data), "start": 1e9, "labels": True}, "path": "", "flush_interval": 60.0}
    frames = [map_frame(fsmap), *(frame(records[i : i + 700])[0] for i in range(0, len(records), 700))]
    # A map of 1 KiB regions, mostly data, a more telling one here and there: requests over up to
    # 20 of them, named by the most telling of the first 17 (as FsMap.label names them).
    kinds = ["data", "free", "directory", "inode-table", "superblock", "journal"]
    tiny = FsMap(
        64 * 1024,
        [Region(k * 1024, 1024, rng.choice(kinds[:2]) if k % 9 else rng.choice(kinds), f"r{k}") for k in range(64)],
        filesystems=[Filesystem("ext4", 0, 64 * 1024, 1024)],
    )
    spans = [
        RECORD.pack(seq, 1e9, c.CMD_READ, 0, k * 1024 + 512, n * 1024, 1e-5, 0, 1, seq, NO_DATA, 0, 0)
        for seq, (k, n) in enumerate(((k, n) for k in range(40) for n in range(14, 21)), len(records) + 1)
    ]
    frames += [map_frame(tiny), frame(spans)[0]]
    records += spans

    def trace(name: str) -> list[bytes]:
        path = tmp_path / name
        setup["path"] = str(path)
        with tempfile.TemporaryFile() as feed:
            for body in [marshal.dumps(setup), *frames, b""]:
                feed.write(len(body).to_bytes(4, "little") + body)
            feed.seek(0)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            assert writer.run(fd, feed.fileno())["ended"]
        return path.read_bytes().splitlines()[:-1]  # the end line's duration is the run's own

    # The C formatter does label these frames itself (it does not hand them back to Python).
    names = tuple(name.encode() for name in writer._OP_NAMES)
    table = RecordLabels(read_map_frame(frames[0])).table
    made = writer.format_reads(frames[1], 1e9, names, 0, table)
    assert made is not None and made[0].count(b"\n") == 700 and b'"struct":' in made[0]
    fast = trace("c.jsonl")
    monkeypatch.setattr(writer, "format_reads", None)
    slow = trace("python.jsonl")
    assert len(fast) == len(slow) == 1 + len(records)
    for a, b in zip(fast, slow):
        assert a == b
    text = b"\n".join(fast)
    assert text.count(b'"more":') > 100 and text.count(b'"label":"not mapped"') > 100
    assert text.count(b'"struct":') == sum(1 for r in records if RECORD.unpack(r)[2] in (0, 1, 4, 5, 6))
