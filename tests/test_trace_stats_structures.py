"""`buselab stats` by structure: a hand-made labelled trace whose every number is worked out,
an unlabelled one (one line says so), and one labelled from an image mkfs.ext4 made."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import require_tool

from buselab.trace.stats import summarize_trace

MiB = 1 << 20

# (op, offset, length, latency, error, struct)
REQUESTS = [
    ("READ", 1024, 1024, 0.001, 0, "superblock"),
    ("READ", 1024, 1024, 0.003, 0, "superblock"),
    ("WRITE", 1024, 1024, 0.010, 0, "superblock"),
    ("WRITE", 65536, 4096, 0.002, 0, "journal"),
    ("WRITE", 69632, 4096, 0.004, 0, "journal"),
    ("WRITE", 73728, 8192, 0.006, 0, "journal"),
    ("READ", MiB, 4096, 0.005, 5, "data"),  # failed: not counted by structure
    ("FLUSH", 0, 0, 0.020, 0, None),  # not a data op: no structure
    ("READ", 2 * MiB, 2048, 0.0005, 0, None),  # data op without a label: "unknown"
]


def write_trace(path: Path, labelled: bool = True) -> Path:
    header = {"format": "buselab-trace", "version": 1, "size": 4 * MiB, "backend": "ram", "payload": "none"}
    if labelled:
        header["labels"] = True
    lines = [header]
    for seq, (op, offset, length, latency, error, struct) in enumerate(REQUESTS, 1):
        line = {"seq": seq, "t": seq * 0.001, "op": op, "flags": 0, "offset": offset, "length": length}
        line.update(latency=latency, error=error, conn=1, handle=seq)
        if labelled and struct is not None:
            line.update(struct=struct, label=f"ext4 {struct}")
        lines.append(line)
    lines.append({"end": True, "records": len(REQUESTS)})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def check(structures: dict) -> None:
    total = 3 * 1024 + 16384 + 2048
    assert list(structures) == ["journal", "superblock", "unknown"]  # the most bytes first
    journal = structures["journal"]
    assert (journal["requests"], journal["bytes"]) == (3, 16384)
    assert journal["share"] == pytest.approx(16384 / total)
    assert journal["p50"] == pytest.approx(0.004) and journal["p99"] == pytest.approx(0.006)  # nearest rank
    assert list(journal["ops"]) == ["WRITE"]
    sb = structures["superblock"]
    assert (sb["requests"], sb["bytes"]) == (3, 3072)
    assert sb["p50"] == pytest.approx(0.003) and sb["p99"] == pytest.approx(0.010)
    assert sb["ops"]["READ"] == {
        "requests": 2,
        "bytes": 2048,
        "share": pytest.approx(2048 / total),
        "p50": pytest.approx(0.001),
        "p99": pytest.approx(0.003),
    }
    assert sb["ops"]["WRITE"]["requests"] == 1 and sb["ops"]["WRITE"]["p50"] == pytest.approx(0.010)
    assert structures["unknown"]["requests"] == 1 and structures["unknown"]["bytes"] == 2048


def stats(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "buselab", "stats", *args], capture_output=True, text=True)


def test_a_labelled_trace_by_structure(tmp_path: Path) -> None:
    path = str(write_trace(tmp_path / "t.jsonl"))
    check(summarize_trace(path)["structures"])
    proc = stats(path, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    check(summary["structures"])
    assert summary["trace"]["labels"] == "trace"
    proc = stats(path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    start = lines.index("by structure")
    table = lines[start + 1 : start + 7]
    assert table[0].split() == ["structure", "op", "requests", "bytes", "share", "p50", "p99"]
    assert table[1].split()[:3] == ["journal", "WRITE", "3"] and "4.000 ms" in table[1] and "6.000 ms" in table[1]
    assert table[2].split()[:3] == ["superblock", "all", "3"] and "10.000 ms" in table[2]
    assert table[3].split()[:2] == ["READ", "2"] and table[4].split()[:2] == ["WRITE", "1"]
    assert table[5].split()[:3] == ["unknown", "READ", "1"] and "500 µs" in table[5]


def test_an_unlabelled_trace_says_so_in_one_line(tmp_path: Path) -> None:
    path = str(write_trace(tmp_path / "t.jsonl", labelled=False))
    assert summarize_trace(path)["structures"] is None
    proc = stats(path)
    assert proc.returncode == 0, proc.stderr
    said = [line for line in proc.stdout.splitlines() if line.startswith("by structure")]
    assert len(said) == 1 and "has no labels" in said[0] and "--image" in said[0]
    assert json.loads(stats(path, "--json").stdout)["structures"] is None


def test_labelled_from_an_image(tmp_path: Path) -> None:
    require_tool("mkfs.ext4")
    image = tmp_path / "disk.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", str(image), "4096k"], check=True)
    path = str(write_trace(tmp_path / "t.jsonl", labelled=False))
    summary = summarize_trace(path, image=str(image))
    structures = summary["structures"]
    assert summary["trace"]["labels"] == "image"
    # Byte 1024 of an ext4 disk is its primary superblock, whatever the trace said.
    assert structures["superblock"]["requests"] == 3
    proc = stats(path, "--image", str(image))
    assert proc.returncode == 0 and "by structure (labelled from the image)" in proc.stdout, proc.stdout
    # Bad input: one line, exit 2.
    zeros = tmp_path / "zeros.img"
    zeros.write_bytes(bytes(MiB))
    for bad, words in ((tmp_path / "missing.img", "cannot read image"), (zeros, "no partition table or file system")):
        proc = stats(path, "--image", str(bad))
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
