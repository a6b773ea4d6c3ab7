"""The on-disk cache format. This is the only module that knows file names, array layouts and
the manifest's fields; the writer, the reader and the CLI go through it. See docs/cache-format.md.

A cache is a directory::

    manifest.json                      the index (written last-complete-shard-at-a-time, atomically)
    shard-<rank>-<index>.<array>.npy   one .npy file per array per shard
    offsets.npy                        (num_samples + 1,) int64 row offsets, variable-length only
    labels.npy                         dataset labels, when the dataset has them

Arrays per layout (``R`` = rows of the shard, ``V`` = classes, ``k`` = top-k):

- ``dense``: ``logits`` ``(R, V)`` in the cache dtype (bf16 is stored as its uint16 bit pattern,
  because numpy has no bfloat16).
- ``features``: ``features`` ``(R, D)`` in the cache dtype: intermediate teacher features
  (e.g. through ``fastkd.features.TeacherFeatures``) for feature distillation; ``num_classes``
  holds ``D``.
- ``topk``: ``values`` ``(R, k)`` (cache dtype, largest first), ``indices`` ``(R, k)`` int32 and
  ``lse`` ``(R,)`` float32, the log-sum-exp of the full teacher row.

Every shard also carries ``labels`` (per sample or per row) when the dataset has labels and
``lengths`` (rows per sample, int64) when items are variable-length.
"""
import hashlib
import json
import os
from typing import Dict, Iterable, List, Optional

import numpy as np

FORMAT_NAME = "fastkd-logit-cache"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
OFFSETS_NAME = "offsets.npy"
LABELS_NAME = "labels.npy"
TMP_SUFFIX = ".tmp"

# cache dtype name -> (numpy storage dtype, bytes per element)
STORAGE_DTYPES = {"fp16": np.dtype("<f2"), "bf16": np.dtype("<u2"), "fp32": np.dtype("<f4")}
# largest finite magnitude of each cache dtype (values beyond it would become inf)
DTYPE_MAX = {"fp16": 65504.0, "bf16": 3.3895313892515355e38, "fp32": 3.4028234663852886e38}
LAYOUTS = ("dense", "topk", "features")
# the one array of the layouts that store whole rows
DENSE_ARRAY = {"dense": "logits", "features": "features"}
INDEX_DTYPE = np.dtype("<i4")
LSE_DTYPE = np.dtype("<f4")
LABEL_DTYPE = np.dtype("<i8")
LENGTH_DTYPE = np.dtype("<i8")
HASH_CHUNK = 1 << 22


class CacheError(ValueError):
    """A cache directory is missing, incomplete, corrupt or does not match what was asked."""


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


def other_world_progress_files(names: Iterable[str], world_size: int) -> List[str]:
    """Progress manifests left by a run with a different number of processes."""
    return [name for name in names if name.startswith("manifest.rank") and
            name.endswith(".json") and not name.endswith(f"-of-{world_size}.json")]


def row_arrays(layout: str, dtype: str, num_classes: int, top_k: Optional[int]) -> Dict[str, tuple]:
    """``{array name: (numpy dtype, per-row shape)}`` of the teacher arrays of a layout."""
    if layout in DENSE_ARRAY:
        return {DENSE_ARRAY[layout]: (STORAGE_DTYPES[dtype], (num_classes,))}
    if layout == "topk":
        return {"values": (STORAGE_DTYPES[dtype], (top_k,)), "indices": (INDEX_DTYPE, (top_k,)),
                "lse": (LSE_DTYPE, ())}
    raise CacheError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def describe_layout(manifest: dict) -> str:
    """``dense``, ``features`` or ``top-<k>``: the layout as people read it."""
    return f"top-{manifest['top_k']}" if manifest["layout"] == "topk" else manifest["layout"]


def row_bytes(layout: str, dtype: str, num_classes: int, top_k: Optional[int]) -> int:
    return sum(np_dtype.itemsize * int(np.prod(shape))
               for np_dtype, shape in row_arrays(layout, dtype, num_classes, top_k).values())


def rows_per_shard(shard_size_mb: float, layout: str, dtype: str, num_classes: int,
                   top_k: Optional[int]) -> int:
    """Shard boundaries depend only on these arguments, so a resumed run cuts identically."""
    return max(1, int(shard_size_mb * 2 ** 20) // row_bytes(layout, dtype, num_classes, top_k))


# ----------------------------------------------------------------------------- atomic writes
class _HashingFile:
    """File wrapper that feeds every written byte to sha256 (checksums without a re-read)."""

    def __init__(self, handle):
        self.handle = handle
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.sha256.update(view)
        self.size += view.nbytes
        return self.handle.write(view)


def fsync_directory(directory: str) -> None:
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_npy_atomic(directory: str, name: str, array: np.ndarray) -> dict:
    """Write ``array`` as ``directory/name`` (.npy) via temp file, fsync and rename.

    Returns the file's manifest entry ``{"file", "bytes", "sha256", "dtype", "shape"}``.
    The caller fsyncs the directory once after renaming a batch of files.
    """
    path = os.path.join(directory, name)
    tmp_path = path + TMP_SUFFIX
    array = np.ascontiguousarray(array)
    with open(tmp_path, "wb") as handle:
        hashing = _HashingFile(handle)
        np.lib.format.write_array(hashing, array, allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp_path, path)
    return {"file": name, "bytes": hashing.size, "sha256": hashing.sha256.hexdigest(),
            "dtype": array.dtype.str, "shape": list(array.shape)}


def _manifest_checksum(manifest: dict) -> str:
    body = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(directory: str, manifest: dict, name: str = MANIFEST_NAME) -> None:
    """Atomically replace ``directory/name`` with ``manifest`` (plus its own checksum)."""
    manifest = dict(manifest, manifest_sha256=_manifest_checksum(manifest))
    path = os.path.join(directory, name)
    tmp_path = path + TMP_SUFFIX
    with open(tmp_path, "w") as handle:
        json.dump(manifest, handle, indent=1, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp_path, path)
    fsync_directory(directory)


def read_manifest(directory: str, name: str = MANIFEST_NAME) -> dict:
    """Load and self-check a manifest; raises :class:`CacheError` naming the file on any problem."""
    path = os.path.join(directory, name)
    if not os.path.isdir(directory):
        raise CacheError(f"cache directory {directory} does not exist")
    if not os.path.exists(path):
        raise CacheError(f"{path} not found: {directory} is not a fastkd cache "
                         f"(or caching never finished a shard)")
    try:
        with open(path) as handle:
            manifest = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise CacheError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CacheError(f"{path} is not a {FORMAT_NAME} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{path} has format version {manifest.get('format_version')}; this "
                         f"fastkd reads version {FORMAT_VERSION}")
    if manifest.get("manifest_sha256") != _manifest_checksum(manifest):
        raise CacheError(f"{path} was modified after it was written (its manifest_sha256 does "
                         f"not match its contents)")
    return manifest


# ----------------------------------------------------------------------------- checks
def manifest_files(manifest: dict) -> List[dict]:
    """Every file entry the manifest lists (shard arrays, offsets, labels)."""
    entries = [entry for shard in manifest["shards"] for entry in shard["files"].values()]
    entries += [manifest[key] for key in ("offsets", "labels") if manifest.get(key)]
    return entries


def check_structure(manifest: dict, where: str) -> None:
    """Row/sample ranges contiguous and adding up; shapes agree with ranges."""
    expected_arrays = set(row_arrays(manifest["layout"], manifest["dtype"],
                                     manifest["num_classes"] or 0, manifest["top_k"]))
    expected_arrays |= {"labels"} if manifest["labels_per"] else set()
    expected_arrays |= {"lengths"} if manifest["rows_per_sample"] == "variable" else set()
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
                expected = shard["sample_stop"] - shard["sample_start"]
            else:
                expected = rows
            if not entry["shape"] or entry["shape"][0] != expected:
                raise CacheError(f"{where}: {entry['file']} has shape {entry['shape']}; expected "
                                 f"{expected} rows")
        sample, row = shard["sample_stop"], shard["row_stop"]
    if manifest.get("status") == "complete" and (sample, row) != (manifest["num_samples"],
                                                                  manifest["num_rows"]):
        raise CacheError(f"{where}: shards cover {sample} samples / {row} rows but the manifest "
                         f"says {manifest['num_samples']} / {manifest['num_rows']}")


def _size_problem(directory: str, entry: dict) -> Optional[str]:
    path = os.path.join(directory, entry["file"])
    try:
        size = os.path.getsize(path)
    except OSError:
        return f"{path}: missing"
    if size != entry["bytes"]:
        return (f"{path}: {size} bytes on disk, manifest says {entry['bytes']} "
                f"({'truncated' if size < entry['bytes'] else 'grown'})")
    return None


def check_sizes(directory: str, entries: Iterable[dict]) -> List[str]:
    """Problems (one line each, naming the file) with missing or wrongly sized files."""
    return [problem for problem in (_size_problem(directory, entry) for entry in entries)
            if problem]


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_checksums(directory: str, entries: Iterable[dict]) -> List[str]:
    """Problems with missing, wrongly sized or altered files (sha256 differs from the manifest)."""
    problems = []
    for entry in entries:
        path = os.path.join(directory, entry["file"])
        problem = _size_problem(directory, entry)
        if problem is None and file_sha256(path) != entry["sha256"]:
            problem = f"{path}: sha256 differs from the manifest (file altered or corrupt)"
        if problem:
            problems.append(problem)
    return problems


def load_array(directory: str, entry: dict, mmap_mode: Optional[str] = "r") -> np.ndarray:
    """Memory-map one listed .npy file, checking its dtype and shape against the manifest."""
    path = os.path.join(directory, entry["file"])
    array = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    if array.dtype.str != entry["dtype"] or list(array.shape) != entry["shape"]:
        raise CacheError(f"{path}: holds {array.dtype.str} {list(array.shape)}, manifest says "
                         f"{entry['dtype']} {entry['shape']}")
    return array
