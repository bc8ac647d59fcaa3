"""`buselab layout TARGET [--json]`: where everything is on a disk, as buselab's lab sees it.

TARGET is an image file, a block device, or an NBD URI (nbd://host[:port]/name,
nbd+unix:///name?socket=PATH). The map comes from buselab.fsmap; this module only opens the
target, and prints the map group by group (like a readable dumpe2fs of where things are) or as
JSON (docs/LAYOUT.md lists the keys).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import stat
import sys
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import UserError
from ..sizes import human_bytes

DEFAULT_NBD_PORT = 10809
EXIT_NOTHING_RECOGNISED = 1


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "layout",
        help="map a disk: partitions, ext2/3/4 groups, journal, FAT, files (an image, a device or an NBD URI)",
        description="Recognise what a disk holds from its own bytes (MBR, GPT, ext2/3/4 with its journal, FAT12/16/32)"
        " and print where every structure is: superblocks and their backups, group descriptors, bitmaps, inode"
        " tables, the journal and its transactions, FATs, directories and file data with their paths.",
    )
    p.add_argument(
        "target",
        metavar="TARGET",
        help="image file, block device, nbd://HOST[:PORT]/NAME or nbd+unix:///NAME?socket=PATH",
    )
    p.add_argument("--json", action="store_true", help="print the map as JSON (keys: docs/LAYOUT.md)")
    p.add_argument("--regions", action="store_true", help="also list every region, in disk order")
    p.add_argument(
        "--files",
        type=int,
        default=20,
        metavar="N",
        help="how many files to list per file system (default 20; -1: all)",
    )
    p.add_argument(
        "--no-journal-scan", action="store_true", help="do not decode the journal's blocks (faster on a big journal)"
    )
    p.add_argument(
        "--no-replay",
        action="store_true",
        help="map the metadata as it is in place, not as journal recovery would leave it",
    )
    p.set_defaults(func=cmd_layout)


def cmd_layout(args: argparse.Namespace) -> int:
    from ..fsmap import build_map

    with ExitStack() as stack:
        read, size, what = open_target(args.target, stack)
        if size <= 0:
            raise UserError(f"{what} is empty: there is nothing to map")
        try:
            fsmap = build_map(read, size, scan_journal=not args.no_journal_scan, replay_journal=not args.no_replay)
        except (OSError, ConnectionError) as exc:
            raise UserError(f"reading {what} failed: {exc}") from None
    if not fsmap.filesystems and not fsmap.table:
        print(
            f"buselab: error: {what} holds no partition table or file system that buselab knows"
            " (it knows MBR, GPT, ext2/3/4 and FAT12/16/32)",
            file=sys.stderr,
        )
        return EXIT_NOTHING_RECOGNISED
    if args.json:
        out = {"target": args.target, **fsmap.to_json()}
        text = json.dumps(out, indent=1)
    else:
        text = format_text(fsmap, what, files=args.files, regions=args.regions)
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `buselab layout disk.img | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


# --- opening the target ---------------------------------------------------------------------


def open_target(target: str, stack: ExitStack) -> tuple[Callable[[int, int], bytes], int, str]:
    """(read, size, a name for messages) of an image file, a block device or an NBD URI."""
    if "://" in target:
        return _open_nbd(target, stack)
    try:
        fd = os.open(target, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise UserError(f"{target}: no such file or device") from None
    except IsADirectoryError:
        raise UserError(f"{target} is a directory: give an image file, a block device or an NBD URI") from None
    except PermissionError:
        raise UserError(f"{target}: permission denied (a block device needs root or the disk group)") from None
    except OSError as exc:
        raise UserError(f"{target}: cannot open: {exc.strerror or exc}") from None
    stack.callback(os.close, fd)
    info = os.fstat(fd)
    if stat.S_ISDIR(info.st_mode):
        raise UserError(f"{target} is a directory: give an image file, a block device or an NBD URI")
    size = os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(info.st_mode) else info.st_size

    def read(offset: int, length: int) -> bytes:
        return os.pread(fd, length, offset)

    return read, size, target


def _open_nbd(uri: str, stack: ExitStack) -> tuple[Callable[[int, int], bytes], int, str]:
    from ..client import NBDClient

    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    name = unquote(parts.path[1:]) if parts.path.startswith("/") else unquote(parts.path)
    try:
        if scheme in ("nbd+unix",):
            sockets = parse_qs(parts.query).get("socket")
            if not sockets:
                raise UserError(f"{uri}: an nbd+unix URI needs ?socket=PATH")
            client = NBDClient.connect_unix(sockets[0], name)
        elif scheme in ("nbd", "nbd+tcp"):
            if not parts.hostname:
                raise UserError(f"{uri}: no host (nbd://HOST[:PORT]/NAME)")
            client = NBDClient.connect_tcp(parts.hostname, parts.port or DEFAULT_NBD_PORT, name)
        elif scheme in ("nbds", "nbds+unix"):
            raise UserError(f"{uri}: TLS (nbds) is not supported; use nbd:// or nbd+unix://")
        else:
            raise UserError(f"{uri}: not an NBD URI (nbd://HOST[:PORT]/NAME or nbd+unix:///NAME?socket=PATH)")
    except ValueError as exc:  # urlsplit's port, for one
        raise UserError(f"{uri}: {exc}") from None
    except (OSError, ConnectionError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        if isinstance(exc, socket.timeout):
            reason = "timed out"
        raise UserError(f"cannot reach {uri}: {reason}") from None
    stack.callback(client.close)
    return client.read, client.size, uri


# --- text ----------------------------------------------------------------------------------


def _size(n: int) -> str:
    return human_bytes(n).replace("Bytes", "B").replace("Byte", "B")


def _blocks(first: int, last: int) -> str:
    return f"block {first}" if first == last else f"blocks {first}-{last}"


def format_text(fsmap: Any, what: str, *, files: int = 20, regions: bool = False) -> str:
    lines: list[str] = []
    head = f"{what}: {_size(fsmap.size)} ({fsmap.size} bytes)"
    if fsmap.table:
        head += f", {fsmap.table} partition table, {len(fsmap.partitions)} partition(s)"
    lines.append(head)
    if fsmap.table:
        lines += _table_lines(fsmap)
    for fs in fsmap.filesystems:
        lines.append("")
        lines += _ext_lines(fsmap, fs, files) if fs.type.startswith("ext") else _fat_lines(fsmap, fs, files)
    if fsmap.notes:
        lines.append("")
        lines.append("notes:")
        lines += [f"  {note}" for note in fsmap.notes]
    if regions:
        lines.append("")
        lines.append(f"regions ({len(fsmap.regions)}):")
        width = len(str(fsmap.size))
        for r in fsmap.regions:
            lines.append(f"  {r.offset:>{width}}-{r.end - 1:<{width}} {_size(r.length):>10}  {r.kind:<15} {r.label}")
    return "\n".join(lines)


def _row(name: str, where: str, offset: int, length: int) -> str:
    return f"    {name:<34} {where:<20} offset {offset:<12} {_size(length):>10}"


def _table_lines(fsmap: Any) -> list[str]:
    info = fsmap.table_info
    lines = [""]
    extra = f", disk GUID {info['disk_guid']}" if info.get("disk_guid") else ""
    lines.append(f"{fsmap.table} partition table (sector size {info.get('sector_size', 512)}{extra})")
    for r in fsmap.regions:
        if r.kind == "partition-table":
            lines.append(_row(r.label, f"sector {r.offset // info.get('sector_size', 512)}", r.offset, r.length))
    for p in fsmap.partitions:
        name = f' "{p.name}"' if p.name else ""
        lines.append(
            f"  partition {p.number}{name}: {p.type}, offset {p.offset} ({_size(p.offset)}), {_size(p.size)},"
            f" holds {p.contents}"
        )
    return lines


def _fs_title(fs: Any) -> str:
    where = f"partition {fs.partition}: " if fs.partition is not None else ""
    kind = fs.type if fs.type != "vfat" else f"vfat ({fs.info.get('fat_type', 'FAT')})"
    return f"{where}{kind}, {_size(fs.size)} at offset {fs.offset}"


def _ext_lines(fsmap: Any, fs: Any, files: int) -> list[str]:
    i = fs.info
    bs = fs.block_size
    base = fs.offset
    lines = [_fs_title(fs)]
    flex = f", flex_bg of {i['flex_bg_size']} groups" if i.get("flex_bg_size") else ""
    lines.append(
        f"  block size {bs}, {i['blocks']} blocks in {i['groups']} groups of {i['blocks_per_group']};"
        f" {i['inodes_per_group']} inodes of {i['inode_size']} bytes per group ({i['inode_table_blocks']} blocks){flex}"
    )
    if i.get("volume_name"):
        lines.append(f"  volume name {i['volume_name']!r}, UUID {i['uuid']}")
    else:
        lines.append(f"  UUID {i['uuid']}")
    lines.append(f"  features: {' '.join(i['features'])}")
    lines.append(
        f"  {i['state']}{', needs journal recovery' if i['needs_recovery'] else ''}; {i['free_blocks']} free blocks,"
        f" {i['free_inodes']} free inodes; {i['inodes_mapped']} inodes mapped"
    )
    if i.get("backup_groups") is not None:
        lines.append(f"  superblock backups only in groups {i['backup_groups']} (sparse_super2)")
    if i["first_data_block"]:
        lines.append(_row("boot area (block 0)", "block 0", base, 1024))
    for g in fs.groups:
        first, last = g["first_block"], g["last_block"]
        lines.append(
            f"  group {g['group']}: {_blocks(first, last)}, offset {base + first * bs}, {_size((last - first + 1) * bs)}"
            + (f" [{', '.join(g['flags'])}]" if g["flags"] else "")
        )
        if "superblock" in g:
            sb = g["superblock"]
            if g["group"] == 0:
                lines.append(_row("superblock (primary)", f"block {sb}", base + 1024, 1024))
            else:
                lines.append(_row("superblock (backup)", f"block {sb}", base + sb * bs, bs))
        if "group_descriptors" in g:
            a, b = g["group_descriptors"]
            lines.append(_row("group descriptors", _blocks(a, b), base + a * bs, (b - a + 1) * bs))
        if "reserved_gdt" in g:
            a, b = g["reserved_gdt"]
            lines.append(_row("reserved GDT blocks", _blocks(a, b), base + a * bs, (b - a + 1) * bs))
        for key, name in (("block_bitmap", "block bitmap"), ("inode_bitmap", "inode bitmap")):
            at = g[key]
            lines.append(_row(name + _elsewhere(at, g, fs), f"block {at}", base + at * bs, bs))
        a, b = g["inode_table"]
        lines.append(_row("inode table" + _elsewhere(a, g, fs), _blocks(a, b), base + a * bs, (b - a + 1) * bs))
        lines.append(
            f"    {g['free_blocks']} free blocks, {g['free_inodes']} free inodes, {g['directories']} directories"
            + (f", {g['itable_unused']} unused inodes" if g["itable_unused"] else "")
        )
    journal = i.get("journal")
    if journal:
        lines += _journal_lines(fsmap, fs, journal)
    lines += _file_lines(fs, files, cluster=False)
    return lines


def _elsewhere(block: int, g: dict, fs: Any) -> str:
    """' (in group 0)' for a bitmap or table that flex_bg placed outside its own group."""
    if g["first_block"] <= block <= g["last_block"]:
        return ""
    per = fs.info["blocks_per_group"]
    return f" (in group {max(0, (block - fs.info['first_data_block']) // per)})"


def _journal_lines(fsmap: Any, fs: Any, journal: dict) -> list[str]:
    bs = fs.block_size
    lines = [f"  journal: inode {journal['inode']}, {_size(journal['size'])}"]
    for logical, physical, count in journal["extents"]:
        lines.append(
            f"    journal blocks {logical}-{logical + count - 1}: {_blocks(physical, physical + count - 1)},"
            f" offset {fs.offset + physical * bs}, {_size(count * bs)}"
        )
    if "version" in journal:
        state = "empty (clean)" if journal["start"] == 0 else f"starts at journal block {journal['start']} (to replay)"
        lines.append(
            f"    jbd2 v{journal['version']}, {journal['blocks']} blocks of {journal['block_size']}, log {state},"
            f" sequence {journal['sequence']}"
            + (f", features {' '.join(journal['features'])}" if journal["features"] else "")
        )
    if "replayed_transactions" in journal:
        lines.append(
            f"    mapped as recovery would leave it: {journal['replayed_blocks']} block(s) read from the"
            f" {journal['replayed_transactions']} committed transaction(s) not yet written in place (--no-replay: as it is)"
        )
    if "transactions" in journal:
        tx = journal["transactions"]
        span = journal.get("transaction_range")
        lines.append(
            f"    {tx} committed transaction(s) still in the log" + (f": {span[0]} to {span[1]}" if span else "")
        )
        shown = [
            r
            for r in fsmap.regions
            if r.kind == "journal" and r.transaction is not None and "logged copy" not in r.label
        ]
        inside = [r for r in shown if fs.offset <= r.offset < fs.offset + fs.size]
        for r in inside[:12]:
            lines.append(f"      offset {r.offset:<12} {r.label}")
        if len(inside) > 12:
            lines.append(f"      ... {len(inside) - 12} more (--regions lists them all)")
    return lines


def _file_lines(fs: Any, files: int, *, cluster: bool) -> list[str]:
    if not fs.files or files == 0:
        return []
    shown = fs.files if files < 0 else fs.files[:files]
    more = "" if len(shown) == len(fs.files) else f"; the first {len(shown)} shown (--files N)"
    lines = [f"  files: {len(fs.files)}{more}"]
    for f in shown:
        who = f"inode {f['inode']:<6} " if "inode" in f else ""
        path = f["path"] or ("(reserved inode)" if f.get("inode", 99) < 11 else "(no path found)")
        extents = f["extents"]
        if cluster:
            where = ", ".join(f"clusters {c}-{c + n - 1}" if n > 1 else f"cluster {c}" for c, n in extents[:3])
        else:
            where = ", ".join(_blocks(p, p + n - 1) for _, p, n in extents[:3])
        if len(extents) > 3:
            where += f", ... ({len(extents)} extents)"
        lines.append(f"    {who}{f['type']:<12} {_size(f['size']):>10}  {path}  {where}".rstrip())
    return lines


def _fat_lines(fsmap: Any, fs: Any, files: int) -> list[str]:
    i = fs.info
    bps = i["bytes_per_sector"]
    base = fs.offset
    lines = [_fs_title(fs)]
    label = f", label {i['volume_label']!r}" if i.get("volume_label") and i["volume_label"] != "NO NAME" else ""
    lines.append(
        f"  {bps}-byte sectors, clusters of {i['sectors_per_cluster']} sector(s) ({_size(i['cluster_size'])}),"
        f" {i['clusters']} clusters, {i['fats']} FATs of {i['fat_sectors']} sectors{label}"
    )
    for r in fsmap.regions:
        if not fs.offset <= r.offset < fs.offset + fs.size:
            continue
        if r.kind in ("boot", "fat") or (r.kind == "directory" and r.label.endswith("vfat root directory (/)")):
            sector = (r.offset - base) // bps
            last = sector + r.length // bps - 1
            where = f"sector {sector}" if last <= sector else f"sectors {sector}-{last}"
            lines.append(_row(r.label.split(": ", 1)[-1], where, r.offset, r.length))
    data = base + i["data_sector"] * bps
    lines.append(
        _row("data area (cluster 2 on)", f"sector {i['data_sector']} on", data, i["clusters"] * i["cluster_size"])
    )
    if i.get("root_cluster"):
        lines.append(f"    root directory starts at cluster {i['root_cluster']}")
    if i.get("free_clusters") is not None:
        lines.append(f"    {i['free_clusters']} free clusters ({_size(i['free_clusters'] * i['cluster_size'])})")
    lines += _file_lines(fs, files, cluster=True)
    return lines
