"""snaplab-img: the subset of ``qemu-img`` that snaplab's images need.

``create``, ``info``, ``check``, ``snapshot -l/-c/-a/-d`` and ``convert``, with
qemu-img 7.2's output formats (qemu-img.c, block/qapi.c ``bdrv_snapshot_dump``,
util/cutils.c ``size_to_str``), so the two can be diffed on the same image.
Uses the block layer only: never the machine, unicorn or asyncio.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from emulator.block.check import CheckResult
from emulator.block.info import (
    full_backing_filename,
    info_dict,
    size_to_str,
    snapshot_dump,
    snapshot_dump_header,
)
from emulator.block.io import images_locked
from emulator.block.node import BlockGraph, BlockNode, probe_format
from emulator.block.qcow2 import Qcow2Image
from emulator.block.raw import RawImage
from emulator.errors import CheckFailedError, SnaplabError

_SUFFIXES = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


def parse_size(text: str) -> int:
    """qemu_strtosz(): a number with an optional K/M/G/T/P/E suffix (powers of 1024)."""
    t = text.strip()
    unit = t[-1:].lower() if t and t[-1].isalpha() else ""
    num = t[:-1] if unit else t
    if unit not in _SUFFIXES:
        raise SnaplabError("Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n"
                           "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
    try:
        val = float(num) if "." in num else int(num)
    except ValueError:
        raise SnaplabError("Invalid image size specified. Must be between 0 and 9223372036854775807.") from None
    size = int(val * (1 << _SUFFIXES[unit]))
    if size < 0:
        raise SnaplabError("Invalid image size specified. Must be between 0 and 9223372036854775807.")
    return size


class Opened:
    """An image opened as qemu-img opens one: the image, over its backing chain (the node
    graph that holds the chain's nodes; closing closes them all)."""

    def __init__(self, path: str, fmt: str | None, read_only: bool = True, backing: bool = True,
                 force_share: bool = False, for_check: bool = False) -> None:
        self.graph = BlockGraph()
        fmt = fmt or probe_format(path)
        if fmt not in ("qcow2", "raw"):
            raise SnaplabError(f"Unknown file format '{fmt}'")
        # -U (force-share): no image locks taken or checked (docs/deviations.md 62)
        file: dict[str, Any] = {"driver": "file", "filename": path, "read-only": read_only}
        if force_share:
            file["locking"] = "off"
        opts: dict[str, Any] = {"driver": fmt, "read-only": read_only, "file": file}
        if not backing and fmt == "qcow2":
            opts["backing"] = None
        try:
            node = self.graph.add(opts, for_check=for_check)
        except SnaplabError:
            self.graph.close()
            raise
        img = node.image
        assert isinstance(img, (Qcow2Image, RawImage))
        self.image: Qcow2Image | RawImage = img
        self.node = node

    def chain(self) -> list[tuple[str, Qcow2Image | RawImage]]:
        """(filename, image) from this image down its backing files."""
        out: list[tuple[str, Qcow2Image | RawImage]] = []
        node: BlockNode | None = self.node
        while node is not None:
            img = node.image
            assert isinstance(img, (Qcow2Image, RawImage))
            out.append((node.filename, img))
            node = node.children.get("backing")
        return out

    def close(self) -> None:
        self.graph.close()


def info_human(d: dict[str, Any]) -> str:
    lines = [f"image: {d['filename']}", f"file format: {d['format']}",
             f"virtual size: {size_to_str(d['virtual-size'])} ({d['virtual-size']} bytes)",
             f"disk size: {size_to_str(d['actual-size'])}"]
    if "cluster-size" in d:
        lines.append(f"cluster_size: {d['cluster-size']}")
    if "backing-filename" in d:
        lines.append(f"backing file: {d['backing-filename']}")
        if d["full-backing-filename"] != d["backing-filename"]:
            lines[-1] += f" (actual path: {d['full-backing-filename']})"
    if "backing-filename-format" in d:
        lines.append(f"backing file format: {d['backing-filename-format']}")
    return "\n".join(lines) + "\n"


def _info_text(img: Qcow2Image | RawImage, d: dict[str, Any]) -> str:
    out = info_human(d)
    if isinstance(img, Qcow2Image):
        if img.snapshots:
            out += "Snapshot list:\n" + snapshot_dump_header() + "\n"
            out += "".join(snapshot_dump(sn) + "\n" for sn in img.snapshots)
        out += "Format specific information:\n"
        for k, v in d["format-specific"]["data"].items():
            vv = ("true" if v else "false") if isinstance(v, bool) else v
            out += f"    {k.replace('-', ' ')}: {vv}\n"
    return out


def cmd_info(args: argparse.Namespace) -> int:
    """img_info(); ``--backing-chain`` walks the chain (collect_image_info_list)."""
    opened = Opened(args.filename, args.f, backing=args.backing_chain, force_share=args.U)
    try:
        infos = [(img, info_dict(img, name)) for name, img in
                 (opened.chain() if args.backing_chain else [(args.filename, opened.image)])]
        if args.output == "json":
            ds = [d for _, d in infos]
            print(json.dumps(ds if args.backing_chain else ds[0], indent=4))
            return 0
        sys.stdout.write("\n".join(_info_text(img, d) for img, d in infos))
        return 0
    finally:
        opened.close()


def _check_report(res: CheckResult) -> str:
    out = ""
    if res.corruptions == 0 and res.leaks == 0 and res.check_errors == 0:
        out += "No errors were found on the image.\n"
    else:
        if res.corruptions:
            out += (f"\n{res.corruptions} errors were found on the image.\n"
                    "Data may be corrupted, or further writes to the image may corrupt it.\n")
        if res.leaks:
            out += (f"\n{res.leaks} leaked clusters were found on the image.\n"
                    "This means waste of disk space, but no harm to data.\n")
        if res.check_errors:
            out += f"\n{res.check_errors} internal errors have occurred during the check.\n"
    if res.total_clusters and res.allocated_clusters:
        frag = 100.0 * res.fragmented_clusters / res.allocated_clusters
        comp = 100.0 * res.compressed_clusters / res.allocated_clusters
    else:
        frag = comp = 0.0
    if res.total_clusters and res.allocated_clusters:  # (qemu-img prints no line for nothing allocated)
        out += "%d/%d = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n" % (
            res.allocated_clusters, res.total_clusters, 100.0 * res.allocated_clusters / res.total_clusters,
            frag, comp)
    if res.image_end_offset:
        out += f"Image end offset: {res.image_end_offset}\n"
    return out


def _check_json(res: CheckResult, path: str) -> dict[str, Any]:
    """qemu-img's collect_image_check(): optional members only when non-zero."""
    d: dict[str, Any] = {}
    if res.image_end_offset:
        d["image-end-offset"] = res.image_end_offset
    if res.total_clusters:
        d["total-clusters"] = res.total_clusters
    if res.corruptions:
        d["corruptions"] = res.corruptions
    d["check-errors"] = res.check_errors
    if res.leaks:
        d["leaks"] = res.leaks
    if res.corruptions_fixed:
        d["corruptions-fixed"] = res.corruptions_fixed
    if res.leaks_fixed:
        d["leaks-fixed"] = res.leaks_fixed
    if res.allocated_clusters:
        d["allocated-clusters"] = res.allocated_clusters
    d["filename"] = path
    d["format"] = "qcow2"
    if res.fragmented_clusters:
        d["fragmented-clusters"] = res.fragmented_clusters
    if res.compressed_clusters:
        d["compressed-clusters"] = res.compressed_clusters
    return d


def _exit_code(res: CheckResult) -> int:
    if res.check_errors:
        return 1
    if res.corruptions:
        return 2
    if res.leaks:
        return 3
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    if args.U and args.r is not None:
        raise SnaplabError(f"Could not open '{args.filename}': force-share=on can only be used with read-only images")
    opened = Opened(args.filename, args.f, read_only=args.r is None, backing=False, force_share=args.U,
                    for_check=True)
    img = opened.image
    if not isinstance(img, Qcow2Image):
        opened.close()
        print("This image format does not support checks", file=sys.stderr)
        return 63
    try:
        try:
            res = img.check(repair=args.r)
        except CheckFailedError as err:
            for m in err.messages:
                print(m, file=sys.stderr)
            print(f"snaplab-img: {err.report}" if err.prefixed else err.report, file=sys.stderr)
            raise
        for m in res.messages:
            print(m, file=sys.stderr)
        final = res
        if res.repaired is not None:
            if args.output != "json":
                print("The following inconsistencies were found and repaired:\n\n"
                      f"    {res.leaks_fixed} leaked clusters\n    {res.corruptions_fixed} corruptions\n\n"
                      "Double checking the fixed image now...")
            for m in res.repaired.messages:
                print(m, file=sys.stderr)
            final = res.repaired
            final.leaks_fixed, final.corruptions_fixed = res.leaks_fixed, res.corruptions_fixed
        if args.output == "json":
            print(json.dumps(_check_json(final, args.filename), indent=4))
        else:
            sys.stdout.write(_check_report(final))
        return _exit_code(final)
    finally:
        opened.close()


def cmd_snapshot(args: argparse.Namespace) -> int:
    if args.U and not args.l:
        raise SnaplabError(f"Could not open '{args.filename}': force-share=on can only be used with read-only images")
    opened = Opened(args.filename, args.f, read_only=args.l, backing=False, force_share=args.U)
    img = opened.image
    if not isinstance(img, Qcow2Image):
        opened.close()
        raise SnaplabError(f"Could not open '{args.filename}': this format does not support snapshots")
    try:
        if args.l:
            if img.snapshots:
                print("Snapshot list:")
                print(snapshot_dump_header())
                for sn in img.snapshots:
                    print(snapshot_dump(sn))
        elif args.c is not None:
            img.snapshot_create(args.c, icount=0)
        elif args.a is not None:
            try:
                img.snapshot_goto(args.a)
            except SnaplabError as err:
                raise SnaplabError(f"Could not apply snapshot '{args.a}': {err}") from err
        elif args.d is not None:
            try:
                sn = img.find_snapshot(args.d)
                img.snapshot_delete(sn.id_str, sn.name)
            except SnaplabError as err:
                raise SnaplabError(f"Could not delete snapshot '{args.d}': {err}") from err
        return 0
    finally:
        opened.close()


def _backing_size(args: argparse.Namespace) -> int:
    """img_create()'s look at the backing file: it must open (its chain too), and gives the
    size when none is given; ``-u`` skips the look (and then a size is needed)."""
    path = full_backing_filename(args.filename, args.b)
    if args.u:
        if args.size is None:
            raise SnaplabError(f"{args.filename}: Could not open '{path}': size unknown and -u given")
        return parse_size(args.size)
    try:
        opened = Opened(path, args.F)
    except SnaplabError as err:
        raise SnaplabError(f"{args.filename}: {err}\nCould not open backing image.") from err
    try:
        return parse_size(args.size) if args.size is not None else opened.image.size
    finally:
        opened.close()


def cmd_create(args: argparse.Namespace) -> int:
    opts: dict[str, str] = {}
    for o in args.o or []:
        for kv in o.split(","):
            k, _, v = kv.partition("=")
            opts[k] = v
    backing = args.b or opts.pop("backing_file", "")
    backing_fmt = args.F or opts.pop("backing_fmt", "")
    args.b, args.F = backing, backing_fmt or None
    if backing and not backing_fmt:
        raise SnaplabError(f"{args.filename}: Backing file specified without backing format")
    if backing:
        size = _backing_size(args)
    elif args.size is None:
        raise SnaplabError("Expecting image size")
    else:
        size = parse_size(args.size)
    if args.f == "raw":
        print(f"Formatting '{args.filename}', fmt=raw size={size}")
        RawImage.create(args.filename, size).close()
        return 0
    if args.f != "qcow2":
        raise SnaplabError(f"Unknown file format '{args.f}'")
    cluster_size = parse_size(opts.pop("cluster_size", "65536"))
    refcount_bits = int(opts.pop("refcount_bits", "16"))
    compat = opts.pop("compat", "1.1")
    for k in opts:
        raise SnaplabError(f"Invalid parameter '{k}'")
    version = {"1.1": 3, "v3": 3, "0.10": 2, "v2": 2}.get(compat)
    if version is None:
        raise SnaplabError(f"Invalid compatibility level: '{compat}'")
    extra = " compat=0.10" if version == 2 else ""
    if backing:
        extra += f" backing_file={backing} backing_fmt={backing_fmt}"
    print(f"Formatting '{args.filename}', fmt=qcow2 cluster_size={cluster_size} extended_l2=off "
          f"compression_type=zlib size={size}{extra} lazy_refcounts=off refcount_bits={refcount_bits}")
    Qcow2Image.create(args.filename, size, cluster_size=cluster_size, refcount_bits=refcount_bits,
                      version=version, backing_file=backing, backing_fmt=backing_fmt).close()
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    opened = Opened(args.src, args.f)
    src = opened.image
    snap: str | None = None
    if args.l:
        for part in args.l.split(","):
            k, eq, v = part.partition("=")
            if not eq:
                snap = part
            elif k in ("snapshot.name", "snapshot.id"):
                snap = v
            else:
                raise SnaplabError(f"Invalid snapshot option '{part}'")
    try:
        size = src.size
        if snap is not None:
            if not isinstance(src, Qcow2Image):
                raise SnaplabError("This format does not support snapshots")
            sn = src.find_snapshot(snap)
            size = sn.disk_size if sn.disk_size is not None else src.size
        dst: Qcow2Image | RawImage
        if args.O == "raw":
            dst = RawImage.create(args.dst, size)
        elif args.O == "qcow2":
            dst = Qcow2Image.create(args.dst, size)
        else:
            raise SnaplabError(f"Unknown file format '{args.O}'")
        try:
            copy_image(src, dst, size, snap)
        finally:
            dst.close()
        return 0
    finally:
        opened.close()


def copy_image(src: Qcow2Image | RawImage, dst: Qcow2Image | RawImage, size: int, snap: str | None,
               chunk: int = 8 << 20) -> None:
    """Copy guest data, skipping zero clusters so the target stays sparse."""
    unit = dst.cluster_size if isinstance(dst, Qcow2Image) else 4096
    buf = bytearray(chunk)
    for pos in range(0, size, chunk):
        n = min(chunk, size - pos)
        mv = memoryview(buf)[:n]
        if snap is not None and isinstance(src, Qcow2Image):
            src.snapshot_read(snap, pos, mv)
        else:
            src.readinto(pos, mv)
        nfull = n // unit
        nz: list[bool] = []
        if nfull:
            rows = np.frombuffer(mv[:nfull * unit], dtype=np.uint8).reshape(nfull, unit)
            nz = np.asarray(rows.any(axis=1), dtype=bool).tolist()
        i = 0
        while i < nfull:
            if not nz[i]:
                i += 1
                continue
            j = i
            while j < nfull and nz[j]:
                j += 1
            dst.write(pos + i * unit, mv[i * unit:j * unit])
            i = j
        if n > nfull * unit and any(mv[nfull * unit:]):
            dst.write(pos + nfull * unit, mv[nfull * unit:])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="snaplab-img", description="qemu-img-style tool for snaplab's images")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create", help="create an image")
    c.add_argument("-f", default="raw")
    c.add_argument("-o", action="append")
    c.add_argument("-b", metavar="BACKING_FILE")
    c.add_argument("-F", metavar="BACKING_FMT")
    c.add_argument("-u", action="store_true", help="do not open the backing file")
    c.add_argument("filename")
    c.add_argument("size", nargs="?")
    c.set_defaults(fn=cmd_create)
    i = sub.add_parser("info", help="show image information")
    i.add_argument("-f")
    i.add_argument("-U", "--force-share", dest="U", action="store_true", help="open the image even if it is in use (no locks)")
    i.add_argument("--output", choices=["human", "json"], default="human")
    i.add_argument("--backing-chain", action="store_true")
    i.add_argument("filename")
    i.set_defaults(fn=cmd_info)
    k = sub.add_parser("check", help="check an image for consistency")
    k.add_argument("-f")
    k.add_argument("-r", choices=["leaks", "all"])
    k.add_argument("-U", "--force-share", dest="U", action="store_true", help="open the image even if it is in use (no locks)")
    k.add_argument("--output", choices=["human", "json"], default="human")
    k.add_argument("filename")
    k.set_defaults(fn=cmd_check)
    s = sub.add_parser("snapshot", help="list, create, apply or delete internal snapshots")
    s.add_argument("-f")
    s.add_argument("-U", "--force-share", dest="U", action="store_true", help="with -l: open the image even if it is in use")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("-l", action="store_true")
    g.add_argument("-c", metavar="TAG")
    g.add_argument("-a", metavar="TAG")
    g.add_argument("-d", metavar="TAG")
    s.add_argument("filename")
    s.set_defaults(fn=cmd_snapshot)
    v = sub.add_parser("convert", help="copy an image (or one of its snapshots) to raw or qcow2")
    v.add_argument("-f")
    v.add_argument("-O", default="raw")
    v.add_argument("-l", metavar="snapshot.name=TAG")
    v.add_argument("src")
    v.add_argument("dst")
    v.set_defaults(fn=cmd_convert)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with images_locked():  # as qemu-img: an image another process writes is refused (-U: shared)
            return int(args.fn(args))
    except SnaplabError as err:
        print(f"snaplab-img: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"snaplab-img: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
