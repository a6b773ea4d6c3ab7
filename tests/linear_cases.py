"""Cases and checks of the fused linear + KD tests (tests/loss/test_linear.py,
tests/loss/test_linear_chunks.py): random student and teacher heads, the teachers of each kind,
the float64 reference, the unfused fastkd composition and the fused call.

Tolerances, relative (loss: to |ref|; gradients: to max |ref grad|): fp32 1e-5 (accumulation
order only); bf16 autocast 3e-2 (the logits, their gradient and the hidden-state gradient are
rounded to bf16's 8-bit mantissa).
"""
import torch
import torch.nn.functional as F

import fastkd
from fastkd import TeacherHead, linear_kd_loss
from reference import reference_kd_loss
from reference_sparse import reference_sparse_kd_loss

FP32_TOL = 1e-5
BF16_TOL = 3e-2


def make_case(rows=(23,), hidden=12, vocab=40, teacher_hidden=10, teacher_vocab=None, bias=True,
              ignored=0.3, seed=0, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(dtype).to(device)
    teacher_vocab = teacher_vocab or vocab
    case = {
        "hidden": randn(*rows, hidden).requires_grad_(),
        "weight": randn(vocab, hidden, scale=0.6).requires_grad_(),
        "bias": randn(vocab, scale=0.5).requires_grad_() if bias else None,
        "teacher_hidden": randn(*rows, teacher_hidden),
        "teacher_weight": randn(teacher_vocab, teacher_hidden, scale=0.7),
        "teacher_bias": randn(teacher_vocab, scale=0.5) if bias else None,
        "teacher_logits": randn(*rows, teacher_vocab, scale=2.0),
    }
    labels = torch.randint(0, vocab, rows, generator=gen)
    if ignored:
        labels[torch.rand(rows, generator=gen) < ignored] = -100
    case["labels"] = labels.to(device)
    return case


def head_logits(hidden, weight, bias, scale=1.0, softcap=None):
    """Logits of an output layer with its transform (any dtype, differentiable)."""
    logits = F.linear(hidden, weight, bias) * scale
    return softcap * torch.tanh(logits / softcap) if softcap is not None else logits


def student_params(case):
    return [case["hidden"], case["weight"]] + ([case["bias"]] if case["bias"] is not None else [])


def teacher_of(case, kind, scale=1.0, softcap=None, k=6, temperature=1.0):
    """Dense logits, a TeacherHead, or sparse targets (top-k of the dense logits with the
    row's tempered lse; K distinct ids with counts) with the case's leading dims."""
    if kind in ("topk", "sampled"):
        logits = case["teacher_logits"]
        values, indices = logits.topk(k, dim=-1)
        if kind == "topk":
            return fastkd.TopKLogits(values, indices, (logits.float() / temperature).logsumexp(-1),
                                     temperature)
        gen = torch.Generator().manual_seed(k)
        counts = torch.randint(0, 4, indices.shape, generator=gen)
        counts[..., 0] += 1   # a positive sum in every row
        return fastkd.SampledTargets(indices, counts, temperature=temperature)
    if kind == "head":
        return TeacherHead(case["teacher_hidden"], case["teacher_weight"], case["teacher_bias"],
                           logit_scale=scale, softcap=softcap)
    return case["teacher_logits"]


def teacher_logits_of(teacher, double=False):
    if isinstance(teacher, TeacherHead):
        cast = (lambda t: t.double() if t is not None else None) if double else (lambda t: t)
        return head_logits(cast(teacher.hidden), cast(teacher.weight), cast(teacher.bias),
                           teacher.logit_scale, teacher.softcap)
    return teacher.double() if double else teacher


def reference(case, teacher, labels, *, scale=1.0, softcap=None, **options):
    """float64 loss and gradients of (hidden, weight[, bias])."""
    params = [p.detach().double().requires_grad_() for p in student_params(case)]
    bias = params[2] if len(params) == 3 else None
    student = head_logits(params[0], params[1], bias, scale, softcap)
    if isinstance(teacher, (fastkd.TopKLogits, fastkd.SampledTargets)):
        loss = reference_sparse_kd_loss(student, teacher, labels, **options)
        return loss, torch.autograd.grad(loss, params)
    options.pop("tail", None)
    teacher_logits = teacher_logits_of(teacher, double=True)[..., :student.shape[-1]]
    loss = reference_kd_loss(student, teacher_logits, labels, **options)
    return loss, torch.autograd.grad(loss, params)


def unfused(case, teacher, labels, *, scale=1.0, softcap=None, **options):
    """fastkd.kd_loss on F.linear logits (the unfused composition) and its gradients."""
    params = student_params(case)
    bias = params[2] if len(params) == 3 else None
    student = head_logits(params[0], params[1], bias, scale, softcap)
    if not isinstance(teacher, (fastkd.TopKLogits, fastkd.SampledTargets)):
        teacher = teacher_logits_of(teacher)[..., :student.shape[-1]].detach()
    loss = fastkd.kd_loss(student, teacher, labels, **options)
    return loss, torch.autograd.grad(loss, params)


def fused(case, teacher, labels, **options):
    loss = linear_kd_loss(case["hidden"], case["weight"], teacher, labels,
                          student_bias=case["bias"], **options)
    return loss, torch.autograd.grad(loss, student_params(case))


def assert_close(got, want, tol, what=""):
    loss, grads = got
    ref_loss, ref_grads = want
    assert loss.dtype == torch.float32
    loss_err = (loss.double() - ref_loss.double()).abs().max().item()
    assert loss_err <= tol * max(ref_loss.double().abs().max().item(), 1e-3), \
        f"{what} loss {loss} vs {ref_loss}"
    for name, grad, ref in zip(("hidden", "weight", "bias"), grads, ref_grads):
        scale = ref.double().abs().max().item()
        err = (grad.double() - ref.double()).abs().max().item()
        assert err <= tol * max(scale, 1e-6), f"{what} grad {name}: {err} vs scale {scale}"
