"""The explicit densifiers TopKLogits.log_probs(V) and SampledTargets.probs(V) (fastkd/targets.py)
on ragged rows, against float64 computations, and their argument and data checks."""
import pytest
import torch

import fastkd

NEG_INF = float("-inf")


def reference_top_k_probs(target, num_classes):
    """float64 ``(N, V)``: the real entries' (finite values) probabilities exp(v / T - lse) at
    their ids, and the rest mass 1 - sum over every other class in equal parts."""
    values = target.values.double().reshape(-1, target.values.shape[-1])
    ids = target.indices.long().reshape(values.shape)
    lse = target.lse.double().reshape(-1)
    out = torch.zeros(values.shape[0], num_classes, dtype=torch.float64)
    for row in range(values.shape[0]):
        real = values[row] != NEG_INF
        kept = (values[row][real] / float(target.temperature) - lse[row]).exp()
        others = [j for j in range(num_classes) if j not in set(ids[row][real].tolist())]
        out[row, others] = (1 - kept.sum()) / max(len(others), 1)
        out[row, ids[row][real]] = kept
    return out.reshape(*target.values.shape[:-1], num_classes)


def ragged_target(values, ids, full_logits, temperature=1.0):
    """A TopKLogits with an exact lse: that of ``full_logits`` at ``temperature``."""
    lse = torch.logsumexp(torch.as_tensor(full_logits, dtype=torch.float64) / temperature, -1)
    return fastkd.TopKLogits(torch.tensor(values, dtype=torch.float32), torch.tensor(ids),
                             lse.float(), temperature)


def random_ragged(num_rows, num_classes, k, temperature, seed):
    """Rows of k entries from random logits: the top ones real, a random number padded with -inf
    at ids that repeat real ids or each other (some rows all padding, some full)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_rows, num_classes, generator=generator, dtype=torch.float64) * 3
    top = logits.topk(k, -1)
    values, ids = top.values.float().clone(), top.indices.clone()
    for row in range(num_rows):
        real = [k, 0, 1, k // 2][row % 4]
        values[row, real:] = NEG_INF
        if real:
            repeats = torch.randint(0, real, (k - real,), generator=generator)
            ids[row, real:] = ids[row, repeats]
        else:
            ids[row] = torch.randint(0, 2, (k,), generator=generator)
    lse = torch.logsumexp(logits / temperature, -1).float()
    return fastkd.TopKLogits(values, ids, lse, temperature)


def check_against_reference(target, num_classes):
    dense = target.log_probs(num_classes)
    assert dense.dtype == torch.float32
    assert dense.shape == target.values.shape[:-1] + (num_classes,)
    want = reference_top_k_probs(target, num_classes)
    torch.testing.assert_close(dense.double().exp(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dense.double().exp().sum(-1), torch.ones(want.shape[:-1],
                               dtype=torch.float64), rtol=0, atol=1e-5)
    return dense


def test_padding_that_repeats_a_real_id_keeps_the_real_entry():
    target = ragged_target([[2.0, NEG_INF, NEG_INF]], [[0, 0, 0]], [[2.0, 1.0, 0.5, 0.0, -1.0]])
    dense = check_against_reference(target, 5)
    probs = dense.exp()
    assert float(probs[0, 0]) > 0.5
    torch.testing.assert_close(probs[0, 1:], probs[0, 1:2].expand(4))


def test_padding_classes_share_the_rest_mass():
    # padding at ids 3 and 4 (not real): they get the rest mass like every other class
    target = ragged_target([[1.0, 0.5, NEG_INF, NEG_INF]], [[1, 2, 3, 4]],
                           [[0.0, 1.0, 0.5, 0.3, 0.2, 0.0]])
    probs = check_against_reference(target, 6).exp()
    assert float(probs[0, 3]) > 0 and float(probs[0, 4]) > 0
    torch.testing.assert_close(probs[0, [0, 3, 4, 5]], probs[0, :1].expand(4))


def test_all_padding_row_is_uniform_and_k_equal_to_v():
    # an all-padding row next to a real one; padding ids repeat each other
    target = ragged_target([[NEG_INF, NEG_INF, NEG_INF], [3.0, 1.0, NEG_INF]],
                           [[2, 2, 2], [0, 1, 1]], [[0.0, 0.0, 0.0], [3.0, 1.0, 0.0]])
    probs = check_against_reference(target, 3).exp()
    torch.testing.assert_close(probs[0], torch.full((3,), 1 / 3))
    # K = V with padding: the padded class gets the rest mass, not uninitialized memory
    full = ragged_target([[3.0, 1.0, 0.0]], [[0, 1, 2]], [[3.0, 1.0, 0.0]])
    check_against_reference(full, 3)


def test_k_larger_than_v_with_padding():
    # the loss takes K > V when the extra entries are padding; so does the densifier
    target = ragged_target([[2.0, NEG_INF, NEG_INF, NEG_INF]], [[0, 0, 1, 1]], [[2.0, 0.0, 1.0]])
    check_against_reference(target, 3)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("num_classes,k", [(12, 5), (8, 8), (30, 1)])
def test_random_ragged_rows_match_float64(num_classes, k, temperature):
    target = random_ragged(16, num_classes, k, temperature, seed=num_classes + k)
    check_against_reference(target, num_classes)
    # leading dims (B, S) give the same rows
    batched = target.map_tensors(lambda part: part.reshape(4, 4, *part.shape[1:]))
    torch.testing.assert_close(batched.log_probs(num_classes).reshape(16, num_classes),
                               target.log_probs(num_classes), rtol=0, atol=0)


def previous_full_row_log_probs(target, num_classes):
    """The densifier's formula for rows without padding, as the benchmark's densify provider has
    always run it."""
    kept = target.values.float() / float(target.temperature) - target.lse.float().unsqueeze(-1)
    k = kept.shape[-1]
    out = kept.new_empty(kept.shape[:-1] + (num_classes,))
    if num_classes > k:
        tail = (1 - kept.exp().sum(-1, keepdim=True)).clamp_min(1e-12)
        out.copy_((tail / (num_classes - k)).log().expand_as(out))
    return out.scatter_(-1, target.indices.long(), kept)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_classes,k,temperature", [(50, 8, 1.0), (16, 16, 1.0),
                                                       (300, 32, 2.0)])
def test_full_rows_are_unchanged_bit_for_bit(dtype, num_classes, k, temperature):
    logits = torch.randn(3, 7, num_classes, generator=torch.Generator().manual_seed(k)) * 4
    top = logits.topk(k, -1)
    target = fastkd.TopKLogits(top.values.to(dtype), top.indices.to(torch.int32),
                               torch.logsumexp(logits / temperature, -1), temperature)
    assert torch.equal(target.log_probs(num_classes),
                       previous_full_row_log_probs(target, num_classes))


def test_sampled_probs_refuse_bad_counts_and_take_padding():
    ids = torch.tensor([[0, 1], [2, 3]])
    for counts in ([[0, 0], [1, 1]], [[2, -1], [1, 1]], [[1.0, float("nan")], [1, 1]],
                   [[1.0, float("inf")], [1, 1]]):
        target = fastkd.SampledTargets(ids, torch.tensor(counts))
        with pytest.raises(ValueError, match=r"SampledTargets\.probs.*counts must be finite and "
                                             r">= 0 with a positive sum"):
            target.probs(4)
    # count-0 padding is fine: it may repeat a real id or another padding id
    ids = torch.tensor([[3, 1, 3, 3], [0, 0, 0, 0], [4, 2, 0, 1]])
    counts = torch.tensor([[3, 1, 0, 0], [5, 0, 0, 0], [0.5, 0.25, 0.125, 0.125]])
    probs = fastkd.SampledTargets(ids, counts).probs(5)
    want = torch.zeros(3, 5, dtype=torch.float64)
    want[0, 3], want[0, 1] = 0.75, 0.25
    want[1, 0] = 1.0
    want[2, [4, 2, 0, 1]] = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64)
    torch.testing.assert_close(probs.double(), want, rtol=0, atol=1e-7)


def both_targets(num_classes=0):
    top = fastkd.TopKLogits(torch.tensor([[1.0, 0.0]]), torch.tensor([[3, 5]]),
                            torch.tensor([3.0]), 1.0, num_classes)
    sampled = fastkd.SampledTargets(torch.tensor([[3, 5]]), torch.tensor([[2, 1]]), num_classes)
    return [(top, top.log_probs, "TopKLogits.log_probs"),
            (sampled, sampled.probs, "SampledTargets.probs")]


@pytest.mark.parametrize("bad", [9.0, "9", True, None, torch.tensor(9.0)])
def test_num_classes_must_be_an_int(bad):
    for _, densify, name in both_targets():
        with pytest.raises(TypeError, match=rf"{name}: num_classes must be an int"):
            densify(bad)


def test_num_classes_must_be_positive_and_cover_the_ids():
    for _, densify, name in both_targets():
        with pytest.raises(ValueError, match=rf"{name}: num_classes must be >= 1, got 0"):
            densify(0)
        with pytest.raises(ValueError, match=rf"{name}\(num_classes=5\).*\[0, 5\); found 5"):
            densify(5)
        assert densify(6).shape == (1, 6)
        assert densify(torch.tensor(6)).shape == (1, 6)   # a 0-d integer tensor is an int


def test_num_classes_must_match_the_recorded_vocabulary():
    for target, densify, name in both_targets(num_classes=9):
        with pytest.raises(ValueError, match=rf"{name}\(num_classes=20\).*num_classes=9"):
            densify(20)
        assert densify(9).shape == (1, 9)
    collated = torch.utils.data.default_collate([both_targets(9)[0][0]] * 2)
    assert collated.log_probs(9).shape == (2, 1, 9)
    with pytest.raises(ValueError, match="num_classes=9"):
        collated.log_probs(20)


def test_log_probs_refuse_what_the_loss_refuses():
    ids = torch.tensor([[1, 2]])
    good = fastkd.TopKLogits(torch.tensor([[1.0, 0.0]]), ids, torch.tensor([3.0]))
    with pytest.raises(ValueError, match="unique"):
        good._replace(indices=torch.tensor([[1, 1]])).log_probs(4)
    with pytest.raises(ValueError, match="values contain NaN"):
        good._replace(values=torch.tensor([[1.0, float("nan")]])).log_probs(4)
    with pytest.raises(ValueError, match="lse contains NaN"):
        good._replace(lse=torch.tensor([float("nan")])).log_probs(4)
    with pytest.raises(ValueError, match="sum to"):   # kept mass above 1: lse of another row
        good._replace(lse=torch.tensor([0.0])).log_probs(4)
    with pytest.raises(ValueError, match=r"lse must have shape \(1,\)"):
        good._replace(lse=torch.tensor(3.0)).log_probs(4)
    with pytest.raises(ValueError, match="same shape"):
        good._replace(indices=torch.tensor([[1, 2, 3]])).log_probs(4)
    # repeated ids among padding entries are fine
    padded = good._replace(values=torch.tensor([[1.0, NEG_INF, NEG_INF]]),
                           indices=torch.tensor([[1, 1, 1]]))
    check_against_reference(padded, 4)
