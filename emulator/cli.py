"""snaplab-system: a command line that mirrors qemu-system-x86_64's.

Options (QEMU's spelling): ``-m``, ``-machine``/``-M`` (``pflash0=``, ``pflash1=``; ``help``
lists the machines), ``-accel tcg|qtest`` (qtest: no guest code runs and the virtual clock
stays at 0, as qemu-iotests expect), ``-blockdev`` (JSON or key=value), the legacy ``-drive``
(``if=none|virtio|ide``, ``file=``, ``driver=``, ``format=``, ``id=``, ``cache=``, ``aio=``,
``readonly=``, ``media=disk``, ``index=``, and format or protocol options; ``format=help``), a
bare image file (``hda``), ``-device virtio-blk-pci``/``virtio-blk``, ``virtio-scsi-pci``/
``virtio-scsi``, ``scsi-hd``, ``loader,file=,addr=,force-raw=on`` (``help`` lists them),
``-object iothread,id=``, ``-set device.ID.PROP=VALUE``, ``-qmp unix:PATH,server=on,wait=off``
or ``tcp:[HOST]:PORT`` (repeatable; TCP on loopback only, 127.0.0.1 when no host is given),
``-monitor stdio|none`` (the human monitor on stdin/stdout: emulator/qmp/readline.py), ``-S``,
``-loadvm TAG``, ``-serial file:PATH|stdio|none``; accepted and ignored: ``-nographic``,
``-display none``, ``-nodefaults``, ``-no-user-config``; ``-enable-kvm`` is refused; ``-h``
(``-help``, ``--help``) prints this text and ``-version`` the version.
snaplab's own options carry a ``-snaplab-`` prefix: ``-snaplab-workload NAME[,seed=N,ws=SIZE,
rate=SIZE/s,pattern=P,batch=N]`` and ``-snaplab-no-hugepages``.

Errors are one line, ``snaplab-system: -OPTION ARG: text`` with QEMU's text, and exit status 1.
SIGTERM, SIGINT and SIGHUP are a shutdown request from main()'s first line (emulator/termsig.py,
QEMU's termsig_handler): SHUTDOWN event with reason host-signal, then the monitors close, exit 0.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from emulator import termsig
from emulator.block.io import images_locked
from emulator.block.node import FORMATS, BlockGraph, parse_blockdev, probe_format, split_keyval
from emulator.errors import SnaplabError, UsageError
from emulator.guest import WorkloadSpec
from emulator.img import parse_size
from emulator.machine import DiskSpec, Machine, MachineConfig
from emulator.memory import check_ram_size
from emulator.qmp.readline import serve_stdio
from emulator.qtest import ACCELERATORS
from emulator.runstate import RunState
from emulator.termsig import setup_signal_handling

PROG = "snaplab-system"
_IGNORED_WITH_ARG = {"-display": {"none"}}
_IGNORED_FLAGS = {"-nographic", "-nodefaults", "-no-user-config"}
# -machine help (hw/core/machine-qmp... machine_help_func): name, description, marks
MACHINES = (("pc", "snaplab PC (alias of snaplab)"), ("q35", "snaplab PC (alias of snaplab)"),
            ("snaplab", "snaplab PC: x86-64, flat memory, port I/O devices (default)"),
            ("none", "empty machine"))
# -device help (qdev_device_help's list): category, then (name, bus, alias, description)
DEVICES = (("Storage devices", (("loader", "", "", "Generic Loader"),
                                ("scsi-hd", "SCSI", "", "virtual SCSI disk"),
                                ("virtio-blk-pci", "PCI", "virtio-blk", ""),
                                ("virtio-scsi-pci", "PCI", "virtio-scsi", ""))),)
_DEVICE_ALIASES = {"virtio-blk": "virtio-blk-pci", "virtio-scsi": "virtio-scsi-pci"}
_CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe")
_AIO_MODES = ("threads", "native", "io_uring")
_ON_ERROR = ("auto", "report", "ignore", "enospc", "stop")  # qdev's BlockdevOnError property values
# -drive's own keys (blockdev.c drive_config / drive_new); the rest go to the format driver
_DRIVE_KEYS = {"if", "index", "bus", "unit", "media", "id", "file", "format", "driver", "cache", "aio",
               "readonly", "read-only", "snapshot", "node-name", "werror", "rerror", "discard", "detect-zeroes"}


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
    accel: str = "tcg"
    monitor: str = "none"  # -monitor stdio: HMP on stdin/stdout
    drives: list[DriveSpec] = field(default_factory=list)
    devices: list[DeviceOpts] = field(default_factory=list)
    iothreads: list[str] = field(default_factory=list)
    help: str | None = None  # machine, device, drive-format, usage or version: print it and exit


@dataclass
class DriveSpec:
    """One -drive: its BlockBackend name and the node it makes (built when the machine is)."""

    arg: str
    backend: str
    file: str
    driver: str | None  # None: probe the format
    node_opts: dict[str, Any]
    werror: str = "auto"  # the BlockBackend's error policies (a -device's own ones win)
    rerror: str = "auto"


@dataclass
class DeviceOpts:
    """One -device's options, kept until every -set has been applied (QemuOpts)."""

    arg: str
    driver: str
    props: dict[str, str]


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
        size = parse_size(text)
    except SnaplabError as err:
        raise UsageError(f"-m {arg}: Parameter 'size' expects a non-negative number below 2^64") from err
    try:
        check_ram_size(size)  # (QEMU takes any size; snaplab's guest needs 16 MiB)
    except SnaplabError as err:
        raise UsageError(f"-m {arg}: {err}") from None
    return size


def _workload(arg: str) -> WorkloadSpec:
    kv = _kv(arg, "-snaplab-workload", "name")
    allowed = {"name", "seed", "ws", "ws-offset", "rate", "pattern", "batch"}
    for k in kv:
        if k not in allowed:
            raise UsageError(f"-snaplab-workload: unknown key '{k}' (allowed: {', '.join(sorted(allowed))})")
    try:
        rate = kv.get("rate", "0").removesuffix("/s")
        return WorkloadSpec(
            name=kv.get("name", "dirty"), seed=int(kv.get("seed", "0"), 0),
            working_set=parse_size(kv["ws"]) if "ws" in kv else 0,
            rate=parse_size(rate) if rate not in ("0", "") else 0,
            pattern=kv.get("pattern", "random"), batch_pages=int(kv.get("batch", "256"), 0),
            ws_offset=parse_size(kv["ws-offset"]) if "ws-offset" in kv else 0)
    except (ValueError, SnaplabError) as err:
        raise UsageError(f"-snaplab-workload {arg}: {err}") from err


def _device_help() -> str:
    out = []
    for category, devs in DEVICES:
        out.append(f"{category}:")
        for name, bus, alias, desc in devs:
            line = f'name "{name}"' + (f", bus {bus}" if bus else "")
            line += f', alias "{alias}"' if alias else ""
            out.append(line + (f', desc "{desc}"' if desc else ""))
    return "\n".join(out) + "\n"


def _device(arg: str, opts: Options) -> None:
    """Remember a -device; :func:`_realize_devices` creates them after every -set."""
    kv = _kv(arg, "-device", "driver")
    driver = kv.pop("driver", "")
    if driver == "help":
        opts.help = "device"
        return
    opts.devices.append(DeviceOpts(arg, _DEVICE_ALIASES.get(driver, driver), kv))


def _set(arg: str, opts: Options) -> None:
    """-set GROUP.ID.PROP=VALUE (vl.c qemu_set_option), for devices."""
    target, eq, value = arg.partition("=")
    parts = target.split(".", 2)
    if not eq or len(parts) != 3:
        raise UsageError(f"-set {arg}: Invalid -set parameter: {arg}")
    group, ident, prop = parts
    if group != "device":
        raise UsageError(f"-set {arg}: there is no option group '{group}'")
    dev = next((d for d in opts.devices if d.props.get("id") == ident), None)
    if dev is None:
        raise UsageError(f'-set {arg}: there is no {group} "{ident}" defined')
    dev.props[prop] = value


def _realize_devices(opts: Options) -> None:
    """qdev_device_add() for each -device, in order: disks for the board, the rest checked."""
    scsi_bus = False
    for dev in opts.devices:
        kv = dict(dev.props)
        where = f"-device {dev.arg}"
        if dev.driver in ("virtio-blk-pci", "scsi-hd"):
            if dev.driver == "scsi-hd" and not scsi_bus:
                raise UsageError(f"{where}: No 'SCSI' bus found for device 'scsi-hd'")
            if "drive" not in kv:
                raise UsageError(f"{where}: Parameter 'drive' is missing")
            drive = kv.pop("drive")
            policy = {}
            for key in ("werror", "rerror"):
                val = kv.pop(key, "auto")
                if val not in _ON_ERROR:
                    raise UsageError(f"{where}: Parameter '{key}' does not accept value '{val}'")
                backend = next((d for d in opts.drives if d.backend == drive), None)
                policy[key] = getattr(backend, key) if val == "auto" and backend is not None else val
            opts.disks.append(DiskSpec(drive, kv.pop("id", ""), policy["werror"], policy["rerror"]))
            for k in ("bus", "iothread", "scsi-id", "lun", "channel", "addr", "serial"):
                kv.pop(k, None)
        elif dev.driver == "virtio-scsi-pci":
            scsi_bus = True
            iothread = kv.pop("iothread", None)
            if iothread is not None and iothread not in opts.iothreads:
                raise UsageError(f"{where}: Device '{iothread}' not found")
            kv.pop("id", None)
            kv.pop("bus", None)
        elif dev.driver == "loader":
            if "file" not in kv or "addr" not in kv:
                raise UsageError(f"{where}: loader needs file= and addr=")
            try:
                addr = int(kv.pop("addr"), 0)
            except ValueError as err:
                raise UsageError(f"{where}: Parameter 'addr' expects a number") from err
            opts.loaders.append((kv.pop("file"), addr))
            kv.pop("force-raw", None)
            kv.pop("id", None)
        else:
            raise UsageError(f"{where}: '{dev.driver}' is not a valid device model name")
        if kv:
            raise UsageError(f"{where}: Property '{dev.driver}.{next(iter(kv))}' not found")


def _object(arg: str, opts: Options) -> None:
    """-object iothread,id=ID (an IOThread: snaplab's block I/O has no thread of its own)."""
    kv = _kv(arg, "-object", "qom-type")
    qom_type = kv.pop("qom-type", "")
    if qom_type != "iothread":
        raise UsageError(f"-object {arg}: Parameter 'qom-type' does not accept value '{qom_type}'")
    if "id" not in kv:
        raise UsageError(f"-object {arg}: Parameter 'id' is missing")
    opts.iothreads.append(kv.pop("id"))
    for k in ("poll-max-ns", "poll-grow", "poll-shrink", "aio-max-batch"):
        kv.pop(k, None)
    if kv:
        raise UsageError(f"-object {arg}: Property 'iothread.{next(iter(kv))}' not found")


def _drive(arg: str, opts: Options) -> None:
    """drive_new(): a BlockBackend named by ``id`` (or ``if`` and its index, as QEMU names
    them) over a format node over a file node, both with generated node names; ``if=virtio``
    and ``if=ide`` also plug a disk in."""
    kv = _kv(arg, "-drive")
    where = f"-drive {arg}"
    if kv.get("format") == "help":
        opts.help = "drive-format"
        return
    bus = kv.pop("if", "ide")
    if bus not in ("none", "virtio", "ide"):
        raise UsageError(f"{where}: unsupported bus type '{bus}'" if bus not in ("scsi", "floppy", "pflash", "sd",
                         "mtd", "xen") else f"{where}: if={bus} is not emulated by snaplab (use if=virtio or if=none)")
    raw_index = kv.pop("index", "-1")
    try:
        index = int(raw_index)
    except ValueError:
        raise UsageError(f"{where}: Parameter 'index' expects a number") from None
    same = [d for d in opts.drives if d.node_opts.get("_if") == bus]
    index = index if index >= 0 else len(same)
    backend = kv.pop("id", None) or {"none": f"none{len(same)}", "virtio": f"virtio{index}",
                                     "ide": f"ide{index // 2}-hd{index % 2}"}[bus]
    if any(d.backend == backend for d in opts.drives):
        raise UsageError(f"{where}: Duplicate ID '{backend}' for drive")
    driver, fmt = kv.pop("driver", None), kv.pop("format", None)
    if driver and fmt:
        raise UsageError(f"{where}: Cannot specify both 'driver' and 'format'")
    cache = kv.pop("cache", "writeback")
    if cache not in _CACHE_MODES:
        raise UsageError(f"{where}: invalid cache option")
    if kv.pop("aio", "threads") not in _AIO_MODES:
        raise UsageError(f"{where}: invalid aio option")
    if kv.pop("media", "disk") != "disk":
        raise UsageError(f"{where}: snaplab has no CD-ROM (media=disk only)")
    read_only = kv.pop("readonly", kv.pop("read-only", "off")) in ("on", "true", "yes")
    policy = {}
    for key, is_read in (("werror", False), ("rerror", True)):
        val = kv.pop(key, None)
        # parse_block_error_action(): enospc is a write policy only
        if val is not None and val not in (("ignore", "stop", "report") if is_read else ("ignore", "enospc", "stop", "report")):
            raise UsageError(f"{where}: '{val}' invalid {'read' if is_read else 'write'} error action")
        policy[key] = val or "auto"
    for k in ("bus", "unit", "snapshot"):
        kv.pop(k, None)
    if "file" not in kv:
        raise UsageError(f"{where}: snaplab needs file= (an empty drive has no medium to snapshot)")
    node_opts: dict[str, Any] = {"read-only": read_only, "_if": bus}
    if cache == "unsafe":
        node_opts["cache"] = {"no-flush": True}
    filename = str(kv.pop("file"))
    for k, v in kv.items():  # format (and file.) options, as dotted keys
        cur = node_opts
        keys = k.split(".")
        for key in keys[:-1]:
            cur = cur.setdefault(key, {})
            if not isinstance(cur, dict):
                raise UsageError(f"{where}: Parameter '{key}' does not take sub-options ('{k}')")
        cur[keys[-1]] = v
    opts.drives.append(DriveSpec(arg, backend, filename, driver or fmt, node_opts,
                                 policy["werror"], policy["rerror"]))
    if bus != "none":
        opts.disks.append(DiskSpec(backend, "", policy["werror"], policy["rerror"]))


def _open_drive(graph: BlockGraph, d: DriveSpec) -> None:
    """The -drive's nodes: ``driver=file`` alone, else a format node (probed when not given)
    over a file node.  Errors read as QEMU's, after the -drive they belong to."""
    where = f"-drive {d.arg}"
    opts = {k: v for k, v in d.node_opts.items() if k != "_if"}
    file_opts = opts.pop("file", {}) if isinstance(opts.get("file"), dict) else {}
    try:
        driver = d.driver
        if driver is None:
            driver = probe_format(d.file)
            if driver == "raw":
                print(f"WARNING: Image format was not specified for '{d.file}' and probing guessed raw.\n"
                      "         Automatically detecting the format is dangerous for raw images, "
                      "write operations on block 0 will be restricted.\n"
                      "         Specify the 'raw' format explicitly to remove the restrictions.", file=sys.stderr)
        if driver == "file":
            node = graph.add({**opts, "driver": "file", "filename": d.file})
        else:
            file_node = {**file_opts, "driver": "file", "filename": d.file, "read-only": opts.get("read-only", False)}
            node = graph.add({**opts, "driver": driver, "file": file_node})
    except SnaplabError as err:
        raise UsageError(f"{where}: {err.desc}") from err
    node.backend = d.backend


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
        host = host or "127.0.0.1"  # QEMU listens on every address when none is given; we do not
        if host not in ("127.0.0.1", "localhost", "::1", "[::1]"):
            raise UsageError(f"-qmp {arg}: TCP monitors are bound to loopback only (not '{host}')")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"-qmp {arg}: address resolution failed for {host}:{port}: Servname not supported for ai_socktype")
        return {"kind": "tcp", "host": host.strip("[]"), "port": int(port), "wait": wait == "on"}
    raise UsageError(f"-qmp {arg}: expected unix:PATH or tcp:HOST:PORT")


def _machine(arg: str, opts: Options, opt: str = "-machine") -> None:
    kv = _kv(arg, opt, "type")
    for k in kv:
        if k not in ("type", "pflash0", "pflash1", "accel"):
            raise UsageError(f"{opt} {arg}: Property '{k}' not found")
    mtype = kv.get("type", "snaplab")
    if mtype == "help":
        opts.help = "machine"
        return
    if mtype not in [m for m, _ in MACHINES]:
        raise UsageError(f"{opt} {arg}: unsupported machine type '{mtype}' (q35 is emulated as snaplab's PC)")
    if "accel" in kv:
        _accel(kv.pop("accel"), opts)
    opts.machine.update(kv)


def _accel(arg: str, opts: Options) -> None:
    accel = arg.split(",")[0]
    if accel not in ACCELERATORS:
        raise UsageError(f"-accel {arg}: only {'/'.join(ACCELERATORS)} is supported")
    opts.accel = accel


def _incoming(arg: str, opts: Options) -> None:
    if not (arg == "defer" or arg.startswith(("exec:", "file:"))):
        raise UsageError(f"-incoming {arg}: expected defer, exec:CMD or file:PATH")
    opts.incoming = arg


def _serial(arg: str, opts: Options) -> None:
    if not (arg in ("stdio", "none", "null") or arg.startswith("file:")):
        raise UsageError(f"-serial {arg}: expected file:PATH, stdio or none")
    opts.serial = arg


def _monitor(arg: str, opts: Options) -> None:
    if arg not in ("stdio", "none"):
        raise UsageError(f"-monitor {arg}: snaplab's human monitor runs on stdio only (QMP: -qmp)")
    opts.monitor = arg


def _ignored(opt: str) -> Callable[[str, Options], None]:
    def check(v: str, opts: Options) -> None:
        if v.split(",")[0] not in _IGNORED_WITH_ARG[opt]:
            raise UsageError(f"{opt} {v}: only {'/'.join(sorted(_IGNORED_WITH_ARG[opt]))} is supported")
    return check


def _hda(arg: str, opts: Options) -> None:
    """A bare image file: -hda (vl.c drive_add(IF_DEFAULT, 0, ..., HD_OPTS))."""
    _drive("index=0,media=disk,file=" + arg.replace(",", ",,"), opts)


_WITH_ARG: dict[str, Callable[[str, Options], None]] = {
    "-m": lambda a, o: setattr(o, "ram_size", _ram_size(a)),
    "-machine": _machine, "-M": lambda a, o: _machine(a, o, "-M"),
    "-accel": _accel,
    "-blockdev": lambda a, o: o.blockdevs.append(a),
    "-drive": _drive, "-hda": _hda,
    "-device": _device, "-set": _set, "-object": _object,
    "-qmp": lambda a, o: o.qmp.append(_qmp(a)),
    "-monitor": _monitor,
    "-loadvm": lambda a, o: setattr(o, "loadvm", a),
    "-incoming": _incoming,
    "-serial": _serial,
    "-snaplab-workload": lambda a, o: setattr(o, "workload", _workload(a)),
    **{k: _ignored(k) for k in _IGNORED_WITH_ARG},
}


def parse_args(argv: Sequence[str]) -> Options:
    """The command line, in order, as vl.c's qemu_init() reads it; devices are created last
    (after every ``-set``)."""
    opts = Options()
    it = iter(argv)
    for a in it:
        opt = "-" + a.lstrip("-") if a.startswith("--") else a
        if not a.startswith("-"):
            _hda(a, opts)
        elif opt in _WITH_ARG:
            try:
                value = next(it)
            except StopIteration:
                raise UsageError(f"{opt}: requires an argument") from None
            _WITH_ARG[opt](value, opts)
        elif opt == "-S":
            opts.paused = True
        elif opt in ("-h", "-help"):
            opts.help = "usage"
            return opts
        elif opt == "-version":
            opts.help = "version"
            return opts
        elif opt == "-snaplab-no-hugepages":
            opts.hugepages = False
        elif opt not in _IGNORED_FLAGS:
            raise UsageError(f"{a}: invalid option")
    if opts.help is None:
        _realize_devices(opts)
    return opts


def _serial_sink(spec: str) -> tuple[Callable[[bytes], None] | None, Callable[[], None]]:
    if spec in ("none", "null"):
        return None, lambda: None
    if spec == "stdio":
        def out(b: bytes) -> None:
            sys.stdout.buffer.write(b)
            sys.stdout.buffer.flush()
        return out, lambda: None
    try:
        f = open(spec[5:], "wb")  # noqa: SIM115 - closed by the returned closer
    except OSError as err:
        raise UsageError(f"-serial {spec}: Could not open '{spec[5:]}': {err.strerror}") from None

    def write(b: bytes) -> None:
        f.write(b)
        f.flush()
    return write, f.close


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("snaplab")
    except PackageNotFoundError:  # (run from a source tree that was never installed)
        return "(not installed)"


def _help_text(what: str) -> str:
    """``-machine help``, ``-device help``, ``-drive format=help``, as QEMU prints them."""
    if what == "machine":
        return "Supported machines are:\n" + "".join(f"{name:<20} {desc}\n" for name, desc in MACHINES)
    if what == "device":
        return _device_help()
    if what == "usage":  # -h: this module's documentation, as QEMU prints its option list
        return f"usage: {PROG} [options] [disk_image]\n\n" + (__doc__ or "").split("\n", 1)[1].lstrip("\n")
    if what == "version":
        return f"{PROG} {_version()}: a command line mirroring QEMU emulator version 7.2's\n"
    return f"Supported formats: {' '.join(FORMATS)}\n"


def start_stdio_monitor(machine: Machine) -> threading.Lock:
    """``-monitor stdio``: the human monitor on stdin/stdout, on a thread of its own (QEMU
    runs it in the main loop; commands still run one at a time, in input order).  The lock
    returned is held while a command runs: ``quit`` ends the process only once it returned."""
    ver = machine.monitor.version()["qemu"]
    version = f"{ver['major']}.{ver['minor']}.{ver['micro']}"
    running = threading.Lock()

    def execute(line: str) -> str:
        with running:
            return machine.monitor.hmp.execute(line)

    threading.Thread(target=serve_stdio, name="hmp-stdio", daemon=True,
                     args=(execute, version, lambda: machine.state == RunState.SHUTDOWN)).start()
    return running


def build_machine(opts: Options) -> tuple[Machine, Callable[[], None]]:
    graph = BlockGraph()
    try:
        for bd in opts.blockdevs:  # QEMU opens -blockdev before -drive (configure_blockdev)
            try:
                graph.add(parse_blockdev(bd))
            except SnaplabError as err:
                raise UsageError(f"-blockdev {bd}: {err.desc}") from err
        for d in opts.drives:
            _open_drive(graph, d)
        for disk in opts.disks:
            if disk.drive not in graph.nodes and not any(n.backend == disk.drive for n in graph.nodes.values()):
                dev = "virtio-blk-device" if disk.drive not in [d.backend for d in opts.drives] else "drive"
                raise UsageError(f"-device drive={disk.drive}: Property '{dev}.drive' can't find value '{disk.drive}'")
        for prop in ("pflash0", "pflash1"):
            node = opts.machine.get(prop)
            if node is not None and node not in graph.nodes:  # (QEMU: the flash device's drive property)
                raise UsageError(f"Property 'cfi.pflash01.drive' can't find value '{node}'")
        if opts.monitor == "stdio" and opts.serial == "stdio":
            raise UsageError("-serial stdio: cannot use stdio by multiple character devices")
        sink, close_sink = _serial_sink(opts.serial)
        cfg = MachineConfig(ram_size=opts.ram_size, workload=opts.workload, pflash0=opts.machine.get("pflash0"),
                            pflash1=opts.machine.get("pflash1"), disks=opts.disks, loaders=opts.loaders,
                            hugepages=opts.hugepages, accel=opts.accel)
        return Machine(cfg, graph, serial=sink), close_sink
    except BaseException:
        graph.close()
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """qemu-system-x86_64's main(): images locked as QEMU locks them (``locking=auto``: another
    process's writer, or reader without -U, is refused), for this run (a caller in the same
    process, such as a test, gets its own setting back)."""
    with images_locked():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    setup_signal_handling()  # SIGTERM/SIGINT/SIGHUP: a shutdown request from here on (emulator/termsig.py)
    try:
        opts = parse_args(list(sys.argv[1:] if argv is None else argv))
        if opts.help is not None:
            sys.stdout.write(_help_text(opts.help))
            return 0
        machine, close_sink = build_machine(opts)
    except SnaplabError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 1
    done = threading.Event()
    machine.add_listener(lambda name, data, ts: done.set() if name == "SHUTDOWN" else None)
    servers: list[Any] = []
    hmp_running = threading.Lock()
    try:
        if opts.loadvm:  # before any monitor serves: a command cannot race the load (QEMU's order)
            machine.snapshots.load_snapshot(opts.loadvm, None, None)
        if opts.qmp:
            from emulator.qmp.transport import start_servers

            # Listening now (wait=on waits here for its client, before the guest starts, as
            # QEMU's chardev does), answering only once the machine has started (QEMU serves
            # its monitors from the main loop, entered after vm_start()).
            for spec in opts.qmp:
                if spec.get("wait"):  # (QEMU's qemu_chr_wait_connected says so too)
                    where = f"unix:{spec['path']}" if spec["kind"] == "unix" else f"tcp:{spec['host']}:{spec['port']}"
                    print(f"{PROG}: -qmp {where},server=on: info: QEMU waiting for connection on: "
                          f"disconnected:{where},server=on", file=sys.stderr, flush=True)
            servers = start_servers(machine.monitor, opts.qmp, held=True, give_up=termsig.signalled)
            if termsig.signalled.is_set():  # a signal before any client came: nothing ran yet
                for srv in servers:
                    srv.close()
                _close(machine, close_sink)
                print(f"{PROG}: terminating on signal", file=sys.stderr)
                return 0
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
        for srv in servers:
            srv.open()
        if opts.monitor == "stdio":
            hmp_running = start_stdio_monitor(machine)
    except SnaplabError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        for s in servers:  # a client already connected is hung up on, the socket file removed
            s.close()
        _close(machine, close_sink)
        return 1

    # Signals stay termsig's (main()'s first line): a shutdown request quits the machine, whose
    # SHUTDOWN event reaches the clients and sets ``done``; only then do the monitors close.
    while not done.wait(0.2):
        pass
    with hmp_running:  # a monitor's quit has returned (the vCPU thread has ended)
        pass
    for s in servers:
        s.close()
    _close(machine, close_sink)
    return 0


def _close(machine: Machine, close_sink: Callable[[], None]) -> None:
    """The machine, then its images (QEMU's bdrv_close_all at exit: a qcow2 file is trimmed
    back to its last cluster, docs/deviations.md 61, and its locks released), then the serial
    sink.  Images a still-running operation may use are left open (Machine.close said so)."""
    if machine.close():
        machine.graph.close()
    close_sink()


if __name__ == "__main__":
    sys.exit(main())
