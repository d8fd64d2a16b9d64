"""The QAPI schema of snaplab's QMP: one declaration of every command, type and event.

From it come argument checking with QEMU's texts and order (qapi/qobject-input-visitor.c:
"Parameter 'x' is missing", "Invalid parameter type for 'x', expected: string",
"Parameter 'x' is unexpected", "Parameter 'x' does not accept value 'y'"), ``query-commands``
and ``query-qmp-schema`` in QEMU's SchemaInfo format (qapi/introspect.json), with type names
masked to numbers as QEMU does.  The RunState and JobStatus enums are read from the Enums
the run control and the job list run on, so a state has one spelling.  Pure data and
functions: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from emulator.errors import ArgumentError
from emulator.qmp.jobs import JobStatus
from emulator.runstate import RunState


@dataclass(frozen=True)
class Member:
    name: str
    type: str
    optional: bool = False
    features: tuple[str, ...] = ()


@dataclass(frozen=True)
class ObjectType:
    name: str
    members: tuple[Member, ...]


@dataclass(frozen=True)
class EnumType:
    name: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Command:
    name: str
    args: tuple[Member, ...] = ()
    returns: str | None = None  # None: returns {}
    allow_oob: bool = False
    features: tuple[str, ...] = ()


@dataclass(frozen=True)
class Event:
    name: str
    data: tuple[Member, ...] | None = None


BUILTINS = {"str": "string", "int": "int", "bool": "boolean", "number": "number", "any": "value", "null": "null"}
_EXPECTED = {"str": "string", "int": "integer", "bool": "boolean", "number": "number", "null": "null"}

M = Member
ENUMS = [
    EnumType("RunState", tuple(s.value for s in RunState)),
    EnumType("JobType", ("commit", "stream", "mirror", "backup", "create", "amend", "snapshot-load", "snapshot-save",
                         "snapshot-delete")),
    EnumType("JobStatus", tuple(s.value for s in JobStatus)),
    EnumType("QMPCapability", ("oob",)),
    EnumType("ShutdownCause", ("none", "host-error", "host-qmp-quit", "host-qmp-system-reset", "host-signal",
                               "host-ui", "guest-shutdown", "guest-reset", "guest-panic", "subsystem-reset",
                               "snapshot-load")),
    EnumType("GuestPanicAction", ("pause", "poweroff", "run")),
    EnumType("IoOperationType", ("read", "write")),
    EnumType("BlockErrorAction", ("ignore", "report", "stop")),
]
OBJECTS = [
    ObjectType("VersionTriple", (M("major", "int"), M("minor", "int"), M("micro", "int"))),
    ObjectType("VersionInfo", (M("qemu", "VersionTriple"), M("package", "str"))),
    ObjectType("CommandInfo", (M("name", "str"),)),
    ObjectType("StatusInfo", (M("running", "bool"), M("singlestep", "bool"), M("status", "RunState"))),
    ObjectType("JobInfo", (M("id", "str"), M("type", "JobType"), M("status", "JobStatus"),
                           M("current-progress", "int"), M("total-progress", "int"), M("error", "str", True))),
    ObjectType("BlockJobInfo", (M("type", "str"), M("device", "str"), M("len", "int"), M("offset", "int"),
                                M("busy", "bool"), M("paused", "bool"), M("speed", "int"), M("io-status", "str"),
                                M("ready", "bool"), M("status", "JobStatus"), M("auto-finalize", "bool"),
                                M("auto-dismiss", "bool"), M("error", "str", True))),
    ObjectType("ImageInfo", (M("filename", "str"), M("format", "str"), M("virtual-size", "int"),
                             M("actual-size", "int", True), M("cluster-size", "int", True),
                             M("dirty-flag", "bool", True), M("snapshots", "[SnapshotInfo]", True),
                             M("format-specific", "any", True))),
    ObjectType("SnapshotInfo", (M("id", "str"), M("name", "str"), M("vm-state-size", "int"), M("date-sec", "int"),
                                M("date-nsec", "int"), M("vm-clock-sec", "int"), M("vm-clock-nsec", "int"),
                                M("icount", "int", True))),
    ObjectType("BlockDeviceInfo", (M("file", "str"), M("node-name", "str", True), M("ro", "bool"), M("drv", "str"),
                                   M("encrypted", "bool"), M("detect_zeroes", "str"), M("bps", "int"),
                                   M("bps_rd", "int"), M("bps_wr", "int"), M("iops", "int"), M("iops_rd", "int"),
                                   M("iops_wr", "int"), M("image", "ImageInfo"), M("cache", "any"),
                                   M("write_threshold", "int"), M("backing_file_depth", "int"))),
    ObjectType("BlockInfo", (M("device", "str"), M("qdev", "str", True), M("type", "str"), M("removable", "bool"),
                             M("locked", "bool"), M("inserted", "BlockDeviceInfo", True),
                             M("io-status", "str", True))),
]

COMMANDS = [
    Command("qmp_capabilities", (M("enable", "[QMPCapability]", True),), allow_oob=False),
    Command("query-version", returns="VersionInfo", allow_oob=True),
    Command("query-commands", returns="[CommandInfo]", allow_oob=True),
    Command("query-qmp-schema", returns="[any]"),
    Command("query-status", returns="StatusInfo", allow_oob=True),
    Command("stop"),
    Command("cont"),
    Command("system_reset"),
    Command("quit"),
    Command("query-block", returns="[BlockInfo]"),
    Command("query-named-block-nodes", (M("flat", "bool", True),), returns="[BlockDeviceInfo]"),
    Command("query-jobs", returns="[JobInfo]"),
    Command("job-pause", (M("id", "str"),)),
    Command("job-resume", (M("id", "str"),)),
    Command("job-cancel", (M("id", "str"),)),
    Command("job-complete", (M("id", "str"),)),
    Command("job-dismiss", (M("id", "str"),)),
    Command("job-finalize", (M("id", "str"),)),
    Command("query-block-jobs", returns="[BlockJobInfo]"),
    Command("block-job-set-speed", (M("device", "str"), M("speed", "int"))),
    Command("block-job-cancel", (M("device", "str"), M("force", "bool", True))),
    Command("block-job-pause", (M("device", "str"),)),
    Command("block-job-resume", (M("device", "str"),)),
    Command("block-job-complete", (M("device", "str"),)),
    Command("block-job-dismiss", (M("id", "str"),)),
    Command("block-job-finalize", (M("id", "str"),)),
    Command("human-monitor-command", (M("command-line", "str"), M("cpu-index", "int", True)), returns="str"),
]

EVENTS = [
    Event("STOP"),
    Event("RESUME"),
    Event("RESET", (M("guest", "bool"), M("reason", "ShutdownCause"))),
    Event("SHUTDOWN", (M("guest", "bool"), M("reason", "ShutdownCause"))),
    Event("JOB_STATUS_CHANGE", (M("id", "str"), M("status", "JobStatus"))),
    Event("GUEST_PANICKED", (M("action", "GuestPanicAction"), M("info", "any", True))),
    Event("BLOCK_IO_ERROR", (M("device", "str"), M("node-name", "str", True), M("operation", "IoOperationType"),
                             M("action", "BlockErrorAction"), M("nospace", "bool", True), M("reason", "str"))),
]


@dataclass
class Schema:
    commands: dict[str, Command] = field(default_factory=dict)
    events: dict[str, Event] = field(default_factory=dict)
    objects: dict[str, ObjectType] = field(default_factory=dict)
    enums: dict[str, EnumType] = field(default_factory=dict)

    def add_command(self, cmd: Command) -> None:
        self.commands[cmd.name] = cmd

    def add_object(self, obj: ObjectType) -> None:
        self.objects[obj.name] = obj

    def add_enum(self, e: EnumType) -> None:
        self.enums[e.name] = e

    def add_event(self, ev: Event) -> None:
        self.events[ev.name] = ev

    # -- validation (qobject-input-visitor) -----------------------------------------
    def validate(self, cmd: Command, args: dict[str, Any]) -> dict[str, Any]:
        """Check ``args`` against ``cmd``; first error in schema member order, as QEMU."""
        return self._visit_members(cmd.args, args, "")

    def _visit_members(self, members: tuple[Member, ...], obj: dict[str, Any], prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for m in members:
            path = prefix + m.name
            if m.name not in obj:
                if m.optional:
                    continue
                raise ArgumentError(f"Parameter '{path}' is missing")
            out[m.name] = self._visit(m.type, obj[m.name], path)
        for k in obj:
            if k not in out and not any(m.name == k for m in members):
                raise ArgumentError(f"Parameter '{prefix}{k}' is unexpected")
        return out

    def _visit(self, typ: str, val: Any, path: str) -> Any:
        if typ.startswith("["):
            if not isinstance(val, list):
                raise ArgumentError(f"Invalid parameter type for '{path}', expected: array")
            inner = typ[1:-1]
            return [self._visit(inner, v, f"{path}[{i}]") for i, v in enumerate(val)]
        if typ == "any":
            return val
        if typ in _EXPECTED:
            ok = {
                "str": isinstance(val, str),
                "int": isinstance(val, int) and not isinstance(val, bool),
                "bool": isinstance(val, bool),
                "number": isinstance(val, (int, float)) and not isinstance(val, bool),
                "null": val is None,
            }[typ]
            if not ok:
                raise ArgumentError(f"Invalid parameter type for '{path}', expected: {_EXPECTED[typ]}")
            if typ == "int" and not -(1 << 63) <= val < (1 << 63):
                raise ArgumentError(f"Parameter '{path}' expects int64")
            return val
        if typ in self.enums:
            if not isinstance(val, str):
                raise ArgumentError(f"Invalid parameter type for '{path}', expected: string")
            if val not in self.enums[typ].values:
                name = "null" if path.endswith("]") else path  # QEMU's quirk for list elements
                raise ArgumentError(f"Parameter '{name}' does not accept value '{val}'")
            return val
        if typ in self.objects:
            if not isinstance(val, dict):
                raise ArgumentError(f"Invalid parameter type for '{path}', expected: object")
            return self._visit_members(self.objects[typ].members, val, path + ".")
        raise ArgumentError(f"internal: unknown type '{typ}'")

    # -- introspection --------------------------------------------------------------------
    def query_commands(self) -> list[dict[str, str]]:
        return [{"name": n} for n in self.commands]

    def introspect(self) -> list[dict[str, Any]]:
        """query-qmp-schema: SchemaInfo for every entity, type names masked to numbers."""
        out: list[dict[str, Any]] = []
        names: dict[str, str] = {}
        done: set[str] = set()
        pending: list[tuple[str, Any]] = []

        def ref(typ: str) -> str:
            if typ in BUILTINS:
                if typ not in done:
                    done.add(typ)
                    out.append({"name": typ, "json-type": BUILTINS[typ] if typ != "any" else "value",
                                "meta-type": "builtin"})
                return typ
            if typ.startswith("["):
                inner = ref(typ[1:-1])
                name = f"[{inner}]"
                if name not in done:
                    done.add(name)
                    out.append({"name": name, "element-type": inner, "meta-type": "array"})
                return name
            if typ not in names:
                names[typ] = str(len(names))
                pending.append((typ, self.objects.get(typ) or self.enums.get(typ)))
            return names[typ]

        def anon(members: tuple[Member, ...]) -> str:
            key = "{" + ",".join(f"{m.name}:{m.type}:{m.optional}" for m in members) + "}"
            if key not in names:
                names[key] = str(len(names))
                pending.append((key, ObjectType(key, members)))
            return names[key]

        empty = anon(())
        for c in self.commands.values():
            info: dict[str, Any] = {"name": c.name, "ret-type": ref(c.returns) if c.returns else empty,
                                    "meta-type": "command", "arg-type": anon(c.args) if c.args else empty}
            if c.allow_oob:
                info["allow-oob"] = True
            if c.features:
                info["features"] = list(c.features)
            out.append(info)
        for e in self.events.values():
            out.append({"name": e.name, "meta-type": "event", "arg-type": anon(e.data) if e.data else empty})
        while pending:
            key, ent = pending.pop(0)
            if isinstance(ent, EnumType):
                out.append({"name": names[key], "meta-type": "enum", "values": list(ent.values),
                            "members": [{"name": v} for v in ent.values]})
            elif isinstance(ent, ObjectType):
                members = []
                for m in ent.members:
                    d: dict[str, Any] = {"name": m.name, "type": ref(m.type)}
                    if m.optional:
                        d["default"] = None
                    if m.features:
                        d["features"] = list(m.features)
                    members.append(d)
                out.append({"name": names[key], "members": members, "meta-type": "object"})
        return out


def default_schema() -> Schema:
    s = Schema()
    for e in ENUMS:
        s.add_enum(e)
    for o in OBJECTS:
        s.add_object(o)
    for c in COMMANDS:
        s.add_command(c)
    for ev in EVENTS:
        s.add_event(ev)
    return s
