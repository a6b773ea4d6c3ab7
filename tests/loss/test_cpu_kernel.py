"""The compiled CPU kernel (kernels/kd_loss_cpu.c through kernels/kd_loss_cpu.py) against the
float64 reference, value and gradient, and bit for bit against itself where it must be exact:
its fp16 / bf16 loads and stores against torch's conversions, its threads against one thread.

test_dense_grid.py runs the backend-wide grid through this kernel too (its ``backend``
fixture), beside the PyTorch reference with the kernel turned off and Triton.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastkd
import fastkd.dispatch as dispatch
from fastkd.kernels import cpu_library, kd_loss_cpu
from fastkd.options import LossOptions
from reference import reference_kd_loss, reference_row_losses

# Without a C compiler at install time the kernel is legitimately absent and these tests are
# skipped; tests/test_install.py checks that it is built wherever a compiler is.
pytestmark = pytest.mark.skipif(
    not kd_loss_cpu.available(),
    reason=f"CPU kernel unavailable: {kd_loss_cpu.unavailable_reason()}")

# (rtol, atol as a fraction of the largest reference magnitude); see test_dense_grid.py
TOLERANCES = {"loss": (1e-4, 2e-6), torch.float32: (1e-4, 5e-5), torch.float16: (2e-3, 1e-4),
              torch.bfloat16: (1e-2, 1e-3)}
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.9), ("mse", 0.5)]


def kernel(student, teacher, labels=None, *, grad=True, teacher_labels=False, temperature=2.0,
           soft_weight=0.6, hard_weight=0.4, divergence="forward_kl", beta=0.5,
           grad_scale=1.0, grad_dtype=None):
    """Row losses and gradient straight from the kernel."""
    grad_buffer = None
    if grad:
        grad_buffer = torch.empty(student.shape, dtype=grad_dtype or student.dtype)
    options = LossOptions(temperature=temperature, soft_weight=soft_weight,
                          hard_weight=hard_weight, divergence=divergence, beta=beta,
                          label_mode=2 if teacher_labels else 0)
    rows = kd_loss_cpu.kd_loss_cpu(student, teacher, labels, options, grad_scale=grad_scale,
                                   grad=grad_buffer)
    return rows, grad_buffer


def assert_close(actual, expected, key, what):
    rtol, atol_fraction = TOLERANCES[key]
    actual, expected = actual.double(), expected.double()
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN pattern differs"
    finite = expected.isfinite()
    assert torch.equal(actual[~finite], expected[~finite]), f"{what}: inf entries differ"
    atol = atol_fraction * max(expected[finite].abs().max().item() if finite.any() else 0.0,
                               1.0 if key == "loss" else 0.0)
    error = (actual[finite] - expected[finite]).abs()
    assert bool((error <= atol + rtol * expected[finite].abs()).all()), (
        f"{what}: max error {error.max().item():.3g}")


def make_inputs(rows, classes, dtype=torch.float32, seed=0, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    student = (torch.randn(rows, classes, generator=generator) * scale).to(dtype)
    teacher = (torch.randn(rows, classes, generator=generator) * scale).to(dtype)
    labels = torch.randint(0, classes, (rows,), generator=generator)
    labels[1::4] = -100
    return student, teacher, labels


# ----------------------------------------------------------------------------- reference grid
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 3.0, 4.0, 2.5])
@pytest.mark.parametrize("num_classes", [1, 7, 8, 9, 100, 1000])
@pytest.mark.parametrize("label_kind", ["none", "tensor", "teacher"])
def test_matches_reference(divergence, beta, temperature, num_classes, label_kind):
    """Every divergence, the temperatures with their own hard-term exponential (T = 1: shared;
    2, 3, 4: a power of the tempered one; else its own), row lengths around the vector width."""
    student, teacher, labels = make_inputs(6, num_classes)
    labels_in = {"none": None, "tensor": labels, "teacher": None}[label_kind]
    reference_labels = {"none": None, "tensor": labels, "teacher": "teacher"}[label_kind]
    rows, grad = kernel(student, teacher, labels_in, teacher_labels=label_kind == "teacher",
                        temperature=temperature, divergence=divergence, beta=beta)
    student_ref = student.double().requires_grad_()
    expected, _ = reference_row_losses(student_ref, teacher.double(), reference_labels,
                                       temperature=temperature, soft_weight=0.6, hard_weight=0.4,
                                       divergence=divergence, beta=beta)
    expected.sum().backward()
    assert_close(rows, expected.detach(), "loss", "row losses")
    assert_close(grad, student_ref.grad, torch.float32, "gradient")


@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_language_model_rows(divergence, beta):
    """Rows of a language model's vocabulary (V = 32000), odd row count."""
    student, teacher, labels = make_inputs(3, 32000, seed=4)
    rows, grad = kernel(student, teacher, labels, temperature=2.0, divergence=divergence,
                        beta=beta)
    student_ref = student.double().requires_grad_()
    expected, _ = reference_row_losses(student_ref, teacher.double(), labels, temperature=2.0,
                                       soft_weight=0.6, hard_weight=0.4, divergence=divergence,
                                       beta=beta)
    expected.sum().backward()
    assert_close(rows, expected.detach(), "loss", "row losses")
    assert_close(grad, student_ref.grad, torch.float32, "gradient")


def assert_same_bits(actual, expected, what):
    """Equal element for element, NaN where NaN (a NaN's payload may differ)."""
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan), f"{what}: NaN pattern differs"
    assert torch.equal(actual[~nan], expected[~nan]), what


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("grad_inplace", [False, True])
def test_through_kd_loss_on_strided_views(reduction, grad_inplace):
    """kd_loss(student[:, :-1], teacher[:, :-1], labels[:, 1:]) reaches the kernel as (B, S, V)
    rows with byte strides, in place too, and matches the reference."""
    generator = torch.Generator().manual_seed(3)
    student_full = torch.randn(3, 9, 37, generator=generator) * 2
    teacher_full = torch.randn(3, 9, 37, generator=generator) * 2
    labels_full = torch.randint(0, 37, (3, 9), generator=generator)
    labels_full[1, 4] = -100
    leaf = student_full.clone().requires_grad_()
    student = leaf.clone()[:, :-1] if grad_inplace else leaf[:, :-1]
    loss = fastkd.kd_loss(student, teacher_full[:, :-1], labels_full[:, 1:], temperature=2.0,
                          reduction=reduction, backend="torch", grad_inplace=grad_inplace)
    upstream = torch.rand_like(loss) + 0.5
    loss.backward(upstream)
    reference_leaf = student_full.double().requires_grad_()
    expected = reference_kd_loss(reference_leaf[:, :-1], teacher_full[:, :-1].double(),
                                 labels_full[:, 1:], temperature=2.0, reduction=reduction)
    expected.backward(upstream.double())
    assert_close(loss.detach(), expected.detach(), "loss", "loss")
    assert_close(leaf.grad, reference_leaf.grad, torch.float32, "gradient")


# ----------------------------------------------------------------------------- dtypes, exactly
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_load_exactly(dtype):
    """A half-precision input gives bit for bit the loss of its float32 conversion, and the
    half gradient is that float32 gradient rounded as torch rounds it."""
    student, teacher, labels = make_inputs(33, 300, dtype=dtype)
    if dtype == torch.float16:   # subnormals, the largest finite value and -inf among them
        student[0, :6] = torch.tensor([6e-8, -3e-6, 65504.0, -65504.0, 1e-5, 0.0]).to(dtype)
        teacher[2, :3] = float("-inf")
    for divergence, beta in DIVERGENCES:
        rows, grad = kernel(student, teacher, labels, divergence=divergence, beta=beta)
        rows32, grad32 = kernel(student.float(), teacher.float(), labels,
                                divergence=divergence, beta=beta)
        assert_same_bits(rows, rows32, divergence)
        assert_same_bits(grad, grad32.to(dtype), divergence)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gradient_stores_round_like_torch(dtype):
    """mse with V = 2, teacher 0, weight 1 makes the gradient equal the student values, so the
    stored gradient is the kernel's float32 -> half conversion of chosen floats: ties, the
    half-subnormal range, the overflow threshold, signed zeros."""
    generator = torch.Generator().manual_seed(0)
    exponents = torch.randint(-30, 17, (4000,), generator=generator).float()
    values = torch.randn(4000, generator=generator) * torch.pow(2.0, exponents)
    special = torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 1e30, 2.0 ** -24,
                            2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -14, 2.0 ** -14 - 2.0 ** -26,
                            1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11, 1.0 + 2.0 ** -8,
                            1.0 + 3 * 2.0 ** -8, 3.3895e38])
    values = torch.cat([values, special])
    student = torch.stack([values, torch.zeros_like(values)], 1)   # (N, 2): class 1 is 0
    _, grad = kernel(student, torch.zeros_like(student), None, temperature=1.0,
                     soft_weight=1.0, hard_weight=0.0, divergence="mse", grad_dtype=dtype)
    expected = student.to(dtype)
    assert torch.equal(grad.view(torch.int16), expected.view(torch.int16))


# ----------------------------------------------------------------------------- special values
def test_special_rows():
    """NaN or +inf in a row the loss reads: NaN loss and gradient; the same row ignored: 0;
    -inf teacher entries: exact and finite; a kept label outside [0, V): NaN (no read)."""
    student, teacher, labels = make_inputs(8, 50)
    labels[:] = 3
    student[0, 5] = float("nan")
    teacher[1, 7] = float("nan")
    student[2, 9] = float("inf")
    student[3, 1] = float("nan")
    labels[3] = -100
    teacher[4, :20] = float("-inf")
    labels[5] = 50
    labels[6] = -7
    for divergence, beta in DIVERGENCES:
        rows, grad = kernel(student, teacher, labels, divergence=divergence, beta=beta)
        for bad in (0, 1, 2, 5, 6):
            assert rows[bad].isnan() and grad[bad].isnan().all(), (divergence, bad)
        assert rows[3] == 0 and torch.equal(grad[3], torch.zeros(50)), divergence
        if divergence in ("forward_kl", "jsd"):   # reverse KL (+inf where p_t = 0 < p_s) and
            # raw-logit MSE (+inf against -inf) are infinite there: their value
            assert rows[4].isfinite() and grad[4].isfinite().all(), divergence
        assert rows[7].isfinite(), divergence


def test_teacher_labels_nan_reaches_a_hard_only_loss():
    """labels="teacher", soft_weight=0: a NaN teacher row still makes the loss NaN."""
    student, teacher, _ = make_inputs(4, 30)
    teacher[2, 4] = float("nan")
    rows, _ = kernel(student, teacher, None, teacher_labels=True, soft_weight=0.0)
    assert rows[2].isnan() and rows[[0, 1, 3]].isfinite().all()


def test_both_weights_zero_is_zero_whatever_the_inputs():
    student, teacher, labels = make_inputs(4, 30)
    student[1, 1] = float("nan")
    rows, grad = kernel(student, teacher, labels, soft_weight=0.0, hard_weight=0.0)
    assert torch.equal(rows, torch.zeros(4)) and torch.equal(grad, torch.zeros(4, 30))


# ----------------------------------------------------------------------------- threads
def test_threads_give_the_one_thread_result(monkeypatch):
    """Rows split over torch's threads give bit for bit the one-thread result."""
    student, teacher, labels = make_inputs(301, 257)
    monkeypatch.setattr(cpu_library, "THREADED_ELEMENTS", 1 << 62)
    one_rows, one_grad = kernel(student, teacher, labels)
    monkeypatch.setattr(cpu_library, "THREADED_ELEMENTS", 1)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rows, grad = kernel(student, teacher, labels)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(rows, one_rows) and torch.equal(grad, one_grad)


# ----------------------------------------------------------------------------- switching off
def test_turned_off_by_environment():
    """FASTKD_CPU_KERNEL=0: the kernel is not loaded, the reason says so, and kd_loss runs on the
    PyTorch reference."""
    script = textwrap.dedent("""
        import torch, fastkd
        from fastkd.kernels import kd_loss_cpu
        assert not kd_loss_cpu.available()
        print(kd_loss_cpu.unavailable_reason())
        student = torch.randn(4, 10, requires_grad=True)
        fastkd.kd_loss(student, torch.randn(4, 10), torch.tensor([1, 2, 3, 4])).backward()
        assert not any("_kd_loss_cpu" in line for line in open("/proc/self/maps"))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "FASTKD_CPU_KERNEL": "0"}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "FASTKD_CPU_KERNEL=0" in result.stdout


def test_one_decision_sends_cpu_rows_to_the_kernel(monkeypatch):
    """fastkd.dispatch is the one choice, for kd_loss's eager path (the whole loss) and for the
    row contract (e.g. the fused-linear path): CPU rows of any length go to the kernel; with it
    turned off, to the PyTorch reference."""
    calls = []

    def counting(student, *args, **kwargs):
        calls.append((kwargs.get("reduction", "none"), student.shape[-1]))
        return kd_loss_cpu.kd_loss_cpu(student, *args, **kwargs)
    counting.reduces = True
    monkeypatch.setattr(dispatch, "compiled_kernel",
                        lambda family: counting if family == "dense" else None)
    for num_classes in (10, 5000):
        student = torch.randn(5, num_classes, requires_grad=True)
        fastkd.kd_loss(student, torch.randn(5, num_classes)).backward()
        fastkd.linear_kd_loss(torch.randn(5, 8), torch.randn(num_classes, 8),
                              torch.randn(5, num_classes))
    assert calls == [("batchmean", 10), ("none", 10), ("batchmean", 5000), ("none", 5000)]
    monkeypatch.setattr(dispatch, "compiled_kernel", lambda family: None)
    from fastkd.reference_dense import kd_dense_torch
    assert dispatch.dispatch("torch", "dense", "cpu") is kd_dense_torch


@pytest.mark.parametrize("grad_inplace", [False, True])
def test_bad_label_raises_before_anything_is_written(grad_inplace):
    """kd_loss on the kernel path: a bad label raises the usual ValueError, and with
    grad_inplace the logits are untouched (the check comes before any row)."""
    student, teacher, labels = make_inputs(6, 20)
    labels[4] = 20
    leaf = student.clone().requires_grad_()
    student_in = leaf.clone() if grad_inplace else leaf
    before = student_in.detach().clone()
    with pytest.raises(ValueError, match=r"labels must be in \[0, 20\).*found 20"):
        fastkd.kd_loss(student_in, teacher, labels, backend="torch", grad_inplace=grad_inplace)
    assert torch.equal(student_in.detach(), before)
    loss = fastkd.kd_loss(student, teacher, labels, backend="torch", validate_labels=False,
                          reduction="none")
    assert loss[4].isnan() and loss[[0, 1, 2, 3, 5]].isfinite().all()
