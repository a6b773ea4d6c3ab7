"""kd_loss / linear_kd_loss refuse a top-k target whose kept probabilities exp(v / T - lse) sum
past 1 beyond the rounding of its values (fastkd.checks.check_sparse_values), on both
backends (Triton in the CPU interpreter) and under torch.compile.
"""
import math

import pytest
import torch

import fastkd
from fastkd import TopKLogits, kd_loss

BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_kept_mass_above_one_is_refused(backend):
    """exp(values / T - lse) summing past 1 (lse not the full row's) is refused wherever the
    loss uses lse; renormalize does not use it, and ignored rows are not checked."""
    student = torch.randn(2, 10)
    ids = torch.tensor([[0, 1, 2], [3, 4, 5]])
    bad = TopKLogits(torch.zeros(2, 3), ids, torch.zeros(2))   # mass 3 in every row
    for options in ({}, {"tail": "ignore"}, {"divergence": "jsd"}):
        with pytest.raises(ValueError, match=r"row 0 sum to 3 at T=1, more than 1"):
            kd_loss(student, bad, backend=backend, **options)
    values = torch.tensor([[2 * math.log(1 / 3)] * 3, [0.0] * 3])   # at T = 2: mass 1, mass 3
    with pytest.raises(ValueError, match=r"row 1 sum to 3 at T=2.*lse must be the log-sum-exp"):
        kd_loss(student, bad._replace(values=values, temperature=2.0), torch.tensor([1, 2]),
                temperature=2.0, backend=backend)
    kd_loss(student, bad._replace(values=values, temperature=2.0), torch.tensor([1, -100]),
            temperature=2.0, backend=backend)
    kd_loss(student, bad, tail="renormalize", backend=backend)
    kd_loss(student, bad, torch.tensor([-100, -100]), backend=backend)
    with pytest.raises(ValueError, match="more than 1"):
        fastkd.linear_kd_loss(torch.randn(2, 4), torch.randn(10, 4), bad, backend=backend)
    fastkd.linear_kd_loss(torch.randn(2, 4), torch.randn(10, 4), bad, tail="renormalize",
                          backend=backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kept_mass_allows_the_rounding_of_stored_values(dtype):
    """A cached row (values rounded to fp16 / bf16, lse the float32 log-sum-exp of the unrounded
    row) may sum past 1 by the values' rounding and is accepted; past it, it is refused. Row:
    one logit near 30 over 9 near -10 (top-1 probability ~1): bf16 steps of 0.125 there round
    it up by up to 0.0625, so its probability by up to 6.5%."""
    logits = torch.full((4, 10), -10.0)
    logits[:, 0] = torch.tensor([30.07, 30.06, 23.3, 30.5])   # bf16 rounds the first one up
    top = logits.topk(3, -1)
    lse = torch.logsumexp(logits, -1)
    stored = top.values.to(dtype)
    target = TopKLogits(stored, top.indices, lse)
    mass = (stored.float() - lse[:, None]).exp().sum(-1)
    if dtype == torch.bfloat16:
        assert mass.max() > 1.05   # rounding alone puts the mass well past 1
    kd_loss(torch.randn(4, 10), target, backend="torch")
    # the same values taken as float32 are exact: that mass past 1 is refused
    with pytest.raises(ValueError, match="float32 values"):
        kd_loss(torch.randn(4, 10), target._replace(values=stored.float()), backend="torch")
    with pytest.raises(ValueError, match="more than 1"):
        kd_loss(torch.randn(4, 10), target._replace(lse=lse - 0.2), backend="torch")


def test_kept_mass_check_runs_under_torch_compile():
    """The check lives inside the custom op: a compiled fullgraph loss refuses the target too."""
    def loss_fn(logits, values, indices, lse):
        return kd_loss(logits, TopKLogits(values, indices, lse), backend="torch")

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    generator = torch.Generator().manual_seed(21)
    student, teacher = torch.randn(2, 4, 12, generator=generator)
    top = teacher.topk(3, -1)
    target = TopKLogits(top.values, top.indices, teacher.logsumexp(-1))
    torch.testing.assert_close(compiled(student, *target.tensors()),
                               loss_fn(student, *target.tensors()))
    with pytest.raises(ValueError, match="more than 1"):
        compiled(student, target.values, target.indices, target.lse - 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kept_mass_counts_real_entries_only(backend):
    """-inf padding adds no mass (a padded served row passes), a row of padding only has mass 0
    with any lse, and a padded row whose real entries sum past 1 is still refused."""
    student = torch.randn(3, 12)
    values = torch.log(torch.tensor([[0.5, 0.3, 0.1], [0.6, 0.3, 0.2], [0.1, 0.1, 0.1]]))
    values[0, 2] = float("-inf")
    values[2] = float("-inf")
    target = TopKLogits.from_logprobs(values, torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]]))
    with pytest.raises(ValueError, match=r"row 1 sum to 1\.1 at T=1"):
        kd_loss(student, target, backend=backend)
    values[1, 2] = float("-inf")
    kd_loss(student, target._replace(values=values), backend=backend)
    kd_loss(student, target._replace(values=values, lse=torch.tensor([0.0, 0.0, -50.0])),
            backend=backend)
