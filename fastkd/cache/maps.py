"""Memory maps of cache files for :mod:`fastkd.cache.reader`: one checked, private
(copy-on-write) map per file that is never handed out, and the *lending map* whose rows
zero-copy results are views of (see :class:`MappedArray`). :mod:`fastkd.cache.pages` tells
whether a result that is gone wrote into its rows, so unwritten rows are lent again without
faulting their pages in anew.
"""
import mmap
import os
import threading
import weakref
from bisect import bisect_left, bisect_right
from typing import Optional

import numpy as np
import torch

from fastkd.cache import manifest as fmt
from fastkd.cache import pages


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
    """The owner of one zero-copy result: numpy builds the result from this object's
    ``__array_interface__`` (its rows' address, shape and dtype in a lending map), so the result
    and every array or tensor made from it keep the lease alive (numpy stops collapsing bases
    at an object that is not an array), and a dead weak reference to it means nothing uses those
    bytes any more. It keeps the lending map alive in turn."""
    __slots__ = ("__array_interface__", "mapping", "__weakref__")

    def __init__(self, mapping: np.ndarray, address: int, shape: tuple, typestr: str):
        self.mapping = mapping
        self.__array_interface__ = {"shape": shape, "typestr": typestr, "version": 3,
                                    "data": (address, False)}


# Results that are gone this close together (in bytes) are checked in one page scan: the gap's
# pages cost ~2 us, a call ~6-70 us.
_RUN_GAP_BYTES = 1 << 20


def _touches(ranges: pages.Ranges, starts: list, first: int, stop: int) -> bool:
    """Whether any of ``ranges`` (disjoint, in order; ``starts`` their starts) meets the pages
    of bytes ``[first, stop)``."""
    page = first - first % mmap.PAGESIZE
    before = bisect_left(starts, stop) - 1   # the last range starting before ``stop``
    return before >= 0 and ranges[before][1] > page


def replaced_error(path: str) -> fmt.CacheError:
    """The error for a cache file that is not the one the cache was opened with."""
    return fmt.CacheError(f"{path}: replaced since the cache was opened (the cache was rewritten, "
                          f"e.g. by `fastkd cache --overwrite`, or the file edited); its rows "
                          f"would not be the opened cache's: open the cache again")


class MappedArray:
    """One checked .npy file: its internal map (``.array``, never handed out) and fresh
    private views of row ranges (``.view_rows``). Every map is of a descriptor opened with
    :func:`fastkd.cache.manifest.open_cache_descriptor` (no symbolic link, a regular file): a
    link swapped in after the cache's checks is refused, never followed. ``expected``: the
    :func:`fastkd.cache.manifest.file_identity` the file had when the cache was opened; a file
    that differs (the cache rewritten since) is refused, never mapped."""

    def __init__(self, directory: str, entry: dict, expected: Optional[tuple] = None):
        handle, self.path, self.offset = fmt.open_array(directory, entry)
        with handle:
            info = os.fstat(handle.fileno())
            self.identity, self.size = fmt.file_identity(info), info.st_size
            if expected is not None and self.identity != tuple(expected):
                raise replaced_error(self.path)
            self.dtype = np.dtype(entry["dtype"])
            self.shape = tuple(entry["shape"])
            self._row_shape, self._typestr = self.shape[1:], self.dtype.str
            self.row_bytes = self.dtype.itemsize * int(np.prod(self._row_shape))
            self.array = self._rows(_map_descriptor(handle.fileno(), self.size), 0,
                                    self.shape[0]) if self.shape[0] else \
                np.zeros(self.shape, self.dtype)
        # the map zero-copy results are views of (and its address); the results lent out of it
        # that are not known to be gone unwritten: [first row, stop row, weak ref to the _Lease or
        # None once known to have written into its rows, whether its pages were watched when it
        # was lent], disjoint and in row order, and their first rows (for bisect); the page
        # ranges of the map that pages.watch write-protected, merged, and their starts
        self._lending, self._lending_address = None, 0
        self._lent, self._lent_starts = [], []
        self._watched, self._watched_starts = [], []
        self._lock = threading.Lock()   # threads reading one cache never share rows either

    def _rows(self, data: np.ndarray, lo: int, hi: int) -> np.ndarray:
        start = self.offset + lo * self.row_bytes
        return data[start:start + (hi - lo) * self.row_bytes].view(self.dtype).reshape(
            (hi - lo,) + self._row_shape)

    def view_rows(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``[lo, hi)``, zero copy, over this file's lending map: a private map of the file
        that was checked (a replaced one is refused when a new lending map is made), which no
        other live result shares rows with (see :class:`_Lease`)."""
        with self._lock:
            if self._lending is None or not self._lendable(lo, hi):
                self._new_lending_map()
            address = self._lending_address + self.offset + lo * self.row_bytes
            lease = _Lease(self._lending, address, (hi - lo,) + self._row_shape, self._typestr)
            index = bisect_left(self._lent_starts, lo)   # no result over these rows is left
            self._lent.insert(index, [lo, hi, weakref.ref(lease),
                                      self._watched_over(address, (hi - lo) * self.row_bytes)])
            self._lent_starts.insert(index, lo)
        return np.asarray(lease)

    def _new_lending_map(self):
        try:
            descriptor, info = fmt.open_cache_descriptor(self.path)
        except OSError as error:
            raise fmt.CacheError(f"cannot read {self.path}: {error.strerror or error}") from None
        try:
            if fmt.file_identity(info) != self.identity:
                raise replaced_error(self.path)
            self._lending = _map_descriptor(descriptor, self.size)
            self._lending_address = self._lending.ctypes.data
            self._lent, self._lent_starts = [], []
            self._watched, self._watched_starts = [], []
        finally:
            os.close(descriptor)

    def _overlapping(self, lo: int, hi: int) -> range:
        """Indices in ``self._lent`` of the results over any of rows ``[lo, hi)``."""
        first = bisect_right(self._lent_starts, lo) - 1
        if first < 0 or self._lent[first][1] <= lo:
            first += 1
        return range(first, bisect_left(self._lent_starts, hi))

    def _lendable(self, lo: int, hi: int) -> bool:
        """Whether rows ``[lo, hi)`` of the lending map may be handed out again: every earlier
        result over any of them is gone (no tensor or array uses its memory any more) and
        never wrote into its pages. A live or written one means a new map."""
        overlapping = self._overlapping(lo, hi)
        if not overlapping:
            return True
        for index in overlapping:
            lease = self._lent[index][2]
            if lease is None or lease() is not None:
                return False
        self._forget_unwritten()
        return not self._overlapping(lo, hi)

    def _forget_unwritten(self):
        """Check every result that is gone, forget the unwritten ones and mark the written ones.
        A result that is gone keeps its pages as they are, so one check is enough; they are
        checked together, one page scan per run of neighbouring rows (a streaming pass costs one
        or two scans, not one per result). A result lent over watched pages is checked from the
        page-table entries (pages.unprotected_pages); any other with pages.written_pages, after
        which its pages are watched, so that the next results over them are cheap to check."""
        runs = []   # [first row, stop row, watched, leases] of the results that are gone
        for lent in self._lent:
            lo, hi, lease, watched = lent
            if lease is None or lease() is not None:
                continue
            if runs and runs[-1][2] == watched and \
                    (lo - runs[-1][1]) * self.row_bytes <= _RUN_GAP_BYTES:
                runs[-1][1] = hi
                runs[-1][3].append(lent)
            else:
                runs.append([lo, hi, watched, [lent]])
        base = self._lending_address + self.offset
        for lo, hi, watched, leases in runs:
            address, num_bytes = base + lo * self.row_bytes, (hi - lo) * self.row_bytes
            written = pages.unprotected_pages(address, num_bytes) if watched else None
            if written is None:
                written = pages.written_pages(address, num_bytes)
            starts = None if written is None else [start for start, _ in written]
            for lent in leases:
                if written is None or _touches(written, starts, base + lent[0] * self.row_bytes,
                                               base + lent[1] * self.row_bytes):
                    lent[2] = None   # written into its rows (or cannot be told)
                else:
                    lent[0] = None   # unwritten: forgotten below
            if not watched and written is not None and any(lent[0] is None for lent in leases):
                self._watch(pages.watch(address, num_bytes))
        self._lent = [lent for lent in self._lent if lent[0] is not None]
        self._lent_starts = [lent[0] for lent in self._lent]

    def _watch(self, protected: pages.Ranges):
        """Add page ranges that pages.watch protected to ``self._watched`` (kept merged)."""
        if not protected:
            return
        merged = []
        for start, end in sorted(self._watched + protected):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self._watched = [tuple(pair) for pair in merged]
        self._watched_starts = [start for start, _ in self._watched]

    def _watched_over(self, address: int, num_bytes: int) -> bool:
        """Whether every page of bytes ``[address, address + num_bytes)`` is watched."""
        page = address - address % mmap.PAGESIZE
        index = bisect_right(self._watched_starts, page) - 1
        return index >= 0 and self._watched[index][1] >= address + num_bytes
