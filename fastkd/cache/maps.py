"""Memory maps of cache files for :mod:`fastkd.cache.reader`: one checked, private
(copy-on-write) map per file that is never handed out, and the *lending map* whose rows
zero-copy results are views of (see :class:`_MappedArray`). Linux's PAGEMAP_SCAN tells whether
a result that is gone wrote into its rows, so unwritten rows are lent again without faulting
their pages in anew.
"""
import ctypes
import mmap
import os
import weakref

import numpy as np
import torch

from fastkd.cache import manifest as fmt


# A directory whose entry N reopens this process's descriptor N (the same open file, whatever
# its path now names): torch.from_file maps the descriptor's file through it and keeps no
# descriptor open. Without one, Python's mmap maps the descriptor (and keeps a duplicate open).
_DESCRIPTOR_DIR = next((path for path in ("/proc/self/fd", "/dev/fd") if os.path.isdir(path)),
                       None)


def _map_descriptor(descriptor: int, size: int) -> np.ndarray:
    """A private (copy-on-write) map of the whole open file ``descriptor`` (``size`` bytes) as
    uint8. The map is of the descriptor, not of a path: the file checked at the open is the one
    mapped, whatever has been renamed or linked into its place since."""
    if size == 0:
        return np.zeros(0, np.uint8)
    if _DESCRIPTOR_DIR is not None:
        return torch.from_file(f"{_DESCRIPTOR_DIR}/{descriptor}", shared=False, size=size,
                               dtype=torch.uint8).numpy()
    return np.frombuffer(mmap.mmap(descriptor, size, access=mmap.ACCESS_COPY), np.uint8)


class _Lease:
    """The owner of one zero-copy result's bytes in a lending map. The result's numpy array
    (and every array or tensor made from it) keeps its lease alive, so a dead weak reference
    means nothing uses those bytes any more."""
    __slots__ = ("__array_interface__", "mapping", "__weakref__")

    def __init__(self, mapping: np.ndarray, start: int, num_bytes: int):
        self.mapping = mapping
        self.__array_interface__ = {"shape": (num_bytes,), "typestr": "|u1", "version": 3,
                                    "data": (mapping.ctypes.data + start, False)}


# Which pages of a lending map were written: Linux's PAGEMAP_SCAN ioctl on /proc/self/pagemap
# (Linux 6.7+) finds a present page that is not a file page (copy-on-write made it anonymous)
# or a swapped one, walking the page tables in the kernel: ~50-70 us per 16 MiB here when the
# pages' kernel structures are cached, 150-250 us when cold (the usual case after a 16 MiB copy),
# against ~280 us or more to fault a fresh map's 16 MiB in again (reading the 8-byte pagemap
# entries instead costs as much as the faults). Elsewhere every page counts as written: a new map per read.
_PAGE_IS_FILE, _PAGE_IS_PRESENT, _PAGE_IS_SWAPPED = 1 << 2, 1 << 3, 1 << 4


class _ScanArgument(ctypes.Structure):
    """``struct pm_scan_arg`` (include/uapi/linux/fs.h)."""
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


class _ScanRegion(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64),
                ("categories", ctypes.c_uint64)]


_PAGEMAP_SCAN = (3 << 30) | (ctypes.sizeof(_ScanArgument) << 16) | (ord("f") << 8) | 16
_page_scanner = {}   # pid -> (libc ioctl, pagemap descriptor), or None where unsupported


def _scanner():
    pid = os.getpid()
    if pid not in _page_scanner:
        _page_scanner.clear()
        scanner = None
        try:
            ioctl = ctypes.CDLL(None, use_errno=True).ioctl
            ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
            scanner = (ioctl, os.open("/proc/self/pagemap", os.O_RDONLY))
        except (OSError, AttributeError):
            pass
        _page_scanner[pid] = scanner
    return _page_scanner[pid]


def _pages_unwritten(address: int, num_bytes: int) -> bool:
    """Whether no page of this process's memory ``[address, address + num_bytes)`` has been
    written since it was mapped from its file (False where that cannot be found out)."""
    if num_bytes <= 0:
        return True
    scanner = _scanner()
    if scanner is None:
        return False
    ioctl, descriptor = scanner
    start = address - address % mmap.PAGESIZE
    end = address + num_bytes
    region = _ScanRegion()
    # not a file page, and present or swapped (a page never touched is neither)
    argument = _ScanArgument(
        size=ctypes.sizeof(_ScanArgument), start=start, end=end, vec=ctypes.addressof(region),
        vec_len=1, max_pages=1, category_inverted=_PAGE_IS_FILE, category_mask=_PAGE_IS_FILE,
        category_anyof_mask=_PAGE_IS_PRESENT | _PAGE_IS_SWAPPED,
        return_mask=_PAGE_IS_FILE | _PAGE_IS_PRESENT | _PAGE_IS_SWAPPED)
    # 0: none found; > 0: a written page; -1: the kernel has no PAGEMAP_SCAN
    return ioctl(descriptor, _PAGEMAP_SCAN, ctypes.byref(argument)) == 0


class _MappedArray:
    """One checked .npy file: its internal map (``.array``, never handed out) and fresh
    private views of row ranges (``.view_rows``). Every map is of a descriptor opened with
    :func:`fastkd.cache.manifest.open_cache_descriptor` (no symbolic link, a regular file): a
    link swapped in after the cache's checks is refused, never followed."""

    def __init__(self, directory: str, entry: dict):
        handle, self.path, self.offset = fmt.open_array(directory, entry)
        with handle:
            info = os.fstat(handle.fileno())
            self.identity, self.size = (info.st_dev, info.st_ino), info.st_size
            self.dtype = np.dtype(entry["dtype"])
            self.shape = tuple(entry["shape"])
            self.row_bytes = self.dtype.itemsize * int(np.prod(self.shape[1:]))
            self.array = self._rows(_map_descriptor(handle.fileno(), self.size), 0,
                                    self.shape[0]) if self.shape[0] else \
                np.zeros(self.shape, self.dtype)
        # the map that zero-copy results are views of, and (lo, hi, weak ref to the _Lease)
        # of each result handed out of it
        self._lending, self._leases = None, []

    def _rows(self, data: np.ndarray, lo: int, hi: int) -> np.ndarray:
        start = self.offset + lo * self.row_bytes
        return data[start:start + (hi - lo) * self.row_bytes].view(self.dtype).reshape(
            (hi - lo,) + self.shape[1:])

    def view_rows(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``[lo, hi)``, zero copy, over this file's lending map: a private map of the file
        that was checked (a replaced one is refused when a new lending map is made), which no
        other live result shares rows with (see :class:`_Lease`)."""
        if self._lending is None or not self._lendable(lo, hi):
            self._new_lending_map()
        start = self.offset + lo * self.row_bytes
        lease = _Lease(self._lending, start, (hi - lo) * self.row_bytes)
        self._leases.append((lo, hi, weakref.ref(lease)))
        return np.asarray(lease).view(self.dtype).reshape((hi - lo,) + self.shape[1:])

    def _new_lending_map(self):
        try:
            descriptor, info = fmt.open_cache_descriptor(self.path)
        except OSError as error:
            raise fmt.CacheError(f"cannot read {self.path}: {error.strerror or error}") from None
        try:
            if (info.st_dev, info.st_ino) != self.identity or info.st_size != self.size:
                raise fmt.CacheError(f"{self.path}: replaced since the cache was opened "
                                     f"(re-open the cache)")
            self._lending, self._leases = _map_descriptor(descriptor, self.size), []
        finally:
            os.close(descriptor)

    def _lendable(self, lo: int, hi: int) -> bool:
        """Whether rows ``[lo, hi)`` of the lending map may be handed out again: every earlier
        result over any of them is gone (no tensor or array uses its memory any more) and
        never wrote into its pages. A result that is gone keeps its pages as they are, so
        a clean one is forgotten once checked; a live or written one means a new map."""
        remaining = []
        for lease_lo, lease_hi, lease in self._leases:
            if lease_hi <= lo or lease_lo >= hi:
                remaining.append((lease_lo, lease_hi, lease))
                continue
            if lease() is not None:
                return False
            first, last = max(lo, lease_lo), min(hi, lease_hi)
            start = self._lending.ctypes.data + self.offset + first * self.row_bytes
            if not _pages_unwritten(start, (last - first) * self.row_bytes):
                return False
            if first > lease_lo:   # what is left of an earlier result outside these rows
                remaining.append((lease_lo, first, lease))
            if last < lease_hi:
                remaining.append((last, lease_hi, lease))
        self._leases = remaining
        return True
