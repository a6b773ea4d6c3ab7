"""Run a teacher once over a dataset and write its outputs as a shard cache (format: manifest.py).

DataLoader workers load items, the teacher runs in inference mode, rows are checked, converted
and cut into shards, and a background thread (:mod:`fastkd.cache.shards`) writes and records each
shard. Killed at any moment, the same call resumes after the last recorded shard and writes the
same bytes. Under ``torch.distributed`` rank ``r`` of ``W`` caches samples
``[r*N//W, (r+1)*N//W)``; rank 0 then merges the ranks' shards into one manifest.
"""
import datetime
import os
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from fastkd.cache import manifest as fmt
from fastkd.cache import outdir
from fastkd.cache.convert import RowConverter
from fastkd.cache.items import (BatchProblem, call_teacher, collate_groups, dataset_failed,
                                default_output_fn)
from fastkd.cache.shards import finalize, labels_to_storage, shard_output
from fastkd.cache.specs import dataset_fingerprint, fingerprint_hint, teacher_fingerprint
from fastkd.tokens import learned_positions

# manifest fields that must agree for a re-run to resume instead of refusing
IDENTITY_FIELDS = ("format_version", "teacher", "dataset", "dtype", "layout", "top_k", "sample",
                   "temperatures", "proposal_temperature", "seed", "shard_size_mb", "batch_size",
                   "world_size", "clamp", "rows")
# what a manifest without the field means
IDENTITY_DEFAULTS = {"rows": "all", "proposal_temperature": None}


def _differences(name: str, cached, asked) -> list:
    """``"name: cache has X, asked Y"`` for a differing setting; for settings that are dicts
    (teacher, dataset, their fingerprints) only their differing entries, long values cut."""
    if isinstance(cached, dict) and isinstance(asked, dict):
        return [line for key in sorted(set(cached) | set(asked))
                if cached.get(key) != asked.get(key)
                for line in _differences(f"{name}.{key}", cached.get(key), asked.get(key))]

    def short(value):
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    return [f"{name}: cache has {short(cached)}, asked {short(asked)}"]


def resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):   # torch's message lists every device type it knows
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device, "
                         f"got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available (use 'cpu' or 'auto')")
    return device


def _distributed():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist, dist.get_rank(), dist.get_world_size()
    return None, 0, 1


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# upper bounds: a batch index must fit torch's samplers; each worker is a process
MAX_BATCH_SIZE = 2 ** 31 - 1
MAX_NUM_WORKERS = 256


def validate_settings(batch_size, num_workers, dtype, shard_size_mb, top_k, sample, seed):
    for name, option, value, lowest, highest in (
            ("batch_size", "--batch-size", batch_size, 1, MAX_BATCH_SIZE),
            ("num_workers", "--num-workers", num_workers, 0, MAX_NUM_WORKERS)):
        if not (fmt.is_int(value, lowest) and value <= highest):
            raise ValueError(f"{name} ({option}) must be an int in [{lowest}, {highest}], got "
                             f"{value!r}")
    if dtype not in fmt.STORAGE_DTYPES:
        raise ValueError(f"dtype (--dtype) must be one of {sorted(fmt.STORAGE_DTYPES)}, got "
                         f"{dtype!r}")
    if not fmt.is_positive(shard_size_mb):
        raise ValueError(f"shard_size_mb (--shard-size-mb) must be a positive finite number of "
                         f"megabytes, got {shard_size_mb!r}")
    if top_k is not None and not fmt.is_int(top_k, 1):
        raise ValueError(f"top_k (--top-k) must be None (dense) or an int >= 1, got {top_k!r}")
    if sample is not None and not (fmt.is_int(sample, 1) and sample < 2 ** 31):
        raise ValueError(f"sample (--sample) must be None or an int in [1, 2**31) (draws per "
                         f"row), got {sample!r}")
    if top_k is not None and sample is not None:
        raise ValueError(f"top_k and sample are two layouts; give one (got top_k={top_k!r}, "
                         f"sample={sample!r})")
    if not fmt.is_int(seed):
        raise ValueError(f"seed (--seed) must be an int >= 0, got {seed!r}")


def _temperatures(temperature, layout: str) -> Optional[list]:
    """The manifest's ``temperatures``: top-k lse columns / the sampling temperature."""
    if layout not in fmt.SPARSE_K_FIELD:
        if temperature is not None:
            raise ValueError(f"temperature applies to top-k and sampled caches only (dense rows "
                             f"are stored as raw logits); got temperature={temperature!r} with "
                             f"layout={layout!r}")
        return None
    if temperature is None:
        return [1.0]
    values = list(temperature) if isinstance(temperature, (list, tuple)) else [temperature]
    if not values or not all(map(fmt.is_positive, values)):
        raise ValueError(f"temperature must be a positive finite number or a non-empty list of "
                         f"them, got {temperature!r}")
    values = [float(value) for value in values]
    if len(set(values)) != len(values):
        raise ValueError(f"temperature lists a value twice: {values}")
    if layout == "sampled" and len(values) != 1:
        raise ValueError(f"a sampled cache is a target for one temperature, got {values}")
    return values


def _proposal(proposal_temperature, layout: str, temperatures: Optional[list]):
    """The manifest's ``proposal_temperature``: what a sampled cache draws at (default: its
    target temperature, plain sampling); None for the other layouts."""
    if layout != "sampled":
        if proposal_temperature is not None:
            raise ValueError(f"proposal_temperature (--proposal-temperature) applies to sampled "
                             f"caches only, got {proposal_temperature!r} with layout={layout!r}")
        return None
    if proposal_temperature is None:
        return temperatures[0]
    if not fmt.is_positive(proposal_temperature):
        raise ValueError(f"proposal_temperature (--proposal-temperature) must be a positive "
                         f"finite number, got {proposal_temperature!r}")
    return float(proposal_temperature)


def prepare_directory(out_dir: str, config: dict, overwrite: bool, rank: int, world_size: int,
                       dist, dataset=None) -> Optional[dict]:
    """Refuse, clear or resume. Returns the finished manifest when there is nothing to do.
    The caller holds ``out_dir``'s lock (:class:`fastkd.cache.outdir.DirectoryLock`)."""
    def clear_or_check():
        outdir.make_directory(out_dir)
        names = os.listdir(out_dir)
        if overwrite:  # refuses a directory that is not a fastkd cache
            outdir.clear_for_overwrite(out_dir)
        elif any(not fmt.is_cache_file(name) for name in names) and \
                fmt.MANIFEST_NAME not in names:
            raise fmt.CacheError(f"--out {out_dir} exists and holds files that are not part "
                                 f"of a fastkd cache; choose an empty directory")
    _agreed(dist, rank, clear_or_check)
    stale = fmt.other_world_progress_files(os.listdir(out_dir), world_size)
    if stale:
        raise fmt.CacheError(f"{out_dir} holds a partial cache from a run with another number of "
                             f"processes ({stale[0]}); pass --overwrite (overwrite=True) to "
                             f"replace it")
    for name in (fmt.MANIFEST_NAME, fmt.progress_manifest_name(rank, world_size)):
        if not os.path.exists(os.path.join(out_dir, name)):
            continue
        existing = fmt.read_manifest(out_dir, name)
        def field(manifest, key):
            return manifest.get(key, IDENTITY_DEFAULTS.get(key))
        differing = [key for key in IDENTITY_FIELDS if field(existing, key) != field(config, key)]
        if differing:
            details = "; ".join(line for key in differing for line in
                                _differences(key, field(existing, key), field(config, key)))
            hint = fingerprint_hint(dataset, config["dataset"]["fingerprint"]) \
                if "dataset" in differing and dataset is not None else ""
            raise fmt.CacheError(f"{out_dir} holds a cache made with different settings "
                                 f"({details}); pass --overwrite (overwrite=True) to replace it"
                                 f"{hint}")
        if existing["status"] == "complete":
            problems = fmt.check_sizes(out_dir, fmt.manifest_files(existing))
            if problems:
                raise fmt.CacheError(f"{out_dir} is complete but damaged: {'; '.join(problems)}; "
                                     f"pass --overwrite to rebuild it")
            return existing
    return None


def _check_ranks_agree(dist, config: dict, dataset) -> None:
    """Under torch.distributed every rank must cache the same teacher weights and dataset;
    checked before anything is written."""
    if dist is None:
        return
    mine = (config["teacher"]["fingerprint"], config["dataset"]["fingerprint"]["sha256"],
            config["dataset"]["fingerprint"]["length"])
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    for position, what in ((0, "teacher weights"), (1, "dataset")):
        values = [str(fingerprints[position])[:16] for fingerprints in everyone]
        if len(set(values)) > 1:
            listing = ", ".join(f"rank {rank}: {value}" for rank, value in enumerate(values))
            hint = fingerprint_hint(dataset, config["dataset"]["fingerprint"]) if position else \
                "; every process must build the same teacher (same --teacher-checkpoint, seeds)"
            raise fmt.CacheError(f"torchrun ranks disagree on the {what} (fingerprints "
                                 f"{listing}){hint}; nothing was written")
    if len({fingerprints[2] for fingerprints in everyone}) > 1:
        raise fmt.CacheError(f"torchrun ranks disagree on the dataset length "
                             f"({[fingerprints[2] for fingerprints in everyone]}); nothing was "
                             f"written")


def write_cache(teacher: nn.Module, dataset, out_dir, *, batch_size: int = 256,
                num_workers: int = 0, device="cpu", dtype: str = "fp16",
                shard_size_mb: float = 256, top_k: Optional[int] = None,
                sample: Optional[int] = None, temperature=None,
                proposal_temperature: Optional[float] = None, seed: int = 0,
                overwrite: bool = False, clamp: bool = False, progress: bool = True,
                teacher_spec: Optional[str] = None, dataset_spec: Optional[str] = None,
                output_fn: Optional[Callable] = None, layout: Optional[str] = None) -> dict:
    """Cache ``output_fn(teacher(inputs))`` (``(B, V)`` or ``(B, L, V)`` rows) for every item of
    ``dataset`` into ``out_dir``; returns the manifest and resumes an interrupted run.

    Dense rows are stored in ``dtype``. ``top_k=k``: the k largest values, their ids and the
    log-sum-exp at each ``temperature`` (default 1). ``sample=k``: the distinct ids of ``k``
    draws from ``softmax(row / proposal_temperature)`` (default ``temperature``) with counts, or
    importance weights when the proposal differs, seeded by ``[seed, dataset index]``.
    ``layout="features"`` marks rows of teacher features.
    """
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise TypeError(f"dataset must be a map-style dataset, got {type(dataset).__name__}")
    validate_settings(batch_size, num_workers, dtype, shard_size_mb, top_k, sample, seed)
    if len(dataset) == 0:
        raise ValueError(f"dataset {dataset_spec or type(dataset).__name__} has no samples: "
                         f"nothing to cache")
    out_dir = os.fspath(out_dir)
    output_fn = output_fn or default_output_fn
    device = resolve_device(device)
    dist, rank, world_size = _distributed()
    if layout is None:
        layout = "topk" if top_k is not None else "sampled" if sample is not None else "dense"
    if layout not in fmt.LAYOUTS or (layout == "topk") != (top_k is not None) or \
            (layout == "sampled") != (sample is not None):
        raise ValueError(f"layout must be one of {fmt.LAYOUTS} (topk exactly when top_k is set, "
                         f"sampled exactly when sample is set); got layout={layout!r} with "
                         f"top_k={top_k!r}, sample={sample!r}")
    temperatures = _temperatures(temperature, layout)
    proposal_temperature = _proposal(proposal_temperature, layout, temperatures)

    config = {
        "teacher": {"spec": teacher_spec, "class": type(teacher).__name__,
                    "fingerprint": teacher_fingerprint(teacher)},
        "dataset": {"spec": dataset_spec, "class": type(dataset).__name__,
                    "fingerprint": dataset_fingerprint(dataset, dataset_spec)},
        "format_version": fmt.FORMAT_VERSION, "dtype": dtype, "layout": layout, "top_k": top_k,
        "sample": sample, "temperatures": temperatures,
        "proposal_temperature": proposal_temperature,
        "seed": seed if layout == "sampled" else None, "shard_size_mb": shard_size_mb,
        "batch_size": batch_size, "world_size": world_size, "clamp": clamp,
        # "learned": token data keeps the rows of positions with a next-token label (and each
        # sequence's last); "all": every row the teacher gives
        "rows": "learned" if getattr(dataset, "cache_rows", "all") == "learned" else "all",
    }
    _check_ranks_agree(dist, config, dataset)
    lock = outdir.DirectoryLock(out_dir)

    def make_and_lock():
        outdir.make_directory(out_dir)
        lock.acquire()
    try:  # the run's lock, held by rank 0 until every rank is done
        with outdir.removed_on_failure_if_new(out_dir):
            _agreed(dist, rank, make_and_lock)
            return _write_locked(teacher, dataset, out_dir, config, overwrite, dist, rank,
                                 world_size, device, num_workers, output_fn, progress)
    finally:
        lock.release()


def resume_state(out_dir: str, config: dict, rank: int, world_size: int,
                 sample_range: list) -> dict:
    """This rank's progress manifest (checked) to resume, or a new one; removes the temp files a
    killed run of this rank left."""
    from fastkd import __version__
    name = fmt.progress_manifest_name(rank, world_size)
    if os.path.exists(os.path.join(out_dir, name)):
        state = fmt.read_manifest(out_dir, name)
        problems = fmt.check_sizes(out_dir, fmt.manifest_files(state))
        if problems:
            raise fmt.CacheError(f"cannot resume {out_dir}: {'; '.join(problems)}; pass "
                                 f"--overwrite to start again")
        # the file names and sample ranges of this rank's shards follow from these fields
        shards_here = all(shard["rank"] == rank and sample_range[0] <= shard["sample_start"]
                          and shard["sample_stop"] <= sample_range[1]
                          for shard in state["shards"])
        if state.get("rank") != rank or state["sample_range"] != sample_range or not shards_here:
            raise fmt.CacheError(
                f"cannot resume {out_dir}: {name} is not rank {rank}'s progress over samples "
                f"[{sample_range[0]}, {sample_range[1]}) (it records rank "
                f"{state.get('rank')!r}, samples {state['sample_range']}); pass --overwrite to "
                f"start again")
    else:
        state = dict(config, format=fmt.FORMAT_NAME,
                     fastkd_version=__version__, created=now_utc(), status="incomplete",
                     rank=rank, sample_range=sample_range, num_classes=None,
                     rows_per_sample=None, labels_per=None, rows_per_shard=None, shards=[])
    try:
        for name in os.listdir(out_dir):
            if fmt.is_temp_file(name) and (world_size == 1 or
                                           name.startswith(f"shard-{rank:03d}-")):
                os.remove(os.path.join(out_dir, name))
    except OSError as error:
        raise outdir.explain_os_error(error, out_dir) from error
    return state


def _write_locked(teacher, dataset, out_dir, config, overwrite, dist, rank, world_size, device,
                  num_workers, output_fn, progress) -> dict:
    finished = prepare_directory(out_dir, config, overwrite, rank, world_size, dist, dataset)
    if finished is not None:
        return finished
    progress_name = fmt.progress_manifest_name(rank, world_size)
    num_samples = len(dataset)
    rank_start = rank * num_samples // world_size
    rank_stop = (rank + 1) * num_samples // world_size
    state = resume_state(out_dir, config, rank, world_size, [rank_start, rank_stop])
    last = state["shards"][-1] if state["shards"] else None
    resume_at = last["sample_stop"] if last else rank_start

    def cache_the_rest():
        if resume_at < rank_stop:
            _run_teacher(teacher, dataset, out_dir, state, progress_name, device, num_workers,
                         output_fn, (resume_at, rank_stop), progress and rank == 0)

    def merge():
        try:
            return finalize(out_dir, world_size, num_samples)
        except OSError as error:
            raise outdir.explain_os_error(error, out_dir) from error
    _agreed(dist, rank, cache_the_rest, everyone=True)
    manifest = _agreed(dist, rank, merge)
    return manifest if rank == 0 else fmt.read_manifest(out_dir)


def _agreed(dist, rank: int, run: Callable, everyone: bool = False):
    """``run()`` on rank 0 (on every rank with ``everyone``) and its result; a failure is
    re-raised, and under torch.distributed every rank first learns whether any rank failed
    (instead of hanging in a barrier), the others raising an error naming it."""
    result, failure = None, None
    if everyone or rank == 0:
        try:
            result = run()
        except Exception as error:
            failure = error
    if dist is not None:
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, None if failure is None else
                               f"rank {rank}: {type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    if dist is not None and any(messages):
        raise fmt.CacheError("fastkd cache failed on another rank: " +
                             "; ".join(message for message in messages if message))
    return result


def _run_teacher(teacher, dataset, out_dir, state, progress_name, device, num_workers,
                 output_fn, sample_range, show_progress):
    """Cache samples ``[resume_at, rank_stop)`` (``sample_range``) with the settings in
    ``state`` (the progress manifest), appending finished shards to it."""
    from tqdm.auto import tqdm
    resume_at, rank_stop = sample_range
    rank_start, batch_size = state["sample_range"][0], state["batch_size"]
    # batches restart where an uninterrupted run put them, so the teacher sees identical batches
    batch_start = rank_start + (resume_at - rank_start) // batch_size * batch_size
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, range(batch_start, rank_stop)), batch_size=batch_size,
        shuffle=False, num_workers=num_workers, collate_fn=collate_groups,
        pin_memory=device.type == "cuda")
    teacher = teacher.to(device).eval()
    converter = RowConverter(state)
    # token data ("rows": "learned"): positions whose next-token label is this are not cached
    unlearned = getattr(dataset, "ignore_index", -100) if state.get("rows") == "learned" else None
    batches = iter(loader)  # start (fork) loader workers before the writer thread exists
    bar = tqdm(total=rank_stop - rank_start, initial=resume_at - rank_start, unit="sample",
               disable=not show_progress, desc="fastkd cache", dynamic_ncols=True,
               delay=outdir.PROGRESS_DELAY_S)
    rows_done, bytes_done = 0, 0
    with bar, shard_output(out_dir, state, progress_name) as cutter:
        sample = batch_start
        names = tuple(state[key]["spec"] or state[key]["class"] for key in ("teacher", "dataset"))
        while True:
            try:
                groups = next(batches)
            except StopIteration:
                break
            except Exception as error:   # raised by the dataset's __getitem__
                stop = min(sample + batch_size, rank_stop)
                raise dataset_failed(names[1], f"samples {sample}..{stop - 1}", error) from error
            if isinstance(groups, BatchProblem):
                raise groups.error(sample)
            batch_len = sum(len(positions) for positions, _, _ in groups)
            keep_from = max(0, resume_at - sample)  # samples already cached (resume only)
            batch = _run_batch(teacher, groups, batch_len, sample, keep_from, device, output_fn,
                               converter, names, unlearned)
            sample += batch_len
            if batch is None:
                continue
            cutter.add(batch)
            rows_done += int(batch["lengths"].sum())
            bytes_done += sum(array.nbytes for array in batch["arrays"].values())
            elapsed = bar.format_dict["elapsed"] or 1e-9
            bar.set_postfix_str(f"{rows_done / elapsed:,.0f} rows/s, "
                                f"{bytes_done / elapsed / 2 ** 20:,.2f} MB/s", refresh=False)
            bar.update(batch_len - keep_from)


def _run_batch(teacher, groups, batch_len, first_sample, keep_from, device, output_fn,
               converter, names=("teacher", "dataset"), unlearned=None) -> Optional[dict]:
    """Teacher over one batch -> ``{arrays, lengths, labels, clamped, variable, num_classes}``
    for the samples from ``keep_from`` on, in dataset order (None if there are none), converted
    on the teacher's device. With ``unlearned`` (an ignore index) a sample keeps only the rows of
    :func:`fastkd.tokens.learned_positions`."""
    outputs = []
    with torch.inference_mode():
        for positions, inputs, labels in groups:
            output = output_fn(call_teacher(teacher, inputs, device, names, first_sample,
                                             batch_len))
            if not isinstance(output, torch.Tensor) or output.dim() not in (2, 3) or \
                    not output.is_floating_point():
                got = (f"a {output.dtype} tensor of shape {tuple(output.shape)}"
                       if isinstance(output, torch.Tensor) else type(output).__name__)
                raise ValueError(f"teacher output must be a floating (B, V) or (B, L, V) tensor, "
                                 f"got {got}; pass output_fn (--output-key) or wrap the teacher "
                                 f"(fastkd.features.TeacherFeatures)")
            outputs.append((positions, output.float(), labels))
        variable = outputs[0][1].dim() == 3
        select = unlearned is not None and variable
        if len(outputs) == 1 and not select:  # one input shape: samples already in order
            _, output, labels = outputs[0]
            output, labels = output[keep_from:], labels and labels[keep_from:]
            rows = output.reshape(-1, output.shape[-1])
            lengths = np.full(output.shape[0], output.shape[1] if variable else 1, np.int64)
        else:  # variable-length items: put the groups' samples back in dataset order
            per_sample = [None] * batch_len
            for positions, output, group_labels in outputs:
                for slot, position in enumerate(positions):
                    rows = output[slot].reshape(-1, output.shape[-1])
                    labels = group_labels and group_labels[slot]
                    if select and labels is not None:
                        keep = learned_positions(labels, unlearned)
                        rows, labels = rows[keep.to(rows.device)], labels[keep]
                    per_sample[position] = (rows, labels)
            outputs_in_order, labels = zip(*per_sample[keep_from:]) if keep_from < batch_len \
                else ((), None)
            rows = torch.cat(outputs_in_order) if outputs_in_order else None
            lengths = np.array([output.shape[0] for output in outputs_in_order], np.int64)
            labels = None if not labels or labels[0] is None else labels
        if not len(lengths):
            return None
        first = first_sample + keep_from
        arrays, clamped = converter(rows, np.repeat(np.arange(first, first + len(lengths)),
                                                    lengths))
    if labels is not None:
        labels = labels_to_storage(torch.cat(list(labels)))
    return {"arrays": arrays, "lengths": lengths, "labels": labels, "clamped": clamped,
            "variable": variable, "num_classes": rows.shape[1]}
