"""The on-disk cache format. This is the only module that knows file names, array layouts and
the manifest's fields (every one checked by :func:`validate_manifest` when a manifest is read);
the writer, the reader and the CLI go through it. See docs/cache-format.md. Opening, reading,
checking and atomically writing the files is :mod:`fastkd.cache.files` (re-exported here).

A cache is a directory::

    manifest.json                      the index (written last-complete-shard-at-a-time, atomically)
    shard-<rank>-<index>.<array>.npy   one .npy file per array per shard
    offsets.npy                        (num_samples + 1,) int64 row offsets, variable-length only
    labels.npy                         dataset labels (format version 1 only)

Arrays per layout (``R`` = rows of the shard, ``V`` = classes, ``k`` = top-k or draws,
``n_T`` = stored temperatures), format version 3:

- ``dense``: ``logits`` ``(R, V)`` in the cache dtype (bf16 is stored as its uint16 bit pattern,
  because numpy has no bfloat16).
- ``features``: ``features`` ``(R, D)`` in the cache dtype: intermediate teacher features
  (e.g. through ``fastkd.features.TeacherFeatures``) for feature distillation; ``num_classes``
  holds ``D``.
- ``topk``: ``values`` ``(R, k)`` (cache dtype, largest first), ``indices`` ``(R, k)`` (uint16
  when ``V <= 65536``, else int32) and ``lse`` ``(R, n_T)`` float32, the log-sum-exp of the full
  tempered teacher row ``z / T`` at each temperature of the manifest's ``temperatures``.
- ``sampled`` (ragged): ``distinct`` ``(R,)`` the number ``u_r`` of distinct ids of each row
  (``1 <= u_r <= min(k, V)``; uint8/uint16/int32 as for counts), and ``indices`` ``(E,)`` with
  ``counts`` (or ``weights``) ``(E,)``, ``E = sum u_r``: row after row, the distinct class ids
  among ``k`` draws from the proposal ``softmax(z / tau)`` (most drawn first, ties by id) and
  how often each was drawn (uint8 when ``k <= 255``, uint16 when ``k <= 65535``, else int32),
  or, when the proposal temperature ``tau`` differs from the target's ``T``, the float32
  importance weights ``(c / k) p / q`` with ``p = softmax(z / T)``, ``q = softmax(z / tau)``.
  The shard entry records ``entries`` = E. Version 2 stored ``indices`` and ``counts`` ``(R, w)``,
  ``w = min(k, V)``, padded with distinct ids of count 0, drawn at ``T`` (no proposal).

Every shard also carries ``labels`` (per sample or per row, int32) when the dataset has labels
and ``lengths`` (rows per sample, int64) when items are variable-length. Labels are stored once
(version 1 stored them as int64 in every shard and again in ``labels.npy``; version 1 top-k ids
are int32 and its ``lse`` is ``(R,)`` at T = 1). Versions 1, 2 and 3 read.
"""
import hashlib
import json
import os
import re
import stat
from typing import Dict, Iterable, List, Optional

import numpy as np

from fastkd.cache.files import (  # noqa: F401  (re-exported: the cache's one file API)
    PLAIN_FILE_NAME, TMP_SUFFIX, CacheError, check_checksums, check_file_name, check_sizes,
    file_identity, file_sha256, fsync_directory, load_array, open_array, open_cache_file,
    write_atomic, write_npy_atomic)

FORMAT_NAME = "fastkd-logit-cache"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
MANIFEST_NAME = "manifest.json"
OFFSETS_NAME = "offsets.npy"
LABELS_NAME = "labels.npy"

# cache dtype name -> (numpy storage dtype, bytes per element)
STORAGE_DTYPES = {"fp16": np.dtype("<f2"), "bf16": np.dtype("<u2"), "fp32": np.dtype("<f4")}
# largest finite magnitude of each cache dtype (values beyond it would become inf)
DTYPE_MAX = {"fp16": 65504.0, "bf16": 3.3895313892515355e38, "fp32": 3.4028234663852886e38}
LAYOUTS = ("dense", "topk", "sampled", "features")
# the layouts that keep K entries per row (the manifest field holding K)
SPARSE_K_FIELD = {"topk": "top_k", "sampled": "sample"}
# the one array of the layouts that store whole rows
DENSE_ARRAY = {"dense": "logits", "features": "features"}
INDEX_DTYPE = np.dtype("<i4")  # class ids when V > 65536 (and always in version 1)
SMALL_INDEX_DTYPE = np.dtype("<u2")  # class ids when V <= 65536
LSE_DTYPE = np.dtype("<f4")
WEIGHT_DTYPE = np.dtype("<f4")  # importance weights of a sampled cache with a proposal
LABEL_DTYPE = np.dtype("<i4")
V1_LABEL_DTYPE = np.dtype("<i8")
LENGTH_DTYPE = np.dtype("<i8")
# a manifest is a small index; anything bigger is not one of ours
MAX_MANIFEST_BYTES = 1 << 30
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


# ----------------------------------------------------------------------------- names and sizes
def shard_file_name(rank: int, index: int, array: str) -> str:
    return f"shard-{rank:03d}-{index:06d}.{array}.npy"


def is_cache_file(name: str) -> bool:
    """True for every file name this format may create (used by --overwrite and resume)."""
    base = name[:-len(TMP_SUFFIX)] if name.endswith(TMP_SUFFIX) else name
    return (base.startswith("shard-") and base.endswith(".npy")) or base in (
        MANIFEST_NAME, OFFSETS_NAME, LABELS_NAME) or (
        base.startswith("manifest.rank") and base.endswith(".json"))


def progress_manifest_name(rank: int, world_size: int) -> str:
    """Where a rank records its finished shards: the manifest itself for a single process."""
    return MANIFEST_NAME if world_size == 1 else f"manifest.rank{rank}-of-{world_size}.json"


def is_temp_file(name: str) -> bool:
    """True for the temp files this format writes (``<cache file>.tmp``) and nothing else."""
    return name.endswith(TMP_SUFFIX) and is_cache_file(name) and \
        PLAIN_FILE_NAME.fullmatch(name) is not None


def is_progress_manifest(name: str) -> bool:
    return name == MANIFEST_NAME or bool(re.fullmatch(r"manifest\.rank\d+-of-\d+\.json", name))


def other_world_progress_files(names: Iterable[str], world_size: int) -> List[str]:
    """Progress manifests left by a run with a different number of processes."""
    return [name for name in names if name.startswith("manifest.rank") and
            name.endswith(".json") and not name.endswith(f"-of-{world_size}.json")]


def index_dtype(num_classes: int, version: int = FORMAT_VERSION) -> np.dtype:
    """Storage dtype of sparse class ids: uint16 when every id fits (V <= 65536), else int32."""
    return SMALL_INDEX_DTYPE if version >= 2 and num_classes <= 65536 else INDEX_DTYPE


def count_dtype(draws: int) -> np.dtype:
    """Storage dtype of sampled counts (each at most ``draws``): uint8, uint16 or int32."""
    return np.dtype("<u1" if draws <= 255 else "<u2" if draws <= 65535 else "<i4")


def sampled_width(draws: int, num_classes: int) -> int:
    """Entries per sampled row: ``draws`` draws have at most ``min(draws, V)`` distinct ids."""
    return min(draws, num_classes)


def is_ragged(manifest: dict) -> bool:
    """Whether a cache stores sampled rows ragged (format version 3 on): ``distinct`` per row,
    ``indices`` and ``counts`` / ``weights`` per entry."""
    return manifest["layout"] == "sampled" and manifest.get("format_version",
                                                            FORMAT_VERSION) >= 3


def is_weighted(manifest: dict) -> bool:
    """Whether a ragged sampled cache stores float importance weights (its proposal temperature
    differs from the target's) instead of integer draw counts."""
    proposal = manifest.get("proposal_temperature")
    return is_ragged(manifest) and proposal is not None and \
        proposal != (manifest.get("temperatures") or [1.0])[0]


# the per-entry arrays of a ragged sampled shard (their first dimension is the shard's entries)
ENTRY_ARRAYS = ("indices", "counts", "weights")


def row_arrays(layout: str, dtype: str, num_classes: int, k: Optional[int],
               num_temperatures: int = 1, version: int = FORMAT_VERSION,
               weighted: bool = False) -> Dict[str, tuple]:
    """``{array name: (numpy dtype, per-row shape)}`` of the teacher arrays of a layout
    (``k`` = top-k or number of draws; ``num_temperatures`` = lse columns of a top-k row).
    A ragged sampled layout's ``indices`` and ``counts`` / ``weights`` (``weighted``) are per
    entry, not per row (:data:`ENTRY_ARRAYS`); their shape per entry is ``()``."""
    if layout in DENSE_ARRAY:
        return {DENSE_ARRAY[layout]: (STORAGE_DTYPES[dtype], (num_classes,))}
    if layout == "topk":
        return {"values": (STORAGE_DTYPES[dtype], (k,)),
                "indices": (index_dtype(num_classes, version), (k,)),
                "lse": (LSE_DTYPE, () if version == 1 else (num_temperatures,))}
    if layout == "sampled" and version >= 3:
        width_dtype = count_dtype(sampled_width(k, num_classes))
        return {"distinct": (width_dtype, ()),
                "indices": (index_dtype(num_classes, version), ()),
                **({"weights": (WEIGHT_DTYPE, ())} if weighted else
                   {"counts": (count_dtype(k), ())})}
    if layout == "sampled" and version == 2:
        width = sampled_width(k, num_classes)
        return {"indices": (index_dtype(num_classes, version), (width,)),
                "counts": (count_dtype(k), (width,))}
    raise CacheError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def manifest_k(manifest: dict) -> Optional[int]:
    """K of a sparse cache (top-k or draws per row), None for dense rows."""
    field = SPARSE_K_FIELD.get(manifest["layout"])
    return manifest.get(field) if field else None


def manifest_row_arrays(manifest: dict) -> Dict[str, tuple]:
    """:func:`row_arrays` of a (progress or finished) manifest of any readable version."""
    return row_arrays(manifest["layout"], manifest["dtype"], manifest["num_classes"] or 0,
                      manifest_k(manifest), len(manifest.get("temperatures") or [1.0]),
                      manifest.get("format_version", FORMAT_VERSION), is_weighted(manifest))


def entry_array_names(manifest: dict) -> List[str]:
    """The arrays of ``manifest``'s shards indexed by entry, not by row (ragged sampled only)."""
    arrays = manifest_row_arrays(manifest) if is_ragged(manifest) else {}
    return [name for name in arrays if name in ENTRY_ARRAYS]


def max_row_bytes(manifest: dict) -> int:
    """The most bytes one row's teacher arrays can take: a ragged row holds at most
    ``min(k, V)`` entries."""
    arrays = manifest_row_arrays(manifest)
    if not is_ragged(manifest):
        return arrays_row_bytes(arrays)
    width = sampled_width(manifest_k(manifest), manifest["num_classes"] or 0)
    return sum(np_dtype.itemsize * (width if name in ENTRY_ARRAYS else 1)
               for name, (np_dtype, _) in arrays.items())


def mean_distinct(manifest: dict) -> Optional[float]:
    """Mean distinct ids per row of a ragged sampled cache (over the rows written so far)."""
    if not is_ragged(manifest):
        return None
    rows = sum(shard["row_stop"] - shard["row_start"] for shard in manifest["shards"])
    return sum(shard["entries"] for shard in manifest["shards"]) / max(rows, 1)


def label_dtype(version: int = FORMAT_VERSION) -> np.dtype:
    return V1_LABEL_DTYPE if version == 1 else LABEL_DTYPE


def bytes_per_row(manifest: dict) -> Dict[str, float]:
    """``{"teacher", "labels", "files"}``: bytes per row of the teacher arrays, of the labels
    (per-sample labels spread over the rows; both copies in version 1) and of every listed file
    (``.npy`` headers, lengths, offsets included) divided by the rows written so far."""
    rows = sum(shard["row_stop"] - shard["row_start"] for shard in manifest["shards"])
    samples = sum(shard["sample_stop"] - shard["sample_start"] for shard in manifest["shards"])
    labels = 0.0
    if manifest["labels_per"] is not None:
        per_row = 1.0 if manifest["labels_per"] == "row" else samples / max(rows, 1)
        copies = 2 if manifest["format_version"] == 1 else 1  # v1: in shards and labels.npy
        labels = label_dtype(manifest["format_version"]).itemsize * per_row * copies
    files = sum(entry["bytes"] for entry in manifest_files(manifest)) / max(rows, 1)
    if is_ragged(manifest):   # the teacher arrays' data (no headers) over the rows
        arrays = manifest_row_arrays(manifest)
        teacher = sum(arrays[name][0].itemsize * shard["files"][name]["shape"][0]
                      for shard in manifest["shards"] for name in arrays) / max(rows, 1)
    else:
        teacher = arrays_row_bytes(manifest_row_arrays(manifest))
    return {"teacher": teacher, "labels": labels, "files": files}


def describe_layout(manifest: dict) -> str:
    """``dense``, ``features``, ``top-<k>`` or ``sample-<k>``: the layout as people read it."""
    prefix = {"topk": "top", "sampled": "sample"}.get(manifest["layout"])
    return f"{prefix}-{manifest_k(manifest)}" if prefix else manifest["layout"]


def arrays_row_bytes(arrays: Dict[str, tuple]) -> int:
    """Bytes one row takes in the arrays :func:`row_arrays` describes."""
    return sum(np_dtype.itemsize * int(np.prod(shape)) for np_dtype, shape in arrays.values())


def rows_per_shard(manifest: dict) -> int:
    """Rows per shard from the shard size and the row's bytes (the most a ragged row can take,
    so a shard never exceeds the size). Shard boundaries depend only on the manifest's settings
    and V, so a resumed run cuts identically."""
    return max(1, int(manifest["shard_size_mb"] * 2 ** 20) // max_row_bytes(manifest))


def _manifest_checksum(manifest: dict) -> str:
    body = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(directory: str, manifest: dict, name: str = MANIFEST_NAME) -> None:
    """Atomically replace ``directory/name`` with ``manifest`` (plus its own checksum)."""
    manifest = dict(manifest, manifest_sha256=_manifest_checksum(manifest))
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    write_atomic(os.path.join(directory, name), lambda handle: handle.write(text.encode()))
    fsync_directory(directory)


def parse_manifest_file(directory: str, name: str = MANIFEST_NAME):
    """``(manifest, identity)``: the JSON object in ``directory/name``, unchecked beyond being a
    JSON object with this format's name (:class:`CacheError` naming the file otherwise), and
    the :func:`file_identity` of the file it read."""
    path = os.path.join(directory, name)
    if not os.path.isdir(directory):
        raise CacheError(f"cache directory {directory} does not exist")
    if not os.path.lexists(path):
        raise CacheError(f"{path} not found: {directory} is not a fastkd cache "
                         f"(or caching never finished a shard)")
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode):
            raise CacheError(f"{path} is not a regular file (symbolic links are refused)")
        with open_cache_file(path) as handle:   # a link swapped in since the lstat is refused
            identity = file_identity(os.fstat(handle.fileno()))
            if identity[2] > MAX_MANIFEST_BYTES:
                raise CacheError(f"{path} is {identity[2]} bytes, far too large for a cache "
                                 f"manifest; it is not one")
            manifest = json.loads(handle.read().decode("utf-8"))
    except OSError as error:
        raise CacheError(f"cannot read {path}: {error.strerror or error}") from None
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError
        what = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise CacheError(f"{path} is not valid JSON ({what}); it is not a fastkd cache "
                         f"manifest or it is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CacheError(f"{path} is not a {FORMAT_NAME} manifest")
    return manifest, identity


def read_manifest(directory: str, name: str = MANIFEST_NAME) -> dict:
    """Load and self-check a manifest: JSON, format and version, its own checksum and every
    field (:func:`validate_manifest`); :class:`CacheError` naming the file on any problem."""
    return read_manifest_and_identity(directory, name)[0]


def read_manifest_and_identity(directory: str, name: str = MANIFEST_NAME):
    """``(manifest, identity)``: :func:`read_manifest` and the :func:`file_identity` of the
    manifest file it read (what a reader compares later to tell that the cache was rewritten)."""
    path = os.path.join(directory, name)
    manifest, identity = parse_manifest_file(directory, name)
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise CacheError(f"{path} has format version {manifest.get('format_version')!r}; this "
                         f"fastkd reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    try:
        checksum = _manifest_checksum(manifest)
    except (TypeError, ValueError, RecursionError):
        checksum = None
    if manifest.get("manifest_sha256") != checksum:
        raise CacheError(f"{path} was modified after it was written (its manifest_sha256 does "
                         f"not match its contents)")
    validate_manifest(manifest, path)
    return manifest, identity


# ----------------------------------------------------------------------------- checks
def manifest_files(manifest: dict) -> List[dict]:
    """Every file entry the manifest lists (shard arrays, offsets, labels)."""
    entries = [entry for shard in manifest["shards"] for entry in shard["files"].values()]
    entries += [manifest[key] for key in ("offsets", "labels") if manifest.get(key)]
    return entries


def check_structure(manifest: dict, where: str) -> None:
    """Row/sample ranges contiguous and adding up; shapes agree with ranges."""
    expected_arrays = set(entry_arrays(manifest))
    per_entry = set(entry_array_names(manifest))
    sample, row = 0, 0
    for number, shard in enumerate(manifest["shards"]):
        if set(shard["files"]) != expected_arrays:
            raise CacheError(f"{where}: shard {number} lists arrays {sorted(shard['files'])}; "
                             f"expected {sorted(expected_arrays)}")
        name = next(iter(shard["files"].values()))["file"]
        if shard["sample_start"] != sample or shard["row_start"] != row:
            raise CacheError(f"{where}: shard {name} starts at sample {shard['sample_start']}, "
                             f"row {shard['row_start']}; expected sample {sample}, row {row}")
        rows = shard["row_stop"] - shard["row_start"]
        for array, entry in shard["files"].items():
            if array in ("lengths",) or (array == "labels" and manifest["labels_per"] == "sample"):
                expected, what = shard["sample_stop"] - shard["sample_start"], "rows"
            elif array in per_entry:
                expected, what = shard["entries"], "entries (the shard's 'entries')"
            else:
                expected, what = rows, "rows"
            if not entry["shape"] or entry["shape"][0] != expected:
                raise CacheError(f"{where}: {entry['file']} has shape {entry['shape']}; expected "
                                 f"{expected} {what}")
        sample, row = shard["sample_stop"], shard["row_stop"]
    if manifest.get("status") == "complete" and (sample, row) != (manifest["num_samples"],
                                                                  manifest["num_rows"]):
        raise CacheError(f"{where}: shards cover {sample} samples / {row} rows but the manifest "
                         f"says {manifest['num_samples']} / {manifest['num_rows']}")


def is_int(value, minimum: int = 0) -> bool:
    """An int (not a bool) ``>= minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def is_positive(value) -> bool:
    """A positive finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < np.inf


def _shown(manifest: dict, key: str) -> str:
    """A field's value for an error message: its JSON text, or ``missing``."""
    return json.dumps(manifest[key]) if key in manifest else "missing"


def _expect(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise CacheError(f"{where}: {message}")


def _check_entry(entry, where: str, dtype: np.dtype, row_shape: tuple) -> None:
    _expect(isinstance(entry, dict), where, f"file entry {entry!r} is not an object")
    check_file_name(entry.get("file"), where)
    name = entry["file"]
    _expect(is_int(entry.get("bytes")), where, f"{name}: 'bytes' must be an integer >= 0")
    _expect(isinstance(entry.get("sha256"), str) and
            SHA256_HEX.fullmatch(entry["sha256"]) is not None, where,
            f"{name}: 'sha256' must be 64 lowercase hex digits")
    _expect(entry.get("dtype") == dtype.str, where,
            f"{name}: dtype {entry.get('dtype')!r}; this array is stored as {dtype.str!r}")
    shape = entry.get("shape")
    _expect(isinstance(shape, list) and len(shape) == 1 + len(row_shape) and
            all(is_int(size) for size in shape) and tuple(shape[1:]) == row_shape, where,
            f"{name}: shape {shape!r}; expected [rows{''.join(f', {n}' for n in row_shape)}]")


def entry_arrays(manifest: dict) -> Dict[str, tuple]:
    """``{array name: (numpy dtype, per-row shape)}`` of every array a shard of ``manifest``
    holds (the layout's arrays plus ``labels`` and ``lengths`` where present)."""
    arrays = dict(manifest_row_arrays(manifest))
    if manifest["labels_per"]:
        arrays["labels"] = (label_dtype(manifest["format_version"]), ())
    if manifest["rows_per_sample"] == "variable":
        arrays["lengths"] = (LENGTH_DTYPE, ())
    return arrays


def validate_manifest(manifest: dict, where: str) -> None:
    """Types and values of every field the reader, the writer and ``fastkd info`` use, so an
    edited or hostile manifest fails here with a sentence instead of deep inside them."""
    _expect(manifest.get("status") in ("complete", "incomplete"), where,
            f"status {manifest.get('status')!r}; expected 'complete' or 'incomplete'")
    _expect(isinstance(manifest.get("dtype"), str) and manifest["dtype"] in STORAGE_DTYPES, where,
            f"dtype {manifest.get('dtype')!r}; expected one of {sorted(STORAGE_DTYPES)}")
    _expect(manifest.get("layout") in LAYOUTS, where,
            f"layout {manifest.get('layout')!r}; expected one of {list(LAYOUTS)}")
    _expect(manifest["layout"] != "sampled" or manifest["format_version"] >= 2, where,
            "the sampled layout needs format version 2")
    for layout, field in SPARSE_K_FIELD.items():
        value = manifest.get(field)
        _expect(is_int(value, 1) if manifest["layout"] == layout else value is None, where,
                f"{field} {value!r} does not fit layout {manifest['layout']!r}")
    temperatures = manifest.get("temperatures")
    _expect(temperatures is None or (
        isinstance(temperatures, list) and temperatures and all(map(is_positive, temperatures))),
        where, f"temperatures {temperatures!r}; expected null or a list of positive numbers")
    proposal = manifest.get("proposal_temperature")
    if manifest["layout"] == "sampled":   # the reader returns targets for that one temperature
        _expect(temperatures is not None and len(temperatures) == 1, where,
                f"temperatures {temperatures!r}; a sampled cache needs one target temperature "
                f"(the one its rows are a target for)")
        _expect(is_int(manifest.get("seed")), where, f"seed {_shown(manifest, 'seed')}; a "
                f"sampled cache records the integer >= 0 that seeded its draws")
    if is_ragged(manifest):
        _expect(is_positive(proposal), where, f"a sampled cache needs a positive proposal_"
                f"temperature; found proposal_temperature {proposal!r}")
    else:
        _expect(proposal is None, where, f"proposal_temperature {proposal!r} applies to sampled "
                f"caches of format version 3 only")
    # descriptive fields: `fastkd info` prints them ("unknown" when absent or null)
    for key in ("created", "fastkd_version"):
        _expect(manifest.get(key) is None or isinstance(manifest[key], str), where,
                f"'{key}' {manifest.get(key)!r}; expected a string")
    _expect(manifest.get("clamped_values") is None or is_int(manifest["clamped_values"]), where,
            f"'clamped_values' {manifest.get('clamped_values')!r}; expected an integer >= 0")
    for key in ("teacher", "dataset"):
        _expect(isinstance(manifest.get(key), dict), where, f"'{key}' must be an object")
        for name in ("spec", "class"):
            value = manifest[key].get(name)
            _expect(value is None or isinstance(value, str), where,
                    f"{key} {name} {value!r}; expected a string or null")
    _expect(isinstance(manifest["teacher"].get("fingerprint"), str), where,
            "teacher fingerprint must be a string")
    fingerprint = manifest["dataset"].get("fingerprint")
    _expect(isinstance(fingerprint, dict) and is_int(fingerprint.get("length")) and
            isinstance(fingerprint.get("sha256"), str), where,
            "dataset fingerprint must be {length, sha256, ...}")
    size = manifest.get("shard_size_mb")
    _expect(isinstance(size, (int, float)) and not isinstance(size, bool) and size > 0, where,
            "'shard_size_mb' must be positive")
    for key in ("batch_size", "world_size"):
        _expect(is_int(manifest.get(key), 1), where, f"'{key}' must be an integer >= 1")
    # present in every manifest (null until the first shard): the code reads them as
    # manifest[key], so a missing one is refused here rather than raising KeyError there
    for key, allowed in (("rows_per_sample", (None, 1, "variable")),
                         ("labels_per", (None, "sample", "row"))):
        _expect(key in manifest and not isinstance(manifest[key], bool) and
                manifest[key] in allowed, where, f"{key} {_shown(manifest, key)}; expected "
                f"one of {', '.join(map(json.dumps, allowed))}")
    for key in ("num_classes", "rows_per_shard"):
        _expect(key in manifest and (manifest[key] is None or is_int(manifest[key], 1)), where,
                f"'{key}' must be null or an integer >= 1 (found {_shown(manifest, key)})")
    shards = manifest.get("shards")
    _expect(isinstance(shards, list), where, "'shards' must be a list")
    complete = manifest["status"] == "complete"
    if complete:
        for key in ("num_samples", "num_rows"):
            _expect(is_int(manifest.get(key)), where, f"'{key}' must be an integer >= 0")
    else:
        sample_range = manifest.get("sample_range")
        _expect(isinstance(sample_range, list) and len(sample_range) == 2 and
                all(is_int(value) for value in sample_range), where,
                "'sample_range' must be [start, stop]")
    if shards or complete:
        _expect(manifest["num_classes"] is not None and manifest["rows_per_sample"] is not None,
                where, "num_classes and rows_per_sample must be set once shards exist")
    arrays = entry_arrays(manifest) if manifest["num_classes"] is not None else {}
    for number, shard in enumerate(shards):
        here = f"{where}: shard {number}"
        _expect(isinstance(shard, dict), here, "is not an object")
        for key in ("index", "rank", "sample_start", "sample_stop", "row_start", "row_stop",
                    "clamped") + (("entries",) if is_ragged(manifest) else ()):
            _expect(is_int(shard.get(key)), here, f"'{key}' must be an integer >= 0")
        _expect(shard["sample_start"] < shard["sample_stop"] and
                shard["row_start"] <= shard["row_stop"], here, "has an empty or reversed range")
        files = shard.get("files")
        if not (isinstance(files, dict) and set(files) == set(arrays)):
            raise CacheError(f"{here} lists arrays "
                             f"{sorted(files) if isinstance(files, dict) else files!r}; "
                             f"expected {sorted(arrays)}")
        for array, (dtype, row_shape) in arrays.items():
            _check_entry(files[array], here, dtype, row_shape)
    for key, dtype in (("offsets", LENGTH_DTYPE), ("labels", V1_LABEL_DTYPE)):
        entry = manifest.get(key)
        if entry is not None:
            _expect(complete, where, f"'{key}' is set on an incomplete cache")
            _check_entry(entry, f"{where}: {key}", dtype, ())
    if complete:
        _expect((manifest.get("offsets") is not None) == (manifest["rows_per_sample"] ==
                                                          "variable"), where,
                "'offsets' must be present exactly for variable-length caches")
        has_labels_file = manifest["labels_per"] is not None and manifest["format_version"] == 1
        _expect((manifest.get("labels") is not None) == has_labels_file, where,
                "'labels' must be present exactly when labels_per is set (version 1; version 2 "
                "keeps labels in the shards only)")
    names = [entry["file"] for entry in manifest_files(manifest)]
    _expect(len(set(names)) == len(names), where, "lists the same file twice")
