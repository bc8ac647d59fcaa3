"""Runs *inside* the test VM: the lab ties a split direct write and a readahead run together.

buselab serves /dev/nbd0 (ioctl attach) with the lab running headless on it. With the
queue's max_sectors_kb set to 128, a 1 MiB O_DIRECT write reaches buselab as 8 writes of
128 KiB; a cold buffered read of the device makes the page cache read ahead in growing
windows. The lab's tick finds both (RunTracker, with the kernel's max_sectors_kb), the
stream brackets them and the inspector names the part and the queue limit.

Prints one ``ok:`` or ``FAIL:`` line per check (and the stream's rows, for a human).
"""

from __future__ import annotations

import asyncio
import faulthandler
import subprocess
import sys

from buselab.engine.telemetry import RequestRecord
from buselab.session import ServeOptions, Session
from buselab.storage.registry import open_backend
from buselab.ui.lab import LabApp

MiB = 1 << 20
failures = 0


def check(ok: bool, what: str) -> None:
    global failures
    print(f"{'ok' if ok else 'FAIL'}: {what}", flush=True)
    failures += not ok


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=60)


async def lab(session: Session) -> None:
    app = LabApp(session, auto_poll=False)
    async with app.run_test(size=(160, 50)) as pilot:
        with open("/sys/block/nbd0/queue/max_sectors_kb", "w") as f:
            f.write("128")
        app.poll()  # what the attach read (the partition scan)
        await asyncio.to_thread(
            sh, "dd", "if=/dev/urandom", "of=/dev/nbd0", "bs=1M", "count=1", "seek=4", "oflag=direct"
        )
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        await asyncio.to_thread(sh, "dd", "if=/dev/nbd0", "of=/dev/null", "bs=4k", "count=256", "skip=2048")
        app._limits_read_at = -1e9  # read the queue limits now, not in 2 s
        app.poll()
        await pilot.pause()
        rows = [r for r in app.stream.rows if isinstance(r, RequestRecord)]
        text = "\n".join(app.stream.render_line(y).text for y in range(app.stream.size.height))
        print(text, flush=True)
        check(app.queue_limits.get("max_sectors_kb") == 128, f"queue limits read: {app.queue_limits}")
        writes = [r for r in rows if r.op == "WRITE" and 4 * MiB <= r.offset < 5 * MiB]
        t0 = writes[0].time if writes else 0.0
        for r in writes:  # for a human: when each piece arrived and was answered
            print(
                f"write {r.seq}: arrived +{1e3 * (r.time - t0):.3f} ms, answered +{1e3 * (r.time + r.latency - t0):.3f} ms"
            )
        runs = {app.runs.run_of(r.seq) for r in writes}
        check(
            len(writes) == 8 and len(runs) == 1 and None not in runs,
            f"the 1 MiB direct write: {len(writes)} writes in {len(runs)} run(s)",
        )
        check("└ 1M WRITE split 8×128K" in text, "the stream brackets the split write and says what it was")
        if writes:
            app.stream._select(app.stream.rows.index(writes[2]))
            await pilot.pause()
            inspector = app.inspector.text
            check(
                "part 3 of 8 of one 1 MiB WRITE, split by the kernel into 8 × 128 KiB" in inspector
                and "max_sectors_kb: 128 KiB (/dev/nbd0)" in inspector,
                "the inspector names the part and the queue's max_sectors_kb",
            )
        reads = [r for r in rows if r.op == "READ" and r.offset >= 8 * MiB]
        kinds = {run.kind for r in reads if (run := app.runs.run_of(r.seq)) is not None}
        sizes = [r.length // 1024 for r in reads]
        check("readahead" in kinds, f"the cold buffered read is readahead: READ sizes {sizes} KiB, runs {kinds}")
        if len(reads) > 1:
            app.stream._select(app.stream.rows.index(reads[1]))
            await pilot.pause()
            inspector = app.inspector.text
            check(
                f"READ 2 of {len(reads)} of a readahead run, window 4 KiB → 16 KiB" in inspector
                and "the queue's read_ahead_kb: 128 KiB" in inspector,
                "the inspector names the readahead run and the queue's read_ahead_kb",
            )
        check("readahead" in text, "the stream says readahead")


def main() -> int:
    faulthandler.dump_traceback_later(240, exit=True)
    session = Session(open_backend("ram", size=16 * MiB), ServeOptions(device="/dev/nbd0", use_ioctl=True))
    session.start()
    try:
        asyncio.run(lab(session))
    finally:
        session.stop()
    print(f"{'ok' if not failures else 'FAIL'}: runs in the VM done ({failures} failed)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
