"""Sparse teacher targets through kd_loss (fastkd/sparse_loss.py, kernels/kd_sparse.py,
fastkd/reference_sparse.py) against the float64 reference (tests/reference_sparse.py): loss AND
gradient, on every backend: the compiled CPU kernel, the PyTorch reference and Triton (in the CPU
interpreter, hence small shapes). Tolerances: tests/sparse_inputs.py.
"""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastkd
from fastkd import SampledTargets, TopKLogits, kd_loss
from fastkd.options import LossOptions
from fastkd.reference_sparse import kd_sparse_torch
from fastkd.kernels.kd_sparse import kd_sparse_forward_triton
from loss_inputs import assert_close_scaled, make_labels
from sparse_inputs import (backend, check, make_padded_counts, make_topk,  # noqa: F401
                           run_loss)   # backend: the fixture

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")

# (divergence, beta, tail): "ignore" is forward KL only
COMBOS = [(divergence, beta, tail) for tail in ("bucket", "renormalize")
          for divergence, beta in (("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3))]
COMBOS.append(("forward_kl", 0.5, "ignore"))


# ----------------------------------------------------------------------------- the full grid
@pytest.mark.parametrize("label_mode", ["none", "tensor", "teacher"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("divergence, beta, tail", COMBOS)
def test_every_divergence_tail_temperature_label_mode(divergence, beta, tail, temperature,
                                                      label_mode, backend):
    student, target, _ = make_topk((5, 37), 8, temperature)
    labels = {"none": None, "teacher": "teacher",
              "tensor": make_labels((5,), 37, ignored=[2])}[label_mode]
    check(student, target, labels, backend, tail=tail, temperature=temperature,
          divergence=divergence, beta=beta, soft_weight=0.7, hard_weight=0.4)


@pytest.mark.parametrize("k", [1, 8, 64])
@pytest.mark.parametrize("divergence, tail", [("forward_kl", "bucket"), ("jsd", "bucket"),
                                              ("reverse_kl", "renormalize"),
                                              ("forward_kl", "ignore")])
def test_k_sizes(k, divergence, tail, backend):
    student, target, _ = make_topk((3, 100), k, 1.5, seed=k)
    check(student, target, make_labels((3,), 100), backend, tail=tail, temperature=1.5,
          divergence=divergence, beta=0.6)


@pytest.mark.parametrize("divergence, beta", [("forward_kl", 0.5), ("reverse_kl", 0.5),
                                              ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0)])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_k_equal_v_bucket_is_dense_kd(divergence, beta, temperature, backend):
    """All V classes kept, in shuffled order: the bucket loss is the dense loss."""
    student, target, teacher = make_topk((4, 29), 29, temperature, seed=3)
    order = torch.randperm(29, generator=torch.Generator().manual_seed(0))
    target = target._replace(values=target.values[:, order], indices=target.indices[:, order])
    labels = make_labels((4,), 29, ignored=[1])
    options = dict(temperature=temperature, divergence=divergence, beta=beta)
    loss, grad, upstream = run_loss(student, target, labels, backend, **options)
    dense_student = student.clone().requires_grad_()
    dense_loss = kd_loss(dense_student, teacher, labels, backend=backend, **options)
    (dense_grad,) = torch.autograd.grad(dense_loss, dense_student, upstream)
    assert_close_scaled(loss, dense_loss, 1e-5, floor=1.0)
    assert_close_scaled(grad, dense_grad, 1e-5)


@pytest.mark.parametrize("tail", ["bucket", "renormalize", "ignore"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_triton_streams_several_blocks(tail, temperature):
    """A row longer than the block: the kernel's online rescaling and per-block kept-column
    mask against the fallback, called directly with a 16-column block."""
    student, target, _ = make_topk((3, 150), 12, temperature, seed=5)
    labels = make_labels((3,), 150, ignored=[0])
    outputs = []
    options = LossOptions(temperature=temperature, soft_weight=0.6, hard_weight=0.3, tail=tail)
    for forward, extra in ((kd_sparse_torch, {}), (kd_sparse_forward_triton, {"block_v": 16})):
        grad = torch.empty_like(student)
        loss = forward(student, target.indices, target.values, target.lse, None, labels, options,
                       grad_scale=0.5, grad=grad, **extra)
        outputs.append((loss, grad))
    assert_close_scaled(outputs[1][0], outputs[0][0], 1e-5, floor=1.0)
    assert_close_scaled(outputs[1][1], outputs[0][1], 1e-5)
    assert not outputs[0][1][0].any()   # ignored row


# ----------------------------------------------------------------------------- -inf, dtypes, shapes
@pytest.mark.parametrize("divergence, tail", [("forward_kl", "bucket"), ("reverse_kl", "bucket"),
                                              ("jsd", "bucket"), ("forward_kl", "renormalize"),
                                              ("forward_kl", "ignore")])
def test_minus_inf_student_logits(divergence, tail, backend):
    """-inf student logits at kept ids whose teacher value is -inf too (probability 0 on both
    sides: finite loss) and -inf elsewhere in the row."""
    student, target, _ = make_topk((3, 40), 6, seed=7)
    values = target.values.clone()
    values[:, -1] = float("-inf")
    target = target._replace(values=values)
    student = student.clone()
    student.scatter_(1, target.indices[:, -1:].long(), float("-inf"))
    kept = torch.zeros_like(student, dtype=torch.bool).scatter_(1, target.indices.long(), True)
    outside = (~kept).float().argmax(1, keepdim=True)     # the first class outside the ids
    student.scatter_(1, outside, float("-inf"))
    loss, grad = check(student, target, None, backend, tail=tail, divergence=divergence)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_minus_inf_student_at_a_kept_id_with_teacher_mass(backend):
    """Forward KL is infinite when the student gives 0 to a class the teacher keeps; the
    gradient stays finite: -P_k at that id."""
    student, target, _ = make_topk((2, 30), 4, seed=8)
    student = student.clone()
    student.scatter_(1, target.indices[:, :1].long(), float("-inf"))
    loss, grad, upstream = run_loss(student, target, None, backend, soft_weight=1.0)
    assert loss.item() == math.inf
    assert torch.isfinite(grad).all()
    # autograd cannot give this limit (q_k = 0 underflows even in float64): use the closed form
    # of the design notes, float64, dense: p_s - P_k at the kept ids, p_s (1 - r_t / r_s) else
    probs = torch.softmax(student.double(), -1)
    ids = target.indices.long()
    teacher = torch.exp(target.values.double() - target.lse.double().unsqueeze(1))
    in_kept = torch.zeros_like(probs).scatter(1, ids, 1.0)
    rest_ratio = (1 - teacher.sum(1)) / (probs * (1 - in_kept)).sum(1)
    want_grad = (probs * (1 - rest_ratio).unsqueeze(1)).scatter(
        1, ids, probs.gather(1, ids) - teacher) * upstream.double() / 2
    assert_close_scaled(grad, want_grad, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("divergence, tail", [("forward_kl", "bucket"), ("jsd", "renormalize")])
def test_half_precision_students(dtype, divergence, tail, backend):
    student, target, _ = make_topk((4, 64), 8, 2.0, seed=9, dtype=dtype)
    target = target._replace(values=target.values.to(torch.bfloat16))
    check(student, target, make_labels((4,), 64, ignored=[3]), backend, tail=tail,
          temperature=2.0, divergence=divergence)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_reductions_and_batch_sequence_inputs(reduction, backend):
    """(B, S, V) student with (B, S, K) targets; padded positions ignored."""
    student, target, _ = make_topk((2, 3, 33), 5, seed=10)
    labels = make_labels((2, 3), 33, ignored=[2, 5])
    loss, _ = check(student, target, labels, backend, reduction=reduction, divergence="jsd")
    assert loss.shape == ((2, 3) if reduction == "none" else ())
    if reduction == "none":
        assert loss[0, 2] == 0 and loss[1, 2] == 0


def test_all_rows_ignored_and_in_place_gradient(backend):
    student, target, _ = make_topk((3, 20), 4, seed=11)
    labels = torch.full((3,), -100)
    leaf = student.clone().requires_grad_()
    loss = kd_loss(leaf, target, labels, backend=backend)
    loss.backward()
    assert loss.item() == 0 and not leaf.grad.any()
    # grad_inplace writes into the logits' storage and gives the same gradient
    labels = make_labels((3,), 20)
    _, want_grad, upstream = run_loss(student, target, labels, backend)
    leaf = student.clone().requires_grad_()
    logits = leaf * 1.0
    loss = kd_loss(logits, target, labels, backend=backend, grad_inplace=True)
    loss.backward(upstream)
    assert_close_scaled(leaf.grad, want_grad, 1e-6)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_empty_batch_with_strided_fields(reduction, backend):
    """No rows, every K field a column-strided view (an empty tensor's strides address
    nothing): a zero loss and an empty gradient, for top-k and sampled targets alike."""
    wide = torch.zeros(0, 8, dtype=torch.int32)
    ids = wide[:, ::2]
    assert ids.stride(-1) == 2
    targets = [TopKLogits(torch.zeros(0, 8)[:, ::2], ids, torch.zeros(0)),
               SampledTargets(ids, torch.ones(0, 8, dtype=torch.int32)[:, ::2])]
    for target in targets:
        for labels in (None, torch.zeros(0, dtype=torch.long), "teacher"):
            student = torch.zeros(0, 20, requires_grad=True)
            loss = kd_loss(student, target, labels, backend=backend, reduction=reduction)
            assert loss.shape == ((0,) if reduction == "none" else ())
            assert not loss.any()
            loss.sum().backward()
            assert student.grad.shape == (0, 20)


def test_from_logprobs_and_kdloss_module():
    """A served teacher's log-probs (lse = 0) give the same loss as raw logits + lse; KDLoss
    takes tail and a sparse teacher."""
    student, target, teacher = make_topk((4, 50), 8)
    log_probs = torch.log_softmax(teacher, -1)
    served = TopKLogits.from_logprobs(log_probs.gather(-1, target.indices.long()), target.indices)
    module = fastkd.KDLoss(tail="bucket", backend="torch")
    assert "tail='bucket'" in repr(module)
    torch.testing.assert_close(module(student, served), module(student, target))
    with pytest.raises(ValueError, match="tail must be one of"):
        fastkd.KDLoss(tail="drop")


def test_torch_compile_fullgraph_sparse():
    student, target, _ = make_topk((6, 40), 8, 2.0, seed=12)
    labels = make_labels((6,), 40, ignored=[4])

    def loss_fn(logits, values, indices, lse, labels):
        return kd_loss(logits, TopKLogits(values, indices, lse, 2.0), labels, temperature=2.0,
                       divergence="jsd", backend="torch")

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    leaf = student.clone().requires_grad_()
    loss_compiled = compiled(leaf, *target.tensors(), labels)
    (grad_compiled,) = torch.autograd.grad(loss_compiled, leaf)
    leaf = student.clone().requires_grad_()
    loss_eager = loss_fn(leaf, *target.tensors(), labels)
    (grad_eager,) = torch.autograd.grad(loss_eager, leaf)
    torch.testing.assert_close(loss_compiled, loss_eager)
    torch.testing.assert_close(grad_compiled, grad_eager)


# ----------------------------------------------------------------------------- sampled targets
@pytest.mark.parametrize("divergence, tail", [("forward_kl", "bucket"), ("jsd", "bucket"),
                                              ("reverse_kl", "renormalize"),
                                              ("forward_kl", "ignore")])
def test_sampled_targets_against_reference(divergence, tail, backend):
    """Counts with zero-count padding entries (which may repeat an id)."""
    student, indices, counts = make_padded_counts(4, 30, 6, seed=13, max_count=4,
                                                  counts_dtype=torch.int32)
    target = SampledTargets(indices, counts, temperature=1.5)   # a target for T = 1.5
    check(student, target, "teacher", backend, tail=tail, divergence=divergence,
          temperature=1.5, beta=0.4)


def test_sampled_targets_gradient_is_unbiased():
    """Mean forward-KL gradient over many independent sample sets -> the dense gradient.

    Each sample set draws n = 32 ids from p_t; the per-set gradient at class j is
    T (p_s(j) - c_j / n), so its variance is T^2 p_t(j) (1 - p_t(j)) / n <= T^2 / (4 n). The mean
    of M = 2000 independent sets has standard deviation <= T / (2 sqrt(n M)) = 1.4e-3 (T = 1);
    over the 4 x 50 entries a 6-sigma bound (8.4e-3) fails with probability < 1e-6, while a
    biased target (e.g. top-32 renormalized) is off by ~1e-2 or more. The draws are seeded.
    """
    generator = torch.Generator().manual_seed(14)
    rows, num_classes, draws, sets = 4, 50, 32, 2000
    student = torch.randn(rows, num_classes, generator=generator)
    teacher = 2 * torch.randn(rows, num_classes, generator=generator)
    p_teacher = torch.softmax(teacher, -1)
    # M independent sets per row, stacked as M * rows rows: unique ids with counts
    samples = torch.multinomial(p_teacher.repeat(sets, 1), draws, replacement=True,
                                generator=generator)
    counts_dense = torch.zeros(sets * rows, num_classes).scatter_add_(
        1, samples, torch.ones_like(samples, dtype=torch.float32))
    counts, indices = counts_dense.topk(draws, -1)   # every drawn id; zero counts are padding
    target = SampledTargets(indices, counts.to(torch.int32))
    leaf = student.repeat(sets, 1).requires_grad_()
    loss = kd_loss(leaf, target, soft_weight=1.0, hard_weight=0.0, reduction="sum",
                   backend="torch")
    (grad,) = torch.autograd.grad(loss, leaf)
    mean_grad = grad.view(sets, rows, num_classes).mean(0)
    dense_grad = torch.softmax(student, -1) - p_teacher
    bound = 6 / (2 * math.sqrt(draws * sets))
    assert (mean_grad - dense_grad).abs().max() < bound
    # the test has power: top-k truncation (renormalized) is biased well beyond the bound
    top = teacher.topk(8, -1)
    biased = TopKLogits(top.values, top.indices, torch.zeros(rows))
    leaf = student.clone().requires_grad_()
    (biased_grad,) = torch.autograd.grad(
        kd_loss(leaf, biased, tail="renormalize", soft_weight=1.0, reduction="sum",
                backend="torch"), leaf)
    assert (biased_grad - dense_grad).abs().max() > 3 * bound


# ----------------------------------------------------------------------------- bad input
def bad_input_cases():
    student, target, _ = make_topk((3, 20), 4)
    ids = target.indices.clone()
    ids[1, 2] = 20
    negative = target.indices.clone()
    negative[0, 0] = -1
    duplicate = target.indices.clone()
    duplicate[2, 1] = duplicate[2, 0]
    nan_values = target.values.clone()
    nan_values[0, 1] = float("nan")
    inf_values = target.values.clone()
    inf_values[1, 0] = float("inf")
    cases = [
        (target._replace(indices=ids), {}, ValueError, r"\[0, 20\); found 20"),
        (target._replace(indices=negative), {}, ValueError, "found -1"),
        (target._replace(indices=duplicate), {}, ValueError, "unique"),
        (target._replace(values=nan_values), {}, ValueError, "values contain NaN"),
        # +inf is refused with every tail (renormalize, which skips the mass check, gave NaN)
        (target._replace(values=inf_values), {}, ValueError, r"NaN or \+inf"),
        (target._replace(values=inf_values), {"tail": "renormalize"}, ValueError,
         r"NaN or \+inf"),
        (target._replace(values=target.values[:, :3]), {}, ValueError, "same shape"),
        (target._replace(lse=target.lse[:2]), {}, ValueError, "lse must have shape"),
        (target._replace(indices=target.indices.float()), {}, TypeError, "integer"),
        (target, {"temperature": 2.0}, ValueError, "temperature=1.0 .* differs"),
        (target, {"divergence": "mse"}, ValueError, "mse"),
        (target, {"tail": "ignore", "divergence": "jsd"}, ValueError, "forward_kl only"),
        (target, {"tail": "everything"}, ValueError, "tail must be one of"),
        (SampledTargets(target.indices, torch.tensor([[1, 2, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])),
         {}, ValueError, "positive sum"),
        (SampledTargets(target.indices, -torch.ones(3, 4)), {}, ValueError, "counts"),
        (SampledTargets(target.indices, torch.ones(3, 4)), {"divergence": "reverse_kl"},
         ValueError, "infinite"),
        (SampledTargets(target.indices, torch.ones(3, 4, dtype=torch.bool)), {}, TypeError,
         "counts"),
        ((target.values, target.indices), {}, TypeError, "TopKLogits or SampledTargets"),
    ]
    return student, cases


def test_bad_input(backend):
    student, cases = bad_input_cases()
    for number, (target, options, error, message) in enumerate(cases):
        with pytest.raises(error, match=message):
            kd_loss(student, target, backend=backend, **options)
    student, target, _ = make_topk((3, 20), 4)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 20\)"):
        kd_loss(student, target, torch.tensor([0, 20, 1]), backend=backend)
    # renormalize needs no lse, so any target temperature is fine
    kd_loss(student, target, tail="renormalize", temperature=3.0, backend=backend)
    # ignored rows may hold anything but out-of-range ids
    values = target.values.clone()
    values[1] = float("nan")
    loss = kd_loss(student, target._replace(values=values), torch.tensor([0, -100, 1]),
                   backend=backend)
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------- real compiler
COMPILE_SCRIPT = textwrap.dedent("""
    import sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastkd.kernels import kd_sparse

    divergence, tail, sampled, hard, shares, teacher_labels, student = sys.argv[1:]
    divergence, tail = int(divergence), int(tail)
    sampled, hard, shares, teacher_labels = (
        flag == "1" for flag in (sampled, hard, shares, teacher_labels))
    signature = dict(
        student_ptr="*" + student, ids_ptr="*i32", values_ptr="*bf16", lse_ptr="*fp32",
        counts_ptr="*i32", labels_ptr="*i64", grad_ptr="*" + student, row_loss_ptr="*fp32",
        student_row_stride="i64", ids_row_stride="i64", values_row_stride="i64",
        counts_row_stride="i64", grad_row_stride="i64", num_classes="i32", num_kept="i32",
        temperature="fp32", soft_weight="fp32", hard_weight="fp32", beta="fp32",
        ignore_index="i32", grad_scale="fp32")
    constants = dict(
        DIVERGENCE=divergence, TAIL=tail, STATS=divergence != 0 and tail != 1, SAMPLED=sampled,
        HAS_REST=tail == 0, HARD=hard, CE_SHARES_SOFTMAX=shares,
        HAS_LABELS=hard and not teacher_labels, TEACHER_LABELS=teacher_labels, WRITE_GRAD=True,
        BLOCK_V=4096, BLOCK_K=32)
    signature.update({name: "constexpr" for name in constants})
    source = ASTSource(kd_sparse._kd_sparse_kernel, signature, constexprs=constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    assert compiled.asm["cubin"], "no cubin"
""")


@pytest.mark.slow
@pytest.mark.parametrize("flags", [
    # divergence, tail, sampled, hard, CE_SHARES_SOFTMAX, teacher_labels, student dtype
    ("1", "0", "0", "1", "1", "0", "bf16"),
    ("3", "0", "1", "1", "0", "1", "fp32"),
    ("2", "1", "0", "1", "0", "0", "fp16"),
    ("1", "2", "0", "0", "0", "0", "bf16"),
])
def test_compiles_for_sm90_without_interpreter(flags, tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, *flags], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_compact_cache_dtypes(backend):
    """What compact caches store: uint16 ids, fp16 values, uint8 counts."""
    student, target, _ = make_topk((3, 300), 8, seed=15)
    compact = target._replace(values=target.values.half(),
                              indices=target.indices.to(torch.uint16))
    check(student, compact, make_labels((3,), 300), backend, divergence="jsd")
    counts = torch.randint(1, 9, (3, 8), generator=torch.Generator().manual_seed(16))
    sampled = SampledTargets(target.indices.to(torch.uint16), counts.to(torch.uint8))
    check(student, sampled, None, backend, soft_weight=1.0)


def test_reference_row_chunks(monkeypatch):
    """The PyTorch reference in chunks of 3 rows: a chunk with ignored rows, one with every row ignored,
    and a short last chunk."""
    import fastkd.reference_sparse as reference_sparse
    monkeypatch.setattr(reference_sparse, "CHUNK_ELEMENTS", 3 * 45)
    student, target, _ = make_topk((11, 45), 6, seed=17)
    labels = make_labels((11,), 45, ignored=[1, 3, 4, 5])
    check(student, target, labels, "torch", divergence="jsd", beta=0.4)
    check(student, target, "teacher", "torch", tail="renormalize", temperature=1.0)
