"""`buselab lesson [NAME [DEVICE | --vm]]`: guided classroom lessons on a real block device.

Without NAME: the lessons, in teaching order. With NAME and DEVICE (/dev/nbdN, as root): a
RAM disk attached there and the lab with the lesson's pane. With NAME and `--vm` (no root, no
nbd driver needed): the RAM disk is served here, a small qemu VM attaches its own /dev/nbd0 to
it with the real nbd driver, and the step's commands run in that VM (`r` in the lab, or
`--auto`), see buselab/vm/guest.py. `--auto` runs each step's commands itself; with
`--headless` too it prints the steps and what each checkpoint found, and exits 1 with the
step's name if a checkpoint never fires (the VM tests run it so).
docs/lessons.md is the teacher's guide and the lesson format.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading

from ..control import default_control_path
from ..errors import UserError
from ..lessons import LessonError, LessonRunner, builtin_paths, find_lesson, run_auto
from ..lessons.runner import remote_executor
from ..session import ServeOptions, Session
from ..signals import stop_on_signals
from ..sizes import parse_size
from ..storage.registry import open_backend

DEFAULT_MOUNT = "/mnt/buselab-lesson"
VM_MOUNT = "/tmp/buselab-lesson"  # the guest's root is the host's, read-only: its /tmp is its own


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "lesson",
        help="guided classroom lessons on a real disk: mkfs, the journal, FLUSH/FUA, TRIM, readahead, ...",
        description="Without NAME, list the lessons. With NAME and DEVICE, attach a RAM disk at DEVICE"
        " (/dev/nbdN, root) and open the lab with the lesson: steps, the commands to run in another"
        " terminal, and checkpoints that wait for the I/O, pause on it and explain it with this run's"
        " numbers. NAME may also be a lesson file (.toml, see docs/lessons.md).",
    )
    p.add_argument("name", nargs="?", metavar="NAME", help="a lesson (see `buselab lesson`) or a .toml file")
    p.add_argument("device", nargs="?", metavar="DEVICE", help="/dev/nbdN to attach the lesson's disk at (root)")
    p.add_argument(
        "--vm",
        action="store_true",
        help="no root needed: attach the disk at /dev/nbd0 in a small qemu VM and run the commands there",
    )
    p.add_argument("--auto", action="store_true", help="run each step's commands, pause at each checkpoint")
    p.add_argument(
        "--hold", type=float, default=5.0, metavar="SECONDS", help="--auto: how long a checkpoint stays (default 5)"
    )
    p.add_argument("--headless", action="store_true", help="with --auto: print the steps instead of the lab")
    # 1G: ext4 with 4 KiB blocks then has 8 block groups, so mkfs writes superblock backups
    # (sparse: only what is written takes memory).
    p.add_argument("--size", default="1G", help="the lesson disk's size (default 1G, sparse)")
    p.add_argument(
        "--mnt",
        default=None,
        metavar="DIR",
        help=f"mount point for {{mnt}} (default {DEFAULT_MOUNT}, with --vm {VM_MOUNT} in the VM)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.name:
        return list_lessons()
    lesson = find_lesson(args.name)
    if args.vm and args.device:
        raise UserError(f"--vm attaches the disk at /dev/nbd0 inside the VM: leave {args.device} out")
    if not args.device and not args.vm:
        raise UserError(
            f"lesson {lesson.name} needs a block device: give /dev/nbdN (as root), e.g. `sudo buselab lesson {lesson.name} /dev/nbd0`,"
            f" or run it in a VM without root: `buselab lesson {lesson.name} --vm`"
        )
    if args.headless and not args.auto:
        raise UserError("--headless needs --auto: without the lab nobody would see the steps")
    if args.hold < 0:
        raise UserError(f"--hold must be 0 seconds or more, got {args.hold:g}")
    if args.vm:
        return _run_in_vm(args, lesson)
    if args.auto:
        missing = [tool for tool in lesson.needs if shutil.which(tool) is None]
        if missing:
            raise UserError(f"lesson {lesson.name} runs {', '.join(missing)}, which this machine does not have")
    backend = open_backend("ram", size=parse_size(args.size))
    session = Session(backend, ServeOptions(device=args.device, control=default_control_path()))
    with stop_on_signals(session.stop_requested):
        session.start()
        try:
            runner = LessonRunner(session, lesson, device=args.device, mount_dir=args.mnt or DEFAULT_MOUNT)
            return _present(session, runner, args)
        finally:
            session.stop()


def _present(session: Session, runner: LessonRunner, args: argparse.Namespace) -> int:
    if args.headless:
        return _headless(session, runner, args.hold)
    from ..ui.lesson import run_lesson_lab

    return run_lesson_lab(session, runner, auto=args.auto, hold=args.hold)


def _run_in_vm(args: argparse.Namespace, lesson) -> int:
    """The lesson with its disk served here and attached at /dev/nbd0 in a qemu VM (no root)."""
    from ..vm.guest import GUEST_DEVICE, GuestVm, VmStartError, image_for_lesson
    from ..vm.machine import guest_env

    # The guest runs this machine's programs (its root is ours, read-only), as root: look for
    # them where root's PATH would.
    guest_path = guest_env()["PATH"]
    missing = [tool for tool in lesson.needs if shutil.which(tool, path=guest_path) is None]
    if missing:
        raise UserError(f"lesson {lesson.name} runs {', '.join(missing)}, which this machine does not have")
    if not args.headless and not (sys.stdin.isatty() and sys.stdout.isatty()):  # before a boot for nothing
        raise UserError("a lesson's lab needs a terminal: with --auto, --headless prints the steps instead")
    size = parse_size(args.size)
    try:
        image = image_for_lesson()
    except VmStartError as exc:
        raise UserError(str(exc)) from None
    backend = open_backend("ram", size=size)
    # No listener: the VM's one NBD connection is handed to the session once it has shown the
    # token (guest.py), so other users of this machine cannot reach the lesson's disk.
    session = Session(backend, ServeOptions(control=default_control_path()))
    with stop_on_signals(session.stop_requested):
        session.start()
        vm: GuestVm | None = None
        try:
            print(
                f"buselab: booting the lesson's VM (kernel {image.kernel_version}, software emulation: ~20 s)",
                file=sys.stderr,
                flush=True,
            )
            vm = GuestVm(image, lambda sock: session.network.serve_socket(sock, "the lesson's VM"))
            try:
                vm.start()
            except VmStartError as exc:
                raise UserError(str(exc)) from None
            session.kernel = vm  # the lab and the runner read the device and its queue limits from it
            print(
                f"buselab: {GUEST_DEVICE} attached in the VM (kernel {vm.kernel_release})", file=sys.stderr, flush=True
            )
            runner = LessonRunner(
                session,
                lesson,
                device=GUEST_DEVICE,
                mount_dir=args.mnt or VM_MOUNT,
                execute=remote_executor(vm.run),
                where="the VM",
            )
            return _present(session, runner, args)
        finally:
            session.stop()  # answers what is held, then detaches: the VM powers off
            if vm is not None:
                vm.stop()


def list_lessons() -> int:
    for name in builtin_paths():
        lesson = find_lesson(name)
        print(f"{name:<18} {lesson.minutes:>3} min  {lesson.title}")
        print(f"{'':<28}{lesson.summary}")
    print("\nsudo buselab lesson NAME /dev/nbd0 [--auto]    (docs/lessons.md: the teacher's guide)")
    print("buselab lesson NAME --vm [--auto]              (no root: the disk is attached in a small qemu VM)")
    return 0


def _headless(session: Session, runner: LessonRunner, hold: float) -> int:
    """Print each step, its commands' results and each checkpoint's explanation; 1 on failure."""
    shown: set[tuple[int, str]] = set()
    printed: dict[int, int] = {}  # step -> how many of its commands' results are printed
    stop = threading.Event()

    def on_change() -> None:
        results = runner.results
        for result in results[printed.get(runner.index, 0) :]:  # what blkid, dumpe2fs, dmesg said
            if result.output or result.status:
                print(f"  {result.command.split()[0]} (exit {result.status}):", flush=True)
                for out in result.output.splitlines()[-6:]:
                    print(f"    {out}", flush=True)
        printed[runner.index] = max(printed.get(runner.index, 0), len(results))
        key = (runner.index, runner.state)
        if key in shown:
            return
        shown.add(key)
        step = runner.step
        if runner.state == "finished" or step is None:
            print(f"lesson {runner.lesson.name}: finished, {len(runner.reached)} checkpoints reached", flush=True)
        elif runner.state in ("waiting", "reading"):
            print(f"step {runner.index + 1}/{len(runner.lesson.steps)}: {step.title}", flush=True)
            for line in runner.command_lines():
                print(f"  $ {line}", flush=True)
        elif runner.state == "reached":
            print(f"  checkpoint: {runner.explanation}", flush=True)

    watcher = threading.Thread(target=lambda: session.stop_requested.wait() and stop.set(), daemon=True)
    watcher.start()
    try:
        run_auto(runner, hold=hold, stop=stop, on_change=on_change)
    except LessonError as exc:
        print(f"buselab: lesson {runner.lesson.name} failed: {exc}", file=sys.stderr)
        return 1
    return 0 if runner.state == "finished" else 130
