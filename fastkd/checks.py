"""Argument checks shared by every public entry point (``kd_loss``, ``KDLoss``, the sparse
targets, the fused-linear path, the cache and the CLI): one wording, one place.

Each check raises ``TypeError`` (wrong kind of object) or ``ValueError`` (right kind, bad value)
with a message that names the argument and says what was expected.
"""
import math
import operator
from typing import Optional

import torch

__all__ = ["DIVERGENCES", "REDUCTIONS", "BACKENDS", "FLOAT_DTYPES", "MAX_TEMPERATURE",
           "MIN_TEMPERATURE", "check_temperature", "check_number", "check_choice", "check_flag",
           "check_logits", "check_options", "check_labels",
           "check_label_values", "label_status", "raise_bad_labels", "check_inplace_target",
           "check_tensor", "check_integer_ids",
           "TAILS", "check_temperature_value", "check_sparse_options",
           "check_target_classes",
           "check_sparse_values", "MASS_SLACK", "kept_mass_lower_bound", "TEACHER_EXTRA_COLUMNS",
           "check_linear_head", "check_logit_transform", "check_chunking"]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "mse")
REDUCTIONS = ("batchmean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Largest supported temperature. Every backend accumulates in float32, and T^2 * D is a
# difference of O(log V + |z| / T) terms scaled by T^2: its absolute rounding error grows like
# T^2 * 1e-7. Measured against float64 (V = 1000, logits ~ N(0, 9)): relative error <= 1.2e-5 at
# T = 100, 4e-4 at T = 300, 0.5-8e-3 at T = 1e3 and 30-50% at T = 1e4. Above 100 the result
# would be quietly inaccurate, so it is refused instead.
MAX_TEMPERATURE = 100.0
MIN_TEMPERATURE = 1e-3


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


def check_temperature(temperature) -> float:
    """A loss temperature: a real number in ``[MIN_TEMPERATURE, MAX_TEMPERATURE]``; as a float."""
    temperature = check_number("temperature", temperature, positive=True)
    if temperature < MIN_TEMPERATURE:
        raise ValueError(
            f"temperature must be >= {MIN_TEMPERATURE:g}, got {temperature}: below that z / T "
            "overflows float32 for ordinary logits (T -> 0 is the argmax; use labels='teacher' "
            "for hard teacher labels)")
    if temperature > MAX_TEMPERATURE:
        raise ValueError(
            f"temperature must be <= {MAX_TEMPERATURE:g}, got {temperature}: the float32 "
            "accumulation loses accuracy above that (T^2 * divergence is a small difference of "
            "large terms); T in [1, 20] is the usual distillation range")
    return temperature


def check_options(temperature, soft_weight, hard_weight, divergence, beta, ignore_index,
                  reduction, backend) -> None:
    """The scalar options shared by kd_loss, KDLoss and the fused-linear loss."""
    check_temperature(temperature)
    check_number("soft_weight", soft_weight, nonnegative=True)
    check_number("hard_weight", hard_weight, nonnegative=True)
    check_choice("divergence", divergence, DIVERGENCES)
    check_number("beta", beta, low=0.0, high=1.0)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("backend", backend, BACKENDS)
    try:
        index = operator.index(ignore_index) if not isinstance(ignore_index, bool) else None
    except TypeError:
        index = None
    if index is None:
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -2 ** 63 <= index < 2 ** 63:   # compared with int64 labels
        raise ValueError(f"ignore_index must fit int64, got {ignore_index}")


def check_flag(name: str, value) -> None:
    """A True/False option: anything else (a string, None, 2) is refused, not read as truthy."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


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
    if labels.dtype == torch.uint64:   # compared in int64: values >= 2**63 would wrap
        raise TypeError("labels must be an integer tensor that int64 holds, got torch.uint64; "
                        "pass labels.long()")
    if labels.shape != tuple(leading_shape):
        raise ValueError(
            f"labels must have shape {tuple(leading_shape)} (the leading dims of "
            f"student_logits), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels must be on the logits' device {device}, got {labels.device}")


def check_label_values(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Labels must lie in [0, V) or equal ignore_index. Returns them as int64 (the comparison is
    made in int64, so small integer dtypes cannot wrap ``ignore_index`` or V). One host sync."""
    labels = labels.to(torch.int64)
    kept, bad = label_status(labels, num_classes, ignore_index)
    if bool(bad):
        raise_bad_labels(labels, num_classes, ignore_index)
    return labels


# ----------------------------------------------------------------------------- sparse targets
TAILS = ("bucket", "renormalize", "ignore")
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint16, torch.uint8, torch.int8)


def _one_value(name: str, value: torch.Tensor, what: str, expected: str, error, allowed):
    """The one value of a tensor whose entries must all be the same (what ``DataLoader``'s
    default collate makes of a number field): ``allowed(dtype)`` or ``error`` naming it."""
    if value.numel() == 0 or not allowed(value.dtype):
        raise error(f"{name} must be {expected}, got a {value.dtype} tensor of shape "
                    f"{tuple(value.shape)}")
    first = value.flatten()[0]
    if bool((value != first).any()):
        raise ValueError(f"{name} must be one {what} for the whole batch, got different values "
                         f"{value.unique().tolist()[:4]}")
    return first.item()


def check_temperature_value(name: str, value) -> float:
    """A target's temperature: a positive finite number, or a tensor whose entries are all the
    same such number."""
    if isinstance(value, torch.Tensor):
        value = float(_one_value(name, value, "temperature", "a positive number", ValueError,
                                 lambda dtype: not dtype.is_complex and dtype != torch.bool))
    return check_number(name, value, positive=True)


def check_tensor(name: str, tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")


def check_integer_ids(name: str, tensor) -> None:
    check_tensor(name, tensor)
    if tensor.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor of class ids, got {tensor.dtype}")


def check_target_classes(name: str, value, num_classes: int) -> None:
    """A sparse target's recorded vocabulary size ``value`` (0: not recorded; a tensor of
    identical values, as ``DataLoader``'s default collate makes of it, is accepted) must equal
    the student's ``num_classes``."""
    original = value
    if isinstance(value, torch.Tensor):
        value = int(_one_value(name, value, "vocabulary size", "an int", TypeError,
                               lambda dtype: not (dtype.is_floating_point or dtype.is_complex
                                                  or dtype == torch.bool)))
    try:
        value = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        value = None
    if value is None or value < 0:
        hint = (" (a float there is often a temperature given by position: pass "
                "temperature=... by name)") if isinstance(original, float) else ""
        raise TypeError(f"{name} must be an int >= 0 (0: not recorded), got {original!r}{hint}")
    if value and value != num_classes:
        raise ValueError(
            f"vocabulary mismatch: {name}={value} (the teacher's vocabulary the targets were "
            f"made over) but the student has V = {num_classes} classes; teacher and student must "
            f"share a tokenizer and output width")


def check_sparse_options(divergence: str, tail: str, sampled: bool, temperature: float,
                         target_temperature) -> None:
    """The option combinations a sparse teacher supports (``divergence`` with beta 0 / 1 already
    mapped to forward / reverse KL): no ``mse``; ``tail="ignore"`` only with forward KL;
    reverse KL against sampled targets only with ``tail="renormalize"`` (they give no mass
    outside the drawn ids, so KL(student || target) is infinite); the target's temperature
    equal to the loss temperature: always for sampled targets (their ids and weights are a
    target for one temperature), for top-k unless ``tail="renormalize"`` (the stored lse is
    exact only at the temperature it was computed at; renormalize does not use it)."""
    check_choice("tail", tail, TAILS)
    if divergence == "mse":
        raise ValueError("divergence='mse' needs dense teacher logits (it compares raw logits "
                         "over all V classes); a sparse teacher supports forward_kl, "
                         "reverse_kl and jsd")
    if tail == "ignore" and divergence != "forward_kl":
        raise ValueError(f"tail='ignore' (the K teacher terms only) is defined for forward_kl "
                         f"only, got divergence={divergence!r}; use tail='bucket' or "
                         f"'renormalize'")
    if sampled and divergence == "reverse_kl" and tail != "renormalize":
        raise ValueError("divergence='reverse_kl' against SampledTargets is infinite (the "
                         "target is 0 outside the drawn ids); use forward_kl, jsd or "
                         "tail='renormalize'")
    if target_temperature is None or target_temperature == temperature:
        return
    if sampled:
        raise ValueError(
            f"teacher_logits.temperature={target_temperature} (the temperature the sampled "
            f"target is for) differs from the loss temperature={temperature}; sample the "
            f"cache for that temperature (fastkd cache --sample N --temperature "
            f"{temperature}) or train at temperature={target_temperature}")
    if tail != "renormalize":
        raise ValueError(
            f"teacher_logits.temperature={target_temperature} (the temperature its lse was "
            f"computed at) differs from the loss temperature={temperature}; cache the lse at "
            f"that temperature (fastkd cache --top-k K --temperature {temperature}; several "
            f"temperatures fit in one cache) or use a sampled cache for it (fastkd cache "
            f"--sample N --temperature {temperature}), or train at "
            f"temperature={target_temperature}")


# A top-k row's kept probabilities exp(v / T - lse) may sum to at most 1 + MASS_SLACK once every
# value is moved one rounding step of its dtype towards -inf (|v| * unit roundoff: 2^-24 fp32,
# 2^-11 fp16, 2^-8 bf16): the values are the teacher's logits rounded to their storage dtype,
# which can raise a probability by exp(|v| u / T) (6% at v = 30 in bf16), while lse is the
# float32 log-sum-exp of the unrounded row. MASS_SLACK covers the float32 lse and sum
# (relative error ~K * 2^-24 + |lse| * 2^-23) and is the import's bound on served log-probs.
MASS_SLACK = 1e-3


def kept_mass_lower_bound(values: torch.Tensor, lse: torch.Tensor,
                          temperature: float) -> torch.Tensor:
    """``(N,)`` float32: ``sum_k exp(v_k / T - lse)`` with every value moved one rounding step of
    its dtype towards -inf (the least mass the unrounded values can have; +-inf values stay)."""
    unit = torch.finfo(values.dtype).eps / 2
    values = values.float()
    lowered = torch.where(values.isinf(), values, values - values.abs() * unit)
    return (lowered / temperature - lse.float().unsqueeze(-1)).exp().sum(-1)


def check_sparse_values(indices: torch.Tensor, num_classes: int, *, values=None, lse=None,
                        counts=None, labels=None, ignore_index: int = -100,
                        check_duplicates: bool = True, temperature: Optional[float] = None):
    """Data checks of sparse targets ``(N, K)`` (and of ``labels`` ``(N,)``) with one host sync
    for all of them: ids in ``[0, V)``, no NaN in values / lse, counts finite and >= 0 with a
    positive sum per row, labels in ``[0, V)`` or ``ignore_index`` and (when
    ``check_duplicates``) no id twice in a row (one sort of the ``(N, K)`` ids). With
    ``temperature`` (top-k targets whose lse the loss uses), the kept probabilities
    ``exp(values / T - lse)`` of a row sum to at most 1 beyond the values' rounding
    (:func:`kept_mass_lower_bound` <= 1 + ``MASS_SLACK``). Values must not be +inf either.
    Rows whose label is ``ignore_index`` skip every check but the id range; entries with count
    0 or value -inf are padding and may repeat an id.

    Returns ``(labels as int64 or None, number of kept rows)``.
    """
    num_rows = indices.shape[0]
    keep = None
    flags = {}
    ids = indices.to(torch.int64)
    if labels is not None:
        labels = labels.to(torch.int64)
        keep = labels != ignore_index
        flags["labels"] = (((labels < 0) | (labels >= num_classes)) & keep).any()
        flags["kept"] = keep.sum()
    if indices.numel():
        flags["ids"] = ((ids < 0) | (ids >= num_classes)).any()
        padding_ids = -1 - torch.arange(ids.shape[-1], device=ids.device)
        unique_ids = ids
        if keep is not None:
            unique_ids = torch.where(keep.unsqueeze(-1), ids, padding_ids)
        if values is not None:
            kept_values = values if keep is None else torch.where(keep.unsqueeze(-1), values, 0)
            flags["values"] = (torch.isnan(kept_values) | torch.isposinf(kept_values)).any()
            # a -inf value is padding (joins the tail) and may repeat an id
            unique_ids = torch.where(values == float("-inf"), padding_ids, unique_ids)
        if lse is not None:
            flags["lse"] = torch.isnan(lse if keep is None else torch.where(keep, lse, 0)).any()
        if values is not None and lse is not None and temperature is not None:
            over = kept_mass_lower_bound(values, lse, temperature) > 1 + MASS_SLACK
            flags["mass"] = (over if keep is None else over & keep).any()
        if counts is not None:
            kept_counts = counts if keep is None else torch.where(keep.unsqueeze(-1), counts, 1)
            flags["counts"] = ((kept_counts < 0).any() | (kept_counts.sum(-1) <= 0).any()
                               | (~torch.isfinite(kept_counts.double())).any())
            unique_ids = torch.where(kept_counts > 0, unique_ids, padding_ids)
        if check_duplicates and ids.shape[-1] > 1:
            ordered = unique_ids.sort(-1).values
            flags["duplicates"] = (ordered[..., 1:] == ordered[..., :-1]).any()
    if not flags:
        return labels, num_rows
    results = dict(zip(flags, torch.stack([flag.to(torch.int64) for flag in flags.values()])
                       .tolist()))   # the one host sync
    if results.get("labels"):
        raise_bad_labels(labels, num_classes, ignore_index)
    if results.get("ids"):
        bad = ids[(ids < 0) | (ids >= num_classes)].flatten()[0].item()
        raise ValueError(f"teacher indices must be class ids in [0, {num_classes}); found {bad}")
    if results.get("values"):
        raise ValueError("teacher values contain NaN or +inf (a logit or log-probability is "
                         "finite, or -inf for a padding entry)")
    if results.get("lse"):
        raise ValueError("teacher lse contains NaN")
    if results.get("mass"):
        mass = kept_mass_lower_bound(values, lse, temperature)
        if keep is not None:
            mass = torch.where(keep, mass, 0)
        row = int(mass.argmax())
        raise ValueError(
            f"teacher probabilities exp(values / T - lse) of row {row} sum to "
            f"{float(mass[row]):.6g} at T={temperature:g}, more than 1 beyond the rounding of "
            f"its {str(values.dtype).replace('torch.', '')} values: lse must be the "
            f"log-sum-exp of the full teacher row at that temperature (for log-probabilities "
            f"use TopKLogits.from_logprobs; tail='renormalize' does not use lse)")
    if results.get("counts"):
        raise ValueError("teacher counts must be finite and >= 0 with a positive sum in every "
                         "row")
    if results.get("duplicates"):
        raise ValueError("teacher indices must be unique within each row (found an id twice)")
    return labels, results.get("kept", num_rows)


def label_status(labels: torch.Tensor, num_classes: int, ignore_index: int):
    """``(kept, bad)`` for int64 ``labels``: the number of rows whose label is not ignore_index,
    and whether any kept label lies outside [0, V). Both are 0-d tensors on the labels' device:
    computing them does not synchronize with a GPU; reading them does (read both at once)."""
    keep = labels != ignore_index
    outside = (labels < 0) | (labels >= num_classes)
    return keep.sum(), (outside & keep).any()


def raise_bad_labels(labels: torch.Tensor, num_classes: int, ignore_index: int):
    """The ValueError for labels that :func:`label_status` found bad (names the first one)."""
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    first = labels[bad].flatten()[0].item()
    raise ValueError(
        f"labels must be in [0, {num_classes}) or equal ignore_index={ignore_index}; "
        f"found {first}")


def _element_span(tensor: torch.Tensor):
    """[first, last] element offsets (in the storage) that ``tensor`` can address."""
    low = high = tensor.storage_offset()
    for size, stride in zip(tensor.shape, tensor.stride()):
        if size > 1:
            if stride >= 0:
                high += (size - 1) * stride
            else:
                low += (size - 1) * stride
    return low, high


def _has_internal_overlap(tensor: torch.Tensor) -> bool:
    """Whether two index tuples of ``tensor`` address the same element (e.g. ``expand``). Sorts
    the dims by stride and requires each to step over everything the smaller ones span."""
    span = 1
    dims = sorted(((abs(stride), size) for size, stride in zip(tensor.shape, tensor.stride())
                   if size > 1))
    for stride, size in dims:
        if stride < span:
            return True
        span = stride * (size - 1) + span
    return False


def check_inplace_target(student: torch.Tensor, *others) -> None:
    """``grad_inplace=True`` writes the gradient over ``student``'s elements while the kernel still
    reads the other inputs: refuse a student whose elements alias each other (expanded,
    stride 0) and inputs that share memory with it, instead of returning a wrong loss."""
    if student.numel() == 0:
        return
    if _has_internal_overlap(student):
        raise ValueError(
            "grad_inplace=True needs student_logits whose elements do not overlap (got shape "
            f"{tuple(student.shape)} with strides {student.stride()}, e.g. from expand()); "
            "pass student_logits.contiguous() or use grad_inplace=False")
    storage = student.untyped_storage().data_ptr()
    low, high = _element_span(student)
    size = student.element_size()
    for name, other in others:
        if other is None or other.numel() == 0:
            continue
        if other.untyped_storage().data_ptr() != storage:
            continue
        other_low, other_high = _element_span(other)
        other_size = other.element_size()
        if (other_low * other_size <= high * size + size - 1
                and low * size <= other_high * other_size + other_size - 1):
            raise ValueError(
                f"grad_inplace=True would overwrite {name} while it is being read: it shares "
                f"memory with student_logits; pass a copy ({name}.clone()) or use "
                "grad_inplace=False")


# ----------------------------------------------------------------------------- fused linear
TEACHER_EXTRA_COLUMNS = ("error", "drop")


def check_linear_head(prefix: str, hidden, weight, bias) -> None:
    """An output layer and its inputs: ``{prefix}hidden (..., H)`` and ``{prefix}weight (V, H)``
    float tensors, ``{prefix}bias`` None or ``(V,)``, all on one device."""
    check_logits(f"{prefix}hidden", hidden)
    check_logits(f"{prefix}weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"{prefix}weight must have shape (V, H) (an nn.Linear weight), got "
                         f"{tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{prefix}hidden (..., H) and {prefix}weight (V, H) must share H; got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if weight.device != hidden.device:
        raise ValueError(f"{prefix}weight must be on {prefix}hidden's device {hidden.device}, "
                         f"got {weight.device}")
    if bias is not None:
        check_logits(f"{prefix}bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{prefix}bias must have shape ({weight.shape[0]},) (V of "
                             f"{prefix}weight), got {tuple(bias.shape)}")
        if bias.device != hidden.device:
            raise ValueError(f"{prefix}bias must be on {prefix}hidden's device {hidden.device}, "
                             f"got {bias.device}")


def check_logit_transform(prefix: str, logit_scale, softcap) -> tuple:
    """``{prefix}logit_scale`` a finite number > 0 and ``{prefix}softcap`` None or a finite
    number > 0. Returns them as ``(float, float or None)``."""
    scale = check_number(f"{prefix}logit_scale", logit_scale, positive=True)
    if softcap is None:
        return scale, None
    return scale, check_number(f"{prefix}softcap", softcap, positive=True)


def check_chunking(chunk_rows, chunk_budget_bytes) -> None:
    """``chunk_rows`` and ``chunk_budget_bytes`` each None or an int >= 1."""
    for name, value in (("chunk_rows", chunk_rows), ("chunk_budget_bytes", chunk_budget_bytes)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
