"""The kernel queue's limits, read from sysfs (a loop device here; the VM tests read /dev/nbdN's)."""

from __future__ import annotations

import os
import subprocess

from helpers import require_root, require_tool

from buselab.transport.kernel import QUEUE_LIMITS, queue_limits


def test_queue_limits_of_a_real_block_device(tmp_path):
    require_root()
    require_tool("losetup")
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    device = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True, text=True, check=True)
    name = os.path.basename(device.stdout.strip())
    try:
        limits = queue_limits(name)
        assert set(limits) == set(QUEUE_LIMITS), limits
        expected = {key: open(f"/sys/block/{name}/queue/{key}").read().split() for key in QUEUE_LIMITS}
        for key in QUEUE_LIMITS:
            if key == "scheduler":  # "[none] mq-deadline": the bracketed one, without brackets
                assert f"[{limits[key]}]" in expected[key]
            else:
                assert limits[key] == int(expected[key][0]) and isinstance(limits[key], int)
    finally:
        subprocess.run(["losetup", "-d", device.stdout.strip()], check=True)


def test_no_device_no_limits():
    assert queue_limits("nbd-that-does-not-exist") == {}
