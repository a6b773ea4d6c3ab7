"""What ``fastkd verify`` checks in a cache's numbers: the losses' own data checks on every
row, so that a cache that verifies also trains (reads take the rows as they are; the losses
check each batch). Used by :meth:`fastkd.cache.LogitCache.verify` after the structural checks.
"""
import torch

from fastkd.cache import manifest as fmt
from fastkd.checks import check_sparse_values, label_status, raise_bad_labels
from fastkd.targets import SampledTargets, TopKLogits
from fastkd.tokens import IGNORE_INDEX

BLOCK_ELEMENTS = 1 << 22   # row elements read and checked at a time (bounds memory)


def check_row_values(cache, views) -> None:
    """Every row of ``cache`` (a LogitCache; ``views``: readers of it whose ``rows`` give the
    rows to check, one per cached temperature of a top-k cache): top-k rows through
    :func:`fastkd.checks.check_sparse_values` (ids in ``[0, V)``, no NaN, no id twice, kept
    mass at most 1 at that temperature), sampled rows (ids, counts), dense and feature rows
    without NaN or +inf, and per-row (next-token) labels in ``[0, V)`` or -100. A sample's
    dataset label may belong to another label space and is not checked. Ragged sampled rows
    are left to :func:`fastkd.cache.ragged.check_shard`. Raises CacheError naming the rows."""
    manifest, num_classes = cache.manifest, cache.num_classes
    # next-token labels are classes of the teacher's (read a block at a time, like the rows)
    per_row = manifest["labels_per"] == "row" and bool(num_classes)
    width = manifest.get(fmt.SPARSE_K_FIELD.get(manifest["layout"], ""), None) or \
        num_classes or 1   # row elements: K for sparse rows, V (or features) for dense
    block = max(1, BLOCK_ELEMENTS // width)
    for start in range(0, 0 if fmt.is_ragged(manifest) else cache.num_rows, block):
        stop = min(start + block, cache.num_rows)
        row_labels = cache.row_labels(start, stop) if per_row else None
        try:
            for view in views:
                rows = view.rows(start, stop)
                if isinstance(rows, TopKLogits):
                    check_sparse_values(rows.indices, num_classes, values=rows.values,
                                        lse=rows.lse, labels=row_labels,
                                        temperature=rows.temperature)
                elif isinstance(rows, SampledTargets):
                    check_sparse_values(rows.indices, num_classes, counts=rows.counts,
                                        labels=row_labels)
                elif bool(torch.isnan(rows).any() | (rows == float("inf")).any()):
                    raise ValueError("teacher rows contain NaN or +inf")
        except ValueError as error:
            raise _damaged(cache, f"rows {start}..{stop - 1}", error) from None
    # non-ragged sparse rows were checked with their labels above; the labels of dense,
    # feature and ragged sampled caches are checked here
    labels_checked = manifest["layout"] in fmt.SPARSE_K_FIELD and not fmt.is_ragged(manifest)
    for start in range(0, cache.num_rows if per_row and not labels_checked else 0,
                       BLOCK_ELEMENTS):
        stop = min(start + BLOCK_ELEMENTS, cache.num_rows)
        labels = cache.row_labels(start, stop)
        if bool(label_status(labels, num_classes, IGNORE_INDEX)[1]):
            try:
                raise_bad_labels(labels, num_classes, IGNORE_INDEX)
            except ValueError as error:
                raise _damaged(cache, f"rows {start}..{stop - 1}", error) from None


def _damaged(cache, where: str, error: Exception) -> fmt.CacheError:
    return fmt.CacheError(f"{cache.path}: {where}: {error}; the cache is damaged or was not "
                          f"written by fastkd")
