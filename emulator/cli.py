"""snaplab-system: a command line that mirrors qemu-system-x86_64's.

Options (QEMU's spelling): ``-m``, ``-machine``/``-M`` (``pflash0=``, ``pflash1=``), ``-blockdev``
(JSON or key=value), ``-device virtio-blk-pci,drive=,id=`` and ``-device loader,file=,addr=,force-raw=on``,
``-qmp unix:PATH,server=on,wait=off`` (repeatable; ``tcp:`` only on loopback), ``-S``,
``-loadvm TAG``, ``-serial file:PATH|stdio|none``; accepted and ignored: ``-accel tcg``,
``-nographic``, ``-display none``, ``-nodefaults``, ``-enable-kvm`` is refused.  snaplab's own
options carry a ``-snaplab-`` prefix: ``-snaplab-workload NAME[,seed=N,ws=SIZE,rate=SIZE/s,
pattern=P,batch=N]`` and ``-snaplab-no-hugepages``.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from emulator.block.node import BlockGraph, parse_blockdev, split_keyval
from emulator.errors import SnaplabError, UsageError
from emulator.guest import WorkloadSpec
from emulator.img import parse_size
from emulator.machine import DiskSpec, Machine, MachineConfig
from emulator.runstate import RunState
from emulator.termsig import setup_signal_handling

PROG = "snaplab-system"
_IGNORED_WITH_ARG = {"-accel": {"tcg"}, "-display": {"none"}}
_IGNORED_FLAGS = {"-nographic", "-nodefaults", "-no-user-config"}


@dataclass
class Options:
    ram_size: int = 128 << 20
    machine: dict[str, str] = field(default_factory=dict)
    blockdevs: list[str] = field(default_factory=list)
    disks: list[DiskSpec] = field(default_factory=list)
    loaders: list[tuple[str, int]] = field(default_factory=list)
    qmp: list[dict[str, Any]] = field(default_factory=list)
    paused: bool = False
    loadvm: str | None = None
    incoming: str | None = None
    serial: str = "none"
    workload: WorkloadSpec = field(default_factory=lambda: WorkloadSpec("idle"))
    hugepages: bool = True


def _kv(arg: str, opt: str, implied: str | None = None) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, part in enumerate(split_keyval(arg)):
        if "=" not in part:
            if i == 0 and implied:
                out[implied] = part
                continue
            raise UsageError(f"{opt} {arg}: Expected '=' after parameter '{part}'")
        k, v = part.split("=", 1)
        out[k] = v
    return out


def _ram_size(arg: str) -> int:
    v = _kv(arg, "-m", "size").get("size", "")
    text = v + "M" if v.isdigit() else v  # QEMU: a bare number is MiB
    try:
        return parse_size(text)
    except SnaplabError as err:
        raise UsageError(f"-m {arg}: Parameter 'size' expects a non-negative number below 2^64") from err


def _workload(arg: str) -> WorkloadSpec:
    kv = _kv(arg, "-snaplab-workload", "name")
    allowed = {"name", "seed", "ws", "rate", "pattern", "batch"}
    for k in kv:
        if k not in allowed:
            raise UsageError(f"-snaplab-workload: unknown key '{k}' (allowed: {', '.join(sorted(allowed))})")
    try:
        rate = kv.get("rate", "0").removesuffix("/s")
        return WorkloadSpec(
            name=kv.get("name", "dirty"), seed=int(kv.get("seed", "0"), 0),
            working_set=parse_size(kv["ws"]) if "ws" in kv else 0,
            rate=parse_size(rate) if rate not in ("0", "") else 0,
            pattern=kv.get("pattern", "random"), batch_pages=int(kv.get("batch", "256"), 0))
    except (ValueError, SnaplabError) as err:
        raise UsageError(f"-snaplab-workload {arg}: {err}") from err


def _device(arg: str, opts: Options) -> None:
    kv = _kv(arg, "-device", "driver")
    driver = kv.pop("driver", "")
    if driver == "virtio-blk-pci":
        if "drive" not in kv:
            raise UsageError(f"-device {arg}: Parameter 'drive' is missing")
        opts.disks.append(DiskSpec(kv.pop("drive"), kv.pop("id", "")))
        kv.pop("bus", None)
    elif driver == "loader":
        if "file" not in kv or "addr" not in kv:
            raise UsageError(f"-device {arg}: loader needs file= and addr=")
        try:
            addr = int(kv.pop("addr"), 0)
        except ValueError as err:
            raise UsageError(f"-device {arg}: Parameter 'addr' expects a number") from err
        opts.loaders.append((kv.pop("file"), addr))
        kv.pop("force-raw", None)
        kv.pop("id", None)
    else:
        raise UsageError(f"-device {arg}: '{driver}' is not a valid device model name")
    if kv:
        raise UsageError(f"-device {arg}: Property '{driver}.{next(iter(kv))}' not found")


def _qmp(arg: str) -> dict[str, Any]:
    kv = _kv(arg, "-qmp", "addr")
    addr = kv.pop("addr", "")
    server = kv.pop("server", "off") in ("on", "") or "server" in arg.split(",")
    wait = kv.pop("wait", "on")
    for flag in ("nowait",):
        kv.pop(flag, None)
    if "nowait" in arg.split(","):
        wait = "off"
    if not server:
        raise UsageError(f"-qmp {arg}: only server=on is supported")
    if addr.startswith("unix:"):
        return {"kind": "unix", "path": addr[5:], "wait": wait == "on"}
    if addr.startswith("tcp:"):
        host, _, port = addr[4:].rpartition(":")
        host = host or "127.0.0.1"
        if host not in ("127.0.0.1", "localhost", "::1", "[::1]"):
            raise UsageError(f"-qmp {arg}: TCP monitors are bound to loopback only (not '{host}')")
        return {"kind": "tcp", "host": host.strip("[]"), "port": int(port), "wait": wait == "on"}
    raise UsageError(f"-qmp {arg}: expected unix:PATH or tcp:HOST:PORT")


def parse_args(argv: Sequence[str]) -> Options:
    opts = Options()
    it = iter(argv)
    for a in it:
        opt = "-" + a.lstrip("-") if a.startswith("--") else a

        def arg(opt: str = opt) -> str:
            try:
                return next(it)
            except StopIteration:
                raise UsageError(f"{opt}: requires an argument") from None

        if opt == "-m":
            opts.ram_size = _ram_size(arg())
        elif opt in ("-machine", "-M"):
            kv = _kv(arg(), opt, "type")
            for k in kv:
                if k not in ("type", "pflash0", "pflash1", "accel"):
                    raise UsageError(f"{opt}: Property '{k}' not found")
            if kv.get("type", "q35") not in ("q35", "pc", "snaplab"):
                raise UsageError(f"{opt}: unsupported machine type '{kv['type']}' (q35 is emulated as snaplab's PC)")
            opts.machine.update(kv)
        elif opt == "-blockdev":
            opts.blockdevs.append(arg())
        elif opt == "-device":
            _device(arg(), opts)
        elif opt == "-qmp":
            opts.qmp.append(_qmp(arg()))
        elif opt == "-S":
            opts.paused = True
        elif opt == "-loadvm":
            opts.loadvm = arg()
        elif opt == "-incoming":
            opts.incoming = arg()
            if not (opts.incoming == "defer" or opts.incoming.startswith(("exec:", "file:"))):
                raise UsageError(f"-incoming {opts.incoming}: expected defer, exec:CMD or file:PATH")
        elif opt == "-serial":
            opts.serial = arg()
            if not (opts.serial in ("stdio", "none", "null") or opts.serial.startswith("file:")):
                raise UsageError(f"-serial {opts.serial}: expected file:PATH, stdio or none")
        elif opt == "-snaplab-workload":
            opts.workload = _workload(arg())
        elif opt == "-snaplab-no-hugepages":
            opts.hugepages = False
        elif opt in _IGNORED_WITH_ARG:
            v = arg()
            if v.split(",")[0] not in _IGNORED_WITH_ARG[opt]:
                raise UsageError(f"{opt} {v}: only {'/'.join(sorted(_IGNORED_WITH_ARG[opt]))} is supported")
        elif opt in _IGNORED_FLAGS:
            pass
        else:
            raise UsageError(f"{a}: invalid option")
    return opts


def _serial_sink(spec: str) -> tuple[Callable[[bytes], None] | None, Callable[[], None]]:
    if spec in ("none", "null"):
        return None, lambda: None
    if spec == "stdio":
        def out(b: bytes) -> None:
            sys.stdout.buffer.write(b)
            sys.stdout.buffer.flush()
        return out, lambda: None
    f = open(spec[5:], "wb")  # noqa: SIM115 - closed by the returned closer

    def write(b: bytes) -> None:
        f.write(b)
        f.flush()
    return write, f.close


def build_machine(opts: Options) -> tuple[Machine, Callable[[], None]]:
    graph = BlockGraph()
    try:
        for bd in opts.blockdevs:
            graph.add(parse_blockdev(bd))
        sink, close_sink = _serial_sink(opts.serial)
        cfg = MachineConfig(ram_size=opts.ram_size, workload=opts.workload, pflash0=opts.machine.get("pflash0"),
                            pflash1=opts.machine.get("pflash1"), disks=opts.disks, loaders=opts.loaders,
                            hugepages=opts.hugepages)
        return Machine(cfg, graph, serial=sink), close_sink
    except BaseException:
        graph.close()
        raise


def main(argv: Sequence[str] | None = None) -> int:
    setup_signal_handling()  # SIGTERM/SIGINT/SIGHUP: a shutdown request from here on (emulator/termsig.py)
    try:
        opts = parse_args(list(sys.argv[1:] if argv is None else argv))
        machine, close_sink = build_machine(opts)
    except SnaplabError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 1
    done = threading.Event()
    machine.add_listener(lambda name, data, ts: done.set() if name == "SHUTDOWN" else None)
    servers: list[Any] = []
    try:
        if opts.loadvm:  # before any monitor serves: a command cannot race the load (QEMU's order)
            machine.snapshots.load_snapshot(opts.loadvm, None, None)
        if opts.qmp:
            from emulator.qmp.transport import start_servers

            servers = start_servers(machine.monitor, opts.qmp)
        if opts.incoming is not None:
            # QEMU: wait in "inmigrate"; run once the stream is loaded unless -S was given.
            machine.state = RunState.INMIGRATE
            machine.start(paused=True)
            machine.migration.incoming_uri = "defer"
            machine.migration.autostart = not opts.paused
            if opts.incoming != "defer":
                machine.migration.incoming(opts.incoming)
        else:
            machine.start(paused=opts.paused)
    except SnaplabError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        machine.close()
        close_sink()
        return 1

    def on_signal(signum: int, frame: object) -> None:
        done.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not done.wait(0.2):
        pass
    for s in servers:
        s.close()
    machine.close()
    close_sink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
