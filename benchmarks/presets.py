"""Benchmark presets: ``quick`` (CPU, a few minutes on 2 cores), ``full`` (GPU), and ``smoke``
(seconds; used by tests/test_benchmarks_smoke.py to exercise every path, not a result).

A preset lists the loss cases, the providers, the timing budget per case, which cases get a
peak-memory measurement, and the cache workload sizes.
"""
from dataclasses import dataclass, field
from typing import Tuple

from benchmarks.providers import PROVIDERS, SPARSE_PROVIDERS, LossCase, providers_for

# The CPU target: 2048 x 32000 fp32, forward+backward.
CPU_TARGET = LossCase(2048, 32000, "fp32", "fp32", "fwd+bwd", group="cpu-target")
# Classic KD vocabularies (CIFAR-10/100, ImageNet) where per-call overhead dominates:
# fastkd >= 1.5x the eager composition and >= 1x torch.compile, forward+backward.
SMALL_V_TARGETS = tuple(LossCase(rows, vocab, "fp32", "fp32", "fwd+bwd", group="small-v")
                        for rows, vocab in ((256, 10), (256, 100), (256, 1000), (8192, 100)))


@dataclass(frozen=True)
class CacheWorkload:
    """Sizes of the cache workloads (they run on the benchmark device, ``--bench-device``)."""
    # write: a torchvision resnet18 teacher on CIFAR-shaped random images. A short run: the
    # writer's fixed costs (the teacher fingerprint, a sha256 of all its weights; fsync; the
    # manifest) are a visible part of it, as they are of any short run
    write_images: int = 4096
    write_classes: int = 100
    write_batch: int = 128
    write_rounds: int = 7
    # read: a synthetic cache of read_rows x read_vocab fp16 logits, read back from the page cache
    read_rows: int = 4096
    read_vocab: int = 32000
    read_batch: int = 256
    read_rounds: int = 5
    # train: small CNN student, cached vs online resnet18 teacher
    train_images: int = 256
    train_classes: int = 100
    train_batch: int = 32
    train_steps: int = 8
    train_rounds: int = 3
    # bytes: token caches of a bytes_vocab-token LM teacher, dense fp16 vs --top-k and --sample
    # bytes_k (bytes per token are deterministic: only the write time varies)
    bytes_vocab: int = 32000
    bytes_k: int = 32
    bytes_sequences: int = 8
    bytes_length: int = 128


@dataclass(frozen=True)
class Preset:
    name: str
    loss_cases: Tuple[LossCase, ...]
    providers: Tuple[str, ...] = PROVIDERS
    budget_s: float = 1.5          # timed seconds per (case, provider)
    min_rounds: int = 3
    max_rounds: int = 50
    memory_case_ids: Tuple[str, ...] = ()   # case ids whose peak extra memory is measured
    measure_memory_all: bool = False        # or every case (cheap on CUDA)
    memory_providers: Tuple[str, ...] = PROVIDERS  # providers whose memory is measured
    sparse_providers: Tuple[str, ...] = SPARSE_PROVIDERS   # for sparse-teacher cases
    sparse_memory_providers: Tuple[str, ...] = SPARSE_PROVIDERS
    compile_backend: str = "inductor"       # torch.compile backend of the "compile" provider
    # cases of the goal's own group get more rounds (their medians decide met / missed)
    goal_groups: Tuple[str, ...] = ("cpu-target", "small-v")
    goal_budget_s: float = 8.0
    goal_min_rounds: int = 7
    goal_max_rounds: int = 2000   # sub-millisecond goal cases: many rounds for a stable median

    def rounds_policy(self, case: LossCase):
        """(time budget in seconds, min rounds, max rounds) for one (case, provider)."""
        if case.group in self.goal_groups:
            return self.goal_budget_s, self.goal_min_rounds, max(self.max_rounds,
                                                                   self.goal_max_rounds)
        return self.budget_s, self.min_rounds, self.max_rounds
    cache: CacheWorkload = field(default_factory=CacheWorkload)

    def providers_for(self, case: LossCase) -> Tuple[str, ...]:
        """The providers a case is timed with (sparse-teacher cases have their own)."""
        return providers_for(case, self.providers, self.sparse_providers)

    def measures_memory(self, case: LossCase, provider: str) -> bool:
        providers = self.sparse_memory_providers if case.teacher_k else self.memory_providers
        return provider in providers and (
            self.measure_memory_all or case.id in self.memory_case_ids)


def _quick() -> Preset:
    sweep_rows = 512
    cases = [CPU_TARGET, *SMALL_V_TARGETS]
    for vocab in (10, 1000, 32000, 128256):
        for mode in ("fwd", "fwd+bwd"):
            cases.append(LossCase(sweep_rows, vocab, "fp32", "fp32", mode))
    for vocab in (1000, 32000):
        cases.append(LossCase(sweep_rows, vocab, "bf16", "bf16", "fwd+bwd"))
    cases.append(LossCase(sweep_rows, 32000, "bf16", "fp16", "fwd+bwd"))
    # one sparse-teacher case (top-32, the fused sparse loss against its baselines)
    cases.append(LossCase(sweep_rows, 32000, mode="fwd+bwd", group="sparse", temperature=1.0,
                          teacher_k=32))
    memory = (CPU_TARGET.id, LossCase(sweep_rows, 128256).id,
              LossCase(sweep_rows, 32000, "bf16", "bf16").id)
    return Preset("quick", tuple(cases), budget_s=1.5, min_rounds=3, max_rounds=100,
                  memory_case_ids=memory)


def _sparse() -> Preset:
    """The sparse-teacher benchmark (CPU): fwd+bwd at 2048 x 32000 and 1024 x 128256,
    fp32 and bf16, K = 32, fastkd vs densify / plain top-k eager / its torch.compile, then
    fastkd vs densify with both writing the gradient in place; extra peak memory for every
    (case, provider)."""
    cases = tuple(LossCase(rows, vocab, dtype, dtype, "fwd+bwd", group="sparse",
                           temperature=1.0, teacher_k=32, grad_inplace=grad_inplace)
                  for grad_inplace in (False, True)
                  for rows, vocab in ((2048, 32000), (1024, 128256))
                  for dtype in ("fp32", "bf16"))
    return Preset("sparse", cases, budget_s=6.0, min_rounds=5, max_rounds=50,
                  measure_memory_all=True)


def _full() -> Preset:
    cases = []
    max_elements = 4096 * 262144  # keeps the eager baseline's fp32 temporaries within 80 GB
    for student_dtype, teacher_dtype in (("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "fp16")):
        for vocab in (10, 1000, 32000, 128256, 262144):
            if teacher_dtype == "fp16" and vocab < 32000:
                continue
            for rows in (4096, 16384):
                if rows * vocab > max_elements:
                    continue
                for mode in ("fwd", "fwd+bwd"):
                    cases.append(LossCase(rows, vocab, student_dtype, teacher_dtype, mode))
    for rows, vocab in ((16384, 32000), (4096, 128256)):   # sparse teachers (top-32)
        for dtype in ("fp32", "bf16"):
            cases.append(LossCase(rows, vocab, dtype, dtype, "fwd+bwd", group="sparse",
                                  temperature=1.0, teacher_k=32))
    return Preset("full", tuple(cases), budget_s=1.0, min_rounds=10, max_rounds=200,
                  measure_memory_all=True,
                  cache=CacheWorkload(write_images=16384, write_classes=1000,
                                      write_batch=512, read_rows=16384, read_vocab=32000,
                                      read_batch=512, train_images=8192, train_batch=256,
                                      train_steps=20))


def _smoke() -> Preset:
    memory_case = LossCase(256, 8192, "fp32", "fp32", "fwd+bwd")
    sparse_case = LossCase(256, 8192, "fp32", "fp32", "fwd+bwd", group="sparse",
                           temperature=1.0, teacher_k=8)
    inplace_case = LossCase(64, 1000, "bf16", "bf16", "fwd+bwd", group="sparse",
                            temperature=1.0, teacher_k=8, grad_inplace=True)
    cases = (LossCase(64, 100, "bf16", "fp16", "fwd"), memory_case, sparse_case, inplace_case)
    return Preset("smoke", cases, budget_s=0.02, min_rounds=2, max_rounds=3,
                  memory_case_ids=(memory_case.id, sparse_case.id, inplace_case.id),
                  memory_providers=("eager",),
                  sparse_memory_providers=("fastkd", "densify"),
                  compile_backend="aot_eager",
                  cache=CacheWorkload(write_images=64, write_classes=10, write_batch=32,
                                      write_rounds=1, read_rows=256, read_vocab=1000, read_batch=64,
                                      read_rounds=1, train_images=128, train_classes=10,
                                      train_batch=32, train_steps=2, train_rounds=1,
                                      bytes_sequences=2, bytes_length=16))


PRESETS = {"quick": _quick, "sparse": _sparse, "full": _full, "smoke": _smoke}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]()
