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
    # Everything before the map knew the file system (the zeros read, mkfs's writes) has no label.
    mkfs = [r for r in records if r.op == "WRITE" and r.length == MiB]
    assert len(mkfs) == size // MiB and records[0].op == "READ"
    assert all(r.struct is None and r.label is None for r in [records[0], *mkfs])
    superblock, journal_write, flush, table_read = records[-4:]
    assert (superblock.struct, superblock.label) == ("superblock", "ext4 superblock (primary)")
    assert journal_write.struct == "journal" and "journal" in journal_write.label
    assert flush.op == "FLUSH" and flush.struct is None  # FLUSH touches no structure
    assert table_read.struct == "inode-table" and "inode table" in table_read.label
    for record in (superblock, journal_write, table_read):  # the lab said the same
        said = lab[record.seq]
        assert said is not None and (said.kind, said.text) == (record.struct, record.label)
    assert journal_write.label.startswith("jbd2 ")  # decoded from the block's own bytes
    assert exported["superblock"]["requests"] == 1 and exported["superblock"]["bytes"] == 1024
    assert exported["inode-table"]["ops"]["READ"]["bytes"] == 8192
    assert exported["journal"]["ops"]["WRITE"]["requests"] == 1
    assert exported["unknown"]["requests"] == 1 + size // MiB  # the zeros read and mkfs's writes
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
