"""Small real teachers and datasets for the cache tests, importable by SPEC string
(``cache_helpers:digits_teacher``) when a test runs ``fastkd`` with tests/ as current directory.

Environment knobs (read by the teachers at forward time, so they work in subprocesses):
``FASTKD_TEST_SLEEP`` seconds to sleep per teacher forward (to make a run slow enough to kill).
"""
import os
import time

import torch
from torch import nn

from fastkd.models import TinyCausalLM, digits_dataset

TOKEN_VOCAB = 40


class DigitsMLP(nn.Module):
    """``(N, 1, 8, 8) -> (N, 10)`` logits: a two-layer MLP on the 64 pixels."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        sleep = float(os.environ.get("FASTKD_TEST_SLEEP", "0"))
        if sleep:
            time.sleep(sleep)
        return self.net(images)


def run_cli(*argv) -> int:
    """``fastkd`` with ``argv`` (paths and numbers become strings) in this process; its exit
    status."""
    from fastkd.cli import main
    return main([str(arg) for arg in argv])


def cache_digits(out, *options: str) -> int:
    """``fastkd cache`` of :func:`digits_teacher` over the bundled digits into ``out`` on the
    CPU, quietly, with ``options`` added; its exit status."""
    return run_cli("cache", "--teacher", "cache_helpers:digits_teacher", "--dataset", "digits",
                   "--out", out, *options, "--device", "cpu", "--quiet")


# 300 fp16 rows of V = 10 per shard: 6 shards for the 1797 digits
SMALL_SHARDS_MB = 300 * 20 / 2 ** 20


def cache_trained_digits(root):
    """The digits cached by the CLI into ``root / "cache"`` from a trained teacher's checkpoint
    (``root / "teacher.pt"``), in 6 small fp16 shards; ``(cache folder, teacher)``."""
    teacher = trained_digits_teacher()
    checkpoint = root / "teacher.pt"
    torch.save(teacher.state_dict(), checkpoint)
    out = root / "cache"
    status = run_cli("cache", "--teacher", "cache_helpers:digits_teacher", "--teacher-checkpoint",
                     checkpoint, "--dataset", "digits", "--out", out, "--batch-size", "256",
                     "--device", "cpu", "--shard-size-mb", SMALL_SHARDS_MB, "--quiet")
    assert status == 0
    return out, teacher


def import_dataset(path, out, *options, source: str = "distillkit") -> int:
    """``fastkd import --from <source>`` of the teacher dataset at ``path`` into ``out`` (float32
    values), quietly, with ``options`` added; its exit status."""
    return run_cli("import", path, "--from", source, "--out", out, "--dtype", "fp32",
                   "--quiet", *options)


def digits_teacher() -> DigitsMLP:
    """An untrained, seeded teacher (the same weights every call)."""
    torch.manual_seed(0)
    return DigitsMLP()


def trained_digits_teacher(steps: int = 60) -> DigitsMLP:
    """A real (briefly trained, ~95% train accuracy) digits teacher; deterministic and < 1 s."""
    teacher = digits_teacher()
    images, labels = digits_dataset().tensors
    optimizer = torch.optim.Adam(teacher.parameters(), lr=2e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(teacher(images), labels).backward()
        optimizer.step()
    return teacher.eval()


class IndexedImages(torch.utils.data.Dataset):
    """``n`` items ``(image (1, 8, 8) whose pixels all equal its index, index)``."""

    def __init__(self, n: int = 100):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):
        if not 0 <= index < self.n:
            raise IndexError(index)
        return torch.full((1, 8, 8), float(index)), index


class NaNAtIndex(nn.Module):
    """Returns NaN logits for the :class:`IndexedImages` item ``bad_index``, else finite ones."""

    def __init__(self, bad_index: int = 37, scale: float = 1.0):
        super().__init__()
        self.bad_index, self.scale = bad_index, scale
        self.linear = nn.Linear(64, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.scale * self.linear(images.flatten(1) / 100)
        bad = images.flatten(1)[:, 0] == self.bad_index
        return torch.where(bad[:, None], torch.full_like(logits, float("nan")), logits)


def nan_teacher() -> NaNAtIndex:
    torch.manual_seed(0)
    return NaNAtIndex()


def indexed_images() -> IndexedImages:
    return IndexedImages(100)


class ReadOnce(IndexedImages):
    """IndexedImages whose items raise KeyError when read a second time: the dataset fingerprint
    reads a few of them, then the writer's loader reads them again (a dataset that breaks while
    the cache is written)."""

    def __init__(self, n: int = 100):
        super().__init__(n)
        self.seen = set()

    def __getitem__(self, index):
        if index in self.seen:
            raise KeyError(f"item {index} read twice")
        self.seen.add(index)
        return super().__getitem__(index)


class Unreadable(IndexedImages):
    """IndexedImages whose every read fails (its files are gone)."""

    def __getitem__(self, index):
        raise OSError(5, "Input/output error")


def read_once() -> ReadOnce:
    return ReadOnce(100)


def unreadable() -> Unreadable:
    return Unreadable(100)


def no_images() -> IndexedImages:
    return IndexedImages(0)


def raising_factory():
    raise RuntimeError("cannot build it")


class HugeLogits(nn.Module):
    """Logits beyond the fp16 range (|x| up to ~1e5) on every row. With ``fail_at``, raises
    once it sees the :class:`IndexedImages` item ``fail_at`` (a crash; not part of the weights)."""

    def __init__(self, fail_at=None):
        super().__init__()
        self.fail_at = fail_at

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.fail_at is not None and bool((images.flatten(1)[:, 0] == self.fail_at).any()):
            raise RuntimeError(f"simulated crash at item {self.fail_at}")
        ramp = torch.linspace(-1e5, 1e5, 10)
        return ramp.expand(images.shape[0], 10) + images.flatten(1)[:, :1]


class TokenSequences(torch.utils.data.Dataset):
    """``n`` variable-length token items ``{"input_ids": (L_i,), "labels": (L_i,)}`` with
    ``L_i`` in [3, 12]; labels are the next token (last one ignored with -100)."""

    def __init__(self, n: int = 24, vocab: int = TOKEN_VOCAB, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        lengths = torch.randint(3, 13, (n,), generator=generator).tolist()
        self.items = []
        for length in lengths:
            tokens = torch.randint(0, vocab, (length,), generator=generator)
            labels = torch.cat([tokens[1:], torch.tensor([-100])])
            self.items.append({"input_ids": tokens, "labels": labels})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def tiny_lm() -> TinyCausalLM:
    torch.manual_seed(0)
    return TinyCausalLM(TOKEN_VOCAB, dim=16, num_layers=1, num_heads=2, max_len=16).eval()


def rank_dependent_teacher() -> DigitsMLP:
    """Different weights in every torchrun process (seeded with RANK): a broken setup."""
    torch.manual_seed(int(os.environ.get("RANK", "0")))
    return DigitsMLP()


class DictOutputTeacher(nn.Module):
    """Returns ``{"features": (N, 64), "scores": (N, 10)}`` instead of a tensor."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mlp = DigitsMLP()

    def forward(self, images):
        return {"features": images.flatten(1), "scores": self.mlp(images)}


class RandomlyAugmented(IndexedImages):
    """IndexedImages with random noise added on every read (an augmentation)."""

    def __getitem__(self, index):
        image, label = super().__getitem__(index)
        return image + torch.randn(image.shape), label


def randomly_augmented() -> RandomlyAugmented:
    return RandomlyAugmented(100)


def rank_one_cannot_load_teacher() -> DigitsMLP:
    """The digits teacher, except on torchrun rank 1, whose "checkpoint" cannot be read: that rank
    fails before the ranks compare fingerprints."""
    if os.environ.get("RANK") == "1":
        raise FileNotFoundError(2, "No such file or directory", "rank1-only-checkpoint.pt")
    return digits_teacher()
