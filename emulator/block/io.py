"""The byte layer under a format driver: positional reads and writes on a file.

A format driver (qcow2, raw) talks to a :class:`BlockFile`, never to a path, so
tests can hand it memory (:class:`MemoryFile`), a file that "loses power" after
the N-th write (:class:`FaultInjectionFile`) or one that fails like a full or broken
disk (:class:`BlkdebugFile`, QEMU's blkdebug), and users a real file (:class:`OsFile`).  This plays the part of QEMU's ``file`` protocol driver
(block/file-posix.c).  Imports neither unicorn nor asyncio.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import io
import os
import struct
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

from emulator.errors import BlockIOError

Buffer = bytes | bytearray | memoryview


@runtime_checkable
class BlockFile(Protocol):
    """What a format driver needs from the file below it."""

    def pread(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes; bytes past the end of the file read as zeros."""
        ...

    def preadinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from ``offset``; past the end of the file it gets zeros."""
        ...

    def pwrite(self, offset: int, data: Buffer) -> None: ...

    def flush(self) -> None:
        """Make everything written so far durable (fdatasync)."""
        ...

    def size(self) -> int: ...

    def truncate(self, size: int) -> None: ...

    def allocated_bytes(self) -> int:
        """Host bytes in use (``disk size`` in qemu-img info)."""
        ...

    def close(self) -> None: ...


def zero_fill(buf: memoryview) -> None:
    """Zero a writable buffer with one memset that releases the GIL.

    Guest RAM may be write-protected by userfaultfd while we fill it; a store
    made with the GIL held could then deadlock against the fault handler
    (see docs/reference/unicorn-notes.md), so no numpy or slice assignment here.
    """
    n = buf.nbytes
    if n == 0:
        return
    if buf.readonly:
        raise ValueError("zero_fill needs a writable buffer")
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    ctypes.memset(addr, 0, n)


_SYNC_FILE_RANGE_WRITE = 2


def _find_sync_file_range() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):  # not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_sync_file_range = _find_sync_file_range()


# QEMU's image locking (file-posix.c, ``locking=auto``): one byte per permission, locked shared
# (an OFD read lock) at PERM_BASE + bit by a holder of that permission and at SHARED_BASE + bit
# by a holder that does not let others have it.  A running QEMU 7.2 with a writable qcow2 holds
# bytes 100, 101, 103, 201 and 203 (read in /proc/locks); a read-only one 100, 201 and 203.
LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200
LOCK_PERMS = ("consistent read", "write", "write unchanged", "resize")  # BLK_PERM_* bits 0-3
_FLOCK = "@hhqqi4x"  # struct flock on Linux (l_type, l_whence, l_start, l_len, l_pid)
_locking = False  # the process default for ``locking=auto``: set_image_locking


def set_image_locking(on: bool) -> None:
    """Whether images opened from now on take QEMU's locks by default (``locking=auto``).  The
    command-line programs (``snaplab-system``, ``snaplab-img``) turn it on, as QEMU's are; the
    library leaves it off (docs/deviations.md 62)."""
    global _locking
    _locking = on


def image_locking() -> bool:
    return _locking


@contextlib.contextmanager
def images_locked() -> Iterator[None]:
    """QEMU's locks taken by default while the block runs (a command-line program's main());
    the caller's setting is back afterwards (a test that calls main() in-process keeps its own)."""
    was = _locking
    set_image_locking(True)
    try:
        yield
    finally:
        set_image_locking(was)


def _ofd(fd: int, cmd: int, kind: int, offset: int) -> int:
    """One OFD lock call on byte ``offset``; returns the l_type the kernel answered."""
    got = fcntl.fcntl(fd, cmd, struct.pack(_FLOCK, kind, os.SEEK_SET, offset, 1, 0))
    return int(struct.unpack(_FLOCK, got)[0])


def lock_image(fd: int, path: str, read_only: bool) -> None:
    """raw_check_lock_bytes + raw_apply_lock_bytes for a holder without force-share: the
    permissions it needs (consistent read; with write and resize when writable), none of write
    and resize shared.  BlockIOError with QEMU's words where another open file holds a
    conflicting byte; where the file system has no OFD locks, nothing is locked (QEMU's auto)."""
    perms = {0} if read_only else {0, 1, 3}
    unshared = {1, 3}
    cmd_get, cmd_set = getattr(fcntl, "F_OFD_GETLK", None), getattr(fcntl, "F_OFD_SETLK", None)
    if cmd_get is None or cmd_set is None:
        return
    try:
        for bit, name in enumerate(LOCK_PERMS):
            if bit in perms and _ofd(fd, cmd_get, fcntl.F_WRLCK, LOCK_SHARED_BASE + bit) != fcntl.F_UNLCK:
                raise BlockIOError(f"Could not open '{path}': Failed to get \"{name}\" lock\n"
                                   f"Is another process using the image [{path}]?")
            if bit in unshared and _ofd(fd, cmd_get, fcntl.F_WRLCK, LOCK_PERM_BASE + bit) != fcntl.F_UNLCK:
                raise BlockIOError(f"Could not open '{path}': Failed to get shared \"{name}\" lock\n"
                                   f"Is another process using the image [{path}]?")
        for bit in sorted(perms):
            _ofd(fd, cmd_set, fcntl.F_RDLCK, LOCK_PERM_BASE + bit)
        for bit in sorted(unshared):
            _ofd(fd, cmd_set, fcntl.F_RDLCK, LOCK_SHARED_BASE + bit)
    except OSError as err:
        if err.errno in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP):
            return  # no OFD locks here: as QEMU's locking=auto
        raise BlockIOError(f"Could not open '{path}': Failed to lock byte: {err.strerror}") from err


class OsFile:
    """A real file, read and written with pread/pwrite (QEMU's file-posix).

    ``no_flush`` mirrors QEMU's ``cache.no-flush=on``: flush() then skips
    fdatasync (ordering against a killed process still holds; power loss does not).
    """

    concurrent_writes = True  # pwrite(2) at an offset: several threads may write at once

    def __init__(self, fd: int, *, read_only: bool = False, no_flush: bool = False, owns_fd: bool = True) -> None:
        self.fd = fd
        self.read_only = read_only
        self.no_flush = no_flush
        self._owns = owns_fd
        self._direct: int | None = None  # a second descriptor with O_DIRECT, opened on first use

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, read_only: bool = False, create: bool = False,
             no_flush: bool = False, locking: bool | None = None) -> OsFile:
        """Open (``create``: create or empty) ``path``; ``locking``: take QEMU's image locks
        (:func:`lock_image`; None: the process default, :func:`set_image_locking`).  A file being
        created is emptied only once its locks are held, so an image in use is never truncated
        (``qemu-img convert`` onto its own source fails the same way)."""
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if create:
            flags |= os.O_CREAT
        try:
            fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as err:
            raise BlockIOError(f"Could not open '{os.fspath(path)}': {err.strerror}") from err
        try:
            if _locking if locking is None else locking:
                lock_image(fd, os.fspath(path), read_only)
            if create:
                os.ftruncate(fd, 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, read_only=read_only, no_flush=no_flush)

    def pread(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self.fd, length, offset)
            while len(data) < length:
                more = os.pread(self.fd, length - len(data), offset + len(data))
                if not more:
                    return data + bytes(length - len(data))
                data += more
            return data
        except OSError as err:
            raise BlockIOError(f"Could not read at offset {offset}: {err.strerror}") from err

    def preadinto(self, offset: int, buf: memoryview) -> None:
        done = 0
        n = buf.nbytes
        try:
            while done < n:
                got = os.preadv(self.fd, [buf[done:]], offset + done)
                if got == 0:
                    zero_fill(buf[done:])
                    return
                done += got
        except OSError as err:
            raise BlockIOError(f"Could not read at offset {offset}: {err.strerror}") from err

    def pwrite(self, offset: int, data: Buffer) -> None:
        mv = memoryview(data).cast("B")
        done = 0
        try:
            while done < mv.nbytes:
                done += os.pwrite(self.fd, mv[done:], offset + done)
        except OSError as err:
            raise BlockIOError(f"Could not write at offset {offset}: {err.strerror}") from err

    def _direct_fd(self) -> int:
        if self._direct is None:
            self._direct = -1
            flag = getattr(os, "O_DIRECT", 0)
            if flag and self.fd >= 0:
                mode = os.O_RDONLY if self.read_only else os.O_RDWR
                try:
                    self._direct = os.open(f"/proc/self/fd/{self.fd}", mode | flag | os.O_CLOEXEC)
                except OSError:
                    pass  # no /proc, or a file system without O_DIRECT (older tmpfs)
        return self._direct

    def pwrite_direct(self, offset: int, data: Buffer) -> None:
        """Write around the page cache (O_DIRECT, QEMU's ``cache.direct=on``) where the file
        system and the alignment allow, otherwise an ordinary :meth:`pwrite`.

        For large writes nobody reads back soon (VM state): no page-cache pages to allocate
        (on this VM that cost 0.7-6 ms per 2 MiB against 0.9 ms direct), nothing dirty left
        for the final flush but metadata.  The data must start on a 4 KiB boundary of the
        file and of memory, and be whole 4 KiB blocks; anything else goes the buffered way.
        """
        mv = memoryview(data).cast("B")
        dfd = self._direct_fd() if not self.read_only else -1
        if dfd >= 0 and offset % 4096 == 0 and mv.nbytes % 4096 == 0:
            done = 0
            try:
                while done < mv.nbytes:
                    done += os.pwrite(dfd, mv[done:], offset + done)
                return
            except OSError as err:
                if err.errno != errno.EINVAL or done:
                    raise BlockIOError(f"Could not write at offset {offset}: {err.strerror}") from err
                # EINVAL before any byte: the memory is not aligned for O_DIRECT
        self.pwrite(offset, mv)

    def preadinto_direct(self, offset: int, buf: memoryview) -> None:
        """Read around the page cache (O_DIRECT) where the file system and the alignment allow
        (offset, address and length on 4 KiB), otherwise, or for what is left after a short
        read, an ordinary :meth:`preadinto`.  For large reads into memory that keeps them
        (guest RAM): no page-cache pages to allocate, which on this VM host cost several
        times the read itself (docs/deviations.md)."""
        mv = memoryview(buf).cast("B")
        dfd = self._direct_fd()
        done = 0
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mv)) if mv.nbytes and not mv.readonly else 1
        if dfd >= 0 and offset % 4096 == 0 and mv.nbytes % 4096 == 0 and addr % 4096 == 0:
            try:
                while done < mv.nbytes:
                    got = os.preadv(dfd, [mv[done:]], offset + done)
                    if got <= 0 or got % 4096:
                        done += max(got, 0)
                        break  # the end of the file: the rest the ordinary way
                    done += got
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise BlockIOError(f"Could not read at offset {offset + done}: {err.strerror}") from err
        if done < mv.nbytes:
            self.preadinto(offset + done, mv[done:])

    def flush(self) -> None:
        if self.no_flush or self.read_only:
            return
        try:
            os.fdatasync(self.fd)
        except OSError as err:
            raise BlockIOError(f"Could not flush: {err.strerror}") from err

    def start_writeback(self) -> None:
        """Start writing this file's dirty pages back without waiting for them (Linux
        sync_file_range(SYNC_FILE_RANGE_WRITE)), so a later flush() has less left to wait
        for; a no-op where that call does not exist or flushes are off."""
        if self.no_flush or self.read_only or _sync_file_range is None:
            return
        _sync_file_range(self.fd, 0, 0, _SYNC_FILE_RANGE_WRITE)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def truncate(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as err:
            raise BlockIOError(f"Could not truncate to {size}: {err.strerror}") from err

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        if self._direct is not None and self._direct >= 0:
            os.close(self._direct)
        self._direct = None
        if self._owns and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


class MemoryFile:
    """A file held in a bytearray: for tests and for images built in memory."""

    def __init__(self, data: Buffer = b"") -> None:
        self.data = bytearray(data)

    def pread(self, offset: int, length: int) -> bytes:
        chunk = bytes(self.data[offset:offset + length])
        return chunk + bytes(length - len(chunk))

    def preadinto(self, offset: int, buf: memoryview) -> None:
        buf[:] = self.pread(offset, buf.nbytes)

    def pwrite(self, offset: int, data: Buffer) -> None:
        mv = memoryview(data).cast("B")
        end = offset + mv.nbytes
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[offset:end] = mv

    def flush(self) -> None:
        pass  # nothing in memory to make durable

    def size(self) -> int:
        return len(self.data)

    def truncate(self, size: int) -> None:
        if size < len(self.data):
            del self.data[size:]
        else:
            self.data.extend(bytes(size - len(self.data)))

    def allocated_bytes(self) -> int:
        return len(self.data)

    def close(self) -> None:
        pass


class PyFile:
    """Any seekable Python binary file object (``io.BytesIO``, an open file)."""

    def __init__(self, f: io.IOBase) -> None:
        self.f = f

    def pread(self, offset: int, length: int) -> bytes:
        self.f.seek(offset)
        chunk = self.f.read(length) or b""
        return bytes(chunk) + bytes(length - len(chunk))

    def preadinto(self, offset: int, buf: memoryview) -> None:
        buf[:] = self.pread(offset, buf.nbytes)

    def pwrite(self, offset: int, data: Buffer) -> None:
        end = self.size()
        if offset > end:
            self.f.seek(end)
            self.f.write(bytes(offset - end))
        self.f.seek(offset)
        self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def size(self) -> int:
        return int(self.f.seek(0, io.SEEK_END))

    def truncate(self, size: int) -> None:
        self.f.truncate(size)

    def allocated_bytes(self) -> int:
        return self.size()

    def close(self) -> None:
        pass


class PowerCut(Exception):
    """Raised by :class:`FaultInjectionFile`: the simulated process died here.

    Deliberately not a SnaplabError: nothing in snaplab may catch it.
    """


class FaultInjectionFile:
    """Wraps a BlockFile and lets exactly ``writes_allowed`` writes through.

    The next write, and every operation after it, raises :class:`PowerCut`:
    what is on the inner file is then what a process killed at that instant
    would have left (writes to the page cache survive a killed process).
    """

    def __init__(self, inner: BlockFile, writes_allowed: int) -> None:
        self.inner = inner
        self.writes_allowed = writes_allowed
        self.writes = 0
        self.dead = False

    def _alive(self) -> None:
        if self.dead:
            raise PowerCut("the process is dead")

    def pread(self, offset: int, length: int) -> bytes:
        self._alive()
        return self.inner.pread(offset, length)

    def preadinto(self, offset: int, buf: memoryview) -> None:
        self._alive()
        self.inner.preadinto(offset, buf)

    def pwrite(self, offset: int, data: Buffer) -> None:
        self._alive()
        if self.writes >= self.writes_allowed:
            self.dead = True
            raise PowerCut(f"power cut before write #{self.writes + 1}")
        self.writes += 1
        self.inner.pwrite(offset, data)

    def flush(self) -> None:
        self._alive()
        self.inner.flush()

    def size(self) -> int:
        self._alive()
        return self.inner.size()

    def truncate(self, size: int) -> None:
        self._alive()
        if self.writes >= self.writes_allowed:
            self.dead = True
            raise PowerCut("power cut before truncate")
        self.writes += 1
        self.inner.truncate(size)

    def allocated_bytes(self) -> int:
        return self.inner.allocated_bytes()

    def close(self) -> None:
        pass


class BlkdebugFile:
    """A BlockFile that fails like a full or broken disk: QEMU's blkdebug driver
    (block/blkdebug.c ``inject-error``) as the file below an image, for tests.

    Two kinds of rule, any number of each:

    * :meth:`fail_nth`: the ``nth`` operation of the kinds named (``pwrite``, ``truncate``,
      ``flush``, ``pread``), counted from now, fails with ``err``; ``times`` failures in a row
      (None: every later one too), as blkdebug's ``once=on|off``; with ``span`` only reads
      and writes touching those file offsets count (blkdebug's ``sector``);
    * :meth:`fill`: the file system has ``room`` bytes left.  A write into blocks the file
      already has (rewriting data, or clusters the image freed but kept) needs no room; one
      into a hole (past the end, or the sparse tail an image grows ahead) takes 4 KiB blocks
      from ``room`` and fails with ENOSPC, writing nothing, when there are not enough.
      Truncating succeeds (a sparse file takes no room).

    Errors are raised as :class:`OsFile` raises them (BlockIOError with the OSError as cause),
    so everything above sees what a real full or failing disk gives it.
    """

    KINDS = ("pwrite", "truncate", "flush", "pread")

    def __init__(self, inner: BlockFile) -> None:
        self.inner = inner
        self.counts = dict.fromkeys(self.KINDS, 0)
        self.failures = 0  # operations failed so far
        self.room: int | None = None  # bytes the file system has left (None: no limit)
        # kinds, nth, errno, times, span; and how many operations each rule has counted
        self._rules: list[tuple[frozenset[str], int, int, int | None, tuple[int, int] | None]] = []
        self._seen: list[int] = []

    # -- rules ------------------------------------------------------------------------------
    def fail_nth(self, nth: int, err: int = errno.ENOSPC, kinds: tuple[str, ...] = ("pwrite", "truncate", "flush"),
                 times: int | None = 1, span: tuple[int, int] | None = None) -> None:
        """The ``nth`` (1-based, counted from now over ``kinds``, and ``span`` if given)
        operation fails with ``err``."""
        unknown = set(kinds) - set(self.KINDS)
        if unknown or nth < 1:
            raise ValueError(f"bad rule: nth={nth}, kinds={kinds}")
        self._rules.append((frozenset(kinds), nth, err, times, span))
        self._seen.append(0)

    def fill(self, room: int | None = 0) -> None:
        """The file system has ``room`` bytes left for new blocks (0: full; None: no limit)."""
        self.room = room

    def clear(self) -> None:
        """Every rule dropped: the disk works again."""
        self._rules.clear()
        self._seen.clear()
        self.room = None

    def _new_blocks(self, offset: int, end: int) -> int:
        """Bytes of 4 KiB blocks in [offset, end) the file does not have yet (its holes)."""
        lo, hi = offset // 4096 * 4096, -(-end // 4096) * 4096
        fd = getattr(self.inner, "fd", -1)
        if not isinstance(fd, int) or fd < 0:
            return max(0, hi - max(lo, -(-self.inner.size() // 4096) * 4096))
        return hi - lo - sum(e - s for s, e in data_extents(self.inner, lo, hi))

    def _check(self, kind: str, what: str, offset: int = 0, length: int = 0) -> None:
        self.counts[kind] += 1
        for i, (kinds, at, err, times, span) in enumerate(self._rules):
            if kind not in kinds or (span is not None and not (offset < span[1] and span[0] < offset + length)):
                continue
            self._seen[i] += 1
            n = self._seen[i]
            if n >= at and (times is None or n < at + times):
                self.failures += 1
                raise BlockIOError(f"{what}: {os.strerror(err)}") from OSError(err, os.strerror(err))

    # -- the BlockFile protocol ---------------------------------------------------------------
    def pread(self, offset: int, length: int) -> bytes:
        self._check("pread", f"Could not read at offset {offset}", offset, length)
        return self.inner.pread(offset, length)

    def preadinto(self, offset: int, buf: memoryview) -> None:
        self._check("pread", f"Could not read at offset {offset}", offset, buf.nbytes)
        self.inner.preadinto(offset, buf)

    def pwrite(self, offset: int, data: Buffer) -> None:
        mv = memoryview(data).cast("B")
        self._check("pwrite", f"Could not write at offset {offset}", offset, mv.nbytes)
        if self.room is not None and mv.nbytes:
            need = self._new_blocks(offset, offset + mv.nbytes)
            if need > self.room:
                self.failures += 1
                err = errno.ENOSPC
                raise BlockIOError(f"Could not write at offset {offset}: {os.strerror(err)}") from OSError(
                    err, os.strerror(err))
            self.room -= need
        self.inner.pwrite(offset, mv)

    def pwrite_direct(self, offset: int, data: Buffer) -> None:
        """O_DIRECT where the file below has it; the same rules apply."""
        self.pwrite(offset, data)

    def start_writeback(self) -> None:
        start = getattr(self.inner, "start_writeback", None)
        if start is not None:
            start()

    def flush(self) -> None:
        self._check("flush", "Could not flush")
        self.inner.flush()

    def size(self) -> int:
        return self.inner.size()

    def truncate(self, size: int) -> None:
        self._check("truncate", f"Could not truncate to {size}")
        self.inner.truncate(size)

    def allocated_bytes(self) -> int:
        return self.inner.allocated_bytes()

    def close(self) -> None:
        self.inner.close()


def data_extents(f: BlockFile, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
    """The ranges of [start, end) where the file holds blocks (not holes), in order, from
    ``lseek(SEEK_DATA/SEEK_HOLE)`` on the descriptor below any wrappers; a file without one
    (in memory) holds blocks up to its size."""
    size = f.size()
    end = size if end is None else end
    inner: object = f
    while hasattr(inner, "inner"):
        inner = inner.inner
    fd = getattr(inner, "fd", -1)
    if not isinstance(fd, int) or fd < 0:
        if start < min(end, size):
            yield start, min(end, size)
        return
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: nothing but holes from here to the end of the file
            return
        if data >= end:
            return
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        yield data, min(hole, end)
        pos = hole


def as_block_file(obj: object, *, read_only: bool = False) -> BlockFile:
    """Accept a BlockFile, a bytes-like object, or a seekable Python file object."""
    if isinstance(obj, (OsFile, MemoryFile, PyFile, FaultInjectionFile, BlkdebugFile)):
        return obj
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return MemoryFile(obj)
    if isinstance(obj, io.IOBase):
        return PyFile(obj)
    if isinstance(obj, BlockFile):
        return obj
    raise TypeError(f"not a file: {obj!r}")
