"""Split I/Os and readahead runs found among finished requests (engine/runs.py)."""

from __future__ import annotations

from buselab.engine.runs import RunTracker, find_runs, runs_by_seq
from buselab.engine.telemetry import RequestRecord
from buselab.protocol import constants as c

KiB, MiB = 1 << 10, 1 << 20


def records(*specs, conn=1, gap=0.0001):
    """RequestRecords from (cmd, offset, length[, time]) tuples, seq from 1, arriving `gap` apart."""
    out = []
    t = 1000.0
    for seq, spec in enumerate(specs, 1):
        cmd, offset, length, *rest = spec
        t = rest[0] if rest else t + gap
        out.append(RequestRecord(seq, t, cmd, 0, offset, length, 0.0001, 0, conn, seq, None))
    return out


def test_a_direct_1mib_write_split_at_max_sectors():
    recs = records(*[(c.CMD_WRITE, 4 * MiB + i * 128 * KiB, 128 * KiB) for i in range(8)])
    (run,) = find_runs(recs, max_request=128 * KiB)
    assert run.kind == "split" and run.seqs == tuple(range(1, 9)) and run.length == MiB
    assert run.describe() == "one 1 MiB WRITE, split by the kernel into 8 × 128 KiB"


def test_a_split_whose_last_piece_is_short():
    recs = records(*[(c.CMD_WRITE, i * 128 * KiB, 128 * KiB) for i in range(2)], (c.CMD_WRITE, 256 * KiB, 4 * KiB))
    (run,) = find_runs(recs, max_request=128 * KiB)
    assert run.describe() == "one 260 KiB WRITE, split by the kernel into 2 × 128 KiB + 4 KiB"


def test_pieces_that_are_not_the_queue_limit_are_not_a_split():
    recs = records(*[(c.CMD_WRITE, i * 64 * KiB, 64 * KiB) for i in range(4)])
    assert find_runs(recs, max_request=128 * KiB) == []
    # Without the limit, back-to-back contiguous pieces of one big size are taken as a split.
    (run,) = find_runs(recs)
    assert run.kind == "split" and len(run.sizes) == 4


def test_pieces_far_apart_in_time_are_separate_ios():
    recs = records((c.CMD_WRITE, 0, 128 * KiB, 1.0), (c.CMD_WRITE, 128 * KiB, 128 * KiB, 1.5))
    assert find_runs(recs, max_request=128 * KiB) == []


def test_readahead_windows_grow():
    sizes = [4 * KiB, 16 * KiB, 32 * KiB, 64 * KiB, 128 * KiB, 128 * KiB]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    recs = records(*[(c.CMD_READ, o, n, 1.0 + i * 0.01) for i, (o, n) in enumerate(zip(offsets, sizes))])
    (run,) = find_runs(recs)
    assert run.kind == "readahead"
    assert run.describe() == "readahead: 6 sequential READs, window 4 KiB → 16 KiB → 32 KiB → 64 KiB → 128 KiB"
    assert set(runs_by_seq([run])) == set(range(1, 7))


def test_random_reads_and_other_connections_make_no_run():
    recs = records((c.CMD_READ, 0, 4 * KiB), (c.CMD_READ, MiB, 8 * KiB), (c.CMD_READ, 5 * MiB, 16 * KiB))
    assert find_runs(recs) == []
    # Growing and contiguous: readahead from one connection, nothing when each is another's.
    sizes = [4 * KiB, 8 * KiB, 16 * KiB, 32 * KiB]
    chain = records(*[(c.CMD_READ, sum(sizes[:i]), n) for i, n in enumerate(sizes)])
    assert [run.kind for run in find_runs(chain)] == ["readahead"]
    assert find_runs([r._replace(conn=i) for i, r in enumerate(chain)]) == []


def test_interleaved_connections_are_followed_separately():
    a = records(*[(c.CMD_WRITE, i * 128 * KiB, 128 * KiB) for i in range(4)], conn=1)
    b = records(*[(c.CMD_WRITE, 8 * MiB + i * 128 * KiB, 128 * KiB) for i in range(4)], conn=2)
    merged = []
    for x, y in zip(a, b):
        merged += [x._replace(seq=2 * x.seq - 1), y._replace(seq=2 * y.seq)]
    runs = find_runs(merged, max_request=128 * KiB)
    assert [(r.offset, r.seqs) for r in runs] == [(0, (1, 3, 5, 7)), (8 * MiB, (2, 4, 6, 8))]


def test_a_last_piece_sent_after_the_others_were_answered_still_belongs():
    # What the VM's kernel (6.1) did with a 1 MiB direct write at max_sectors_kb=128: seven
    # pieces read in one receive, each waiting behind the others (30 ms), the eighth sent
    # only once they were answered.
    t0 = 1000.0
    recs = [
        RequestRecord(i + 1, t0, c.CMD_WRITE, 0, 4 * MiB + i * 128 * KiB, 128 * KiB, 0.028 + i * 0.002, 0, 1, i, None)
        for i in range(7)
    ]
    recs.append(
        RequestRecord(8, t0 + 0.0402, c.CMD_WRITE, 0, 4 * MiB + 7 * 128 * KiB, 128 * KiB, 0.0004, 0, 1, 7, None)
    )
    (run,) = find_runs(recs, max_request=128 * KiB)
    assert run.seqs == tuple(range(1, 9)) and run.length == MiB
    # ... as in the VM, 20 ms after the last answer (the others took 30-60 ms) ...
    assert len(find_runs([*recs[:7], recs[7]._replace(time=t0 + 0.060)], max_request=128 * KiB)[0].seqs) == 8
    # A piece long after the last answer (more than the group's slowest took) is another I/O.
    late = recs[7]._replace(time=t0 + 0.1)
    assert [r.seqs for r in find_runs([*recs[:7], late], max_request=128 * KiB)] == [tuple(range(1, 8))]


def test_the_tracker_finds_a_run_that_straddles_ticks_and_follows_one_that_grows():
    pieces = records(*[(c.CMD_WRITE, i * 128 * KiB, 128 * KiB) for i in range(8)])
    tracker = RunTracker()
    tracker.max_request = 128 * KiB
    assert tracker.add(pieces[:3]) == {1, 2, 3}  # three pieces so far: a split of 3
    assert tracker.run_of(1).seqs == (1, 2, 3)
    changed = tracker.add(pieces[3:])
    # Rows drawn again: the first, the old last (└ becomes │) and the new pieces; not 2.
    assert changed == {1, 3, 4, 5, 6, 7, 8}
    run = tracker.run_of(5)
    assert run is tracker.run_of(1) and run.describe() == "one 1 MiB WRITE, split by the kernel into 8 × 128 KiB"
    assert run.part(3) == "part 3 of 8 of one 1 MiB WRITE, split by the kernel into 8 × 128 KiB"
    assert run.brief() == "1M WRITE split 8×128K"
    assert tracker.add([]) == set() and tracker.seen


def test_the_tracker_looks_back_to_the_start_of_a_run_its_window_would_cut():
    sizes = [4 * KiB, 8 * KiB, 16 * KiB] + [32 * KiB] * 20
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    recs = records(*[(c.CMD_READ, o, n) for o, n in zip(offsets, sizes)])
    tracker = RunTracker(window=4)  # far shorter than the run
    for i in range(0, len(recs), 3):
        tracker.add(recs[i : i + 3])
    run = tracker.run_of(1)
    assert run is not None and run.seqs == tuple(range(1, 24)) and tracker.run_of(23) is run
    assert run.brief() == "readahead 23 READs 4K→32K"
    assert run.part(2) == "READ 2 of 23 of a readahead run, window 4 KiB → 8 KiB → 16 KiB → 32 KiB"


def test_a_smaller_read_ends_one_readahead_run_and_may_start_the_next():
    sizes = [4 * KiB, 16 * KiB, 32 * KiB, 4 * KiB, 8 * KiB, 16 * KiB]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    recs = records(*[(c.CMD_READ, o, n) for o, n in zip(offsets, sizes)])
    assert [run.seqs for run in find_runs(recs)] == [(1, 2, 3), (4, 5, 6)]


def test_readahead_at_its_largest_window_is_not_taken_for_a_split():
    sizes = [64 * KiB, 128 * KiB, 128 * KiB, 128 * KiB]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    recs = records(*[(c.CMD_READ, o, n) for o, n in zip(offsets, sizes)])
    assert [run.kind for run in find_runs(recs)] == ["readahead"]


def test_no_run_reaches_across_requests_the_lab_left_out():
    pieces = records(*[(c.CMD_WRITE, i * 128 * KiB, 128 * KiB) for i in range(6)])
    tracker = RunTracker()
    tracker.add(pieces[:3])
    tracker.add(pieces[3:], after_gap=True)  # a "+N more" row came between
    assert tracker.run_of(1).seqs == (1, 2, 3) and tracker.run_of(4).seqs == (4, 5, 6)


def test_a_split_that_comes_in_batches_under_emulation_is_one_io():
    # The classroom VM (software emulation): one 1 MiB direct write reached buselab in batches of
    # up to three pieces, the next batch up to 18 ms after the last answer.
    arrivals = [0, 0, 0, 27.69, 27.69, 27.69, 51.33, 51.33]  # ms
    latencies = [7.68, 8.64, 9.64, 0.95, 14.81, 15.48, 0.50, 1.06]
    recs = [
        RequestRecord(i + 1, 1000.0 + t / 1e3, c.CMD_WRITE, 0, i * 128 * KiB, 128 * KiB, lat / 1e3, 0, 1, i, None)
        for i, (t, lat) in enumerate(zip(arrivals, latencies))
    ]
    (run,) = find_runs(recs, max_request=128 * KiB)
    assert run.describe() == "one 1 MiB WRITE, split by the kernel into 8 × 128 KiB"
