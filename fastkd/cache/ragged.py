"""Ragged sampled rows (format version 3): per row the number of distinct ids (``distinct``),
per entry the ids and their counts or importance weights, row after row. Reads turn a run of
rows into padded ``(n, w)`` arrays, ``w`` = the most distinct ids of those rows, whose padding
entries have id 0 and weight 0 (what the sparse loss treats as padding).

A cache is untrusted input, so a shard's arrays are checked once per process before any of its
rows is returned (:func:`check_shard`): row sizes between 1 and ``min(draws, V)`` that add up
to the shard's entries, ids in ``[0, V)``, counts positive, importance weights finite and
``>= 0`` (a tail id's weight may round to 0 in float32) with a positive sum per row. A failure
names the file.
"""
from typing import Tuple

import numpy as np

from fastkd.cache.files import CacheError


def check_shard(distinct, indices, weights, *, width: int, num_classes: int,
                files: Tuple[str, str, str]) -> np.ndarray:
    """The ``(R + 1,)`` int64 entry offsets of one shard's rows (row ``r``'s entries are
    ``offsets[r]:offsets[r + 1]``) after checking its arrays; ``files`` are the paths of the
    ``distinct``, ``indices`` and ``counts`` / ``weights`` files (named in the errors).
    Raises :class:`fastkd.cache.files.CacheError`."""
    distinct_file, indices_file, weights_file = files
    sizes = np.asarray(distinct, dtype=np.int64)
    if sizes.size and (int(sizes.min()) < 1 or int(sizes.max()) > width):
        row = int(np.flatnonzero((sizes < 1) | (sizes > width))[0])
        raise CacheError(f"{distinct_file}: row {row} holds {int(sizes[row])} distinct ids; "
                         f"expected 1 to {width} (min(draws, V)); the cache is damaged")
    offsets = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    if offsets[-1] != len(indices) or len(indices) != len(weights):
        raise CacheError(f"{distinct_file}: the rows' distinct ids add up to {int(offsets[-1])} "
                         f"entries but {indices_file} holds {len(indices)} and {weights_file} "
                         f"{len(weights)}; the cache is damaged")
    if len(indices):
        ids = np.asarray(indices)
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= num_classes:
            raise CacheError(f"{indices_file}: class id {low if low < 0 else high} outside "
                             f"[0, {num_classes}) (the cache's num_classes); the cache is "
                             f"damaged")
        values = np.asarray(weights)
        if values.dtype.kind == "f":   # importance weights: a tail id's may round to 0
            bad, expected = ~(np.isfinite(values) & (values >= 0)), "a finite number >= 0"
        else:
            bad, expected = values <= 0, "a positive count"
        if bad.any():
            entry = int(np.flatnonzero(bad)[0])
            raise CacheError(f"{weights_file}: entry {entry} (row "
                             f"{int(np.searchsorted(offsets, entry, side='right')) - 1}) has "
                             f"weight {values[entry].item()!r}; every stored weight must be "
                             f"{expected}; the cache is damaged")
        if values.dtype.kind == "f":
            empty = np.add.reduceat(values, offsets[:-1]) <= 0
            if empty.any():
                row = int(np.flatnonzero(empty)[0])
                raise CacheError(f"{weights_file}: the weights of row {row} sum to 0; every row "
                                 f"needs a positive weight; the cache is damaged")
    return offsets


def pad_rows(distinct: np.ndarray, indices: np.ndarray, weights: np.ndarray,
             weight_dtype) -> Tuple[np.ndarray, np.ndarray]:
    """Concatenated ragged rows -> ``(ids, weights)`` of ``(n, w)``, ``w = max(distinct)``
    (1 for no rows): ids int32, weights ``weight_dtype``; padding entries id 0, weight 0."""
    sizes = np.asarray(distinct, dtype=np.int64)
    width = int(sizes.max()) if sizes.size else 1
    real = np.arange(width) < sizes[:, None]
    ids = np.zeros((len(sizes), width), np.int32)
    out = np.zeros((len(sizes), width), weight_dtype)
    ids[real] = indices
    out[real] = weights
    return ids, out


def gather_rows(parts, count: int, weight_dtype) -> Tuple[np.ndarray, np.ndarray]:
    """Rows picked from several shards -> padded ``(ids, weights)`` of ``(count, w)``.

    ``parts``: per shard ``(where, starts, sizes, indices, weights)``: the result rows
    ``where`` take the entries ``starts[i]:starts[i] + sizes[i]`` of that shard's ``indices``
    / ``weights`` arrays."""
    width = max([int(sizes.max()) for _, _, sizes, _, _ in parts if sizes.size] or [1])
    ids = np.zeros((count, width), np.int32)
    out = np.zeros((count, width), weight_dtype)
    columns = np.arange(width)
    for where, starts, sizes, indices, weights in parts:
        real = columns < sizes[:, None]
        entries = (starts[:, None] + columns)[real]
        block_ids = np.zeros((len(where), width), np.int32)
        block = np.zeros((len(where), width), weight_dtype)
        block_ids[real] = indices[entries]
        block[real] = weights[entries]
        ids[where], out[where] = block_ids, block
    return ids, out
