"""The autograd wiring of the dense and sparse KD losses, written once.

A loss family registers one forward function (:func:`register_family`)::

    forward(student, teacher_parts, labels, options, needs_grad, grad_buffer=None,
            defer_check=False) -> (loss, grad, pending)

``student``: the ``(N, V)`` / ``(B, S, V)`` rows; ``teacher_parts``: a 4-tuple of tensors or
None (dense: ``(teacher, None, None, None)``; sparse: ``(indices, values, lse, counts)``);
``labels``: ``(N,)`` or None; ``options``: :class:`fastkd.options.LossOptions`. ``loss`` is a
0-d float32 or ``(N,)`` rows, ``grad`` the gradient for ``grad_output == 1`` (per row,
unscaled, for ``reduction="none"``; ``None`` without ``needs_grad``), ``pending`` a label check
left on the device for backward to read, or None.

:func:`run_loss` calls it three ways: without a gradient directly; in eager through a plain
``torch.autograd.Function`` (cheapest per call, nothing of ``torch._dynamo`` imported); under
``torch.compile`` through the ``torch.library`` custom op ``fastkd::kd_loss_forward`` (no graph
break). Backward only scales the saved gradient by ``grad_output``.
"""
from typing import Optional

import torch

from fastkd.checks import check_inplace_target, raise_bad_labels
from fastkd.options import LossOptions

__all__ = ["register_family", "run_loss", "PendingLabelCheck", "SYNCING_DEVICES", "syncs",
           "scale_grad"]

# Device types on which reading a value back to the host stalls the device queue (tests add
# "cpu" here to run the deferred, sync-free code paths without a GPU).
SYNCING_DEVICES = {"cuda"}

FORWARDS = {}   # family name -> its forward function


def syncs(device: torch.device) -> bool:
    """Whether reading a value of ``device`` back to the host stalls its queue."""
    return device.type in SYNCING_DEVICES


def register_family(name: str, forward) -> None:
    FORWARDS[name] = forward


class PendingLabelCheck:
    """A label check computed on the device in forward and read in backward, so that a step
    with a gradient costs one host sync."""

    def __init__(self, bad, labels, num_classes, ignore_index):
        self.bad, self.labels = bad, labels
        self.num_classes, self.ignore_index = num_classes, ignore_index

    def raise_if_bad(self, bad_value):
        if bad_value:
            raise_bad_labels(self.labels, self.num_classes, self.ignore_index)


def scale_grad(grad: torch.Tensor, grad_output: torch.Tensor, per_row: bool,
               pending: Optional[PendingLabelCheck] = None,
               in_place: bool = False) -> torch.Tensor:
    """``grad * grad_output``. A scalar ``grad_output`` of exactly 1 hands ``grad`` over as is
    (no pass, no allocation); that needs its value on the host, read together with a pending
    label check in one transfer. ``in_place`` (the sync-free mode) scales without reading it."""
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


class _GradInForward(torch.autograd.Function):
    """Eager wiring: the gradient made in forward is saved and scaled in backward. With
    ``grad_inplace`` it is written into the student logits' own storage."""

    @staticmethod
    def forward(ctx, student, teacher_0, teacher_1, teacher_2, teacher_3, labels, family,
                options, grad_inplace):
        syncing = syncs(student.device)
        loss, grad, pending = FORWARDS[family](
            student, (teacher_0, teacher_1, teacher_2, teacher_3), labels, options, True,
            grad_buffer=student if grad_inplace else None, defer_check=syncing)
        if grad_inplace:
            # The logits' values are gone: bump the version so that any other saved use of
            # them fails loudly in backward instead of reading the gradient as logits.
            torch.autograd.graph.increment_version(student)
        ctx.save_for_backward(grad)
        ctx.per_row = options.reduction == "none"
        ctx.pending = pending
        ctx.scale_in_place = syncing and not options.validate_labels
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (scale_grad(grad, grad_output, ctx.per_row, ctx.pending, ctx.scale_in_place),
                ) + (None,) * 8


# Registered at import (cheap: it imports nothing new) but only called while torch.compile
# traces; its first call would import torch._dynamo, eager calls never make it.
@torch.library.custom_op("fastkd::kd_loss_forward", mutates_args=())
def _loss_op(student: torch.Tensor, teacher_0: torch.Tensor, teacher_1: Optional[torch.Tensor],
             teacher_2: Optional[torch.Tensor], teacher_3: Optional[torch.Tensor],
             labels: Optional[torch.Tensor], family: str, options: str,
             needs_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    loss, grad, _ = FORWARDS[family](student, (teacher_0, teacher_1, teacher_2, teacher_3),
                                     labels, LossOptions.decode(options), needs_grad)
    if grad is None:
        grad = student.new_empty((0,))
    # custom ops may not return views of their inputs
    return loss.clone() if loss._base is not None else loss, grad


@_loss_op.register_fake
def _(student, teacher_0, teacher_1, teacher_2, teacher_3, labels, family, options, needs_grad):
    num_rows = student.numel() // max(student.shape[-1], 1)
    per_row = LossOptions.decode(options).reduction == "none"
    loss = student.new_empty((num_rows,) if per_row else (), dtype=torch.float32)
    return loss, student.new_empty(student.shape if needs_grad else (0,))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.per_row = LossOptions.decode(inputs[7]).reduction == "none"
    # The gradient output is never differentiated; without this autograd would materialize a
    # logits-sized zeros tensor as its incoming gradient on every backward.
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _op_backward(ctx, grad_output, _grad_of_grad):
    (grad,) = ctx.saved_tensors
    if grad_output is None:
        return (None,) * 9
    scale = grad_output.to(grad.dtype)
    scaled = grad * (scale.reshape(grad.shape[:-1] + (1,)) if ctx.per_row else scale)
    return (scaled,) + (None,) * 8


_loss_op.register_autograd(_op_backward, setup_context=_setup_context)


def run_loss(family: str, student_rows: torch.Tensor, teacher_parts, labels, options,
             *, requires_grad: bool, grad_inplace: bool = False, student_logits=None,
             part_names=()) -> torch.Tensor:
    """The loss of one call: no-grad, eager autograd or the custom op under ``torch.compile``.
    ``requires_grad``: whether the caller's student logits want a gradient. With
    ``grad_inplace`` the rows must be a view of ``student_logits`` (checked) that no teacher
    part (named by ``part_names``) overlaps."""
    parts = tuple(teacher_parts) + (None,) * (4 - len(teacher_parts))
    needs_grad = torch.is_grad_enabled() and requires_grad
    if torch.compiler.is_compiling():
        if grad_inplace and needs_grad:
            raise ValueError("grad_inplace=True is not supported under torch.compile")
        return _loss_op(student_rows, *parts, labels, family, options.encode(), needs_grad)[0]
    if not needs_grad:
        return FORWARDS[family](student_rows, parts, labels, options, False)[0]
    if grad_inplace:
        if (student_rows.data_ptr() != student_logits.data_ptr()
                or student_rows.stride(-1) != 1):
            raise ValueError("grad_inplace=True needs student_logits whose rows are a view "
                             "(last-dim stride 1, leading dims mergeable without a copy)")
        check_inplace_target(student_rows, *((name, part) for name, part in zip(part_names, parts)
                                             if part is not None))
    return _GradInForward.apply(student_rows, *parts, labels, family, options,
                                bool(grad_inplace))
