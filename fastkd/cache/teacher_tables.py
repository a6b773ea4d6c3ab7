"""Row access to the tables other tools store teacher datasets in: parquet files or a
``save_to_disk`` directory. A table numbers its rows over all its files, reads batches from any
row on or one row, names a row's place (``file: row r``) and hashes its files.
"""
import hashlib
import os
import re
from bisect import bisect_right
from typing import Iterator, List, Optional, Sequence, Tuple

from fastkd.cache.files import not_a_file
from fastkd.extras import require

FEATURE = "fastkd import --from distillkit/axolotl"
READ_BATCH = 32  # rows per batch read from a file (bounds memory; results do not depend on it)
HASH_BLOCK = 1 << 22


class TableError(ValueError):
    """A teacher dataset that cannot be read (message names the path)."""


def natural_key(path: str):
    """``data_2.parquet`` before ``data_10.parquet``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def is_saved_dataset(path: str) -> bool:
    """A directory written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return any(os.path.isfile(os.path.join(path, name))
               for name in ("state.json", "dataset_dict.json"))


def hash_files(paths: Sequence[str], tag: bytes) -> str:
    digest = hashlib.sha256(tag)
    for path in paths:
        digest.update(f"|{os.path.basename(path)}|".encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(HASH_BLOCK), b""):
                digest.update(block)
    return digest.hexdigest()


class ParquetTable:
    """Parquet files read as one table (rows of the files in the given order)."""

    def __init__(self, paths: Sequence[str]):
        self.pq = require("pyarrow.parquet", "hf", FEATURE)
        self.pa = require("pyarrow", "hf", FEATURE)
        self.paths = [os.fspath(path) for path in paths]
        self.files, self.starts, self.group_starts, total = [], [], [], 0
        names = None
        for path in self.paths:
            if not os.path.isfile(path):
                raise TableError(f"{path}: {not_a_file(path)}")
            try:
                handle = self.pq.ParquetFile(path)
            except Exception as error:  # pyarrow's ArrowInvalid and kin: not a parquet file
                raise TableError(f"{path}: not a readable parquet file ({error})") from None
            if names is None:
                names, self.schema = set(handle.schema_arrow.names), handle.schema_arrow
            elif set(handle.schema_arrow.names) != names:
                raise TableError(f"{path}: columns {sorted(handle.schema_arrow.names)} differ "
                                 f"from {self.paths[0]}'s {sorted(names)}")
            groups, offset = [], 0
            for number in range(handle.metadata.num_row_groups):
                groups.append(offset)
                offset += handle.metadata.row_group(number).num_rows
            self.files.append(handle)
            self.starts.append(total)
            self.group_starts.append(groups)
            total += offset
        self.length = total
        self.columns = names or set()

    def __len__(self) -> int:
        return self.length

    def _locate(self, index: int) -> Tuple[int, int]:
        number = bisect_right(self.starts, index) - 1
        return number, index - self.starts[number]

    def where(self, index: int) -> str:
        number, row = self._locate(index)
        return f"{self.paths[number]}: row {row}"

    def row(self, index: int, columns: List[str]):
        """Row ``index`` as a one-row pyarrow Table."""
        number, row = self._locate(index)
        groups = self.group_starts[number]
        group = bisect_right(groups, row) - 1
        table = self.files[number].read_row_group(group, columns=columns)
        return table.slice(row - groups[group], 1)

    def batches(self, start: int, columns: List[str]) -> Iterator[Tuple[int, object]]:
        """``(index of the first row, pyarrow Table)`` for rows ``start ..`` in order."""
        for number, handle in enumerate(self.files):
            first = self.starts[number]
            stop = self.starts[number + 1] if number + 1 < len(self.files) else self.length
            if stop <= start:
                continue
            row = max(start - first, 0)
            groups = self.group_starts[number]
            group = bisect_right(groups, row) - 1
            skip, index = row - groups[group], first + groups[group]
            for batch in handle.iter_batches(batch_size=READ_BATCH, columns=columns,
                                             row_groups=range(group, len(groups))):
                table = self.pa.Table.from_batches([batch])
                if skip >= len(table):
                    skip -= len(table)
                    index += len(table)
                    continue
                yield index + skip, table.slice(skip)
                index += len(table)
                skip = 0

    def fingerprint(self) -> str:
        return hash_files(self.paths, b"parquet")

    def stats(self):
        return [(os.stat(path).st_size, os.stat(path).st_mtime_ns) for path in self.paths]

    def check_unchanged(self, stats) -> None:
        for path, before, now in zip(self.paths, stats, self.stats()):
            if before != now:
                raise TableError(f"{path}: changed while it was imported; import again")


class SavedTable:
    """A ``datasets`` directory written by ``save_to_disk`` (``split`` picks one split of a
    DatasetDict, default ``train``; a single dataset refuses one)."""

    def __init__(self, path: str, split: Optional[str] = None):
        datasets = require("datasets", "hf", FEATURE)
        self.path = os.fspath(path)
        try:
            dataset = datasets.load_from_disk(self.path)
        except Exception as error:  # FileNotFoundError and datasets' own errors
            raise TableError(f"{self.path}: not a dataset saved with save_to_disk ({error})") \
                from None
        if not isinstance(dataset, datasets.DatasetDict) and split is not None:
            raise TableError(f"{self.path}: one dataset, not a DatasetDict of splits; --split "
                             f"does not apply")
        if isinstance(dataset, datasets.DatasetDict):
            split = "train" if split is None else split
            if split not in dataset:
                raise TableError(f"{self.path}: no split {split!r} (it holds "
                                 f"{', '.join(sorted(dataset))}); pass --split")
            dataset, self.path = dataset[split], os.path.join(self.path, split)
        self.dataset = dataset.with_format("arrow")
        self.columns = set(dataset.column_names)
        self.schema = dataset.data.schema
        self.files = sorted((os.path.join(self.path, name) for name in os.listdir(self.path)
                             if os.path.isfile(os.path.join(self.path, name))), key=natural_key)

    def __len__(self) -> int:
        return len(self.dataset)

    def where(self, index: int) -> str:
        return f"{self.path}: row {index}"

    def row(self, index: int, columns: List[str]):
        return self.dataset[index:index + 1].select(columns)

    def batches(self, start: int, columns: List[str]):
        for first in range(start, len(self.dataset), READ_BATCH):
            yield first, self.dataset[first:first + READ_BATCH].select(columns)

    def fingerprint(self) -> str:
        return hash_files(self.files, b"saved")

    def stats(self):
        return [(os.stat(path).st_size, os.stat(path).st_mtime_ns) for path in self.files]

    def check_unchanged(self, stats) -> None:
        if stats != self.stats():
            raise TableError(f"{self.path}: changed while it was imported; import again")


def open_table(paths: Sequence[str], split: Optional[str] = None):
    """Parquet files, a directory of them (natural order; searched recursively when it holds
    none itself) or a ``save_to_disk`` directory -> a table. ``split`` applies to a saved
    DatasetDict only."""
    paths = [os.fspath(path) for path in paths]
    if not paths:
        raise TableError("give a dataset directory or parquet file(s)")
    if len(paths) == 1 and os.path.isdir(paths[0]):
        directory = paths[0]
        if is_saved_dataset(directory):
            return SavedTable(directory, split)
        found = sorted((os.path.join(directory, name) for name in os.listdir(directory)
                        if name.endswith(".parquet")), key=natural_key)
        if not found:  # e.g. a Hub snapshot's data/ folder
            found = sorted((os.path.join(root, name) for root, _, names in os.walk(directory)
                            for name in names if name.endswith(".parquet")), key=natural_key)
        if not found:
            raise TableError(f"{directory}: no .parquet files and no save_to_disk dataset "
                             f"(state.json) in it")
        return ParquetTable(_no_split(found, split))
    for path in paths:
        if os.path.isdir(path):
            raise TableError(f"{path}: a directory among several inputs; give one directory or "
                             f"parquet files")
    return ParquetTable(_no_split(paths, split))


def _no_split(paths, split):
    if split is not None:
        raise TableError(f"{paths[0]}: parquet files have no splits; --split applies to a "
                         f"save_to_disk DatasetDict")
    return paths


KIND_WORDS = {"iu": "integers", "iuf": "numbers", "iub": "integers (0 or 1)"}


def _list_values(cell, where: str, name: str, what: str):
    """The values of a list cell (a pyarrow ListScalar), or a TableError naming the column."""
    if not cell.is_valid:
        raise TableError(f"{where}: {name} is null")
    values = getattr(cell, "values", None)
    if values is None or not hasattr(values, "null_count"):
        raise TableError(f"{where}: {name} must be {what}, got a {cell.type} value")
    return values


def _of_kind(array, where: str, name: str, kinds: str):
    """``array`` if its numpy dtype kind is one of ``kinds`` ("iu", "iuf", "iub")."""
    if array.dtype.kind not in kinds:
        raise TableError(f"{where}: {name} must hold {KIND_WORDS[kinds]}, got {array.dtype}")
    return array


def cell_matrix(cell, where: str, name: str, kinds: str):
    """A list-of-lists cell (pyarrow scalar) -> ``(rows, width)`` numpy array of a dtype kind in
    ``kinds``; every inner list must have the same length."""
    import numpy as np
    inner = _list_values(cell, where, name, "a list of lists")
    if not hasattr(inner, "flatten") or not hasattr(inner, "value_lengths"):
        raise TableError(f"{where}: {name} must be a list of lists, got {cell.type}")
    if inner.null_count:
        raise TableError(f"{where}: {name} holds a null entry")
    lengths = inner.value_lengths().to_numpy(zero_copy_only=False)
    flat = inner.flatten()
    if flat.null_count:
        raise TableError(f"{where}: {name} holds a null value")
    width = int(lengths[0]) if len(lengths) else 0
    if len(lengths) and (lengths != width).any():
        bad = int(np.flatnonzero(lengths != width)[0])
        raise TableError(f"{where}: {name}[{bad}] has {int(lengths[bad])} entries, "
                         f"{name}[0] has {width}; every position must have the same number")
    matrix = flat.to_numpy(zero_copy_only=False).reshape(len(lengths), width)
    return _of_kind(matrix, where, name, kinds)


def cell_vector(cell, where: str, name: str, kinds: str):
    """A list cell -> 1-D numpy array of a dtype kind in ``kinds``."""
    values = _list_values(cell, where, name, "a list")
    if values.null_count:
        raise TableError(f"{where}: {name} must be a list without nulls")
    return _of_kind(values.to_numpy(zero_copy_only=False), where, name, kinds)
