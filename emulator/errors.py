"""snaplab's one exception tree.

Every error snaplab raises on purpose derives from :class:`SnaplabError` and
carries the QMP error class QEMU would answer with (``qmp_class``), so the QMP
layer can turn any of them into ``{"error": {"class": ..., "desc": ...}}``
without a table of its own (the idea of h11's ``error_status_hint`` and of
qemu.qmp's ``error.py``)::

    SnaplabError                      GenericError
    ├── BlockError                    GenericError
    │   ├── ImageFormatError          a header/table field is invalid (names the field)
    │   ├── UnsupportedFeatureError   an incompatible feature we do not implement
    │   ├── ImageCorruptError         metadata found inconsistent while running
    │   ├── ReadOnlyError             a write to a read-only node or image
    │   ├── OutOfRangeError           a request outside the virtual disk
    │   ├── BlockIOError              the file below failed (keeps the OSError as cause)
    │   └── SnapshotError             snapshot table operations
    │       ├── SnapshotNotFoundError
    │       └── SnapshotExistsError
    └── DeviceNotFoundError           DeviceNotFound (QMP)

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


class SnapshotError(BlockError):
    """An internal snapshot operation failed."""


class SnapshotNotFoundError(SnapshotError):
    """No snapshot with that id or name (QEMU: "Can't find the snapshot")."""


class SnapshotExistsError(SnapshotError):
    """A snapshot with that id already exists (QEMU: -EEXIST)."""


class DeviceNotFoundError(SnaplabError):
    """A named device or node does not exist."""

    qmp_class = "DeviceNotFound"
