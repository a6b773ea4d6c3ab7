"""The loss engine around the backends (fastkd/loss.py): strided views without copies, label
dtypes, grad_inplace safety, NaN and overflow edge cases, the supported temperature range, host
syncs and what the first call imports. Every case runs on both backends (Triton in its CPU
interpreter without a GPU) against the float64 reference."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastkd.autograd
import fastkd.loss as loss_module
from fastkd.rows import row_views
from fastkd import kd_loss
from reference import reference_kd_loss

pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]
BACKENDS = ("torch", "triton")


def _device(backend, kernel_device):
    return kernel_device if backend == "triton" else "cpu"


def _assert_matches_reference(student, teacher, labels, backend, device, reduction="batchmean",
                              rtol=1e-5, **options):
    """Loss and gradient of kd_loss on ``student`` (which may be a view) vs float64."""
    leaf = student.detach().clone().to(device).requires_grad_()
    loss = kd_loss(leaf, teacher.to(device), labels.to(device) if labels is not None else None,
                   backend=backend, reduction=reduction, **options)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    reference_labels = labels.long() if labels is not None else None
    student_ref = student.detach().double().requires_grad_()
    expected = reference_kd_loss(student_ref, teacher.double(), reference_labels,
                                 reduction=reduction, **options)
    (expected_grad,) = torch.autograd.grad(expected.sum(), student_ref)
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(loss.detach().double().cpu(), expected, rtol=rtol,
                               atol=rtol * scale)
    grad_scale = expected_grad.abs().max().item()
    torch.testing.assert_close(grad.double().cpu(), expected_grad, rtol=rtol,
                               atol=rtol * grad_scale + 1e-12)


# ----------------------------------------------------------------------------- strided views
class LargeOutputs(TorchDispatchMode):
    """Records every op that returns new memory (not a view of an input) of at least ``limit``
    elements."""

    def __init__(self, limit):
        super().__init__()
        self.limit, self.ops = limit, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        storages = {arg.untyped_storage().data_ptr() for arg in inputs
                    if isinstance(arg, torch.Tensor)}
        outs = out if isinstance(out, (tuple, list)) else [out]
        if any(isinstance(o, torch.Tensor) and o.numel() >= self.limit
               and o.untyped_storage().data_ptr() not in storages for o in outs):
            self.ops.append(str(func))
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_shifted_views_are_read_in_place(backend, kernel_device):
    """``kd_loss(student[:, :-1], teacher[:, :-1], labels[:, 1:])`` (next-token alignment):
    right numbers, and the forward makes no logits-sized tensor except the gradient buffer."""
    device = _device(backend, kernel_device)
    generator = torch.Generator().manual_seed(0)
    batch, seq, vocab = 3, 9, 40
    student_full = torch.randn(batch, seq, vocab, generator=generator).to(device)
    teacher_full = torch.randn(batch, seq, vocab, generator=generator).to(device)
    labels_full = torch.randint(0, vocab, (batch, seq), generator=generator).to(device)
    labels_full[1, 4] = -100
    student, teacher = student_full[:, :-1], teacher_full[:, :-1]
    labels = labels_full[:, 1:]
    assert not student.is_contiguous()
    _assert_matches_reference(student.cpu(), teacher.cpu(), labels.cpu(), backend, device,
                              temperature=2.0)

    leaf = student_full.clone().requires_grad_()
    view = leaf[:, :-1]
    with LargeOutputs(view.numel()) as mode:
        loss = kd_loss(view, teacher, labels, temperature=2.0, backend=backend)
    assert all("empty" in op for op in mode.ops), mode.ops  # the gradient buffer only
    loss.backward()
    assert torch.all(leaf.grad[:, -1] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_transposed_and_sliced_leading_dims(backend, kernel_device):
    """(seq, batch, V) transposed to (batch, seq, V), then sliced: two strided leading dims."""
    device = _device(backend, kernel_device)
    generator = torch.Generator().manual_seed(1)
    seq_first = torch.randn(7, 2, 33, generator=generator)
    student = seq_first.transpose(0, 1)[:, 1:]
    teacher = torch.randn(2, 6, 33, generator=generator)
    labels = torch.randint(0, 33, (2, 6), generator=generator)
    for reduction in ("none", "sum"):
        _assert_matches_reference(student, teacher, labels, backend, device, reduction=reduction,
                                  temperature=3.0, divergence="jsd", beta=0.3)


def test_row_views_copy_nothing_for_common_layouts():
    student = torch.randn(4, 10, 16)
    views = [student[:, :-1], student[:, 1:], student.transpose(0, 1), student[1:3, ::2],
             student[:, :, :8], student.unsqueeze(0)[:, :, :-1]]
    for view in views:
        rows, _ = row_views(view, view)
        assert rows.data_ptr() == view.data_ptr() and rows.dim() in (2, 3), view.stride()
        assert rows.shape[-1] == view.shape[-1]


# ----------------------------------------------------------------------------- label dtypes
@pytest.mark.parametrize("backend", BACKENDS)
def test_uint8_labels_out_of_range_are_refused(backend, kernel_device):
    """uint8 label 156 with V = 10 is refused by every backend (an unchecked Triton kernel
    would read out of bounds)."""
    device = _device(backend, kernel_device)
    student, teacher = torch.randn(4, 10).to(device), torch.randn(4, 10).to(device)
    labels = torch.tensor([156, 1, 2, 3], dtype=torch.uint8).to(device)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\).*found 156"):
        kd_loss(student, teacher, labels, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, vocab, values", [
    (torch.uint8, 300, [255, 0, 17, 299 - 44]),      # valid uint8 with V = 300
    (torch.int16, 40000, [32000, -100, 5, 39999 - 7999]),  # int16 with V = 40000
    (torch.uint16, 70000, [65535, 3, 0, 12]),
    (torch.uint32, 9, [8, 0, 1, 2]),
    (torch.int32, 9, [8, -100, 1, 2]),
])
def test_small_integer_label_dtypes(backend, dtype, vocab, values, kernel_device):
    device = _device(backend, kernel_device)
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(4, vocab, generator=generator)
    teacher = torch.randn(4, vocab, generator=generator)
    labels = torch.tensor(values).to(dtype)
    _assert_matches_reference(student, teacher, labels, backend, device, reduction="none",
                              temperature=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int16_ignore_index_does_not_wrap(backend, kernel_device):
    """-100 in int8 stays -100 (ignored) and 200 in uint8 is not -56."""
    device = _device(backend, kernel_device)
    student, teacher = torch.randn(3, 250), torch.randn(3, 250)
    _assert_matches_reference(student, teacher, torch.tensor([-100, 3, 100], dtype=torch.int8),
                              backend, device, reduction="none")
    _assert_matches_reference(student, teacher, torch.tensor([200, 3, 249], dtype=torch.uint8),
                              backend, device, reduction="none")


# ----------------------------------------------------------------------------- grad_inplace safety
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_inplace_refuses_expanded_student(backend, kernel_device):
    device = _device(backend, kernel_device)
    row = torch.randn(1, 20, device=device, requires_grad=True)
    student = (row * 1.0).expand(4, 20)   # four rows, one row of memory
    teacher = torch.randn(4, 20, device=device)
    with pytest.raises(ValueError, match="grad_inplace=True needs student_logits whose elements"):
        kd_loss(student, teacher, None, backend=backend, grad_inplace=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_inplace_refuses_teacher_sharing_student_memory(backend, kernel_device):
    """teacher row i = student row i - 1: writing the gradient of row i - 1 would change what
    the teacher of row i reads, so the overlap is refused."""
    device = _device(backend, kernel_device)
    leaf = torch.randn(5, 30, device=device, requires_grad=True)
    logits = leaf * 1.0
    student, teacher = logits[1:], logits[:-1].detach()
    with pytest.raises(ValueError, match="would overwrite teacher_logits"):
        kd_loss(student, teacher, None, backend=backend, grad_inplace=True)
    # without grad_inplace the same inputs are fine
    _assert_matches_reference(student.detach(), teacher, None, backend, device)


def test_grad_inplace_refuses_a_leaf():
    """A parameter (or an input made with requires_grad=True) keeps its values: torch refuses
    in-place ops on such leaves, and so does grad_inplace, instead of leaving the gradient in
    the parameter."""
    parameter = torch.nn.Parameter(torch.randn(2, 5))
    before = parameter.detach().clone()
    with pytest.raises(ValueError, match="grad_inplace=True would overwrite a leaf tensor"):
        kd_loss(parameter, torch.randn(2, 5), grad_inplace=True)
    assert torch.equal(parameter.detach(), before)


# ----------------------------------------------------------------------------- differentiable once
def test_double_backward_and_forward_ad_raise_instead_of_a_silent_zero():
    """The gradient is made in the forward pass, so it has no graph: create_graph=True (a
    gradient penalty) and forward-mode AD raise rather than treat the second derivative as 0."""
    student = torch.randn(4, 7, requires_grad=True)
    teacher = torch.randn(4, 7)
    with pytest.raises(RuntimeError, match="fastkd losses are differentiable once"):
        torch.autograd.grad(kd_loss(student, teacher), student, create_graph=True)
    (grad,) = torch.autograd.grad(kd_loss(student, teacher), student)   # once is fine
    assert grad.shape == student.shape
    import torch.autograd.forward_ad as forward_ad
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(torch.randn(4, 7), torch.randn(4, 7))
        with pytest.raises(RuntimeError, match="forward-mode AD are not supported"):
            kd_loss(dual, teacher)


def test_fake_tensors_never_reach_the_compiled_kernel():
    """Under FakeTensorMode (shape tracing) the loss takes the PyTorch path: fake shapes out,
    never a fake data pointer handed to the C kernel (which would crash the process)."""
    code = textwrap.dedent("""
        import torch, fastkd
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode():
            student, teacher = torch.randn(4, 7), torch.randn(4, 7)
            print("dense", tuple(fastkd.kd_loss(student, teacher, reduction="none").shape))
            hidden, weight = torch.randn(4, 8), torch.randn(7, 8)
            print("linear", tuple(fastkd.linear_kd_loss(hidden, weight, teacher,
                                                        reduction="none").shape))
            target = fastkd.TopKLogits(torch.randn(4, 3), torch.zeros(4, 3, dtype=torch.int32),
                                       torch.zeros(4), 1.0)
            try:
                fastkd.kd_loss(student, target)
            except Exception as error:   # a data-dependent check, as for torch's own ops
                print("sparse", type(error).__name__)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dense (4,)" in result.stdout and "linear (4,)" in result.stdout
    assert "data pointer of FakeTensor" not in result.stderr, result.stderr


# ----------------------------------------------------------------------------- NaN, overflow, T
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_teacher_row_with_teacher_labels_and_no_soft_term(backend, kernel_device):
    """labels="teacher", soft_weight=0, a NaN in a teacher row: every backend gives NaN for
    that row (not a finite loss from a label picked among NaNs) and leaves the others."""
    device = _device(backend, kernel_device)
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(3, 12, generator=generator).to(device).requires_grad_()
    teacher = torch.randn(3, 12, generator=generator)
    teacher[1, 4] = float("nan")
    loss = kd_loss(student, teacher.to(device), "teacher", soft_weight=0.0, hard_weight=1.0,
                   reduction="none", backend=backend)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    loss.sum().backward()
    assert torch.isnan(student.grad[1]).all() and torch.isfinite(student.grad[[0, 2]]).all()
    batch = kd_loss(student, teacher.to(device), "teacher", soft_weight=0.0, backend=backend)
    assert torch.isnan(batch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jsd_does_not_overflow_on_finite_inputs(backend, kernel_device):
    """student [[0, -200]], teacher [[0, -103.5]]: every backend matches the float64 reference
    (a finite loss; an overflowing mixture term would give +inf)."""
    device = _device(backend, kernel_device)
    student = torch.tensor([[0.0, -200.0], [0.0, -150.0]])
    teacher = torch.tensor([[0.0, -103.5], [0.0, -104.0]])
    for beta in (0.5, 0.1):
        _assert_matches_reference(student, teacher, None, backend, device, reduction="none",
                                  divergence="jsd", beta=beta)


@pytest.mark.parametrize("temperature", [1e3, 1e4, 100.5])
def test_temperature_above_supported_range_is_refused(temperature):
    student, teacher = torch.randn(2, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match="temperature must be <= 100"):
        kd_loss(student, teacher, None, temperature=temperature)
    with pytest.raises(ValueError, match="temperature must be <= 100"):
        loss_module.KDLoss(temperature=temperature)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_largest_supported_temperature_is_accurate(backend, divergence, kernel_device):
    device = _device(backend, kernel_device)
    generator = torch.Generator().manual_seed(4)
    student = 3 * torch.randn(4, 1000, generator=generator)
    teacher = 3 * torch.randn(4, 1000, generator=generator)
    _assert_matches_reference(student, teacher, None, backend, device, rtol=1e-3,
                              temperature=100.0, divergence=divergence, soft_weight=1.0,
                              hard_weight=0.0)


# ----------------------------------------------------------------------------- host syncs
class CountSyncs(TorchDispatchMode):
    """Counts host reads of tensor values (``.item()``, ``bool(t)``; fastkd reads no value any
    other way on a device, e.g. no ``.tolist()``, which this mode would not see)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def cpu_counts_as_device(monkeypatch):
    """Run the code paths meant for a GPU (deferred label check, device-side counts) on CPU."""
    monkeypatch.setattr(fastkd.autograd, "SYNCING_DEVICES", {"cuda", "cpu"})


def _sync_inputs(vocab=16):
    generator = torch.Generator().manual_seed(5)
    student = torch.randn(6, vocab, generator=generator).requires_grad_()
    teacher = torch.randn(6, vocab, generator=generator)
    labels = torch.randint(0, vocab, (6,), generator=generator)
    labels[2] = -100
    return student, teacher, labels


def test_triton_step_syncs_once_by_default_and_never_without_validation(cpu_counts_as_device):
    student, teacher, labels = _sync_inputs()
    for validate, expected_syncs in ((True, 1), (False, 0)):
        student.grad = None
        with CountSyncs() as counter:
            loss = kd_loss(student, teacher, labels, temperature=2.0, backend="triton",
                           validate_labels=validate)
            loss.backward()
        assert counter.count == expected_syncs, (validate, counter.count)
        reference = reference_kd_loss(student.double(), teacher.double(), labels,
                                      temperature=2.0)
        torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deferred_label_check_raises_in_backward(backend, cpu_counts_as_device):
    student, teacher, labels = _sync_inputs()
    labels[0] = 16
    loss = kd_loss(student, teacher, labels, backend=backend)
    assert torch.isnan(loss)        # the bad row is NaN, nothing was read out of bounds
    with pytest.raises(ValueError, match=r"labels must be in \[0, 16\).*found 16"):
        loss.backward()
    with torch.no_grad(), pytest.raises(ValueError, match="found 16"):  # no backward: at once
        kd_loss(student, teacher, labels, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unvalidated_bad_label_gives_nan_row(backend, cpu_counts_as_device):
    student, teacher, labels = _sync_inputs()
    labels[0] = 99
    rows = kd_loss(student, teacher, labels, backend=backend, reduction="none",
                   validate_labels=False)
    assert torch.isnan(rows[0]) and torch.isfinite(rows[1:]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sync_free_backward_scales_by_grad_output(backend, cpu_counts_as_device):
    student, teacher, labels = _sync_inputs()
    loss = kd_loss(student, teacher, labels, temperature=2.0, backend=backend,
                   validate_labels=False)
    (grad,) = torch.autograd.grad(loss * 2.5, student)
    student_ref = student.detach().double().requires_grad_()
    expected = reference_kd_loss(student_ref, teacher.double(), labels, temperature=2.0) * 2.5
    (expected_grad,) = torch.autograd.grad(expected, student_ref)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-7)


def test_sync_free_backward_refuses_a_second_pass_clearly(cpu_counts_as_device):
    """The sync-free backward scales the saved gradient in place: a second backward through
    the same graph (retain_graph=True) is refused by name, never run on scaled values; with
    validate_labels=True it repeats exactly."""
    student, teacher, labels = _sync_inputs()
    loss = kd_loss(student, teacher, labels, temperature=2.0, validate_labels=False)
    (loss * 2.0).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already backpropagated.*validate_labels=True"):
        (loss * 2.0).backward()
    student.grad = None
    loss = kd_loss(student, teacher, labels, temperature=2.0)
    first, = torch.autograd.grad(loss * 2.0, student, retain_graph=True)
    second, = torch.autograd.grad(loss * 2.0, student)
    assert torch.equal(first, second)


def test_fused_linear_step_reads_grad_output_once(cpu_counts_as_device):
    """A fused linear step whose hidden states, weight and bias all want gradients reads the
    device once in backward (grad_output and the deferred label check together), not once per
    gradient, and scales all three by grad_output."""
    from fastkd import linear_kd_loss
    generator = torch.Generator().manual_seed(7)
    hidden = torch.randn(6, 5, generator=generator).requires_grad_()
    weight = torch.randn(16, 5, generator=generator).requires_grad_()
    bias = torch.randn(16, generator=generator).requires_grad_()
    teacher = torch.randn(6, 16, generator=generator)
    labels = torch.randint(0, 16, (6,), generator=generator)
    loss = linear_kd_loss(hidden, weight, teacher, labels, student_bias=bias, temperature=2.0)
    with CountSyncs() as counter:
        grads = torch.autograd.grad(loss * 2.5, (hidden, weight, bias))
    assert counter.count == 1
    inputs = [tensor.detach().double().requires_grad_() for tensor in (hidden, weight, bias)]
    logits = inputs[0] @ inputs[1].T + inputs[2]
    expected = reference_kd_loss(logits, teacher.double(), labels, temperature=2.0) * 2.5
    for grad, want in zip(grads, torch.autograd.grad(expected, inputs)):
        torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- first call
FIRST_CALL_PROBE = textwrap.dedent("""
    import json, sys, time
    import torch
    before = set(sys.modules)
    start = time.perf_counter()
    import fastkd
    student = torch.randn(8, 10, requires_grad=True)
    loss = fastkd.kd_loss(student, torch.randn(8, 10), torch.randint(0, 10, (8,)),
                          temperature=2.0)
    loss.backward()
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "new": sorted(set(sys.modules) - before)}))
""")


def test_first_eager_call_imports_no_compiler_stack():
    """The eager path never loads torch._dynamo, inductor or sympy (0.8-2 s and 160 MB on the
    old main); the custom op is only called while torch.compile traces."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", FIRST_CALL_PROBE], capture_output=True,
                            text=True, timeout=300, env=env, check=True)
    import json
    new = json.loads(result.stdout.strip().splitlines()[-1])["new"]
    heavy = [name for name in new if name.startswith(("torch._dynamo", "torch._inductor",
                                                      "sympy", "triton"))]
    assert not heavy, heavy[:20]


CLI_PROBE = textwrap.dedent("""
    import contextlib, io, json, sys
    from fastkd.cli import main
    codes = []
    for argv in (["--help"], ["--version"], ["no-such-command"], []):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                codes.append(main(argv))
            except SystemExit as exit:
                codes.append(exit.code)
    print(json.dumps({"codes": codes, "torch": "torch" in sys.modules}))
""")


def test_cli_help_and_argument_errors_do_not_import_torch():
    """`fastkd --help`, `--version`, a mistyped command and no command at all answer without
    importing torch (importing it takes seconds)."""
    import json
    result = subprocess.run([sys.executable, "-c", CLI_PROBE], capture_output=True, text=True,
                            timeout=300, check=True)
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    assert probe["codes"] == [0, 0, 2, 2]
    assert probe["torch"] is False
