"""Teacher target types (fastkd/targets.py) and their value checks (fastkd/checks.py)."""
import pytest
import torch

import fastkd
from fastkd.checks import check_sparse_values, check_temperature_value
from fastkd.targets import check_sparse_target


def test_exported_and_from_logprobs():
    logprobs = torch.log_softmax(torch.randn(2, 3, 10), -1)
    top = logprobs.topk(4, -1)
    target = fastkd.TopKLogits.from_logprobs(top.values, top.indices)
    assert isinstance(target, fastkd.TopKLogits)
    assert target.temperature == 1.0 and target.lse.shape == (2, 3) and not target.lse.any()
    dense = target.log_probs(10)
    torch.testing.assert_close(dense.gather(-1, top.indices), top.values)
    torch.testing.assert_close(dense.exp().sum(-1), torch.ones(2, 3))
    sampled = fastkd.SampledTargets(torch.tensor([[3, 1]]), torch.tensor([[3, 1]]))
    torch.testing.assert_close(sampled.probs(4), torch.tensor([[0.0, 0.25, 0.0, 0.75]]))


def test_log_probs_uses_the_target_temperature():
    logits = torch.randn(5, 12, dtype=torch.float64)
    top = logits.topk(12, -1)
    target = fastkd.TopKLogits(top.values, top.indices, torch.logsumexp(logits / 2, -1), 2.0)
    torch.testing.assert_close(target.log_probs(12).double(),
                               torch.log_softmax(logits / 2, -1), rtol=0, atol=1e-6)


def test_default_collate_keeps_one_temperature():
    item = fastkd.TopKLogits(torch.zeros(3), torch.arange(3), torch.tensor(0.0), 2.0)
    batch = torch.utils.data.default_collate([item, item])
    assert check_temperature_value("t", batch.temperature) == 2.0
    mixed = batch._replace(temperature=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="one temperature"):
        check_temperature_value("t", mixed.temperature)


def test_shape_and_type_checks():
    student = torch.zeros(2, 3, 10)
    good = fastkd.TopKLogits(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4, dtype=torch.long),
                             torch.zeros(2, 3), 1.0)
    assert check_sparse_target("teacher_logits", good, student) == 1.0
    with pytest.raises(ValueError, match="same shape"):
        check_sparse_target("teacher_logits", good._replace(indices=good.indices[..., :3]),
                            student)
    with pytest.raises(ValueError, match="lse must have shape"):
        check_sparse_target("teacher_logits", good._replace(lse=torch.zeros(2)), student)
    with pytest.raises(ValueError, match="leading dims"):
        check_sparse_target("teacher_logits", good, torch.zeros(3, 3, 10))
    with pytest.raises(TypeError, match="integer tensor"):
        check_sparse_target("teacher_logits", good._replace(indices=good.values), student)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        check_sparse_target("teacher_logits", good._replace(temperature=0.0), student)
    sampled = fastkd.SampledTargets(torch.zeros(2, 3, 4, dtype=torch.long), torch.ones(2, 3, 5))
    with pytest.raises(ValueError, match="same shape"):
        check_sparse_target("teacher_logits", sampled, student)
    with pytest.raises(TypeError, match="TopKLogits or SampledTargets"):
        check_sparse_target("teacher_logits", (1, 2), student)


def test_value_checks():
    ids = torch.tensor([[1, 2], [3, 4]])
    check_sparse_values(ids, 5, values=torch.zeros(2, 2), lse=torch.zeros(2))
    with pytest.raises(ValueError, match=r"\[0, 5\); found 7"):
        check_sparse_values(torch.tensor([[1, 7]]), 5)
    with pytest.raises(ValueError, match=r"found -1"):
        check_sparse_values(torch.tensor([[-1, 2]]), 5)
    with pytest.raises(ValueError, match="values contain NaN"):
        check_sparse_values(ids, 5, values=torch.tensor([[0.0, float("nan")], [0, 0]]))
    with pytest.raises(ValueError, match="lse contains NaN"):
        check_sparse_values(ids, 5, values=torch.zeros(2, 2), lse=torch.tensor([0, float("nan")]))
    with pytest.raises(ValueError, match="unique"):
        check_sparse_values(torch.tensor([[1, 1]]), 5)
    # ignored rows may hold anything but out-of-range ids; zero-count entries are padding
    labels, kept = check_sparse_values(torch.tensor([[1, 1], [2, 3]]), 5, values=torch.tensor(
        [[float("nan"), 0.0], [0.0, 0.0]]), labels=torch.tensor([-100, 4]), ignore_index=-100)
    assert labels.dtype == torch.int64 and kept == 1
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\).*found 5"):
        check_sparse_values(ids, 5, labels=torch.tensor([5, 0]))
    check_sparse_values(torch.tensor([[1, 1, 0]]), 5, counts=torch.tensor([[2, 0, 0]]))
    with pytest.raises(ValueError, match="counts"):
        check_sparse_values(ids, 5, counts=torch.tensor([[1, -1], [1, 1]]))
    with pytest.raises(ValueError, match="counts"):
        check_sparse_values(ids, 5, counts=torch.tensor([[0, 0], [1, 1]]))
