"""The trace format: round trips through every compression, and every kind of bad input.

Each bad trace must give one clear line (UserError in Python, `buselab: error:`
and exit 2 on the command line), never a traceback.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from buselab.errors import UserError
from buselab.protocol import constants as c
from buselab.trace.format import (
    FORMAT_VERSION,
    TraceHeader,
    TraceWriter,
    data_hash,
    encode_record,
    encode_trailer,
    open_trace,
    read_trailer,
)

SIZE = 1 << 20


def header(**extra) -> dict:
    h = TraceHeader(size=SIZE, start=1000.0, backend="ram").to_json()
    h.update(extra)
    return h


def record(seq: int, op: str = "READ", offset: int = 0, length: int = 4096, data: bytes | None = None, **kw) -> dict:
    r = {
        "seq": seq,
        "t": seq * 0.001,
        "op": op,
        "flags": 0,
        "offset": offset,
        "length": length,
        "latency": 0.0001,
        "error": 0,
        "conn": 1,
        "handle": seq,
    }
    if data is not None:
        import base64

        r["hash"] = data_hash(data)
        r["data"] = base64.b64encode(data).decode()
    r.update(kw)
    return r


def write_lines(path: Path, lines: list) -> Path:
    text = "".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    elif path.name.endswith(".zst"):
        import zstandard

        path.write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
    else:
        path.write_text(text)
    return path


def good_trace(path: Path) -> Path:
    payload = bytes(range(256)) * 16
    return write_lines(
        path,
        [
            header(),
            record(1, "WRITE", 0, 4096, payload),
            record(2, "READ", 0, 4096, hash=data_hash(payload)),
            record(3, "FLUSH", 0, 0),
            {"end": True, "records": 3, "duration": 0.1},
        ],
    )


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "buselab", *args], capture_output=True, text=True, timeout=60)


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("buselab: error: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("name", ["t.jsonl", "t.jsonl.gz", "t.jsonl.zst"])
def test_writer_and_reader_round_trip(tmp_path: Path, name: str) -> None:
    path = str(tmp_path / name)
    payload = b"\x01\x02" * 2048
    w = TraceWriter(path)
    w.write_header(TraceHeader(size=SIZE, start=5.0, backend="ram", description="ram disk"))
    w.write(encode_record(7, 0.5, "WRITE", c.CMD_FLAG_FUA, 8192, 4096, 2e-5, 0, 2, 99, data_hash(payload), payload))
    w.write(encode_record(8, 0.6, "WRITE", 0, 0, 4096, 2e-5, 0, 2, 100, data_hash(bytes(4096)), bytes(4096)))
    w.write(encode_record(9, 0.7, "READ", 0, 8192, 4096, 1e-5, c.EIO, 2, 101, None, None))
    w.write(encode_trailer(3, 1.0, ops={"WRITE": 2, "READ": 1}))
    w.close()
    with open_trace(path) as reader:
        assert reader.header.size == SIZE
        assert reader.header.description == "ram disk"
        records = list(reader)
        assert reader.trailer["records"] == 3
    first, zero, failed = records
    assert (first.seq, first.op, first.flags, first.offset, first.length, first.conn, first.handle) == (
        7,
        "WRITE",
        c.CMD_FLAG_FUA,
        8192,
        4096,
        2,
        99,
    )
    assert first.data == payload and first.hash == data_hash(payload)
    assert zero.data == bytes(4096)  # stored as "zeros": true
    assert failed.error == c.EIO and failed.data is None and failed.hash is None
    assert read_trailer(path)["ops"] == {"WRITE": 2, "READ": 1}
    if name == "t.jsonl":
        assert '"zeros":true' in Path(path).read_text()


@pytest.mark.parametrize("name", ["t.jsonl", "t.jsonl.gz", "t.jsonl.zst"])
def test_good_trace_through_the_cli(tmp_path: Path, name: str) -> None:
    path = good_trace(tmp_path / name)
    proc = run_cli("stats", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["requests"] == 3
    proc = run_cli("replay", str(path), "--afap", "--headless", "-q")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "matched: 1" in proc.stdout


def test_corrupt_line_in_the_middle(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "t.jsonl",
        [header(), record(1), '{"seq": 2, "op": "READ", oops', record(3), {"end": True, "records": 2}],
    )
    with pytest.raises(UserError, match="line 3 is not valid JSON"):
        list(open_trace(str(path)))
    with pytest.raises(UserError, match="line 3 is not valid JSON"):
        list(open_trace(str(path), partial=True))  # --partial forgives a cut-off end, not a bad middle
    assert_one_line_error(run_cli("stats", str(path)), "line 3 is not valid JSON")
    assert_one_line_error(run_cli("replay", str(path), "--afap", "--headless"), "line 3")


def test_cut_off_last_line_is_truncated(tmp_path: Path) -> None:
    full = json.dumps(record(2))
    path = write_lines(tmp_path / "t.jsonl", [header(), record(1), full[: len(full) // 2]])
    with pytest.raises(UserError, match="truncated.*--partial"):
        list(open_trace(str(path)))
    reader = open_trace(str(path), partial=True)
    assert [r.seq for r in reader] == [1]
    assert reader.truncated
    assert_one_line_error(run_cli("stats", str(path)), "truncated", "--partial")
    proc = run_cli("stats", str(path), "--partial", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["requests"] == 1


def test_missing_end_line_is_truncated(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "t.jsonl.zst", [header(), record(1), record(2)])
    assert read_trailer(str(path)) is None
    with pytest.raises(UserError, match="without an end line"):
        list(open_trace(str(path)))
    assert_one_line_error(run_cli("replay", str(path), "--afap", "--headless"), "truncated", "--partial")


def test_unknown_version(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "t.jsonl", [header(version=FORMAT_VERSION + 1), {"end": True, "records": 0}])
    with pytest.raises(UserError, match="version 2"):
        open_trace(str(path))
    assert_one_line_error(run_cli("stats", str(path)), "version 2", "version 1 only")
    assert_one_line_error(run_cli("replay", str(path), "--headless"), "version 2")


@pytest.mark.parametrize(
    "content, words",
    [
        ("", ("empty",)),
        ("hello\n", ("not a buselab trace",)),
        ('{"format": "something-else", "version": 1}\n', ("not a buselab trace",)),
        ('{"format": "buselab-trace", "version": 1}\n', ("has no 'size'",)),
        ('{"format": "buselab-trace", "size": 4096}\n', ("has no format version",)),
    ],
)
def test_not_a_trace(tmp_path: Path, content: str, words: tuple) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(content)
    with pytest.raises(UserError):
        open_trace(str(path))
    assert_one_line_error(run_cli("stats", str(path)), *words)


def test_missing_file(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("stats", str(tmp_path / "nope.jsonl")), "does not exist")


def test_truncated_gzip(tmp_path: Path) -> None:
    path = good_trace(tmp_path / "t.jsonl.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 12])
    with pytest.raises(UserError, match="truncated"):
        list(open_trace(str(path)))
    assert_one_line_error(run_cli("stats", str(path)), "truncated")


@pytest.mark.parametrize("name", ["t.jsonl.gz", "t.jsonl.zst"])
def test_a_compressed_trace_cut_in_the_middle_gives_its_complete_records_with_partial(
    tmp_path: Path, name: str
) -> None:
    records = [record(seq, "WRITE", seq * 4096 % SIZE, 4096, os.urandom(4096)) for seq in range(1, 201)]
    path = write_lines(tmp_path / name, [header(), *records, {"end": True, "records": 200}])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # killed while writing: the compressed stream just stops
    with pytest.raises(UserError, match="truncated.*--partial"):
        list(open_trace(str(path)))
    assert_one_line_error(run_cli("stats", str(path)), "truncated", "--partial")
    with open_trace(str(path), partial=True) as reader:
        got = list(reader)
    assert reader.truncated and 20 < len(got) < 200
    assert [r.data for r in got] == [base64.b64decode(r["data"]) for r in records[: len(got)]]
    proc = run_cli("stats", str(path), "--partial")
    assert proc.returncode == 0 and f"{len(got)} requests" in proc.stdout


def test_truncated_zstd(tmp_path: Path) -> None:
    path = good_trace(tmp_path / "t.jsonl.zst")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated|empty"):
        list(open_trace(str(path)))
    assert_one_line_error(run_cli("stats", str(path)))


def test_garbage_zstd(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl.zst"
    path.write_bytes(b"this is not zstandard data at all" * 10)
    with pytest.raises(UserError, match="corrupt"):
        open_trace(str(path))
    assert_one_line_error(run_cli("stats", str(path)), "corrupt")


def test_payload_of_the_wrong_size(tmp_path: Path) -> None:
    rec = record(1, "WRITE", 0, 4096, b"x" * 4096)
    rec["length"] = 8192
    path = write_lines(tmp_path / "t.jsonl", [header(), rec, {"end": True, "records": 1}])
    with pytest.raises(UserError, match="line 2 carries 4096 bytes of payload for a length of 8192"):
        list(open_trace(str(path)))


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"op": "FROB"}, "unknown op 'FROB'"),
        ({"offset": -1}, "negative"),
        ({"length": "big"}, "bad 'length'"),
        ({"hash": "xyz"}, "bad 'hash'"),
    ],
)
def test_bad_fields(tmp_path: Path, bad: dict, words: str) -> None:
    rec = record(1)
    rec.update(bad)
    path = write_lines(tmp_path / "t.jsonl", [header(), rec, {"end": True, "records": 1}])
    with pytest.raises(UserError, match="line 2"):
        list(open_trace(str(path)))
    assert_one_line_error(run_cli("stats", str(path)), words)


def test_end_line_count_must_match(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "t.jsonl", [header(), record(1), {"end": True, "records": 5}])
    with pytest.raises(UserError, match="counts 5 records but it holds 1"):
        list(open_trace(str(path)))


def test_lines_after_the_end(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "t.jsonl", [header(), {"end": True, "records": 0}, record(1)])
    with pytest.raises(UserError, match="line 3 comes after the end line"):
        list(open_trace(str(path)))


def test_unknown_keys_are_ignored(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "t.jsonl",
        [header(future="yes"), record(1, colour="blue"), {"end": True, "records": 1, "more": 1}],
    )
    with open_trace(str(path)) as reader:
        assert reader.header.extra == {"future": "yes"}
        assert [r.seq for r in reader] == [1]
