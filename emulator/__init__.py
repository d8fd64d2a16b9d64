"""snaplab's machine: everything QEMU would be (block layer, guest, QMP, migration)."""

from emulator.errors import (
    BlockError,
    BlockIOError,
    DeviceNotFoundError,
    ImageCorruptError,
    ImageFormatError,
    OutOfRangeError,
    ReadOnlyError,
    SnaplabError,
    SnapshotError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    UnsupportedFeatureError,
)

__all__ = [
    "BlockError",
    "BlockIOError",
    "DeviceNotFoundError",
    "ImageCorruptError",
    "ImageFormatError",
    "OutOfRangeError",
    "ReadOnlyError",
    "SnaplabError",
    "SnapshotError",
    "SnapshotExistsError",
    "SnapshotNotFoundError",
    "UnsupportedFeatureError",
]
