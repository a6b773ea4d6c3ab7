"""Argument checks shared by every public entry point (``kd_loss``, ``KDLoss``, the sparse
targets, the fused-linear path, the cache and the CLI): one wording, one place.

Each check raises ``TypeError`` (wrong kind of object) or ``ValueError`` (right kind, bad value)
with a message that names the argument and says what was expected.
"""
import math
from typing import Optional

import torch

__all__ = ["DIVERGENCES", "REDUCTIONS", "BACKENDS", "FLOAT_DTYPES", "check_number",
           "check_choice", "check_logits", "check_options", "check_labels", "check_label_values"]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "mse")
REDUCTIONS = ("batchmean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_number(name: str, value, *, positive: bool = False, nonnegative: bool = False,
                 low: Optional[float] = None, high: Optional[float] = None) -> float:
    """A finite real number (bools refused), optionally > 0, >= 0 or in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number (int or float), got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if low is not None and high is not None and not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_logits(name: str, tensor) -> None:
    """A float32/float16/bfloat16 tensor of shape (..., V), V >= 1."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {tensor.dtype}")
    if tensor.dim() < 1 or tensor.shape[-1] < 1:
        raise ValueError(f"{name} must have shape (..., V) with V >= 1, got {tuple(tensor.shape)}")


def check_options(temperature, soft_weight, hard_weight, divergence, beta, ignore_index,
                  reduction, backend) -> None:
    """The scalar options shared by kd_loss, KDLoss and the fused-linear loss."""
    check_number("temperature", temperature, positive=True)
    check_number("soft_weight", soft_weight, nonnegative=True)
    check_number("hard_weight", hard_weight, nonnegative=True)
    check_choice("divergence", divergence, DIVERGENCES)
    check_number("beta", beta, low=0.0, high=1.0)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("backend", backend, BACKENDS)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def check_labels(labels, leading_shape, device) -> None:
    """``labels``: None, ``"teacher"`` or an integer tensor of shape ``leading_shape`` on
    ``device`` (values are checked separately, by :func:`check_label_values`)."""
    if isinstance(labels, str):
        if labels != "teacher":
            raise ValueError(f"labels must be a tensor, None or 'teacher'; got {labels!r}")
        return
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a tensor, None or 'teacher'; got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != tuple(leading_shape):
        raise ValueError(
            f"labels must have shape {tuple(leading_shape)} (the leading dims of "
            f"student_logits), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels must be on the logits' device {device}, got {labels.device}")


def check_label_values(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Labels must lie in [0, V) or equal ignore_index. Returns them as int64 (the comparison is
    made in int64, so small integer dtypes cannot wrap ``ignore_index`` or V). One reduction
    and one host sync."""
    labels = labels.to(torch.int64)
    if labels.numel() == 0:
        return labels
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    if bool(bad.any()):
        first = labels[bad].flatten()[0].item()
        raise ValueError(
            f"labels must be in [0, {num_classes}) or equal ignore_index={ignore_index}; "
            f"found {first}")
    return labels
