"""snaplab's one exception tree.

Every error snaplab raises on purpose derives from :class:`SnaplabError` and
carries the QMP error class QEMU would answer with (``qmp_class``), so the QMP
layer can turn any of them into ``{"error": {"class": ..., "desc": ...}}``
without a table of its own (the idea of h11's ``error_status_hint`` and of
qemu.qmp's ``error.py``).  Every class is defined here, none elsewhere::

    SnaplabError                      GenericError
    ├── BlockError                    GenericError
    │   ├── ImageFormatError          a header/table field is invalid (names the field)
    │   ├── UnsupportedFeatureError   an incompatible feature we do not implement
    │   ├── ImageCorruptError         metadata found inconsistent while running
    │   ├── ReadOnlyError             a write to a read-only node or image
    │   ├── OutOfRangeError           a request outside the virtual disk
    │   ├── BlockIOError              the file below failed (keeps the OSError as cause)
    │   ├── CheckFailedError          a check that could not finish ("Check failed: ...")
    │   └── SnapshotError             snapshot table operations
    │       ├── SnapshotNotFoundError
    │       └── SnapshotExistsError
    ├── DeviceNotFoundError           DeviceNotFound (QMP)
    ├── DeviceNotActiveError          DeviceNotActive (QMP): no such block job
    ├── LoadVMError                   GenericError: a VM state that does not fit this machine
    ├── SnapshotBusyError             GenericError: another snapshot operation is running
    ├── MigrationCancelled            GenericError: migrate_cancel reached the stream
    ├── UffdUnavailable               GenericError: the kernel refused userfaultfd
    ├── GuestMemoryError              GenericError: a host access outside guest RAM
    ├── VarstoreError                 GenericError (also a ValueError): a bad UEFI varstore
    ├── UsageError                    GenericError: a bad snaplab-system command line
    ├── AssemblyError                 GenericError: a guest program did not assemble
    ├── JSONParseError                GenericError: a QMP input that is not JSON (QEMU's parser texts)
    ├── ArgumentError                 GenericError: a QMP argument that fails the schema
    ├── CommandNotFoundError          CommandNotFound (QMP)
    ├── JobCancelled                  GenericError: a job's work saw its cancellation
    ├── QMPError                      the class the monitor answered (client side)
    └── QMPTimeout                    GenericError: no answer in time (client side)

    lab.spec.SpecError                (SnaplabError and ValueError) a bad experiment spec
    lab.reproduce.ReproError          (SnaplabError and ValueError) a bad `snaplab reproduce` argument
    lab.qemu.QemuLost                 (SnaplabError and RuntimeError) the reference QEMU went away mid-run

Outside the tree on purpose: ``PowerCut`` (emulator/block/io.py), the fault-injection
file's simulated process death, which nothing in snaplab may catch.

This module imports nothing from the rest of snaplab.
"""

from __future__ import annotations


class SnaplabError(Exception):
    """Root of snaplab's errors; ``qmp_class`` is the QMP class QEMU would use."""

    qmp_class: str = "GenericError"

    @property
    def desc(self) -> str:
        """The human text, as a QMP ``desc`` member would carry it."""
        return str(self)


class BlockError(SnaplabError):
    """Any failure of the block layer (emulator/block)."""


class ImageFormatError(BlockError):
    """An on-disk field is invalid; ``field`` names it (e.g. ``'l1_table_offset'``)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{message} (field '{field}')")


class UnsupportedFeatureError(BlockError):
    """The image uses a feature this driver does not implement (QEMU's -ENOTSUP)."""


class ImageCorruptError(BlockError):
    """Metadata is inconsistent (QEMU's qcow2_signal_corruption)."""


class ReadOnlyError(BlockError):
    """A write was attempted on a read-only image or node."""


class OutOfRangeError(BlockError):
    """A request lies (partly) outside the virtual disk."""


class BlockIOError(BlockError):
    """The underlying file failed; the OSError is kept as ``__cause__``."""

    @property
    def strerror(self) -> str:
        """The cause's strerror() ("No space left on device"), as QEMU's error_setg_errno()
        appends it; this error's own text when the cause is not an OSError."""
        cause = self.__cause__
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        return str(self)

    @property
    def errno(self) -> int | None:
        """The cause's errno (ENOSPC, EIO, ...), or None when the cause is not an OSError."""
        cause = self.__cause__
        return cause.errno if isinstance(cause, OSError) else None


class CheckFailedError(BlockError):
    """``qemu-img check`` could not finish (QEMU's "Check failed: <strerror>"); ``report`` is
    the line it printed first, saying why (e.g. ``ERROR snapshot table offset invalid``), as an
    error of the program (``prefixed``) or a plain line of the check; ``messages``: the check's
    lines before it."""

    def __init__(self, report: str, strerror: str, *, prefixed: bool = True,
                 messages: list[str] | None = None) -> None:
        self.report = report
        self.prefixed = prefixed
        self.messages = list(messages or [])
        super().__init__(f"Check failed: {strerror}")


class SnapshotError(BlockError):
    """An internal snapshot operation failed."""


class SnapshotNotFoundError(SnapshotError):
    """No snapshot with that id or name (QEMU: "Can't find the snapshot")."""


class SnapshotExistsError(SnapshotError):
    """A snapshot with that id already exists (QEMU: -EEXIST)."""


class DeviceNotFoundError(SnaplabError):
    """A named device or node does not exist."""

    qmp_class = "DeviceNotFound"


class DeviceNotActiveError(SnaplabError):
    """A block-job command named no block job (QEMU's find_block_job: snapshot jobs are not
    block jobs)."""

    qmp_class = "DeviceNotActive"


class LoadVMError(SnaplabError):
    """The stream does not match this machine (qemu_loadvm_state failing with -EINVAL)."""

    def __init__(self, detail: str, errno: int = -22) -> None:
        self.detail = detail
        self.errno = errno
        super().__init__(f"Error {errno} while loading VM state: {detail}")


class SnapshotBusyError(SnaplabError):
    """A snapshot operation was asked for while another one runs (one at a time per VM)."""


class MigrationCancelled(SnaplabError):
    """``migrate_cancel`` was seen by the outgoing stream."""


class UffdUnavailable(SnaplabError):
    """The kernel refused userfaultfd (not Linux, no permission, feature missing)."""


class GuestMemoryError(SnaplabError):
    """A host-side access outside guest RAM."""


class VarstoreError(SnaplabError, ValueError):
    """The UEFI-style variable store is malformed (bad magic, header or record)."""


class UsageError(SnaplabError):
    """A ``snaplab-system`` command-line option is wrong (QEMU's one-line error, exit 1)."""


class AssemblyError(SnaplabError):
    """A guest program did not assemble (build time only)."""


class JSONParseError(SnaplabError):
    """QMP input that QEMU's JSON parser rejects; the text is the parser's (json-parser.c)."""


class ArgumentError(SnaplabError):
    """An argument failed validation (GenericError, QEMU's wording)."""


class CommandNotFoundError(SnaplabError):
    """An unknown command, or one not allowed in this negotiation state."""

    qmp_class = "CommandNotFound"


class JobCancelled(SnaplabError):
    """Raised inside a job's work function when it notices it was cancelled."""


class QMPError(SnaplabError):
    """The monitor answered with an error; ``error_class`` and ``desc`` are QEMU's."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.qmp_class = error_class


class QMPTimeout(SnaplabError):
    """The monitor did not answer, or an event did not come, within the time given."""
