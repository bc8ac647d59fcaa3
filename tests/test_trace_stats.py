"""`buselab stats` against a hand-made trace whose every number is worked out below."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from buselab.engine.telemetry import RequestRecord
from buselab.protocol import constants as c
from buselab.trace.stats import _share, alignment_of, region_size_for, size_bucket, summarize, summarize_trace

MiB = 1 << 20

# (t, op, offset, length, latency, error)
REQUESTS = [
    (0.000, "WRITE", 0, 4096, 0.001, 0),  # random (first), aligned 1M (offset 0)
    (0.001, "WRITE", 4096, 4096, 0.002, 0),  # sequential: starts where #1 ended
    (0.002, "READ", 0, 8192, 0.003, 0),  # random
    (0.003, "READ", 8192, 512, 0.004, 0),  # sequential: starts where #3 ended; not 4K in length
    (0.004, "READ", 1000, 100, 0.006, c.EIO),  # failed: counts, errors and latency only
    (0.005, "FLUSH", 0, 0, 0.010, 0),  # not a data op; ends last, at 0.015
    (0.006, "TRIM", MiB, MiB, 0.005, 0),  # random, aligned 1M
]


def write_trace(path: Path) -> Path:
    lines = [{"format": "buselab-trace", "version": 1, "size": 4 * MiB, "backend": "ram", "payload": "none"}]
    for seq, (t, op, offset, length, latency, error) in enumerate(REQUESTS, 1):
        lines.append(
            {
                "seq": seq,
                "t": t,
                "op": op,
                "flags": 0,
                "offset": offset,
                "length": length,
                "latency": latency,
                "error": error,
                "conn": 1,
                "handle": seq,
            }
        )
    lines.append({"end": True, "records": len(REQUESTS)})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def check(s: dict) -> None:
    assert s["requests"] == 7 and s["errors"] == 1
    assert s["duration"] == pytest.approx(0.015)  # first arrival 0.000, last completion 0.005 + 0.010
    assert s["iops"] == pytest.approx(7 / 0.015)
    assert s["bytes_read"] == 8192 + 512 and s["bytes_written"] == 8192
    ops = s["ops"]
    assert list(ops) == ["READ", "WRITE", "FLUSH", "TRIM"]
    read = ops["READ"]
    assert (read["count"], read["bytes"], read["errors"]) == (3, 8704, 1)
    assert read["latency"]["mean"] == pytest.approx((0.003 + 0.004 + 0.006) / 3)
    assert read["latency"]["p50"] == pytest.approx(0.004)  # nearest rank: 2nd of 3
    assert read["latency"]["p90"] == pytest.approx(0.006)
    assert read["latency"]["max"] == pytest.approx(0.006)
    assert (read["sequential"], read["random"]) == (1, 1)
    assert read["sizes"] == {"512": 1, "8192": 1}
    write = ops["WRITE"]
    assert write["latency"]["p50"] == pytest.approx(0.001) and write["latency"]["p99"] == pytest.approx(0.002)
    assert (write["sequential"], write["random"]) == (1, 1)
    assert write["sizes"] == {"4096": 2}
    assert ops["FLUSH"]["count"] == 1 and "sizes" not in ops["FLUSH"]
    assert ops["FLUSH"]["latency"]["p50"] == pytest.approx(0.010)
    assert ops["TRIM"]["bytes"] == MiB and ops["TRIM"]["sizes"] == {str(MiB): 1}
    assert s["alignment"] == {"4096": 1, "8192": 1, str(MiB): 3}
    assert s["aligned_4k"] == 4
    assert s["sequential"] == {"sequential": 2, "random": 3, "share": pytest.approx(0.4)}
    assert s["region_size"] == 4096  # a 4 MiB device in ~1024 regions
    assert s["hot_ranges"] == [
        {"offset": 0, "length": 4096, "touches": 2, "reads": 1, "writes": 1, "trims": 0, "bytes": 8192},
        {"offset": 4096, "length": 4096, "touches": 2, "reads": 1, "writes": 1, "trims": 0, "bytes": 8192},
        {"offset": 8192, "length": 4096, "touches": 1, "reads": 1, "writes": 0, "trims": 0, "bytes": 512},
    ]


def test_summary_of_a_hand_made_trace(tmp_path: Path) -> None:
    s = summarize_trace(str(write_trace(tmp_path / "t.jsonl")), top=3)
    check(s)
    assert s["trace"]["backend"] == "ram" and s["trace"]["truncated"] is False


def test_summary_of_telemetry_records_is_the_same() -> None:
    """The lab hands its ring of RequestRecords to the same function."""
    cmds = {name: cmd for cmd, name in c.CMD_NAMES.items()}
    records = [
        RequestRecord(seq, 1e9 + t, cmds[op], 0, offset, length, latency, error, 1, seq, None)
        for seq, (t, op, offset, length, latency, error) in enumerate(REQUESTS, 1)
    ]
    check(summarize(records, size=4 * MiB, top=3))


def test_hot_ranges_count_every_region_a_request_spans() -> None:
    s = summarize_trace_like([(0.0, "TRIM", MiB, MiB, 0.001, 0)], top=300)
    assert len(s["hot_ranges"]) == 256  # 1 MiB of 4 KiB regions
    assert {h["trims"] for h in s["hot_ranges"]} == {1}
    assert sum(h["bytes"] for h in s["hot_ranges"]) == MiB


def summarize_trace_like(requests: list, top: int = 10) -> dict:
    cmds = {name: cmd for cmd, name in c.CMD_NAMES.items()}
    records = [
        RequestRecord(seq, t, cmds[op], 0, offset, length, latency, error, 1, seq, None)
        for seq, (t, op, offset, length, latency, error) in enumerate(requests, 1)
    ]
    return summarize(records, size=4 * MiB, top=top)


def test_interleaved_streams_still_count_as_sequential() -> None:
    # Two sequential readers, interleaved (two fio jobs): every request but the first of each is sequential.
    requests = []
    for i in range(10):
        requests.append((i * 0.001, "READ", i * 4096, 4096, 0.0001, 0))
        requests.append((i * 0.001, "READ", MiB + i * 4096, 4096, 0.0001, 0))
    s = summarize_trace_like(requests)
    assert s["sequential"]["sequential"] == 18 and s["sequential"]["random"] == 2


def test_helpers() -> None:
    assert [size_bucket(n) for n in (0, 1, 512, 513, 4096, 4097)] == [0, 1, 512, 1024, 4096, 8192]
    assert [alignment_of(n) for n in (0, 100, 512, 4096, 12288, 3 * MiB, 64 * MiB)] == [
        MiB,
        0,
        512,
        4096,
        4096,
        MiB,
        MiB,
    ]
    assert region_size_for(None) == MiB
    assert region_size_for(1 << 30) == MiB
    assert region_size_for(1 << 20) == 4096
    assert summarize([])["requests"] == 0
    # Shares: 100% and 0% only for all and nothing.
    assert [_share(n, 100_000) for n in (100_000, 99_880, 99_999, 50_000, 120, 1, 0)] == [
        "100%",
        "99.9%",
        "99.9%",
        "50%",
        "0.1%",
        "0.1%",
        "0%",
    ]


def test_stats_cli_text_and_json(tmp_path: Path) -> None:
    path = str(write_trace(tmp_path / "t.jsonl"))
    proc = subprocess.run(
        [sys.executable, "-m", "buselab", "stats", path, "--json", "--top", "3"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    check(json.loads(proc.stdout))
    proc = subprocess.run([sys.executable, "-m", "buselab", "stats", path], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "7 requests over 0.015 s" in text
    assert "sequential 2 (40%), random 3 (60%) of 5 data requests" in text
    assert "READ sizes" in text and "offset alignment" in text and "most-touched ranges" in text
    read_row = next(line for line in text.splitlines() if line.startswith("READ "))
    assert read_row.split()[:2] == ["READ", "3"] and "4.000 ms" in read_row
