"""The public fused knowledge-distillation loss: argument checks, the one backend dispatch point,
the autograd wiring (a ``torch.library`` custom op, so ``torch.compile`` sees no graph break) and
the ``KDLoss`` module.

Math (rows = all leading dims flattened, logits ``(N, V)``, ``u = z / T``, ``p = softmax(u)``)::

    row_loss = soft_weight * soft + hard_weight * CE(z_s, y)
    soft     = T^2 * D(p_t, p_s)           D in {forward_kl, reverse_kl, jsd}
             = mean_v (z_s - z_t)^2         for divergence="mse" (raw logits, no T)

The gradient with respect to the student logits is produced during the forward pass by the
backend and kept; backward only scales it by ``grad_output``. Teacher logits are constants: no
gradient ever flows into them.

Backends share one contract (see ``_BACKEND_CONTRACT``) and are chosen only in ``_dispatch``.
"""
import os
from typing import Optional, Union

import torch

from fastkd.checks import (BACKENDS, DIVERGENCES, REDUCTIONS, check_label_values, check_labels,
                           check_logits, check_options)

__all__ = ["kd_loss", "KDLoss", "DIVERGENCES", "REDUCTIONS", "BACKENDS"]

_BACKEND_CONTRACT = """
kd_forward(student_logits, teacher_logits, labels, *, teacher_labels, temperature, soft_weight,
           hard_weight, divergence, beta, ignore_index, grad_scale, grad) -> row_loss

student_logits, teacher_logits: (N, V) floating tensors, last-dim stride 1 (row stride free),
    dtypes may differ. labels: (N,) int64 contiguous or None. teacher_labels: bool; when True,
    labels is None and the hard label of a row is the first index of its teacher maximum.
divergence: one of forward_kl, reverse_kl, jsd, mse. jsd arrives with 0 < beta < 1 only:
    _forward_impl turns beta 0 / 1 into forward_kl / reverse_kl before dispatch.
Rows whose label == ignore_index get row_loss 0 and a zero gradient row.
grad: None (no gradient wanted) or an (N, V) tensor of the student's dtype, last-dim stride 1,
    possibly the student tensor itself (in-place); it is filled with grad_scale * d row_loss / dz_s.
Returns row_loss: (N,) float32. All accumulation in float32.
"""


# ----------------------------------------------------------------------------- argument checks
def _validate(student_logits, teacher_logits, labels, temperature, soft_weight, hard_weight,
              divergence, beta, ignore_index, reduction, backend):
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
    check_options(temperature, soft_weight, hard_weight, divergence, beta, ignore_index,
                  reduction, backend)


# ----------------------------------------------------------------------------- backend choice
def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    # backend == "triton"
    if not _triton_available():
        raise ValueError("backend='triton' needs the triton package, which is not importable here")
    if device.type != "cuda" and not _triton_interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got tensors on {device}); run with "
            "TRITON_INTERPRET=1 to use Triton's CPU interpreter, or use backend='torch'")
    return "triton"


# ----------------------------------------------------------------------------- dispatch
def _dispatch(backend: str):
    """The one place that picks the implementation (both follow ``_BACKEND_CONTRACT``)."""
    if backend == "triton":
        from fastkd.kernels.kd_loss import kd_forward_triton
        return kd_forward_triton
    from fastkd.fallback import kd_forward_torch
    return kd_forward_torch


_LABEL_NONE, _LABEL_TENSOR, _LABEL_TEACHER = 0, 1, 2


def _forward_impl(student_2d, teacher_2d, labels_1d, label_mode, temperature, soft_weight,
                  hard_weight, divergence, beta, ignore_index, reduction, backend, needs_grad,
                  grad_buffer=None):
    """Run the backend; returns (loss, grad). ``loss`` is a scalar (batchmean/sum) or (N,) rows;
    ``grad`` is already scaled for ``grad_output == 1`` (or per row, unscaled, for 'none')."""
    num_rows, num_classes = student_2d.shape
    if label_mode == _LABEL_TENSOR:
        labels_1d = check_label_values(labels_1d, num_classes, ignore_index).contiguous()
        kept = int((labels_1d != ignore_index).sum()) if num_rows else 0
    else:
        labels_1d = None
        kept = num_rows
    # jsd with beta at an end point *is* forward/reverse KL (TRL GKD / Liger convention).
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"
    elif divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    grad_scale = 1.0 / kept if (reduction == "batchmean" and kept > 0) else 1.0
    if student_2d.stride(-1) != 1:
        student_2d = student_2d.contiguous()
    if teacher_2d.stride(-1) != 1:
        teacher_2d = teacher_2d.contiguous()
    grad = None
    if needs_grad:
        grad = grad_buffer if grad_buffer is not None else torch.empty(
            (num_rows, num_classes), dtype=student_2d.dtype, device=student_2d.device)
    kd_forward = _dispatch(backend)
    row_loss = kd_forward(
        student_2d, teacher_2d, labels_1d, teacher_labels=label_mode == _LABEL_TEACHER,
        temperature=temperature, soft_weight=soft_weight, hard_weight=hard_weight,
        divergence=divergence, beta=beta, ignore_index=ignore_index, grad_scale=grad_scale,
        grad=grad)
    if reduction == "none":
        loss = row_loss
    else:
        loss = row_loss.sum() * grad_scale
    if grad is None:
        grad = student_2d.new_empty((0,))
    return loss, grad


# ----------------------------------------------------------------------------- autograd (custom op)
@torch.library.custom_op("fastkd::kd_loss_forward", mutates_args=())
def _kd_loss_op(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: Optional[torch.Tensor], label_mode: int, temperature: float,
                soft_weight: float, hard_weight: float, divergence: str, beta: float,
                ignore_index: int, reduction: str, backend: str,
                needs_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    loss, grad = _forward_impl(student_logits, teacher_logits, labels, label_mode, temperature,
                               soft_weight, hard_weight, divergence, beta, ignore_index,
                               reduction, backend, needs_grad)
    # custom ops may not return views of their inputs
    return loss.clone() if loss._base is not None else loss, grad


@_kd_loss_op.register_fake
def _(student_logits, teacher_logits, labels, label_mode, temperature, soft_weight, hard_weight,
      divergence, beta, ignore_index, reduction, backend, needs_grad):
    num_rows = student_logits.shape[0]
    loss_shape = (num_rows,) if reduction == "none" else ()
    loss = student_logits.new_empty(loss_shape, dtype=torch.float32)
    grad = student_logits.new_empty(student_logits.shape if needs_grad else (0,))
    return loss, grad


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.per_row = inputs[10] == "none"
    # The gradient output is never differentiated; without this autograd would materialize a
    # logits-sized zeros tensor as its incoming gradient on every backward.
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _scale_grad(grad: torch.Tensor, grad_output: torch.Tensor, per_row: bool) -> torch.Tensor:
    """dL/dz_s = grad * grad_output; skip the pass when grad_output is exactly 1 (eager only)."""
    if per_row:
        return grad * grad_output.to(grad.dtype).unsqueeze(-1)
    if not torch.compiler.is_compiling() and grad_output.device.type != "meta":
        if grad_output.item() == 1.0:
            return grad
    return grad * grad_output.to(grad.dtype)


def _backward(ctx, grad_output, _grad_of_grad):
    (grad,) = ctx.saved_tensors
    if grad_output is None:
        return (None,) * 13
    return (_scale_grad(grad, grad_output, ctx.per_row),) + (None,) * 12


_kd_loss_op.register_autograd(_backward, setup_context=_setup_context)


class _KDLossInPlace(torch.autograd.Function):
    """Eager-only variant that writes the gradient into the student logits' own storage."""

    @staticmethod
    def forward(ctx, student_2d, teacher_2d, labels, label_mode, temperature, soft_weight,
                hard_weight, divergence, beta, ignore_index, reduction, backend):
        loss, grad = _forward_impl(student_2d, teacher_2d, labels, label_mode, temperature,
                                   soft_weight, hard_weight, divergence, beta, ignore_index,
                                   reduction, backend, True, grad_buffer=student_2d)
        # The logits' values are gone: bump the version so any other saved use of them fails
        # loudly in backward instead of reading the gradient as logits.
        torch.autograd.graph.increment_version(student_2d)
        ctx.save_for_backward(grad)
        ctx.per_row = reduction == "none"
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (_scale_grad(grad, grad_output, ctx.per_row),) + (None,) * 11


# ----------------------------------------------------------------------------- public API
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            labels: Union[torch.Tensor, str, None] = None, *, temperature: float = 1.0,
            soft_weight: float = 0.5, hard_weight: float = 0.5, divergence: str = "forward_kl",
            beta: float = 0.5, ignore_index: int = -100, reduction: str = "batchmean",
            backend: str = "auto", grad_inplace: bool = False) -> torch.Tensor:
    """Fused Hinton KD loss: ``soft_weight * T^2 * D(p_t, p_s) + hard_weight * CE(z_s, y)``.

    Args:
        student_logits: ``(..., V)`` float32/float16/bfloat16; receives the gradient.
        teacher_logits: ``(..., V)``, any of those dtypes (may differ from the student's);
            treated as a constant. ``-inf`` entries mean probability 0.
        labels: ``(...)`` integer class ids (``ignore_index`` rows are excluded from both
            terms), ``"teacher"`` (the teacher's argmax as hard label), or ``None`` (no hard term).
        temperature: ``T > 0``, applied to both logits in the soft term only.
        divergence: ``forward_kl`` = KL(p_t||p_s), ``reverse_kl`` = KL(p_s||p_t), ``jsd``
            (generalized JSD with ``beta``; 0 / 1 are exactly forward / reverse KL), ``mse``
            (mean over V of squared raw-logit differences; no temperature, no T^2).
        reduction: ``batchmean`` (sum over kept rows / number of kept rows; 0 if none kept),
            ``sum``, or ``none`` (per-row losses of shape ``(...)``, 0 for ignored rows).
        backend: ``auto`` (Triton on CUDA, PyTorch fallback elsewhere), ``triton``, ``torch``.
        grad_inplace: write the gradient into ``student_logits``' storage (saves one logits-sized
            buffer). Only when nothing else needs those logits afterwards; not under
            ``torch.compile``.

    Returns:
        float32 scalar, or ``(...)`` float32 for ``reduction="none"``.
    """
    _validate(student_logits, teacher_logits, labels, temperature, soft_weight, hard_weight,
              divergence, beta, ignore_index, reduction, backend)
    resolved = _resolve_backend(backend, student_logits.device)
    leading = student_logits.shape[:-1]
    num_classes = student_logits.shape[-1]
    student_2d = student_logits.reshape(-1, num_classes)
    teacher_2d = teacher_logits.detach().reshape(-1, num_classes)
    if isinstance(labels, torch.Tensor):
        label_mode, labels_1d = _LABEL_TENSOR, labels.reshape(-1)
    else:
        label_mode = _LABEL_TEACHER if labels == "teacher" else _LABEL_NONE
        labels_1d = None
    args = (label_mode, float(temperature), float(soft_weight), float(hard_weight), divergence,
            float(beta), int(ignore_index), reduction, resolved)
    needs_grad = torch.is_grad_enabled() and student_logits.requires_grad
    if grad_inplace and needs_grad:
        if torch.compiler.is_compiling():
            raise ValueError("grad_inplace=True is not supported under torch.compile")
        if student_2d.data_ptr() != student_logits.data_ptr() or student_2d.stride(-1) != 1:
            raise ValueError("grad_inplace=True needs student_logits whose rows are a view "
                             "(last-dim stride 1, leading dims flattenable without a copy)")
        loss = _KDLossInPlace.apply(student_2d, teacher_2d, labels_1d, *args)
    else:
        loss, _ = _kd_loss_op(student_2d, teacher_2d, labels_1d, *args, needs_grad)
    return loss.reshape(leading) if reduction == "none" else loss


class KDLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`kd_loss`; keyword arguments are fixed at construction.

    ``forward(student_logits, teacher_logits, labels=None)``.
    """

    def __init__(self, *, temperature: float = 1.0, soft_weight: float = 0.5,
                 hard_weight: float = 0.5, divergence: str = "forward_kl", beta: float = 0.5,
                 ignore_index: int = -100, reduction: str = "batchmean", backend: str = "auto",
                 grad_inplace: bool = False):
        super().__init__()
        check_options(temperature, soft_weight, hard_weight, divergence, beta, ignore_index,
                       reduction, backend)
        self.options = dict(temperature=temperature, soft_weight=soft_weight,
                            hard_weight=hard_weight, divergence=divergence, beta=beta,
                            ignore_index=ignore_index, reduction=reduction, backend=backend,
                            grad_inplace=grad_inplace)

    def forward(self, student_logits, teacher_logits, labels=None):
        return kd_loss(student_logits, teacher_logits, labels, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())
