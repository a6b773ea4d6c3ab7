"""Safe file access for the cache (format-agnostic; :mod:`fastkd.cache.manifest` knows the
format): atomic writes (temp file, fsync, rename, never through a symbolic link) and checked
reads. A cache is untrusted input: every file is opened by a plain name inside the cache
directory, with ``O_NOFOLLOW``, and refused unless it is a regular file; the data is read or
mapped through the descriptor that was checked; ``.npy`` headers are checked against the
manifest and nothing is ever unpickled. Listed files are checked against their manifest entries
(size, no link, sha256) and identified (:func:`file_identity`) to tell a rewritten cache.
"""
import errno
import hashlib
import os
import re
import stat
from typing import Iterable, List, Optional, Tuple

import numpy as np

TMP_SUFFIX = ".tmp"
HASH_CHUNK = 1 << 22
# file names a manifest may list: plain names in the cache directory (no separators, no "..",
# not hidden), which is also every name this module creates
PLAIN_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


class CacheError(ValueError):
    """A cache directory is missing, incomplete, corrupt or does not match what was asked."""


# ----------------------------------------------------------------------------- names
def check_file_name(name, where: str) -> str:
    """``name`` if it is a plain file name inside the cache directory, else CacheError."""
    if not (isinstance(name, str) and PLAIN_FILE_NAME.fullmatch(name) is not None):
        raise CacheError(f"{where}: file name {name!r} is not a plain file name inside the cache "
                         f"directory (a manifest may not point to other directories, absolute "
                         f"paths or hidden files)")
    return name


def not_a_file(path: str) -> str:
    """What ``path``, which is not a regular file, is instead, for an error message."""
    if os.path.isdir(path):
        return "a directory, not a file"
    return "not a regular file" if os.path.exists(path) else "no such file"


# ----------------------------------------------------------------------------- atomic writes
class _HashingFile:
    """File wrapper that feeds every written byte to sha256 (checksums without a re-read)."""

    def __init__(self, handle):
        self.handle = handle
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.sha256.update(view)
        self.size += view.nbytes
        return self.handle.write(view)


def fsync_directory(directory: str) -> None:
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_temp(path: str):
    """Open ``path`` for writing (created or truncated, never through a symbolic link)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    return os.fdopen(os.open(path, flags, 0o644), "wb")


def write_atomic(path: str, write) -> None:
    """``write(handle)`` into ``path.tmp``, flush, fsync, rename over ``path``. On any failure
    (disk full, interrupt) the temp file is removed, so nothing half-written is left."""
    tmp_path = path + TMP_SUFFIX
    try:
        with _create_temp(tmp_path) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        try:
            os.remove(tmp_path)
        except OSError:
            pass
        raise


def write_npy_atomic(directory: str, name: str, array: np.ndarray) -> dict:
    """Write ``array`` as ``directory/name`` (.npy) via temp file, fsync and rename.

    Returns the file's manifest entry ``{"file", "bytes", "sha256", "dtype", "shape"}``.
    The caller fsyncs the directory once after renaming a batch of files.
    """
    array = np.ascontiguousarray(array)
    hashing = None

    def write(handle):
        nonlocal hashing
        hashing = _HashingFile(handle)
        np.lib.format.write_array(hashing, array, allow_pickle=False)
    write_atomic(os.path.join(directory, name), write)
    return {"file": name, "bytes": hashing.size, "sha256": hashing.sha256.hexdigest(),
            "dtype": array.dtype.str, "shape": list(array.shape)}


# O_NOFOLLOW: the open itself refuses a symbolic link (so one swapped in after a check is never
# followed); O_NONBLOCK: a FIFO swapped in is opened without waiting for a writer, then refused.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


def open_cache_descriptor(path: str) -> Tuple[int, os.stat_result]:
    """Open a cache file for reading: ``(descriptor, its fstat)``. A symbolic link (refused by
    the open itself, ``O_NOFOLLOW``) or anything but a regular file is a :class:`CacheError`
    naming ``path``; other OS errors pass. Read or map the data from this descriptor, so the
    file that was checked is the file that is read; the caller closes it."""
    if not hasattr(os, "O_NOFOLLOW") and os.path.islink(path):
        raise CacheError(f"{path}: is a symbolic link (refused)")
    try:
        descriptor = os.open(path, _OPEN_FLAGS)
    except OSError as error:
        # Linux and the BSDs say ELOOP for a final symbolic link under O_NOFOLLOW, FreeBSD EMLINK
        if error.errno in (errno.ELOOP, getattr(errno, "EMLINK", errno.ELOOP)):
            raise CacheError(f"{path}: is a symbolic link (refused)") from None
        raise
    info = os.fstat(descriptor)
    if not stat.S_ISREG(info.st_mode):
        os.close(descriptor)
        raise CacheError(f"{path}: not a regular file (refused)")
    return descriptor, info


def open_cache_file(path: str):
    """:func:`open_cache_descriptor` as a binary file object."""
    return os.fdopen(open_cache_descriptor(path)[0], "rb")


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open_cache_file(path) as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_array_header(handle, path: str, entry: dict) -> int:
    """Check the .npy header of the open cache file ``handle`` (at its start) against the
    manifest ``entry``: a plain little-endian C-order array of the listed dtype and shape
    filling the rest of the file. Returns the byte offset of the data. Object (pickled) arrays
    are refused; nothing is unpickled."""
    try:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(handle)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, SyntaxError, TypeError) as error:
        raise CacheError(f"{path}: not a valid .npy file ({error})") from None
    offset = handle.tell()
    size = os.fstat(handle.fileno()).st_size
    if dtype.hasobject:
        raise CacheError(f"{path}: holds Python objects (a pickled array); cache files hold "
                         f"plain numbers and fastkd never unpickles")
    if dtype.str != entry["dtype"] or list(shape) != entry["shape"] or fortran_order:
        raise CacheError(f"{path}: holds {dtype.str} {list(shape)}"
                         f"{' (Fortran order)' if fortran_order else ''}, manifest says "
                         f"{entry['dtype']} {entry['shape']}")
    if offset + dtype.itemsize * int(np.prod(shape)) != size:
        raise CacheError(f"{path}: {size} bytes do not hold a {dtype.str} {list(shape)} array")
    return offset


def open_array(directory: str, entry: dict):
    """``(open file object, path, byte offset of the data)`` of a listed .npy file, opened with
    :func:`open_cache_file` and its header checked by :func:`read_array_header`; the caller
    reads or maps the data from that same descriptor and closes it."""
    path = os.path.join(directory, check_file_name(entry["file"], directory))
    handle = None
    try:
        handle = open_cache_file(path)
        return handle, path, read_array_header(handle, path, entry)
    except BaseException as error:
        if handle is not None:
            handle.close()
        if isinstance(error, OSError):
            raise CacheError(f"cannot read {path}: {error.strerror or error}") from None
        raise


def load_array(directory: str, entry: dict) -> np.ndarray:
    """Read one listed .npy file (a copy), checking its header against the manifest."""
    handle, _, offset = open_array(directory, entry)
    with handle:
        handle.seek(offset)
        return np.fromfile(handle, dtype=np.dtype(entry["dtype"]),
                           count=int(np.prod(entry["shape"]))).reshape(entry["shape"])


# ----------------------------------------------------------------------------- checks
def file_identity(info: os.stat_result) -> tuple:
    """What tells one version of a cache file from another: ``(device, inode, size, mtime in
    ns)``. Rewriting a cache (``--overwrite``: remove, write a temp file, rename) makes new files,
    so their inode or modification time differs even where a freed inode number is reused; a
    file's metadata changes (permissions, links) leave it alone."""
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def _size_problem(directory: str, entry: dict,
                  identities: Optional[dict] = None) -> Optional[str]:
    path = os.path.join(directory, check_file_name(entry["file"], directory))
    try:
        info = os.lstat(path)
    except OSError:
        return f"{path}: missing"
    if identities is not None:
        identities[entry["file"]] = file_identity(info)
    if stat.S_ISLNK(info.st_mode):
        return f"{path}: is a symbolic link (refused: a cache's files must be its own)"
    if not stat.S_ISREG(info.st_mode):
        return f"{path}: not a regular file"
    if info.st_size != entry["bytes"]:
        return (f"{path}: {info.st_size} bytes on disk, manifest says {entry['bytes']} "
                f"({'truncated' if info.st_size < entry['bytes'] else 'grown'})")
    return None


def check_sizes(directory: str, entries: Iterable[dict],
                identities: Optional[dict] = None) -> List[str]:
    """Problems (one line each, naming the file) with missing, wrongly sized or linked files.
    ``identities``, a dict, receives ``{file name: file_identity}`` of the files found."""
    return [problem for problem in (_size_problem(directory, entry, identities)
                                    for entry in entries) if problem]


def check_checksums(directory: str, entries: Iterable[dict]) -> List[str]:
    """Problems with missing, wrongly sized, linked or altered files (sha256 differs from the
    manifest). Only regular files inside ``directory`` are ever opened."""
    problems = []
    for entry in entries:
        path = os.path.join(directory, entry["file"])
        problem = _size_problem(directory, entry)
        if problem is None:
            try:
                if file_sha256(path) != entry["sha256"]:
                    problem = f"{path}: sha256 differs from the manifest (file altered or corrupt)"
            except OSError as error:
                problem = f"{path}: cannot read ({error.strerror or error})"
            except CacheError as error:   # swapped for a link or a non-file after the check
                problem = str(error)
        if problem:
            problems.append(problem)
    return problems
