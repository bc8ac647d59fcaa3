"""The lab ties requests that are one I/O together: a split write and a readahead run,
bracketed in the stream (the last row says what the run was) and named in the inspector.

The requests come from a real client: nbdsh sends eight 128 KiB writes at once (as the
kernel does with a 1 MiB write at max_sectors_kb=128), then reads a file's worth sequentially
with a growing window (as readahead does).
"""

from __future__ import annotations

import asyncio
import subprocess

from helpers import nbdsh, serve, socket_path

from buselab.engine.telemetry import RequestRecord
from buselab.storage.backends.ram import RamBackend
from buselab.ui.lab import LabApp

KiB, MiB = 1 << 10, 1 << 20

SPLIT_AND_READAHEAD = """
piece = b"\\x55" * (128 * 1024)
for i in range(8):  # all eight in flight at once, back to back
    h.aio_pwrite(piece, 4 * 1024 * 1024 + i * 128 * 1024)
while h.aio_in_flight() > 0:
    h.poll(-1)
offset = 8 * 1024 * 1024
for size in (4096, 16384, 32768, 65536, 131072, 131072):
    h.pread(size, offset)
    offset += size
"""


def stream_text(app: LabApp) -> str:
    return "\n".join(app.stream.render_line(y).text for y in range(app.stream.size.height))


def test_a_split_write_and_a_readahead_run_in_the_stream_and_inspector(tmp_path):
    command = nbdsh()
    with serve(RamBackend(16 * MiB), tmp_path) as session:

        async def run() -> None:
            app = LabApp(session, auto_poll=False)
            async with app.run_test(size=(160, 50)) as pilot:
                uri = f"nbd+unix:///?socket={socket_path(session)}"
                subprocess.run([*command, "-u", uri, "-c", SPLIT_AND_READAHEAD], check=True, timeout=30)
                app.poll()
                await pilot.pause()
                rows = [r for r in app.stream.rows if isinstance(r, RequestRecord)]
                writes = [r for r in rows if r.op == "WRITE"]
                reads = [r for r in rows if r.op == "READ" and r.offset >= 8 * MiB]
                assert len(writes) == 8 and len(reads) == 6
                text = stream_text(app)
                # The bracket: ┌ on the first piece, │ between, └ and the story on the last.
                lines = [line for line in text.splitlines() if " WRITE " in line or " READ " in line]
                # The stream is half of a 160-column lab: the short form (the inspector says it all).
                assert "└ 1M WRITE split 8×128K" in text, text
                assert sum("┌" in line for line in lines) == 2, text
                assert "└ readahead 6 READs 4K→128K" in text, text

                # The inspector names the part: the third piece of the write.
                third = writes[2]
                index = app.stream.rows.index(third)
                app.stream.focus()
                app.stream._select(index)
                await pilot.pause()
                assert app.inspector.record is third
                assert (
                    "run      part 3 of 8 of one 1 MiB WRITE, split by the kernel into 8 × 128 KiB"
                    in app.inspector.text
                ), app.inspector.text
                # Not on a kernel device: the lab says the limit is a guess.
                assert "guessed: back-to-back pieces of one size" in app.inspector.text
                app.stream._select(app.stream.rows.index(reads[1]))
                await pilot.pause()
                assert "run      READ 2 of 6 of a readahead run, window 4 KiB → 16 KiB" in app.inspector.text

        asyncio.run(asyncio.wait_for(run(), 60))
