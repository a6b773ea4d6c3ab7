"""Read a shard cache: :class:`LogitCache` (index, slice, gather), :class:`CachedDataset`
(dataset items joined with their cached teacher rows) and :func:`collate_padded`.

Every read returns tensors of its own, copied out of the cache's memory maps (see
:mod:`fastkd.cache.maps`), or written into a caller's ``out=`` buffer (e.g. pinned memory for a
copy to the GPU). The maps are opened lazily once per process (the PID is checked on access and
the maps are dropped when pickled, so a cache can go to ``DataLoader`` workers under fork or
spawn) and are never handed out.
"""
import os
from bisect import bisect_right
from typing import Optional, Sequence, Union

import numpy as np
import torch

from fastkd.cache import manifest as fmt
from fastkd.cache import ragged
from fastkd.cache.collate import collate_padded  # noqa: F401  (re-exported)
from fastkd.cache.items import split_item
from fastkd.cache.maps import map_array
from fastkd.cache.specs import dataset_fingerprint, fingerprint_hint
from fastkd.cache.values import check_row_values
from fastkd.targets import SPARSE_TARGETS, SampledTargets, TopKLogits

# the torch dtype of each cache dtype (what dense and feature reads return)
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _torch_rows(array: np.ndarray) -> torch.Tensor:
    """``array``'s memory as a tensor for copying rows (unsigned ints as the signed ints of
    their width: the bits are what is copied)."""
    if array.dtype.kind == "u" and array.dtype.itemsize > 1:
        array = array.view(f"{array.dtype.byteorder}i{array.dtype.itemsize}")
    return torch.from_numpy(array)


def _as_tensor(array: np.ndarray, dtype_name: Optional[str]) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype_name == "bf16" else tensor


class LogitCache:
    """A finished cache directory. ``len(cache)`` is the number of dataset samples.

    - ``cache[i]``: sample ``i``'s teacher rows: ``(V,)`` (one row per sample) or ``(L_i, V)``
      (variable-length); for top-k caches a :class:`~fastkd.TopKLogits` (ids as int32, ``lse``
      at ``temperature``), for sampled caches a :class:`~fastkd.SampledTargets` (ids and counts
      as int32, or float32 importance weights; ``temperature`` the one the target is for). A
      ragged sampled cache (format version 3) holds each row's distinct ids only; a read pads
      its rows to the widest among them with id-0, weight-0 entries (padding to the loss).
    - ``cache[i:j]`` / ``cache.gather(indices)``: a batch, ``(n, V)`` (or sparse targets of
      ``(n, k)``); for variable-length caches a list of per-sample results.
    - ``cache.rows(start, stop, out=...)`` / ``cache.gather(indices, out=...)``: dense and
      feature rows written into ``out``, a CPU tensor of the cache's dtype (e.g. pinned memory).
    - ``.labels`` (int64 tensor or None; ``.row_labels(start, stop)`` reads per-row labels a
      range at a time), ``.offsets`` (variable-length), ``.manifest``,
      ``.temperatures`` (what a top-k cache stores lse for / a sampled cache drew at),
      ``.bytes_per_row``, ``.verify()``.

    ``temperature`` picks which stored log-sum-exp a top-k cache returns (default: the first in
    ``.temperatures``); one the cache does not hold is an error. Opening checks the manifest's
    own checksum and structure and every file's size, so a truncated, missing or edited file
    fails here with its name; the first map of a file checks its ``.npy`` header, the first
    read of the offsets checks them and the first read of a ragged sampled shard checks its
    row sizes, ids and weights. ``verify()`` adds checksums and runs those read checks on every
    file. Format versions 1, 2 and 3 read.
    """

    def __init__(self, path, *, temperature: Optional[float] = None):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"LogitCache path must be a str or os.PathLike, got "
                            f"{type(path).__name__}")
        self.path = os.fspath(path)
        self.manifest, self._manifest_identity = fmt.read_manifest_and_identity(self.path)
        where = self._manifest_path = os.path.join(self.path, fmt.MANIFEST_NAME)
        if self.manifest.get("status") != "complete":
            raise fmt.CacheError(f"{where}: the cache is incomplete ({len(self.manifest['shards'])}"
                                 f" shards written); re-run the same `fastkd cache` command to "
                                 f"resume it")
        fmt.check_structure(self.manifest, where)
        # each file as it is now: a file first mapped later must still be this one
        self._identities = {}
        problems = fmt.check_sizes(self.path, fmt.manifest_files(self.manifest), self._identities)
        if problems:
            raise fmt.CacheError("cache files do not match the manifest: " + "; ".join(problems))
        shards = self.manifest["shards"]
        self._sample_starts = [shard["sample_start"] for shard in shards]
        self._row_starts = [shard["row_start"] for shard in shards]
        self.layout = self.manifest["layout"]
        self.variable = self.manifest["rows_per_sample"] == "variable"
        self.version = self.manifest["format_version"]
        self._row_arrays = fmt.manifest_row_arrays(self.manifest)
        self.arrays = list(self._row_arrays)
        self.temperatures = self.manifest.get("temperatures") or (
            [1.0] if self.layout == "topk" else None)
        self.temperature = None
        if self.layout in fmt.SPARSE_K_FIELD:
            self.temperature = self.temperatures[0] if temperature is None else temperature
            if self.temperature not in self.temperatures:
                raise fmt.CacheError(f"{self.path} holds {fmt.describe_layout(self.manifest)} "
                                     f"rows at temperature(s) {self.temperatures}, not "
                                     f"{temperature!r} (cache it with --temperature "
                                     f"{temperature!r})")
        elif temperature is not None:
            raise ValueError(f"temperature applies to top-k and sampled caches; {self.path} "
                             f"holds {self.layout} rows")
        self._lse_column = (self.temperatures.index(self.temperature)
                            if self.layout == "topk" and self.version >= 2 else None)
        # ragged sampled rows (version 3): read through fastkd.cache.ragged
        self._ragged = fmt.is_ragged(self.manifest)
        self._weights = "weights" if fmt.is_weighted(self.manifest) else "counts"
        self._maps = None
        self._pid = None

    # ------------------------------------------------------------------------- lazy maps
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"], state["_pid"] = None, None
        return state

    def _process_maps(self) -> dict:
        """This process's open maps (a new, empty set after a fork), after checking that the
        cache on disk is still the one opened (every read comes through here)."""
        self._check_unchanged()
        if self._pid != os.getpid():
            self._maps, self._pid = {}, os.getpid()
        return self._maps

    def _check_unchanged(self) -> None:
        """Refuse to read once ``manifest.json`` is not the file read at the open: the cache was
        rewritten (``fastkd cache --overwrite`` replaces the manifest last of all) or edited, so
        its rows may belong to another teacher. One ``lstat`` per read."""
        where = self._manifest_path
        try:
            identity = fmt.file_identity(os.lstat(where))
        except OSError:
            identity = None
        if identity != self._manifest_identity:
            raise fmt.CacheError(
                f"{where}: the cache changed on disk since it was opened ("
                f"{'removed' if identity is None else 'rewritten or edited'}, e.g. by `fastkd "
                f"cache --overwrite`); its rows would not be the opened cache's: open the cache "
                f"again (LogitCache({self.path!r}))")

    def _map(self, entry: dict) -> np.ndarray:
        """Map one listed file, refusing one that is not the file checked at the open."""
        try:
            return map_array(self.path, entry, self._identities.get(entry["file"]))[1]
        except fmt.CacheError:
            self._check_unchanged()   # a missing or odd file of a rewritten cache says so
            raise

    def _once(self, key, make):
        """``make()``, made on first use in this process and kept with its maps."""
        maps = self._process_maps()
        if key not in maps:
            maps[key] = make()
        return maps[key]

    def _shard_maps(self, number: int) -> dict:
        """``{array name: mapped array}`` of shard ``number``."""
        files = self.manifest["shards"][number]["files"]
        return self._once(number, lambda: {name: self._map(files[name]) for name in self.arrays})

    def _extra(self, key: str) -> Optional[np.ndarray]:
        """The mapped ``labels`` (version 1) / ``offsets`` file (offsets checked)."""
        entry = self.manifest.get(key)
        if not entry:
            return None
        check = self._check_offsets if key == "offsets" else (lambda array: array)
        return self._once(key, lambda: check(self._map(entry)))

    def _check_offsets(self, offsets: np.ndarray) -> np.ndarray:
        """``offsets``, which must start at 0, never decrease, end at num_rows and put every
        shard's first sample at that shard's first row (a sample's rows lie inside its shard)."""
        starts = np.asarray(self._sample_starts, np.int64)
        if (offsets.shape != (len(self) + 1,) or offsets[0] != 0 or
                offsets[-1] != self.num_rows or bool(np.any(offsets[1:] < offsets[:-1])) or
                not np.array_equal(offsets[starts], np.asarray(self._row_starts, np.int64))):
            raise fmt.CacheError(f"{os.path.join(self.path, fmt.OFFSETS_NAME)}: row offsets are "
                                 f"inconsistent with the shards (not increasing from 0 to "
                                 f"num_rows along the shard boundaries); the cache is damaged")
        return offsets

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
        """Dataset labels (per sample, or per row for token data) as int64, or None. A tensor of
        its own: writing into it changes nothing later reads return."""
        if self.manifest["labels_per"] is None:
            return None
        if self.version == 1:
            return torch.from_numpy(self._extra("labels").copy())
        labels = self._once("labels", lambda: np.concatenate(  # stored per shard: joined once
            [self._shard_labels(number) for number in range(len(self.manifest["shards"]))]
        ).astype(np.int64))
        return torch.from_numpy(labels.copy())

    def row_labels(self, start: int, stop: int) -> Optional[torch.Tensor]:
        """The per-row (next-token) labels of rows ``[start, stop)`` as int64, or None when the
        cache has none; reads only the shards that hold those rows."""
        if self.manifest["labels_per"] != "row":
            return None
        if not 0 <= start <= stop <= self.num_rows:
            raise IndexError(f"rows [{start}, {stop}) outside [0, {self.num_rows})")
        if self.version == 1:
            part = self._extra("labels")[start:stop]
        else:
            part = np.concatenate([self._shard_labels(number)[lo:hi] for number, lo, hi
                                   in self._spans(start, stop)] or [np.zeros(0, np.int64)])
        return torch.from_numpy(part.astype(np.int64))

    def sample_labels(self, index: int) -> Optional[torch.Tensor]:
        """Sample ``index``'s label (0-d) or per-row labels ``(L_i,)`` as int64, or None."""
        if self.manifest["labels_per"] is None:
            return None
        index = self._check_index(index)
        if self.manifest["labels_per"] == "sample":
            start, stop, starts = index, index + 1, self._sample_starts
        else:
            (start, stop), starts = self._sample_rows(index), self._row_starts
        if self.version == 1:
            labels = self._extra("labels")[start:stop]
        else:
            number = max(bisect_right(starts, start) - 1, 0)
            shard = self.manifest["shards"][number]
            first = shard["sample_start" if self.manifest["labels_per"] == "sample" else
                          "row_start"]
            # whole samples per shard: a sample's labels never straddle two shards
            labels = self._shard_labels(number)[start - first:stop - first]
        labels = torch.from_numpy(labels.astype(np.int64))
        return labels[0] if self.manifest["labels_per"] == "sample" else labels

    def _shard_labels(self, number: int) -> np.ndarray:
        return self._once(("labels", number), lambda: self._map(
            self.manifest["shards"][number]["files"]["labels"]))

    @property
    def bytes_per_row(self) -> dict:
        """``{"teacher": B, "labels": B, "files": B}``: bytes of one row's teacher arrays, of its
        labels (per-sample labels spread over the sample's rows) and of every cache file over
        the rows (headers, offsets and the manifest's file list included)."""
        return fmt.bytes_per_row(self.manifest)

    @property
    def offsets(self) -> Optional[torch.Tensor]:
        """``(num_samples + 1,)`` row offsets of a variable-length cache, else None (a tensor of
        its own, like ``labels``)."""
        offsets = self._extra("offsets")
        return None if offsets is None else torch.from_numpy(offsets.copy())

    def verify(self) -> None:
        """Check every file's sha256 against the manifest, then, on every file, what reads
        check when they first map it: the ``.npy`` header (dtype, shape, C order and size as the
        manifest says), the row offsets (:meth:`_check_offsets`) and the rows of a ragged
        sampled cache (:func:`fastkd.cache.ragged.check_shard`). Raises CacheError naming the
        file (or saying that the cache changed on disk since it was opened). A cache that
        passes also reads; checksums alone would pass a hostile one (anyone can recompute
        them)."""
        self._check_unchanged()
        problems = fmt.check_checksums(self.path, fmt.manifest_files(self.manifest))
        if problems:
            raise fmt.CacheError("cache verification failed: " + "; ".join(problems))
        # the reads' own checks on every file: mapping one checks its .npy header, and the map
        # is dropped at once (a ragged shard's maps and checked offsets stay, for later reads)
        for number, shard in enumerate(self.manifest["shards"]):
            for entry in shard["files"].values():   # labels and lengths included
                self._map(entry)
            if self._ragged:   # row sizes, ids and weights (a hostile cache's sums match)
                self._ragged_offsets(number)
        for key in ("offsets", "labels"):   # row offsets; version 1's labels.npy
            self._extra(key)
        # the losses' data checks on every row, each top-k temperature through its own reader
        views = [LogitCache(self.path, temperature=t) for t in self.temperatures] \
            if self.layout == "topk" else [self]
        check_row_values(self, views)

    # ------------------------------------------------------------------------- rows
    def _new_rows(self, count: int, out: Optional[torch.Tensor]) -> Optional[dict]:
        """``{array name: (count, ...) array}`` for a read to fill: new arrays, or the memory of
        ``out``, which must be a CPU tensor of shape ``(count, V)`` and the cache's dtype (dense
        and feature caches only). None for a ragged sampled cache (its reads pad per read)."""
        if out is not None:
            if self.layout not in fmt.DENSE_ARRAY:
                raise ValueError(f"out= applies to dense and feature caches; {self.path} holds "
                                 f"{fmt.describe_layout(self.manifest)} rows")
            dtype, shape = TORCH_DTYPES[self.manifest["dtype"]], (count, self.num_classes)
            found = f"{out.device.type} {out.dtype} {tuple(out.shape)}" if isinstance(
                out, torch.Tensor) else f"a {type(out).__name__}"
            if found != f"cpu {dtype} {shape}":
                raise ValueError(f"out must be a CPU tensor of dtype {dtype} and shape {shape} "
                                 f"(the rows read); got {found}")
            if any(stride == 0 and size > 1 for size, stride in zip(out.shape, out.stride())):
                # an expanded out: its rows share memory and would all hold the last one
                raise ValueError(f"out's elements overlap (strides {out.stride()}, e.g. from "
                                 f"expand()); pass torch.empty({shape[0]}, {shape[1]}, "
                                 f"dtype={dtype})")
            array = out.detach().view(torch.int16 if dtype == torch.bfloat16 else dtype).numpy()
            return {fmt.DENSE_ARRAY[self.layout]: array.view(fmt.STORAGE_DTYPES[
                self.manifest["dtype"]])}
        if self._ragged:
            return None
        return {name: np.empty((count,) + shape, dtype)
                for name, (dtype, shape) in self._row_arrays.items()}

    def _wrap(self, arrays: dict, out: Optional[torch.Tensor] = None):
        """Arrays of some rows -> what the cache returns for them (see the class docstring):
        ``out`` itself when the rows went into it."""
        if out is not None:
            return out
        dtype = self.manifest["dtype"]
        if self.layout in fmt.SPARSE_K_FIELD:
            # ids (uint16 on disk when V <= 65536) and counts (uint8/uint16) come back as int32
            indices = torch.from_numpy(arrays["indices"].astype(np.int32))
        if self.layout == "topk":
            lse = arrays["lse"] if self._lse_column is None else \
                arrays["lse"][..., self._lse_column]
            return TopKLogits(_as_tensor(arrays["values"], dtype), indices,
                              torch.from_numpy(lse), self.temperature, self.num_classes)
        if self.layout == "sampled":
            weights = arrays[self._weights]
            return SampledTargets(indices, torch.from_numpy(
                weights.astype(np.float32 if weights.dtype.kind == "f" else np.int32)),
                self.num_classes, self.temperature)
        return _as_tensor(arrays[fmt.DENSE_ARRAY[self.layout]], dtype)

    # ------------------------------------------------------------------------- ragged rows
    def _ragged_offsets(self, number: int) -> np.ndarray:
        """Shard ``number``'s ``(R + 1,)`` entry offsets, its arrays checked on first use in
        this process (:func:`fastkd.cache.ragged.check_shard`)."""
        def check():
            arrays, files = self._shard_maps(number), self.manifest["shards"][number]["files"]
            names = ("distinct", "indices", self._weights)
            return ragged.check_shard(
                *(arrays[name] for name in names),
                width=fmt.sampled_width(self.manifest["sample"], self.num_classes),
                num_classes=self.num_classes,
                files=tuple(os.path.join(self.path, files[name]["file"]) for name in names))
        return self._once(("entry offsets", number), check)

    def _padded_target(self, pad, *args) -> SampledTargets:
        """``pad(*args, weight dtype)`` (:mod:`fastkd.cache.ragged`) as a sampled target."""
        ids, weights = pad(*args, np.float32 if self._weights == "weights" else np.int32)
        return SampledTargets(torch.from_numpy(ids), torch.from_numpy(weights),
                              self.num_classes, self.temperature)

    def _ragged_rows(self, start: int, stop: int) -> SampledTargets:
        """Rows ``[start, stop)`` of a ragged sampled cache, padded to their widest row."""
        pieces = []
        for number, lo, hi in self._spans(start, stop):
            offsets, maps = self._ragged_offsets(number), self._shard_maps(number)
            begin, end = offsets[lo], offsets[hi]
            pieces.append((maps["distinct"][lo:hi], maps["indices"][begin:end],
                           maps[self._weights][begin:end]))
        if pieces:
            distinct, ids, weights = (np.concatenate(parts) for parts in zip(*pieces))
        else:
            distinct = ids = weights = np.zeros(0, np.int64)
        return self._padded_target(ragged.pad_rows, distinct, ids, weights)

    def _ragged_gather(self, indices: np.ndarray, shard_of: np.ndarray) -> SampledTargets:
        """Rows ``indices`` (one row per sample) of a ragged sampled cache, in that order."""
        parts = []
        for number in np.unique(shard_of):
            offsets, maps = self._ragged_offsets(int(number)), self._shard_maps(int(number))
            where = np.nonzero(shard_of == number)[0]
            local = indices[where] - self._sample_starts[number]
            parts.append((where, offsets[local], offsets[local + 1] - offsets[local],
                          maps["indices"], maps[self._weights]))
        return self._padded_target(ragged.gather_rows, parts, len(indices))

    def _spans(self, start: int, stop: int):
        """``(shard number, first row, stop row)`` in the shard of every shard holding rows
        ``[start, stop)``, in row order."""
        for number in range(max(bisect_right(self._row_starts, start) - 1, 0),
                            len(self._row_starts)):
            shard = self.manifest["shards"][number]
            lo, hi = max(start, shard["row_start"]), min(stop, shard["row_stop"])
            if lo >= stop:
                break
            if lo < hi:
                yield number, lo - shard["row_start"], hi - shard["row_start"]

    def rows(self, start: int, stop: int, *, out: Optional[torch.Tensor] = None):
        """Teacher rows ``[start, stop)`` in row order, tensors of their own (dense and feature
        rows written into ``out`` and ``out`` returned, when given; see :meth:`_new_rows`)."""
        for name, bound in (("start", start), ("stop", stop)):
            if isinstance(bound, bool) or not isinstance(bound, (int, np.integer)):
                raise TypeError(f"rows() {name} must be an int, got {type(bound).__name__}")
        if not 0 <= start <= stop <= self.num_rows:
            raise IndexError(f"rows [{start}, {stop}) outside [0, {self.num_rows})")
        result = self._new_rows(stop - start, out)
        if self._ragged:
            return self._ragged_rows(start, stop)
        done = 0
        for number, lo, hi in self._spans(start, stop):
            maps = self._shard_maps(number)
            for name in self.arrays:
                result[name][done:done + hi - lo] = maps[name][lo:hi]
            done += hi - lo
        return self._wrap(result, out)

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
        if isinstance(result, SPARSE_TARGETS):
            return result.map_tensors(lambda part: part[0])
        return result[0]

    def gather(self, indices: Union[Sequence[int], torch.Tensor, np.ndarray], *,
               out: Optional[torch.Tensor] = None):
        """Samples ``indices`` in the given order: ``(n, V)`` / ``TopKLogits`` of ``(n, k)``;
        for variable-length caches a list of per-sample results. Dense and feature rows of a
        fixed-length cache go into ``out`` when given (see :meth:`_new_rows`)."""
        indices = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
        if indices.ndim != 1 or (indices.size and indices.dtype.kind not in "iu"):
            raise TypeError(f"indices must be a 1-D sequence of ints, got {indices.dtype} "
                            f"{indices.shape}")
        indices = indices.astype(np.int64)
        if indices.size and (indices.min() < -len(self) or indices.max() >= len(self)):
            raise IndexError(f"gather indices out of range for {len(self)} samples")
        indices = np.where(indices < 0, indices + len(self), indices)
        if self.variable:
            if out is not None:
                raise ValueError(f"out= does not apply to gather from a variable-length cache "
                                 f"({self.path}: one result per sample); use "
                                 f"cache.rows(start, stop, out=...)")
            return [self[int(i)] for i in indices]
        result = self._new_rows(len(indices), out)
        shard_of = np.searchsorted(self._sample_starts, indices, side="right") - 1
        if self._ragged:
            return self._ragged_gather(indices, shard_of)
        # torch's index_select (faster than numpy's fancy indexing), straight into the result
        for number in np.unique(shard_of):
            maps = self._shard_maps(int(number))
            where = np.nonzero(shard_of == number)[0]
            local = torch.from_numpy(indices[where] - self._sample_starts[number])
            for name in self.arrays:
                source, target = _torch_rows(maps[name]), _torch_rows(result[name])
                if len(where) == len(indices):   # every sample in this shard
                    torch.index_select(source, 0, local, out=target)
                else:
                    target.index_copy_(0, torch.from_numpy(where), source.index_select(0, local))
        return self._wrap(result, out)

    def __repr__(self) -> str:
        m = self.manifest
        return (f"LogitCache({self.path!r}: {len(self)} samples, {self.num_rows} rows, "
                f"V={m['num_classes']}, {m['dtype']}, {fmt.describe_layout(m)}, "
                f"{len(m['shards'])} shards)")


class CachedDataset(torch.utils.data.Dataset):
    """``dataset`` joined with its cached teacher rows: items ``(input, label, teacher_logits)``.

    ``label`` comes from the dataset item (or the cache's stored labels; ``ignore_index`` when
    neither has one). Length and (unless ``check_fingerprint=False``) the dataset fingerprint
    must match the cache's manifest, so rows cannot silently pair with the wrong items.
    """

    def __init__(self, dataset, cache: Union[LogitCache, str], *, check_fingerprint: bool = True,
                 ignore_index: int = -100, temperature: Optional[float] = None):
        if isinstance(cache, LogitCache):
            if temperature is not None and temperature != cache.temperature:
                raise ValueError(f"temperature={temperature!r} but the LogitCache was opened at "
                                 f"{cache.temperature!r}; open it with LogitCache(path, "
                                 f"temperature={temperature!r})")
            self.cache = cache
        else:
            self.cache = LogitCache(cache, temperature=temperature)
        if len(dataset) != len(self.cache):
            raise ValueError(f"dataset has {len(dataset)} items but the cache at "
                             f"{self.cache.path} holds {len(self.cache)} samples")
        if check_fingerprint:
            expected = self.cache.manifest["dataset"]["fingerprint"]["sha256"]
            found = dataset_fingerprint(dataset)
            if found["sha256"] != expected:
                hint = fingerprint_hint(dataset, found)
                raise ValueError(f"dataset does not match the one cached at {self.cache.path} "
                                 f"(fingerprint differs: other items or order){hint}; pass "
                                 f"check_fingerprint=False only if you are sure")
        self.dataset = dataset
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        model_input, label = split_item(self.dataset[index])
        if label is None:
            label = self.cache.sample_labels(index)
            if label is None:
                label = self.ignore_index
        return model_input, torch.as_tensor(label), self.cache[index]
