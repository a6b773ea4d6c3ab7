"""``fastkd cache``, ``verify``, ``info`` and ``import``. Argument parsing imports no torch; each
command imports what it needs when it runs. Under ``torchrun`` (``WORLD_SIZE > 1``) ``fastkd
cache`` joins the process group (gloo on CPU, nccl on CUDA) and each rank caches its share.
"""
import os
import sys

import numpy as np

from fastkd.cache import manifest as fmt


def _output_options(parser, overwrite_help: str) -> None:
    """The options ``fastkd cache`` and ``fastkd import`` share."""
    parser.add_argument("--out", required=True, metavar="DIR", help="cache directory")
    parser.add_argument("--dtype", default="fp16", choices=sorted(fmt.STORAGE_DTYPES))
    parser.add_argument("--shard-size-mb", type=float, default=256.0)
    parser.add_argument("--overwrite", action="store_true", help=overwrite_help)
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def add_parser(subparsers) -> None:
    cache = subparsers.add_parser(
        "cache", help="run a teacher once over a dataset and cache its logits as fp16 shards",
        description="Run TEACHER over DATASET once and write its outputs to OUT as memory-mapped "
                    "shards with a manifest. Re-running the same command resumes an interrupted "
                    "run.")
    cache.add_argument("--teacher", required=True, metavar="SPEC",
                       help="package.module:attr (nn.Module or callable returning one), "
                            "torchvision:<model_name> or hf:<local dir> (a transformers causal "
                            "LM; never downloaded)")
    cache.add_argument("--dataset", required=True, metavar="SPEC",
                       help="package.module:attr (map-style dataset or callable returning one), "
                            "'digits', torchvision:<DatasetClass> (with --data-root), or token "
                            "data: jsonl:<file>, parquet:<file>, hf-disk:<dir>")
    _output_options(cache, "replace an existing cache made with other settings (removes only "
                           "the files its manifest lists and fastkd's temp files)")
    cache.add_argument("--teacher-checkpoint", metavar="PATH",
                       help="state dict to load into the teacher (torch.load weights_only=True)")
    cache.add_argument("--data-root", metavar="DIR", help="root of a torchvision dataset")
    cache.add_argument("--data-split",
                       help="split of a torchvision dataset or of an hf-disk: DatasetDict "
                            "(default: train)")
    cache.add_argument("--tokenizer", metavar="DIR",
                       help="token data with text, prompt/completion or chat messages rows: "
                            "the local tokenizer directory (default: an hf: teacher's own)")
    cache.add_argument("--max-length", type=int, metavar="N",
                       help="token data: keep the first N tokens of each row (right "
                            "truncation; default: whole rows)")
    cache.add_argument("--batch-size", type=int, default=256)
    cache.add_argument("--num-workers", type=int, default=0)
    cache.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    cache.add_argument("--teacher-dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                       help="dtype an hf: teacher runs in (default: the checkpoint's)")
    sparse = cache.add_mutually_exclusive_group()
    sparse.add_argument("--top-k", type=int, metavar="K",
                        help="store only the K largest logits per row (+ ids and the row's "
                             "log-sum-exp at each --temperature)")
    sparse.add_argument("--sample", type=int, metavar="N",
                        help="draw N ids per row from the teacher (at --proposal-temperature) "
                             "and store only the distinct ones with their counts or importance "
                             "weights: an unbiased target for the teacher at --temperature "
                             "(seeded by --seed)")
    cache.add_argument("--temperature", type=float, nargs="+", metavar="T",
                       help="the temperature training will use, which the target is for. "
                            "--top-k: one or more (the log-sum-exp of the tempered row is "
                            "stored for each; default 1); --sample: one (default 1)")
    cache.add_argument("--proposal-temperature", type=float, metavar="TAU",
                       help="--sample: draw from softmax(z / TAU) and store importance weights "
                            "(c / N) p / q for the target at --temperature (default: TAU = T, "
                            "plain sampling with counts)")
    cache.add_argument("--seed", type=int, default=0,
                       help="seed of --sample's draws (default 0)")
    cache.add_argument("--clamp", action="store_true",
                       help="clamp values beyond the dtype's range instead of failing (the count "
                            "is recorded in the manifest; NaN always fails)")
    cache.add_argument("--output-key", metavar="KEY",
                       help="the teacher returns a dict, ModelOutput or tuple: cache "
                            "output[KEY] (default: the tensor itself, .logits, or element 0)")
    cache.set_defaults(func=run_cache)

    verify = subparsers.add_parser(
        "verify", help="check every cache file against its checksum",
        description="Check the manifest, every file's sha256 and, on every file, what reading "
                    "checks (.npy headers, row offsets, sampled rows). Exit status: 0 every "
                    "file matches, 1 the cache is missing, incomplete, damaged or unsafe (the "
                    "problem on stderr), 2 usage error.")
    verify.add_argument("dir", metavar="DIR")
    verify.set_defaults(func=run_verify)

    info = subparsers.add_parser("info", help="summarize a cache directory")
    info.add_argument("dir", metavar="DIR")
    info.set_defaults(func=run_info)

    served = subparsers.add_parser(
        "import", help="turn a served teacher's top-k log-probs (vLLM JSONL) into a top-k cache",
        description="Import top-k prompt log-probs from an OpenAI-compatible completions "
                    "server (vLLM), one response JSON per line, into a fastkd top-k cache "
                    "(same manifest, checksums, resume and verify as `fastkd cache`). Request "
                    "with max_tokens=1, prompt_logprobs=K, logprobs=K, "
                    "return_tokens_as_token_ids=true, return_token_ids=true. --from distillkit "
                    "/ axolotl imports a DistillKit, open-instruct or axolotl teacher dataset "
                    "(parquet or save_to_disk) instead (docs/teacher-datasets.md).")
    served.add_argument("files", nargs="+", metavar="FILE.jsonl",
                        help="vllm: response JSONL files; distillkit / axolotl: the dataset "
                             "directory or parquet file(s)")
    served.add_argument("--from", dest="source", required=True,
                        choices=("vllm", "distillkit", "axolotl"))
    _output_options(served, "replace an existing cache made from other files or settings")
    served.add_argument("--vocab-size", type=int, metavar="V",
                        help="the teacher's vocabulary size (ids >= V are refused; required "
                             "for vllm and axolotl, distillkit's default is its config's d)")
    served.add_argument("--top-k", type=int, metavar="K",
                        help="log-probs kept per position (vllm: required, the request's "
                             "prompt_logprobs; distillkit / axolotl: checked against the data)")
    from fastkd.cache.distillkit import add_arguments as add_teacher_dataset_arguments
    add_teacher_dataset_arguments(served)  # --from distillkit / axolotl (no torch import)
    served.set_defaults(func=run_import)


# teacher classes of imported caches, whose fingerprint hashes the imported files
IMPORTED_TEACHERS = ("served", "distillkit", "axolotl")


def _teacher_hash_name(manifest: dict) -> str:
    """What the teacher fingerprint hashes: the model's weights, or an import's input files."""
    return "input files" if manifest["teacher"].get("class") in IMPORTED_TEACHERS else "weights"


def fail(message: str) -> int:
    """One ``fastkd: error:`` line on stderr (a message that quotes a library's several lines,
    e.g. a YAML parser's, is joined into one); the exit status 1."""
    message = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    print(f"fastkd: error: {message}", file=sys.stderr)
    return 1


def fail_os(error: OSError) -> int:
    """An environment problem outside the cache directory, in one line."""
    where = f" ({error.filename})" if error.filename else ""
    return fail(f"{error.strerror or error}{where}")


def _summarize(args, manifest: dict) -> int:
    if not args.quiet:
        print(summary(args.out, manifest))
    return 0


INTERRUPTED = 130  # the shell's status for a process ended by SIGINT


def _resuming(run, args) -> int:
    """``run(args)``; interrupted, a note that the same command resumes."""
    try:
        return run(args)
    except KeyboardInterrupt:
        print("fastkd: interrupted; re-run the same command to resume", file=sys.stderr)
        return INTERRUPTED


def run_cache(args) -> int:
    return _resuming(_run_cache, args)


def torchrun_environment() -> dict:
    """``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` as torchrun sets them (1, 0, 0 without it);
    a ValueError names a variable that is not an int in range."""
    values = {}
    for name, default, lowest in (("WORLD_SIZE", "1", 1), ("RANK", "0", 0),
                                  ("LOCAL_RANK", "0", 0)):
        text = os.environ.get(name, default)
        try:
            values[name] = int(text)
        except ValueError:
            values[name] = None
        if values[name] is None or values[name] < lowest:
            raise ValueError(f"the environment variable {name}={text!r} is not an int >= "
                             f"{lowest}; torchrun sets it (unset it to run one process)")
    if values["WORLD_SIZE"] == 1:   # one process: a RANK left in the environment is moot
        values["RANK"] = 0
    elif values["RANK"] >= values["WORLD_SIZE"]:
        raise ValueError(f"the environment variable RANK={values['RANK']} is not below "
                         f"WORLD_SIZE={values['WORLD_SIZE']}; torchrun sets both")
    return values


def _run_cache(args) -> int:
    import torch
    from fastkd.cache.specs import resolve_dataset, resolve_teacher
    from fastkd.cache.items import DatasetError, TeacherError, output_key_fn
    from fastkd.cache.writer import resolve_device, write_cache
    try:
        ranks = torchrun_environment()
        device = resolve_device(args.device)
    except ValueError as error:
        return fail(str(error))
    local_rank = ranks["LOCAL_RANK"]
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per torchrun process
    distributed = ranks["WORLD_SIZE"] > 1
    if distributed:
        import torch.distributed as dist
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        except (ValueError, RuntimeError) as error:   # e.g. no MASTER_ADDR: not under torchrun
            return fail(f"WORLD_SIZE={ranks['WORLD_SIZE']} asks for several processes, but "
                        f"torch.distributed could not start ({str(error).splitlines()[0]}); "
                        f"launch with torchrun, or unset WORLD_SIZE to run one process")
    try:
        if args.teacher_dtype != "auto" and not args.teacher.startswith("hf:"):
            raise ValueError(f"--teacher-dtype applies to hf: teachers, not to --teacher "
                             f"{args.teacher}")
        teacher = resolve_teacher(args.teacher, args.teacher_checkpoint,
                                  teacher_dtype=args.teacher_dtype, progress=not args.quiet)
        # text rows are tokenized with --tokenizer, else with an hf: teacher's own tokenizer
        tokenizer = args.tokenizer or (args.teacher[len("hf:"):]
                                       if args.teacher.startswith("hf:") else None)
        explicit = [option for option, value in (("--tokenizer", args.tokenizer),
                                                 ("--max-length", args.max_length))
                    if value is not None]
        dataset = resolve_dataset(args.dataset, args.data_root, args.data_split,
                                  tokenizer=tokenizer, max_length=args.max_length,
                                  explicit=explicit)
        manifest = write_cache(
            teacher, dataset, args.out, batch_size=args.batch_size, num_workers=args.num_workers,
            device=device, dtype=args.dtype, shard_size_mb=args.shard_size_mb, top_k=args.top_k,
            sample=args.sample, temperature=args.temperature,
            proposal_temperature=args.proposal_temperature, seed=args.seed,
            overwrite=args.overwrite, clamp=args.clamp, progress=not args.quiet,
            teacher_spec=args.teacher, dataset_spec=args.dataset,
            output_fn=output_key_fn(args.output_key) if args.output_key else None)
    except (ValueError, TypeError, TeacherError, DatasetError) as error:  # CacheError: a ValueError
        return fail(str(error))
    except OSError as error:
        return fail_os(error)
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    return _summarize(args, manifest) if ranks["RANK"] == 0 else 0


def run_verify(args) -> int:
    from fastkd.cache.reader import LogitCache
    try:
        cache = LogitCache(args.dir)
        cache.verify()
    except (fmt.CacheError, OSError) as error:
        return fail(str(error))
    files = len(fmt.manifest_files(cache.manifest))
    print(f"ok: {args.dir}: {files} files match their sha256 and the manifest ({len(cache)} "
          f"samples, {cache.num_rows} rows)")
    return 0


def summary(directory: str, manifest: dict) -> str:
    """Human-readable description of a cache."""
    entries = fmt.manifest_files(manifest)
    total = sum(entry["bytes"] for entry in entries)
    layout = fmt.describe_layout(manifest)
    fingerprint = manifest["dataset"]["fingerprint"]
    lines = [
        f"cache      {directory}  ({manifest['status']}, {manifest['format']} "
        f"v{manifest['format_version']}, fastkd {manifest.get('fastkd_version') or 'unknown'})",
        f"created    {manifest.get('created') or 'unknown'}",
        f"teacher    {_described(manifest['teacher'])}  "
        f"({_teacher_hash_name(manifest)} sha256 {manifest['teacher']['fingerprint'][:16]}...)",
        f"dataset    {_described(manifest['dataset'])}  "
        f"({fingerprint['length']} items, sha256 {fingerprint['sha256'][:16]}...)",
        _rows_line(manifest),
        f"layout     {layout}, V={manifest['num_classes']}, {_values_line(manifest)}, labels: "
        f"{manifest['labels_per'] or 'none'}, clamped values: {manifest.get('clamped_values', 0)}",
        _bytes_line(manifest),
        f"storage    {len(manifest['shards'])} shards, {len(entries)} files, "
        f"{total / 2 ** 20:.2f} MiB",
    ]
    return "\n".join(lines)


def _described(part: dict) -> str:
    """The teacher's or dataset's spec, else its class: descriptive fields, which the manifest
    validator checks only for type, so either may be absent."""
    return part.get("spec") or part.get("class") or "unknown"


def _values_line(manifest: dict) -> str:
    """The cache dtype, and what temperature sparse rows belong to."""
    if manifest["layout"] == "sampled":
        proposal = manifest.get("proposal_temperature")
        if proposal is None:   # format version 2
            return (f"{manifest['sample']} draws at T={_numbers(manifest['temperatures'])} with "
                    f"seed {manifest['seed']}")
        mean = fmt.mean_distinct(manifest)
        weights = "importance weights" if fmt.is_weighted(manifest) else "counts"
        return (f"{manifest['sample']} draws, target for T={_numbers(manifest['temperatures'])}, "
                f"drawn at T={proposal:g} ({weights}) with seed {manifest['seed']}; "
                f"{mean:.2f} distinct ids per row on average")
    temperatures = manifest.get("temperatures") or ([1.0] if manifest["layout"] == "topk" else
                                                    None)
    if temperatures is None:
        return manifest["dtype"]
    return f"{manifest['dtype']} values, lse at T={_numbers(temperatures)}"


def _numbers(values) -> str:
    return ", ".join(f"{value:g}" for value in values)


def _bytes_line(manifest: dict) -> str:
    sizes = fmt.bytes_per_row(manifest)
    per_entry = fmt.entry_array_names(manifest)
    mean = fmt.mean_distinct(manifest)
    arrays = ", ".join(f"{name} {np_dtype.itemsize} x {mean:.2f}" if name in per_entry else
                       f"{name} {np_dtype.itemsize * int(np.prod(shape))}"
                       for name, (np_dtype, shape) in fmt.manifest_row_arrays(manifest).items())
    # (V is unknown until an incomplete cache has its first shard)
    dense = f"; dense fp16 would be {2 * manifest['num_classes']:,}" \
        if manifest["layout"] in fmt.SPARSE_K_FIELD and manifest["num_classes"] else ""
    return (f"bytes/row  {sizes['teacher']:,.4g} teacher ({arrays}) + {sizes['labels']:.4g} "
            f"labels; {sizes['files']:,.1f} in all files{dense}")


def _rows_line(manifest: dict) -> str:
    per_sample = "variable" if manifest["rows_per_sample"] == "variable" else "one"
    if manifest["status"] == "complete":
        return (f"rows       {manifest['num_samples']} samples, {manifest['num_rows']} rows "
                f"({per_sample} per sample)")
    shards = manifest["shards"]
    done = shards[-1]["sample_stop"] - manifest["sample_range"][0] if shards else 0
    return (f"rows       {done} of {manifest['dataset']['fingerprint']['length']} samples cached "
            f"so far; re-run the same `fastkd cache` command to resume")


def run_info(args) -> int:
    try:
        manifest = fmt.read_manifest(args.dir)
    except fmt.CacheError as error:
        return fail(str(error))
    print(summary(args.dir, manifest))
    return 0


def _import_teacher_dataset(args) -> int:
    from fastkd.cache.distillkit import import_teacher_dataset
    # options not given keep import_teacher_dataset's own defaults
    given = {key: getattr(args, key) for key in ("split", "row_offset", "max_excess_mass")
             if getattr(args, key) is not None}
    try:
        manifest = import_teacher_dataset(
            args.files, args.out, source=args.source, vocab_size=args.vocab_size,
            top_k=args.top_k, compression_config=args.compression_config, dtype=args.dtype,
            shard_size_mb=args.shard_size_mb, overwrite=args.overwrite, progress=not args.quiet,
            **given)
    except ValueError as error:  # TeacherDatasetError, TableError, FormatError, CacheError
        return fail(str(error))
    except OSError as error:
        return fail_os(error)
    return _summarize(args, manifest)


def run_import(args) -> int:
    """``fastkd import``: :func:`fastkd.cache.importer.import_served` with the parsed options, or
    a teacher dataset of another tool (:mod:`fastkd.cache.distillkit`)."""
    from fastkd.cache.distillkit import SOURCE_OPTIONS
    ignored = [option for key, (option, sources) in SOURCE_OPTIONS.items()
               if getattr(args, key) is not None and args.source not in sources]
    if ignored:  # a usage error, answered before torch is imported
        print(f"fastkd import: error: {' and '.join(ignored)} "
              f"{'do' if len(ignored) > 1 else 'does'} not apply to --from {args.source}",
              file=sys.stderr)
        return 2
    if args.source != "vllm":
        return _resuming(_import_teacher_dataset, args)
    missing = [flag for flag, value in (("--vocab-size", args.vocab_size),
                                        ("--top-k", args.top_k)) if value is None]
    if missing:  # a usage error, answered before torch is imported
        print(f"fastkd import: error: --from vllm needs {' and '.join(missing)}",
              file=sys.stderr)
        return 2
    from fastkd.cache.importer import import_served
    try:
        manifest = import_served(args.files, args.out, vocab_size=args.vocab_size,
                                 top_k=args.top_k, dtype=args.dtype,
                                 shard_size_mb=args.shard_size_mb, overwrite=args.overwrite,
                                 progress=not args.quiet, source=args.source)
    except (ValueError, TypeError, FileNotFoundError) as error:
        return fail(str(error))
    return _summarize(args, manifest)
