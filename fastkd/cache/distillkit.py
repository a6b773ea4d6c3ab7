"""``fastkd import --from distillkit`` and ``--from axolotl``: other tools' teacher datasets -> a
fastkd top-k cache (formats and sources: docs/teacher-datasets.md).

- **DistillKit** / open-instruct: ``n`` input ids and ``n - 1`` compressed positions
  (:mod:`fastkd.cache.distillkit_codec`), position ``j`` being fastkd's row ``j``; the sample is
  the first ``n - 1`` tokens (the last id has no row in either tool).
- **axolotl**: ``target_token_ids``, ``target_logprobs`` and ``target_mask`` per input id; row
  ``p`` is the distribution over token ``p``, so fastkd's row ``j`` is row ``j + row_offset``
  (default 1; 0 pairs them as axolotl's Liger-kernel path does). Masked rows get label -100.

Rows are log-probabilities (``lse = 0``, the tail is what the source leaves out); a row whose kept
probabilities sum to ``1 < m <= 1 + max_excess_mass`` gets ``lse = log m``, above that it is
refused, as are NaN/+inf values and ids out of range or repeated. Labels are the next-token
labels of the sample's tokens, so ``CachedDataset(TokenDataset(...), cache)`` matches.
"""
import os
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np

from fastkd.cache import distillkit_codec as codec
from fastkd.cache.files import not_a_file
from fastkd.cache.teacher_tables import FEATURE, cell_matrix, cell_vector, open_table

SOURCES = ("distillkit", "axolotl")
CONFIG_NAME = "compression_config.yaml"
DEFAULT_MAX_EXCESS_MASS = 0.01
IMPORT_BATCH = 64  # samples handed to the shard cutter at a time (does not change the bytes)
IMPORT_ROWS = 2048  # ... or fewer once they hold this many rows
IGNORE_INDEX = -100
AXOLOTL_COLUMNS = ("input_ids", "target_token_ids", "target_logprobs", "target_mask")


class TeacherDatasetError(ValueError):
    """A teacher dataset that cannot be imported (message names the file and row)."""


def read_config(path: str):
    """``compression_config.yaml`` (or a DistillKit training config) -> a codec config."""
    from fastkd.extras import require
    yaml = require("yaml", "hf", FEATURE)
    if not os.path.isfile(path):
        raise TeacherDatasetError(f"{path}: {not_a_file(path)}")
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise TeacherDatasetError(f"{path}: not readable YAML ({error})") from None
    return codec.parse_config(data, path)


class DistillKitRows:
    """Decodes one DistillKit/open-instruct row (current or legacy layout)."""

    def __init__(self, config, columns: set, vocab_size: Optional[int], data: str = "data"):
        self.config = config
        layouts = {True: ("packed_indices", "exact_values", "coeffs"),
                   False: ("compressed_logprobs", "bytepacked_indices")}
        needed, other = layouts[config.legacy], layouts[not config.legacy]
        missing = [name for name in ("input_ids",) + needed if name not in columns]
        if missing:
            layout = f"{'legacy' if config.legacy else 'current'} ({', '.join(needed)})"
            hint = ("; the data holds the other layout, so the config does not belong to it"
                    if all(name in columns for name in other) else "")
            raise TeacherDatasetError(f"{data}: the compression config is for the {layout} "
                                      f"layout but the data lacks {', '.join(missing)}{hint}")
        self.columns = ["input_ids", *needed]
        self.top_k = config.k
        self.vocab_size = vocab_size or config.vocab_size
        self.describe = {"layout": "legacy" if config.legacy else "compressed",
                         "compression": dict(vars(config)) if config.legacy else
                         config.to_mapping()}

    def decode(self, cells: dict, where: str):
        """-> ``(tokens (n,), hf labels or None, values (n, K), ids (n, K), keep rows mask)``."""
        config = self.config
        input_ids = token_ids(cells["input_ids"], where, self.vocab_size)
        if config.legacy:
            widths = {"packed_indices": -(-config.k // (64 // config.bits)),
                      "exact_values": config.exact_k, "coeffs": config.num_coeffs}
        else:
            widths = {"compressed_logprobs": config.logprob_bytes,
                      "bytepacked_indices": config.index_bytes}
        arrays = {name: cell_matrix(cells[name], where, name, COLUMN_KINDS[name])
                  for name in widths}
        for name in ("compressed_logprobs", "bytepacked_indices", "packed_indices"):
            if name in arrays:   # bytes (or packed 64-bit words): no value may wrap
                _in_range(arrays[name], where, name, 0, 255 if name != "packed_indices" else None)
        for name, array in arrays.items():
            if len(array) != len(input_ids) - 1:
                raise TeacherDatasetError(
                    f"{where}: {name} has {len(array)} positions for {len(input_ids)} input_ids; "
                    f"DistillKit and open-instruct store len(input_ids) - 1 (position j is the "
                    f"distribution after tokens 0..j)")
            if len(array) and array.shape[1] != widths[name]:
                raise TeacherDatasetError(
                    f"{where}: {name} has {array.shape[1]} entries per position, the compression "
                    f"config gives {widths[name]}; the config does not belong to this data")
        if len(input_ids) < 2:
            raise TeacherDatasetError(f"{where}: {len(input_ids)} input_ids, no position to "
                                      f"import (a sequence needs at least 2)")
        if config.legacy:
            values, ids = codec.decode_legacy(arrays["packed_indices"].astype(np.uint64),
                                              arrays["exact_values"], arrays["coeffs"], config)
        else:
            values = codec.decode_logprobs(arrays["compressed_logprobs"].astype(np.uint8), config)
            ids = codec.decode_indices(arrays["bytepacked_indices"].astype(np.uint8), config)
        return input_ids[:-1], None, values, ids, None


# the numpy dtype kinds each column may hold ("iu" integers, "iuf" numbers, "iub" masks)
COLUMN_KINDS = {"compressed_logprobs": "iu", "bytepacked_indices": "iu", "packed_indices": "iu",
                "exact_values": "iuf", "coeffs": "iuf", "target_token_ids": "iu",
                "target_logprobs": "iuf", "target_mask": "iub", "attention_mask": "iub",
                "labels": "iu"}


def _in_range(array: np.ndarray, where: str, name: str, low: int, high: Optional[int],
              allowed: Optional[int] = None) -> None:
    """Every value of an integer ``array`` in ``[low, high]`` (no upper bound when ``high`` is
    None) or equal to ``allowed``."""
    bad = array < low
    if high is not None:
        bad |= array > high
    if allowed is not None:
        bad &= array != allowed
    if bad.any():
        span = f"[{low}, {high}]" if high is not None else f">= {low}"
        extra = f" or {allowed}" if allowed is not None else ""
        raise TeacherDatasetError(f"{where}: {name} holds {array[bad].flat[0]}, outside "
                                  f"{span}{extra}")


def token_ids(cell, where: str, vocab_size: int) -> np.ndarray:
    """An ``input_ids`` cell -> int64 ids, each in ``[0, vocab_size)``."""
    ids = cell_vector(cell, where, "input_ids", "iu")
    outside = (ids < 0) | (ids >= vocab_size)
    if outside.any():
        raise TeacherDatasetError(f"{where}: input_ids holds token id {ids[outside][0]} "
                                  f"outside [0, {vocab_size}) (--vocab-size {vocab_size})")
    return ids.astype(np.int64)


class AxolotlRows:
    """Reads one row of axolotl's KD column layout."""

    def __init__(self, columns: set, vocab_size: Optional[int], top_k: Optional[int],
                 row_offset: int, data: str = "data"):
        missing = [name for name in AXOLOTL_COLUMNS if name not in columns]
        if missing:
            raise TeacherDatasetError(f"{data}: the data lacks axolotl's KD column(s) "
                                      f"{', '.join(missing)}")
        if vocab_size is None:
            raise TeacherDatasetError("--from axolotl needs --vocab-size V (axolotl datasets do "
                                      "not record the teacher's vocabulary size)")
        if row_offset not in (0, 1):
            raise TeacherDatasetError(f"--row-offset must be 0 or 1, got {row_offset!r}")
        self.columns = [*AXOLOTL_COLUMNS, *(name for name in ("attention_mask", "labels")
                                            if name in columns)]
        self.vocab_size, self.top_k, self.row_offset = vocab_size, top_k, row_offset
        self.describe = {"layout": "axolotl", "row_offset": row_offset}

    def decode(self, cells: dict, where: str):
        input_ids = token_ids(cells["input_ids"], where, self.vocab_size)
        length = len(input_ids)
        ids, values, mask = (cell_matrix(cells[name], where, name, COLUMN_KINDS[name]) for name
                             in ("target_token_ids", "target_logprobs", "target_mask"))
        _in_range(mask, where, "target_mask", 0, 1)
        for name, array in (("target_token_ids", ids), ("target_logprobs", values),
                            ("target_mask", mask)):
            if len(array) != length:
                raise TeacherDatasetError(f"{where}: {name} has {len(array)} rows for {length} "
                                          f"input_ids; axolotl stores one row per input id")
        if ids.shape != values.shape or ids.shape != mask.shape:
            raise TeacherDatasetError(f"{where}: target_token_ids, target_logprobs and "
                                      f"target_mask differ in shape ({ids.shape}, "
                                      f"{values.shape}, {mask.shape})")
        if self.top_k is None:
            self.top_k = ids.shape[1]
        elif ids.shape[1] != self.top_k:
            raise TeacherDatasetError(f"{where}: {ids.shape[1]} log-probs per position, other "
                                      f"rows (or --top-k) have {self.top_k}; a cache holds one K")
        attention = self._vector(cells, "attention_mask", where, length, 1)
        _in_range(attention, where, "attention_mask", 0, 1)
        attended = np.flatnonzero(attention)
        labels = self._vector(cells, "labels", where, length, None)
        if labels is not None:   # the hf labels: classes of the teacher's, or ignored
            _in_range(labels, where, "labels", 0, self.vocab_size - 1, allowed=IGNORE_INDEX)
        labels = input_ids if labels is None else labels
        if not len(attended) or attended[-1] - attended[0] + 1 != len(attended):
            raise TeacherDatasetError(f"{where}: attention_mask must be one contiguous run of 1s "
                                      f"(left or right padding)")
        first, stop = int(attended[0]), int(attended[-1]) + 1 - self.row_offset
        if stop <= first:
            raise TeacherDatasetError(f"{where}: no position has a row with --row-offset "
                                      f"{self.row_offset}")
        rows = slice(first + self.row_offset, stop + self.row_offset)
        row_mask = mask[rows]
        keep = row_mask.all(axis=1)
        mixed = np.flatnonzero(row_mask.any(axis=1) & ~keep)
        if len(mixed):
            row = first + self.row_offset + int(mixed[0])
            raise TeacherDatasetError(f"{where}: target_mask row {row} mixes 0s and 1s; axolotl "
                                      f"masks whole positions")
        hf_labels = np.asarray(labels[first:stop], np.int64)
        return input_ids[first:stop], hf_labels, values[rows], ids[rows], keep

    @staticmethod
    def _vector(cells, name, where, length, default):
        if name not in cells:
            return None if default is None else np.full(length, default, np.int64)
        vector = cell_vector(cells[name], where, name, COLUMN_KINDS[name]).astype(np.int64)
        if len(vector) != length:
            raise TeacherDatasetError(f"{where}: {name} has {len(vector)} entries, input_ids "
                                      f"{length}")
        return vector


def storage_values(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> the cache's storage array (fp16, bf16 as uint16 bits, fp32)."""
    if dtype == "fp16":
        with np.errstate(over="ignore"):  # log-probs below -65504 store as -inf (probability 0)
            return values.astype(np.float16)
    if dtype == "bf16":
        return (codec.round_to(values, "bfloat16").view(np.uint32) >> 16).astype(np.uint16)
    return values.astype(np.float32)


def stored_as_float(stored: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bf16":
        return (stored.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return stored.astype(np.float64)


def check_rows(values, ids, where: str, vocab_size: int, dtype: str, max_excess_mass: float):
    """The import's checks and mass policy -> ``(stored values, lse (n,) float32)``."""
    bad = np.isnan(values) | (values == np.inf)
    if bad.any():
        position = int(np.flatnonzero(bad.any(axis=1))[0])
        raise TeacherDatasetError(f"{where}: position {position} holds a NaN or +inf log-prob")
    outside = (ids < 0) | (ids >= vocab_size)
    if outside.any():
        position = int(np.flatnonzero(outside.any(axis=1))[0])
        raise TeacherDatasetError(f"{where}: position {position} holds token id "
                                  f"{int(ids[position][outside[position]][0])} outside [0, "
                                  f"{vocab_size}) (--vocab-size {vocab_size})")
    if ids.shape[1] > 1:
        ordered = np.sort(ids, axis=1)
        twice = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
        if twice.any():
            position = int(np.flatnonzero(twice)[0])
            raise TeacherDatasetError(f"{where}: position {position} lists a token id twice")
    stored = storage_values(values, dtype)
    mass = np.exp(stored_as_float(stored, dtype)).sum(axis=1)
    over = mass > 1 + max_excess_mass
    if over.any():
        position = int(np.flatnonzero(over)[0])
        raise TeacherDatasetError(
            f"{where}: position {position}'s top-{ids.shape[1]} probabilities sum to "
            f"{mass[position]:.6g}, more than 1 + {max_excess_mass:g} (--max-excess-mass); these "
            f"are not log-probabilities of one distribution")
    lse = np.where(mass > 1, np.log(np.maximum(mass, 1)), 0).astype(np.float32)
    return stored, lse


class TeacherRows:
    """A teacher dataset as fastkd token items ``{"input_ids", "labels"}`` (``dataset[i]``)
    and, from :meth:`iter_rows`, their top-K rows."""

    def __init__(self, table, reader, *, dtype: str = "fp16",
                 max_excess_mass: float = DEFAULT_MAX_EXCESS_MASS):
        self.table, self.reader, self.dtype = table, reader, dtype
        self.max_excess_mass = max_excess_mass
        self.stats = table.stats()

    def __len__(self) -> int:
        return len(self.table)

    def _sample(self, table, row: int, index: int) -> dict:
        import torch
        from fastkd.tokens import next_token_labels
        where = self.table.where(index)
        cells = {name: table.column(name)[row] for name in self.reader.columns}
        tokens, hf_labels, values, ids, keep = self.reader.decode(cells, where)
        stored, lse = check_rows(values, ids, where, self.reader.vocab_size, self.dtype,
                                 self.max_excess_mass)
        tokens = torch.from_numpy(np.ascontiguousarray(tokens))
        if hf_labels is None:
            labels = next_token_labels(tokens, IGNORE_INDEX)
        else:
            labels = next_token_labels(torch.from_numpy(hf_labels), IGNORE_INDEX)
        if keep is not None:
            labels[torch.from_numpy(~keep)] = IGNORE_INDEX
        return {"input_ids": tokens, "labels": labels, "values": stored, "indices": ids,
                "lse": lse}

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        sample = self._sample(self.table.row(index, self.reader.columns), 0, index)
        return {"input_ids": sample["input_ids"], "labels": sample["labels"]}

    def iter_rows(self, start: int = 0) -> Iterator[Tuple[int, dict]]:
        for first, table in self.table.batches(start, self.reader.columns):
            for row in range(len(table)):
                yield first + row, self._sample(table, row, first + row)
        self.table.check_unchanged(self.stats)


def _positive_int(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise TeacherDatasetError(f"{name} must be an int >= 1, got {value!r}")


def open_source(paths: Sequence[str], source: str, *, vocab_size: Optional[int] = None,
                top_k: Optional[int] = None, compression_config: Optional[str] = None,
                split: Optional[str] = None, row_offset: int = 1):
    """-> ``(table, reader)`` for ``paths`` read as ``source``."""
    if source not in SOURCES:
        raise TeacherDatasetError(f"--from must be one of {', '.join(SOURCES)}, got {source!r}")
    _positive_int("--vocab-size", vocab_size)
    _positive_int("--top-k", top_k)
    table = open_table(paths, split)
    data = os.fspath(paths[0]) + (" ..." if len(paths) > 1 else "")   # named in messages
    if source == "axolotl":
        return table, AxolotlRows(table.columns, vocab_size, top_k, row_offset, data)
    if compression_config is None:
        first = os.fspath(paths[0]) if paths else "."
        directory = first if os.path.isdir(first) else os.path.dirname(first) or "."
        compression_config = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(compression_config):
            raise TeacherDatasetError(
                f"{directory}: no {CONFIG_NAME} beside the data; pass --compression-config "
                f"FILE (the YAML DistillKit's sample-logits writes, or the training config "
                f"whose teacher section holds logprob_compressor / legacy_logit_compression)")
    config = read_config(compression_config)
    if top_k is not None and top_k != config.k:
        raise TeacherDatasetError(f"--top-k {top_k} differs from the compression config's k = "
                                  f"{config.k} ({compression_config})")
    if vocab_size is not None and vocab_size < config.vocab_size:
        raise TeacherDatasetError(f"--vocab-size {vocab_size} is below the compression config's "
                                  f"vocabulary ({config.vocab_size}, {compression_config})")
    return table, DistillKitRows(config, table.columns, vocab_size, data)


def import_teacher_dataset(paths: Sequence[str], out_dir, *, source: str,
                           vocab_size: Optional[int] = None, top_k: Optional[int] = None,
                           compression_config: Optional[str] = None, split: Optional[str] = None,
                           row_offset: int = 1,
                           max_excess_mass: float = DEFAULT_MAX_EXCESS_MASS,
                           dtype: str = "fp16", shard_size_mb: float = 256,
                           overwrite: bool = False, progress: bool = True) -> dict:
    """Write the top-K cache of a ``source`` teacher dataset into ``out_dir``; returns the
    manifest. Re-running resumes an interrupted import."""
    from fastkd.cache import manifest as fmt
    from fastkd.cache.specs import dataset_fingerprint
    from fastkd.cache.teacher_import import write_rows
    if dtype not in fmt.STORAGE_DTYPES:
        raise TeacherDatasetError(f"--dtype must be one of {sorted(fmt.STORAGE_DTYPES)}, got "
                                  f"{dtype!r}")
    if isinstance(max_excess_mass, bool) or not isinstance(max_excess_mass, (int, float)) or \
            not 0 <= max_excess_mass < float("inf"):
        raise TeacherDatasetError(f"--max-excess-mass must be a finite number >= 0, got "
                                  f"{max_excess_mass!r}")
    paths = [os.fspath(path) for path in paths]
    table, reader = open_source(paths, source, vocab_size=vocab_size, top_k=top_k,
                                compression_config=compression_config, split=split,
                                row_offset=row_offset)
    if not len(table):
        raise TeacherDatasetError(f"{', '.join(paths)}: no rows")
    dataset = TeacherRows(table, reader, dtype=dtype, max_excess_mass=float(max_excess_mass))
    token_fingerprint = dataset_fingerprint(dataset)  # decodes (and checks) a few samples
    if reader.top_k is None:
        raise TeacherDatasetError(f"{', '.join(paths)}: no rows")
    return write_rows(
        dataset, out_dir, source=source, paths=paths,
        teacher=dict({"class": source, "fingerprint": table.fingerprint(),
                      "max_excess_mass": float(max_excess_mass)}, **reader.describe),
        dataset_spec=f"{source}-input_ids", fingerprint=token_fingerprint, top_k=reader.top_k,
        vocab_size=reader.vocab_size, dtype=dtype, shard_size_mb=shard_size_mb,
        batch=(IMPORT_BATCH, IMPORT_ROWS), overwrite=overwrite, progress=progress, rows="all")


# the options of add_arguments and the sources they apply to (None when not given)
SOURCE_OPTIONS = {"compression_config": ("--compression-config", ("distillkit",)),
                  "split": ("--split", ("distillkit", "axolotl")),
                  "row_offset": ("--row-offset", ("axolotl",)),
                  "max_excess_mass": ("--max-excess-mass", ("distillkit", "axolotl"))}


def add_arguments(parser) -> None:
    """The ``fastkd import`` options of ``--from distillkit`` / ``--from axolotl``."""
    group = parser.add_argument_group("--from distillkit / axolotl (teacher datasets)")
    group.add_argument("--compression-config", metavar="FILE",
                       help="distillkit: the compression YAML (default: compression_config.yaml "
                            "beside the data), or a DistillKit training config")
    group.add_argument("--split",
                       help="a save_to_disk DatasetDict's split to import (default: train)")
    group.add_argument("--row-offset", type=int, choices=(0, 1),
                       help="axolotl: fastkd row p is target row p + OFFSET (default 1: "
                            "axolotl's writers store row p as the distribution over token p; "
                            "0 pairs them as axolotl's Liger-kernel trainer does)")
    group.add_argument("--max-excess-mass", type=float, metavar="TOL",
                       help="a row whose kept probabilities sum to 1 < m <= 1 + TOL keeps its "
                            "values with lse = log m; above 1 + TOL it is refused (default "
                            f"{DEFAULT_MAX_EXCESS_MASS})")
