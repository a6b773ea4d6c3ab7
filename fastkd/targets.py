"""Teacher target types: what a loss can take as its ``teacher_logits`` besides dense logits.

- :class:`TopKLogits`: K teacher logits per row (usually the K largest), their class ids and the
  log-sum-exp of the full tempered row (what top-k caches return). Teacher probability of a kept
  id at temperature ``T``: ``a_k = exp(values_k / T - lse)``; the mass of every other class
  together is ``1 - sum_k a_k``.
- :class:`SampledTargets`: class ids drawn from the teacher's distribution, stored once each
  with their counts or importance weights (what ``--sample`` caches return); the target is
  ``counts / counts.sum(-1)``, for the temperature the target records.
- :class:`TeacherHead`: the teacher's last hidden states and output layer, for the fused
  linear + KD loss (:func:`fastkd.linear_kd_loss`), which makes the teacher logits a chunk of
  rows at a time.

The sparse ones are ``NamedTuple`` s (fields and shapes in their docstrings), so
``torch.utils.data``'s default collate and ``torch.compile`` handle them; :func:`fastkd.kd_loss`
takes them as they are (``fastkd/sparse_loss.py``).
"""
import operator
from typing import NamedTuple, Optional, Union

import torch

from fastkd.checks import (FLOAT_DTYPES, check_integer_ids, check_linear_head,
                           check_logit_transform, check_sparse_values, check_target_classes,
                           check_temperature_value, check_tensor)

__all__ = ["TopKLogits", "SampledTargets", "SPARSE_TARGETS", "TeacherHead",
           "check_sparse_target"]


class TopKLogits(NamedTuple):
    """Sparse teacher rows.

    Fields:
        values: ``(..., K)`` raw teacher logits at the kept ids (any float dtype); a ``-inf``
            entry is padding (a row with fewer than K entries): its class joins the tail.
        indices: ``(..., K)`` integer class ids in ``[0, V)``, unique among a row's real
            entries (padding entries may repeat a real id or each other).
        lse: ``(...)`` ``logsumexp(z_t / temperature)`` of the *full* teacher row.
        temperature: the temperature ``lse`` belongs to (a float; a tensor of identical values,
            as ``DataLoader``'s default collate makes of it, is accepted too). The loss needs
            it equal to its own temperature, except with ``tail="renormalize"``, which does
            not use ``lse``.
        num_classes: the teacher's vocabulary size ``V`` (an int, or a tensor of identical
            values after the default collate); 0 (the default) when unknown. The loss refuses
            a student whose ``V`` differs.

    At temperature ``T`` the teacher probability of kept entry k is ``exp(values_k / T - lse)``.
    """
    values: torch.Tensor
    indices: torch.Tensor
    lse: torch.Tensor
    temperature: Union[float, torch.Tensor] = 1.0
    num_classes: Union[int, torch.Tensor] = 0

    @classmethod
    def from_logprobs(cls, logprobs: torch.Tensor, indices: torch.Tensor,
                      num_classes: int = 0, *, temperature: float = 1.0) -> "TopKLogits":
        """Targets from a served teacher's log-probabilities (e.g. vLLM's top logprobs) taken at
        ``temperature`` T: ``log softmax(z_t / T)`` at the ids, normalized over the full
        vocabulary. The target is for the loss at that T: ``values = T * logprobs`` (the raw
        logits up to a per-row shift, so ``values / T - lse`` is the log-prob) and ``lse = 0``.
        ``-inf`` entries (served rows shorter than K) are padding: their classes join the
        tail. ``num_classes`` is the teacher's vocabulary size (0: unknown)."""
        if not isinstance(logprobs, torch.Tensor):
            raise TypeError(f"logprobs must be a torch.Tensor, got {type(logprobs).__name__}")
        temperature = check_temperature_value("temperature", temperature)
        values = logprobs if temperature == 1.0 else logprobs * temperature
        lse = torch.zeros(logprobs.shape[:-1], dtype=torch.float32, device=logprobs.device)
        return cls(values, indices, lse, temperature, num_classes)

    def tensors(self):
        """``(values, indices, lse)``: the per-row fields (without ``temperature``)."""
        return self.values, self.indices, self.lse

    def map_tensors(self, fn) -> "TopKLogits":
        """A copy with ``fn`` applied to each tensor field (e.g. indexing, ``.to(device)``)."""
        return TopKLogits(*(fn(part) for part in self.tensors()), self.temperature,
                          self.num_classes)

    def log_probs(self, num_classes: int) -> torch.Tensor:
        """The explicit, slow densifier: a ``(..., V)`` float32 tensor of teacher
        log-probabilities at ``self.temperature``, ``V = num_classes``. A row's real entries
        (finite values) get ``values / T - lse`` at their ids; the rest mass
        ``1 - sum_k exp(values_k / T - lse)`` over those entries is spread evenly over every
        other class (a floor of 1e-12 when it rounds to 0 or below). ``-inf`` padding entries
        join the rest whatever their ids (they may repeat a real id or each other); a row
        without real entries is uniform, and a row whose real ids cover all V classes has no
        rest.

        The target is checked first as :func:`fastkd.kd_loss` checks it (``num_classes`` an int
        equal to a recorded ``self.num_classes``, ids in ``[0, V)``, real ids unique, no NaN, kept
        mass at most 1 beyond rounding): ``ValueError`` / ``TypeError`` otherwise.

        This builds a full ``(N, V)`` tensor and changes the target (the rest mass is spread
        evenly); :func:`fastkd.kd_loss` takes the ``TopKLogits`` itself without either.
        """
        num_classes, temperature = _check_densify(self, "TopKLogits.log_probs", num_classes)
        real = self.values != float("-inf")
        padded = not bool(real.all())
        kept = self.values.float() / temperature - self.lse.float().unsqueeze(-1)
        if padded:   # padding entries become -inf: exp gives them no mass
            kept = torch.where(real, kept, float("-inf"))
        tail = (1 - kept.exp().sum(-1, keepdim=True)).clamp_min(1e-12)
        ids = self.indices.long()
        if not padded:
            # every row has the same V - K other classes, filled first, then the kept entries
            # scattered over them (one (N, V) write). Dividing by a Python number gives the
            # same bits on every device (CUDA divides by a scalar through its reciprocal, by a
            # tensor exactly)
            others = max(num_classes - kept.shape[-1], 1)
            dense = kept.new_empty(kept.shape[:-1] + (num_classes,))
            dense.copy_((tail / others).log().expand_as(dense))
            return dense.scatter_(-1, ids, kept)
        # the amax scatter keeps a real entry's value at a class that padding entries repeat
        kept_dense = kept.new_full(kept.shape[:-1] + (num_classes,), float("-inf"))
        kept_dense.scatter_reduce_(-1, ids, kept, "amax")
        in_kept = torch.zeros(kept_dense.shape, dtype=torch.int32, device=kept.device)
        in_kept = in_kept.scatter_add_(-1, ids, real.to(torch.int32)) > 0
        others = (num_classes - real.sum(-1, keepdim=True)).clamp_min(1)   # real ids unique
        return torch.where(in_kept, kept_dense, (tail / others).log())


class SampledTargets(NamedTuple):
    """Teacher rows given as draws from the teacher's distribution: the distinct drawn ids and
    their weights (what ``--sample`` caches return).

    Fields:
        indices: ``(..., K)`` integer class ids in ``[0, V)``, unique within a row (padding
            entries excepted).
        counts: ``(..., K)`` non-negative weights, at least one positive per row: integer
            draw counts, or float importance weights ``w_j = (c_j / N) p(j) / q(j)`` of ids
            drawn from a proposal ``q`` (padding entries have weight 0 and any valid id; rows
            of different lengths are padded that way).
        num_classes: the teacher's vocabulary size ``V`` (as for :class:`TopKLogits`; 0 when
            unknown).
        temperature: the temperature ``T`` the target is for, ``p = softmax(z_t / T)`` (a float,
            or a tensor of identical values after ``DataLoader``'s default collate). The loss
            refuses a target made for another temperature than its own.

    The target distribution is ``P = counts / counts.sum(-1)`` over ``indices`` and 0 elsewhere:
    an estimate of the teacher's at ``temperature`` (unbiased for draw counts; for importance
    weights ``E[counts] = p`` before this per-row normalization). There is no tail: ``P`` sums
    to 1 over the drawn ids.
    """
    indices: torch.Tensor
    counts: torch.Tensor
    num_classes: Union[int, torch.Tensor] = 0
    temperature: Union[float, torch.Tensor] = 1.0

    def tensors(self):
        """``(indices, counts)``: the per-row fields."""
        return self.indices, self.counts

    def map_tensors(self, fn) -> "SampledTargets":
        """A copy with ``fn`` applied to each tensor field."""
        return SampledTargets(*(fn(part) for part in self.tensors()), self.num_classes,
                              self.temperature)

    def probs(self, num_classes: int) -> torch.Tensor:
        """The explicit, slow densifier: ``(..., V)`` float32 target probabilities,
        ``counts / counts.sum(-1)`` at the ids and 0 elsewhere (count-0 padding entries add
        nothing, whatever their ids).

        The target is checked first as :func:`fastkd.kd_loss` checks it (``num_classes`` an int
        equal to a recorded ``self.num_classes``, ids in ``[0, V)``, counts finite and >= 0 with
        a positive sum in every row, ids of positive counts unique): ``ValueError`` /
        ``TypeError`` otherwise.
        """
        num_classes, _ = _check_densify(self, "SampledTargets.probs", num_classes)
        counts = self.counts.float()
        out = counts.new_zeros(counts.shape[:-1] + (num_classes,))
        return out.scatter_add_(-1, self.indices.long(), counts / counts.sum(-1, keepdim=True))


SPARSE_TARGETS = (TopKLogits, SampledTargets)


def _check_densify(target, method: str, num_classes):
    """The checks of ``target.{log_probs,probs}(num_classes)``: ``num_classes`` an int >= 1 that
    a recorded ``target.num_classes`` (not 0) equals, the fields' types, shapes and device, and
    the loss's data checks (:func:`fastkd.checks.check_sparse_values`; two host syncs). Errors
    name ``method``. Returns ``(num_classes, temperature)``."""
    kind = type(target).__name__
    try:
        if isinstance(num_classes, bool):
            raise TypeError
        num_classes = operator.index(num_classes)
    except TypeError:
        raise TypeError(f"{method}: num_classes must be an int (the vocabulary size V), got "
                        f"{type(num_classes).__name__} {num_classes!r}") from None
    if num_classes < 1:
        raise ValueError(f"{method}: num_classes must be >= 1, got {num_classes}")
    first_name = "values" if isinstance(target, TopKLogits) else "indices"
    first = getattr(target, first_name)
    check_tensor(f"{kind}.{first_name}", first)
    _check_target_fields(kind, target, tuple(first.shape[:-1]), first.device,
                         f"{kind}.{first_name}", any_float_values=True)
    if isinstance(target, TopKLogits):
        real = target.values != float("-inf")
        entries = "top-k={} (the real, not -inf, entries of a row, each a different class)"
    else:
        real = target.counts > 0
        entries = "the {} ids with positive counts in a row (each a different class)"
    # more real entries in a row than classes: named before the id checks, which would report
    # an id out of range or an id twice
    most = int(real.sum(-1).max()) if real.numel() else 0
    if most > num_classes:
        raise ValueError(f"{method}: num_classes={num_classes} is smaller than "
                         + entries.format(most))
    try:
        check_target_classes(f"{kind}.num_classes", target.num_classes, num_classes)
    except ValueError as error:
        raise ValueError(f"{method}(num_classes={num_classes}): {error}") from None
    temperature = check_temperature_value(f"{kind}.temperature", target.temperature)
    width = first.shape[-1]
    try:
        if isinstance(target, TopKLogits):
            check_sparse_values(target.indices.reshape(-1, width), num_classes,
                                values=target.values.reshape(-1, width),
                                lse=target.lse.reshape(-1), temperature=temperature)
        else:
            check_sparse_values(target.indices.reshape(-1, width), num_classes,
                                counts=target.counts.reshape(-1, width))
    except ValueError as error:
        raise ValueError(f"{method}(num_classes={num_classes}): {error}") from None
    return num_classes, temperature


class TeacherHead:
    """A teacher given as its last hidden states and output layer, for
    :func:`fastkd.linear_kd_loss`: the teacher logits ``softcap(logit_scale * (hidden @
    weight.T + bias))`` are made a chunk of rows at a time and dropped, never held in full.

    Args:
        hidden: ``(..., H_t)`` teacher hidden states, leading dims as the student's.
        weight: ``(V_t, H_t)`` the teacher's output layer (``lm_head.weight``).
        bias: ``(V_t,)`` or None.
        logit_scale: logits are multiplied by it (Cohere's ``logit_scale``), before the softcap.
        softcap: None, or ``cap`` for ``cap * tanh(z / cap)`` (Gemma-2's
            ``final_logit_softcapping``).

    The teacher is a constant: its tensors are detached, no gradient flows into them.
    """
    __slots__ = ("hidden", "weight", "bias", "logit_scale", "softcap")

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor,
                 bias: Optional[torch.Tensor] = None, *, logit_scale: float = 1.0,
                 softcap: Optional[float] = None):
        check_linear_head("TeacherHead.", hidden, weight, bias)
        self.logit_scale, self.softcap = check_logit_transform("TeacherHead.", logit_scale,
                                                               softcap)
        self.hidden = hidden.detach()
        self.weight = weight.detach()
        self.bias = bias.detach() if bias is not None else None

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def __repr__(self) -> str:
        bias = "None" if self.bias is None else f"({self.bias.shape[0]},)"
        return (f"TeacherHead(hidden={tuple(self.hidden.shape)}, weight="
                f"{tuple(self.weight.shape)}, bias={bias}, logit_scale={self.logit_scale}, "
                f"softcap={self.softcap})")


def check_sparse_target(name: str, target, student_logits: torch.Tensor,
                        num_classes: Optional[int] = None):
    """Metadata checks of a ``TopKLogits`` / ``SampledTargets`` against ``student_logits``
    ``(..., V)``: field types, shapes ``(..., K)`` / lse ``(...)`` with the student's leading
    dims, K >= 1, same device, and the target's recorded ``num_classes`` (when not 0) equal to
    the student's V (``num_classes`` when given, else ``student_logits.shape[-1]``). Returns the
    target's temperature as a float (what it is for). No host sync (unless a field is
    a GPU tensor of collated numbers): the values are checked by :func:`check_sparse_values`."""
    _check_target_fields(name, target, tuple(student_logits.shape[:-1]), student_logits.device,
                         "student_logits")
    check_target_classes(f"{name}.num_classes", target.num_classes,
                         student_logits.shape[-1] if num_classes is None else num_classes)
    return check_temperature_value(f"{name}.temperature", target.temperature)


def _check_target_fields(name: str, target, leading: tuple, device, of: str, *,
                         any_float_values: bool = False) -> None:
    """The field checks of a ``TopKLogits`` / ``SampledTargets`` named ``name``: field types,
    shapes ``(..., K)`` with the leading dims ``leading`` (those of ``of``) and K >= 1, lse of
    shape ``leading``, every field on ``device``. Top-k values are float32, float16 or bfloat16
    (any floating dtype with ``any_float_values``)."""
    if isinstance(target, TopKLogits):
        check_tensor(f"{name}.values", target.values)
        if not (target.values.dtype.is_floating_point if any_float_values
                else target.values.dtype in FLOAT_DTYPES):
            raise TypeError(f"{name}.values must be "
                            + ("a floating tensor" if any_float_values
                               else "float32, float16 or bfloat16")
                            + f", got {target.values.dtype}")
        check_integer_ids(f"{name}.indices", target.indices)
        check_tensor(f"{name}.lse", target.lse)
        if not target.lse.dtype.is_floating_point:
            raise TypeError(f"{name}.lse must be a floating tensor, got {target.lse.dtype}")
        fields = {"values": target.values, "indices": target.indices}
        per_row = {"lse": target.lse}   # one value per row: shape (...)
    elif isinstance(target, SampledTargets):
        check_integer_ids(f"{name}.indices", target.indices)
        check_tensor(f"{name}.counts", target.counts)
        if target.counts.dtype.is_complex or target.counts.dtype == torch.bool:
            raise TypeError(f"{name}.counts must be an integer or float tensor, got "
                            f"{target.counts.dtype}")
        fields = {"indices": target.indices, "counts": target.counts}
        per_row = {}
    else:
        raise TypeError(f"{name} must be a torch.Tensor, TopKLogits or SampledTargets, got "
                        f"{type(target).__name__}")
    for field, tensor in fields.items():
        if tensor.dim() < 1 or tuple(tensor.shape[:-1]) != leading or tensor.shape[-1] < 1:
            raise ValueError(
                f"{name}.{field} must have shape (..., K) with the leading dims {leading} of "
                f"{of} and K >= 1, got {tuple(tensor.shape)}")
    shapes = {tuple(tensor.shape) for tensor in fields.values()}
    if len(shapes) != 1:
        raise ValueError(f"{name}: " + " and ".join(
            f"{field} {tuple(tensor.shape)}" for field, tensor in fields.items())
            + " must have the same shape (..., K)")
    for field, tensor in per_row.items():
        if tuple(tensor.shape) != leading:
            raise ValueError(f"{name}.{field} must have shape {leading} (the leading dims of "
                             f"{of}), got {tuple(tensor.shape)}")
    for field, tensor in {**fields, **per_row}.items():
        if tensor.device != device:
            owner = of + ("'" if of.endswith("s") else "'s")
            raise ValueError(f"{name}.{field} must be on {owner} device {device}, got "
                             f"{tensor.device}")
