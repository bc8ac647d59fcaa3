"""Third-party backends: a package declares `[project.entry-points."buselab.backends"]` and
`buselab plugin NAME` finds it, without a file path.

The package here is real to importlib.metadata: a module plus a `*.dist-info` directory
(METADATA, entry_points.txt, RECORD) on sys.path, as pip leaves an installed wheel.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TIMEOUT, start_buselab

from buselab.client import NBDClient
from buselab.errors import UserError
from buselab.storage.backends.plugin import ENTRY_POINT_GROUP, PluginBackend, installed_backends

TINYDISK = '''
class TinyDisk:
    """A 1 MiB disk in a bytearray, from a package of its own."""

    def __init__(self):
        self.size = 1 << 20
        self.data = bytearray(self.size)

    def read(self, offset, length):
        return bytes(self.data[offset : offset + length])

    def write(self, offset, data):
        self.data[offset : offset + len(data)] = data

    def flush(self):
        pass
'''


def install(site: Path, name: str, module: str, source: str, entry: str) -> None:
    """Lay out an installed distribution `name` whose `buselab.backends` entry point is `entry`."""
    (site / f"{module}.py").write_text(source)
    info = site / f"{name.replace('-', '_')}-0.1.dist-info"  # as a wheel names it (normalized)
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{entry}\n")
    (info / "RECORD").write_text(f"{module}.py,,\n{info.name}/METADATA,,\n{info.name}/entry_points.txt,,\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    install(site, "buselab-tinydisk", "tinydisk", TINYDISK, "tiny = tinydisk:TinyDisk")
    install(site, "buselab-broken", "brokendisk", "import no_such_module\n", "broken = brokendisk:Disk")
    install(site, "buselab-notadisk", "notadisk", "class Thing:\n    pass\n", "thing = notadisk:Thing")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    return site


def test_buselab_plugin_name_serves_an_installed_backend(site, tmp_path):
    env_path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    os.environ["PYTHONPATH"], old = env_path, os.environ.get("PYTHONPATH")
    try:
        served = start_buselab(["plugin", "tiny"], tmp_path, name="tiny")
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    try:
        with NBDClient.connect_unix(served.socket) as client:
            client.sock.settimeout(TIMEOUT)
            assert client.size == 1 << 20
            client.write(4096, b"from a package")
            assert client.read(4096, 14) == b"from a package"
    finally:
        assert served.stop() == 0
    assert "serving plugin TinyDisk (tiny)" in served.output()


def test_installed_backends_are_listed_by_name(site):
    assert {"tiny", "broken", "thing"} <= set(installed_backends())
    backend = PluginBackend("tiny")
    assert backend.size == 1 << 20 and backend.caps.flush
    assert backend.source_file == str(site / "tinydisk.py")  # a plugin's bug is shown at its line


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("nosuch", "plugin nosuch: no such file, and no installed backend of that name (installed in the "),
        (
            "broken",
            "installed backend broken (brokendisk:Disk from buselab-broken) failed to import: "
            "ModuleNotFoundError: No module named 'no_such_module'",
        ),
        ("thing", "installed backend thing (notadisk:Thing from buselab-notadisk) is not a class with read"),
        ("missing.py", "plugin file missing.py does not exist"),
    ],
)
def test_a_backend_that_is_not_there_is_one_line(site, name, says):
    with pytest.raises(UserError) as info:
        PluginBackend(name)
    assert says in str(info.value) and "\n" not in str(info.value)
    if name == "nosuch":
        assert "tiny" in str(info.value)  # it says what is installed


def test_cli_names_an_unknown_backend_in_one_line(site, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "buselab", "plugin", "nosuch", "--unix", str(tmp_path / "s"), "--headless"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("buselab: error: plugin nosuch: no such file, and no installed backend")
    assert proc.stderr.count("\n") == 1 and "tiny" in proc.stderr
