"""The work behind ``fastkd demo`` (the steps are :mod:`fastkd.demo_cli`'s docstring)."""
import contextlib
import errno
import os
import tempfile
import time
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import fastkd
from fastkd import models
from fastkd.cache import CacheError, resolve_device
from fastkd.cache.files import write_atomic
from fastkd.cache.outdir import make_directory, owned_files

__all__ = ["run_demo", "DemoError", "format_table", "fit", "accuracy", "textbook_kd_loss",
           "loss_throughput", "loss_path", "throughput_lines", "LabelledSubset", "label_mask",
           "seeded_loader", "reproducible_cpu"]

TEACHER_SPEC = "fastkd.models:DigitsTeacherCNN"
DATASET_SPEC = "fastkd.models:digits_train_dataset"
CHECKPOINT_NAME = "teacher.pt"     # the teacher's weights, in --out
CACHE_DIR_NAME = "teacher-logits"  # the `fastkd cache` output, in --out
IGNORE_INDEX = -100


class DemoError(RuntimeError):
    """The demo cannot go on: ``--out`` cannot be written (the message names the path and what
    to do), or the ``fastkd cache`` step failed; that step has then printed its own one-line
    error already (``reported``) and ``status`` is its exit status."""

    def __init__(self, message: str, status: int = 1, reported: bool = False):
        super().__init__(message)
        self.status, self.reported = status, reported


class LabelledSubset(torch.utils.data.Dataset):
    """Items ``(input, label, *rest)`` of ``dataset`` at ``positions`` (default all), the label
    ``ignore_index`` outside the bool mask ``labelled``."""

    def __init__(self, dataset, labelled: torch.Tensor, positions: Optional[List[int]] = None,
                 ignore_index: int = IGNORE_INDEX):
        self.dataset, self.labelled, self.ignore_index = dataset, labelled, ignore_index
        self.positions = list(range(len(dataset))) if positions is None else list(positions)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index):
        position = self.positions[index]
        inputs, label, *rest = self.dataset[position]
        label = torch.as_tensor(label if self.labelled[position] else self.ignore_index)
        return (inputs, label, *rest)


def label_mask(num_items: int, fraction: float, seed: int) -> torch.Tensor:
    """Bool mask with ``round(fraction * num_items)`` (at least 1) seeded random True entries."""
    generator = torch.Generator().manual_seed(seed)
    count = max(1, round(fraction * num_items))
    mask = torch.zeros(num_items, dtype=torch.bool)
    mask[torch.randperm(num_items, generator=generator)[:count]] = True
    return mask


def seeded_loader(dataset, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    """Shuffled loader whose order depends only on ``seed``."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed))


def hard_label_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over labelled rows (``ignore_index`` rows skipped; 0 if none)."""
    kept = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return F.cross_entropy(student_logits, labels, ignore_index=IGNORE_INDEX,
                           reduction="sum") / kept


def fit(model: nn.Module, loader, loss_fn: Callable, *, epochs: int, lr: float,
        device: torch.device, teacher: Optional[nn.Module] = None, progress: bool = True,
        desc: str = "train") -> List[float]:
    """Adam training loop over ``(inputs, labels[, cached teacher_logits])`` batches (else an
    online ``teacher``, if given); ``loss_fn(student_logits, labels, teacher_logits_or_None)``.
    Returns the loss of every step."""
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    step_losses = []
    with tqdm(total=epochs * len(loader), desc=desc, unit="step", disable=not progress,
              leave=False, dynamic_ncols=True) as bar:
        for _ in range(epochs):
            model.train()
            for inputs, labels, *cached in loader:
                inputs, labels = inputs.to(device), labels.to(device)
                teacher_logits = cached[0].to(device) if cached else None
                if teacher_logits is None and teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher.eval()(inputs)
                loss = loss_fn(model(inputs), labels, teacher_logits)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step_losses.append(loss.item())
                bar.set_postfix(loss=f"{step_losses[-1]:.3f}", refresh=False)
                bar.update()
    return step_losses


@torch.no_grad()
def accuracy(model: nn.Module, dataset, device: torch.device, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` over ``(input, label)`` items of ``dataset``."""
    model.eval()
    correct = 0
    for inputs, labels in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        correct += (model(inputs.to(device)).argmax(-1).cpu() == labels).sum().item()
    return correct / len(dataset)


def distillation_loss(temperature: float, hard_weight: float) -> Callable:
    """``T^2 KL(p_t || p_s)`` on every row (fused ``kd_loss``) + ``hard_weight`` * CE on labelled
    rows."""
    def loss_fn(student_logits, labels, teacher_logits):
        soft = fastkd.kd_loss(student_logits, teacher_logits, None, temperature=temperature,
                              soft_weight=1.0, hard_weight=0.0)
        return soft + hard_weight * hard_label_loss(student_logits, labels)
    return loss_fn


def textbook_kd_loss(student_logits, teacher_logits, labels, temperature=4.0, soft_weight=0.5,
                     hard_weight=0.5):
    """The usual eager composition (Hinton et al. 2015) that fastkd replaces, also the
    benchmarks' eager baseline: ``soft_weight * T^2 * KL(p_t || p_s) + hard_weight * CE``."""
    teacher_logits = teacher_logits.to(student_logits.dtype)  # e.g. an fp16 cache, bf16 student
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    soft = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    return (soft_weight * temperature ** 2 * soft
            + hard_weight * F.cross_entropy(student_logits, labels))


def loss_throughput(loss_fn: Callable, rows: int, vocab: int, device: torch.device,
                    repeats: int = 3, dtype=torch.float32) -> float:
    """Seconds for one forward + backward of ``loss_fn`` at ``(rows, vocab)``, best of
    ``repeats``."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    student = torch.randn(rows, vocab, generator=generator).to(device, dtype).requires_grad_()
    teacher = torch.randn(rows, vocab, generator=generator).to(device, dtype)
    labels = torch.randint(0, vocab, (rows,), generator=generator).to(device)

    def step():
        student.grad = None
        loss_fn(student, teacher, labels).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()  # warm-up (kernel compilation, allocator)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best


def _parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


@contextlib.contextmanager
def reproducible_cpu():
    """Deterministic kernels and one CPU thread for the block: the tiny models' float32 results
    then do not depend on the core count (and no OpenMP threads spin on a busy machine)."""
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        torch.set_num_threads(previous_threads)


def prepare_out_dir(out_dir: str) -> None:
    """Create ``out_dir`` and check, before any training, that the demo can write its teacher
    checkpoint there; a DemoError names what is in the way."""
    try:
        make_directory(out_dir)   # the checks and messages of `fastkd cache --out`
    except CacheError as error:
        raise DemoError(str(error)) from None
    checkpoint = os.path.join(out_dir, CHECKPOINT_NAME)
    if os.path.isdir(checkpoint):
        raise DemoError(f"cannot save the teacher checkpoint {checkpoint}: it is a directory; "
                        f"remove it or choose another --out")
    # the demo replaces the cache in its own folder (`fastkd cache --overwrite`), which
    # refuses a folder of other files: say so now, not after training the teacher
    cache_dir = os.path.join(out_dir, CACHE_DIR_NAME)
    if os.path.lexists(cache_dir) and not os.path.isdir(cache_dir):
        raise DemoError(f"{cache_dir} is in the way of the demo's teacher cache: it is not a "
                        f"directory; remove it or choose another --out")
    try:
        foreign = os.path.isdir(cache_dir) and owned_files(cache_dir,
                                                           os.listdir(cache_dir)) is None
    except (CacheError, OSError):
        foreign = True   # an unreadable manifest: `fastkd cache` could not replace it either
    if foreign:
        raise DemoError(f"{cache_dir} holds files that are not a fastkd cache, and the demo "
                        f"writes its teacher cache there; move them or choose another --out")


def save_checkpoint(state_dict: dict, checkpoint: str) -> None:
    """``torch.save`` through a temp file renamed into place (:func:`write_atomic`): a failed
    write (disk full) leaves no partial checkpoint; the OSError becomes a DemoError naming
    the file."""
    try:
        write_atomic(checkpoint, lambda handle: torch.save(state_dict, handle))
    except OSError as error:
        space = error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
        raise DemoError(f"cannot save the teacher checkpoint {checkpoint}: "
                        f"{error.strerror or error}; "
                        f"{'free some space or ' if space else ''}choose another --out") from None


def cache_teacher_logits(teacher: nn.Module, out_dir: str, device: torch.device,
                         quiet: bool) -> str:
    """Save the teacher's weights and run the real ``fastkd cache`` command on the train split.
    When that command fails, it has printed why; the DemoError only stops the demo."""
    from fastkd.cli import main as fastkd_main
    checkpoint = os.path.join(out_dir, CHECKPOINT_NAME)
    save_checkpoint(teacher.state_dict(), checkpoint)
    cache_dir = os.path.join(out_dir, CACHE_DIR_NAME)
    argv = ["cache", "--teacher", TEACHER_SPEC, "--teacher-checkpoint", checkpoint,
            "--dataset", DATASET_SPEC, "--out", cache_dir, "--device", device.type,
            "--dtype", "fp16", "--overwrite"] + (["--quiet"] if quiet else [])
    status = fastkd_main(argv)
    if status != 0:
        raise DemoError(f"`fastkd {' '.join(argv)}` failed with exit code {status}",
                        status=status, reported=True)
    return cache_dir


def run_demo(*, epochs: int = 20, device: str = "auto", out_dir: Optional[str] = None,
             label_fraction: float = 0.1, temperature: float = 4.0, hard_weight: float = 0.5,
             seed: int = 0, quick: bool = False, progress: bool = True,
             bench_shape=None) -> dict:
    """Run the demo; returns the figures printed in the table (accuracies in [0, 1]). Raises
    ValueError for a bad argument, DemoError where ``out_dir`` cannot take the outputs."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not 0.0 < label_fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {label_fraction}")
    device = resolve_device(device)
    if out_dir:
        prepare_out_dir(out_dir)
    else:
        try:
            out_dir = tempfile.mkdtemp(prefix="fastkd-demo-")
        except OSError as error:
            raise DemoError(f"cannot create a temporary directory for the outputs "
                            f"({error.strerror or error}); give --out") from None
    train_set, held_out = models.digits_train_dataset(), models.digits_held_out_dataset()
    positions = list(range(len(train_set)))
    if quick:  # seconds-long smoke mode: a quarter of the training images, tiny benchmark
        positions = positions[: len(train_set) // 4]
    results = {"out_dir": out_dir, "device": str(device), "train_size": len(positions),
               "held_out_size": len(held_out)}
    started = time.perf_counter()
    # on CUDA the deterministic-algorithms switch would only add cuBLAS warnings
    with reproducible_cpu() if device.type == "cpu" else contextlib.nullcontext():
        # 1. teacher, all labels of the training split
        torch.manual_seed(seed)
        teacher = models.DigitsTeacherCNN()
        all_labelled = torch.ones(len(train_set), dtype=torch.bool)
        fit(teacher, seeded_loader(LabelledSubset(train_set, all_labelled, positions), 64, seed),
            lambda logits, labels, _: hard_label_loss(logits, labels), epochs=epochs, lr=3e-3,
            device=device, progress=progress, desc="teacher")
        results["teacher_accuracy"] = accuracy(teacher, held_out, device)

        # 2. cache the teacher's logits with `fastkd cache`
        cache_dir = cache_teacher_logits(teacher.cpu(), out_dir, device, quiet=not progress)
        cache = fastkd.LogitCache(cache_dir)
        results["cache_bytes"] = sum(os.path.getsize(os.path.join(root, name))
                                     for root, _, names in os.walk(cache_dir) for name in names)
        results["cache_rows"] = len(cache)
        results["cache_classes"] = cache.num_classes

        # 3. the same student twice: scratch vs distilled from the cache
        labelled = label_mask(len(train_set), label_fraction, seed)
        results["labelled"] = int(labelled[positions].sum())
        student_loss = distillation_loss(temperature, hard_weight)
        runs = {
            "scratch": (LabelledSubset(train_set, labelled, positions),
                        lambda logits, labels, _: hard_label_loss(logits, labels)),
            "distilled": (LabelledSubset(fastkd.CachedDataset(train_set, cache), labelled,
                                         positions), student_loss),
        }
        for name, (dataset, loss_fn) in runs.items():
            torch.manual_seed(seed + 1)
            student = models.DigitsStudentCNN()
            fit(student, seeded_loader(dataset, 64, seed + 1), loss_fn, epochs=epochs, lr=1e-2,
                device=device, progress=progress, desc=f"student ({name})")
            results[f"{name}_accuracy"] = accuracy(student, held_out, device)
        results["student_parameters"] = _parameter_count(student)
        results["teacher_parameters"] = _parameter_count(teacher)

    # 4. loss throughput, fused vs textbook (forward + backward, fp32): at the shape this demo
    # trains with (its own batches) and at a labelled large-vocabulary shape
    batch_rows, num_classes = 64, results["cache_classes"]   # seeded_loader(..., 64, ...)
    if bench_shape is None:
        bench_shape = (128, 1024) if quick else ((8192, 32000) if device.type == "cuda"
                                                 else (1024, 8192))
    shapes = [("this demo's batches", (batch_rows, num_classes)),
              ("large vocabulary", tuple(bench_shape))]

    def fused(student, teacher_logits, labels):
        return fastkd.kd_loss(student, teacher_logits, labels, temperature=4.0)

    results["loss_path"] = loss_path(device)
    results["throughput"] = []
    for label, (rows, vocab) in shapes:
        repeats = 20 if rows * vocab < 1e5 else 3
        results["throughput"].append({
            "label": label, "rows": rows, "vocab": vocab,
            "fused_seconds": loss_throughput(fused, rows, vocab, device, repeats),
            "textbook_seconds": loss_throughput(textbook_kd_loss, rows, vocab, device, repeats)})
    large = results["throughput"][-1]
    results["bench_shape"] = (large["rows"], large["vocab"])
    results["fused_seconds"] = large["fused_seconds"]
    results["textbook_seconds"] = large["textbook_seconds"]
    results["wall_seconds"] = time.perf_counter() - started
    return results


def loss_path(device: torch.device) -> str:
    """Which implementation ``kd_loss`` runs on ``device``, in words."""
    if device.type == "cuda":
        return "the Triton kernel"
    from fastkd.kernels import kd_loss_cpu
    if kd_loss_cpu.available():
        return "the compiled CPU kernel"
    return f"PyTorch ops ({kd_loss_cpu.unavailable_reason()})"


def throughput_lines(throughput, path: str = "") -> List[str]:
    """One line per timed shape: both times, the speed-up, and a plain word where fastkd is not
    faster."""
    through = f" ({path})" if path else ""
    lines = [f"  loss forward+backward, fp32, best of several calls{through}:",
             f"    {'shape':<38}{'fastkd.kd_loss':>16}{'textbook eager':>16}  speed-up"]
    for entry in throughput:
        shape = f"{entry['rows']} x {entry['vocab']} ({entry['label']})"
        speedup = entry["textbook_seconds"] / entry["fused_seconds"]
        verdict = "" if speedup >= 1.0 else "  (fastkd is SLOWER here)"
        lines.append(f"    {shape:<38}{entry['fused_seconds'] * 1e3:13.3f} ms"
                     f"{entry['textbook_seconds'] * 1e3:13.3f} ms  {speedup:.2f}x{verdict}")
    return lines


def format_table(results: dict) -> str:
    """The demo's report as aligned plain text."""
    lines = [
        f"fastkd demo: scikit-learn digits, {results['train_size']} training / "
        f"{results['held_out_size']} held-out images, device {results['device']}",
        f"(students see the labels of {results['labelled']} of the {results['train_size']} "
        "training images; the teacher saw all of them)",
        "",
        f"  {'model':<42}{'params':>9}  held-out accuracy",
        f"  {'teacher CNN':<42}{results['teacher_parameters']:>9,}  "
        f"{results['teacher_accuracy']:.1%}",
        f"  {'student, from scratch (labels only)':<42}{results['student_parameters']:>9,}  "
        f"{results['scratch_accuracy']:.1%}",
        f"  {'student, distilled from the logit cache':<42}{results['student_parameters']:>9,}  "
        f"{results['distilled_accuracy']:.1%}",
        "",
        f"  teacher-logit cache: {results['cache_rows']} rows, "
        f"{results['cache_bytes'] / 1024:.1f} KiB on disk",
        *throughput_lines(results["throughput"], results.get("loss_path", "")),
        "",
        f"  outputs in {results['out_dir']}; total {results['wall_seconds']:.1f} s",
    ]
    return "\n".join(lines)
