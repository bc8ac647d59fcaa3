#!/usr/bin/env python3
"""What labelling a recorded trace costs, part by part (no fio, no server: a micro-benchmark).

    python bench/trace_label_bench.py [--files 2000] [--records 200000]

Labels are made by the trace writer process and by the recorder's feeder thread, never by a
serving thread (the tap is the same code with labels as without), so what is measured is:

1. the feeder thread, once per new map: slimming and pickling the map (map_frame), on a
   256 MiB ext4 that mkfs.ext4 -d filled with `--files` small files and a few big ones;
2. the writer process, per request: formatting 4 KiB random reads (a CRC each) and 4 KiB
   writes (their payload kept) into trace lines, zstd included, with and without a map.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from buselab.fsmap import build_map  # noqa: E402
from buselab.protocol import constants as c  # noqa: E402
from buselab.trace.codecs import crc32  # noqa: E402
from buselab.trace.format import TraceHeader  # noqa: E402
from buselab.trace.labelling import map_frame  # noqa: E402
from buselab.trace.wire import CRC, INLINE, RECORD, frame  # noqa: E402
from buselab.trace.writer import Encoder  # noqa: E402

MiB = 1 << 20


def make_image(tmp: Path, files: int) -> Path:
    tree = tmp / "tree"
    for i in range(files):
        d = tree / f"dir{i // 100:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"file{i:05d}.txt").write_bytes(os.urandom(random.choice((100, 3000, 9000, 40000))))
    (tree / "big").write_bytes(os.urandom(24 * MiB))
    image = tmp / "disk.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(tree), str(image), "256M"], check=True)
    return image


def frames(count: int, size: int, writes: bool) -> list[bytes]:
    rnd = random.Random(1)
    payload = os.urandom(4096)
    crc = crc32(payload)
    out = []
    for first in range(0, count, 2048):
        items = []
        for seq in range(first + 1, min(count, first + 2048) + 1):
            offset = rnd.randrange(size // 4096) * 4096
            if writes:
                items.append(
                    RECORD.pack(seq, 1e9, c.CMD_WRITE, 0, offset, 4096, 2e-5, 0, 1, seq, INLINE, 0, 4096) + payload
                )
            else:
                items.append(RECORD.pack(seq, 1e9, c.CMD_READ, 0, offset, 4096, 2e-5, 0, 1, seq, CRC, crc, 0))
        out.append(frame(items)[0])
    return out


def encode_time(tmp: Path, batches: list[bytes], map_body: bytes | None, payload: str) -> float:
    header = TraceHeader(size=256 * MiB, start=1e9, payload=payload, labels=map_body is not None)
    path = tmp / "t.jsonl.zst"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    import dataclasses

    encoder = Encoder({"header": dataclasses.asdict(header), "path": str(path)}, fd)
    if map_body is not None:
        encoder.set_map(map_body)
    started = time.process_time()
    for body in batches:
        encoder.encode(body)
    encoder.close(True)
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--records", type=int, default=200_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        image = make_image(tmp, args.files)
        with open(image, "rb") as f:
            fsmap = build_map(lambda offset, length: os.pread(f.fileno(), length, offset), os.path.getsize(image))
        started = time.perf_counter()
        body = map_frame(fsmap)
        took = time.perf_counter() - started
        print(
            f"map: {len(fsmap.regions):,} regions, {len(fsmap.filesystems[0].files):,} files;"
            f" map_frame {took * 1e3:.1f} ms, {len(body) / 1024:.0f} KiB down the pipe"
        )
        for what, writes, payload in (("4K reads", False, "writes"), ("4K writes (payload kept)", True, "writes")):
            batches = frames(args.records, 256 * MiB, writes)
            plain = min(encode_time(tmp, batches, None, payload) for _ in range(3))
            labelled = min(encode_time(tmp, batches, body, payload) for _ in range(3))
            n = args.records
            print(
                f"{what:<26} writer CPU per request: {plain / n * 1e6:.2f} µs without labels,"
                f" {labelled / n * 1e6:.2f} µs with (+{(labelled - plain) / n * 1e6:.2f} µs)"
            )


if __name__ == "__main__":
    main()
