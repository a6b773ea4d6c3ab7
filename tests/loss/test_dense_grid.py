"""The dense loss against the float64 reference (tests/reference.py), value and gradient, on every
backend present: the compiled CPU kernel (kernels/kd_loss_cpu.c, ``backend="torch"`` on CPU
wherever it is built; the installed library and each x86-64 level's copy of its row code built
alone, tests/cpu_isas.py), the plain PyTorch reference with that kernel turned off
(fastkd/reference_dense.py, ``backend="torch"`` on a GPU and on installs without a C compiler)
and Triton (kernels/kd_loss.py, on CUDA or in Triton's CPU interpreter).

Triton runs every test here except part of ``test_matches_reference``, whose full product is
most of this file's time in the interpreter: on Triton it runs every V with one label kind per
(divergence, temperature) (see ``reference_grid``), every reduction each.

Properties of one backend only live beside this file: test_cpu_kernel.py, test_triton_kernel.py.
"""
import itertools
import math
from typing import NamedTuple

import pytest
import torch

import cpu_isas
import fastkd
import fastkd.dispatch as dispatch
import fastkd.reference_dense as reference_dense
from fastkd.options import LossOptions
from reference import reference_kd_loss

# The interpreter evaluates masked-off padding lanes too (-inf - -inf); those values are
# discarded by the masked store / where, numpy just warns about them.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]

# (rtol, atol as a fraction of the largest reference magnitude), per dtype of the compared tensor.
# Losses are float32 for every input dtype (fp32 accumulation, cancellation between O(T^2 log V)
# log-sum-exp terms); gradients are stored in the student's dtype, so they carry one rounding of
# that dtype (half an ulp: fp16 2^-11, bf16 2^-8) on top of the fp32 error. The fp32 gradient
# atol is 5e-5 of its largest entry: reverse KL / JSD factors (log p_s - log p_t - D) cancel
# terms of size |log p| ~ 50 at T = 0.5 in fp32.
TOLERANCES = {
    "loss": (1e-4, 2e-6),
    torch.float32: (1e-4, 5e-5),
    torch.float16: (2e-3, 1e-4),
    torch.bfloat16: (1e-2, 1e-3),
}

DIVERGENCE_CASES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.3),
                    ("jsd", 0.5), ("jsd", 1.0), ("mse", 0.5)]
REDUCTIONS = ("batchmean", "sum", "none")
LABEL_KINDS = ("none", "tensor", "teacher")
BACKENDS = ("cpu-kernel", "reference", "triton") + tuple(f"cpu-kernel-{level}"
                                                      for level in cpu_isas.LEVELS)


class Backend(NamedTuple):
    name: str     # kd_loss's backend=
    device: str   # where its inputs live


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch, kernel_device, level_builds):
    """Every test here runs on each dense path: the compiled CPU kernel (as installed, and each
    x86-64 level's row code alone), the PyTorch reference with the kernel turned off, and
    Triton (inputs on the kernel device)."""
    if request.param == "triton":
        return Backend("triton", kernel_device)
    if request.param.startswith("cpu-kernel-"):
        cpu_isas.use_level(request.param[len("cpu-kernel-"):], level_builds, monkeypatch,
                           request)
    if request.param.startswith("cpu-kernel"):
        if dispatch.compiled_kernel("dense") is None:
            from fastkd.kernels import kd_loss_cpu
            pytest.skip(f"CPU kernel unavailable: {kd_loss_cpu.unavailable_reason()}")
    else:
        monkeypatch.setattr(dispatch, "compiled_kernel", lambda family: None)
    return Backend("torch", "cpu")


def assert_close(actual, expected, key, what):
    rtol, atol_fraction = TOLERANCES[key]
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, what
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), f"{what}: NaN pattern differs"
    finite = torch.isfinite(expected)
    assert torch.equal(actual[~finite], expected[~finite]), f"{what}: inf entries differ"
    actual, expected = actual[finite], expected[finite]
    if expected.numel() == 0:
        return
    atol = atol_fraction * max(expected.abs().max().item(), 1.0 if key == "loss" else 0.0)
    error = (actual - expected).abs()
    allowed = atol + rtol * expected.abs()
    worst = (error - allowed).argmax()
    assert bool((error <= allowed).all()), (
        f"{what}: |{actual[worst].item()} - {expected[worst].item()}| = {error[worst].item():.3g}"
        f" > {allowed[worst].item():.3g}")


def on(backend, labels):
    """``labels`` on the backend's device (a tensor), or as given (None, "teacher")."""
    return labels.to(backend.device) if isinstance(labels, torch.Tensor) else labels


def loss_of(backend, student, teacher, labels=None, **options):
    """kd_loss on ``backend`` (inputs moved to its device), the loss back on the CPU."""
    return fastkd.kd_loss(student.to(backend.device), teacher.to(backend.device),
                          on(backend, labels), backend=backend.name, **options).cpu()


def run_both(backend, student, teacher, labels=None, *, reduction="batchmean",
             grad_inplace=False, check=True, **options):
    """Loss and student gradient from ``backend`` and from the float64 reference evaluated
    on the same (already rounded) inputs, all on the CPU; reduction='none' uses a random
    upstream gradient."""
    student_ref = student.detach().double().requires_grad_()
    expected = reference_kd_loss(student_ref, teacher.double(), labels, reduction=reduction,
                                 **options)
    upstream = torch.rand_like(expected) + 0.5 if reduction == "none" else torch.ones_like(expected)
    expected.backward(upstream)

    leaf = student.detach().clone().to(backend.device).requires_grad_()
    student_in = leaf.clone() if grad_inplace else leaf  # in place needs a non-leaf
    loss = fastkd.kd_loss(student_in, teacher.to(backend.device), on(backend, labels),
                          reduction=reduction, backend=backend.name, grad_inplace=grad_inplace,
                          **options)
    assert loss.dtype == torch.float32
    loss.backward(upstream.float().to(backend.device))
    assert leaf.grad.dtype == student.dtype
    loss, grad = loss.detach().cpu(), leaf.grad.cpu()
    if check:
        assert_close(loss, expected.detach(), "loss", f"loss ({reduction})")
        assert_close(grad, student_ref.grad, student.dtype, f"gradient ({reduction})")
    return loss, grad, expected.detach(), student_ref.grad


def make_inputs(num_rows, num_classes, *, dtype=torch.float32, teacher_dtype=None, scale=3.0,
                seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = (torch.randn(num_rows, num_classes, generator=generator) * scale).to(dtype)
    teacher = (torch.randn(num_rows, num_classes, generator=generator) * scale).to(
        teacher_dtype or dtype)
    labels = torch.randint(0, num_classes, (num_rows,), generator=generator)
    return student, teacher, labels


def make_labels(kind, labels):
    if kind == "tensor":
        labels = labels.clone()
        labels[1::3] = -100  # some ignored rows
        return labels
    return {"none": None, "teacher": "teacher"}[kind]


# ----------------------------------------------------------------------------- reference grid
def reference_grid():
    """(backend, divergence, beta, temperature, num_classes, label_kind): every case on the CPU
    paths; on Triton one label kind per (divergence, temperature), a Latin square, so every
    divergence meets every temperature and label kind."""
    for (i, (divergence, beta)), (j, temperature), num_classes, label_kind in itertools.product(
            enumerate(DIVERGENCE_CASES), enumerate([0.5, 1.0, 4.0]), [1, 7, 1000], LABEL_KINDS):
        on_triton = label_kind == LABEL_KINDS[(i + j) % 3]
        for name in BACKENDS if on_triton else BACKENDS[:2]:
            yield pytest.param(name, divergence, beta, temperature, num_classes, label_kind,
                               id=f"{name}-{label_kind}-{num_classes}-{temperature}-{divergence}"
                                  f"-{beta}")


@pytest.mark.parametrize("backend,divergence,beta,temperature,num_classes,label_kind",
                         list(reference_grid()), indirect=["backend"])
def test_matches_reference(backend, divergence, beta, temperature, num_classes, label_kind):
    student, teacher, labels = make_inputs(6, num_classes)
    for reduction in REDUCTIONS:
        run_both(backend, student, teacher, make_labels(label_kind, labels), reduction=reduction,
                 temperature=temperature, divergence=divergence, beta=beta, soft_weight=0.7,
                 hard_weight=0.4)


@pytest.mark.parametrize("temperature", [0.25, 1 / 3, 0.7, 2.0, 3.0, 5.0])
def test_temperature_exponential_paths(temperature, backend):
    """exp(d) from exp(d / T) ** T (T = 2, 3), exp(d / T) from exp(d) ** (1 / T) (T = 1/4, 1/3),
    and two exps otherwise (0.7, 5)."""
    student, teacher, labels = make_inputs(5, 400)
    for divergence in ("forward_kl", "jsd"):
        run_both(backend, student, teacher, labels, temperature=temperature,
                 divergence=divergence)


@pytest.mark.parametrize("soft_weight,hard_weight", [(1.0, 0.0), (0.0, 1.0), (0.0, 0.0)])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "mse"])
def test_one_term_only(soft_weight, hard_weight, divergence, backend):
    student, teacher, labels = make_inputs(5, 50)
    run_both(backend, student, teacher, labels, temperature=2.0, divergence=divergence,
             soft_weight=soft_weight, hard_weight=hard_weight)


@pytest.mark.parametrize("num_rows,num_classes", [(3, 32001), (2, 262144)])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_large_vocab(num_rows, num_classes, divergence, backend):
    student, teacher, labels = make_inputs(num_rows, num_classes)
    run_both(backend, student, teacher, labels, temperature=4.0, divergence=divergence)


# ----------------------------------------------------------------------------- labels
def test_all_rows_ignored(backend):
    student, teacher, labels = make_inputs(4, 100)
    labels[:] = -100
    for reduction in REDUCTIONS:
        loss, grad, _, _ = run_both(backend, student, teacher, labels, reduction=reduction,
                                    temperature=2.0)
        assert not torch.isnan(loss).any() and torch.all(loss == 0)
        assert torch.all(grad == 0)


def test_ignored_rows_have_zero_loss_and_gradient_even_with_nan(backend):
    student, teacher, labels = make_inputs(4, 100)
    student[1] = float("nan")
    labels[1] = -1
    loss, grad, _, _ = run_both(backend, student, teacher, labels, reduction="none",
                                ignore_index=-1, check=False)
    assert loss[1] == 0 and torch.all(grad[1] == 0)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


def test_teacher_labels_take_first_maximum(backend):
    student, teacher, _ = make_inputs(2, 10)
    teacher[0, 3] = teacher[0, 8] = teacher[0].max() + 1.0  # tie: index 3 is the label
    grad = torch.empty_like(student, device=backend.device)
    options = LossOptions(soft_weight=0.0, hard_weight=1.0, label_mode=2)
    dispatch.dispatch(backend.name, "dense", backend.device)(
        student.to(backend.device), teacher.to(backend.device), None, options, grad=grad)
    grad = grad.cpu()
    softmax = torch.softmax(student.double(), -1)
    assert grad[0, 3].item() == pytest.approx(softmax[0, 3].item() - 1.0, abs=1e-6)
    assert grad[0, 8].item() == pytest.approx(softmax[0, 8].item(), abs=1e-6)


# ----------------------------------------------------------------------------- special values
# (mse compares raw logits: with -inf it is inf / NaN by definition, not a use case)
@pytest.mark.parametrize("divergence,beta", [case for case in DIVERGENCE_CASES
                                             if case[0] != "mse"])
def test_minus_inf_teacher_logits(divergence, beta, backend):
    student, teacher, labels = make_inputs(6, 40)
    teacher[0, :10] = float("-inf")
    teacher[2, ::2] = float("-inf")
    student[2, ::4] = float("-inf")  # student -inf only where p_t = 0 as well
    labels[2] = 1  # a label where the student is finite
    options = dict(temperature=2.0, divergence=divergence, beta=beta, labels=labels)
    loss, grad, expected, expected_grad = run_both(backend, student, teacher, reduction="none",
                                                   check=False, **options)
    assert_close(loss, expected, "loss", "loss")
    if divergence in ("forward_kl", "jsd") and beta < 1.0:
        # finite loss; the float64 autograd gradient is NaN at 0 * log 0 terms, so compare where
        # it is finite and require ours to be finite everywhere.
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        finite = torch.isfinite(expected_grad)
        assert_close(grad[finite], expected_grad[finite], torch.float32, "gradient")
    else:  # reverse KL is +inf where p_t = 0 < p_s
        assert math.isinf(loss[0].item()) and loss[0] > 0


@pytest.mark.parametrize("shift", [1e4, -1e4])
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5),
                                             ("jsd", 0.5)])
def test_large_logit_shift(shift, divergence, beta, backend):
    student, teacher, labels = make_inputs(5, 300)
    run_both(backend, student + shift, teacher + shift, labels, temperature=4.0,
             divergence=divergence, beta=beta)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "mse"])
def test_nan_input_gives_nan_loss(divergence, backend):
    student, teacher, labels = make_inputs(4, 30)
    student[1, 5] = float("nan")
    teacher[2, 7] = float("nan")
    teacher[3, 0] = float("-inf")  # -inf in the same chunk triggers the guarded recompute
    with torch.no_grad():
        loss = loss_of(backend, student, teacher, labels, temperature=2.0, divergence=divergence,
                       reduction="none")
    assert torch.isnan(loss[1]) and torch.isnan(loss[2])
    assert torch.isfinite(loss[0])


# ----------------------------------------------------------------------------- dtypes and layout
@pytest.mark.parametrize("student_dtype,teacher_dtype", [
    (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float16), (torch.float32, torch.bfloat16),
    (torch.float16, torch.float32)])
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5),
                                             ("jsd", 0.3), ("mse", 0.5)])
def test_low_precision_and_mixed_dtypes(student_dtype, teacher_dtype, divergence, beta, backend):
    student, teacher, labels = make_inputs(7, 1000, dtype=student_dtype,
                                           teacher_dtype=teacher_dtype)
    for reduction in ("batchmean", "none"):
        run_both(backend, student, teacher, make_labels("tensor", labels), reduction=reduction,
                 temperature=2.0, divergence=divergence, beta=beta)


def test_non_contiguous_inputs(backend):
    student_storage = torch.randn(6, 130)
    teacher_storage = torch.randn(120, 6)
    student = student_storage[:, 5:125]  # row stride 130
    teacher = teacher_storage.t()  # last-dim stride 6 (kd_loss makes it contiguous)
    labels = torch.randint(0, 120, (6,))
    assert not student.is_contiguous() and not teacher.is_contiguous()
    for divergence in ("forward_kl", "jsd", "mse"):
        run_both(backend, student, teacher, labels, temperature=2.0, divergence=divergence)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_inplace(dtype, backend):
    student, teacher, labels = make_inputs(9, 500, dtype=dtype)
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        run_both(backend, student, teacher, labels, temperature=4.0, divergence=divergence,
                 grad_inplace=True)


def test_three_dimensional_inputs(backend):
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(2, 5, 64, generator=generator)
    teacher = torch.randn(2, 5, 64, generator=generator)
    labels = torch.randint(0, 64, (2, 5), generator=generator)
    labels[1, 2] = -100
    for reduction in REDUCTIONS:
        loss, _, _, _ = run_both(backend, student, teacher, labels, reduction=reduction,
                                 temperature=2.0)
    assert loss.shape == (2, 5)


def test_chunk_boundaries(monkeypatch, backend):
    """Chunks of 3 rows over 10 rows: a partial last chunk, a chunk with every row ignored, and
    -inf teacher entries (guarded recompute) in one chunk only."""
    num_classes = 200
    monkeypatch.setattr(reference_dense, "CHUNK_ELEMENTS", 3 * num_classes)
    student, teacher, labels = make_inputs(10, num_classes)
    labels[3:6] = -100
    teacher[7, :50] = float("-inf")
    for divergence, beta in [("forward_kl", 0.5), ("jsd", 0.5), ("mse", 0.5)]:
        for reduction in REDUCTIONS:
            run_both(backend, student, teacher, labels, reduction=reduction, temperature=4.0,
                     divergence=divergence, beta=beta)


def test_forward_only_matches(backend):
    student, teacher, labels = make_inputs(8, 300)
    with torch.no_grad():
        loss = loss_of(backend, student, teacher, labels, temperature=4.0)
    expected = reference_kd_loss(student.double(), teacher.double(), labels, temperature=4.0)
    assert_close(loss, expected, "loss", "forward-only loss")


# ----------------------------------------------------------------------------- properties
@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES)
@pytest.mark.parametrize("temperature", [0.5, 4.0])
def test_divergence_of_a_distribution_with_itself_is_zero(divergence, beta, temperature, backend):
    student, _, _ = make_inputs(5, 1000)
    logits = student.to(backend.device).requires_grad_()
    loss = fastkd.kd_loss(logits, logits.detach().clone(), None, temperature=temperature,
                          divergence=divergence, beta=beta, soft_weight=1.0, hard_weight=0.0,
                          reduction="none", backend=backend.name)
    loss.sum().backward()
    assert torch.all(loss.abs() <= 1e-5 * temperature ** 2)
    assert logits.grad.abs().max() <= 1e-6 * max(temperature, 1.0)


@pytest.mark.parametrize("divergence,beta", DIVERGENCE_CASES)
def test_losses_are_nonnegative(divergence, beta, backend):
    student, teacher, labels = make_inputs(64, 100, scale=0.01)  # nearly equal: p_s ~ p_t
    with torch.no_grad():
        loss = loss_of(backend, student, teacher, labels, temperature=1.0, divergence=divergence,
                       beta=beta, reduction="none")
    assert torch.all(loss >= 0)


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5),
                                             ("jsd", 0.3)])
def test_invariant_to_a_constant_per_row(divergence, beta, backend):
    student, teacher, labels = make_inputs(6, 500)
    shift = torch.randn(6, 1) * 50
    options = dict(temperature=4.0, divergence=divergence, beta=beta, reduction="none")
    with torch.no_grad():
        loss = loss_of(backend, student, teacher, labels, **options)
        shifted = loss_of(backend, student + shift, teacher + shift, labels, **options)
    # the shifted inputs are rounded differently (|z| ~ 50 has a 4e-6 ulp): compare loosely
    torch.testing.assert_close(shifted, loss, rtol=1e-4, atol=1e-4)
