"""Shared inputs of the sparse-teacher tests (tests/loss/test_*sparse*.py): top-k targets with
their exact lse, sampled counts with padding, the ``backend`` fixture (every sparse path), and
the check of kd_loss's loss and gradient against the float64 reference
(tests/reference_sparse.py).

Tolerances per student dtype (loss rtol, gradient rtol), absolute parts scaled by the largest
expected value as in loss/test_triton_kernel.py: fp32 1e-5 / 1e-5 (fp32 accumulation); fp16 and bf16
students: the reference runs on the same rounded logits and the backends compute in fp32, so the
loss keeps fp32 accuracy; the gradient is stored in the low dtype and scaled once more by
grad_output there: two roundings of 2^-11 (fp16) or 2^-8 (bf16).
"""
import pytest
import torch

from fastkd import TopKLogits, dispatch, kd_loss
from loss_inputs import assert_close_scaled
from reference_sparse import reference_sparse_kd_loss

TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-5, 2e-3),
    torch.bfloat16: (1e-5, 1.6e-2),
}


@pytest.fixture(params=["cpu-kernel", "aten", "triton"])
def backend(request, monkeypatch):
    """Every test taking ``backend`` runs on the three sparse paths: the compiled CPU kernel
    (kernels/kd_sparse_cpu.c, backend="torch" on CPU wherever it is built), the PyTorch reference with it
    turned off (backend="torch" on a GPU and installs without a C compiler) and Triton (in the
    CPU interpreter)."""
    if request.param == "cpu-kernel":
        if dispatch.compiled_kernel("sparse") is None:
            from fastkd.kernels import kd_sparse_cpu
            pytest.skip(f"sparse CPU kernel unavailable: {kd_sparse_cpu.unavailable_reason()}")
        return "torch"
    if request.param == "aten":
        monkeypatch.setattr(dispatch, "compiled_kernel", lambda family: None)
        return "torch"
    return "triton"


def make_topk(shape, k, temperature=1.0, seed=0, scale=3.0, dtype=torch.float32):
    """Student logits (shape) and the top-k of independent teacher logits with their exact lse."""
    generator = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(shape, generator=generator)).to(dtype)
    teacher = scale * torch.randn(shape, generator=generator)
    top = teacher.topk(k, -1)
    lse = torch.logsumexp(teacher.double() / temperature, -1).float()
    return student, TopKLogits(top.values, top.indices.to(torch.int32), lse, temperature), teacher


def make_padded_counts(rows, num_classes, k, seed, max_count, counts_dtype=torch.int64):
    """Student logits and sampled-target parts (ids, counts): k distinct ids per row, counts in
    [1, max_count], and in row 1 three count-0 padding entries, one repeating a drawn id and one
    repeating another padding entry."""
    generator = torch.Generator().manual_seed(seed)
    student = 2 * torch.randn(rows, num_classes, generator=generator)
    ids = torch.stack([torch.randperm(num_classes, generator=generator)[:k] for _ in range(rows)])
    counts = torch.randint(1, max_count + 1, (rows, k), generator=generator).to(counts_dtype)
    counts[1, k - 3:] = 0
    ids[1, k - 2] = ids[1, 0]
    ids[1, k - 1] = ids[1, k - 3]
    return student, ids, counts


def run_loss(student, target, labels, backend, seed=2, **options):
    """(loss, gradient) of kd_loss for a random upstream gradient."""
    student = student.clone().requires_grad_()
    loss = kd_loss(student, target, labels, backend=backend, **options)
    generator = torch.Generator().manual_seed(seed)
    upstream = torch.rand(loss.shape, generator=generator) + 0.5
    (grad,) = torch.autograd.grad(loss, student, upstream)
    return loss.detach(), grad, upstream


def reference(student, target, labels, upstream, **options):
    student64 = student.detach().double().requires_grad_()
    loss = reference_sparse_kd_loss(student64, target, labels, **options)
    (grad,) = torch.autograd.grad(loss, student64, upstream.double())
    return loss.detach(), grad


def check(student, target, labels, backend, **options):
    loss_rtol, grad_rtol = TOLERANCES[student.dtype]
    loss, grad, upstream = run_loss(student, target, labels, backend, **options)
    want_loss, want_grad = reference(student, target, labels, upstream, **options)
    assert grad.dtype == student.dtype and grad.shape == student.shape
    assert_close_scaled(loss, want_loss, loss_rtol, floor=1.0)
    assert_close_scaled(grad, want_grad, grad_rtol)
    return loss, grad
