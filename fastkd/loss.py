"""The public fused knowledge-distillation loss: argument checks, the one backend dispatch point,
the autograd wiring and the ``KDLoss`` module.

Math (rows = all leading dims flattened, logits ``(N, V)``, ``u = z / T``, ``p = softmax(u)``)::

    row_loss = soft_weight * soft + hard_weight * CE(z_s, y)
    soft     = T^2 * D(p_t, p_s)           D in {forward_kl, reverse_kl, jsd}
             = mean_v (z_s - z_t)^2         for divergence="mse" (raw logits, no T)

The gradient with respect to the student logits is produced during the forward pass by the
backend and kept; backward only scales it by ``grad_output``. Teacher logits are constants: no
gradient ever flows into them.

Autograd: eager calls go through a plain ``torch.autograd.Function`` (cheapest per call, and
nothing of ``torch._dynamo`` is imported); under ``torch.compile`` the same forward runs as a
``torch.library`` custom op, so the compiler sees no graph break.

Leading dims: ``(..., V)`` inputs reach the backends as 2-D ``(N, V)`` or 3-D ``(B, S, V)`` views
of the caller's memory (e.g. ``logits[:, :-1]``), never copied when the last dim has stride 1 and
the leading dims merge into at most two strided dims.

Host syncs (CUDA): see ``_SYNC_NOTES`` and the README. Backends share one contract
(``_BACKEND_CONTRACT``) and are chosen only in :func:`fastkd.dispatch.dispatch`.
"""
from typing import Optional, Union

import torch

from fastkd.checks import (BACKENDS, DIVERGENCES, REDUCTIONS, TAILS, check_choice,
                           check_inplace_target, check_labels, check_logits, check_options,
                           label_status, raise_bad_labels)
from fastkd.dispatch import dispatch as _dispatch
from fastkd.dispatch import resolve_backend as _resolve_backend
from fastkd.fallback import _cpu_scalar, cpu_kernel_takes
from fastkd.targets import SPARSE_TARGETS

__all__ = ["kd_loss", "KDLoss", "DIVERGENCES", "REDUCTIONS", "BACKENDS"]

_BACKEND_CONTRACT = """
kd_forward(student_logits, teacher_logits, labels, *, teacher_labels, temperature, soft_weight,
           hard_weight, divergence, beta, ignore_index, grad_scale, grad) -> row_loss

student_logits, teacher_logits: (N, V) floating tensors, last-dim stride 1 (row stride free),
    dtypes may differ; or (B, S, V) with the same leading shape and any leading strides (rows in
    row-major (b, s) order, N = B * S). labels: (N,) int64 contiguous or None. teacher_labels:
    bool; when True, labels is None and the hard label of a row is the first index of its teacher
    maximum (a teacher row holding a NaN gives a NaN loss).
divergence: one of forward_kl, reverse_kl, jsd, mse. jsd arrives with 0 < beta < 1 only:
    _forward_impl turns beta 0 / 1 into forward_kl / reverse_kl before dispatch.
Rows whose label == ignore_index get row_loss 0 and a zero gradient row. A kept label outside
    [0, V) is never read out of bounds: the row's loss is NaN (the caller validates labels).
grad_scale: a float, or a 0-d float32 tensor on the logits' device (no host sync needed).
grad: None (no gradient wanted) or a tensor of the student's shape and dtype, last-dim stride 1,
    possibly the student tensor itself (in-place); it is filled with grad_scale * d row_loss / dz_s.
labels_in_range (optional, default False): the caller has checked every kept label; a backend
    may skip its own guard. all_rows_kept (optional, default False): moreover no label is
    ignore_index.
Returns row_loss: (N,) float32. All accumulation in float32.
"""

_SYNC_NOTES = """
Host syncs per kd_loss step with backend="triton" on CUDA:
- validate_labels=True (default), with a gradient: one, in backward, reading the label check
  made in forward together with whether grad_output is 1 (a bad label raises there; its rows
  were made NaN and nothing was read out of bounds).
- validate_labels=True without a gradient (no_grad / eval): one, in forward (the label check).
- validate_labels=False: none. The kept-row count stays on the device; a kept label outside
  [0, V) makes its row's loss NaN; backward scales the saved gradient by grad_output in place
  (one extra pass over it; differentiating the same graph twice then raises).
- labels=None / "teacher": no label check; backward reads grad_output (one sync) unless
  validate_labels=False (then none, as above).
backend="torch" on CUDA synchronizes once per row chunk (NaN guard) and is not sync-free.
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


# ----------------------------------------------------------------------------- row views
def _merged_leading_dims(shape, *strides):
    """Merge adjacent leading dims that collapse into one strided dim in every tensor; returns
    the merged sizes (dims of size 1 dropped)."""
    sizes, inner_strides = [], []
    for dim, size in enumerate(shape):
        if size == 1:
            continue
        dim_strides = [stride[dim] for stride in strides]
        if sizes and all(outer == size * inner for outer, inner in zip(inner_strides, dim_strides)):
            sizes[-1] *= size
        else:
            sizes.append(size)
        inner_strides = dim_strides
    return sizes


def _row_views(student_logits, teacher_logits):
    """(student, teacher) as (N, V) or (B, S, V) views of the same memory (no copy) when the
    last dim has stride 1 and the leading dims merge into at most two strided dims; otherwise
    a copy (rare: e.g. a transposed last dim, or three separately sliced leading dims)."""
    num_classes = student_logits.shape[-1]
    if student_logits.stride(-1) != 1 and num_classes > 1:
        student_logits = student_logits.contiguous()
    if teacher_logits.stride(-1) != 1 and num_classes > 1:
        teacher_logits = teacher_logits.contiguous()
    leading = student_logits.shape[:-1]
    if student_logits.dim() == 2:
        return student_logits, teacher_logits
    sizes = _merged_leading_dims(leading, student_logits.stride()[:-1],
                                 teacher_logits.stride()[:-1])
    if student_logits.numel() == 0 or len(sizes) <= 1:
        return student_logits.reshape(-1, num_classes), teacher_logits.reshape(-1, num_classes)
    if len(sizes) == 2:
        return (student_logits.view(sizes[0], sizes[1], num_classes),
                teacher_logits.view(sizes[0], sizes[1], num_classes))
    return student_logits.reshape(-1, num_classes), teacher_logits.reshape(-1, num_classes)


# ----------------------------------------------------------------------------- forward
_LABEL_NONE, _LABEL_TENSOR, _LABEL_TEACHER = 0, 1, 2
# Device types on which reading a value back to the host is a sync that stalls the device queue
# (tests add "cpu" here to run the deferred, sync-free code paths without a GPU).
_SYNCING_DEVICES = {"cuda"}


class _Pending:
    """A label check computed on the device in forward, read by backward (see _SYNC_NOTES)."""

    def __init__(self, bad, labels, num_classes, ignore_index):
        self.bad, self.labels = bad, labels
        self.num_classes, self.ignore_index = num_classes, ignore_index

    def raise_if_bad(self, bad_value):
        if bad_value:
            raise_bad_labels(self.labels, self.num_classes, self.ignore_index)


def _forward_impl(student_rows, teacher_rows, labels_1d, label_mode, temperature, soft_weight,
                  hard_weight, divergence, beta, ignore_index, reduction, backend, needs_grad,
                  validate_labels=True, grad_buffer=None, defer_check=False):
    """Run the backend; returns (loss, grad, pending). ``loss`` is a scalar (batchmean/sum) or
    (N,) rows; ``grad`` is already scaled for ``grad_output == 1`` (or per row, unscaled, for
    'none'); ``pending`` is a label check left for backward to read (or None)."""
    num_classes = student_rows.shape[-1]
    num_rows = labels_1d.shape[0] if labels_1d is not None else student_rows.numel() // max(
        num_classes, 1)
    # jsd with beta at an end point *is* forward/reverse KL (TRL GKD / Liger convention).
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"
    elif divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    if label_mode == _LABEL_TENSOR and (labels_1d.dtype != torch.int64
                                        or not labels_1d.is_contiguous()):
        labels_1d = labels_1d.to(torch.int64).contiguous()
    grad = None
    if needs_grad:
        grad = grad_buffer if grad_buffer is not None else torch.empty(
            student_rows.shape, dtype=student_rows.dtype, device=student_rows.device)
    cpu_kernel = (cpu_kernel_takes(student_rows) if backend == "torch" and num_rows
                  and student_rows.device.type not in _SYNCING_DEVICES else None)
    if cpu_kernel is not None:
        # the compiled CPU kernel checks the labels, counts the kept rows and reduces too
        try:
            loss = cpu_kernel.kd_loss_cpu(
                student_rows, teacher_rows, labels_1d if label_mode == _LABEL_TENSOR else None,
                teacher_labels=label_mode == _LABEL_TEACHER, temperature=temperature,
                soft_weight=soft_weight, hard_weight=hard_weight, divergence=divergence,
                beta=beta, ignore_index=ignore_index, reduction=reduction, grad=grad,
                validate_labels=validate_labels)
        except cpu_kernel.BadLabelsError:
            raise_bad_labels(labels_1d, num_classes, ignore_index)
        return loss, grad, None
    pending = None
    kept = num_rows
    labels_in_range = all_rows_kept = False
    if label_mode == _LABEL_TENSOR:
        if labels_1d.device.type not in _SYNCING_DEVICES and num_rows:
            # host reads are free here; one min/max settles the common case (no ignored row)
            lowest, highest = (value.item() for value in torch.aminmax(labels_1d))
            if 0 <= lowest and highest < num_classes and not lowest <= ignore_index <= highest:
                labels_in_range = all_rows_kept = True
            else:
                kept_value, bad_value = torch.stack(
                    [value.long() for value in label_status(labels_1d, num_classes,
                                                            ignore_index)]).tolist()
                if validate_labels and bad_value:
                    raise_bad_labels(labels_1d, num_classes, ignore_index)
                kept, labels_in_range = kept_value, not bad_value
        elif validate_labels or reduction == "batchmean":
            kept_tensor, bad = label_status(labels_1d, num_classes, ignore_index)
            kept = kept_tensor
            if validate_labels:
                pending = _Pending(bad, labels_1d, num_classes, ignore_index)
                if not defer_check:
                    pending.raise_if_bad(bool(bad))  # the one sync of this step
                    pending = None
    else:
        labels_1d = None
    if reduction != "batchmean":
        grad_scale = 1.0
    elif isinstance(kept, torch.Tensor):
        grad_scale = 1.0 / kept.clamp(min=1).float()
    else:
        grad_scale = 1.0 / kept if kept > 0 else 1.0
    kd_forward = _dispatch(backend)
    row_loss = kd_forward(
        student_rows, teacher_rows, labels_1d, teacher_labels=label_mode == _LABEL_TEACHER,
        temperature=temperature, soft_weight=soft_weight, hard_weight=hard_weight,
        divergence=divergence, beta=beta, ignore_index=ignore_index, grad_scale=grad_scale,
        grad=grad, labels_in_range=labels_in_range, all_rows_kept=all_rows_kept)
    if reduction == "none":
        loss = row_loss
    elif isinstance(grad_scale, float):
        # (a 0-d float32 operand: a Python float is converted to a tensor on every call)
        loss = row_loss.sum()
        if grad_scale != 1.0:
            loss.mul_(_cpu_scalar(grad_scale))
    else:
        loss = row_loss.sum() * grad_scale
    return loss, grad, pending


def _scale_grad(grad: torch.Tensor, grad_output: torch.Tensor, per_row: bool,
                pending: Optional[_Pending] = None, in_place: bool = False) -> torch.Tensor:
    """dL/dz_s = grad * grad_output. A scalar grad_output of exactly 1 hands ``grad`` over as is
    (no pass, no allocation); that needs its value on the host, read together with a pending
    label check in one transfer. ``in_place`` (sync-free mode) scales without reading it."""
    if per_row:
        scale = grad_output.to(grad.dtype).reshape(grad.shape[:-1] + (1,))
        if pending is not None:
            pending.raise_if_bad(bool(pending.bad))
        return grad.mul_(scale) if in_place else grad * scale
    if in_place and pending is None:
        return grad.mul_(grad_output.to(grad.dtype))
    if pending is not None:
        # one read: grad_output, or NaN when a label was bad (a second read then tells which)
        output_value = torch.where(pending.bad, float("nan"),
                                   grad_output.detach().float().reshape(())).item()
        if output_value != output_value:
            pending.raise_if_bad(bool(pending.bad))
    else:
        output_value = grad_output.item()
    if output_value == 1.0:
        return grad
    return grad * grad_output.to(grad.dtype)


class _KDLossFunction(torch.autograd.Function):
    """Eager autograd wiring: the gradient made in forward is saved and scaled in backward.
    With ``grad_buffer`` (grad_inplace=True) it is written into the student logits' storage."""

    @staticmethod
    def forward(ctx, student_rows, teacher_rows, labels, options, grad_inplace):
        (label_mode, temperature, soft_weight, hard_weight, divergence, beta, ignore_index,
         reduction, backend, validate_labels) = options
        syncing = student_rows.device.type in _SYNCING_DEVICES
        loss, grad, pending = _forward_impl(
            student_rows, teacher_rows, labels, label_mode, temperature, soft_weight,
            hard_weight, divergence, beta, ignore_index, reduction, backend, True,
            validate_labels=validate_labels, grad_buffer=student_rows if grad_inplace else None,
            defer_check=syncing)
        if grad_inplace:
            # The logits' values are gone: bump the version so any other saved use of them
            # fails loudly in backward instead of reading the gradient as logits.
            torch.autograd.graph.increment_version(student_rows)
        ctx.save_for_backward(grad)
        ctx.per_row = reduction == "none"
        ctx.pending = pending
        # sync-free mode on a device: scale in place instead of reading grad_output
        ctx.scale_in_place = syncing and not validate_labels
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (_scale_grad(grad, grad_output, ctx.per_row, ctx.pending, ctx.scale_in_place),
                None, None, None, None)


# ----------------------------------------------------------------------------- torch.compile
# The custom op is registered at import (cheap: it imports nothing new) but only called while
# torch.compile traces; its first call would import torch._dynamo, eager calls never make it.
@torch.library.custom_op("fastkd::kd_loss_forward", mutates_args=())
def _kd_loss_op(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: Optional[torch.Tensor], label_mode: int, temperature: float,
                soft_weight: float, hard_weight: float, divergence: str, beta: float,
                ignore_index: int, reduction: str, backend: str,
                needs_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    loss, grad, _ = _forward_impl(student_logits, teacher_logits, labels, label_mode,
                                  temperature, soft_weight, hard_weight, divergence, beta,
                                  ignore_index, reduction, backend, needs_grad)
    if grad is None:
        grad = student_logits.new_empty((0,))
    # custom ops may not return views of their inputs
    return loss.clone() if loss._base is not None else loss, grad


@_kd_loss_op.register_fake
def _(student_logits, teacher_logits, labels, label_mode, temperature, soft_weight, hard_weight,
      divergence, beta, ignore_index, reduction, backend, needs_grad):
    num_rows = student_logits.numel() // max(student_logits.shape[-1], 1)
    loss_shape = (num_rows,) if reduction == "none" else ()
    loss = student_logits.new_empty(loss_shape, dtype=torch.float32)
    grad = student_logits.new_empty(student_logits.shape if needs_grad else (0,))
    return loss, grad


def register_grad_in_forward_autograd(op, num_inputs: int, reduction_index: int) -> None:
    """Autograd for a custom op returning ``(loss, grad)`` whose ``grad`` (made in forward) is
    ``d loss / d input 0`` for ``grad_output == 1``: backward scales it by ``grad_output``
    (per row for ``reduction="none"``, read from input ``reduction_index``), with no host read
    (it is traced by torch.compile). Shared by the dense and the sparse loss ops."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.per_row = inputs[reduction_index] == "none"
        # The gradient output is never differentiated; without this autograd would materialize
        # a logits-sized zeros tensor as its incoming gradient on every backward.
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_output, _grad_of_grad):
        (grad,) = ctx.saved_tensors
        if grad_output is None:
            return (None,) * num_inputs
        if ctx.per_row:
            scaled = grad * grad_output.to(grad.dtype).unsqueeze(-1)
        else:
            scaled = grad * grad_output.to(grad.dtype)
        return (scaled,) + (None,) * (num_inputs - 1)

    op.register_autograd(backward, setup_context=setup_context)


register_grad_in_forward_autograd(_kd_loss_op, num_inputs=13, reduction_index=10)


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
        temperature: ``0 < T <= 100``, applied to both logits in the soft term only.
        divergence: ``forward_kl`` = KL(p_t||p_s), ``reverse_kl`` = KL(p_s||p_t), ``jsd``
            (generalized JSD with ``beta``; 0 / 1 are exactly forward / reverse KL), ``mse``
            (mean over V of squared raw-logit differences; no temperature, no T^2).
        reduction: ``batchmean`` (sum over kept rows / number of kept rows; 0 if none kept),
            ``sum``, or ``none`` (per-row losses of shape ``(...)``, 0 for ignored rows).
        backend: ``auto`` (Triton on CUDA, PyTorch fallback elsewhere), ``triton``, ``torch``.
        grad_inplace: write the gradient into ``student_logits``' storage (saves one logits-sized
            buffer). Only when nothing else needs those logits afterwards; not under
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
        from fastkd.sparse_loss import sparse_kd_loss
        return sparse_kd_loss(
            student_logits, teacher_logits, labels, tail=tail, temperature=temperature,
            soft_weight=soft_weight, hard_weight=hard_weight, divergence=divergence, beta=beta,
            ignore_index=ignore_index, reduction=reduction, backend=backend,
            grad_inplace=grad_inplace)
    if not isinstance(teacher_logits, torch.Tensor):
        raise TypeError("teacher_logits must be a torch.Tensor, TopKLogits or SampledTargets, "
                        f"got {type(teacher_logits).__name__}")
    check_choice("tail", tail, TAILS)
    _validate(student_logits, teacher_logits, labels, temperature, soft_weight, hard_weight,
              divergence, beta, ignore_index, reduction, backend)
    resolved = _resolve_backend(backend, student_logits.device)
    leading = student_logits.shape[:-1]
    student_rows, teacher_rows = _row_views(student_logits, teacher_logits.detach())
    if isinstance(labels, torch.Tensor):
        label_mode, labels_1d = _LABEL_TENSOR, labels.reshape(-1)
    else:
        label_mode = _LABEL_TEACHER if labels == "teacher" else _LABEL_NONE
        labels_1d = None
    options = (label_mode, float(temperature), float(soft_weight), float(hard_weight),
               divergence, float(beta), int(ignore_index), reduction, resolved)
    needs_grad = torch.is_grad_enabled() and student_logits.requires_grad
    if torch.compiler.is_compiling():
        if grad_inplace and needs_grad:
            raise ValueError("grad_inplace=True is not supported under torch.compile")
        loss, _ = _kd_loss_op(student_rows, teacher_rows, labels_1d, *options, needs_grad)
    elif needs_grad:
        if grad_inplace:
            if student_rows.data_ptr() != student_logits.data_ptr():
                raise ValueError("grad_inplace=True needs student_logits whose rows are a view "
                                 "(last-dim stride 1, leading dims mergeable without a copy)")
            check_inplace_target(student_rows, ("teacher_logits", teacher_rows))
        loss = _KDLossFunction.apply(student_rows, teacher_rows, labels_1d,
                                     options + (bool(validate_labels),), bool(grad_inplace))
    else:
        loss, _, _ = _forward_impl(student_rows, teacher_rows, labels_1d, *options, False,
                                   validate_labels=bool(validate_labels))
    return loss.reshape(leading) if reduction == "none" else loss


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
        check_options(temperature, soft_weight, hard_weight, divergence, beta, ignore_index,
                       reduction, backend)
        check_choice("tail", tail, TAILS)
        self.options = dict(tail=tail, temperature=temperature, soft_weight=soft_weight,
                            hard_weight=hard_weight, divergence=divergence, beta=beta,
                            ignore_index=ignore_index, reduction=reduction, backend=backend,
                            grad_inplace=grad_inplace, validate_labels=validate_labels)

    def forward(self, student_logits, teacher_logits, labels=None):
        return kd_loss(student_logits, teacher_logits, labels, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())
