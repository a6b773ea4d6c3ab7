"""Offline teacher-logit caching: run the teacher once, stream its logits while training.

- :func:`write_cache` (what ``fastkd cache`` runs) writes memory-mapped shards plus a manifest.
- :class:`LogitCache` reads them (zero-copy where possible); :class:`CachedDataset` joins them to
  the dataset by index; :func:`collate_padded` batches variable-length items.
- The on-disk format lives in :mod:`fastkd.cache.manifest` (documented in docs/cache-format.md).
"""
from fastkd.cache.manifest import CacheError
from fastkd.cache.reader import CachedDataset, LogitCache, TopKLogits, collate_padded
from fastkd.cache.writer import resolve_device, write_cache

__all__ = ["write_cache", "resolve_device", "LogitCache", "CachedDataset", "collate_padded", "TopKLogits",
           "CacheError"]
