"""The chunked pass of the fused linear + KD loss (:mod:`fastkd.linear`, whose docstring states
the math): the chunk size from the memory budget, each side's chunk logits with its logit
transform (``scale``, ``softcap``), and the loop that calls the KD kernel family on one chunk of
kept rows at a time and turns its logits gradient into the hidden-state, weight and bias
gradients. No autograd here: :mod:`fastkd.linear` wires this pass into autograd and
``torch.compile``.
"""
import ast
import dataclasses
from typing import Optional

import torch

from fastkd.checks import check_label_values, check_sparse_values
from fastkd.dispatch import dispatch
from fastkd.options import LossOptions, field_values

__all__ = ["LinearOptions", "fused_forward", "DEFAULT_CHUNK_BUDGET_BYTES", "TEACHER_LOGITS",
           "TEACHER_HEAD", "TEACHER_TOPK", "TEACHER_SAMPLED"]

# Default budget for the student's chunk-sized buffers (its logits, and their gradient with a
# softcap); a teacher head's chunk logits get as much again (chunk_budget_bytes=None). 256 MiB is
# ~520 rows at V = 128256 in fp32 and ~1000 in bf16, in the range of Liger-Kernel's chunking.
# Every chunk streams both output layers and the weight gradient through memory once, so small
# chunks cost time (figures in benchmarks/results/cpu-amd-epyc-2-threads-linear/).
DEFAULT_CHUNK_BUDGET_BYTES = 256 * 2**20
# What matters for time is the rows per chunk (each chunk's fixed cost is one pass over the
# output layers, whatever V): past ~1000 rows it stops showing, so the default budget stops
# there and small vocabularies keep their buffers small (Liger-Kernel's default chunk is 1024
# rows).
DEFAULT_MAX_CHUNK_ROWS = 1024

TEACHER_LOGITS, TEACHER_HEAD, TEACHER_TOPK, TEACHER_SAMPLED = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class LinearOptions:
    """The options of one fused linear + KD call: the loss's, the teacher's kind (one of the
    ``TEACHER_*`` codes), both sides' logit transforms, the chunking (0: from the budget /
    default) and which gradients are wanted. Crosses the custom-op boundary as one string."""
    loss: LossOptions
    teacher_kind: int
    num_classes: int
    student_scale: float = 1.0
    student_softcap: Optional[float] = None
    teacher_scale: float = 1.0
    teacher_softcap: Optional[float] = None
    compute_dtype: str = ""
    chunk_rows: int = 0
    chunk_budget_bytes: int = 0
    needs_hidden: bool = False
    needs_weight: bool = False
    needs_bias: bool = False

    @property
    def second_pass(self) -> bool:
        """Per-row losses with a trainable head: the weight / bias gradient is a sum over rows
        that ``grad_output`` weights, so it is made in backward, by a second chunked pass."""
        return self.loss.reduction == "none" and (self.needs_weight or self.needs_bias)

    @property
    def reduction(self) -> str:
        return self.loss.reduction

    @property
    def validate_labels(self) -> bool:
        return True

    def replace(self, **changes) -> "LinearOptions":
        return dataclasses.replace(self, **changes)

    def encode(self) -> str:
        return repr(field_values(self))

    @classmethod
    def decode(cls, text: str) -> "LinearOptions":
        loss, *values = ast.literal_eval(text)
        return cls(LossOptions(*loss), *values)


# ----------------------------------------------------------------------------- chunk pieces
def _rows(tensor: torch.Tensor, rows) -> torch.Tensor:
    """Rows of a 2-D tensor: a slice (a view) or an index tensor (a gathered copy)."""
    return tensor[rows] if isinstance(rows, slice) else tensor.index_select(0, rows)


def _linear_into(hidden_rows, weight, bias, out):
    """out = hidden_rows @ weight.T (+ bias), (C, V)."""
    if bias is None:
        return torch.mm(hidden_rows, weight.t(), out=out)
    return torch.addmm(bias, hidden_rows, weight.t(), out=out)


def _transform_(logits, scale: float, softcap: Optional[float]):
    """In place: ``cap * tanh(scale * logits / cap)``, or ``scale * logits`` without a cap."""
    if softcap is not None:
        return logits.mul_(scale / softcap).tanh_().mul_(softcap)
    return logits.mul_(scale) if scale != 1.0 else logits


# Rows per block of the float32 softcap of low-precision chunk logits: its float32 temporaries
# (a block of tanh values) stay near 16 MiB whatever the chunk.
_SOFTCAP_BLOCK_BYTES = 16 * 2**20


def _blocks(num_rows: int, num_classes: int):
    step = max(1, _SOFTCAP_BLOCK_BYTES // (4 * max(num_classes, 1)))
    return (slice(start, min(start + step, num_rows)) for start in range(0, num_rows, step))


def _softcap_into_float32(raw, out, scale: float, softcap: float):
    """``out`` (float32) = ``cap * tanh(scale * raw / cap)`` of low-precision ``raw``, computed
    in float32 (one rounding of the logits, by the matmul, as in an upcast-then-cap loss)."""
    for block in _blocks(raw.shape[0], raw.shape[1]):
        out[block].copy_(raw[block]).mul_(scale / softcap).tanh_().mul_(softcap)
    return out


def _softcap_grad_(grad, raw, scale: float, softcap: float):
    """In place on float32 ``grad`` (d loss / d z): times ``1 - tanh^2(scale * raw / cap)``, the
    derivative of the float32 softcap of ``raw`` (recomputed block by block from ``raw``)."""
    for block in _blocks(raw.shape[0], raw.shape[1]):
        tanh = raw[block].float().mul_(scale / softcap).tanh_()
        grad[block].mul_(tanh.square_().neg_().add_(1.0))
    return grad


class _Side:
    """One side's output layer in the compute dtype: weight (V, H), bias (V,) or None, and its
    logit transform. A softcap on a float16 / bfloat16 side runs in float32: the matmul writes
    the raw logits in the compute dtype, the capped logits are float32 (``float32_cap``)."""

    def __init__(self, hidden, weight, bias, scale, softcap, compute_dtype, num_classes):
        dtype = compute_dtype or torch.promote_types(hidden.dtype, weight.dtype)
        self.dtype = dtype
        self.hidden = hidden
        self.weight = weight[:num_classes].to(dtype)   # a view unless a cast is needed
        self.bias = bias[:num_classes].to(dtype) if bias is not None else None
        self.scale = scale
        self.softcap = softcap
        self.float32_cap = softcap is not None and dtype != torch.float32
        self.logits_dtype = torch.float32 if self.float32_cap else dtype

    def logits(self, rows, out, raw=None):
        """Transformed chunk logits of ``rows`` into ``out`` (C, V) of ``logits_dtype``; with
        ``float32_cap`` the raw logits go to ``raw`` (C, V) in the compute dtype first."""
        hidden_rows = _rows(self.hidden, rows).to(self.dtype)
        if self.float32_cap:
            _linear_into(hidden_rows, self.weight, self.bias, raw)
            return _softcap_into_float32(raw, out, self.scale, self.softcap), hidden_rows
        return _transform_(_linear_into(hidden_rows, self.weight, self.bias, out), self.scale,
                           self.softcap), hidden_rows


# ----------------------------------------------------------------------------- forward
def fused_forward(hidden, weight, bias, teacher_parts, labels, opts: LinearOptions,
                  row_weights=None):
    """``(loss, grad_hidden, grad_weight, grad_bias)`` for 2-D ``hidden (N, H)``; gradients
    already scaled for ``grad_output == 1`` (per row, unscaled, for ``reduction='none'``) and
    empty ``(0,)`` tensors where not wanted. ``teacher_parts``: 3 tensors or None (dense
    logits; a head's hidden, weight, bias; top-k indices, values, lse; sampled indices,
    counts). ``row_weights (N,)``: each row's logits gradient is multiplied by its weight
    before the matmuls (the backward pass of per-row losses)."""
    options = opts.loss
    teacher_kind, num_classes = opts.teacher_kind, opts.num_classes
    teacher_0, teacher_1, teacher_2 = teacher_parts
    temperature, ignore_index = options.temperature, options.ignore_index
    reduction, tail = options.reduction, options.tail
    needs_hidden, needs_weight, needs_bias = opts.needs_hidden, opts.needs_weight, opts.needs_bias
    student_scale, student_softcap = opts.student_scale, opts.student_softcap
    chunk_rows, chunk_budget_bytes = opts.chunk_rows, opts.chunk_budget_bytes
    num_rows = hidden.shape[0]
    device = hidden.device
    compute_dtype = getattr(torch, opts.compute_dtype) if opts.compute_dtype else None
    student = _Side(hidden, weight, bias, student_scale, student_softcap, compute_dtype,
                    num_classes)

    # Kept rows: everything, or the rows whose label is not ignore_index (dropped before any
    # matmul); batchmean divides by their number.
    sparse = teacher_kind in (TEACHER_TOPK, TEACHER_SAMPLED)
    if sparse:   # ids, values, lse, counts and labels checked together (one host sync)
        values, lse, counts = ((teacher_1, teacher_2, None) if teacher_kind == TEACHER_TOPK
                               else (None, None, teacher_1))
        labels, num_kept = check_sparse_values(
            teacher_0, num_classes, values=values, lse=lse, counts=counts, labels=labels,
            ignore_index=ignore_index, temperature=None if tail == "renormalize" else temperature)
        if lse is not None:
            lse = lse.float()
    elif labels is not None:
        labels = check_label_values(labels, num_classes, ignore_index)
        num_kept = int((labels != ignore_index).sum())
    else:
        num_kept = num_rows
    kept_index = None
    if labels is not None and num_kept < num_rows:
        kept_index = (labels != ignore_index).nonzero().squeeze(1)
        labels = labels.index_select(0, kept_index)
    grad_scale = 1.0 / num_kept if (reduction == "batchmean" and num_kept > 0) else 1.0

    wants_grad = needs_hidden or needs_weight or needs_bias
    grad_hidden = (torch.zeros if kept_index is not None else torch.empty)(
        hidden.shape, dtype=hidden.dtype, device=device) if needs_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device) \
        if needs_weight else None
    grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=device) \
        if needs_bias else None

    # Teacher: dense rows (sliced to V columns), an output layer of its own, or sparse rows.
    teacher_side = teacher_rows = None
    if teacher_kind == TEACHER_HEAD:
        teacher_side = _Side(teacher_0, teacher_1, teacher_2, opts.teacher_scale,
                             opts.teacher_softcap, compute_dtype, num_classes)
    elif not sparse:
        teacher_rows = teacher_0[:, :num_classes]

    # Chunk size from the budget: bytes per row of every chunk-sized buffer. A float32 softcap
    # of a low-precision side keeps its raw logits (compute dtype) beside the float32 capped
    # ones; the student's gradient is then written over the capped logits (its derivative is
    # recomputed from the raw ones). A float32 student's softcap needs z after the kernel, so
    # the kernel writes its gradient into a buffer of its own.
    separate_grad = wants_grad and student_softcap is not None and not student.float32_cap
    per_row = num_classes * student.logits_dtype.itemsize * (2 if separate_grad else 1)
    if student.float32_cap:
        per_row += num_classes * student.dtype.itemsize
    max_rows = num_kept
    if chunk_budget_bytes <= 0:   # the default: DEFAULT_CHUNK_BUDGET_BYTES per side
        chunk_budget_bytes = DEFAULT_CHUNK_BUDGET_BYTES * (2 if teacher_side is not None else 1)
        max_rows = DEFAULT_MAX_CHUNK_ROWS
    if teacher_side is not None:
        per_row += num_classes * teacher_side.logits_dtype.itemsize
        if teacher_side.float32_cap:
            per_row += num_classes * teacher_side.dtype.itemsize
    elif teacher_rows is not None and (kept_index is not None or teacher_rows.stride(-1) != 1):
        per_row += num_classes * teacher_rows.dtype.itemsize   # gathered / made contiguous
    if chunk_rows <= 0:
        chunk_rows = min(chunk_budget_bytes // per_row, max_rows)
    chunk_rows = max(1, min(chunk_rows, num_kept))

    row_loss = torch.zeros(num_kept, dtype=torch.float32, device=device)
    kd_forward = dispatch(options.backend, "sparse" if sparse else "dense", device,
                          student.hidden)
    def chunk_buffer(dtype, wanted=True):
        return torch.empty((chunk_rows, num_classes), dtype=dtype, device=device) \
            if wanted and num_kept else None
    logits_buffer = chunk_buffer(student.logits_dtype)
    raw_buffer = chunk_buffer(student.dtype, student.float32_cap)
    grad_buffer = chunk_buffer(student.dtype, separate_grad)
    has_head = teacher_side is not None
    teacher_buffer = chunk_buffer(teacher_side.logits_dtype if has_head else None, has_head)
    teacher_raw = chunk_buffer(teacher_side.dtype if has_head else None,
                               has_head and teacher_side.float32_cap)
    for start in range(0, num_kept, chunk_rows):
        stop = min(start + chunk_rows, num_kept)
        count = stop - start
        rows = slice(start, stop) if kept_index is None else kept_index[start:stop]
        raw = raw_buffer[:count] if raw_buffer is not None else None
        logits, hidden_rows = student.logits(rows, logits_buffer[:count], raw)
        if sparse:   # (indices, values, lse, counts) of the chunk's rows
            teacher_chunk = tuple(None if part is None else _rows(part, rows).contiguous()
                                  for part in (teacher_0, values, lse, counts))
        else:
            if teacher_side is not None:
                teacher_logits, _ = teacher_side.logits(
                    rows, teacher_buffer[:count],
                    teacher_raw[:count] if teacher_raw is not None else None)
            else:
                teacher_logits = _rows(teacher_rows, rows)
                if teacher_logits.stride(-1) != 1:
                    teacher_logits = teacher_logits.contiguous()
            teacher_chunk = (teacher_logits,)
        grad = None
        if wants_grad:   # in place over the logits unless z itself is needed after the kernel
            grad = grad_buffer[:count] if separate_grad else logits
        row_loss[start:stop] = kd_forward(
            logits, *teacher_chunk, labels[start:stop] if labels is not None else None, options,
            grad=grad, grad_scale=grad_scale)
        if not wants_grad:
            continue
        if row_weights is not None:
            grad.mul_(_rows(row_weights.unsqueeze(1), rows).to(grad.dtype))
        if student.float32_cap:   # float32 d z / d r, then one rounding to the compute dtype
            grad = raw.copy_(_softcap_grad_(grad, raw, student_scale, student_softcap))
        elif student_softcap is not None:   # d z / d r = scale * (1 - (z / cap)^2)
            grad.mul_(logits.div_(student_softcap).square_().neg_().add_(1.0))
        if needs_hidden:
            rows_grad = torch.mm(grad, student.weight)
            if student_scale != 1.0:
                rows_grad.mul_(student_scale)
            if kept_index is None:
                grad_hidden[start:stop] = rows_grad
            else:
                grad_hidden.index_copy_(0, rows, rows_grad.to(grad_hidden.dtype))
        if needs_weight:
            if student.dtype == torch.float32:
                grad_weight.addmm_(grad.t(), hidden_rows, alpha=student_scale)
            else:   # half-precision product, float32 sum over chunks
                grad_weight.add_(torch.mm(grad.t(), hidden_rows), alpha=student_scale)
        if needs_bias:
            grad_bias.add_(grad.sum(0, dtype=torch.float32), alpha=student_scale)

    if reduction != "none":
        loss = row_loss.sum() * grad_scale
    elif kept_index is not None:
        loss = torch.zeros(num_rows, dtype=torch.float32, device=device).index_copy_(
            0, kept_index, row_loss)
    else:
        loss = row_loss
    def empty():   # one per unwanted gradient: custom op outputs may not alias each other
        return hidden.new_empty((0,))
    return (loss,
            grad_hidden if grad_hidden is not None else empty(),
            grad_weight.to(weight.dtype) if grad_weight is not None else empty(),
            grad_bias.to(bias.dtype) if grad_bias is not None else empty())
