"""Cache benchmarks: write overhead against the teacher's forward, read throughput from the page
cache, training steps/s with cached vs online teacher logits, and bytes per token of dense,
top-k and sampled token caches (workloads in cache_workloads)."""
import statistics

import pytest

from benchmarks import cache_workloads as work


def _cache_api_missing():
    try:
        from fastkd.cache import CachedDataset, LogitCache, write_cache  # noqa: F401
    except ImportError as error:
        return f"fastkd.cache API not importable: {error}"
    return None


pytestmark = pytest.mark.skipif(_cache_api_missing() is not None,
                                reason=str(_cache_api_missing()))


def _record(benchmark, metric, workload, **figures):
    benchmark.extra_info.update(kind="cache", metric=metric, workload=workload, **figures)


def _timed(benchmark) -> bool:
    """False under --benchmark-disable (each workload then ran once, untimed)."""
    return benchmark.enabled


@pytest.fixture(scope="module")
def config(preset, environment):
    return preset.cache


@pytest.fixture(scope="module")
def read_cache(config, device, tmp_path_factory):
    return work.synthetic_logit_cache(tmp_path_factory.mktemp("read_cache"), config.read_rows,
                                      config.read_vocab, device)


def test_cache_write(benchmark, config, device, tmp_path):
    """Overhead % = the median over rounds of (write pass's time besides the teacher's forward -
    bare pass's time besides it) / bare pass. Each round's untimed setup runs the bare pass (the
    teacher over the same loader, nothing written) just before the timed write pass; the teacher
    clocks its own forward calls (``ForwardClock``), so its run-to-run spread, as large as the
    writer's cost on a shared CPU, drops out."""
    dataset = work.image_dataset(config.write_images, config.write_classes)
    teacher = work.ForwardClock(work.resnet_teacher(config.write_classes, device), device)
    work.teacher_forward_pass(teacher, dataset, config.write_batch, device)  # warm-up
    bare, bare_teacher, write_teacher = [], [], []

    def bare_pass():
        teacher.seconds = 0.0
        bare.append(work.teacher_forward_pass(teacher, dataset, config.write_batch, device))
        bare_teacher.append(teacher.seconds)

    def write_pass():
        teacher.seconds = 0.0
        work.write_cache_pass(teacher, dataset, tmp_path / "cache", config.write_batch, device)
        write_teacher.append(teacher.seconds)

    benchmark.group = "cache write"
    benchmark.pedantic(write_pass, setup=bare_pass, rounds=config.write_rounds)
    if not _timed(benchmark):
        return
    write = benchmark.stats.stats.data   # one pass per round, in the order of the lists above
    added = [(w - wt) - (b - bt) for w, wt, b, bt in zip(write, write_teacher, bare, bare_teacher)]
    written = work.cache_bytes(tmp_path / "cache")
    median_s = benchmark.stats.stats.median
    _record(benchmark, "write",
            f"resnet18 teacher, {config.write_images} CIFAR-shaped images, V={config.write_classes}, "
            f"batch {config.write_batch}, fp16",
            teacher_forward_s=statistics.median(bare),
            added_s=statistics.median(added),
            overhead_pct=100.0 * statistics.median(a / b for a, b in zip(added, bare)),
            rounds_s={"write": write, "write_teacher": write_teacher, "bare": bare,
                      "bare_teacher": bare_teacher},
            rows_per_s=config.write_images / median_s, mb_per_s=written / median_s / 1e6,
            bytes_written=written)


@pytest.mark.parametrize("pattern", ["sequential", "gather"])
def test_cache_read(benchmark, config, read_cache, pattern):
    """GB/s = bytes of logits delivered per pass over the whole cache / median pass time (goal:
    >= 2 GB/s each way, evaluated in benchmarks/report.py)."""
    staging = work.staging_buffer(read_cache, config.read_batch)
    if pattern == "sequential":
        args = (read_cache, config.read_batch, staging)
        read_pass = work.read_sequential_pass
    else:
        args = (read_cache, config.read_batch)
        read_pass = work.read_gather_pass
    read_pass(*args)  # warm-up: every page into the page cache
    benchmark.group = "cache read"
    bytes_read = benchmark.pedantic(read_pass, args=args, rounds=config.read_rounds)
    if not _timed(benchmark):
        return
    median_s = benchmark.stats.stats.median
    _record(benchmark, f"read_{pattern}",
            f"{config.read_rows} x {config.read_vocab} {staging.dtype} cache, batch {config.read_batch}"
            f", {'cache.rows(i, i+B, out=staging)' if pattern == 'sequential' else 'cache.gather(random indices)'}",
            gbps=bytes_read / median_s / 1e9, rows_per_s=config.read_rows / median_s,
            bytes_read=bytes_read)


@pytest.mark.parametrize("layout", list(work.BYTES_LAYOUTS))
def test_cache_bytes_per_token(benchmark, config, device, tmp_path, layout):
    """Bytes per token of a V = 32000 language-model teacher's cache: every file (headers,
    lengths, offsets) / tokens, and the teacher arrays and labels of one row. Deterministic; the
    time is that of writing the cache."""
    from fastkd.cache import LogitCache
    dataset = work.TokenSequences(config.bytes_sequences, config.bytes_length, config.bytes_vocab)
    teacher = work.token_teacher(config.bytes_vocab, device)
    out = tmp_path / layout
    benchmark.group = "cache bytes"
    benchmark.pedantic(work.write_token_cache, args=(teacher, dataset, out, layout,
                                                     config.bytes_k, device), rounds=1)
    cache = LogitCache(out)
    sizes = cache.bytes_per_row
    name = "dense fp16" if layout == "dense" else f"--{layout.replace('_', '-')} {config.bytes_k}"
    _record(benchmark, f"bytes_{layout}",
            f"{name}, V={config.bytes_vocab}, {cache.num_rows} tokens "
            f"({config.bytes_sequences} x {config.bytes_length})",
            bytes_per_token=work.cache_bytes(out) / cache.num_rows,
            teacher_bytes_per_token=sizes["teacher"], label_bytes_per_token=sizes["labels"],
            vocab=config.bytes_vocab, k=None if layout == "dense" else config.bytes_k)


@pytest.fixture(scope="module")
def train_setup(config, device, tmp_path_factory):
    """Teacher, data and the teacher's cache for the training comparison (written untimed)."""
    from fastkd.cache import CachedDataset, LogitCache
    dataset = work.image_dataset(config.train_images, config.train_classes, seed=1)
    teacher = work.resnet_teacher(config.train_classes, device)
    cache_dir = tmp_path_factory.mktemp("train_cache")
    work.write_cache_pass(teacher, dataset, cache_dir, config.write_batch, device)
    return teacher, dataset, CachedDataset(dataset, LogitCache(cache_dir))


@pytest.mark.parametrize("teacher_source", ["cached", "online"])
def test_cache_train(benchmark, config, device, train_setup, teacher_source):
    """Steps/s of the small CNN student: teacher logits from the cache vs the teacher run online."""
    import torch
    teacher, dataset, cached_dataset = train_setup
    torch.manual_seed(0)
    student = work.SmallStudentCNN(config.train_classes).to(device)
    step = work.make_train_step(student, device)
    if teacher_source == "cached":
        def run():
            work.train_cached(step, cached_dataset, config.train_batch, config.train_steps, device)
    else:
        def run():
            work.train_online(step, teacher, dataset, config.train_batch, config.train_steps, device)
    run()  # warm-up
    benchmark.group = "cache train"
    benchmark.pedantic(run, rounds=config.train_rounds)
    if not _timed(benchmark):
        return
    median_s = benchmark.stats.stats.median
    figures = {"steps_per_s": config.train_steps / median_s}
    if teacher_source == "online":
        figures["teacher_to_student_cost"] = work.teacher_to_student_cost(
            teacher, step, dataset, config.train_batch, device)
    _record(benchmark, f"train_{teacher_source}",
            f"small CNN student, resnet18 teacher ({teacher_source}), batch {config.train_batch}, "
            f"{config.train_steps} steps, V={config.train_classes}", **figures)
