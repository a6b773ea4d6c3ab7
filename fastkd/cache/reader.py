"""Read a shard cache: :class:`LogitCache` (index, slice, gather), :class:`CachedDataset`
(dataset items joined with their cached teacher rows) and :func:`collate_padded`.

Memory maps open lazily, once per process (the PID is checked on access and the maps are
dropped when pickled), so a cache can go to ``DataLoader`` workers under fork or spawn.
Rows come back as torch tensors that share memory with the map where possible (one sample or
a slice inside one shard); gathers and cross-shard slices copy. Maps are opened copy-on-write
(``mmap_mode="c"``), so the tensors are writable in memory but the files never change.
"""
import os
from bisect import bisect_right
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

from fastkd.cache import manifest as fmt
from fastkd.cache.specs import dataset_fingerprint
from fastkd.cache.writer import split_item
from fastkd.targets import TopKLogits


def _as_tensor(array: np.ndarray, dtype_name: Optional[str]) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype_name == "bf16" else tensor


class LogitCache:
    """A finished cache directory. ``len(cache)`` is the number of dataset samples.

    - ``cache[i]``: sample ``i``'s teacher rows: ``(V,)`` (one row per sample) or ``(L_i, V)``
      (variable-length), or a :class:`TopKLogits` for top-k caches.
    - ``cache[i:j]`` / ``cache.gather(indices)``: a batch, ``(n, V)`` (or a ``TopKLogits`` of
      ``(n, k)``); for variable-length caches a list of per-sample results.
    - ``.labels`` (tensor or None), ``.offsets`` (variable-length), ``.manifest``, ``.verify()``.

    Opening checks the manifest's own checksum and structure and every file's size, so a
    truncated, missing or edited file fails here with its name; ``verify()`` adds checksums.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self.manifest = fmt.read_manifest(self.path)
        where = os.path.join(self.path, fmt.MANIFEST_NAME)
        if self.manifest.get("status") != "complete":
            raise fmt.CacheError(f"{where}: the cache is incomplete ({len(self.manifest['shards'])}"
                                 f" shards written); re-run the same `fastkd cache` command to "
                                 f"resume it")
        fmt.check_structure(self.manifest, where)
        problems = fmt.check_sizes(self.path, fmt.manifest_files(self.manifest))
        if problems:
            raise fmt.CacheError("cache files do not match the manifest: " + "; ".join(problems))
        shards = self.manifest["shards"]
        self._sample_starts = [shard["sample_start"] for shard in shards]
        self._row_starts = [shard["row_start"] for shard in shards]
        self.layout = self.manifest["layout"]
        self.variable = self.manifest["rows_per_sample"] == "variable"
        self.arrays = list(fmt.row_arrays(self.layout, self.manifest["dtype"],
                                          self.manifest["num_classes"] or 0,
                                          self.manifest["top_k"]))
        self._maps = None
        self._pid = None

    # ------------------------------------------------------------------------- lazy maps
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"], state["_pid"] = None, None
        return state

    def _process_maps(self) -> dict:
        """This process's open maps (a new, empty set after a fork)."""
        if self._pid != os.getpid():
            self._maps, self._pid = {}, os.getpid()
        return self._maps

    def _shard_maps(self, shard_number: int) -> dict:
        maps = self._process_maps()
        if shard_number not in maps:
            files = self.manifest["shards"][shard_number]["files"]
            maps[shard_number] = {name: fmt.load_array(self.path, files[name], mmap_mode="c")
                                  for name in self.arrays}
        return maps[shard_number]

    def _extra(self, key: str) -> Optional[np.ndarray]:
        entry = self.manifest.get(key)
        if not entry:
            return None
        maps = self._process_maps()
        if key not in maps:
            maps[key] = fmt.load_array(self.path, entry, mmap_mode="c")
        return maps[key]

    # ------------------------------------------------------------------------- properties
    def __len__(self) -> int:
        return self.manifest["num_samples"]

    @property
    def num_rows(self) -> int:
        return self.manifest["num_rows"]

    @property
    def num_classes(self) -> int:
        return self.manifest["num_classes"]

    @property
    def labels(self) -> Optional[torch.Tensor]:
        """Dataset labels (per sample, or per row for token data), or None."""
        labels = self._extra("labels")
        return None if labels is None else torch.from_numpy(labels)

    @property
    def offsets(self) -> Optional[torch.Tensor]:
        """``(num_samples + 1,)`` row offsets of a variable-length cache, else None."""
        offsets = self._extra("offsets")
        return None if offsets is None else torch.from_numpy(offsets)

    def verify(self) -> None:
        """Check every file's sha256 against the manifest; raises CacheError naming the files."""
        problems = fmt.check_checksums(self.path, fmt.manifest_files(self.manifest))
        if problems:
            raise fmt.CacheError("cache verification failed: " + "; ".join(problems))

    # ------------------------------------------------------------------------- rows
    def _wrap(self, arrays: dict):
        dtype = self.manifest["dtype"]
        if self.layout == "topk":
            return TopKLogits(_as_tensor(arrays["values"], dtype),
                              _as_tensor(arrays["indices"], None),
                              _as_tensor(arrays["lse"], None))
        return _as_tensor(arrays[fmt.DENSE_ARRAY[self.layout]], dtype)

    def rows(self, start: int, stop: int):
        """Teacher rows ``[start, stop)`` in row order (zero copy inside one shard)."""
        if not 0 <= start <= stop <= self.num_rows:
            raise IndexError(f"rows [{start}, {stop}) outside [0, {self.num_rows})")
        first = max(bisect_right(self._row_starts, start) - 1, 0)
        parts = []
        for number in range(first, len(self._row_starts)):
            shard = self.manifest["shards"][number]
            lo, hi = max(start, shard["row_start"]), min(stop, shard["row_stop"])
            if lo >= hi and parts:
                break
            maps = self._shard_maps(number)
            parts.append({name: maps[name][lo - shard["row_start"]:hi - shard["row_start"]]
                          for name in self.arrays})
            if hi >= stop:
                break
        if len(parts) == 1:
            return self._wrap(parts[0])
        return self._wrap({name: np.concatenate([part[name] for part in parts])
                           for name in self.arrays})

    def _check_index(self, index) -> int:
        if isinstance(index, torch.Tensor) and index.dim() == 0:
            index = int(index)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"cache index must be an int or a slice, got {type(index).__name__}")
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"cache index {index} out of range for {len(self)} samples")
        return index

    def _sample_rows(self, index: int):
        if self.variable:
            offsets = self._extra("offsets")
            return int(offsets[index]), int(offsets[index + 1])
        return index, index + 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return self.gather(range(start, stop, step))
            if self.variable:
                return [self[i] for i in range(start, stop)]
            return self.rows(start, max(start, stop))
        index = self._check_index(index)
        start, stop = self._sample_rows(index)
        result = self.rows(start, stop)
        if self.variable:
            return result
        if isinstance(result, TopKLogits):
            return result.map_tensors(lambda part: part[0])
        return result[0]

    def gather(self, indices: Union[Sequence[int], torch.Tensor, np.ndarray]):
        """Samples ``indices`` in the given order (a copy): ``(n, V)`` / ``TopKLogits`` of
        ``(n, k)``; for variable-length caches a list of per-sample results."""
        indices = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
        if indices.ndim != 1 or (indices.size and indices.dtype.kind not in "iu"):
            raise TypeError(f"indices must be a 1-D sequence of ints, got {indices.dtype} "
                            f"{indices.shape}")
        indices = indices.astype(np.int64)
        if indices.size and (indices.min() < -len(self) or indices.max() >= len(self)):
            raise IndexError(f"gather indices out of range for {len(self)} samples")
        indices = np.where(indices < 0, indices + len(self), indices)
        if self.variable:
            return [self[int(i)] for i in indices]
        shard_of = np.searchsorted(self._sample_starts, indices, side="right") - 1
        out = None
        for number in np.unique(shard_of):
            maps = self._shard_maps(int(number))
            where = np.nonzero(shard_of == number)[0]
            local = indices[where] - self._sample_starts[number]
            if out is None:
                out = {name: np.empty((len(indices),) + maps[name].shape[1:], maps[name].dtype)
                       for name in self.arrays}
            for name in self.arrays:
                out[name][where] = maps[name][local]
        if out is None:
            maps = self._shard_maps(0) if self.manifest["shards"] else {}
            out = {name: maps[name][:0].copy() for name in self.arrays}
        return self._wrap(out)

    def __repr__(self) -> str:
        m = self.manifest
        layout = fmt.describe_layout(m)
        return (f"LogitCache({self.path!r}: {len(self)} samples, {self.num_rows} rows, "
                f"V={m['num_classes']}, {m['dtype']}, {layout}, {len(m['shards'])} shards)")


class CachedDataset(torch.utils.data.Dataset):
    """``dataset`` joined with its cached teacher rows: items ``(input, label, teacher_logits)``.

    ``label`` comes from the dataset item (or the cache's stored labels; ``ignore_index`` when
    neither has one). Length and (unless ``check_fingerprint=False``) the dataset fingerprint
    must match the cache's manifest, so rows cannot silently pair with the wrong items.
    """

    def __init__(self, dataset, cache: Union[LogitCache, str], *, check_fingerprint: bool = True,
                 ignore_index: int = -100):
        self.cache = cache if isinstance(cache, LogitCache) else LogitCache(cache)
        if len(dataset) != len(self.cache):
            raise ValueError(f"dataset has {len(dataset)} items but the cache at "
                             f"{self.cache.path} holds {len(self.cache)} samples")
        if check_fingerprint:
            expected = self.cache.manifest["dataset"]["fingerprint"]["sha256"]
            if dataset_fingerprint(dataset)["sha256"] != expected:
                raise ValueError(f"dataset does not match the one cached at {self.cache.path} "
                                 f"(fingerprint differs: other items or order); pass "
                                 f"check_fingerprint=False only if you are sure")
        self.dataset = dataset
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        model_input, label = split_item(self.dataset[index])
        if label is None:
            labels = self.cache.labels
            if labels is None:
                label = self.ignore_index
            elif self.cache.manifest["labels_per"] == "sample":
                label = labels[index]
            else:
                start, stop = self.cache._sample_rows(index)
                label = labels[start:stop]
        return model_input, torch.as_tensor(label), self.cache[index]


def _pad_stack(tensors: List[torch.Tensor], value) -> torch.Tensor:
    length = max(tensor.shape[0] for tensor in tensors)
    out = tensors[0].new_full((len(tensors), length) + tuple(tensors[0].shape[1:]), value)
    for row, tensor in enumerate(tensors):
        out[row, :tensor.shape[0]] = tensor
    return out


def collate_padded(batch, *, ignore_index: int = -100, pad_value: int = 0):
    """Collate variable-length ``(input, labels (L_i,), teacher (L_i, V) or TopKLogits)`` items
    into ``(inputs (B, L), labels (B, L), teacher (B, L, V))`` padded on the right: inputs with
    ``pad_value`` (dict inputs field by field), labels with ``ignore_index`` (so padded positions
    carry no loss), teacher rows with zeros. Fixed-length items collate to the same shapes
    as the default collate."""
    inputs, labels, teachers = zip(*batch)
    if isinstance(inputs[0], dict):
        inputs = {key: _pad_stack([torch.as_tensor(item[key]) for item in inputs], pad_value)
                  for key in inputs[0]}
    else:
        inputs = _pad_stack([torch.as_tensor(item) for item in inputs], pad_value)
    labels = [torch.as_tensor(label).reshape(-1) for label in labels]
    labels = _pad_stack(labels, ignore_index) if len(labels[0]) != 1 or any(
        len(label) != 1 for label in labels) else torch.cat(labels)
    if isinstance(teachers[0], TopKLogits):
        teacher = TopKLogits(*(_pad_stack(list(parts), 0)
                               for parts in zip(*(item.tensors() for item in teachers))),
                             teachers[0].temperature)
    else:
        teacher = _pad_stack(list(teachers), 0)
    return inputs, labels, teacher
