"""``fastkd export --to parquet``: one parquet row per cache sample, in sample order, with the
sample's teacher rows as lists of rows: ``sample``; top-k ``indices``, ``values`` (exact) and
``lse`` (one per cached temperature); sampled ``indices`` with ``counts`` or ``weights`` (no
weight-0 padding); dense ``logits`` / ``features``; ``labels`` (per row) or ``label``. The schema
metadata key ``fastkd`` holds the layout, settings, manifest sha256 and sample range as JSON.

``--out FILE.parquet`` writes one file, any other ``--out`` a directory of
``part-NNNNN.parquet`` files. Files are renamed into place when complete; a directory export
resumes after its last complete part. The cache is verified first.
"""
import json
import os

import numpy as np

from fastkd.cache import outdir

EXPORT_FORMAT = "fastkd-parquet-export"
EXPORT_VERSION = 1
CHUNK_ROWS = 8192  # teacher rows read and written at a time (bounds memory)
DEFAULT_SAMPLES_PER_FILE = 100_000
FEATURE = "fastkd export --to parquet"


class ExportError(ValueError):
    """An export that cannot be done (message names the path)."""


def _modules():
    from fastkd.extras import require
    return require("pyarrow", "hf", FEATURE), require("pyarrow.parquet", "hf", FEATURE)


def _nested(pa, flat, sample_offsets, keep=None):
    """``(R, W)`` numpy (only the entries where ``keep``) -> list<list<...>> per sample."""
    row_offsets = np.zeros(len(flat) + 1, np.int64)
    np.cumsum(np.full(len(flat), flat.shape[1]) if keep is None else keep.sum(1),
              out=row_offsets[1:])
    inner = pa.ListArray.from_arrays(pa.array(row_offsets, pa.int32()),
                                     pa.array(flat.reshape(-1) if keep is None else flat[keep]))
    return pa.ListArray.from_arrays(pa.array(sample_offsets, pa.int32()), inner)


class ExportRows:
    """Reads a cache's samples as columns (all lse columns of a top-k cache)."""

    def __init__(self, path: str):
        from fastkd.cache.reader import LogitCache
        self.cache = LogitCache(path)
        self.cache.verify()
        manifest = self.cache.manifest
        self.layout, self.manifest = self.cache.layout, manifest
        self.temperatures = self.cache.temperatures
        self.per_temperature = [self.cache] + [LogitCache(path, temperature=t)
                                               for t in (self.temperatures or [])[1:]] \
            if self.layout == "topk" else [self.cache]
        offsets = self.cache.offsets
        self.offsets = offsets.numpy() if offsets is not None else \
            np.arange(len(self.cache) + 1)
        self.labels = self.cache.labels
        self.labels = None if self.labels is None else self.labels.numpy()

    def metadata(self, start: int, stop: int) -> bytes:
        manifest = self.manifest
        return json.dumps({
            "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "layout": self.layout,
            "num_classes": manifest["num_classes"], "top_k": manifest.get("top_k"),
            "sample": manifest.get("sample"), "temperatures": self.temperatures,
            "dtype": manifest["dtype"], "labels_per": manifest["labels_per"],
            "cache_manifest_sha256": manifest.get("manifest_sha256"),
            "samples": [start, stop], "num_samples": len(self.cache)}).encode()

    def table(self, pa, start: int, stop: int):
        """Samples ``[start, stop)`` as a pyarrow Table."""
        first, last = int(self.offsets[start]), int(self.offsets[stop])
        sample_offsets = (self.offsets[start:stop + 1] - first).astype(np.int64)
        columns = {"sample": pa.array(np.arange(start, stop, dtype=np.int64))}
        rows = self.cache.rows(first, last)
        if self.layout == "topk":
            columns["indices"] = _nested(pa, rows.indices.numpy().astype(np.int32),
                                         sample_offsets)
            columns["values"] = _nested(pa, rows.values.float().numpy(), sample_offsets)
            lse = np.stack([cache.rows(first, last).lse.float().numpy()
                            for cache in self.per_temperature], axis=-1)
            columns["lse"] = _nested(pa, lse.astype(np.float32), sample_offsets)
        elif self.layout == "sampled":
            weights = rows.counts.numpy()
            keep = weights > 0   # reads pad rows with weight-0 entries
            columns["indices"] = _nested(pa, rows.indices.numpy().astype(np.int32),
                                         sample_offsets, keep)
            name, dtype = ("weights", np.float32) if weights.dtype.kind == "f" else \
                ("counts", np.int32)
            columns[name] = _nested(pa, weights.astype(dtype), sample_offsets, keep)
        else:
            name = "logits" if self.layout == "dense" else "features"
            columns[name] = _nested(pa, rows.float().numpy(), sample_offsets)
        if self.labels is not None:
            if self.manifest["labels_per"] == "row":
                columns["labels"] = pa.ListArray.from_arrays(
                    pa.array(sample_offsets, pa.int32()),
                    pa.array(self.labels[first:last].astype(np.int32)))
            else:
                columns["label"] = pa.array(self.labels[start:stop].astype(np.int64))
        return pa.table(columns)

    def chunks(self, start: int, stop: int):
        """Sample ranges of about CHUNK_ROWS rows (at least one sample each)."""
        sample = start
        while sample < stop:
            end = sample + 1
            while end < stop and self.offsets[end + 1] - self.offsets[sample] <= CHUNK_ROWS:
                end += 1
            yield sample, end
            sample = end


def _temp_name(path: str) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}")


def _write_file(rows: ExportRows, path: str, start: int, stop: int) -> None:
    """Samples ``[start, stop)`` as the parquet file ``path``, written under a temp name and
    renamed into place; a write that fails (no space, no permission) is an ExportError naming
    ``path``."""
    try:
        _write_parquet(rows, path, start, stop)
    except OSError as error:   # pyarrow's IO errors are OSErrors naming the temp file
        detail = str(error).rpartition("Detail: ")[2] or str(error)
        raise ExportError(f"writing {path} failed: {detail.strip()}") from None


def _write_parquet(rows: ExportRows, path: str, start: int, stop: int) -> None:
    pa, pq = _modules()
    temp = _temp_name(path)
    writer = None
    try:
        for low, high in rows.chunks(start, stop):
            table = rows.table(pa, low, high)
            if writer is None:
                schema = table.schema.with_metadata({b"fastkd": rows.metadata(start, stop)})
                writer = pq.ParquetWriter(temp, schema)
            writer.write_table(table.replace_schema_metadata(schema.metadata))
        if writer is None:  # an empty range: an empty file with the columns
            table = rows.table(pa, start, start)
            writer = pq.ParquetWriter(temp, table.schema.with_metadata(
                {b"fastkd": rows.metadata(start, stop)}))
        writer.close()
        writer = None
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        if writer is not None:
            writer.close()
        if os.path.exists(temp):
            os.remove(temp)


def _part_matches(path: str, rows: ExportRows, start: int, stop: int) -> bool:
    _, pq = _modules()
    try:
        meta = pq.read_schema(path).metadata or {}
        info = json.loads(meta.get(b"fastkd", b"{}"))
        return (info.get("cache_manifest_sha256") == rows.manifest.get("manifest_sha256") and
                info.get("samples") == [start, stop] and
                pq.ParquetFile(path).metadata.num_rows == stop - start)
    except Exception:  # unreadable or foreign: not a finished part of this export
        return False


def export_parquet(cache_dir, out, *, samples_per_file: int = DEFAULT_SAMPLES_PER_FILE,
                   overwrite: bool = False, progress: bool = True) -> list:
    """Write cache ``cache_dir`` as parquet at ``out``; returns the written (or kept) paths."""
    from fastkd.cache.manifest import CacheError
    cache_dir, out = os.fspath(cache_dir), os.fspath(out)
    if isinstance(samples_per_file, bool) or not isinstance(samples_per_file, int) or \
            samples_per_file < 1:
        raise ExportError(f"--samples-per-file must be an int >= 1, got {samples_per_file!r}")
    _modules()
    if not os.path.isdir(cache_dir):
        raise CacheError(f"{cache_dir}: no such cache directory")
    rows = ExportRows(cache_dir)
    total = len(rows.cache)
    if out.lower().endswith(".parquet"):
        if os.path.isdir(out):
            raise ExportError(f"--out {out} is a directory; name a .parquet file")
        if os.path.exists(out) and not overwrite:
            raise ExportError(f"--out {out} exists; pass --overwrite to replace it")
        parent = os.path.dirname(out) or "."
        if not os.path.isdir(parent):
            raise ExportError(f"--out {out}: its directory {parent} does not exist")
        _write_file(rows, out, 0, total)
        return [out]
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ExportError(f"--out {out} is a file; name a .parquet file, or a directory for "
                          f"the parts")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as error:
        raise ExportError(f"--out {out}: cannot create the directory "
                          f"({error.strerror or error})") from None
    ranges = [(start, min(start + samples_per_file, total))
              for start in range(0, max(total, 1), samples_per_file)]
    names = [f"part-{number:05d}.parquet" for number in range(len(ranges))]
    foreign = [name for name in os.listdir(out) if not (
        name.startswith("part-") and name.endswith(".parquet")) and not name.startswith(".part-")]
    if foreign:
        raise ExportError(f"--out {out} holds files that are not parts of an export "
                          f"({foreign[0]}); choose an empty directory")
    from tqdm.auto import tqdm
    written = []
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if os.path.isdir(path) or os.path.islink(path):
            raise ExportError(f"{path} is a {'link' if os.path.islink(path) else 'directory'}, "
                              f"not part of an export; choose an empty directory")
        if name.startswith(".part-") or overwrite:  # a killed export's temp file, --overwrite
            os.remove(path)
        elif name not in names:
            raise ExportError(f"{path} is not part of this cache's export (another cache or "
                              f"--samples-per-file); pass --overwrite to replace it")
    with tqdm(total=total, unit="sample", disable=not progress, desc="fastkd export",
              delay=outdir.PROGRESS_DELAY_S) as bar:
        for (start, stop), name in zip(ranges, names):
            path = os.path.join(out, name)
            if os.path.exists(path) and not _part_matches(path, rows, start, stop):
                raise ExportError(f"{path} is not part of this cache's export (another cache or "
                                  f"--samples-per-file); pass --overwrite to replace it")
            if not os.path.exists(path):
                _write_file(rows, path, start, stop)
            written.append(path)
            bar.update(stop - start)
    return written


def add_parser(subparsers) -> None:
    export = subparsers.add_parser(
        "export", help="write a cache's rows as parquet for `datasets` users",
        description="Write a fastkd cache (dense, top-k or sampled) as parquet: one row per "
                    "sample with its teacher rows (ids, values, lse or counts) and labels. The "
                    "cache is verified first; files are written under a temporary name and "
                    "renamed; a directory export resumes after its last complete part.")
    export.add_argument("dir", metavar="CACHE_DIR")
    export.add_argument("--to", required=True, choices=("parquet",))
    export.add_argument("--out", required=True, metavar="FILE_OR_DIR",
                        help="a .parquet file, or a directory of part-NNNNN.parquet files")
    export.add_argument("--samples-per-file", type=int, default=DEFAULT_SAMPLES_PER_FILE,
                        metavar="N", help="directory export: samples per part (default "
                                          f"{DEFAULT_SAMPLES_PER_FILE})")
    export.add_argument("--overwrite", action="store_true",
                        help="replace an existing file, or the parts in the directory")
    export.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    export.set_defaults(func=run_export)


def run_export(args) -> int:
    from fastkd.cache.commands import fail, fail_os
    from fastkd.cache.manifest import CacheError
    try:
        paths = export_parquet(args.dir, args.out, samples_per_file=args.samples_per_file,
                               overwrite=args.overwrite, progress=not args.quiet)
    except (ExportError, CacheError) as error:
        return fail(str(error))
    except OSError as error:
        return fail_os(error)
    if not args.quiet:
        print(f"ok: {args.dir} -> {len(paths)} parquet file(s) at {args.out}")
    return 0
