"""Every ``fastkd import`` source writes its top-k rows through :func:`write_rows`, with the
shard machinery of ``fastkd cache`` (same manifest, checksums and resumption)."""
import os

import numpy as np

from fastkd.cache import manifest as fmt
from fastkd.cache import outdir
from fastkd.cache.shards import finalize, labels_to_storage, shard_output
from fastkd.cache.writer import prepare_directory, resume_state


def write_rows(dataset, out_dir, *, source: str, paths, teacher: dict, dataset_spec: str,
               fingerprint: dict, top_k: int, vocab_size: int, dtype: str, shard_size_mb,
               batch: tuple, overwrite: bool, progress: bool, **fields) -> dict:
    """Write (or resume) the top-``top_k`` cache of ``dataset``'s rows under ``out_dir``'s lock
    (one writer at a time, as for ``fastkd cache``); returns the finished manifest.
    ``dataset.iter_rows(start)`` yields ``(index, {"input_ids", "labels", "values" (storage),
    "indices", "lse"})`` in order; ``batch``: ``(samples, rows)``, the most handed to the shard
    cutter at a time (bounds memory, not the bytes). ``teacher`` (beside its ``spec``, the
    source and ``paths``) and ``fields`` are what the source adds to the manifest."""
    _check_distinct(paths)
    config = {
        "teacher": dict({"spec": f"{source}:" + ",".join(os.path.basename(p) for p in paths)},
                        **teacher),
        "dataset": {"spec": dataset_spec, "class": "TokenDataset", "fingerprint": fingerprint},
        "format_version": fmt.FORMAT_VERSION, "dtype": dtype, "layout": "topk",
        "top_k": top_k, "sample": None, "temperatures": [1.0], "seed": None,
        "shard_size_mb": shard_size_mb, "batch_size": batch[0], "world_size": 1,
        "clamp": False, **fields,
    }
    out_dir = os.fspath(out_dir)
    with outdir.removed_on_failure_if_new(out_dir):
        outdir.make_directory(out_dir)
        return _write_rows_locked(out_dir, config, overwrite, dataset, progress, batch,
                                  vocab_size)


def _check_distinct(paths) -> None:
    """Each input file once: the same file given twice (under any name) would import its rows
    twice."""
    seen = {}
    for path in paths:
        key = os.path.realpath(path)
        if key in seen:
            raise ValueError(f"{path} is given twice (also as {seen[key]}); give each input "
                             f"file once")
        seen[key] = path


def _write_rows_locked(out_dir, config, overwrite, dataset, progress, batch, vocab_size):
    """:func:`write_rows` once ``out_dir`` exists: the rows, under its lock."""
    with outdir.DirectoryLock(out_dir):
        finished = prepare_directory(out_dir, config, overwrite, 0, 1, None)
        if finished is not None:
            return finished
        state = resume_state(out_dir, config, 0, 1, [0, len(dataset)])
        resume_at = state["shards"][-1]["sample_stop"] if state["shards"] else 0
        from tqdm.auto import tqdm
        with tqdm(total=len(dataset), initial=resume_at, unit="sample", disable=not progress,
                  desc="fastkd import", dynamic_ncols=True, delay=outdir.PROGRESS_DELAY_S) as bar, \
                shard_output(out_dir, state, fmt.MANIFEST_NAME) as cutter:
            pending, count = [], 0
            for _, sample in dataset.iter_rows(resume_at):
                pending.append(sample)
                count += len(sample["input_ids"])
                if len(pending) >= batch[0] or count >= batch[1]:
                    cutter.add(_batch(pending, vocab_size))
                    bar.update(len(pending))
                    pending, count = [], 0
            if pending:
                cutter.add(_batch(pending, vocab_size))
                bar.update(len(pending))
        return finalize(out_dir, 1, len(dataset))


def _batch(samples, vocab_size: int) -> dict:
    """Samples of :func:`write_rows`' ``dataset`` -> one batch of :meth:`ShardCutter.add`."""
    import torch
    arrays = {"values": np.concatenate([s["values"] for s in samples]),
              "indices": np.concatenate([s["indices"] for s in samples]).astype(
                  fmt.index_dtype(vocab_size)),
              "lse": np.concatenate([s["lse"] for s in samples])[:, None]}
    return {"arrays": arrays,
            "lengths": np.array([len(s["input_ids"]) for s in samples], np.int64),
            "labels": labels_to_storage(torch.cat([s["labels"] for s in samples])),
            "clamped": np.zeros(len(arrays["values"]), np.int64),
            "variable": True, "num_classes": vocab_size}
