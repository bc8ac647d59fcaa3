"""The kernel queue's limits, read from sysfs (a loop device here; the VM tests read /dev/nbdN's)."""

from __future__ import annotations

import os

import pytest
from helpers import loop_device, require_root, require_tool

from buselab.transport.kernel import QUEUE_LIMITS, queue_limits
from buselab.ui.graphs import queue_text


@pytest.fixture
def loop_name(tmp_path):
    """A loop device over a 1 MiB file: its name in /sys/block (loop3)."""
    require_root()
    require_tool("losetup")
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    with loop_device(image) as device:
        yield os.path.basename(device)


def test_queue_limits_of_a_real_block_device(loop_name):
    name = loop_name
    limits = queue_limits(name)
    assert set(limits) == set(QUEUE_LIMITS), limits
    expected = {key: open(f"/sys/block/{name}/queue/{key}").read().split() for key in QUEUE_LIMITS}
    for key in QUEUE_LIMITS:
        if key == "scheduler":  # "[none] mq-deadline": the bracketed one, without brackets
            assert f"[{limits[key]}]" in expected[key]
        else:
            assert limits[key] == int(expected[key][0]) and isinstance(limits[key], int)


def test_no_device_no_limits():
    assert queue_limits("nbd-that-does-not-exist") == {}


def test_the_lab_says_what_the_queue_allows(loop_name):
    """The line over the size chart: set the loop device's max_sectors_kb and read_ahead_kb, read them back."""
    name = loop_name
    for key, value in (("max_sectors_kb", "128"), ("read_ahead_kb", "64")):
        with open(f"/sys/block/{name}/queue/{key}", "w") as f:
            f.write(value)
    limits = queue_limits(name)
    text = queue_text(limits, 160)
    assert text.startswith("queue: requests up to 128K (bigger I/O is split) · readahead 64K · "), text
    assert f"{limits['nr_requests']} queued" in text and f"scheduler {limits['scheduler']}" in text, text
    assert text.endswith(f"{limits['logical_block_size']} B blocks"), text
    narrow = queue_text(limits, 40)
    assert narrow == "queue: requests up to 128K · readahead 64K", narrow
    assert queue_text({}, 160) == ""  # not attached: no line
