"""Offline teacher-logit caching: run the teacher once, stream its logits while training.

- :func:`write_cache` (what ``fastkd cache`` runs) writes memory-mapped shards plus a manifest.
- :class:`LogitCache` reads them into tensors of their own; :class:`CachedDataset` joins them to
  the dataset by index; :func:`collate_padded` batches variable-length items.
- The on-disk format lives in :mod:`fastkd.cache.manifest` (documented in docs/cache-format.md).

The public names load on first use (PEP 562), so importing a light sub-module such as
:mod:`fastkd.cache.manifest` or :mod:`fastkd.cache.commands` (the ``fastkd`` command line's
argument parsing) does not import torch.
"""
__all__ = ["write_cache", "resolve_device", "LogitCache", "CachedDataset", "collate_padded",
           "TopKLogits", "CacheError"]

from fastkd.lazy import lazy_exports  # noqa: E402

# public name -> the sub-module that defines it
_LAZY = {
    "CacheError": "fastkd.cache.manifest",
    "LogitCache": "fastkd.cache.reader", "CachedDataset": "fastkd.cache.reader",
    "collate_padded": "fastkd.cache.reader", "TopKLogits": "fastkd.cache.reader",
    "write_cache": "fastkd.cache.writer", "resolve_device": "fastkd.cache.writer",
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
