"""Linux userfaultfd through ctypes: write protection and missing-page handling of guest RAM.

Only what the snapshot engines need (linux/userfaultfd.h): create a userfaultfd, negotiate
features (UFFDIO_API), register a range (UFFDIO_REGISTER), write-protect or release a range
(UFFDIO_WRITEPROTECT), wake waiters without touching page tables (UFFDIO_WAKE), and read fault
messages.  Every call is a ctypes foreign call or an os.read, so none holds the GIL while the
kernel works (a fault handler written in Python needs the GIL to run).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import struct
from dataclasses import dataclass

import numpy as np

from emulator.errors import UffdUnavailable

log = logging.getLogger(__name__)

SYS_userfaultfd = 323  # x86-64
UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_UNREGISTER = 0x8010AA01
UFFDIO_WAKE = 0x8010AA02
UFFDIO_WRITEPROTECT = 0xC018AA06
UFFDIO_COPY = 0xC028AA03
UFFDIO_ZEROPAGE = 0xC020AA04
UFFDIO_MOVE = 0xC028AA05
UFFDIO_REGISTER_MODE_MISSING = 1
UFFDIO_REGISTER_MODE_WP = 2
UFFDIO_WRITEPROTECT_MODE_WP = 1
UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_EVENT_REMAP = 1 << 2
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFD_FEATURE_MOVE = 1 << 16
PAGEMAP_SCAN = 0xC0606610
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_PAGEFAULT_FLAG_WRITE = 1
UFFD_PAGEFAULT_FLAG_WP = 2
MSG_SIZE = 32

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


def _ioctl(fd: int, req: int, buf: ctypes.Array[ctypes.c_char]) -> None:
    if _libc.ioctl(fd, req, buf) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{os.strerror(e)} (ioctl {req:#x})")


@dataclass(frozen=True)
class Fault:
    address: int
    write: bool
    wp: bool


class UserFaultFD:
    """One userfaultfd with the features given, non-blocking reads via :meth:`read_faults`."""

    def __init__(self, features: int = UFFD_FEATURE_PAGEFAULT_FLAG_WP) -> None:
        fd = _libc.syscall(SYS_userfaultfd, os.O_CLOEXEC | os.O_NONBLOCK)
        if fd < 0:
            e = ctypes.get_errno()
            fd = _libc.syscall(SYS_userfaultfd, os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY)
            if fd < 0:
                raise UffdUnavailable(f"userfaultfd is not available: {os.strerror(e)} "
                                      "(kernel without CONFIG_USERFAULTFD, or vm.unprivileged_userfaultfd=0)")
        self.fd = int(fd)
        api = ctypes.create_string_buffer(struct.pack("<QQQ", UFFD_API, features, 0), 24)
        try:
            _ioctl(self.fd, UFFDIO_API, api)
        except OSError as err:
            os.close(self.fd)
            raise UffdUnavailable(f"userfaultfd refused features {features:#x}: {err}") from err
        _, self.features, self.ioctls = struct.unpack("<QQQ", api.raw)
        if features & ~self.features:
            os.close(self.fd)
            raise UffdUnavailable(f"userfaultfd lacks features {features & ~self.features:#x}")

    def register(self, start: int, length: int, mode: int) -> int:
        buf = ctypes.create_string_buffer(struct.pack("<QQQQ", start, length, mode, 0), 32)
        _ioctl(self.fd, UFFDIO_REGISTER, buf)
        return int(struct.unpack("<QQQQ", buf.raw)[3])

    def unregister(self, start: int, length: int) -> None:
        _ioctl(self.fd, UFFDIO_UNREGISTER, ctypes.create_string_buffer(struct.pack("<QQ", start, length), 16))

    def writeprotect(self, start: int, length: int, protect: bool) -> None:
        """UFFDIO_WRITEPROTECT: arm (protect) or release a range; releasing wakes its waiters."""
        mode = UFFDIO_WRITEPROTECT_MODE_WP if protect else 0
        _ioctl(self.fd, UFFDIO_WRITEPROTECT, ctypes.create_string_buffer(struct.pack("<QQQ", start, length, mode), 24))

    def wake(self, start: int, length: int) -> None:
        """UFFDIO_WAKE: wake threads blocked on a range without changing page tables."""
        _ioctl(self.fd, UFFDIO_WAKE, ctypes.create_string_buffer(struct.pack("<QQ", start, length), 16))

    def copy(self, dst: int, src: int, length: int) -> int:
        """UFFDIO_COPY: fill missing pages at ``dst`` from ``src`` and wake; returns bytes
        copied, or -errno (e.g. -EEXIST where a page is already there)."""
        return self._fill(UFFDIO_COPY, dst, src, length)

    def move(self, dst: int, src: int, length: int) -> int:
        """UFFDIO_MOVE (Linux 6.8): move the pages at ``src`` (this process's, anonymous) into
        missing ``dst`` and wake; nothing is allocated or copied.  Returns bytes moved, or
        -errno (e.g. -EBUSY for a page the kernel will not move)."""
        return self._fill(UFFDIO_MOVE, dst, src, length)

    def _fill(self, req: int, dst: int, src: int, length: int) -> int:
        """struct uffdio_copy / uffdio_move (dst, src, len, mode, result): bytes done, or -errno."""
        buf = ctypes.create_string_buffer(struct.pack("<QQQQq", dst, src, length, 0, 0), 40)
        failed = _libc.ioctl(self.fd, req, buf) != 0
        e = ctypes.get_errno()
        done = int(struct.unpack("<QQQQq", buf.raw)[4])
        return done if done > 0 or not failed else -e

    def zeropage(self, dst: int, length: int) -> int:
        buf = ctypes.create_string_buffer(struct.pack("<QQQq", dst, length, 0, 0), 32)
        if _libc.ioctl(self.fd, UFFDIO_ZEROPAGE, buf) != 0:
            return -ctypes.get_errno()
        return int(struct.unpack("<QQQq", buf.raw)[3])

    def read_faults(self, max_msgs: int = 64) -> list[Fault]:
        try:
            data = os.read(self.fd, MSG_SIZE * max_msgs)
        except BlockingIOError:
            return []
        except OSError as err:
            if err.errno == errno.EAGAIN:
                return []
            raise
        out = []
        for off in range(0, len(data) - MSG_SIZE + 1, MSG_SIZE):
            event = data[off]
            if event != UFFD_EVENT_PAGEFAULT:
                continue
            flags, addr = struct.unpack_from("<QQ", data, off + 8)
            out.append(Fault(addr, bool(flags & UFFD_PAGEFAULT_FLAG_WRITE), bool(flags & UFFD_PAGEFAULT_FLAG_WP)))
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _PmScanArg(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


class DirtyScanner:
    """Dirty tracking without faults: a WP_ASYNC userfaultfd (the kernel clears the WP bit on
    the first write, no message) and PAGEMAP_SCAN, which returns the written ranges and
    write-protects them again in the same call (linux/fs.h, kernel >= 6.7)."""

    def __init__(self, start: int, length: int, max_regions: int = 1 << 16) -> None:
        self.start, self.length = start, length
        self.uffd = UserFaultFD(UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED)
        try:
            self.uffd.register(start, length, UFFDIO_REGISTER_MODE_WP)
        except OSError as err:
            self.uffd.close()
            raise UffdUnavailable(f"cannot register RAM for dirty tracking: {err}") from err
        self.pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)
        self.vec = (ctypes.c_uint64 * (3 * max_regions))()
        self.max_regions = max_regions

    def arm(self) -> None:
        self.uffd.writeprotect(self.start, self.length, True)

    def scan(self) -> np.ndarray:
        """Ranges written since the last scan, as rows (offset, length) of an int64 array;
        they are protected again.  The regions are copied out of the ioctl's vector in bulk."""
        parts: list[np.ndarray] = []
        pos, end = self.start, self.start + self.length
        vec = np.ctypeslib.as_array(self.vec)
        while pos < end:
            arg = _PmScanArg(ctypes.sizeof(_PmScanArg), PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC, pos, end, 0,
                             ctypes.addressof(self.vec), self.max_regions, 0, 0, PAGE_IS_WRITTEN, 0, PAGE_IS_WRITTEN)
            n = _libc.ioctl(self.pagemap, PAGEMAP_SCAN, ctypes.byref(arg))
            if n < 0:
                e = ctypes.get_errno()
                raise OSError(e, f"PAGEMAP_SCAN: {os.strerror(e)}")
            regions = vec[: 3 * n].reshape(n, 3).astype(np.int64)
            parts.append(np.stack((regions[:, 0] - self.start, regions[:, 1] - regions[:, 0]), axis=1))
            if arg.walk_end <= pos:
                break
            pos = arg.walk_end
        return np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.int64)

    def close(self) -> None:
        try:
            self.uffd.unregister(self.start, self.length)
        except OSError:
            pass
        self.uffd.close()
        os.close(self.pagemap)


def _category_ranges(start: int, length: int, anyof: int, ret: int, regions: int = 4096) -> np.ndarray:
    """PAGEMAP_SCAN over [start, start+length): rows (start, end, categories & ``ret``) of the
    pages having any of the ``anyof`` categories, neighbours with equal categories merged.
    A walk of the page tables that reads no page; raises OSError where the kernel lacks it."""
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        vec = (ctypes.c_uint64 * (3 * regions))()
        parts: list[np.ndarray] = []
        pos, end = start, start + length
        while pos < end:
            arg = _PmScanArg(ctypes.sizeof(_PmScanArg), 0, pos, end, 0, ctypes.addressof(vec), regions, 0,
                             0, 0, anyof, ret)
            n = _libc.ioctl(fd, PAGEMAP_SCAN, ctypes.byref(arg))
            if n < 0:
                e = ctypes.get_errno()
                raise OSError(e, f"PAGEMAP_SCAN: {os.strerror(e)}")
            parts.append(np.ctypeslib.as_array(vec)[: 3 * n].reshape(n, 3).astype(np.int64))
            if arg.walk_end <= pos:
                break
            pos = arg.walk_end
        return np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.int64)
    finally:
        os.close(fd)


def small_mapped_bytes(start: int, length: int) -> int:
    """Bytes of [start, start+length) mapped by 4 KiB page-table entries (PAGEMAP_SCAN: present
    and not PAGE_IS_HUGE).  A 2 MiB entry (a transparent huge page, or the shared huge zero
    page) is write-protected, moved or scanned at once; small ones cost per page."""
    r = _category_ranges(start, length, PAGE_IS_PRESENT, PAGE_IS_HUGE)
    return int(((r[:, 1] - r[:, 0]) * ((r[:, 2] & PAGE_IS_HUGE) == 0)).sum())


def zero_mapped_units(start: int, length: int, unit: int) -> np.ndarray:
    """One bool per ``unit`` bytes of [start, start+length) (the last unit may be shorter):
    True where every page is mapped to the shared zero page, small or huge (PAGEMAP_SCAN's
    PAGE_IS_PFNZERO): memory read-mapped and never written since.  No page is read, so
    knowing that a 16 GiB guest's untouched RAM is zero costs a page-table walk, not a scan
    of 16 GiB.  Raises OSError where the kernel has no PAGEMAP_SCAN (before 6.7)."""
    r = _category_ranges(start, length, PAGE_IS_PFNZERO, PAGE_IS_PFNZERO)
    s, e = r[:, 0] - start, r[:, 1] - start  # sorted, disjoint
    done = np.concatenate(([0], np.cumsum(e - s)))
    bounds = np.minimum(np.arange(0, -(-length // unit) + 1, dtype=np.int64) * unit, length)
    # zero-mapped bytes below each bound: the regions ending before it, and the one it cuts
    k = np.searchsorted(e, bounds, side="right")
    cut = np.where(k < len(s), np.clip(bounds - s[np.minimum(k, len(s) - 1)], 0, None), 0) if len(s) else 0
    below = done[k] + cut
    return np.asarray(np.diff(below) == np.diff(bounds), dtype=bool)


def zero_mapped_units_or_none(start: int, length: int, unit: int) -> np.ndarray | None:
    """:func:`zero_mapped_units`, or None where the kernel has no PAGEMAP_SCAN: the caller then
    reads every unit (said once in the debug log, not an error)."""
    try:
        return zero_mapped_units(start, length, unit)
    except OSError as err:
        log.debug("zero-page units not known (%s): every unit is read", err)
        return None
