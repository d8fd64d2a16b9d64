"""QMP snapshot-save / snapshot-load / snapshot-delete as jobs, and HMP savevm / loadvm / delvm.

Mirrors migration/savevm.c's QMP glue (``qmp_snapshot_save`` & co.: a manual-dismiss job whose
work is save_snapshot / load_snapshot / delete_snapshot) and monitor/hmp-cmds.c (``hmp_savevm``
overwrites a same-named snapshot and picks every writable device; ``hmp_loadvm`` leaves the VM
stopped when the load fails).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from emulator.migration.cow import WP_BACKENDS
from emulator.migration.engines import (
    load_engine,
    load_engine_names,
    load_engine_values,
    save_engine_names,
)
from emulator.migration.savevm import SnapshotController
from emulator.qmp.commands import Monitor
from emulator.qmp.jobs import Job
from emulator.qmp.schema import Command, EnumType, Member

ENGINE_MEMBER = "__org.snaplab_engine"  # a downstream extension, named by QAPI's __RFQDN_ rule
BACKEND_MEMBER = "__org.snaplab_wp-backend"
SNAPSHOT_COMMANDS = [
    Command("snapshot-save", (Member("job-id", "str"), Member("tag", "str"), Member("vmstate", "str"),
                              Member("devices", "[str]"), Member(ENGINE_MEMBER, "SnaplabSaveEngine", True),
                              Member(BACKEND_MEMBER, "SnaplabWpBackend", True))),
    Command("snapshot-load", (Member("job-id", "str"), Member("tag", "str"), Member("vmstate", "str"),
                              Member("devices", "[str]"), Member(ENGINE_MEMBER, "SnaplabLoadEngine", True))),
    Command("snapshot-delete", (Member("job-id", "str"), Member("tag", "str"), Member("devices", "[str]"))),
    Command("__org.snaplab_query-snapshot-stats", (Member("id", "str"),), returns="any"),
]


def install_snapshot_commands(monitor: Monitor, ctl: SnapshotController) -> None:
    monitor.schema.add_enum(EnumType("SnaplabSaveEngine", save_engine_names()))
    monitor.schema.add_enum(EnumType("SnaplabLoadEngine", load_engine_values()))
    monitor.schema.add_enum(EnumType("SnaplabWpBackend", WP_BACKENDS))
    for cmd in SNAPSHOT_COMMANDS:
        monitor.schema.add_command(cmd)

    def save(a: dict[str, Any]) -> dict[str, Any]:
        def work(job: Job) -> None:
            m = ctl.save_snapshot(a["tag"], False, a["vmstate"], a["devices"], a.get(ENGINE_MEMBER, save_engine_names()[0]),
                                  a.get(BACKEND_MEMBER))
            job.result["metrics"] = m
        monitor.jobs.create(a["job-id"], "snapshot-save", work)
        return {}

    def load(a: dict[str, Any]) -> dict[str, Any]:
        engine = a.get(ENGINE_MEMBER, load_engine_names()[0])  # the first is QEMU's own

        def work(job: Job) -> None:
            job.result["metrics"] = ctl.load_snapshot(a["tag"], a["vmstate"], a["devices"], engine=engine)

        def early_work(job: Job) -> Iterator[Any]:
            """Up to RESUME as the command's bottom half (no thread wakes in between), then a worker."""
            job.result["metrics"] = yield from ctl.load_snapshot_steps(a["tag"], a["vmstate"], a["devices"],
                                                                       engine=engine)
        early = load_engine(engine).resumes_early
        if early:
            monitor.defer_events()  # up to RESUME, no other thread is woken
        monitor.jobs.create(a["job-id"], "snapshot-load", early_work if early else work)
        return {}

    def delete(a: dict[str, Any]) -> dict[str, Any]:
        monitor.jobs.create(a["job-id"], "snapshot-delete", lambda job: ctl.delete_snapshot(a["tag"], a["devices"]))
        return {}

    def stats(a: dict[str, Any]) -> dict[str, Any]:
        """What a snapshot job cost: downtime, total, faults, pages by fault vs background, ..."""
        job = monitor.jobs.find(a["id"])
        m = job.result.get("metrics")
        if m is None:
            return {}
        out: dict[str, Any] = {"engine": m.engine, "downtime-s": m.downtime_s, "total-s": m.total_s,
                               "vmstate-bytes": m.vmstate_bytes, "ram-pages-written": m.ram_pages_written,
                               "zero-pages": m.zero_pages}
        for k, v in m.extra.items():
            out[k.replace("_", "-")] = v
        return out

    monitor.handlers["__org.snaplab_query-snapshot-stats"] = stats
    monitor.handlers["snapshot-save"] = save
    monitor.handlers["snapshot-load"] = load
    monitor.handlers["snapshot-delete"] = delete

    def hmp_savevm(args: list[str]) -> str:
        ctl.save_snapshot(args[0] if args else None, True, None, None)
        return ""

    def hmp_loadvm(args: list[str]) -> str:  # (HMP refused a line without its tag: arity)
        ctl.load_snapshot(args[0], None, None)
        return ""

    def hmp_delvm(args: list[str]) -> str:
        ctl.delete_snapshot(args[0], None)
        return ""

    # hmp-commands.hx: savevm's .params say "tag" though its .args_type is "name:s?"
    monitor.hmp.register("savevm", hmp_savevm, "tag",
                         "save a VM snapshot. If no tag is provided, a new snapshot is created", arity=(0, 1))
    monitor.hmp.register("loadvm", hmp_loadvm, "tag", "restore a VM snapshot from its tag", arity=(1, 1))
    monitor.hmp.register("delvm", hmp_delvm, "tag", "delete a VM snapshot from its tag", arity=(1, 1))
