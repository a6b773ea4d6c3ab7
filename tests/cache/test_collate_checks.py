"""Batches the collates cannot make honestly are refused with one error naming the item (or
argument) and what was expected: teacher rows of different vocabularies or kinds, sparse
targets of different widths or recorded vocabulary sizes, malformed items and options."""
import math

import pytest
import torch

import hf_helpers
from fastkd import SampledTargets, TopKLogits
from fastkd.cache import collate_padded
from fastkd.cache.collate import pad_targets
from fastkd.tokens import (TokenDataset, collate_causal_lm, learned_positions,
                           next_token_labels)

X = torch.zeros(3)


def topk(rows: int, k: int = 2, num_classes: int = 0, temperature: float = 1.0):
    """A top-k target of ``rows`` rows (one row per item, ``(k,)``, when ``rows`` is 0)."""
    shape = (rows, k) if rows else (k,)
    return TopKLogits(torch.zeros(shape), torch.arange(k).expand(shape).clone(),
                      torch.full(shape[:-1], math.log(k)), temperature, num_classes)


def sampled(rows: int, k: int = 2, num_classes: int = 0):
    shape = (rows, k) if rows else (k,)
    return SampledTargets(torch.arange(k).expand(shape).clone(),
                          torch.ones(shape, dtype=torch.int32), num_classes)


def test_dense_rows_of_different_vocabularies_are_refused_not_padded():
    """Padding is along the sequence only: a zero column would be a fake class."""
    for one, two in ((torch.randn(5), torch.randn(6)), (torch.randn(2, 5), torch.randn(3, 6))):
        with pytest.raises(ValueError, match=r"items 0 and 1.*5.*6"):
            collate_padded([(X, 1, one), (X, 2, two)])
    inputs, labels, teacher = collate_padded([(X, 1, torch.randn(2, 5)),
                                              (X, 2, torch.randn(3, 5))])
    assert teacher.shape == (2, 3, 5) and teacher[0, 2].eq(0).all()


def test_sparse_items_of_different_recorded_vocabularies_are_refused():
    with pytest.raises(ValueError, match=r"num_classes.*items 0 and 1.*5.*7"):
        collate_padded([(X, [1, 2], topk(2, num_classes=5)), (X, [1], topk(1, num_classes=7))])
    with pytest.raises(ValueError, match=r"num_classes.*items 0 and 2.*5.*7"):
        pad_targets([sampled(2, num_classes=5), sampled(1), sampled(1, 3, num_classes=7)])
    # 0 is "not recorded": the batch keeps the size the other items record
    for make in (topk, sampled):
        target = pad_targets([make(2), make(1, num_classes=9), make(1)])
        assert target.num_classes == 9
        assert pad_targets([make(2), make(1)]).num_classes == 0


@pytest.mark.parametrize("targets, error, message", [
    ([topk(2, 3), topk(1, 4)], ValueError, r"item 1: .*K = 4.*item 0.*K = 3"),
    ([torch.randn(2, 5), topk(2)], TypeError, r"item 1: .*TopKLogits.*item 0.*tensor"),
    ([topk(2), torch.randn(2, 5)], TypeError, r"item 1: .*tensor.*item 0.*TopKLogits"),
    ([topk(2), sampled(2)], TypeError, r"item 1: .*SampledTargets.*item 0.*TopKLogits"),
    ([topk(0), topk(2)], ValueError, r"item 1: .*\(L, K\).*item 0.*\(K,\)"),
    ([topk(2), None], TypeError, r"item 1: .*NoneType"),
    ([topk(2), topk(2, temperature=2.0)], ValueError, r"item 1: .*temperature 2.0.*item 0"),
    ([], ValueError, r"empty batch"),
])
def test_sparse_batches_that_do_not_match_name_the_item(targets, error, message):
    with pytest.raises(error, match=message):
        pad_targets(targets)


def test_collate_padded_refuses_empty_batches_and_missing_labels():
    with pytest.raises(ValueError, match=r"collate_padded: empty batch"):
        collate_padded([])
    with pytest.raises(TypeError, match=r"item 1: label is None"):
        collate_padded([(X, 1, torch.randn(5)), (X, None, torch.randn(5))])
    with pytest.raises(ValueError, match=r"item 1: expected \(input, label, teacher\)"):
        collate_padded([(X, 1, torch.randn(5)), (X, 1)])


@pytest.mark.parametrize("value", [-3, 0, 2.5, True, "8"])
def test_pad_to_multiple_of_must_be_a_positive_int(value):
    items = [{"input_ids": [1, 2, 3, 4]}]
    with pytest.raises((TypeError, ValueError), match=rf"pad_to_multiple_of.*{value!r}"):
        collate_causal_lm(items, pad_to_multiple_of=value)
    assert collate_causal_lm(items, pad_to_multiple_of=3)["input_ids"].shape == (1, 6)


def test_collate_causal_lm_refuses_malformed_items():
    data = TokenDataset(hf_helpers.token_rows(3))
    cached = (data[1]["input_ids"], data[1]["labels"], torch.randn(len(data[1]["labels"]), 5))
    with pytest.raises(TypeError, match=r"item 1: .*tuple.*item 0.*dict"):
        collate_causal_lm([data[0], cached])
    with pytest.raises(ValueError, match=r"item 1: no 'input_ids'.*\['labels'\]"):
        collate_causal_lm([data[0], {"labels": [1, 2]}])
    with pytest.raises(TypeError, match=r"item 0: input_ids must be integers.*float"):
        collate_causal_lm([{"input_ids": [1.7, 2.2]}])
    with pytest.raises(TypeError, match=r"item 0: labels must be integers.*float"):
        collate_causal_lm([{"input_ids": [1, 2], "labels": [1.5, -100.0]}])
    assert collate_causal_lm([data[0], data[1]])["input_ids"].shape[0] == 2


def test_next_token_labels_hold_ignore_index_whatever_the_ids_dtype():
    for dtype in (torch.uint8, torch.int16, torch.int32, torch.int64):
        labels = next_token_labels(torch.tensor([[3, 4, 5]], dtype=dtype))
        assert labels.dtype == torch.int64 and labels.tolist() == [[4, 5, -100]]
    with pytest.raises(TypeError, match=r"labels must be integers.*float"):
        next_token_labels(torch.tensor([1.0, 2.0]))


def test_learned_positions_takes_one_sequence():
    labels = torch.tensor([-100, 5, -100])
    assert learned_positions(labels).tolist() == [False, True, True]
    with pytest.raises(ValueError, match=r"labels must be one sequence \(L,\).*\(2, 3\)"):
        learned_positions(torch.stack([labels, labels]))
