"""Public API: argument checking, dispatch, autograd, KDLoss, torch.compile, command line."""
import subprocess
import sys

import pytest
import torch

import fastkd
from fastkd import KDLoss, kd_loss
from reference import reference_kd_loss

V = 11


def _inputs(rows=4, num_classes=V, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, num_classes, generator=generator, dtype=torch.float32).to(dtype)
    teacher = torch.randn(rows, num_classes, generator=generator, dtype=torch.float32).to(dtype)
    labels = torch.randint(0, num_classes, (rows,), generator=generator)
    return student.requires_grad_(), teacher, labels


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, error, words", [
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(temperature=-1.0), ValueError, "temperature must be > 0"),
    (dict(temperature=float("inf")), ValueError, "temperature must be finite"),
    (dict(temperature=float("nan")), ValueError, "temperature must be finite"),
    (dict(temperature="2"), TypeError, "temperature must be a real number"),
    (dict(temperature=torch.tensor(2.0)), TypeError, "temperature must be a real number"),
    (dict(divergence="kl"), ValueError, "divergence must be one of"),
    (dict(reduction="mean"), ValueError, "reduction must be one of"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(beta=1.5), ValueError, "beta must be in [0.0, 1.0]"),
    (dict(beta=-0.1), ValueError, "beta must be in [0.0, 1.0]"),
    (dict(soft_weight=-1.0), ValueError, "soft_weight must be >= 0"),
    (dict(hard_weight=-0.5), ValueError, "hard_weight must be >= 0"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
])
def test_bad_options_raise(kwargs, error, words):
    student, teacher, labels = _inputs()
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        kd_loss(student, teacher, labels, **kwargs)
    with pytest.raises(error, match=words.split(" ")[0]):  # the module checks at construction
        KDLoss(**kwargs)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(ignore_index=2 ** 64 + 3), ValueError, r"ignore_index must fit int64"),
    (dict(temperature=1e-4), ValueError, r"temperature must be >= 0.001"),
    (dict(validate_labels="no"), TypeError, r"validate_labels must be True or False, got 'no'"),
    (dict(validate_labels=None), TypeError, r"validate_labels must be True or False"),
    (dict(grad_inplace=2), TypeError, r"grad_inplace must be True or False, got 2"),
])
def test_options_that_would_wrap_or_read_as_truthy_are_refused(kwargs, error, words):
    """An ignore_index past int64 would wrap onto a real class, a tiny temperature overflows
    z / T, and a flag given as a string or None would silently mean True or False."""
    student, teacher, labels = _inputs()
    with pytest.raises(error, match=words):
        kd_loss(student * 1, teacher, labels, **kwargs)


def test_integer_like_options_and_uint64_labels():
    import numpy as np
    student, teacher, labels = _inputs()
    expected = kd_loss(student, teacher, labels, ignore_index=-100)
    torch.testing.assert_close(kd_loss(student, teacher, labels, ignore_index=np.int64(-100)),
                               expected)
    with pytest.raises(TypeError, match="torch.uint64; pass labels.long"):
        kd_loss(student, teacher, labels.to(torch.uint64))


def test_shape_mismatch_names_both_shapes():
    student, _, labels = _inputs()
    with pytest.raises(ValueError, match=r"same shape.*\(4, 11\) and \(4, 12\)"):
        kd_loss(student, torch.randn(4, 12), labels)
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(student, torch.randn(3, 11), labels)


def test_labels_checked():
    student, teacher, labels = _inputs()
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        kd_loss(student, teacher, labels[:3])
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        kd_loss(student, teacher, labels.float())
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        kd_loss(student, teacher, labels > 3)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 11\).*found 11"):
        kd_loss(student, teacher, torch.tensor([0, 1, 11, 2]))
    with pytest.raises(ValueError, match=r"found -5"):
        kd_loss(student, teacher, torch.tensor([0, -5, 1, 2]))
    with pytest.raises(ValueError, match="labels must be a tensor, None or 'teacher'"):
        kd_loss(student, teacher, "argmax")
    with pytest.raises(TypeError, match="labels must be a tensor"):
        kd_loss(student, teacher, [0, 1, 2, 3])


def test_logits_checked():
    student, teacher, labels = _inputs()
    with pytest.raises(TypeError, match="student_logits must be float32, float16 or bfloat16"):
        kd_loss(torch.zeros(4, V, dtype=torch.int64), teacher, labels)
    with pytest.raises(TypeError, match="teacher_logits must be float32, float16 or bfloat16"):
        kd_loss(student, torch.zeros(4, V, dtype=torch.int32), labels)
    with pytest.raises(TypeError, match="teacher_logits must be a torch.Tensor"):
        kd_loss(student, teacher.numpy(), labels)
    with pytest.raises(ValueError, match=r"student_logits must have shape \(\.\.\., V\) with V >= 1"):
        kd_loss(torch.zeros(4, 0), torch.zeros(4, 0))


def test_devices_checked():
    student, teacher, labels = _inputs()
    with pytest.raises(ValueError, match="same device"):
        kd_loss(student, teacher.to("meta"), labels)
    with pytest.raises(ValueError, match="labels must be on the logits' device"):
        kd_loss(student, teacher, labels.to("meta"))


def test_triton_backend_without_gpu_or_interpreter(monkeypatch):
    student, teacher, labels = _inputs()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        kd_loss(student, teacher, labels, backend="triton")


# ----------------------------------------------------------------------------- semantics
def test_module_matches_function_and_reference():
    student, teacher, labels = _inputs(rows=6)
    options = dict(temperature=2.0, soft_weight=0.7, hard_weight=0.3, divergence="jsd", beta=0.3)
    module = KDLoss(**options)
    assert "divergence='jsd'" in repr(module)
    loss_module = module(student, teacher, labels)
    loss_function = kd_loss(student, teacher, labels, **options)
    expected = reference_kd_loss(student, teacher, labels, **options)
    torch.testing.assert_close(loss_module, loss_function)
    torch.testing.assert_close(loss_module.double(), expected, rtol=1e-5, atol=1e-6)


def test_teacher_gets_no_gradient():
    student, teacher, labels = _inputs()
    teacher.requires_grad_()
    kd_loss(student, teacher, labels, temperature=2.0).backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_backward_scales_by_grad_output():
    student, teacher, labels = _inputs()
    loss = kd_loss(student, teacher, labels, temperature=3.0)
    (grad_once,) = torch.autograd.grad(loss, student, retain_graph=True)
    (grad_scaled,) = torch.autograd.grad(loss * 2.5, student)
    torch.testing.assert_close(grad_scaled, grad_once * 2.5)
    # the same graph can be differentiated again (saved gradient is not consumed in place)
    (grad_again,) = torch.autograd.grad(kd_loss(student, teacher, labels, temperature=3.0),
                                        student)
    torch.testing.assert_close(grad_again, grad_once)


def test_no_grad_and_detached_student():
    student, teacher, labels = _inputs()
    with torch.no_grad():
        loss = kd_loss(student, teacher, labels)
    assert not loss.requires_grad
    loss_detached = kd_loss(student.detach(), teacher, labels)
    torch.testing.assert_close(loss, loss_detached)


def test_grad_inplace_overwrites_student_with_gradient():
    student, teacher, labels = _inputs(rows=5)
    (expected,) = torch.autograd.grad(kd_loss(student, teacher, labels, temperature=2.0), student)
    hidden = torch.randn(5, 7, requires_grad=True)
    projection = torch.randn(7, V)
    # the usual case: logits from a layer, nothing else keeps them
    logits = hidden @ projection
    with torch.no_grad():
        logits.copy_(student)
    loss = kd_loss(logits, teacher, labels, temperature=2.0, grad_inplace=True)
    loss.backward()
    torch.testing.assert_close(logits.detach(), expected)  # the storage now holds the gradient
    torch.testing.assert_close(hidden.grad, expected @ projection.T)


def test_grad_inplace_detects_other_users_of_the_logits():
    student, teacher, labels = _inputs()
    logits = student * 1.0
    other = (logits ** 2).sum()  # saves logits for its backward
    loss = kd_loss(logits, teacher, labels, grad_inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()


def test_torch_compile_fullgraph_module():
    """A compiled student + KDLoss traces as one graph (custom op), and matches eager."""
    torch.manual_seed(0)
    student_net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                      torch.nn.Linear(16, V))
    criterion = KDLoss(temperature=2.0)
    inputs = torch.randn(6, 8)
    teacher = torch.randn(6, V)
    labels = torch.tensor([0, 3, -100, 5, 10, 1])

    def step(x, teacher_logits, targets):
        return criterion(student_net(x), teacher_logits, targets)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss_compiled = compiled(inputs, teacher, labels)
    grads_compiled = torch.autograd.grad(loss_compiled, list(student_net.parameters()))
    loss_eager = step(inputs, teacher, labels)
    grads_eager = torch.autograd.grad(loss_eager, list(student_net.parameters()))
    torch.testing.assert_close(loss_compiled, loss_eager)
    for got, want in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(got, want)


def test_torch_compile_with_a_temperature_per_module_under_specialize_float():
    """The documented setting for several temperatures under torch.compile: with
    specialize_float each KDLoss of its own T traces its own graph and matches eager."""
    student, teacher, labels = _inputs(rows=6)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(specialize_float=True):
        for temperature in (2.0, 3.0):
            criterion = KDLoss(temperature=temperature)
            compiled = torch.compile(criterion, backend="aot_eager", fullgraph=True)
            torch.testing.assert_close(compiled(student, teacher, labels),
                                       criterion(student, teacher, labels))


def test_torch_compile_inductor_reduction_none():
    torch.manual_seed(1)
    student, teacher, labels = _inputs(rows=5)
    upstream = torch.rand(5)

    def weighted(student_logits, teacher_logits, targets, weights):
        rows = kd_loss(student_logits, teacher_logits, targets, temperature=4.0, reduction="none")
        return (rows * weights).sum()

    torch._dynamo.reset()
    compiled = torch.compile(weighted, fullgraph=True)
    (grad_compiled,) = torch.autograd.grad(compiled(student, teacher, labels, upstream), student)
    (grad_eager,) = torch.autograd.grad(weighted(student, teacher, labels, upstream), student)
    torch.testing.assert_close(grad_compiled, grad_eager)


# ----------------------------------------------------------------------------- command line
def test_version_and_cli_help():
    result = subprocess.run([sys.executable, "-m", "fastkd", "--version"], capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == f"fastkd {fastkd.__version__}"


def test_backward_allocates_no_logits_sized_tensor():
    """The gradient made in forward is handed over as is: backward creates no (N, V) tensor
    (no copy, no scaling pass, no zeros for the never-used gradient output)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargeOutputs(TorchDispatchMode):
        def __init__(self, limit):
            super().__init__()
            self.limit, self.ops = limit, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            outs = out if isinstance(out, (tuple, list)) else [out]
            if any(isinstance(o, torch.Tensor) and o.numel() >= self.limit for o in outs):
                self.ops.append(str(func))
            return out

    student, teacher, labels = _inputs(rows=16, num_classes=64)
    loss = kd_loss(student, teacher, labels, temperature=2.0)
    with LargeOutputs(16 * 64) as mode:
        loss.backward()
    # only views of the saved gradient may appear (reshape/view/detach share its storage)
    assert all(("view" in op or "alias" in op or "detach" in op or "reshape" in op)
               for op in mode.ops), mode.ops
