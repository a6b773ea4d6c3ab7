"""Every ``fastkd import`` source writes its top-k rows through :func:`write_rows`, with the
shard machinery of ``fastkd cache`` (same manifest, checksums and resumption)."""
import numpy as np

from fastkd.cache import manifest as fmt
from fastkd.cache.shards import (finalize, labels_to_storage, record_or_check_shape, ShardCutter,
                                 ShardWriter)
from fastkd.cache.writer import prepare_directory, resume_state


def write_rows(dataset, out_dir: str, config: dict, *, overwrite: bool, vocab_size: int,
               progress: bool, batch: tuple) -> dict:
    """Write (or resume) the cache of ``dataset``'s rows; returns the finished manifest. The
    caller holds ``out_dir``'s lock. ``dataset.iter_rows(start)`` yields ``(index, {"input_ids",
    "labels", "values" (storage), "indices", "lse"})`` in order; ``batch``: ``(samples, rows)``,
    the most handed to the shard cutter at a time (bounds memory, not the bytes)."""
    finished = prepare_directory(out_dir, config, overwrite, 0, 1, None)
    if finished is not None:
        return finished
    state = resume_state(out_dir, config, 0, 1, [0, len(dataset)])
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
