"""Every field of a manifest checked for type and value before anything uses it: a cache is
untrusted input (downloaded, shared, edited), so a hostile or damaged manifest fails here with
a sentence naming the file and the field instead of a raw ``KeyError``/``TypeError`` deep in the
reader or writer. The field meanings are in :mod:`fastkd.cache.manifest`."""
from typing import Dict

import numpy as np

from fastkd.cache import manifest as fmt


def _is_int(value, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _expect(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise fmt.CacheError(f"{where}: {message}")


def _check_entry(entry, where: str, dtype: np.dtype, row_shape: tuple) -> None:
    _expect(isinstance(entry, dict), where, f"file entry {entry!r} is not an object")
    fmt.check_file_name(entry.get("file"), where)
    name = entry["file"]
    _expect(_is_int(entry.get("bytes")), where, f"{name}: 'bytes' must be an integer >= 0")
    _expect(isinstance(entry.get("sha256"), str) and
            fmt.SHA256_HEX.fullmatch(entry["sha256"]) is not None, where,
            f"{name}: 'sha256' must be 64 lowercase hex digits")
    _expect(entry.get("dtype") == dtype.str, where,
            f"{name}: dtype {entry.get('dtype')!r}; this array is stored as {dtype.str!r}")
    shape = entry.get("shape")
    _expect(isinstance(shape, list) and len(shape) == 1 + len(row_shape) and
            all(_is_int(size) for size in shape) and tuple(shape[1:]) == row_shape, where,
            f"{name}: shape {shape!r}; expected [rows{''.join(f', {n}' for n in row_shape)}]")


def entry_arrays(manifest: dict) -> Dict[str, tuple]:
    """``{array name: (numpy dtype, per-row shape)}`` of every array a shard of ``manifest``
    holds (the layout's arrays plus ``labels`` and ``lengths`` where present)."""
    arrays = dict(fmt.manifest_row_arrays(manifest))
    if manifest["labels_per"]:
        arrays["labels"] = (fmt.label_dtype(manifest["format_version"]), ())
    if manifest["rows_per_sample"] == "variable":
        arrays["lengths"] = (fmt.LENGTH_DTYPE, ())
    return arrays


def validate_manifest(manifest: dict, where: str) -> None:
    """Types and values of every field the reader, the writer and ``fastkd info`` use, so an
    edited or hostile manifest fails here with a sentence instead of deep inside them."""
    _expect(manifest.get("status") in ("complete", "incomplete"), where,
            f"status {manifest.get('status')!r}; expected 'complete' or 'incomplete'")
    _expect(manifest.get("dtype") in fmt.STORAGE_DTYPES, where,
            f"dtype {manifest.get('dtype')!r}; expected one of {sorted(fmt.STORAGE_DTYPES)}")
    _expect(manifest.get("layout") in fmt.LAYOUTS, where,
            f"layout {manifest.get('layout')!r}; expected one of {list(fmt.LAYOUTS)}")
    _expect(manifest["layout"] != "sampled" or manifest["format_version"] >= 2, where,
            "the sampled layout needs format version 2")
    for layout, field in fmt.SPARSE_K_FIELD.items():
        value = manifest.get(field)
        _expect(_is_int(value, 1) if manifest["layout"] == layout else value is None, where,
                f"{field} {value!r} does not fit layout {manifest['layout']!r}")
    temperatures = manifest.get("temperatures")
    _expect(temperatures is None or (
        isinstance(temperatures, list) and temperatures and all(
            isinstance(value, (int, float)) and not isinstance(value, bool) and
            0 < value < float("inf") for value in temperatures)), where,
        f"temperatures {temperatures!r}; expected null or a list of positive numbers")
    proposal = manifest.get("proposal_temperature")
    if fmt.is_ragged(manifest):
        _expect(isinstance(proposal, (int, float)) and not isinstance(proposal, bool) and
                0 < proposal < float("inf") and temperatures is not None and
                len(temperatures) == 1, where,
                f"a sampled cache needs one target temperature and a positive proposal_"
                f"temperature; found temperatures {temperatures!r}, proposal_temperature "
                f"{proposal!r}")
    else:
        _expect(proposal is None, where, f"proposal_temperature {proposal!r} applies to sampled "
                f"caches of format version 3 only")
    for key in ("teacher", "dataset"):
        _expect(isinstance(manifest.get(key), dict), where, f"'{key}' must be an object")
    _expect(isinstance(manifest["teacher"].get("fingerprint"), str), where,
            "teacher fingerprint must be a string")
    fingerprint = manifest["dataset"].get("fingerprint")
    _expect(isinstance(fingerprint, dict) and _is_int(fingerprint.get("length")) and
            isinstance(fingerprint.get("sha256"), str), where,
            "dataset fingerprint must be {length, sha256, ...}")
    for key in ("shard_size_mb",):
        _expect(isinstance(manifest.get(key), (int, float)) and not isinstance(
            manifest[key], bool) and manifest[key] > 0, where, f"'{key}' must be positive")
    for key in ("batch_size", "world_size"):
        _expect(_is_int(manifest.get(key), 1), where, f"'{key}' must be an integer >= 1")
    _expect(manifest.get("rows_per_sample") in (None, 1, "variable"), where,
            f"rows_per_sample {manifest.get('rows_per_sample')!r}; expected 1 or 'variable'")
    _expect(manifest.get("labels_per") in (None, "sample", "row"), where,
            f"labels_per {manifest.get('labels_per')!r}; expected null, 'sample' or 'row'")
    for key in ("num_classes", "rows_per_shard"):
        _expect(manifest.get(key) is None or _is_int(manifest[key], 1), where,
                f"'{key}' must be null or an integer >= 1")
    shards = manifest.get("shards")
    _expect(isinstance(shards, list), where, "'shards' must be a list")
    complete = manifest["status"] == "complete"
    if complete:
        for key in ("num_samples", "num_rows"):
            _expect(_is_int(manifest.get(key)), where, f"'{key}' must be an integer >= 0")
    else:
        sample_range = manifest.get("sample_range")
        _expect(isinstance(sample_range, list) and len(sample_range) == 2 and
                all(_is_int(value) for value in sample_range), where,
                "'sample_range' must be [start, stop]")
    if shards or complete:
        _expect(manifest["num_classes"] is not None and manifest["rows_per_sample"] is not None,
                where, "num_classes and rows_per_sample must be set once shards exist")
    arrays = entry_arrays(manifest) if manifest["num_classes"] is not None else {}
    for number, shard in enumerate(shards):
        here = f"{where}: shard {number}"
        _expect(isinstance(shard, dict), here, "is not an object")
        for key in ("index", "rank", "sample_start", "sample_stop", "row_start", "row_stop",
                    "clamped") + (("entries",) if fmt.is_ragged(manifest) else ()):
            _expect(_is_int(shard.get(key)), here, f"'{key}' must be an integer >= 0")
        _expect(shard["sample_start"] < shard["sample_stop"] and
                shard["row_start"] <= shard["row_stop"], here, "has an empty or reversed range")
        files = shard.get("files")
        if not (isinstance(files, dict) and set(files) == set(arrays)):
            raise fmt.CacheError(f"{here} lists arrays "
                             f"{sorted(files) if isinstance(files, dict) else files!r}; "
                             f"expected {sorted(arrays)}")
        for array, (dtype, row_shape) in arrays.items():
            _check_entry(files[array], here, dtype, row_shape)
    for key, dtype in (("offsets", fmt.LENGTH_DTYPE), ("labels", fmt.V1_LABEL_DTYPE)):
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
    names = [entry["file"] for entry in fmt.manifest_files(manifest)]
    _expect(len(set(names)) == len(names), where, "lists the same file twice")
