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


def pad_targets(targets, length: Optional[int] = None):
    """Per-sample teacher rows -> one batch target: dense rows ``(L_i, V)`` -> ``(B, L, V)``
    padded with zeros; sparse targets ``(L_i, k)`` (or ``(k,)``) -> one target of ``(B, L, k)``
    (or ``(B, k)``), rows past each sample's end filled by :func:`sparse_filler` (sampled
    targets of different widths first padded to the widest with weight-0 entries). ``L =
    length``, by default the longest."""
    if isinstance(targets[0], torch.Tensor):
        return pad_stack(list(targets), 0, length)
    if not isinstance(targets[0], SPARSE_TARGETS):
        raise TypeError(f"teacher targets must be tensors or fastkd target tuples, got "
                        f"{type(targets[0]).__name__}")
    kinds = {type(target).__name__ for target in targets}
    temperatures = {float(torch.as_tensor(target.temperature).flatten()[0])
                    for target in targets}
    if len(kinds) > 1 or len(temperatures) > 1:
        raise ValueError(f"cannot batch different teacher targets: {sorted(kinds)}, "
                         f"temperatures {sorted(temperatures)}")
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
    for sampled caches, whose rows differ in width."""
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
