"""Requests in flight, honest latency, sizes and patterns (issue 14).

A request's latency is the time it spent in buselab, from when its connection read
it (requests read together share that arrival) to its reply. Requests in flight are
the ones read and not answered, held ones included. These tests drive real clients:
a RawClient that pipelines requests, NBDClient, fio's nbd engine, the lab under
Textual's pilot.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import struct
import subprocess
import time

import pytest
from helpers import RawClient, aio, connect, require_tool, serve, socket_path, wait_for

from buselab.commands.ctl import render
from buselab.engine import telemetry as tm
from buselab.headless import stats_line
from buselab.protocol import constants as c
from buselab.sizes import latency_text
from buselab.steering.results import to_json
from buselab.storage.registry import open_backend
from buselab.trace.stats import format_text, summarize
from buselab.ui.lab import LabApp

MiB = 1 << 20
BLOCK = 4096


def pipelined_reads(count: int, first_handle: int = 1, offset: int = 0) -> bytes:
    """`count` READ requests of a block each, back to back in one buffer (one send)."""
    return b"".join(
        struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_READ, first_handle + i, offset + i * BLOCK, BLOCK)
        for i in range(count)
    )


def read_replies(client: RawClient, count: int) -> list[float]:
    """Read `count` simple READ replies; perf_counter when each arrived."""
    times = []
    for _ in range(count):
        error, _ = client.simple_reply()
        assert error == 0
        client.recv_exact(BLOCK)
        times.append(time.perf_counter())
    return times


def status(session) -> dict:
    return to_json(session.status())


def ram(size: int = 16 * MiB):
    return open_backend("ram", size=size)


# --- requests in flight ---------------------------------------------------------------------------


def test_pipelined_requests_are_in_flight_together_and_their_latency_includes_the_wait(tmp_path):
    """32 reads sent at once against a 10 ms read delay: all 32 are in flight at once, and
    the last one's latency is the ~320 ms it waited behind the others, as its client saw."""
    with serve(ram(), tmp_path, filters=["delay:read=10ms"]) as session:
        client = RawClient(socket_path(session))
        sent = time.perf_counter()
        client.send(pipelined_reads(32))
        time.sleep(0.1)  # about 10 answered, or being answered
        mid = status(session)
        assert mid["in_flight"] >= 16, mid["in_flight"]
        (conn,) = mid["in_flight_by_connection"]
        assert conn["in_flight"] == mid["in_flight"]
        replies = read_replies(client, 32)
        after = status(session)
        assert after["in_flight"] == 0
        assert after["max_in_flight"] >= 16 and after["max_in_flight"] == 32, after["max_in_flight"]
        assert after["in_flight_by_connection"][0]["max_in_flight"] == 32
        records = session.engine.telemetry.recent()
        assert len(records) == 32
        waited = replies[-1] - sent  # what the client waited for its last reply
        slowest = max(r.latency for r in records)
        assert slowest == pytest.approx(waited, rel=0.05), (slowest, waited)
        assert slowest >= 0.3
        # The lab's p99 is the slowest's (32 requests: nearest rank is the last one), within 2.2%.
        assert after["latency"]["READ"]["p99_ms"] == pytest.approx(slowest * 1e3, rel=0.03)
        client.close()


def test_a_reply_is_not_held_back_for_the_rest_of_a_slow_batch(tmp_path):
    """Four reads sent together behind a 50 ms delay: each reply leaves when its read is done,
    so the first client-visible latency is its own 50 ms (not the batch's 200 ms) and what
    buselab records is what the client waited."""
    with serve(ram(), tmp_path, filters=["delay:read=50ms"]) as session:
        client = RawClient(socket_path(session))
        sent = time.perf_counter()
        client.send(pipelined_reads(4))
        waited = [t - sent for t in read_replies(client, 4)]
        client.close()
        assert waited[0] < 0.12, waited  # 0.2 s if it waited for the batch
        recorded = sorted(r.latency for r in session.engine.telemetry.recent())
        for client_saw, buselab_said in zip(waited, recorded):
            assert client_saw == pytest.approx(buselab_said, abs=0.02), (waited, recorded)


def test_each_connection_counts_its_own(tmp_path):
    with serve(ram(), tmp_path, filters=["delay:read=10ms"]) as session:
        busy, light = RawClient(socket_path(session)), RawClient(socket_path(session))
        busy.send(pipelined_reads(20))
        light.send(pipelined_reads(5, offset=8 * MiB))
        time.sleep(0.03)
        by_conn = {c["conn"]: c for c in status(session)["in_flight_by_connection"]}
        assert len(by_conn) == 2
        first, second = sorted(by_conn)
        assert by_conn[first]["in_flight"] >= 12 and 1 <= by_conn[second]["in_flight"] <= 5, by_conn
        read_replies(busy, 20)
        read_replies(light, 5)
        after = status(session)
        by_conn = {c["conn"]: c for c in after["in_flight_by_connection"]}
        assert (by_conn[first]["max_in_flight"], by_conn[second]["max_in_flight"]) == (20, 5), by_conn
        assert after["max_in_flight"] >= 21  # the two overlapped
        assert all(c["in_flight"] == 0 for c in by_conn.values())
        busy.close()
        light.close()


def test_held_requests_are_in_flight(tmp_path):
    with serve(ram(), tmp_path) as session:
        client = RawClient(socket_path(session))
        session.steering.pause()
        client.send(pipelined_reads(3))
        assert session.engine.gate.wait_held(3, 10)
        now = status(session)
        assert now["in_flight"] == 3 and now["in_flight_by_connection"][0]["in_flight"] == 3
        session.steering.resume()
        read_replies(client, 3)
        # The gate's worker counts a released request answered just after its reply leaves.
        wait_for(lambda: status(session)["in_flight"] == 0)
        assert status(session)["max_in_flight"] >= 3
        client.close()


def test_max_overlap_counts_requests_running_at_once():
    assert tm.max_overlap([], []) == 0
    assert tm.max_overlap([0.0, 0.0, 0.0], [1.0, 2.0, 3.0]) == 3  # read together
    assert tm.max_overlap([0.0, 1.0, 2.0], [1.0, 2.0, 3.0]) == 1  # one after the other
    assert tm.max_overlap([0.0, 0.5, 0.6, 5.0], [1.0, 0.7, 4.0, 6.0]) == 3
    # Only at the instants asked about, counting every interval.
    assert tm.max_overlap([0.0, 0.0, 3.0], [5.0, 5.0, 4.0], at=[3.0]) == 3


# --- honest latency --------------------------------------------------------------------------------


@pytest.mark.parametrize("seconds", [1.3e-6, 8.1e-6, 57e-6, 250e-6, 1.7e-3, 25e-3, 0.4, 3.0, 700.0])
def test_a_percentile_is_within_five_percent_of_the_latency(seconds):
    hist = [0] * tm.LATENCY_BUCKETS
    for _ in range(10):
        hist[tm.latency_bucket(seconds)] += 1
    assert tm.percentile(hist, 0.5) == pytest.approx(seconds, rel=0.022)
    low, high = tm.bucket_bounds(tm.latency_bucket(seconds))
    assert low <= seconds < high and high / low < 1.05


def test_the_histogram_percentiles_agree_with_the_exact_ones():
    telemetry = tm.Telemetry(64 * MiB)
    rec = telemetry.recorder()
    latencies = [10e-6 * 1.07**i for i in range(120)]  # 10 µs .. 33 ms
    for i, latency in enumerate(latencies):
        telemetry.record(rec, c.CMD_READ, 0, i * BLOCK, BLOCK, 100.0, 100.0 + latency, 0, 1, i, None)
    snap = telemetry.snapshot()
    exact = sorted(latencies)
    for q in (0.5, 0.9, 0.99):
        nearest = exact[math.ceil(q * len(exact)) - 1]
        assert tm.percentile(snap.latency[c.CMD_READ], q) == pytest.approx(nearest, rel=0.022), q


def test_a_25ms_read_delay_shows_as_25ms(tmp_path):
    """The p50 that `ctl status`, the lab and --headless give, against what the client measured."""
    with serve(ram(), tmp_path, filters=["delay:read=25ms"]) as session:
        nbd = connect(session)
        before = session.engine.telemetry.snapshot()
        measured = []
        for i in range(15):
            started = time.perf_counter()
            nbd.read(i * BLOCK, BLOCK)
            measured.append(time.perf_counter() - started)
        nbd.close()
        truth = statistics.median(measured)
        exact = statistics.median(r.latency for r in session.engine.telemetry.recent())
        assert truth == pytest.approx(exact, rel=0.02)  # the client adds little to what buselab spent
        p50 = status(session)["latency"]["READ"]["p50_ms"] / 1e3
        assert p50 == pytest.approx(truth, rel=0.05), (p50, truth)
        line = stats_line(session, before, session.engine.telemetry.snapshot())
        shown = re.search(r"p50 ([\d.]+) ms", line)
        assert shown is not None, line
        assert float(shown[1]) / 1e3 == pytest.approx(truth, rel=0.05), line
        # ... and `buselab ctl status` in plain text, for people.
        text = render("status", status(session))
        shown = re.search(r"READ +p50 ([\d.]+) ms, p99 [\d.]+ ms \(15 requests, (\d+)% sequential\)", text)
        assert shown is not None, text
        assert float(shown[1]) / 1e3 == pytest.approx(truth, rel=0.05), text
        assert int(shown[2]) >= 90, text  # 15 reads, each after the last
        assert re.search(r"in flight: 0 now, at most 1 \(last \d+ s\)", text), text


def test_ctl_status_says_the_power_is_off(tmp_path):
    with serve(ram(), tmp_path, filters=["cache"]) as session:
        assert "POWER OFF" not in render("status", status(session))
        session.steering.powercut()
        assert status(session)["powered_off"] is True
        assert "state: POWER OFF (every request fails with EIO until poweron)" in render("status", status(session))
        session.steering.poweron()
        assert status(session)["powered_off"] is False


def test_microsecond_latencies_print_as_microseconds(tmp_path):
    with serve(ram(), tmp_path) as session:
        nbd = connect(session)
        before = session.engine.telemetry.snapshot()
        for i in range(20):
            nbd.read(i * BLOCK, BLOCK)
        nbd.close()
        line = stats_line(session, before, session.engine.telemetry.snapshot())
    assert re.search(r"\| p50 [\d.]+ µs p99 [\d.]+ [µm]s \|", line), line
    assert "0.00 ms" not in line and "| in flight 0, max 1 |" in line, line
    # buselab stats: a 5 µs read is not "0.005 ms".
    records = [_Rec(c.CMD_READ, 0, BLOCK, 5e-6, 0, float(i)) for i in range(3)]
    text = format_text(summarize(records, size=64 * MiB))
    assert "5.00 µs" in text and "0.005 ms" not in text
    assert latency_text(8.1e-6) == "8.10 µs" and latency_text(250e-6) == "250 µs"
    assert latency_text(25.1e-3) == "25.1 ms" and latency_text(1.2) == "1.20 s"


class _Rec:
    def __init__(self, cmd: int, offset: int, length: int, latency: float, error: int, t: float) -> None:
        self.cmd, self.offset, self.length, self.latency, self.error, self.t = cmd, offset, length, latency, error, t


# --- sizes and patterns ----------------------------------------------------------------------------


def test_sizes_and_the_sequential_share_per_op(tmp_path):
    with serve(ram(), tmp_path) as session:
        nbd = connect(session)
        for i in range(10):  # sequential 4 KiB reads
            nbd.read(i * BLOCK, BLOCK)
        for offset in (9 * MiB, 2 * MiB, 7 * MiB, 1 * MiB, 5 * MiB):  # random 64 KiB writes
            nbd.write(offset, bytes(64 << 10))
        nbd.write(12 * MiB, bytes(3000))  # 3000 bytes: in the 4096 bucket
        nbd.close()
        now = status(session)
    assert now["sizes"] == {"READ": {"4096": 10}, "WRITE": {"4096": 1, "65536": 5}}
    assert now["sequential"]["READ"] == {"sequential": 9, "random": 0, "share": 1.0}
    assert now["sequential"]["WRITE"] == {"sequential": 0, "random": 5, "share": 0.0}


# --- fio: what the client waited, and what Little's law makes of buselab's numbers ----------------------


def test_fio_at_iodepth_32_is_32_in_flight_and_littles_law_gives_its_latency(tmp_path):
    require_tool("fio")
    with serve(ram(64 * MiB), tmp_path, filters=["delay:read=2ms"]) as session:
        uri = f"nbd+unix:///?socket={socket_path(session)}"
        proc = subprocess.run(
            ["fio", "--name=qd32", "--ioengine=nbd", f"--uri={uri}", "--rw=randread", "--bs=4k", "--iodepth=32",
             "--runtime=2", "--time_based", "--size=64M", "--output-format=json"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        now = status(session)
    out = proc.stdout
    read = json.loads(out[out.index("{") :])["jobs"][0]["read"]
    fio_latency = read["clat_ns"]["mean"] / 1e9
    assert now["max_in_flight"] >= 16, now["max_in_flight"]
    # Little's law: a client keeping N outstanding at X/s waits N / X for each.
    assert now["max_in_flight"] / read["iops"] == pytest.approx(fio_latency, rel=0.2)
    # buselab's own share is less: fio's requests also waited in the socket for their turn.
    assert now["latency"]["READ"]["p50_ms"] / 1e3 < fio_latency


# --- the lab ---------------------------------------------------------------------------------------------


@aio
async def test_the_lab_shows_requests_in_flight(tmp_path):
    with serve(ram(), tmp_path) as session:
        client = RawClient(socket_path(session))
        app = LabApp(session, auto_poll=False)
        async with app.run_test(size=(160, 50)) as pilot:
            app.poll()
            await pilot.pause()
            assert "0 in flight (max 0)" in app.header_widget.plain
            session.steering.pause()
            client.send(pipelined_reads(3))
            wait_for(lambda: len(session.engine.gate.held()) == 3)
            app.poll()
            await pilot.pause()
            assert "3 in flight (max 3)" in app.header_widget.plain
            session.steering.resume()
            read_replies(client, 3)
            wait_for(lambda: not session.engine.gate.releasing)  # answered, and counted so
            app.model.sample_every = 0.01  # a graph sample at the next poll
            time.sleep(0.02)
            app.poll()
            await pilot.pause()
            header = app.header_widget.plain
            assert "0 in flight (max 3)" in header, header
            graphs = "\n".join(app.graphs.render_line(y).text for y in range(app.graphs.size.height))
            assert "in flight" in graphs and "max 3" in graphs, graphs
            assert "READ" in graphs and "sequential" in graphs and "4K 100%" in graphs, graphs
        client.close()


@aio
async def test_a_long_filter_spec_leaves_the_requests_in_flight_on_the_first_line(tmp_path):
    spec = "delay:read=2ms,write=2ms,flush=2ms,trim=2ms,zero=2ms,cache=2ms,extents=2ms"
    with serve(ram(), tmp_path) as session:
        session.steering.add_filter(spec)
        app = LabApp(session, auto_poll=False)
        async with app.run_test(size=(160, 50)) as pilot:
            app.poll()
            await pilot.pause()
            first, _totals, steering = app.header_widget.plain.splitlines()[:3]
            assert "ram (sparse, in memory) + delay " in first and "0 in flight (max 0)" in first, first
            assert "delay:read=2ms" in steering, steering  # the whole spec, where the filters are


def test_the_lab_samples_carry_in_flight_and_littles_mean(tmp_path):
    """32 pipelined reads at 10 ms: the lab's sample of that second says 32 at most, and a mean
    in flight (latency-seconds per second) far above 1."""
    from buselab.ui.model import LabModel

    with serve(ram(), tmp_path, filters=["delay:read=10ms"]) as session:
        model = LabModel(session, sample_every=0.05)
        client = RawClient(socket_path(session))
        client.send(pipelined_reads(32))
        read_replies(client, 32)
        time.sleep(0.06)
        model.poll()
        sample = model.latest
        assert sample is not None and sample.requests == 32
        assert sample.max_in_flight == 32 and sample.mean_in_flight > 5, sample
        assert model.max_in_flight == 32
        client.close()
