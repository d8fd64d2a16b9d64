"""QMP migration commands (qapi/migration.json): capabilities, migrate, query-migrate,
migrate_cancel, migrate-incoming, and the MIGRATION event."""

from __future__ import annotations

from typing import Any

from emulator.errors import SnaplabError
from emulator.migration.migrate import CAPABILITIES, Migration
from emulator.qmp.commands import Monitor
from emulator.qmp.schema import Command, EnumType, Event, Member, ObjectType

STATUSES = ("none", "setup", "cancelling", "cancelled", "active", "postcopy-active", "postcopy-paused",
            "postcopy-recover", "completed", "failed", "colo", "pre-switchover", "device", "wait-unplug")


def install_migration_commands(monitor: Monitor, mig: Migration) -> None:
    s = monitor.schema
    s.add_enum(EnumType("MigrationCapability", CAPABILITIES))
    s.add_enum(EnumType("MigrationStatus", STATUSES))
    s.add_object(ObjectType("MigrationCapabilityStatus", (Member("capability", "MigrationCapability"),
                                                          Member("state", "bool"))))
    for cmd in (
        Command("migrate-set-capabilities", (Member("capabilities", "[MigrationCapabilityStatus]"),)),
        Command("query-migrate-capabilities", returns="[MigrationCapabilityStatus]"),
        Command("migrate", (Member("uri", "str"), Member("blk", "bool", True), Member("inc", "bool", True),
                            Member("detach", "bool", True), Member("resume", "bool", True))),
        Command("query-migrate", returns="any"),
        Command("migrate_cancel"),
        Command("migrate-incoming", (Member("uri", "str"),)),
    ):
        s.add_command(cmd)
    s.add_event(Event("MIGRATION", (Member("status", "MigrationStatus"),)))

    def migrate(a: dict[str, Any]) -> dict[str, Any]:
        if a.get("blk") or a.get("inc"):
            raise SnaplabError("Block migration is not supported by snaplab (disks are shared storage)")
        if a.get("resume"):
            raise SnaplabError("Cannot resume if there is no paused migration")
        mig.migrate(a["uri"])
        return {}

    def set_caps(a: dict[str, Any]) -> dict[str, Any]:
        mig.set_capabilities(a["capabilities"])
        return {}

    def cancel(a: dict[str, Any]) -> dict[str, Any]:
        mig.cancel()
        return {}

    def incoming(a: dict[str, Any]) -> dict[str, Any]:
        mig.incoming(a["uri"])
        return {}

    monitor.handlers.update({
        "migrate-set-capabilities": set_caps,
        "query-migrate-capabilities": lambda a: mig.query_capabilities(),
        "migrate": migrate,
        "query-migrate": lambda a: mig.query(),
        "migrate_cancel": cancel,
        "migrate-incoming": incoming,
    })
