"""The human monitor behind ``human-monitor-command`` (QEMU's monitor/hmp-cmds.c).

Output uses ``\\r\\n`` line ends, as QEMU's monitor sends it; an error is a successful QMP
reply whose text starts with ``Error: `` (QEMU's error_report inside HMP).  Commands register
in :attr:`HMP.commands`; the snapshot commands (savevm, loadvm, delvm) are added by the
migration package.

Imports nothing of the QMP monitor (commands.py builds an :class:`HMP` and hands it the VM as
the narrow :class:`HMPTarget`, its version and its job list), so the two do not import each
other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from emulator.block.info import snapshot_dump, snapshot_dump_header
from emulator.block.node import BlockGraph, BlockNode
from emulator.errors import SnaplabError

HmpCommand = Callable[[list[str]], str]


class Backend(Protocol):
    """A BlockBackend as HMP shows it (the board's Attachment)."""

    @property
    def qdev(self) -> str: ...

    @property
    def node(self) -> BlockNode: ...


class HMPTarget(Protocol):
    """What the human monitor acts on: the VM's run state and block backends."""

    @property
    def graph(self) -> BlockGraph: ...

    def stop(self) -> None: ...

    def cont(self) -> None: ...

    def system_reset(self, reason: str = ...) -> None: ...

    def quit(self, reason: str = ...) -> None: ...

    def query_status(self) -> dict[str, Any]: ...

    def block_attachments(self) -> Sequence[Backend]: ...


def snapshot_nodes(vm: HMPTarget) -> list[BlockNode]:
    """bdrv_all_get_snapshot_devices() without a list: writable nodes that a device uses or
    that have no parent (bdrv_all_snapshots_includes_bs)."""
    nodes = list(vm.graph.nodes.values())
    attached = {a.node.node_name for a in vm.block_attachments()}
    parents = {c.node_name for n in nodes for c in n.children.values()}
    return [n for n in nodes if not n.read_only and (n.node_name in attached or n.node_name not in parents)]


def hmp_split(line: str) -> tuple[list[str], bool]:
    """Words as QEMU's HMP reads them: the command name up to white space, then arguments
    that may be double-quoted with backslash escapes (monitor/hmp.c get_str); and whether
    every quoted argument was closed (get_str fails on an unterminated one: the command is
    then refused with ``string expected``)."""
    out: list[str] = []
    closed = True
    i, n = 0, len(line)
    while i < n:
        while i < n and line[i].isspace():
            i += 1
        if i >= n:
            break
        if out and line[i] == '"':
            i += 1
            word = []
            while i < n and line[i] != '"':
                if line[i] == "\\" and i + 1 < n:
                    i += 1
                word.append(line[i])
                i += 1
            closed = closed and i < n
            i += 1
            out.append("".join(word))
        else:
            j = i
            while j < n and not line[j].isspace():
                j += 1
            out.append(line[i:j])
            i = j
    return out, closed


class HMP:
    """One human monitor: ``version`` is query-version's answer, ``query_jobs`` query-jobs'."""

    def __init__(self, vm: HMPTarget, version: Callable[[], dict[str, Any]],
                 query_jobs: Callable[[], list[dict[str, Any]]]) -> None:
        self.vm = vm
        self._version = version
        self._query_jobs = query_jobs
        self.commands: dict[str, tuple[HmpCommand, str, str]] = {}
        self._aliases: dict[str, str] = {}
        self._arity: dict[str, tuple[int, int | None]] = {}  # least and most words (None: the rest of the line)
        self.register("help", self._help, "[cmd]", "show the help", aliases=("?",), arity=(0, None))
        self.register("info", self._info, "[subcommand]", "show various information about the system state",
                      arity=(0, None))
        self.register("stop", lambda a: self._call(vm.stop), "", "stop emulation", aliases=("s",))
        self.register("cont", lambda a: self._call(vm.cont), "", "resume emulation", aliases=("c",))
        self.register("system_reset", lambda a: self._call(lambda: vm.system_reset("host-qmp-system-reset")),
                      "", "reset the system")
        self.register("quit", lambda a: self._call(lambda: vm.quit("host-qmp-quit")), "",
                      "quit the emulator", aliases=("q",))
        self.info_commands: dict[str, tuple[HmpCommand, str]] = {
            "status": (self._info_status, "show the current VM status (running|paused)"),
            "block": (self._info_block, "show info of one block device or all block devices"),
            "snapshots": (self._info_snapshots, "show the currently saved VM snapshots"),
            "version": (self._info_version, "show the version of QEMU"),
            "jobs": (self._info_jobs, "show information about active background jobs"),
        }
        self._info_arity: dict[str, tuple[int, int | None]] = {"block": (0, None)}  # the others take none

    def register(self, name: str, fn: HmpCommand, params: str, help_: str, aliases: tuple[str, ...] = (),
                 arity: tuple[int, int | None] = (0, 0)) -> None:
        """``params`` as ``help`` shows them (hmp-commands.hx ``.params``); ``arity``: how many
        words ``.args_type`` takes, at least and at most (None: the rest of the line)."""
        self.commands[name] = (fn, params, help_)
        self._arity[name] = arity
        for a in aliases:
            self._aliases[a] = name

    @staticmethod
    def _misparsed(label: str, typed: str, got: int, arity: tuple[int, int | None]) -> str | None:
        """monitor_parse_arguments()'s refusal of a line with too few or too many words (None:
        the count fits).  ``label`` is QEMU's ``cmd->name`` (``stop|s`` for a command with an
        alias), ``typed`` the command as typed, for the ``help`` hint."""
        least, most = arity
        if got < least:
            why = "string expected"
        elif most is not None and got > most:
            why = "extraneous characters at the end of line"
        else:
            return None
        return f'{label}: {why}\nTry "help {typed}" for more information\n'

    def _label(self, name: str) -> str:
        return "|".join([name, *(a for a, n in self._aliases.items() if n == name)])

    @staticmethod
    def _call(fn: Callable[[], None]) -> str:
        fn()
        return ""

    def execute(self, line: str) -> str:
        """Run one command line; returns the text QEMU's human-monitor-command would."""
        words, closed = hmp_split(line)
        if not words:
            return ""
        name = self._aliases.get(words[0], words[0])
        entry = self.commands.get(name)
        if entry is None:
            return f"unknown command: '{words[0]}'\r\n"
        if not closed:  # get_str's "unterminated string" (on QEMU's stdout), then the command's refusal
            return f'{self._label(name)}: string expected\r\nTry "help {words[0]}" for more information\r\n'
        refused = self._misparsed(self._label(name), words[0], len(words) - 1, self._arity[name])
        if refused is not None:
            return refused.replace("\n", "\r\n")
        try:
            text = entry[0](words[1:])
        except SnaplabError as err:
            text = f"Error: {err.desc}\n"
        return text.replace("\r\n", "\n").replace("\n", "\r\n")

    # -- commands -----------------------------------------------------------------------------
    def _help(self, args: list[str]) -> str:
        out = []
        names = dict(self.commands)
        rev: dict[str, list[str]] = {}
        for a, n in self._aliases.items():
            rev.setdefault(n, []).append(a)
        for n in sorted(names):
            if args and args[0] != n:
                continue
            _, params, h = names[n]
            label = "|".join([n, *rev.get(n, [])])
            out.append(f"{label} {params} -- {h}".replace("  --", " --"))
        if args and not out:
            return f"unknown command: '{args[0]}'\n"
        return "\n".join(out) + "\n"

    def _info(self, args: list[str]) -> str:
        if not args:
            return "".join(f"info {k}  -- {h}\n" for k, (_, h) in sorted(self.info_commands.items()))
        entry = self.info_commands.get(args[0])
        if entry is None:
            return f"unknown command: 'info {args[0]}'\n"
        refused = self._misparsed(args[0], f"info {args[0]}", len(args) - 1, self._info_arity.get(args[0], (0, 0)))
        return refused if refused is not None else entry[0](args[1:])

    def _info_status(self, args: list[str]) -> str:
        st = self.vm.query_status()
        text = "VM status: " + ("running" if st["running"] else "paused")
        if not st["running"] and st["status"] != "paused":
            text += f" ({st['status']})"
        return text + "\n"

    def _info_version(self, args: list[str]) -> str:
        v = self._version()
        q = v["qemu"]
        return f"{q['major']}.{q['minor']}.{q['micro']} ({v['package']})\n"

    def _info_jobs(self, args: list[str]) -> str:
        jobs = self._query_jobs()
        if not jobs:
            return "No active jobs\n"
        return "".join(f"Type {j['type']}, device {j['id']}: Completed {j['current-progress']} of "
                       f"{j['total-progress']} bytes, status {j['status']}\n" for j in jobs)

    def _info_block(self, args: list[str]) -> str:
        blocks = []
        for att in self.vm.block_attachments():
            n = att.node
            flags = n.driver + (", read-only" if n.read_only else "")
            blocks.append(f"{n.node_name}: {n.filename} ({flags})\n"
                          f"    Attached to:      {att.qdev}\n"
                          f"    Cache mode:       writeback\n")
        return "\n".join(blocks)

    def _info_snapshots(self, args: list[str]) -> str:
        """hmp_info_snapshots(): snapshots present on all disks, then partial ones per image."""
        nodes = snapshot_nodes(self.vm)
        capable = [n for n in nodes if n.can_snapshot]
        if not capable:  # bdrv_all_find_vmstate_bs()'s error, reported without "Error: "
            return "no block device can store vmstate for snapshot\n"
        vm_bs = capable[0]
        images = []
        for n in nodes:
            if n.can_snapshot:
                sns = n.snapshot_image.snapshot_list()
                if sns:
                    images.append((n.backend, list(sns)))
        if not images:
            return "There is no snapshot available.\n"
        global_sns = []
        for sn in vm_bs.snapshot_image.snapshot_list():
            everywhere = all(n.can_snapshot and any(s.name == sn.name for s in n.snapshot_image.snapshot_list())
                             for n in nodes)
            if everywhere:
                global_sns.append(sn)
                for _, lst in images:
                    lst[:] = [s for s in lst if s.name != sn.name]
        out = "List of snapshots present on all disks:\n"
        if global_sns:
            out += snapshot_dump_header() + "\n"
            for sn in global_sns:
                out += snapshot_dump(dataclasses.replace(sn, id_str="--")) + "\n"
        else:
            out += "None\n"
        for name, lst in images:
            if not lst:
                continue
            out += f"\nList of partial (non-loadable) snapshots on '{name}':\n" + snapshot_dump_header() + "\n"
            out += "".join(snapshot_dump(sn) + "\n" for sn in lst)
        return out
