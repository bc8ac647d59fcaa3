"""The lab says what each request touches: the stream's "what" column and the inspector's row."""

from __future__ import annotations

import asyncio
import subprocess
import time

from helpers import connect, require_tool, serve

from buselab.engine.telemetry import RequestRecord
from buselab.storage.backends.ram import RamBackend
from buselab.ui.lab import LabApp

MiB = 1 << 20


def test_the_stream_and_inspector_name_the_structure(tmp_path):
    require_tool("mkfs.ext4")
    image = tmp_path / "ext4.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", str(image), "16384k"], check=True)
    backend = RamBackend(16 * MiB)
    backend.write(0, image.read_bytes())
    with serve(backend, tmp_path) as session:
        deadline = time.monotonic() + 10
        while session.labeller.map is None or not session.labeller.map.filesystems:
            assert time.monotonic() < deadline, "the session's labeller did not map the ext4 disk"
            time.sleep(0.05)
        client = connect(session)

        async def run() -> None:
            app = LabApp(session, auto_poll=False)
            async with app.run_test(size=(160, 50)) as pilot:
                client.read(1024, 1024)  # the primary superblock
                client.read(12 * MiB, 4096)  # somewhere in group 0's data
                app.poll()
                await pilot.pause()
                rows = [r for r in app.stream.rows if isinstance(r, RequestRecord)]
                assert [r.offset for r in rows] == [1024, 12 * MiB]
                text = "\n".join(app.stream.render_line(y).text for y in range(app.stream.size.height))
                assert "what" in text and "ext4 superblock (primary)" in text, text
                # The inspector follows the newest request: a free block of group 0.
                assert "what     ext4 group 0 free blocks" in app.inspector.text, app.inspector.text

        asyncio.run(run())
        client.close()
