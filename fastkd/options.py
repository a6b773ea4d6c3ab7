"""The options of one loss call, checked once and normalized once into :class:`LossOptions`, the
one object every loss family (dense, sparse, fused linear) and every backend reads.

Normalization rules, written only here:

* ``divergence="jsd"`` with ``beta`` 0 or 1 *is* forward / reverse KL (TRL GKD's and
  Liger-Kernel's convention); backends only ever see ``jsd`` with ``0 < beta < 1``.
* the label mode: a tensor of class ids, ``"teacher"`` (the teacher's argmax) or none.
* ``backend="auto"`` resolves to ``"triton"`` or ``"torch"`` for the tensors' device.

At a ``torch.library`` custom-op boundary (under ``torch.compile``) the object travels as one
string: :meth:`LossOptions.encode` / :meth:`LossOptions.decode`.
"""
import ast
import dataclasses

import torch

from fastkd.checks import TAILS, check_choice, check_flag, check_options
from fastkd.dispatch import resolve_backend

__all__ = ["LossOptions", "LABELS_NONE", "LABELS_TENSOR", "LABELS_TEACHER", "label_mode_of",
           "field_values"]

# label modes (the compiled CPU kernels use the same codes)
LABELS_NONE, LABELS_TENSOR, LABELS_TEACHER = 0, 1, 2


def label_mode_of(labels) -> int:
    """The label mode of a checked ``labels`` argument (a tensor, ``"teacher"`` or None)."""
    if isinstance(labels, torch.Tensor):
        return LABELS_TENSOR
    return LABELS_TEACHER if labels == "teacher" else LABELS_NONE


def field_values(options) -> tuple:
    """A dataclass's field values in order, nested dataclasses as tuples of theirs (the form
    ``encode`` writes; plain enough for ``torch.compile`` to trace)."""
    return tuple(field_values(value) if dataclasses.is_dataclass(value) else value
                 for value in (getattr(options, field.name)
                               for field in dataclasses.fields(options)))


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """One loss call's scalar options, as every backend reads them.

    ``divergence`` is already mapped (``jsd`` only with ``0 < beta < 1``), ``backend`` resolved
    (``"triton"`` or ``"torch"``), ``tail`` applies to sparse teachers, ``validate_labels`` to
    dense ones (sparse targets always check their labels)."""
    temperature: float = 1.0
    soft_weight: float = 0.5
    hard_weight: float = 0.5
    divergence: str = "forward_kl"
    beta: float = 0.5
    ignore_index: int = -100
    reduction: str = "batchmean"
    backend: str = "torch"
    label_mode: int = LABELS_NONE
    tail: str = "bucket"
    validate_labels: bool = True

    @classmethod
    def build(cls, *, temperature, soft_weight, hard_weight, divergence, beta, ignore_index,
              reduction, backend, tail="bucket", labels=None, device=None,
              validate_labels=True) -> "LossOptions":
        """Check the public arguments (a ``TypeError`` / ``ValueError`` names the bad one) and
        normalize them. ``device``: the tensors' device, to resolve ``backend="auto"`` (None
        keeps ``backend`` as given, e.g. for a module's construction-time check)."""
        check_options(temperature, soft_weight, hard_weight, divergence, beta, ignore_index,
                      reduction, backend)
        check_choice("tail", tail, TAILS)
        check_flag("validate_labels", validate_labels)
        beta = float(beta)
        if divergence == "jsd" and beta in (0.0, 1.0):
            divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
        return cls(float(temperature), float(soft_weight), float(hard_weight), divergence, beta,
                   int(ignore_index), reduction,
                   resolve_backend(backend, device) if device is not None else backend,
                   label_mode_of(labels), tail, bool(validate_labels))

    @property
    def inv_temperature(self) -> float:
        return 1.0 / self.temperature

    @property
    def teacher_labels(self) -> bool:
        """The hard label of a row is its teacher's argmax."""
        return self.label_mode == LABELS_TEACHER

    @property
    def has_labels(self) -> bool:
        """A labels tensor comes with the call."""
        return self.label_mode == LABELS_TENSOR

    def encode(self) -> str:
        """The options as one string (a Python literal), for a custom op's schema."""
        return repr(field_values(self))

    @classmethod
    def decode(cls, text: str) -> "LossOptions":
        return cls(*ast.literal_eval(text))
