"""Ragged and masked top-k rows (what served teachers return): a -inf teacher value is padding,
not a kept id; its class stays in the rest bucket. Every backend (compiled CPU kernel, ATen,
Triton in the interpreter) against the float64 reference, and against the same rows with the
padding dropped (the definition, independent of the reference). Tolerances: tests/sparse_inputs.py.
"""
import pytest
import torch

from fastkd import TopKLogits, kd_loss
from loss_inputs import assert_close_scaled, make_labels
from sparse_inputs import backend, check, make_topk, run_loss  # noqa: F401 (backend: fixture)

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")

COMBOS = [(divergence, beta, tail) for tail in ("bucket", "renormalize")
          for divergence, beta in (("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3))]
COMBOS.append(("forward_kl", 0.5, "ignore"))
MINUS_INF = float("-inf")


def ragged_target(shape=(5, 40), k=8, temperature=1.0, seed=21, dtype=torch.float32):
    """Top-k rows with -inf padding: row 0 full, row 1 with three padding entries (one repeats a
    real id, two repeat each other), row 2 all padding, row 3 one real entry, row 4 with its
    largest value padded (the label "teacher" takes the largest real one)."""
    student, target, _ = make_topk(shape, k, temperature, seed=seed, dtype=dtype)
    values, ids = target.values.clone(), target.indices.clone()
    values[1, [2, 5, 7]] = MINUS_INF
    ids[1, 5] = ids[1, 0]
    ids[1, 7] = ids[1, 2]
    values[2] = MINUS_INF
    values[3, 1:] = MINUS_INF
    values[4, 0] = MINUS_INF
    return student, target._replace(values=values, indices=ids)


@pytest.mark.parametrize("label_mode", ["tensor", "teacher"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("divergence, beta, tail", COMBOS)
def test_padding_against_reference(divergence, beta, tail, temperature, label_mode, backend):
    student, target = ragged_target(temperature=temperature)
    labels = "teacher" if label_mode == "teacher" else make_labels((5,), 40, ignored=[0])
    loss, _ = check(student, target, labels, backend, tail=tail, temperature=temperature,
                    divergence=divergence, beta=beta, soft_weight=0.7, hard_weight=0.4,
                    reduction="none")
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("divergence, beta, tail", COMBOS)
def test_padding_is_the_row_without_it(divergence, beta, tail, backend):
    """A row with -inf padding gives the loss and gradient of its real entries alone (the
    padded classes are in the rest bucket, not buckets of teacher mass 0)."""
    student, target = ragged_target(temperature=1.5)
    options = dict(tail=tail, temperature=1.5, divergence=divergence, beta=beta,
                   reduction="none")
    loss, grad, upstream = run_loss(student, target, "teacher", backend, **options)
    for row in (1, 3, 4):
        real = target.values[row] != MINUS_INF
        short = TopKLogits(target.values[row:row + 1, real], target.indices[row:row + 1, real],
                           target.lse[row:row + 1], 1.5)
        want_loss, want_grad, _ = run_loss(student[row:row + 1], short, "teacher", backend,
                                           **options)
        assert_close_scaled(loss[row], want_loss[0], 1e-5, floor=1.0)
        assert_close_scaled(grad[row] / upstream[row], want_grad[0] / upstream[0], 1e-5)


@pytest.mark.parametrize("divergence, beta, tail", COMBOS)
def test_row_without_real_entries(divergence, beta, tail, backend):
    """All padding: the soft term is 0 (the whole mass is the rest on both sides), and
    labels="teacher" has no label there (no hard term): loss 0, gradient 0. Tensor labels keep
    their cross-entropy (jsd's mixture log(beta + (1 - beta)) rounds to ~1e-8, not 0)."""
    student, target = ragged_target()
    options = dict(tail=tail, divergence=divergence, beta=beta, reduction="none")
    loss, grad, _ = run_loss(student, target, "teacher", backend, **options)
    assert abs(loss[2]) < 1e-6 and grad[2].abs().max() < 1e-6   # 0 up to float32 rounding
    labels = torch.tensor([-100, -100, 7, -100, -100])
    loss, grad, upstream = run_loss(student, target, labels, backend, soft_weight=0.5,
                                    hard_weight=0.5, **options)
    want = 0.5 * -torch.log_softmax(student[2].double(), -1)[7]
    assert_close_scaled(loss[2], want, 1e-5)
    want_grad = 0.5 * (torch.softmax(student[2].double(), -1) - torch.eye(40)[7].double())
    assert_close_scaled(grad[2], want_grad * upstream[2], 1e-5)


@pytest.mark.parametrize("divergence, beta", [("forward_kl", 0.5), ("reverse_kl", 0.5),
                                              ("jsd", 0.4)])
def test_all_classes_listed_with_padding(divergence, beta, backend):
    """K = V ids with two -inf entries (the two largest: P_rest = 1 - sum_k P_k is formed in
    float32 by two backends, so a tiny rest would measure its rounding): those two classes
    form the rest bucket; the row without padding stays dense KD (empty rest)."""
    student, target, teacher = make_topk((3, 17), 17, seed=23)
    values = target.values.clone()
    values[:2, :2] = MINUS_INF
    check(student, target._replace(values=values), make_labels((3,), 17), backend,
          divergence=divergence, beta=beta)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_padding_with_half_precision(dtype, backend):
    student, target = ragged_target(dtype=dtype, temperature=2.0)
    check(student, target._replace(values=target.values.to(torch.bfloat16)), "teacher", backend,
          temperature=2.0, divergence="jsd", beta=0.3)


def test_duplicate_ids_among_padding_only():
    """-inf entries may repeat any id (they are not kept ids); two real entries with one id are
    refused."""
    student, target = ragged_target()
    kd_loss(student, target)   # row 1 repeats ids among padding
    ids = target.indices.clone()
    ids[0, 1] = ids[0, 0]
    with pytest.raises(ValueError, match="unique within each row"):
        kd_loss(student, target._replace(indices=ids))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_from_logprobs_at_a_temperature(temperature, backend):
    """Log-probs served at T with -inf padding (a short served row): the target of the raw
    logits' top entries with the exact lse at T, padding dropped."""
    student, target, teacher = make_topk((4, 50), 6, temperature, seed=25)
    served = torch.log_softmax(teacher / temperature, -1).gather(-1, target.indices.long())
    served[1, 4:] = MINUS_INF
    from_served = TopKLogits.from_logprobs(served, target.indices, temperature=temperature)
    assert from_served.temperature == temperature and not from_served.lse.any()
    exact = target._replace(values=torch.where(served == MINUS_INF, MINUS_INF, target.values))
    options = dict(temperature=temperature, divergence="forward_kl", reduction="none")
    loss, grad, _ = run_loss(student, from_served, "teacher", backend, **options)
    want_loss, want_grad, _ = run_loss(student, exact, "teacher", backend, **options)
    assert_close_scaled(loss, want_loss, 1e-5, floor=1.0)
    assert_close_scaled(grad, want_grad, 1e-5)
    with pytest.raises(ValueError, match="differs from the loss temperature"):
        kd_loss(student, from_served, temperature=temperature + 1.0)
    with pytest.raises(ValueError, match="temperature"):
        TopKLogits.from_logprobs(served, target.indices, temperature=0.0)
