"""Writing imported top-k rows (a served teacher's responses, a teacher dataset of another tool)
as a fastkd cache, with the shard machinery ``fastkd cache`` uses: same manifest, files,
checksums and resumption (an interrupted run restarts after its last finished shard). Every
``fastkd import`` source writes through :func:`write_rows`.

``dataset`` has ``len()`` and ``iter_rows(start)`` yielding ``(index, sample)`` in order, each
sample ``{"input_ids" (n,), "labels" (n,) int64 tensors, "values" (n, K) storage array,
"indices" (n, K) ints, "lse" (n,) float32}``. The caller holds ``out_dir``'s
:class:`fastkd.cache.outdir.DirectoryLock`.
"""
import os

import numpy as np

from fastkd.cache import manifest as fmt
# the shard machinery is shared by the cache writers of this package
from fastkd.cache.shards import (finalize, labels_to_storage, record_or_check_shape, ShardCutter,
                                 ShardWriter)
from fastkd.cache.writer import now_utc, prepare_directory


def write_rows(dataset, out_dir: str, config: dict, *, overwrite: bool, vocab_size: int,
               progress: bool, batch: tuple) -> dict:
    """Write (or resume) the cache of ``dataset``'s rows; returns the finished manifest.
    ``batch``: ``(samples, rows)``, the most handed to the shard cutter at a time (bounds
    memory; does not change the bytes)."""
    from fastkd import __version__
    finished = prepare_directory(out_dir, config, overwrite, 0, 1, None)
    if finished is not None:
        return finished
    if os.path.exists(os.path.join(out_dir, fmt.MANIFEST_NAME)):
        state = fmt.read_manifest(out_dir)
        problems = fmt.check_sizes(out_dir, fmt.manifest_files(state))
        if problems:
            raise fmt.CacheError(f"cannot resume {out_dir}: {'; '.join(problems)}; pass "
                                 f"--overwrite to start again")
    else:
        state = dict(config, format=fmt.FORMAT_NAME, fastkd_version=__version__,
                     created=now_utc(),
                     status="incomplete", rank=0, sample_range=[0, len(dataset)],
                     num_classes=None, rows_per_sample=None, labels_per=None,
                     rows_per_shard=None, shards=[])
    for name in os.listdir(out_dir):  # leftovers of a killed run (fastkd's own temp files)
        if fmt.is_temp_file(name):
            os.remove(os.path.join(out_dir, name))
    last = state["shards"][-1] if state["shards"] else None
    resume_at = last["sample_stop"] if last else 0
    index_dtype = fmt.index_dtype(vocab_size)
    from tqdm.auto import tqdm
    writer = ShardWriter(out_dir, state, fmt.MANIFEST_NAME)
    cutter = ShardCutter(writer.put, state, 0, next_index=len(state["shards"]),
                          sample_start=resume_at, row_start=last["row_stop"] if last else 0)
    bar = tqdm(total=len(dataset), initial=resume_at, unit="sample", disable=not progress,
               desc="fastkd import", dynamic_ncols=True)

    def flush(samples):
        import torch
        arrays = {"values": np.concatenate([s["values"] for s in samples]),
                  "indices": np.concatenate([s["indices"] for s in samples]).astype(index_dtype),
                  "lse": np.concatenate([s["lse"] for s in samples])[:, None]}
        rows = {"arrays": arrays,
                "lengths": np.array([len(s["input_ids"]) for s in samples], np.int64),
                "labels": labels_to_storage(torch.cat([s["labels"] for s in samples])),
                "variable": True, "num_classes": vocab_size}
        record_or_check_shape(state, rows)
        cutter.add(arrays, rows["lengths"], rows["labels"],
                   np.zeros(len(arrays["values"]), np.int64))
        bar.update(len(samples))

    try:
        pending, count = [], 0
        for _, sample in dataset.iter_rows(resume_at):
            pending.append(sample)
            count += len(sample["input_ids"])
            if len(pending) >= batch[0] or count >= batch[1]:
                flush(pending)
                pending, count = [], 0
        if pending:
            flush(pending)
        cutter.finish()
    finally:
        bar.close()
        writer.close()
    return finalize(out_dir, 1, len(dataset))
