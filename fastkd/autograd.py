"""The autograd wiring of every loss family (dense, sparse, fused linear), written once.

A family registers a :class:`Family`. Its ``forward`` takes up to 7 input tensors (dense and
sparse: the student rows, the teacher parts, the labels; fused linear: hidden states, weight,
bias, the teacher parts, the labels) and the family's options, and returns ``(loss, grads,
pending)``: ``loss`` a 0-d float32 or ``(N,)`` rows, ``grads`` the gradients of the first three
inputs for ``grad_output == 1`` (per row, unscaled, for ``reduction="none"``; None where not
made), ``pending`` a label check left on the device for backward to read, or None.

:func:`run_loss` calls it three ways: without a gradient directly; in eager through a plain
``torch.autograd.Function`` (cheapest per call, nothing of ``torch._dynamo`` imported); under
``torch.compile`` through the ``torch.library`` custom op ``fastkd::kd_loss_forward`` (no graph
break; the options cross it as one string). Backward only scales the saved gradients by
``grad_output``, except where the family says a gradient needs a second pass over the inputs
(the head of a fused linear loss with per-row losses: each row's share is weighted by its
``grad_output``).
"""
import dataclasses
from typing import Callable, Optional

import torch

from fastkd.checks import check_flag, check_inplace_target, raise_bad_labels

__all__ = ["Family", "register_family", "run_loss", "PendingLabelCheck", "SYNCING_DEVICES",
           "syncs", "scale_grads"]

# Device types on which reading a value back to the host stalls the device queue (tests add
# "cpu" here to run the deferred, sync-free code paths without a GPU).
SYNCING_DEVICES = {"cuda"}

NUM_INPUTS = 7


def _first_input_only(options, needs_grad):
    return (needs_grad, False, False)


@dataclasses.dataclass(frozen=True)
class Family:
    """A loss family's part in the wiring.

    ``forward(tensors, options, needs_grad, grad_buffer=None, defer_check=False)`` as in the
    module docstring; ``options_type`` decodes the options string at the custom-op boundary;
    ``grads_in_forward(options, needs_grad)``: which of the first three inputs' gradients
    ``forward`` makes; ``second_pass(tensors, options, grad_output)``, when
    ``options.second_pass`` is set: the gradients of inputs 1 and 2, made in backward (their
    shapes are the inputs' where ``second_pass_wanted(options)`` says so)."""
    forward: Callable
    options_type: type
    grads_in_forward: Callable = _first_input_only
    second_pass: Optional[Callable] = None
    second_pass_wanted: Optional[Callable] = None


FAMILIES = {}


def syncs(device: torch.device) -> bool:
    """Whether reading a value of ``device`` back to the host stalls its queue."""
    return device.type in SYNCING_DEVICES


def register_family(name: str, family: Family) -> None:
    FAMILIES[name] = family


class PendingLabelCheck:
    """A label check computed on the device in forward and read in backward, so that a step
    with a gradient costs one host sync."""

    def __init__(self, bad, labels, num_classes, ignore_index):
        self.bad, self.labels = bad, labels
        self.num_classes, self.ignore_index = num_classes, ignore_index

    def raise_if_bad(self, bad_value):
        if bad_value:
            raise_bad_labels(self.labels, self.num_classes, self.ignore_index)


def _host_value(grad_output: torch.Tensor,
                pending: Optional[PendingLabelCheck]) -> float:
    """A scalar ``grad_output``'s value on the host. A pending label check is read in the same
    transfer (NaN stands for a bad label; a second read then tells which) and raised."""
    if pending is None:
        return grad_output.item()
    value = torch.where(pending.bad, float("nan"),
                        grad_output.detach().float().reshape(())).item()
    if value != value:
        pending.raise_if_bad(bool(pending.bad))
    return value


def scale_grads(grads, grad_output: torch.Tensor, per_row: bool,
                pending: Optional[PendingLabelCheck] = None, in_place: bool = False) -> tuple:
    """The saved gradients (None stays None) times ``grad_output``.

    Per-row losses: the first gradient row by row (the others are never per-row; a family
    whose other gradients depend on the rows' weights makes them in a second pass). A scalar
    ``grad_output`` is read to the host once for all of them, and a value of exactly 1 hands
    the gradients over as they are (no pass, no allocation). ``in_place`` (the sync-free
    mode) scales them in place without reading it."""
    if per_row:
        if pending is not None:
            pending.raise_if_bad(bool(pending.bad))
        first = grads[0]
        if first is not None:
            scale = grad_output.to(first.dtype).reshape(first.shape[:-1] + (1,))
            first = first.mul_(scale) if in_place else first * scale
        return (first,) + tuple(grads[1:])
    if in_place and pending is None:
        return tuple(None if grad is None else grad.mul_(grad_output.to(grad.dtype))
                     for grad in grads)
    if _host_value(grad_output, pending) == 1.0:
        return tuple(grads)
    return tuple(None if grad is None else grad * grad_output.to(grad.dtype) for grad in grads)


def _second_pass_needed(options) -> bool:
    return getattr(options, "second_pass", False)


def _scaled_grads(grads, grad_output, per_row, pending=None, in_place=False, second=None):
    """Backward's gradients of the first three inputs: the saved ones scaled by ``grad_output``,
    or inputs 1 and 2 from ``second()``."""
    if second is not None:
        return scale_grads(grads[:1], grad_output, per_row, pending, in_place) + tuple(second())
    return scale_grads(grads, grad_output, per_row, pending, in_place)


NOT_TWICE_DIFFERENTIABLE = (
    "fastkd losses are differentiable once: their gradient is made in the forward pass, so "
    "create_graph=True (double backward, gradient penalties) and forward-mode AD are not "
    "supported; use the textbook composition (fastkd.reference_dense) where you need them")


class _GradInForward(torch.autograd.Function):
    """Eager wiring: the gradients made in forward are saved and scaled in backward. With
    ``grad_inplace`` the first input's gradient is written into its own storage."""

    @staticmethod
    def forward(ctx, name, options, grad_inplace, *tensors):
        family = FAMILIES[name]
        syncing = syncs(tensors[0].device)
        loss, grads, pending = family.forward(
            tensors, options, True, grad_buffer=tensors[0] if grad_inplace else None,
            defer_check=syncing)
        if grad_inplace:
            # The logits' values are gone: bump the version so that any other saved use of
            # them fails loudly in backward instead of reading the gradient as logits.
            torch.autograd.graph.increment_version(tensors[0])
        ctx.family, ctx.options = family, options
        ctx.per_row = options.reduction == "none"
        ctx.pending = pending
        ctx.scale_in_place = syncing and not options.validate_labels
        ctx.second = _second_pass_needed(options)
        ctx.save_for_backward(*grads, *(tensors if ctx.second else ()))
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():   # create_graph=True: the saved gradient has no graph
            raise RuntimeError(NOT_TWICE_DIFFERENTIABLE)
        if ctx.scale_in_place:
            if getattr(ctx, "scaled", False):
                raise RuntimeError(
                    "this fastkd loss was already backpropagated: with validate_labels=False on "
                    "a GPU its backward scales the saved gradient in place, so it runs once "
                    "(retain_graph=True cannot repeat it); compute the loss again, or keep "
                    "validate_labels=True")
            ctx.scaled = True
        saved = ctx.saved_tensors
        second = (lambda: ctx.family.second_pass(saved[3:], ctx.options, grad_output)) \
            if ctx.second else None
        grads = _scaled_grads(saved[:3], grad_output, ctx.per_row, ctx.pending,
                              ctx.scale_in_place, second)
        return (None, None, None) + grads + (None,) * (NUM_INPUTS - 3)


# Registered at import (cheap: they import nothing new) but only called while torch.compile
# traces; their first call would import torch._dynamo, eager calls never make it.
@torch.library.custom_op("fastkd::kd_loss_forward", mutates_args=())
def _loss_op(x0: torch.Tensor, x1: Optional[torch.Tensor], x2: Optional[torch.Tensor],
             x3: Optional[torch.Tensor], x4: Optional[torch.Tensor], x5: Optional[torch.Tensor],
             x6: Optional[torch.Tensor], family: str, options: str,
             needs_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    kind = FAMILIES[family]
    loss, grads, _ = kind.forward((x0, x1, x2, x3, x4, x5, x6),
                                  kind.options_type.decode(options), needs_grad)
    # custom ops may not return views of their inputs, nor outputs that alias each other
    return ((loss.clone() if loss._base is not None else loss,)
            + tuple(x0.new_empty((0,)) if grad is None else grad for grad in grads))


@_loss_op.register_fake
def _(x0, x1, x2, x3, x4, x5, x6, family, options, needs_grad):
    kind = FAMILIES[family]
    decoded = kind.options_type.decode(options)
    num_rows = x0.numel() // max(x0.shape[-1], 1)
    loss = x0.new_empty((num_rows,) if decoded.reduction == "none" else (), dtype=torch.float32)
    made = kind.grads_in_forward(decoded, needs_grad)
    return (loss,) + tuple(tensor.new_empty(tensor.shape) if wanted else x0.new_empty((0,))
                           for tensor, wanted in zip((x0, x1, x2), made))


@torch.library.custom_op("fastkd::kd_loss_second_pass", mutates_args=())
def _second_pass_op(x0: torch.Tensor, x1: Optional[torch.Tensor], x2: Optional[torch.Tensor],
                    x3: Optional[torch.Tensor], x4: Optional[torch.Tensor],
                    x5: Optional[torch.Tensor], x6: Optional[torch.Tensor], family: str,
                    options: str, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    kind = FAMILIES[family]
    grads = kind.second_pass((x0, x1, x2, x3, x4, x5, x6), kind.options_type.decode(options),
                             grad_output)
    return tuple(x0.new_empty((0,)) if grad is None else grad for grad in grads)


@_second_pass_op.register_fake
def _(x0, x1, x2, x3, x4, x5, x6, family, options, grad_output):
    kind = FAMILIES[family]
    wanted = kind.second_pass_wanted(kind.options_type.decode(options))
    return tuple(tensor.new_empty(tensor.shape) if want else x0.new_empty((0,))
                 for tensor, want in zip((x1, x2), wanted))


def _setup_context(ctx, inputs, output):
    kind = FAMILIES[inputs[7]]
    options = kind.options_type.decode(inputs[8])
    ctx.name, ctx.options_text = inputs[7], inputs[8]
    ctx.per_row = options.reduction == "none"
    ctx.made = kind.grads_in_forward(options, inputs[9])
    ctx.second = _second_pass_needed(options)
    ctx.save_for_backward(*output[1:], *(inputs[:NUM_INPUTS] if ctx.second else ()))
    # The gradient outputs are never differentiated; without this autograd would materialize
    # logits-sized zeros as their incoming gradients on every backward.
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _op_backward(ctx, grad_output, *_grads_of_grads):
    if grad_output is None:
        return (None,) * (NUM_INPUTS + 3)
    saved = ctx.saved_tensors
    grads = [grad if made else None for grad, made in zip(saved[:3], ctx.made)]
    first = grads[0]
    if first is not None:
        scale = grad_output.to(first.dtype)
        first = first * (scale.reshape(first.shape[:-1] + (1,)) if ctx.per_row else scale)
    if ctx.second:
        rest = _second_pass_op(*saved[3:], ctx.name, ctx.options_text, grad_output)
    else:
        rest = tuple(None if grad is None else grad * grad_output.to(grad.dtype)
                     for grad in grads[1:])
    return (first,) + tuple(rest) + (None,) * (NUM_INPUTS - 3 + 3)


_loss_op.register_autograd(_op_backward, setup_context=_setup_context)


def _has_tangents(tensors) -> bool:
    """Whether an input carries a forward-mode AD tangent (inside ``forward_ad.dual_level``)."""
    from torch.autograd import forward_ad
    if getattr(forward_ad, "_current_level", -1) < 0:   # no dual level is open
        return False
    return any(tensor is not None and forward_ad.unpack_dual(tensor).tangent is not None
               for tensor in tensors)


def run_loss(family: str, tensors, options, *, requires_grad: bool, grad_inplace: bool = False,
             student_logits=None, part_names=()) -> torch.Tensor:
    """The loss of one call: no-grad, eager autograd or the custom op under ``torch.compile``.
    ``tensors``: the family's inputs (at most 7; missing ones are None). ``requires_grad``:
    whether any input wants a gradient. With ``grad_inplace`` the first input (the student rows)
    must be a view of ``student_logits`` (checked) that no other input (named by
    ``part_names``, from the second on) overlaps."""
    tensors = tuple(tensors) + (None,) * (NUM_INPUTS - len(tensors))
    check_flag("grad_inplace", grad_inplace)
    if _has_tangents(tensors):
        raise RuntimeError(NOT_TWICE_DIFFERENTIABLE)
    needs_grad = torch.is_grad_enabled() and requires_grad
    if torch.compiler.is_compiling():
        if grad_inplace and needs_grad:
            raise ValueError("grad_inplace=True is not supported under torch.compile")
        return _loss_op(*tensors, family, options.encode(), needs_grad)[0]
    if not needs_grad:
        return FAMILIES[family].forward(tensors, options, False)[0]
    if grad_inplace:
        student_rows = tensors[0]
        if student_logits.is_leaf:
            raise ValueError(
                "grad_inplace=True would overwrite a leaf tensor that requires grad (a "
                "parameter, or an input made with requires_grad=True), as torch refuses in-place "
                "ops on leaves; pass logits computed from it (a layer's output) or use "
                "grad_inplace=False")
        if (student_rows.data_ptr() != student_logits.data_ptr()
                or student_rows.stride(-1) != 1):
            raise ValueError("grad_inplace=True needs student_logits whose rows are a view "
                             "(last-dim stride 1, leading dims mergeable without a copy)")
        check_inplace_target(student_rows, *((name, part)
                                             for name, part in zip(part_names, tensors[1:])
                                             if part is not None))
    return _GradInForward.apply(family, options, bool(grad_inplace), *tensors)
