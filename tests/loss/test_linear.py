"""fastkd.linear_kd_loss / LinearKDLoss / TeacherHead: the fused linear + KD path.

Every case is checked against the float64 reference (float64 ``F.linear`` + transforms, then
``reference.reference_kd_loss``: the fused path has no math of its own) for the loss and the
gradients of hidden states, weight and bias, and most against the unfused fastkd composition
(``F.linear`` + ``kd_loss``) as well; tolerances in tests/linear_cases.py. The chunked pass
itself (chunk sizes, dropped rows, compile, Triton, peak memory): tests/loss/test_linear_chunks.py.
"""
import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd import TeacherHead, linear_kd_loss
from linear_cases import (BF16_TOL, FP32_TOL, assert_close, fused, head_logits, make_case,
                          reference, student_params, teacher_logits_of, teacher_of, unfused)
from reference import reference_kd_loss


# ----------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("teacher_kind", ["logits", "head"])
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5),
                                             ("jsd", 0.3), ("jsd", 0.0), ("mse", 0.5)])
def test_matches_reference_each_divergence(teacher_kind, divergence, beta):
    case = make_case()
    teacher = teacher_of(case, teacher_kind)
    options = dict(divergence=divergence, beta=beta, temperature=2.0, soft_weight=0.7,
                   hard_weight=0.4)
    got = fused(case, teacher, case["labels"], chunk_rows=5, **options)
    assert_close(got, reference(case, teacher, case["labels"], **options), FP32_TOL, divergence)
    assert_close(got, unfused(case, teacher, case["labels"], **options), FP32_TOL, divergence)


@pytest.mark.parametrize("kind", ["topk", "sampled"])
@pytest.mark.parametrize("tail,divergence", [("bucket", "forward_kl"), ("bucket", "jsd"),
                                             ("renormalize", "reverse_kl"),
                                             ("ignore", "forward_kl")])
def test_sparse_teachers(kind, tail, divergence):
    """TopKLogits / SampledTargets go through the sparse kernel family chunk by chunk: the same
    loss and gradients as kd_loss on F.linear logits and the float64 sparse reference; (B, S, H)
    inputs, a student softcap, ignored rows, a temperature."""
    case = make_case(rows=(3, 7), seed=20)
    teacher = teacher_of(case, kind, temperature=2.0)
    options = dict(tail=tail, divergence=divergence, temperature=2.0, beta=0.4)
    got = fused(case, teacher, case["labels"], chunk_rows=4, student_softcap=6.0, **options)
    assert_close(got, reference(case, teacher, case["labels"], softcap=6.0, **options),
                 FP32_TOL, f"{kind} {tail}")
    assert_close(got, unfused(case, teacher, case["labels"], softcap=6.0, **options), FP32_TOL)


def test_sparse_teachers_on_cpu_run_in_the_compiled_kernel(monkeypatch):
    """CPU chunks of a sparse teacher go to the compiled sparse CPU kernel (the one dispatch
    point's choice for kd_loss too), with the float64 reference's numbers."""
    from fastkd import dispatch
    real = dispatch.compiled_kernel("sparse")
    if real is None:
        pytest.skip("the compiled sparse CPU kernel is not built here")
    calls = []

    def recording(student, *args, **kwargs):
        calls.append(student.shape[0])
        return real(student, *args, **kwargs)
    recording.reduces = True
    monkeypatch.setattr(dispatch, "compiled_kernel",
                        lambda family: recording if family == "sparse" else None)
    case = make_case(rows=(3, 7), seed=21)
    teacher = teacher_of(case, "topk", temperature=2.0)
    got = fused(case, teacher, case["labels"], chunk_rows=4, temperature=2.0)
    assert calls and sum(calls) == int((case["labels"] != -100).sum())
    assert_close(got, reference(case, teacher, case["labels"], temperature=2.0), FP32_TOL)


def test_sparse_teacher_labels_and_bad_options():
    case = make_case(seed=21)
    teacher = teacher_of(case, "topk", k=40)   # K = V: bucket mode is dense KD exactly
    got = fused(case, teacher, "teacher", chunk_rows=5)
    assert_close(got, reference(case, teacher, "teacher"), FP32_TOL)
    assert_close(got, reference(case, teacher_of(case, "logits"), "teacher"), FP32_TOL)
    with pytest.raises(ValueError, match="mse"):
        linear_kd_loss(case["hidden"], case["weight"], teacher, divergence="mse")
    with pytest.raises(ValueError, match="temperature"):
        linear_kd_loss(case["hidden"], case["weight"], teacher, temperature=2.0)
    with pytest.raises(ValueError, match="tail"):
        linear_kd_loss(case["hidden"], case["weight"], teacher, tail="drop")
    bad = fastkd.TopKLogits(teacher.values, torch.full_like(teacher.indices, 40), teacher.lse)
    with pytest.raises(ValueError, match="indices"):
        linear_kd_loss(case["hidden"], case["weight"], bad)


@pytest.mark.parametrize("student_transform,teacher_transform", [
    ((1.0, 4.0), (1.0, None)),     # Gemma-2 style softcap on the student
    ((0.5, None), (1.0, 3.0)),     # Cohere logit_scale on the student, softcap on the teacher
    ((1.3, 2.5), (0.8, 6.0)),      # both, on both sides (scale applied before the cap)
])
@pytest.mark.parametrize("bias", [True, False])
def test_logit_scale_and_softcap(student_transform, teacher_transform, bias):
    case = make_case(bias=bias, seed=1)
    scale, softcap = student_transform
    teacher = teacher_of(case, "head", *teacher_transform)
    options = dict(temperature=1.5, divergence="reverse_kl")
    got = fused(case, teacher, case["labels"], student_logit_scale=scale,
                student_softcap=softcap, chunk_rows=7, **options)
    want = reference(case, teacher, case["labels"], scale=scale, softcap=softcap, **options)
    assert_close(got, want, FP32_TOL)
    # and it is not the objective without the transforms (what Liger's fused path computes)
    plain = reference(case, teacher_of(case, "head"), case["labels"], **options)
    assert abs(got[0].item() - plain[0].item()) > 1e-3


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("compiled", [False, True])
def test_reductions(reduction, compiled):
    """'sum' and per-row losses weighted afterwards: for 'none' with a trainable head the head's
    gradient is made in backward (a second chunked pass), eager and under torch.compile."""
    case = make_case(rows=(4, 5), seed=4)
    teacher = teacher_of(case, "head", 1.0, 4.0)

    def loss_fn(hidden, weight, bias, weights):
        return (linear_kd_loss(hidden, weight, teacher, case["labels"], student_bias=bias,
                               reduction=reduction, chunk_rows=3, student_softcap=5.0)
                * weights).sum()
    if compiled:
        loss_fn = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    weights = torch.rand(4, 5) if reduction == "none" else torch.tensor(0.7)
    params = student_params(case)
    got = loss_fn(*params, weights)
    grads = torch.autograd.grad(got, params)
    ref_params = [p.detach().double().requires_grad_() for p in params]
    ref_rows = reference_kd_loss(head_logits(*ref_params, softcap=5.0),
                                 teacher_logits_of(teacher, double=True), case["labels"],
                                 reduction=reduction)
    ref = (ref_rows * weights.double()).sum()
    assert_close((got, grads), (ref, torch.autograd.grad(ref, ref_params)), FP32_TOL, reduction)


def test_teacher_labels_and_no_labels():
    case = make_case(seed=5)
    teacher = teacher_of(case, "head")
    for labels in ("teacher", None):
        got = fused(case, teacher, labels, chunk_rows=6, temperature=2.0)
        assert_close(got, reference(case, teacher, labels, temperature=2.0), FP32_TOL, labels)


def test_frozen_weight_lora_and_frozen_hidden():
    """A frozen head gets no gradient (and none is computed); a LoRA-adapted head (weight =
    W0 + B A, a non-leaf) passes its gradient on to A and B; a frozen hidden state works too."""
    case = make_case(seed=6)
    teacher = teacher_of(case, "logits")
    frozen = case["weight"].detach()
    loss = linear_kd_loss(case["hidden"], frozen, teacher, case["labels"], chunk_rows=5)
    loss.backward()
    assert frozen.grad is None and case["hidden"].grad is not None
    ref_hidden = case["hidden"].detach().double().requires_grad_()
    ref = reference_kd_loss(F.linear(ref_hidden, frozen.double()), teacher.double(),
                            case["labels"])
    ref.backward()
    torch.testing.assert_close(case["hidden"].grad.double(), ref_hidden.grad, rtol=FP32_TOL,
                               atol=1e-7)

    lora_a = (0.1 * torch.randn(2, 12)).requires_grad_()
    lora_b = (0.1 * torch.randn(40, 2)).requires_grad_()
    hidden = case["hidden"].detach()   # frozen hidden states
    loss = linear_kd_loss(hidden, frozen + lora_b @ lora_a, teacher, case["labels"])
    grads = torch.autograd.grad(loss, (lora_a, lora_b))
    ref_a, ref_b = (t.detach().double().requires_grad_() for t in (lora_a, lora_b))
    ref = reference_kd_loss(F.linear(hidden.double(), frozen.double() + ref_b @ ref_a),
                            teacher.double(), case["labels"])
    for grad, ref_grad in zip(grads, torch.autograd.grad(ref, (ref_a, ref_b))):
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)


def test_no_gradient_reaches_the_teacher():
    case = make_case(seed=7)
    logits = case["teacher_logits"].clone().requires_grad_()
    head_weight = case["teacher_weight"].clone().requires_grad_()
    head_hidden = case["teacher_hidden"].clone().requires_grad_()
    loss = linear_kd_loss(case["hidden"], case["weight"], logits, case["labels"])
    loss = loss + linear_kd_loss(case["hidden"], case["weight"],
                                 TeacherHead(head_hidden, head_weight), case["labels"])
    loss.backward()
    assert logits.grad is None and head_weight.grad is None and head_hidden.grad is None
    assert case["hidden"].grad is not None


def test_wider_teacher_vocabulary():
    case = make_case(teacher_vocab=48, seed=8)   # student V = 40
    for kind in ("logits", "head"):
        teacher = teacher_of(case, kind)
        with pytest.raises(ValueError, match="teacher_extra_columns='drop'"):
            linear_kd_loss(case["hidden"], case["weight"], teacher, case["labels"])
        got = fused(case, teacher, case["labels"], teacher_extra_columns="drop", chunk_rows=6)
        assert_close(got, reference(case, teacher, case["labels"]), FP32_TOL, kind)
    narrow = make_case(vocab=40, seed=8)["teacher_logits"][..., :30]
    with pytest.raises(ValueError, match="smaller than the student's"):
        linear_kd_loss(case["hidden"], case["weight"], narrow, case["labels"],
                       teacher_extra_columns="drop")


def test_module_form_and_no_grad():
    case = make_case(seed=9)
    teacher = teacher_of(case, "head")
    criterion = fastkd.LinearKDLoss(temperature=2.0, divergence="jsd", chunk_rows=8)
    assert "chunk_rows=8" in repr(criterion)
    loss = criterion(case["hidden"], case["weight"], teacher, case["labels"],
                     student_bias=case["bias"])
    want = reference(case, teacher, case["labels"], temperature=2.0, divergence="jsd")
    assert_close((loss, torch.autograd.grad(loss, student_params(case))), want, FP32_TOL)
    with torch.no_grad():
        again = criterion(case["hidden"], case["weight"], teacher, case["labels"],
                          student_bias=case["bias"])
    assert not again.requires_grad and abs(again.item() - loss.item()) < 1e-6


@pytest.mark.parametrize("teacher_kind", ["logits", "head"])
def test_bf16_autocast(teacher_kind):
    """Under autocast the chunk logits are bf16 (as F.linear gives there): the loss and the
    gradients match the unfused composition under autocast and the float64 reference to bf16
    accuracy, and come back in the parameters' dtypes (fp32 here)."""
    case = make_case(rows=(4, 7), hidden=16, vocab=64, seed=10)
    teacher = teacher_of(case, teacher_kind, 1.0, 8.0 if teacher_kind == "head" else None)
    options = dict(temperature=2.0, student_softcap=10.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused(case, teacher, case["labels"], chunk_rows=5, **options)
        want = unfused(case, teacher, case["labels"], softcap=10.0, temperature=2.0)
    assert all(g.dtype == torch.float32 for g in got[1])
    assert_close(got, want, BF16_TOL, "vs unfused autocast")
    assert_close(got, reference(case, teacher, case["labels"], softcap=10.0, temperature=2.0),
                 BF16_TOL, "vs float64")


def test_bf16_parameters_without_autocast():
    case = make_case(dtype=torch.bfloat16, seed=11, ignored=0)
    teacher = teacher_of(case, "head")
    got = fused(case, teacher, case["labels"], chunk_rows=6)
    assert [g.dtype for g in got[1]] == [torch.bfloat16] * 3
    assert_close(got, reference(case, teacher, case["labels"]), BF16_TOL)


def rounded_head_logits(hidden, weight, dtype, scale=1.0, softcap=None):
    """float64 logits of a ``dtype`` output layer as a chunked fp32 softcap makes them:
    ``r = hidden @ weight.T`` rounded once to ``dtype`` (what that dtype's matmul returns; the
    rounding is passed straight through for the gradient), then scale and softcap in float64."""
    exact = F.linear(hidden.double(), weight.double())
    logits = (exact + (exact.to(dtype).double() - exact).detach()) * scale
    return softcap * torch.tanh(logits / softcap) if softcap is not None else logits


# Low-precision heads with a softcap, against rounded_head_logits + the float64 loss. Loss:
# relative 2e-5 (the logits are rounded once, to the dtype, by the matmul; scale, softcap and
# the loss run in float32). Gradients, relative to max |ref grad|: the logits gradient is
# rounded once to the dtype before the matmuls, whose results are rounded again: bf16 1.5e-2,
# fp16 3e-3.
SOFTCAP_LOSS_TOL = 2e-5
SOFTCAP_GRAD_TOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3}


@pytest.mark.parametrize("teacher_kind", ["logits", "head"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_softcap_runs_in_float32(dtype, temperature, teacher_kind):
    """bf16 / fp16 heads: scale and softcap are applied to each chunk's logits in float32 (and
    their derivative 1 - tanh^2 too), as TRL's chunked loss does, not op by op in the low dtype
    (whose three roundings move the loss by ~1e-3 at T = 0.5). The teacher head's softcap too."""
    case = make_case(rows=(37,), hidden=32, vocab=300, teacher_hidden=24, bias=False,
                     dtype=dtype, seed=21, ignored=0.2)
    teacher = TeacherHead(case["teacher_hidden"], case["teacher_weight"], logit_scale=1.25,
                          softcap=6.0) if teacher_kind == "head" else case["teacher_logits"]
    got = linear_kd_loss(case["hidden"], case["weight"], teacher, case["labels"],
                         student_logit_scale=0.75, student_softcap=5.0, chunk_rows=8,
                         temperature=temperature)
    grads = torch.autograd.grad(got, [case["hidden"], case["weight"]])
    assert [g.dtype for g in grads] == [dtype, dtype]
    params = [case[name].detach().double().requires_grad_() for name in ("hidden", "weight")]
    student = rounded_head_logits(*params, dtype, 0.75, 5.0)
    teacher_logits = rounded_head_logits(case["teacher_hidden"], case["teacher_weight"], dtype,
                                         1.25, 6.0) if teacher_kind == "head" \
        else case["teacher_logits"].double()
    want = reference_kd_loss(student, teacher_logits, case["labels"], temperature=temperature)
    want_grads = torch.autograd.grad(want, params)
    assert abs(got.item() - want.item()) <= SOFTCAP_LOSS_TOL * abs(want.item()), \
        (got.item(), want.item())
    for name, grad, ref in zip(("hidden", "weight"), grads, want_grads):
        err = (grad.double() - ref).abs().max().item()
        assert err <= SOFTCAP_GRAD_TOL[dtype] * ref.abs().max().item(), (name, err)


# ----------------------------------------------------------------------------- bad input
def test_bad_input_is_named():
    case = make_case()
    hidden, weight, labels = case["hidden"], case["weight"], case["labels"]
    teacher = case["teacher_logits"]
    cases = [
        (dict(student_hidden=hidden[..., :5]), ValueError, "share H"),
        (dict(student_weight=weight[0]), ValueError, r"student_weight must have shape \(V, H\)"),
        (dict(student_weight=weight.long()), TypeError, "student_weight"),
        (dict(student_bias=torch.zeros(3)), ValueError, "student_bias must have shape"),
        (dict(teacher=teacher[:5]), ValueError, "leading dims"),
        (dict(teacher="logits"), TypeError, "TeacherHead"),
        (dict(student_softcap=0.0), ValueError, "student_softcap must be > 0"),
        (dict(student_logit_scale=float("nan")), ValueError, "student_logit_scale must be finite"),
        (dict(chunk_rows=0), ValueError, "chunk_rows must be >= 1"),
        (dict(chunk_budget_bytes=1.5), TypeError, "chunk_budget_bytes must be an int"),
        (dict(teacher_extra_columns="pad"), ValueError, "teacher_extra_columns"),
        (dict(labels=labels[:3]), ValueError, "labels must have shape"),
        (dict(labels=torch.full_like(labels, 40)), ValueError, r"labels must be in \[0, 40\)"),
        (dict(temperature=0.0), ValueError, "temperature"),
    ]
    for change, error, message in cases:
        args = dict(student_hidden=hidden, student_weight=weight, teacher=teacher, labels=labels)
        args.update(change)
        with pytest.raises(error, match=message):
            linear_kd_loss(**args)
    with pytest.raises(ValueError, match="TeacherHead.hidden .* must share H"):
        TeacherHead(case["teacher_hidden"], case["teacher_weight"][:, :3])
    with pytest.raises(ValueError, match="TeacherHead.softcap must be > 0"):
        TeacherHead(case["teacher_hidden"], case["teacher_weight"], softcap=-1.0)
    with pytest.raises(ValueError, match="teacher.hidden must have the leading dims"):
        linear_kd_loss(hidden, weight, TeacherHead(case["teacher_hidden"][:4],
                                                   case["teacher_weight"]))
    with pytest.raises(ValueError, match="chunk_rows"):
        fastkd.LinearKDLoss(chunk_rows=-1)

