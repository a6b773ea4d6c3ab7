"""Memory maps of checked cache files for :mod:`fastkd.cache.reader`: private (copy-on-write:
nothing written in memory ever reaches a file), of the descriptor that was checked (not of a
path) and holding no file descriptor once made, so a cache of any number of shards reads under
any ``ulimit -n``. The reader copies rows out of them; they are never handed out.
"""
import mmap
import os
from typing import Optional, Tuple

import numpy as np
import torch

from fastkd.cache import manifest as fmt


# A directory whose entry N reopens this process's descriptor N (the same open file, whatever
# its path now names): torch.from_file maps the descriptor's file through it and keeps no
# descriptor open. Without one, Python's mmap maps the descriptor (and keeps a duplicate open).
DESCRIPTOR_DIR = next((path for path in ("/proc/self/fd", "/dev/fd") if os.path.isdir(path)),
                      None)


def map_descriptor(descriptor: int, size: int) -> np.ndarray:
    """A private map of the whole open file ``descriptor`` (``size`` bytes) as uint8."""
    if DESCRIPTOR_DIR is not None:
        return torch.from_file(f"{DESCRIPTOR_DIR}/{descriptor}", shared=False, size=size,
                               dtype=torch.uint8).numpy()
    return np.frombuffer(mmap.mmap(descriptor, size, access=mmap.ACCESS_COPY), np.uint8)


def map_array(directory: str, entry: dict, expected: Optional[tuple] = None
              ) -> Tuple[str, np.ndarray]:
    """``(path, array)``: the listed ``.npy`` file ``entry`` of ``directory``, opened and its
    header checked by :func:`fastkd.cache.manifest.open_array` (a plain name, no symbolic link,
    a regular file), mapped. ``expected``: the :func:`fastkd.cache.manifest.file_identity` the
    file had when the cache was opened; a file that differs (the cache rewritten since) is
    refused, never mapped."""
    handle, path, offset = fmt.open_array(directory, entry)
    with handle:
        info = os.fstat(handle.fileno())
        if expected is not None and fmt.file_identity(info) != tuple(expected):
            raise fmt.CacheError(f"{path}: replaced since the cache was opened (the cache was "
                                 f"rewritten, e.g. by `fastkd cache --overwrite`, or the file "
                                 f"edited); its rows would not be the opened cache's: open the "
                                 f"cache again")
        dtype, shape = np.dtype(entry["dtype"]), tuple(entry["shape"])
        data = map_descriptor(handle.fileno(), info.st_size)
    return path, data[offset:offset + dtype.itemsize * int(np.prod(shape))].view(
        dtype).reshape(shape)
