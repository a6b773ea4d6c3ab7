"""Batching cached items: :func:`collate_padded` pads variable-length items on the right, and
sparse targets of different widths (ragged sampled rows) to the widest."""
import math
from typing import List, Optional, Union

import torch

from fastkd.targets import SPARSE_TARGETS, SampledTargets, TopKLogits


def pad_stack(tensors: List[torch.Tensor], value, length: Optional[int] = None) -> torch.Tensor:
    """Tensors ``(L_i, ...)`` -> one ``(B, L, ...)`` tensor, right-padded with ``value``;
    ``L = length`` (at least every ``L_i``), by default the longest."""
    length = max(tensor.shape[0] for tensor in tensors) if length is None else length
    out = tensors[0].new_full((len(tensors), length) + tuple(tensors[0].shape[1:]), value)
    for row, tensor in enumerate(tensors):
        out[row, :tensor.shape[0]] = tensor
    return out


def sparse_filler(target, length: int):
    """``length`` rows that make a valid, harmless target of ``target``'s kind and width: ids
    ``0..k-1`` (distinct), and a uniform distribution over them (top-k values 0 with ``lse =
    log k`` at any temperature, so the tail mass is 0; sampled counts 1). Padded positions carry
    ``ignore_index`` labels, so they add nothing to the loss; the filler only keeps them
    finite."""
    k = target.indices.shape[-1]
    indices = torch.arange(k, dtype=target.indices.dtype).expand(length, k)
    if isinstance(target, TopKLogits):
        return TopKLogits(target.values.new_zeros(length, k), indices,
                          target.lse.new_full((length,), math.log(k)), target.temperature,
                          target.num_classes)
    return SampledTargets(indices, target.counts.new_ones(length, k), target.num_classes,
                          target.temperature)


def target_like(template, tensors) -> Union[TopKLogits, SampledTargets]:
    """A target of ``template``'s type (temperature and vocabulary size) holding ``tensors``."""
    if isinstance(template, TopKLogits):
        return TopKLogits(*tensors, template.temperature, template.num_classes)
    return SampledTargets(*tensors, template.num_classes, template.temperature)


def _describe(target) -> str:
    """A target's kind and per-item layout, for errors: ``a tensor``, ``TopKLogits (L, K)``."""
    if isinstance(target, torch.Tensor):
        return "a tensor"
    layout = " (K,)" if target.indices.dim() == 1 else " (L, K)"
    return type(target).__name__ + layout


def _recorded_classes(number: int, value) -> int:
    """Item ``number``'s recorded vocabulary size as an int (0: not recorded); a tensor of
    identical integer values is accepted, as for the loss."""
    if isinstance(value, torch.Tensor) and value.numel() and not (
            value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
        distinct = value.unique()
        if distinct.numel() == 1:
            value = int(distinct)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(f"item {number}: teacher num_classes must be an int >= 0 (0: not "
                        f"recorded), got {value!r}")
    return value


def _temperature(number: int, value) -> float:
    """Item ``number``'s temperature as a float (a tensor of identical values is accepted)."""
    values = torch.as_tensor(value).flatten()
    if not values.numel() or not values.eq(values[0]).all():
        raise ValueError(f"item {number}: teacher temperature must be one value, got {value!r}")
    return float(values[0])


def _check_sparse_item(number: int, target) -> None:
    """Item ``number``'s fields agree with each other: ``(K,)`` or ``(L, K)`` ids, values /
    counts of the same shape, top-k ``lse`` of the rows' shape."""
    indices = target.indices
    if not isinstance(indices, torch.Tensor) or indices.dim() not in (1, 2):
        shape = tuple(indices.shape) if isinstance(indices, torch.Tensor) else indices
        raise ValueError(f"item {number}: {type(target).__name__}.indices must be (K,) or (L, "
                         f"K), got {shape}")
    fields = (("values", indices.shape), ("lse", indices.shape[:-1])) \
        if isinstance(target, TopKLogits) else (("counts", indices.shape),)
    for name, shape in fields:
        part = getattr(target, name)
        if not isinstance(part, torch.Tensor) or part.shape != shape:
            got = tuple(part.shape) if isinstance(part, torch.Tensor) else type(part).__name__
            raise ValueError(f"item {number}: {type(target).__name__}.{name} must be "
                             f"{tuple(shape)} to match its indices, got {got}")


def check_targets(targets):
    """Per-item teacher rows that batch into one target, or a ValueError / TypeError naming
    the first item that does not match item 0: every item a tensor, or every item the same
    sparse kind and layout; dense rows of one vocabulary width (padding adds rows, never
    classes); top-k targets of one K; one temperature. Returns the batch's recorded
    vocabulary size for sparse targets: the one the items record, where items recording 0
    ("not recorded") take the others' (two different recorded sizes are refused)."""
    targets = list(targets)
    if not targets:
        raise ValueError("pad_targets: empty batch (no teacher targets)")
    first = targets[0]
    for number, target in enumerate(targets):
        if not isinstance(target, (torch.Tensor,) + SPARSE_TARGETS):
            raise TypeError(f"item {number}: teacher targets must be tensors or fastkd "
                            f"TopKLogits / SampledTargets, got {type(target).__name__}")
        if isinstance(target, SPARSE_TARGETS):
            _check_sparse_item(number, target)
        elif target.dim() == 0:
            raise ValueError(f"item {number}: dense teacher rows must be (V,) or (L, V), got a "
                             f"0-dim tensor")
        if type(target) is not type(first) and not (
                isinstance(target, torch.Tensor) and isinstance(first, torch.Tensor)):
            raise TypeError(f"item {number}: teacher is {_describe(target)} but item 0's is "
                            f"{_describe(first)}; a batch holds one kind of teacher rows")
    if isinstance(first, torch.Tensor):
        for number, target in enumerate(targets):
            if target.dim() != first.dim():
                raise ValueError(f"item {number}: teacher rows {tuple(target.shape)} but item "
                                 f"0's are {tuple(first.shape)}; items must all be (V,) or all "
                                 f"(L, V)")
            if target.shape[-1] != first.shape[-1]:
                raise ValueError(f"teacher rows of items 0 and {number} differ in vocabulary "
                                 f"width: V = {first.shape[-1]} and {target.shape[-1]}; "
                                 f"padding adds rows (sequence positions), never classes")
            if target.shape[1:] != first.shape[1:]:
                raise ValueError(f"item {number}: teacher rows {tuple(target.shape)} but item "
                                 f"0's are {tuple(first.shape)}; only the first (sequence) "
                                 f"dimension may differ")
        return None
    recorded, recorded_by = 0, None
    temperature = _temperature(0, first.temperature)
    for number, target in enumerate(targets):
        if target.indices.dim() != first.indices.dim():
            raise ValueError(f"item {number}: teacher is {_describe(target)} but item 0's is "
                             f"{_describe(first)}; items must all be one row or all rows")
        k, first_k = target.indices.shape[-1], first.indices.shape[-1]
        if isinstance(target, TopKLogits) and k != first_k:
            raise ValueError(f"item {number}: top-k teacher rows of K = {k} but item 0's have "
                             f"K = {first_k}; a batch holds one K")
        if _temperature(number, target.temperature) != temperature:
            raise ValueError(f"item {number}: teacher target for temperature "
                             f"{_temperature(number, target.temperature)} but item 0's is for "
                             f"{temperature}; a batch holds one temperature")
        classes = _recorded_classes(number, target.num_classes)
        if classes and recorded and classes != recorded:
            raise ValueError(f"teacher num_classes of items {recorded_by} and {number} differ: "
                             f"{recorded} and {classes}; the items come from teachers of "
                             f"different vocabularies")
        if classes and not recorded:
            recorded, recorded_by = classes, number
    return recorded


def pad_targets(targets, length: Optional[int] = None):
    """Per-sample teacher rows -> one batch target: dense rows ``(L_i, V)`` -> ``(B, L, V)``
    padded with zeros (``(V,)`` rows -> ``(B, V)``, never padded); sparse targets ``(L_i, k)``
    (or ``(k,)``) -> one target of ``(B, L, k)`` (or ``(B, k)``), rows past each sample's end
    filled by :func:`sparse_filler` (sampled targets of different widths first padded to the
    widest with weight-0 entries), ``num_classes`` the items' recorded vocabulary size (items
    recording 0, "not recorded", take the others'). ``L = length``, by default the longest.
    Items that do not batch (:func:`check_targets`) are refused naming the item."""
    num_classes = check_targets(targets)
    if isinstance(targets[0], torch.Tensor):
        if targets[0].dim() == 1:   # one row per item: stacked, the width is the vocabulary
            return torch.stack(list(targets))
        return pad_stack(list(targets), 0, length)
    targets = [target._replace(num_classes=num_classes) for target in targets]
    if isinstance(targets[0], SampledTargets):
        if targets[0].indices.dim() == 1:   # one row per item: one padding op per field
            return target_like(targets[0], [torch.nn.utils.rnn.pad_sequence(
                list(parts), batch_first=True) for parts in zip(
                *(target.tensors() for target in targets))])
        width = max(target.indices.shape[-1] for target in targets)  # id 0, weight 0: padding
        targets = [target.map_tensors(lambda part: torch.nn.functional.pad(
            part, (0, width - part.shape[-1]))) for target in targets]
    if targets[0].indices.dim() > 1:  # variable length: pad every sample to the longest
        if length is None:
            length = max(target.indices.shape[0] for target in targets)
        targets = [target_like(target, [torch.cat(parts) for parts in zip(
            target.tensors(), sparse_filler(target, length - len(target.indices)).tensors())])
            for target in targets]
    return target_like(targets[0], [torch.stack(parts)
                              for parts in zip(*(target.tensors() for target in targets))])


def collate_padded(batch, *, ignore_index: int = -100, pad_value: int = 0):
    """Collate ``(input, labels, teacher)`` items (what :class:`CachedDataset` yields) into
    ``(inputs, labels, teacher)`` batches, padding variable-length items on the right to the
    longest: inputs ``(B, L)`` with ``pad_value`` (dict inputs field by field), labels ``(B, L)``
    with ``ignore_index`` (so padded positions carry no loss), dense teacher rows ``(B, L, V)``
    with zeros, and sparse teachers (:class:`~fastkd.TopKLogits`, :class:`~fastkd.SampledTargets`)
    into one sparse target of ``(B, L, k)`` whose padded rows hold a valid uniform filler over
    ids ``0..k-1`` (sampled rows of different widths, as ragged sampled caches return them, are
    first padded to the widest with weight-0 entries). The result goes to
    :func:`fastkd.kd_loss` as is. Fixed-length items collate to the default collate's shapes
    (sparse: ``(B, k)``, ``temperature`` kept a float); use this collate, not the default one,
    for sampled caches, whose rows differ in width. Items that do not batch (teacher rows of
    different vocabulary widths or recorded ``num_classes``, kinds, K or temperatures; a missing
    label) are refused with an error naming the item."""
    batch = list(batch)
    if not batch:
        raise ValueError("collate_padded: empty batch")
    for number, item in enumerate(batch):
        if not isinstance(item, (tuple, list)) or len(item) != 3:
            got = f"{len(item)} fields" if isinstance(item, (tuple, list)) else \
                type(item).__name__
            raise ValueError(f"item {number}: expected (input, label, teacher), as "
                             f"CachedDataset yields, got {got}")
        if item[1] is None:
            raise TypeError(f"item {number}: label is None; collate_padded needs a label "
                            f"per item (use ignore_index for positions without one)")
        if isinstance(item[0], dict) != isinstance(batch[0][0], dict) or isinstance(
                item[0], dict) and set(item[0]) != set(batch[0][0]):
            keys = (lambda x: sorted(x) if isinstance(x, dict) else type(x).__name__)
            raise ValueError(f"item {number}: input {keys(item[0])} but item 0's is "
                             f"{keys(batch[0][0])}; inputs must all be tensors or all dicts "
                             f"of the same fields")
    inputs, labels, teachers = zip(*batch)
    if isinstance(inputs[0], dict):
        inputs = {key: pad_stack([torch.as_tensor(item[key]) for item in inputs], pad_value)
                  for key in inputs[0]}
    else:
        inputs = pad_stack([torch.as_tensor(item) for item in inputs], pad_value)
    labels = [torch.as_tensor(label).reshape(-1) for label in labels]
    labels = pad_stack(labels, ignore_index) if len(labels[0]) != 1 or any(
        len(label) != 1 for label in labels) else torch.cat(labels)
    return inputs, labels, pad_targets(teachers)
