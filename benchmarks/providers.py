"""Loss benchmark cases, the providers being compared, their byte counts and a correctness check.

Providers (each a factory returning ``loss_fn(student_logits, teacher_logits, labels) -> loss``):

- ``fastkd``: ``fastkd.kd_loss`` with ``backend="auto"`` (Triton on CUDA, the compiled C kernel on CPU).
- ``eager``: the textbook composition
  ``sw * T^2 * kl_div(log_softmax(s/T), log_softmax(t/T), log_target=True, "batchmean")
  + hw * cross_entropy(s, y)``.
- ``compile``: ``torch.compile`` of that composition (static shapes, compiled once per case).
- ``liger``: the same composition with Liger-Kernel's KL-div and cross-entropy (CUDA only).

Sparse-teacher cases (``teacher_k > 0``: the teacher is its top-k, a ``fastkd.TopKLogits`` with the
exact lse) compare, on the bucket loss (K kept classes + the rest mass, forward KL + hard CE):

- ``fastkd``: ``fastkd.kd_loss(student, top_k_target, labels)`` (the fused sparse loss).
- ``densify``: ``fastkd.kd_loss(student, top_k_target.log_probs(V), labels)``: the slow path
  (a dense ``(N, V)`` teacher; its tail is spread evenly over the other classes, so its float64
  reference is the dense one on that densified teacher).
- ``topk-eager``: a plain PyTorch top-k KD loss as users write it (full ``log_softmax``,
  ``gather`` at the teacher ids, the rest bucket from ``1 - sum``); ``topk-compile``:
  ``torch.compile`` of it.

Cases with ``grad_inplace`` (sparse only) run ``fastkd`` and ``densify`` with
``kd_loss(..., grad_inplace=True)``: the gradient goes into the student logits' storage, as in
training where the logits come from the LM head and nothing else reads them. Both paths then
skip the fresh gradient buffer, whose first-touch page faults are a large part of a CPU step.
Their student is a copy of the case's computed from a leaf (``student_for_grad_inplace``; it
holds gradients after the first call, and the kernels' run time does not depend on the
values), and its gradient is taken with
``torch.autograd.grad``, as an LM head's backward would take it (``backward()`` into a leaf
would copy it into ``student.grad``).

Sparse cases run at T = 1: ``log_probs(V)`` gives log-probabilities at the target's temperature,
which dense ``kd_loss`` would temper again at any other T.

Byte count (the bandwidth floor, see design-notes): with ``s``/``t`` the student/teacher element
sizes, forward+backward moves ``N * V * (s + t + s)`` bytes (read both logits once, write the
gradient once) and forward-only moves ``N * V * (s + t)``. Sparse cases:
``N * (V * (s + s) + K * (t + 4) + 4)`` forward+backward (student read once, gradient written once,
K (value, int32 id) pairs and the lse per row), ``N * (V * s + K * (t + 4) + 4)`` forward.
"""
import importlib.util
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from benchmarks.env import REPO_ROOT, synchronize
from fastkd.demo import textbook_kd_loss

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("fwd", "fwd+bwd")
PROVIDERS = ("fastkd", "eager", "compile", "liger")
SPARSE_PROVIDERS = ("fastkd", "densify", "topk-eager", "topk-compile")
GRAD_INPLACE_PROVIDERS = ("fastkd", "densify")   # the providers with a grad_inplace option
SOFT_WEIGHT = HARD_WEIGHT = 0.5

# Correctness check against the float64 reference, per student dtype: |loss - ref| / |ref| and
# max |grad - ref_grad| / max |ref_grad|. fp32: accumulation-order error only. bf16/fp16: the
# gradient is stored with an 8-bit (bf16) mantissa and the eager baselines round log-probs to it.
TOLERANCES = {"fp32": {"loss": 1e-4, "grad": 1e-4},
              "bf16": {"loss": 2e-2, "grad": 2e-2},
              "fp16": {"loss": 1e-2, "grad": 1e-2}}


@dataclass(frozen=True)
class LossCase:
    """One benchmark shape: ``(rows, vocab)`` logits in the given dtypes, timed in ``mode``."""
    rows: int
    vocab: int
    student_dtype: str = "fp32"
    teacher_dtype: str = "fp32"
    mode: str = "fwd+bwd"
    group: str = "sweep"
    temperature: float = 2.0
    teacher_k: int = 0    # > 0: a sparse teacher, its top-k (TopKLogits) instead of V logits
    grad_inplace: bool = False   # the gradient written into the student's storage

    def __post_init__(self):
        if self.rows < 1 or self.vocab < 1:
            raise ValueError(f"rows and vocab must be >= 1, got {self.rows} x {self.vocab}")
        for name in ("student_dtype", "teacher_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not 0 <= self.teacher_k <= self.vocab:
            raise ValueError(f"teacher_k must be in [0, vocab], got {self.teacher_k}")
        if self.grad_inplace and (self.mode != "fwd+bwd" or not self.teacher_k):
            raise ValueError("grad_inplace cases must be sparse-teacher fwd+bwd cases")

    @property
    def dtypes(self) -> str:
        if self.student_dtype == self.teacher_dtype:
            return self.student_dtype
        return f"{self.student_dtype}/{self.teacher_dtype}-teacher"

    @property
    def id(self) -> str:
        sparse = f"-top{self.teacher_k}" if self.teacher_k else ""
        inplace = "-grad-inplace" if self.grad_inplace else ""
        return f"{self.group}-{self.rows}x{self.vocab}{sparse}-{self.dtypes}-{self.mode}{inplace}"

    @property
    def logits_bytes(self) -> int:
        """Size of one student-logits-sized buffer (the unit of "extra peak memory")."""
        return self.rows * self.vocab * DTYPES[self.student_dtype].itemsize

    @property
    def bytes_moved(self) -> int:
        """The byte-count floor: N*V*(s + t) forward, N*V*(s + t + s) forward+backward."""
        student = DTYPES[self.student_dtype].itemsize
        teacher = DTYPES[self.teacher_dtype].itemsize
        if self.teacher_k:
            student_passes = 2 if self.mode == "fwd+bwd" else 1
            return self.rows * (self.vocab * student * student_passes
                                + self.teacher_k * (teacher + 4) + 4)
        per_element = student + teacher + (student if self.mode == "fwd+bwd" else 0)
        return self.rows * self.vocab * per_element

    def as_dict(self) -> dict:
        return {**asdict(self), "dtypes": self.dtypes, "id": self.id}


def make_inputs(case: LossCase, device: str, seed: int = 0):
    """Random ``(student, teacher, labels)``; the student requires grad in fwd+bwd mode."""
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (case.rows, case.vocab)

    def logits(dtype):
        return (2 * torch.randn(shape, generator=generator, device=device)).to(DTYPES[dtype])
    student, teacher = logits(case.student_dtype), logits(case.teacher_dtype)
    if case.teacher_k:   # what a top-k cache returns: values, int32 ids, lse at the temperature
        from fastkd import TopKLogits
        top = teacher.topk(case.teacher_k, dim=-1)
        lse = torch.logsumexp(teacher.float() / case.temperature, dim=-1)
        teacher = TopKLogits(top.values, top.indices.to(torch.int32), lse, case.temperature)
    labels = torch.randint(0, case.vocab, (case.rows,), generator=generator, device=device)
    student.requires_grad_(case.mode == "fwd+bwd")
    return student, teacher, labels


# ----------------------------------------------------------------------------- providers
def textbook_composition(student_logits, teacher_logits, labels, temperature):
    """The hand-written eager KD loss that fastkd replaces (``fastkd.demo.textbook_kd_loss``)."""
    return textbook_kd_loss(student_logits, teacher_logits, labels, temperature,
                            SOFT_WEIGHT, HARD_WEIGHT)


def plain_topk_kd_loss(student_logits, teacher, labels, temperature):
    """A top-k KD loss as users write it in plain PyTorch: the K + 1 bucket forward KL (the rest
    mass from ``1 - sum``) + hard CE, with a full ``log_softmax`` and a ``gather``."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    ids = teacher.indices.long()
    log_q = log_p_student.gather(-1, ids).float()
    log_p = teacher.values.float() / temperature - teacher.lse.float().unsqueeze(-1)
    p = log_p.exp()
    p_rest = (1 - p.sum(-1)).clamp_min(1e-12)
    q_rest = (1 - log_q.exp().sum(-1)).clamp_min(1e-12)
    kl = (p * (log_p - log_q)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    return (SOFT_WEIGHT * temperature ** 2 * kl.mean()
            + HARD_WEIGHT * F.cross_entropy(student_logits, labels))


def _configure_dynamo():
    """Room for one static compilation per benchmark case (dynamo's default limit is 8)."""
    import torch._dynamo
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))


def liger_unavailable_reason(device: str) -> Optional[str]:
    """Why the Liger provider cannot run here, or None when it can."""
    if device != "cuda":
        return "Liger-Kernel is Triton-only and needs a CUDA device"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger_kernel is not importable (pip install liger-kernel)"
    return None


def providers_for(case: LossCase, dense_providers=PROVIDERS, sparse_providers=SPARSE_PROVIDERS):
    providers = sparse_providers if case.teacher_k else dense_providers
    if case.grad_inplace:
        return tuple(name for name in providers if name in GRAD_INPLACE_PROVIDERS)
    return providers


def make_provider(name: str, case: LossCase, *, compile_backend: str = "inductor") -> Callable:
    """``loss_fn(student, teacher, labels)`` for provider ``name`` at ``case.temperature``."""
    temperature = case.temperature
    if case.teacher_k and name != "fastkd":
        return _make_sparse_baseline(name, case, compile_backend)
    if name == "fastkd":
        import fastkd

        def fastkd_loss(student, teacher, labels):
            return fastkd.kd_loss(student, teacher, labels, temperature=temperature,
                                  soft_weight=SOFT_WEIGHT, hard_weight=HARD_WEIGHT, backend="auto",
                                  grad_inplace=case.grad_inplace)
        return fastkd_loss
    if name == "eager":
        return lambda student, teacher, labels: textbook_composition(
            student, teacher, labels, temperature)
    if name == "compile":
        _configure_dynamo()
        # A fresh function object per case, static shapes: one compilation, never a dynamic kernel.
        def composition(student, teacher, labels):
            return textbook_composition(student, teacher, labels, temperature)
        return torch.compile(composition, dynamic=False, backend=compile_backend)
    if name == "liger":
        # Liger's cross-entropy may store its gradient in the logits' memory during forward, so after
        # the first (checked) call the student tensor holds gradients; its kernels' run time does
        # not depend on the values. The test runs liger last among a case's providers.
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss
        kl_div = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        cross_entropy = LigerCrossEntropyLoss()

        def liger_composition(student, teacher, labels):
            teacher = teacher.to(student.dtype)
            soft = kl_div(F.log_softmax(student / temperature, dim=-1),
                          F.log_softmax(teacher / temperature, dim=-1)) * temperature ** 2
            return SOFT_WEIGHT * soft + HARD_WEIGHT * cross_entropy(student, labels)
        return liger_composition
    raise ValueError(f"provider must be one of {PROVIDERS}, got {name!r}")


def _make_sparse_baseline(name: str, case: LossCase, compile_backend: str) -> Callable:
    temperature = case.temperature
    if name == "densify":
        if temperature != 1.0:
            raise ValueError("the densify provider needs case.temperature == 1 (log_probs(V) is "
                             "already at the target's temperature)")
        import fastkd

        def densify_loss(student, teacher, labels):
            return fastkd.kd_loss(student, teacher.log_probs(case.vocab), labels,
                                  temperature=temperature, soft_weight=SOFT_WEIGHT,
                                  hard_weight=HARD_WEIGHT, backend="auto",
                                  grad_inplace=case.grad_inplace)
        return densify_loss
    if name == "topk-eager":
        return lambda student, teacher, labels: plain_topk_kd_loss(student, teacher, labels,
                                                                   temperature)
    if name == "topk-compile":
        _configure_dynamo()

        def plain(student, teacher, labels):
            return plain_topk_kd_loss(student, teacher, labels, temperature)
        return torch.compile(plain, dynamic=False, backend=compile_backend)
    raise ValueError(f"sparse-teacher provider must be one of {SPARSE_PROVIDERS}, got {name!r}")


def student_for_grad_inplace(student: torch.Tensor) -> torch.Tensor:
    """A copy of ``student`` computed from a leaf (``grad_inplace`` refuses leaves, whose values
    torch keeps): the logits an LM head would hand the loss."""
    return student.detach().clone().requires_grad_(True).clone()


def make_step(loss_fn: Callable, student, teacher, labels, mode: str,
              grad_inplace: bool = False) -> Callable:
    """One timed call: the loss (``fwd``, under no_grad) or loss + backward, then a device sync.
    With ``grad_inplace`` the gradient (the student's own storage) is taken with
    ``torch.autograd.grad`` and kept as ``step.grad``; otherwise it lands in ``student.grad``."""
    device = student.device.type
    if grad_inplace:
        def step():
            loss = loss_fn(student, teacher, labels)
            (step.grad,) = torch.autograd.grad(loss, student)
            synchronize(device)
            return loss
        step.grad = None
    elif mode == "fwd":
        def step():
            with torch.no_grad():
                loss = loss_fn(student, teacher, labels)
            synchronize(device)
            return loss
    else:
        def step():
            loss = loss_fn(student, teacher, labels)
            loss.backward()
            synchronize(device)
            return loss
    return step


def rounds_for(seconds_per_call: float, budget_s: float, min_rounds: int, max_rounds: int) -> int:
    """How many timed rounds fit the per-case time budget, clamped to [min_rounds, max_rounds]."""
    return int(min(max_rounds, max(min_rounds, budget_s // max(seconds_per_call, 1e-9))))


def time_once(step: Callable) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- metrics
def throughput_metrics(case: LossCase, median_s: float, peak_gbps: float) -> dict:
    """rows/s, achieved GB/s by the byte-count floor, and % of the device's peak bandwidth."""
    achieved_gbps = case.bytes_moved / median_s / 1e9
    return {"rows_per_s": case.rows / median_s, "bytes_moved": case.bytes_moved,
            "achieved_gbps": achieved_gbps, "peak_gbps": peak_gbps,
            "pct_of_peak": 100.0 * achieved_gbps / peak_gbps}


# ----------------------------------------------------------------------------- correctness
@lru_cache(maxsize=2)
def _reference_module(name: str = "reference"):
    """tests/reference.py (the float64 reference every backend is checked against), or
    tests/reference_sparse.py (sparse teachers)."""
    spec = importlib.util.spec_from_file_location(f"fastkd_float64_{name}",
                                                  REPO_ROOT / "tests" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_semantics(case: LossCase, provider: str) -> str:
    """Which float64 reference a provider is checked against: ``dense``, ``bucket`` (sparse
    teacher, exact K + 1 buckets) or ``densified`` (dense KD on ``log_probs(V)``)."""
    if not case.teacher_k:
        return "dense"
    return "densified" if provider == "densify" else "bucket"


def _reference_rows(case, student_block, teacher, block, labels_block, semantics):
    """float64 row losses of one block of rows."""
    options = dict(temperature=case.temperature, soft_weight=SOFT_WEIGHT, hard_weight=HARD_WEIGHT)
    if semantics == "dense":
        return _reference_module().reference_row_losses(
            student_block, teacher[block], labels_block, **options)[0]
    target = teacher.map_tensors(lambda part: part[block])
    if semantics == "densified":
        return _reference_module().reference_row_losses(
            student_block, target.log_probs(case.vocab), labels_block, **options)[0]
    return _reference_module("reference_sparse").reference_sparse_row_losses(
        student_block, target, labels_block, tail="bucket", **options)[0]


def reference_loss_and_grad(case: LossCase, student, teacher, labels, *, semantics="dense",
                            chunk_elements=2**22):
    """float64 reference ``(loss, grad)`` for ``batchmean``, computed a block of rows at a time
    (rows are independent) so memory stays bounded; grad is float32 (None in ``fwd`` mode)."""
    chunk_rows = max(1, chunk_elements // case.vocab)
    total = 0.0
    grad = torch.empty(student.shape, dtype=torch.float32, device=student.device) \
        if case.mode == "fwd+bwd" else None
    for start in range(0, case.rows, chunk_rows):
        block = slice(start, start + chunk_rows)
        student_block = student[block].detach().double().requires_grad_(grad is not None)
        with torch.set_grad_enabled(grad is not None):
            row_loss = _reference_rows(case, student_block, teacher, block, labels[block],
                                       semantics)
            total += row_loss.sum().item()
            if grad is not None:
                (block_grad,) = torch.autograd.grad(row_loss.sum() / case.rows, student_block)
                grad[block] = block_grad.float()
    return total / case.rows, grad


def check_against_reference(case: LossCase, loss, grad, reference) -> dict:
    """Relative loss error and max gradient error (relative to max |ref grad|) vs tolerance."""
    ref_loss, ref_grad = reference
    tolerance = TOLERANCES[case.student_dtype]
    loss = float(loss.detach())
    loss_error = abs(loss - ref_loss) / max(abs(ref_loss), 1e-12)
    result = {"loss": loss, "ref_loss": ref_loss, "loss_rel_error": loss_error,
              "tolerance": tolerance, "ok": loss_error <= tolerance["loss"]}
    if ref_grad is not None:
        if grad is None:
            return {**result, "ok": False, "problem": "no gradient reached the student logits"}
        scale = ref_grad.abs().max().item()
        grad_error = (grad.float() - ref_grad).abs().max().item() / max(scale, 1e-30)
        result["grad_rel_error"] = grad_error
        result["ok"] = result["ok"] and grad_error <= tolerance["grad"]
    return result
