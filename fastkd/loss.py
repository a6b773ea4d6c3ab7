"""The public fused knowledge-distillation loss ``kd_loss`` / ``KDLoss`` and the forward pass of
its dense family.

Math (rows = all leading dims flattened, logits ``(N, V)``, ``u = z / T``, ``p = softmax(u)``;
fastkd/reference_dense.py states it per divergence, with the gradients)::

    row_loss = soft_weight * soft + hard_weight * CE(z_s, y)
    soft     = T^2 * D(p_t, p_s)           D in {forward_kl, reverse_kl, jsd}
             = mean_v (z_s - z_t)^2         for divergence="mse" (raw logits, no T)

The gradient with respect to the student logits is produced during the forward pass by the
backend (chosen in :func:`fastkd.dispatch.dispatch`) and kept; backward only scales it by
``grad_output`` (fastkd/autograd.py). Teacher logits are constants: no gradient flows into them.

Leading dims: ``(..., V)`` inputs reach the backends as 2-D ``(N, V)`` or 3-D ``(B, S, V)`` views
of the caller's memory (e.g. ``logits[:, :-1]``), never copied when the last dim has stride 1 and
the leading dims merge into at most two strided dims.

Host syncs with ``backend="triton"`` on CUDA: with ``validate_labels=True`` one per step (in
backward, reading the label check made in forward together with whether ``grad_output`` is 1;
in forward when there is no gradient); with ``validate_labels=False`` none (a bad label makes
its row NaN, backward scales the saved gradient in place). ``backend="torch"`` on CUDA is not
sync-free.
"""
from typing import Union

import torch

from fastkd.autograd import Family, PendingLabelCheck, register_family, run_loss, syncs
from fastkd.checks import check_labels, check_logits, label_status, raise_bad_labels
from fastkd.dispatch import dispatch
from fastkd.options import LossOptions
from fastkd.rows import row_views
from fastkd.sparse_loss import sparse_kd_loss
from fastkd.targets import SPARSE_TARGETS

__all__ = ["kd_loss", "KDLoss"]


# ----------------------------------------------------------------------------- argument checks
def _check_tensors(student_logits, teacher_logits, labels):
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student_logits and teacher_logits must have the same shape (..., V); got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            "student_logits and teacher_logits must be on the same device; got "
            f"{student_logits.device} and {teacher_logits.device}")
    check_labels(labels, student_logits.shape[:-1], student_logits.device)


# ----------------------------------------------------------------------------- forward
def dense_forward(tensors, options, needs_grad, grad_buffer=None, defer_check=False):
    """The dense family's forward (the contract in fastkd/autograd.py) of ``tensors = (student
    rows, teacher rows, _, _, _, labels (N,) or None, _)``: ``(loss, (grad, None, None),
    pending)``. ``loss`` is a scalar (batchmean/sum) or ``(N,)`` rows; ``grad`` is already
    scaled for ``grad_output == 1`` (per row, unscaled, for 'none'); ``pending`` is a label
    check left for backward to read (or None)."""
    student_rows, teacher_rows, labels_1d = tensors[0], tensors[1], tensors[5]
    num_classes = student_rows.shape[-1]
    num_rows = student_rows.numel() // max(num_classes, 1)
    device = student_rows.device
    if labels_1d is not None and (labels_1d.dtype != torch.int64
                                  or not labels_1d.is_contiguous()):
        labels_1d = labels_1d.to(torch.int64).contiguous()
    grad = None
    if needs_grad:
        grad = grad_buffer if grad_buffer is not None else torch.empty(
            student_rows.shape, dtype=student_rows.dtype, device=device)
    kd_forward = dispatch(options.backend, "dense", device, student_rows)
    syncing = syncs(device)
    if getattr(kd_forward, "reduces", False) and num_rows and not syncing:
        # the compiled CPU kernel checks the labels, counts the kept rows and reduces too
        loss = kd_forward(student_rows, teacher_rows, labels_1d, options, grad=grad,
                          reduction=options.reduction, validate_labels=options.validate_labels)
        if loss is None:
            raise_bad_labels(labels_1d, num_classes, options.ignore_index)
        return loss, (grad, None, None), None
    pending = None
    kept = num_rows
    ignore_index, reduction = options.ignore_index, options.reduction
    if labels_1d is not None:
        if not syncing:   # host reads are free here: one read of both counts
            kept, bad_value = torch.stack([value.long() for value in label_status(
                labels_1d, num_classes, ignore_index)]).tolist()
            if options.validate_labels and bad_value:
                raise_bad_labels(labels_1d, num_classes, ignore_index)
        elif options.validate_labels or reduction == "batchmean":
            kept_tensor, bad = label_status(labels_1d, num_classes, ignore_index)
            kept = kept_tensor
            if options.validate_labels:
                pending = PendingLabelCheck(bad, labels_1d, num_classes, ignore_index)
                if not defer_check:
                    pending.raise_if_bad(bool(bad))  # the one sync of this step
                    pending = None
    if reduction != "batchmean":
        grad_scale = 1.0
    elif isinstance(kept, torch.Tensor):
        grad_scale = 1.0 / kept.clamp(min=1).float()
    else:
        grad_scale = 1.0 / kept if kept > 0 else 1.0
    row_loss = kd_forward(student_rows, teacher_rows, labels_1d, options, grad=grad,
                          grad_scale=grad_scale)
    if reduction == "none":
        loss = row_loss
    else:
        loss = row_loss.sum() * grad_scale
    return loss, (grad, None, None), pending


register_family("dense", Family(dense_forward, LossOptions))


# ----------------------------------------------------------------------------- public API
def kd_loss(student_logits: torch.Tensor, teacher_logits,
            labels: Union[torch.Tensor, str, None] = None, *, tail: str = "bucket",
            temperature: float = 1.0,
            soft_weight: float = 0.5, hard_weight: float = 0.5, divergence: str = "forward_kl",
            beta: float = 0.5, ignore_index: int = -100, reduction: str = "batchmean",
            backend: str = "auto", grad_inplace: bool = False,
            validate_labels: bool = True) -> torch.Tensor:
    """Fused Hinton KD loss: ``soft_weight * T^2 * D(p_t, p_s) + hard_weight * CE(z_s, y)``.

    Args:
        student_logits: ``(..., V)`` float32/float16/bfloat16; receives the gradient. Strided
            leading dims (``logits[:, :-1]``) are read in place, without a copy.
        teacher_logits: ``(..., V)``, any of those dtypes (may differ from the student's);
            treated as a constant. ``-inf`` entries mean probability 0. Or a sparse teacher:
            :class:`~fastkd.TopKLogits` / :class:`~fastkd.SampledTargets` with ``(..., K)``
            entries (see ``fastkd/sparse_loss.py``); no ``(N, V)`` teacher is ever built.
        tail: sparse teachers only: ``bucket`` (K + 1 categories: the K ids and the exact rest
            mass on both sides), ``renormalize`` (both sides renormalized over the K ids) or
            ``ignore`` (the K forward-KL terms only).
        labels: ``(...)`` integer class ids of any integer dtype (``ignore_index`` rows are
            excluded from both terms), ``"teacher"`` (the teacher's argmax as hard label), or
            ``None`` (no hard term).
        temperature: ``0.001 <= T <= 100``, applied to both logits in the soft term only.
        divergence: ``forward_kl`` = KL(p_t||p_s), ``reverse_kl`` = KL(p_s||p_t), ``jsd``
            (generalized JSD with ``beta``; 0 / 1 are exactly forward / reverse KL), ``mse``
            (mean over V of squared raw-logit differences; no temperature, no T^2).
        reduction: ``batchmean`` (sum over kept rows / number of kept rows; 0 if none kept),
            ``sum``, or ``none`` (per-row losses of shape ``(...)``, 0 for ignored rows).
        backend: ``auto`` (Triton on CUDA, PyTorch fallback elsewhere), ``triton``, ``torch``.
        grad_inplace: write the gradient into ``student_logits``' storage (saves one logits-sized
            buffer). Only when the loss is their last reader: anything reading them after this
            call reads the gradient (ops recorded before it raise in backward); not under
            ``torch.compile``; refused when the student's elements overlap (``expand``) or
            another input shares its memory.
        validate_labels: check that every kept label is in ``[0, V)`` (a ``ValueError`` names
            the first bad one). On CUDA that costs one host sync per step (read in backward);
            ``False`` runs with no host sync at all: a bad label then makes its row's loss NaN.
            (Sparse teachers always check labels, in the one host sync of their target check.)

    Returns:
        float32 scalar, or ``(...)`` float32 for ``reduction="none"``.
    """
    if isinstance(teacher_logits, SPARSE_TARGETS):
        return sparse_kd_loss(
            student_logits, teacher_logits, labels, tail=tail, temperature=temperature,
            soft_weight=soft_weight, hard_weight=hard_weight, divergence=divergence, beta=beta,
            ignore_index=ignore_index, reduction=reduction, backend=backend,
            grad_inplace=grad_inplace)
    if not isinstance(teacher_logits, torch.Tensor):
        raise TypeError("teacher_logits must be a torch.Tensor, TopKLogits or SampledTargets, "
                        f"got {type(teacher_logits).__name__}")
    _check_tensors(student_logits, teacher_logits, labels)
    options = LossOptions.build(
        temperature=temperature, soft_weight=soft_weight, hard_weight=hard_weight,
        divergence=divergence, beta=beta, ignore_index=ignore_index, reduction=reduction,
        backend=backend, tail=tail, labels=labels, device=student_logits.device,
        validate_labels=validate_labels)
    student_rows, teacher_rows = row_views(student_logits, teacher_logits.detach())
    labels_1d = labels.reshape(-1) if isinstance(labels, torch.Tensor) else None
    loss = run_loss("dense", (student_rows, teacher_rows, None, None, None, labels_1d), options,
                    requires_grad=student_logits.requires_grad, grad_inplace=grad_inplace,
                    student_logits=student_logits, part_names=("teacher_logits",))
    return loss.reshape(student_logits.shape[:-1]) if reduction == "none" else loss


class KDLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`kd_loss`; keyword arguments are fixed at construction.

    ``forward(student_logits, teacher_logits, labels=None)``; ``teacher_logits`` may be a
    dense tensor or a sparse teacher (``tail`` applies to those).
    """

    def __init__(self, *, tail: str = "bucket", temperature: float = 1.0, soft_weight: float = 0.5,
                 hard_weight: float = 0.5, divergence: str = "forward_kl", beta: float = 0.5,
                 ignore_index: int = -100, reduction: str = "batchmean", backend: str = "auto",
                 grad_inplace: bool = False, validate_labels: bool = True):
        super().__init__()
        LossOptions.build(temperature=temperature, soft_weight=soft_weight,
                          hard_weight=hard_weight, divergence=divergence, beta=beta,
                          ignore_index=ignore_index, reduction=reduction, backend=backend,
                          tail=tail)
        self.options = dict(tail=tail, temperature=temperature, soft_weight=soft_weight,
                            hard_weight=hard_weight, divergence=divergence, beta=beta,
                            ignore_index=ignore_index, reduction=reduction, backend=backend,
                            grad_inplace=grad_inplace, validate_labels=validate_labels)

    def forward(self, student_logits, teacher_logits, labels=None):
        return kd_loss(student_logits, teacher_logits, labels, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())
