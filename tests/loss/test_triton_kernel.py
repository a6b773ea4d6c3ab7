"""The fused Triton kernel (kernels/kd_loss.py) against the float64 reference: loss AND gradient,
at Triton's own tolerances, and what only Triton has: block settings, rows per program and
streamed column blocks, strided and batched views, the grid limit, direct-call errors.
test_dense_grid.py runs the backend-wide grid on Triton too.

Runs on CUDA when present, else in Triton's CPU interpreter (see conftest.py), so shapes are
small; the large-V cases use one or two rows.
"""

import pytest
import torch

from fastkd import kd_loss
from fastkd.kernels.kd_loss import MAX_BLOCK_V, block_settings, kd_forward_triton
from fastkd.options import LossOptions
from loss_inputs import assert_close_scaled, make_labels
from reference import reference_kd_loss, reference_row_losses

# The interpreter evaluates masked-off padding lanes too (-inf - -inf); those values are
# discarded by the masked store / where, numpy just warns about them.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]

# Tolerances per student dtype: (loss rtol, gradient rtol); absolute tolerances are the rtol
# times the scale of the expected tensor (max |value|, at least 1 for the loss).
# fp32: fp32 accumulation gives ~1e-6 relative. fp16/bf16: the reference is evaluated on the same
# rounded inputs and the kernel computes in fp32, so the loss keeps fp32 accuracy; the gradient
# is stored in the low dtype and scaled once more by grad_output there: two roundings of
# 2^-11 (fp16) or 2^-8 (bf16) relative.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-5, 2e-3),
    torch.bfloat16: (1e-5, 1.6e-2),
}

# (divergence, beta): jsd at 0 and 1 is forward / reverse KL by convention
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.3),
               ("jsd", 0.5), ("jsd", 1.0), ("mse", 0.5)]


def make_logits(shape, dtype=torch.float32, teacher_dtype=None, seed=0, scale=3.0):
    """Random student / teacher logits (generated in fp32 on the CPU, then cast)."""
    generator = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(shape, generator=generator)).to(dtype)
    teacher = (scale * torch.randn(shape, generator=generator)).to(teacher_dtype or dtype)
    return student, teacher


def check_against_reference(student, teacher, labels, device, reduction="batchmean",
                            grad_inplace=False, seed=2, **options):
    """Run kd_loss(backend="triton") on ``device`` and compare loss and gradient with the float64
    reference evaluated on the same (already rounded) inputs; returns (loss, grad) on the CPU."""
    loss_rtol, grad_rtol = TOLERANCES[student.dtype]
    student_dev = student.to(device).requires_grad_()
    teacher_dev = teacher.to(device)
    labels_dev = labels.to(device) if isinstance(labels, torch.Tensor) else labels
    if grad_inplace:   # the gradient lands in the storage of a non-leaf (as after a layer)
        logits = student_dev * 1.0
        loss = kd_loss(logits, teacher_dev, labels_dev, reduction=reduction, backend="triton",
                       grad_inplace=True, **options)
    else:
        loss = kd_loss(student_dev, teacher_dev, labels_dev, reduction=reduction,
                       backend="triton", **options)
    generator = torch.Generator().manual_seed(seed)
    upstream = torch.rand(loss.shape, generator=generator) + 0.5
    (grad,) = torch.autograd.grad(loss, student_dev, upstream.to(device))
    if grad_inplace:   # the storage holds the gradient for grad_output = 1
        per_row = upstream.unsqueeze(-1) if reduction == "none" else upstream
        assert_close_scaled(logits.detach().cpu().double() * per_row.double(), grad, grad_rtol)

    student_ref = student.double().requires_grad_()
    expected = reference_kd_loss(student_ref, teacher.double(), labels, reduction=reduction,
                                 **options)
    (expected_grad,) = torch.autograd.grad(expected, student_ref, upstream.double())
    assert loss.dtype == torch.float32 and loss.shape == expected.shape
    assert grad.dtype == student.dtype
    assert_close_scaled(loss, expected, loss_rtol, floor=1.0)
    assert_close_scaled(grad, expected_grad, grad_rtol)
    return loss.detach().cpu(), grad.cpu()


# ----------------------------------------------------------------------------- math coverage
@pytest.mark.parametrize("divergence, beta", DIVERGENCES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("num_classes", [7, 1000])
def test_divergences_and_temperatures(divergence, beta, temperature, num_classes, kernel_device):
    student, teacher = make_logits((3, num_classes))
    labels = make_labels((3,), num_classes, ignored=[1])
    check_against_reference(student, teacher, labels, kernel_device, reduction="none",
                            temperature=temperature, divergence=divergence, beta=beta,
                            soft_weight=0.7, hard_weight=0.4)


@pytest.mark.parametrize("divergence, beta", DIVERGENCES)
def test_single_class(divergence, beta, kernel_device):
    """V = 1: every softmax is 1, so only mse contributes; loss and gradient otherwise 0."""
    student, teacher = make_logits((4, 1))
    labels = torch.zeros(4, dtype=torch.long)
    loss, grad = check_against_reference(student, teacher, labels, kernel_device,
                                         reduction="none", temperature=2.0,
                                         divergence=divergence, beta=beta)
    if divergence != "mse":
        assert loss.abs().max() < 1e-6 and grad.abs().max() < 1e-6


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("label_mode", ["none", "some_ignored", "all_ignored", "teacher"])
def test_reductions_and_label_modes(reduction, label_mode, kernel_device):
    rows, num_classes = 5, 33
    student, teacher = make_logits((rows, num_classes))
    labels = {"none": None, "teacher": "teacher",
              "some_ignored": make_labels((rows,), num_classes, ignored=[0, 3]),
              "all_ignored": make_labels((rows,), num_classes, ignored=range(rows))}[label_mode]
    loss, grad = check_against_reference(student, teacher, labels, kernel_device,
                                         reduction=reduction, temperature=2.0)
    if label_mode == "all_ignored":
        assert torch.all(loss == 0) and torch.all(grad == 0)
    if label_mode == "some_ignored":
        assert torch.all(grad[[0, 3]] == 0)
        if reduction == "none":
            assert torch.all(loss[[0, 3]] == 0)


@pytest.mark.parametrize("divergence, beta, labels", [
    ("forward_kl", 0.5, "teacher"), ("jsd", 0.3, "teacher"), ("mse", 0.5, None),
    ("forward_kl", 0.5, None),
])
@pytest.mark.parametrize("num_classes, rows", [(32001, 2), (150001, 1), (262144, 1)])
def test_large_vocabulary(divergence, beta, labels, num_classes, rows, kernel_device):
    """Many BLOCK_V blocks per row; a ragged last block (V not a power of two) or none."""
    student, teacher = make_logits((rows, num_classes))
    check_against_reference(student, teacher, labels, kernel_device, reduction="sum",
                            temperature=4.0, divergence=divergence, beta=beta)


# ----------------------------------------------------------------------------- edges
@pytest.mark.parametrize("divergence, beta, labels", [
    ("forward_kl", 0.5, "teacher"), ("jsd", 0.5, "teacher"), ("jsd", 0.3, "tensor"),
    ("forward_kl", 0.5, "tensor"),
])
def test_teacher_minus_inf_is_probability_zero(divergence, beta, labels, kernel_device):
    rows, num_classes = 4, 50
    student, teacher = make_logits((rows, num_classes))
    generator = torch.Generator().manual_seed(5)
    masked = torch.rand(rows, num_classes, generator=generator) < 0.4
    masked[:, 7] = False
    teacher[masked] = float("-inf")
    if labels == "tensor":
        labels = make_labels((rows,), num_classes, ignored=[2])
    loss, grad = check_against_reference(student, teacher, labels, kernel_device,
                                         reduction="none", temperature=2.0,
                                         divergence=divergence, beta=beta)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


def test_student_and_teacher_minus_inf_together(kernel_device):
    """0 * log 0 = 0 where both are -inf (forward KL: the reference's gradient is defined)."""
    student, teacher = make_logits((3, 40))
    student[:, ::3] = float("-inf")
    teacher[:, ::3] = float("-inf")
    loss, grad = check_against_reference(student, teacher, None, kernel_device,
                                         reduction="none", temperature=2.0)
    assert torch.isfinite(loss).all() and torch.all(grad[:, ::3] == 0)


def test_reverse_kl_with_teacher_zero_is_infinite(kernel_device):
    """p_s > 0 where p_t = 0 makes KL(p_s || p_t) infinite, as in the reference."""
    student, teacher = make_logits((2, 20))
    teacher[:, 3] = float("-inf")
    loss = kd_loss(student.to(kernel_device), teacher.to(kernel_device), None,
                   divergence="reverse_kl", reduction="none", backend="triton")
    expected = reference_kd_loss(student, teacher, None, divergence="reverse_kl",
                                 reduction="none")
    assert torch.isinf(expected).all() and torch.equal(loss.cpu(), expected.float())


@pytest.mark.parametrize("divergence, beta", [("forward_kl", 0.5), ("reverse_kl", 0.5),
                                              ("jsd", 0.3), ("mse", 0.5)])
@pytest.mark.parametrize("student_shift, teacher_shift", [(1e4, 1e4), (-1e4, -1e4), (1e4, -1e4)])
def test_shifted_logits(divergence, beta, student_shift, teacher_shift, kernel_device):
    """Softmax is shift invariant; all differences are taken inside a row, so fp32 keeps its
    accuracy even when student and teacher are shifted in opposite directions."""
    student, teacher = make_logits((3, 300))
    student, teacher = student + student_shift, teacher + teacher_shift
    labels = make_labels((3,), 300)
    check_against_reference(student, teacher, labels, kernel_device, reduction="none",
                            temperature=2.0, divergence=divergence, beta=beta)


@pytest.mark.parametrize("divergence, beta", [("forward_kl", 0.5), ("reverse_kl", 0.5),
                                              ("jsd", 0.3), ("mse", 0.5)])
def test_nan_input_gives_nan_loss(divergence, beta, kernel_device):
    """A NaN anywhere in a kept row's inputs makes that row's loss NaN, wherever it sits (at the
    row maximum, where the teacher is -inf); ignored rows stay 0 and clean rows stay exact."""
    rows, num_classes = 6, 40
    student, teacher = make_logits((rows, num_classes))
    student[0, 5] = float("nan")
    teacher[1, 9] = float("nan")
    teacher[2, 11] = float("-inf")
    student[2, 11] = float("nan")          # hidden behind p_t = 0 unless handled
    student[3, 0] = float("nan")
    student[3, 1:] = -1e3                  # the NaN is where the max would be
    student[4, 3] = float("nan")           # ignored row
    labels = make_labels((rows,), num_classes, ignored=[4])
    loss = kd_loss(student.to(kernel_device), teacher.to(kernel_device), labels.to(kernel_device),
                   divergence=divergence, beta=beta, reduction="none", backend="triton").cpu()
    assert torch.isnan(loss[:4]).all(), loss
    assert loss[4] == 0
    expected = reference_kd_loss(student[5:], teacher[5:], labels[5:], divergence=divergence,
                                 beta=beta, reduction="none")
    assert_close_scaled(loss[5:], expected, TOLERANCES[torch.float32][0], floor=1.0)
    # one term alone: NaN reaches the soft-only and the hard-only loss too
    soft_only = kd_loss(student[:2].to(kernel_device), teacher[:2].to(kernel_device), None,
                        divergence=divergence, beta=beta, hard_weight=0.0, reduction="none",
                        backend="triton")
    assert torch.isnan(soft_only).all()
    hard_only = kd_loss(student[[0, 3]].to(kernel_device), teacher[[0, 3]].to(kernel_device),
                        labels[[0, 3]].to(kernel_device), soft_weight=0.0, reduction="none",
                        backend="triton")
    assert torch.isnan(hard_only).all()


@pytest.mark.parametrize("soft_weight, hard_weight", [(0.0, 1.0), (1.0, 0.0), (0.0, 0.0)])
def test_zero_weights(soft_weight, hard_weight, kernel_device):
    student, teacher = make_logits((3, 64))
    labels = make_labels((3,), 64, ignored=[1])
    loss, grad = check_against_reference(student, teacher, labels, kernel_device,
                                         reduction="none", temperature=2.0,
                                         soft_weight=soft_weight, hard_weight=hard_weight)
    if soft_weight == hard_weight == 0.0:
        assert torch.all(loss == 0) and torch.all(grad == 0)


# ----------------------------------------------------------------------------- dtypes and layouts
@pytest.mark.parametrize("student_dtype, teacher_dtype", [
    (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float16), (torch.float32, torch.bfloat16),
])
@pytest.mark.parametrize("divergence, beta", [("forward_kl", 0.5), ("jsd", 0.3)])
def test_low_precision_and_mixed_dtypes(student_dtype, teacher_dtype, divergence, beta,
                                        kernel_device):
    student, teacher = make_logits((4, 1000), student_dtype, teacher_dtype)
    labels = make_labels((4,), 1000, ignored=[2])
    check_against_reference(student, teacher, labels, kernel_device, reduction="batchmean",
                            temperature=2.0, divergence=divergence, beta=beta)


def test_row_strided_views(kernel_device):
    """Row stride > V (a slice of a wider tensor) for student and teacher, different strides."""
    wide_student, wide_teacher = make_logits((4, 120))
    student, teacher = wide_student[:, 10:110], wide_teacher[:, 3:103]
    assert student.stride(0) == 120 and not student.is_contiguous()
    labels = make_labels((4,), 100)
    check_against_reference(student, teacher, labels, kernel_device, reduction="none",
                            temperature=2.0, divergence="reverse_kl")


def test_transposed_leading_dims_3d(kernel_device):
    """(batch, seq, V) inputs made by transposing a (seq, batch, V) tensor, 3-D labels."""
    seq_first_student, seq_first_teacher = make_logits((5, 2, 64))
    student = seq_first_student.transpose(0, 1)
    teacher = seq_first_teacher.transpose(0, 1)
    labels = make_labels((2, 5), 64, ignored=[3, 7])
    loss, _ = check_against_reference(student, teacher, labels, kernel_device, reduction="none",
                                      temperature=2.0, divergence="jsd", beta=0.3)
    assert loss.shape == (2, 5)


def test_3d_batchmean(kernel_device):
    student, teacher = make_logits((2, 3, 77))
    labels = make_labels((2, 3), 77, ignored=[0])
    check_against_reference(student, teacher, labels, kernel_device, temperature=4.0)


@pytest.mark.parametrize("divergence, beta", [("forward_kl", 0.5), ("reverse_kl", 0.5),
                                              ("jsd", 0.3), ("mse", 0.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_inplace(divergence, beta, dtype, kernel_device):
    student, teacher = make_logits((3, 300), dtype)
    labels = make_labels((3,), 300, ignored=[1])
    check_against_reference(student, teacher, labels, kernel_device, grad_inplace=True,
                            temperature=2.0, divergence=divergence, beta=beta)


def test_grad_inplace_into_strided_rows_keeps_padding(kernel_device):
    """In place into a row-strided view: the strides reach the kernel (no copy), and the columns
    outside the view are untouched."""
    wide = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)).to(kernel_device)
    teacher = torch.randn(3, 40, generator=torch.Generator().manual_seed(1)).to(kernel_device)
    labels = torch.tensor([4, 0, 39], device=kernel_device)
    padding = wide[:, 40:].clone()
    view = wide[:, :40]
    student_ref = view.detach().double().cpu().requires_grad_()
    expected = reference_kd_loss(student_ref, teacher.double().cpu(), labels.cpu(),
                                 temperature=2.0)
    (expected_grad,) = torch.autograd.grad(expected, student_ref)
    grad = kd_forward_triton(view, teacher, labels, LossOptions(temperature=2.0),
                             grad_scale=1 / 3, grad=view)
    assert grad.shape == (3,)
    assert_close_scaled(wide[:, :40], expected_grad, 1e-5)
    assert torch.equal(wide[:, 40:], padding)


# ----------------------------------------------------------------------------- streaming logic
def _direct_call(student, teacher, labels, divergence, beta, block_v, grad=True,
                 teacher_labels=False, temperature=2.0, grad_scale=0.5, block_rows=None):
    buffer = torch.full_like(student, float("nan")) if grad else None
    options = LossOptions(temperature=temperature, soft_weight=0.6, hard_weight=0.3,
                          divergence=divergence, beta=beta, label_mode=2 if teacher_labels else 0)
    row_loss = kd_forward_triton(student, teacher, labels, options, grad_scale=grad_scale,
                                 grad=buffer, block_v=block_v, block_rows=block_rows)
    return row_loss, buffer


@pytest.mark.parametrize("divergence, beta", [("forward_kl", 0.5), ("reverse_kl", 0.5),
                                              ("jsd", 0.3), ("mse", 0.5)])
def test_streaming_blocks_with_moving_maxima(divergence, beta, kernel_device):
    """block_v = 64 over V = 1000: the running maxima move up across blocks (ramps), the first
    blocks of a row can be all -inf (in both logits), and the teacher maximum is tied across
    blocks (the first one wins)."""
    rows, num_classes = 4, 1000
    student, teacher = make_logits((rows, num_classes))
    ramp = torch.linspace(0.0, 30.0, num_classes)
    student[0] += ramp                      # student max keeps moving
    teacher[1] += ramp                      # teacher max keeps moving
    student[2] -= ramp
    teacher[2] += ramp
    teacher[3, 100] = teacher[3, 900] = 50.0  # tie in different blocks
    live = torch.ones(rows, num_classes, dtype=torch.bool)
    if divergence != "mse":
        live[1, :130] = False                 # > two whole blocks with nothing in either row
        student[~live] = float("-inf")
        teacher[~live] = float("-inf")
    row_loss, grad = _direct_call(student.to(kernel_device), teacher.to(kernel_device), None,
                                  divergence, beta, block_v=64, teacher_labels=True)
    # Columns that are -inf in both rows carry no probability: the reference runs on the live
    # columns only (its autograd gives NaN at 0 * log 0 points) and their true gradient is 0.
    expected = torch.zeros(rows, dtype=torch.float64)
    expected_grad = torch.zeros(rows, num_classes, dtype=torch.float64)
    for row in range(rows):
        student_ref = student[row:row + 1, live[row]].double().requires_grad_()
        row_expected, _ = reference_row_losses(
            student_ref, teacher[row:row + 1, live[row]].double(), "teacher", temperature=2.0,
            soft_weight=0.6, hard_weight=0.3, divergence=divergence, beta=beta)
        (row_grad,) = torch.autograd.grad(row_expected.sum() * 0.5, student_ref)
        expected[row] = row_expected.item()
        expected_grad[row, live[row]] = row_grad[0]
    assert_close_scaled(row_loss, expected, 1e-5, floor=1.0)
    assert_close_scaled(grad, expected_grad, 1e-5)
    # no gradient wanted: same losses, the buffer is never touched
    row_loss_only, untouched = _direct_call(student.to(kernel_device), teacher.to(kernel_device),
                                            None, divergence, beta, block_v=64,
                                            teacher_labels=True, grad=False)
    assert untouched is None
    assert torch.equal(row_loss_only, row_loss)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_empty_batch(reduction, kernel_device):
    student, teacher = make_logits((0, 16))
    check_against_reference(student, teacher, torch.zeros(0, dtype=torch.long), kernel_device,
                            reduction=reduction)


def test_block_settings():
    # (rows per program, BLOCK_V, warps): short rows share a program, long rows stream
    assert block_settings(1) == (32, 1, 4)
    assert block_settings(10) == (32, 16, 4)
    assert block_settings(100) == (4, 128, 4)
    assert block_settings(300) == (1, 512, 1)
    assert block_settings(1000) == (1, 1024, 2)
    assert block_settings(32001) == (1, MAX_BLOCK_V, 8)
    assert block_settings(262144) == (1, MAX_BLOCK_V, 8)


@pytest.mark.parametrize("divergence, beta", DIVERGENCES)
@pytest.mark.parametrize("label_mode", ["tensor", "teacher", "none"])
def test_many_short_rows_per_program(divergence, beta, label_mode, kernel_device):
    """V = 10 packs 32 rows into a program: 75 rows are two full programs and a ragged third,
    with ignored rows scattered through all of them."""
    rows, num_classes = 75, 10
    student, teacher = make_logits((rows, num_classes), seed=7)
    labels = {"tensor": make_labels((rows,), num_classes, ignored=range(0, rows, 7)),
              "teacher": "teacher", "none": None}[label_mode]
    check_against_reference(student, teacher, labels, kernel_device, reduction="none",
                            temperature=2.0, divergence=divergence, beta=beta)


@pytest.mark.parametrize("block_rows, block_v", [(4, 16), (8, 64), (2, 32)])
def test_row_tiles_with_streamed_columns(block_rows, block_v, kernel_device):
    """Several rows per program *and* several column blocks per row (forced tile sizes): the
    per-row running maxima and the teacher argmax stay per row."""
    rows, num_classes = 11, 100
    student, teacher = make_logits((rows, num_classes), seed=8)
    student[3] += torch.linspace(0.0, 20.0, num_classes)   # a moving maximum in one row only
    teacher[5, 10] = teacher[5, 90] = 40.0                  # a tie across blocks
    labels = make_labels((rows,), num_classes, ignored=[2, 9])
    for divergence, beta in [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)]:
        for label_mode in ("teacher", "tensor"):
            row_loss, grad = _direct_call(
                student.to(kernel_device), teacher.to(kernel_device),
                labels.to(kernel_device) if label_mode == "tensor" else None, divergence, beta,
                block_v=block_v, block_rows=block_rows, teacher_labels=label_mode == "teacher")
            student_ref = student.double().requires_grad_()
            expected, _ = reference_row_losses(
                student_ref, teacher.double(), "teacher" if label_mode == "teacher" else labels,
                temperature=2.0, soft_weight=0.6, hard_weight=0.3, divergence=divergence,
                beta=beta)
            (expected_grad,) = torch.autograd.grad(expected.sum() * 0.5, student_ref)
            assert_close_scaled(row_loss, expected, 1e-5, floor=1.0)
            assert_close_scaled(grad, expected_grad, 1e-5)


def test_strided_3d_views_with_row_tiles(kernel_device):
    """(B, S, V) views (``[:, :-1]``) with several rows per program: rows of one program span
    two batch entries, so every row needs its own (b, s) address."""
    student_full, teacher_full = make_logits((3, 7, 20), seed=9)
    student, teacher = student_full[:, 1:], teacher_full[:, :-1]
    labels = make_labels((3, 6), 20, ignored=[4])
    row_loss, grad = _direct_call(student.to(kernel_device), teacher.to(kernel_device),
                                  labels.reshape(-1).to(kernel_device), "forward_kl", 0.5,
                                  block_v=None)
    assert grad.shape == student.shape
    student_ref = student.reshape(-1, 20).double().requires_grad_()
    expected, _ = reference_row_losses(student_ref, teacher.reshape(-1, 20).double(),
                                       labels.reshape(-1), temperature=2.0, soft_weight=0.6,
                                       hard_weight=0.3)
    (expected_grad,) = torch.autograd.grad(expected.sum() * 0.5, student_ref)
    assert_close_scaled(row_loss, expected, 1e-5, floor=1.0)
    assert_close_scaled(grad.reshape(-1, 20), expected_grad, 1e-5)


def test_direct_call_rejects_bad_buffers(kernel_device):
    student, teacher = make_logits((2, 8))
    soft_only = LossOptions(soft_weight=1.0, hard_weight=0.0)
    with pytest.raises(ValueError, match="grad must be a"):
        kd_forward_triton(student, teacher, None, soft_only, grad=torch.empty(2, 8).half())
    with pytest.raises(ValueError, match="last-dim stride 1"):
        kd_forward_triton(student.t(), teacher.t(), None, soft_only, grad=None)


# Ahead-of-time compilation for sm_80 / sm_90 (register spills included): test_kernel_aot.py.


# ----------------------------------------------------------------------------- vs backend="torch"
@pytest.mark.parametrize("divergence, beta", [("forward_kl", 0.5), ("jsd", 0.3)])
def test_matches_torch_backend(divergence, beta, kernel_device):
    student, teacher = make_logits((4, 257))
    labels = make_labels((4,), 257, ignored=[1])
    results = []
    for backend in ("triton", "torch"):
        student_dev = student.to(kernel_device).requires_grad_()
        loss = kd_loss(student_dev, teacher.to(kernel_device), labels.to(kernel_device),
                       temperature=2.0, divergence=divergence, beta=beta, backend=backend)
        (grad,) = torch.autograd.grad(loss, student_dev)
        results.append((loss, grad))
    assert_close_scaled(results[0][0], results[1][0], 1e-5, floor=1.0)
    assert_close_scaled(results[0][1], results[1][1], 1e-5)


def test_batches_beyond_the_grid_limit_are_launched_in_slices(monkeypatch, kernel_device):
    """A (B, S, V) view runs on a (row blocks, B) grid whose second dim holds 65535 programs;
    larger B is launched in slices (here the limit is lowered to 2 so B = 5 needs three)."""
    import fastkd.kernels.kd_loss as dense
    monkeypatch.setattr(dense, "_MAX_GRID_Y", 2)
    student_full, teacher = make_logits((5, 4, 12), seed=10)
    student = student_full[:, 1:]
    labels = make_labels((5, 3), 12, ignored=[7])
    loss, _ = check_against_reference(student, teacher[:, 1:], labels, kernel_device,
                                      reduction="none", temperature=2.0)
    assert loss.shape == (5, 3)
