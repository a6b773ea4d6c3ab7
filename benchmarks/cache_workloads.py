"""Workloads for the teacher-logit cache benchmarks (fastkd.cache), CIFAR-shaped random data.

- write: ``fastkd.cache.write_cache`` of a torchvision resnet18 teacher against the teacher's bare
  forward pass over the same loader. The teacher clocks its own forward calls
  (:class:`ForwardClock`), so each pass splits into the teacher's time and the rest; the overhead
  of caching is the difference of the rests.
- read: a synthetic ``rows x vocab`` fp16 cache read back from the page cache by sequential
  slices and by random batch gathers, each pass delivering every row once as a batch in memory:
  slices by ``cache.rows(i, i + B, out=staging)`` into a preallocated staging buffer (as a
  training loop stages a batch before the host-to-device copy), gathers by ``cache.gather``
  into new tensors.
- train: a small CNN student distilled with ``fastkd.kd_loss`` from cached logits vs from the
  resnet18 teacher run online each step.
- bytes: bytes per token of a language-model teacher's cache (V = 32000): dense fp16 against
  ``--top-k K`` and ``--sample K`` (format version 3: sampled rows keep their distinct ids).
Random inputs: throughput does not depend on what the pixels are.
"""
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.env import synchronize

TEMPERATURE = 2.0


def image_dataset(num_images: int, num_classes: int, seed: int = 0) -> TensorDataset:
    """``(image (3, 32, 32) float32, label int64)`` pairs of random data."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn((num_images, 3, 32, 32), generator=generator)
    labels = torch.randint(0, num_classes, (num_images,), generator=generator)
    return TensorDataset(images, labels)


def resnet_teacher(num_classes: int, device: str) -> nn.Module:
    """torchvision resnet18, randomly initialised (no weights are downloaded)."""
    from fastkd.extras import require
    torchvision = require("torchvision", "bench", "the cache benchmarks")
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=num_classes).to(device).eval()


class ForwardClock(nn.Module):
    """``teacher`` that adds the seconds of each of its forward calls (to the end of the device's
    work) to ``seconds``. A pass's time minus ``seconds`` is what surrounds the teacher: loading,
    collation and, in a cache write, the writer's own work. Taking the teacher's time out leaves
    the writer's cost free of the teacher's run-to-run spread, which on a shared CPU is as large
    as that cost."""

    def __init__(self, teacher: nn.Module, device: str):
        super().__init__()
        self.teacher, self.device, self.seconds = teacher, device, 0.0

    def forward(self, inputs):
        start = time.perf_counter()
        output = self.teacher(inputs)
        synchronize(self.device)
        self.seconds += time.perf_counter() - start
        return output


class SmallStudentCNN(nn.Module):
    """Two 3x3 conv blocks (8 and 16 channels) and a linear head: ``(B, 3, 32, 32) -> (B, classes)``.
    """

    def __init__(self, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(16 * 8 * 8, num_classes)

    def forward(self, images):
        return self.head(self.features(images).flatten(1))


def cache_bytes(cache_dir: Path) -> int:
    return sum(path.stat().st_size for path in Path(cache_dir).rglob("*") if path.is_file())


# ----------------------------------------------------------------------------- write
def teacher_forward_pass(teacher: nn.Module, dataset, batch_size: int, device: str) -> float:
    """Seconds for the teacher's bare forward over ``dataset`` (same loader as the cache writer)."""
    start = time.perf_counter()
    with torch.inference_mode():
        for images, _ in DataLoader(dataset, batch_size=batch_size):
            teacher(images.to(device))
    synchronize(device)
    return time.perf_counter() - start


def write_cache_pass(teacher: nn.Module, dataset, out_dir: Path, batch_size: int,
                     device: str) -> dict:
    from fastkd.cache import write_cache
    manifest = write_cache(teacher, dataset, out_dir, batch_size=batch_size, device=device,
                           dtype="fp16", overwrite=True, progress=False)
    synchronize(device)
    return manifest


# ----------------------------------------------------------------------------- read
def synthetic_logit_cache(out_dir: Path, rows: int, vocab: int, device: str = "cpu",
                          feature_dim: int = 64):
    """Write a ``rows x vocab`` fp16 cache with a linear "teacher"; returns ``LogitCache``."""
    from fastkd.cache import LogitCache, write_cache
    generator = torch.Generator().manual_seed(0)
    features = torch.randn((rows, feature_dim), generator=generator)
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    torch.manual_seed(0)
    teacher = nn.Linear(feature_dim, vocab).to(device).eval()
    write_cache(teacher, TensorDataset(features, labels), out_dir, batch_size=512, device=device,
                dtype="fp16", overwrite=True, progress=False)
    return LogitCache(out_dir)


def staging_buffer(cache, batch_size: int) -> torch.Tensor:
    """A preallocated ``(batch_size, V)`` buffer of the cache's dtype."""
    first = torch.as_tensor(cache[0:1])
    return torch.empty((batch_size,) + tuple(first.shape[1:]), dtype=first.dtype)


def read_sequential_pass(cache, batch_size: int, staging: torch.Tensor) -> int:
    """Read every row by slices into ``staging``, ``cache.rows(i, i + B, out=staging[:B])``;
    returns the bytes read."""
    total = 0
    for start in range(0, cache.num_rows, batch_size):
        stop = min(start + batch_size, cache.num_rows)
        batch = cache.rows(start, stop, out=staging[:stop - start])
        total += batch.numel() * batch.element_size()
    return total


def read_gather_pass(cache, batch_size: int, seed: int = 0) -> int:
    """Read every row once in random batches via ``cache.gather`` (which copies); returns the
    bytes read."""
    order = torch.randperm(len(cache), generator=torch.Generator().manual_seed(seed))
    total = 0
    for indices in order.split(batch_size):
        batch = torch.as_tensor(cache.gather(indices))
        total += batch.numel() * batch.element_size()
    return total


# ----------------------------------------------------------------------------- bytes
class TokenSequences(torch.utils.data.Dataset):
    """``num_sequences`` random token sequences of ``length``: items ``{"input_ids", "labels"}``
    with next-token labels (the last one -100), as a language-model dataset gives them."""

    def __init__(self, num_sequences: int, length: int, vocab: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, vocab, (num_sequences, length), generator=generator)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index):
        tokens = self.tokens[index]
        return {"input_ids": tokens, "labels": torch.cat([tokens[1:], torch.tensor([-100])])}


def token_teacher(vocab: int, device: str) -> nn.Module:
    """A one-layer ``fastkd.models.TinyCausalLM`` with a ``vocab``-wide head (random weights)."""
    from fastkd.models import TinyCausalLM
    torch.manual_seed(0)
    return TinyCausalLM(vocab, dim=32, num_layers=1, num_heads=2, max_len=1024).to(device).eval()


# name -> write_cache keyword arguments of the layouts compared (K filled in by the caller)
BYTES_LAYOUTS = {"dense": lambda k: {}, "top_k": lambda k: {"top_k": k},
                 "sample": lambda k: {"sample": k}}


def write_token_cache(teacher: nn.Module, dataset, out_dir: Path, layout: str, k: int,
                      device: str) -> dict:
    """Cache ``dataset`` in ``layout`` (a key of ``BYTES_LAYOUTS``); returns the manifest."""
    from fastkd.cache import write_cache
    manifest = write_cache(teacher, dataset, out_dir, batch_size=8, device=device, dtype="fp16",
                           overwrite=True, progress=False, **BYTES_LAYOUTS[layout](k))
    synchronize(device)
    return manifest


# ----------------------------------------------------------------------------- train
def make_train_step(student: nn.Module, device: str):
    """``step(images, labels, teacher_logits)``: one SGD step on the fused KD loss."""
    import fastkd
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)

    def step(images, labels, teacher_logits):
        student_logits = student(images.to(device))
        loss = fastkd.kd_loss(student_logits, teacher_logits.to(device), labels.to(device),
                              temperature=TEMPERATURE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def train_cached(student_step, cached_dataset, batch_size: int, steps: int, device: str) -> None:
    """``steps`` training steps reading teacher logits from the cache."""
    loader = DataLoader(cached_dataset, batch_size=batch_size, shuffle=True, drop_last=True)
    for _, (images, labels, teacher_logits) in zip(range(steps), loader):
        student_step(images, labels, teacher_logits)
    synchronize(device)


def train_online(student_step, teacher: nn.Module, dataset, batch_size: int, steps: int,
                 device: str) -> None:
    """``steps`` training steps running the teacher's forward pass on every batch."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)
    for _, (images, labels) in zip(range(steps), loader):
        with torch.inference_mode():
            teacher_logits = teacher(images.to(device))
        student_step(images, labels, teacher_logits.clone())
    synchronize(device)


def teacher_to_student_cost(teacher, student_step, dataset, batch_size: int, device: str,
                            repeats: int = 5) -> float:
    """Median teacher forward time / median student step time on one batch."""
    images, labels = next(iter(DataLoader(dataset, batch_size=batch_size)))
    images = images.to(device)
    with torch.inference_mode():
        teacher_logits = teacher(images)

    def median_seconds(function):
        times = []
        for _ in range(repeats + 1):  # the first call is a warm-up
            start = time.perf_counter()
            function()
            synchronize(device)
            times.append(time.perf_counter() - start)
        return sorted(times[1:])[repeats // 2]

    def teacher_forward():
        with torch.inference_mode():
            teacher(images)
    return median_seconds(teacher_forward) / median_seconds(
        lambda: student_step(images, labels, teacher_logits.clone()))
