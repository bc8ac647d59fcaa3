"""The command line as a shell user meets it: bare `buselab`, refused kernel options, man page, completion."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import require_tool

BUSELAB = [sys.executable, "-m", "buselab"]


def buselab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*BUSELAB, *args], capture_output=True, text=True, timeout=30)


def test_bare_buselab_prints_the_help_and_exits_1():
    proc = buselab()
    assert proc.returncode == 1  # as git: nothing was done, so not a success
    assert proc.stderr == ""
    assert proc.stdout.startswith("usage: buselab ")
    assert proc.stdout == buselab("--help").stdout


@pytest.mark.parametrize(
    "options, named",
    [
        (["--connections", "2"], "--connections"),
        (["--timeout", "30"], "--timeout"),
        (["--ioctl"], "--ioctl"),
        (["--timeout", "0", "--ioctl"], "--timeout, --ioctl"),
    ],
)
def test_kernel_options_without_a_device_are_refused(options, named, tmp_path):
    proc = buselab("ram", "--size", "1M", "--unix", str(tmp_path / "s"), *options)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"buselab: error: {named}: only for a kernel device; give DEVICE")
    assert proc.stderr.count("\n") == 1
    assert not (tmp_path / "s").exists()


def test_man_page_renders_without_warnings():
    require_tool("groff")
    page = buselab("man")
    assert page.returncode == 0, page.stderr
    rendered = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-P", "-cbou"], input=page.stdout, capture_output=True, text=True, timeout=30
    )
    assert rendered.stderr == ""  # every request understood, nothing to warn about
    text = rendered.stdout.replace("\u2010", "-")  # groff may hyphenate with U+2010
    for words in ("buselab ram", "--run CMD", "--pidfile FILE", "buselab ctl break add", "SOCKET ACTIVATION"):
        assert words in " ".join(text.split()), words


def test_man_l_reads_it(tmp_path):
    require_tool("man")
    path = tmp_path / "buselab.1"
    path.write_text(buselab("man").stdout)
    shown = subprocess.run(
        ["man", "-l", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={"MANPAGER": "cat", "PATH": "/usr/bin:/bin", "MANWIDTH": "100"},
    )
    assert shown.returncode == 0, shown.stderr
    assert "buselab - A block device in userspace" in shown.stdout


BASH_COMPLETE = """
source <({buselab} completion bash)
complete -p buselab
for line in "${{@}}"; do
    read -ra COMP_WORDS <<< "$line"
    [[ $line == *" " ]] && COMP_WORDS+=("")
    COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1))
    COMPREPLY=()
    _buselab
    echo "${{COMPREPLY[*]}}"
done
"""


def test_bash_completion_loads_and_completes():
    require_tool("bash")
    lines = [
        "buselab r",
        "buselab ram --re",
        "buselab ram --record-payload ",
        "buselab completion ",
        "buselab ctl /run/x.ctl break ",
        "buselab ctl st",
        "buselab ram --size 1M --fi",
    ]
    command = " ".join(BUSELAB)
    proc = subprocess.run(
        ["bash", "-c", BASH_COMPLETE.format(buselab=command), "bash", *lines],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "complete -o filenames -F _buselab buselab",
        "ram replay",
        "--readonly --record --record-payload",
        "none writes all",
        "bash zsh",
        "add list ls rm remove enable disable toggle",
        "status step stop",
        "--filter",
    ]


def test_zsh_completion_loads():
    require_tool("zsh")
    command = " ".join(BUSELAB)
    proc = subprocess.run(
        ["zsh", "-f", "-c", f"source <({command} completion zsh) && print -r -- $_comps[buselab]"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.strip() == "_bash_complete -o filenames -F _buselab"
