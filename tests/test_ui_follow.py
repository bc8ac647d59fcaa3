"""While the stream follows, the inspector shows the newest request, even when a burst
arrives in pieces a tick apart.

The inspector is updated at most every 0.25 s while following (every tick would be
unreadable under load). A trial of `buselab lesson readahead --vm` on a loaded host saw a
4 MiB write reach buselab as 32 pieces over two ticks: the first tick showed piece 6 ("part 6
of 6 of one 768 KiB WRITE"), the second came within 0.25 s and was not shown, and no request
came after it, so the inspector stayed on the sixth piece while the stream showed the whole
write. Here a real client sends the two halves of such a burst between two polls.
"""

from __future__ import annotations

import threading
import time

from helpers import aio, connect

from buselab.engine.telemetry import RequestRecord
from buselab.ui.lab import INSPECTOR_FOLLOW_EVERY, LabApp

KiB, MiB = 1 << 10, 1 << 20
PIECE = 128 * KiB


def write_pieces(client, first: int, count: int) -> None:
    """`count` back-to-back 128 KiB writes from piece `first` on, as the kernel splits one big write."""
    for i in range(first, first + count):
        client.write(4 * MiB + i * PIECE, bytes([i]) * PIECE)


def requests(app: LabApp) -> list[RequestRecord]:
    return [row for row in app.stream.rows if isinstance(row, RequestRecord)]


@aio(timeout=30)
async def test_following_catches_up_with_a_burst_that_came_in_the_interval(session):
    client = connect(session)
    app = LabApp(session, auto_poll=False)
    async with app.run_test(size=(160, 50)) as pilot:
        await pilot.pause()
        assert app.stream.follow
        # Polled synchronously: the second half comes within BACK_TO_BACK of the first, one write.
        write_pieces(client, 0, 6)
        app.poll()
        assert app.inspector.record is requests(app)[-1]
        assert "part 6 of 6 of one 768 KiB WRITE" in app.inspector.text, app.inspector.text
        write_pieces(client, 6, 26)
        app.poll()  # within the interval: the inspector may wait
        newest = requests(app)[-1]
        assert len(requests(app)) == 32
        time.sleep(INSPECTOR_FOLLOW_EVERY + 0.05)
        app.poll()  # no new request: the inspector still catches up
        await pilot.pause()
        shown = app.inspector.record.seq if app.inspector.record else None
        assert shown == newest.seq, f"the inspector shows #{shown}, the stream #{newest.seq}"
        assert "part 32 of 32 of one 4 MiB WRITE, split by the kernel into 32 × 128 KiB" in app.inspector.text
        assert app.inspector.pane_subtitle == f"#{newest.seq}"
    client.close()


@aio(timeout=30)
async def test_a_selected_request_says_so_when_its_run_grows(session):
    client = connect(session)
    app = LabApp(session, auto_poll=False)
    async with app.run_test(size=(160, 50)) as pilot:
        await pilot.pause()
        write_pieces(client, 0, 6)
        app.poll()
        app.stream._select(app.stream.rows.index(requests(app)[2]))
        await pilot.pause()  # the selection reaches the inspector
        assert not app.stream.follow and "part 3 of 6 of one 768 KiB WRITE" in app.inspector.text
        write_pieces(client, 6, 2)  # soon enough after the last piece to be the same write
        app.poll()
        await pilot.pause()
        assert app.inspector.record is requests(app)[2]
        assert "part 3 of 8 of one 1 MiB WRITE" in app.inspector.text, app.inspector.text
    client.close()


@aio(timeout=30)
async def test_a_request_a_breakpoint_caught_stays_while_nothing_new_arrives(session):
    """Catching up applies to what following put there: the held request a breakpoint caught
    stays in the inspector, though the stream's newest answered request is another."""
    client, other = connect(session), connect(session)
    app = LabApp(session, auto_poll=False)
    async with app.run_test(size=(160, 50)) as pilot:
        await pilot.pause()
        write_pieces(client, 0, 3)
        app.poll()
        session.steering.add_breakpoint("op=trim")
        trim = threading.Thread(target=other.trim, args=(0, 4096), daemon=True)
        trim.start()
        deadline = time.monotonic() + 5
        while not session.engine.gate.held():
            assert time.monotonic() < deadline, "the breakpoint held nothing"
            time.sleep(0.005)
        app.poll()  # the hit
        app.poll()  # the held request, into the inspector
        assert "caught by breakpoint 1" in app.inspector.text, app.inspector.text
        for _ in range(2):
            time.sleep(INSPECTOR_FOLLOW_EVERY + 0.05)
            app.poll()
        assert "caught by breakpoint 1" in app.inspector.text, app.inspector.text
        session.engine.gate.release_all()
        trim.join(5)
    client.close()
    other.close()
