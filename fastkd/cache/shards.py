"""Cutting rows into shards and writing them, for ``fastkd cache`` and ``fastkd import`` (format:
:mod:`fastkd.cache.manifest`). Shards hold whole samples at the manifest's fixed row count, so
their boundaries depend only on the data, never on batching.
"""
import contextlib
import os
import queue
import threading
from typing import Callable

import numpy as np

from fastkd.cache import manifest as fmt
from fastkd.cache import outdir

QUEUE_DEPTH = 2   # shards waiting for the writer thread before the teacher waits for the disk


class ShardWriter:
    """Background thread that writes shards and records each one in the progress manifest."""

    def __init__(self, out_dir: str, manifest: dict, manifest_name: str):
        self.out_dir, self.manifest, self.manifest_name = out_dir, manifest, manifest_name
        self.queue = queue.Queue(maxsize=QUEUE_DEPTH)
        self.error = None
        self.thread = threading.Thread(target=self._run, name="fastkd-cache-writer", daemon=True)
        self.thread.start()

    def _raise(self) -> None:
        if isinstance(self.error, OSError):
            raise outdir.explain_os_error(self.error, self.out_dir) from self.error
        raise RuntimeError(f"cache writer failed: {self.error}") from self.error

    def put(self, shard: dict) -> None:
        while self.error is None:
            try:
                self.queue.put(shard, timeout=0.5)
                return
            except queue.Full:
                pass
        self._raise()

    def close(self) -> None:
        """Finish the queued shards (or stop after an error) and re-raise a writer error."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        if self.error is not None:
            self._raise()

    def _run(self) -> None:
        while True:
            shard = self.queue.get()
            if shard is None or self.error is not None:
                return
            try:
                self._write(shard)
            except BaseException as error:  # reported to the main thread by put/close
                self.error = error

    def _write(self, shard: dict) -> None:
        arrays = shard.pop("arrays")
        shard["files"] = {name: fmt.write_npy_atomic(
            self.out_dir, fmt.shard_file_name(shard["rank"], shard["index"], name), array)
            for name, array in arrays.items()}
        fmt.fsync_directory(self.out_dir)
        self.manifest["shards"].append(shard)
        fmt.write_manifest(self.out_dir, self.manifest, self.manifest_name)


@contextlib.contextmanager
def shard_output(out_dir: str, state: dict, manifest_name: str):
    """A :class:`ShardCutter` whose shards a :class:`ShardWriter` writes and records in
    ``manifest_name``; on leaving, the rest is cut (unless an error leaves) and the writer is
    closed, re-raising its error."""
    writer = ShardWriter(out_dir, state, manifest_name)
    try:
        cutter = ShardCutter(writer.put, state)
        yield cutter
        cutter.finish()
    finally:
        writer.close()


class ShardCutter:
    """Accumulates per-sample rows and cuts shards of whole samples at ``state``'s (the progress
    manifest's) ``rows_per_shard``, continuing after the shards ``state`` lists."""

    def __init__(self, emit: Callable[[dict], None], state: dict):
        last = state["shards"][-1] if state["shards"] else None
        self.emit, self.state, self.rank = emit, state, state["rank"]
        self.index = len(state["shards"])
        self.sample_start = last["sample_stop"] if last else state["sample_range"][0]
        self.row_start = last["row_stop"] if last else 0
        self.pending = []  # [(arrays, lengths, labels, clamped per row)] per batch, in order

    def _pending_lengths(self) -> np.ndarray:
        return np.concatenate([batch[1] for batch in self.pending]) if self.pending else \
            np.zeros(0, np.int64)

    def add(self, batch: dict) -> None:
        """``batch``: ``{arrays, lengths, labels, clamped, variable, num_classes}`` of whole
        samples in order (its shape recorded or checked by :func:`record_or_check_shape`)."""
        record_or_check_shape(self.state, batch)
        self.pending.append(tuple(batch[key] for key in ("arrays", "lengths", "labels",
                                                           "clamped")))
        lengths_all = self._pending_lengths()
        while len(lengths_all):
            full = np.nonzero(np.cumsum(lengths_all) >= self.state["rows_per_shard"])[0]
            if not len(full):
                return
            self._cut(int(full[0]) + 1)
            lengths_all = self._pending_lengths()

    def finish(self) -> None:
        remaining = len(self._pending_lengths())
        if remaining:
            self._cut(remaining)

    def _cut(self, num_samples: int) -> None:
        arrays = {name: np.concatenate([batch[0][name] for batch in self.pending])
                  for name in self.pending[0][0]}
        lengths = self._pending_lengths()
        labels = (None if self.pending[0][2] is None else
                  np.concatenate([batch[2] for batch in self.pending]))
        clamped = np.concatenate([batch[3] for batch in self.pending])
        num_rows = int(lengths[:num_samples].sum())
        # ragged sampled rows: the per-entry arrays are cut after the rows' entries
        per_entry = set(fmt.entry_array_names(self.state))
        entries = int(arrays["distinct"][:num_rows].sum(dtype=np.int64)) if per_entry else None
        shard_arrays = {name: array[:entries if name in per_entry else num_rows]
                        for name, array in arrays.items()}
        rest = {name: array[entries if name in per_entry else num_rows:]
                for name, array in arrays.items()}
        if labels is not None:
            cut = num_samples if self.state["labels_per"] == "sample" else num_rows
            shard_arrays["labels"], labels = labels[:cut], labels[cut:]
        if self.state["rows_per_sample"] == "variable":
            shard_arrays["lengths"] = lengths[:num_samples].astype(fmt.LENGTH_DTYPE)
        self.emit({"index": self.index, "rank": self.rank,
                   "sample_start": self.sample_start,
                   "sample_stop": self.sample_start + num_samples,
                   "row_start": self.row_start, "row_stop": self.row_start + num_rows,
                   "clamped": int(clamped[:num_rows].sum()), "arrays": shard_arrays,
                   **({"entries": entries} if per_entry else {})})
        self.index += 1
        self.sample_start += num_samples
        self.row_start += num_rows
        remaining = lengths[num_samples:]
        self.pending = [(rest, remaining, labels, clamped[num_rows:])] if len(remaining) else []


def labels_to_storage(labels) -> np.ndarray:
    """Dataset labels (a CPU integer tensor) as the format's int32 label dtype, or a ValueError."""
    info = np.iinfo(fmt.LABEL_DTYPE)
    if labels.numel() and (int(labels.min()) < info.min or int(labels.max()) > info.max):
        raise ValueError(f"dataset labels must fit in int32 (class ids or a negative ignore "
                         f"index); found values in [{int(labels.min())}, {int(labels.max())}]")
    return labels.numpy().astype(fmt.LABEL_DTYPE)


def record_or_check_shape(state: dict, batch: dict) -> None:
    """Record classes, rows per sample and label kind from the first batch; check the rest."""
    lengths, labels = batch["lengths"], batch["labels"]
    if labels is None:
        labels_per = None
    elif len(labels) == len(lengths):
        labels_per = "sample"
    elif len(labels) == int(lengths.sum()):
        labels_per = "row"
    else:
        raise ValueError("dataset labels must be one per sample or one per teacher output row")
    found = {"num_classes": batch["num_classes"],
             "rows_per_sample": "variable" if batch["variable"] else 1, "labels_per": labels_per}
    if state["num_classes"] is None:
        state.update(found)
        state["rows_per_shard"] = fmt.rows_per_shard(state)
        return
    for key, value in found.items():
        if state[key] != value:
            raise ValueError(f"teacher outputs/dataset items changed {key} from {state[key]!r} "
                             f"to {value!r} partway through the dataset")


def finalize(out_dir: str, world_size: int, num_samples: int) -> dict:
    """Merge the ranks' shard lists into manifest.json (status complete) with offsets/labels."""
    parts = [fmt.read_manifest(out_dir, fmt.progress_manifest_name(rank, world_size))
             for rank in range(world_size)]
    manifest = {key: value for key, value in parts[0].items()
                if key not in ("rank", "sample_range", "manifest_sha256")}
    described = [part for part in parts if part["num_classes"] is not None]
    for key in ("num_classes", "rows_per_sample", "labels_per", "rows_per_shard"):
        values = {part[key] for part in described}
        if len(values) > 1:
            raise fmt.CacheError(f"ranks disagree on {key}: {sorted(map(str, values))}")
        manifest[key] = values.pop() if values else None
    shards, row = [], 0
    for part in parts:
        for shard in part["shards"]:
            rows = shard["row_stop"] - shard["row_start"]
            shards.append(dict(shard, row_start=row, row_stop=row + rows))
            row += rows
    manifest.update(shards=shards, num_samples=num_samples, num_rows=row,
                    clamped_values=sum(shard["clamped"] for shard in shards),
                    status="complete", offsets=None, labels=None)
    fmt.check_structure(manifest, out_dir)
    if manifest["rows_per_sample"] == "variable":
        lengths = [fmt.load_array(out_dir, shard["files"]["lengths"]) for shard in shards]
        offsets = np.zeros(num_samples + 1, fmt.LENGTH_DTYPE)
        np.cumsum(np.concatenate(lengths) if lengths else [], out=offsets[1:])
        manifest["offsets"] = fmt.write_npy_atomic(out_dir, fmt.OFFSETS_NAME, offsets)
    fmt.fsync_directory(out_dir)
    fmt.write_manifest(out_dir, manifest)
    if world_size > 1:
        for rank in range(world_size):
            os.remove(os.path.join(out_dir, fmt.progress_manifest_name(rank, world_size)))
    return fmt.read_manifest(out_dir)
