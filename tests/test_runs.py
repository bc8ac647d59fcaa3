"""Split I/Os and readahead runs found among finished requests (engine/runs.py)."""

from __future__ import annotations

from buselab.engine.runs import find_runs, runs_by_seq
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
