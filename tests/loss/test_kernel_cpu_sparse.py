"""The compiled CPU kernel of the sparse-teacher loss (kernels/kd_sparse_cpu.c through
kernels/kd_sparse_cpu.py) against the float64 reference (tests/reference_sparse.py): loss and
gradient over divergences, tails, temperatures, label modes, student / value / id dtypes, odd V
and K, -inf entries (student and teacher), sampled counts with padding, ignored rows,
reductions, (B, S, V) views read in place, threads; plus the kernel's own label count / sum
and its guards. Tolerances: tests/sparse_inputs.py (fp32 1e-5; fp16 / bf16 gradients two
roundings of their dtype).
"""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import cpu_isas
from fastkd import SampledTargets, TopKLogits, dispatch, kd_loss
from fastkd.kernels import cpu_library
from fastkd.options import LossOptions
from loss_inputs import assert_close_scaled, make_labels
from sparse_inputs import check, make_padded_counts, make_topk, reference, run_loss

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")

MINUS_INF = float("-inf")
COMBOS = [(divergence, beta, tail) for tail in ("bucket", "renormalize")
          for divergence, beta in (("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3))]
COMBOS.append(("forward_kl", 0.5, "ignore"))


@pytest.fixture(autouse=True, params=("installed",) + cpu_isas.LEVELS)
def kernel(request, level_builds, monkeypatch):
    """Each test runs on the installed kernel and on each x86-64 level's row code built alone
    (tests/cpu_isas.py)."""
    if request.param != "installed":
        cpu_isas.use_level(request.param, level_builds, monkeypatch, request)
    if dispatch.compiled_kernel("sparse") is None:
        from fastkd.kernels import kd_sparse_cpu
        pytest.skip(f"sparse CPU kernel unavailable: {kd_sparse_cpu.unavailable_reason()}")
    from fastkd.kernels import kd_sparse_cpu
    return kd_sparse_cpu


def padded_target(shape, k, temperature, seed, dtype=torch.float32):
    """Top-k rows with a -inf teacher entry (row 0), a row of padding only (row 1) and a -inf
    student logit at a kept id whose teacher value is -inf too (row 2)."""
    student, target, _ = make_topk(shape, k, temperature, seed=seed, dtype=dtype)
    values = target.values.clone()
    values.view(-1, k)[0, -1] = MINUS_INF
    values.view(-1, k)[1] = MINUS_INF
    values.view(-1, k)[2, 1] = MINUS_INF
    student = student.clone()
    flat = student.view(-1, shape[-1])
    flat[2, target.indices.view(-1, k)[2, 1].long()] = MINUS_INF
    return student, target._replace(values=values)


@pytest.mark.parametrize("label_mode", ["none", "tensor", "teacher"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7, 3.0])
@pytest.mark.parametrize("divergence, beta, tail", COMBOS)
def test_grid_against_reference(divergence, beta, tail, temperature, label_mode):
    """Odd V and K; T = 2, 3 use the kernel's power shortcut for the hard term's exponentials,
    0.7 a second exponential."""
    student, target = padded_target((6, 203), 7, temperature, seed=31)
    labels = {"none": None, "teacher": "teacher",
              "tensor": make_labels((6,), 203, ignored=[4])}[label_mode]
    check(student, target, labels, "torch", tail=tail, temperature=temperature,
          divergence=divergence, beta=beta, soft_weight=0.6, hard_weight=0.45)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
@pytest.mark.parametrize("divergence, beta, tail", [("forward_kl", 0.5, "bucket"),
                                                    ("jsd", 0.3, "bucket"),
                                                    ("reverse_kl", 0.5, "renormalize"),
                                                    ("forward_kl", 0.5, "ignore")])
def test_rows_longer_than_a_chunk(divergence, beta, tail, temperature):
    """Rows of several 1024-column chunks whose maximum grows from chunk to chunk (each chunk's
    exponentials rescaled to the final maximum), kept ids in every chunk, a row of -inf outside
    its kept ids up to its last chunk."""
    student, target = padded_target((4, 3333), 40, temperature, seed=38)
    student = student + torch.linspace(-8, 8, 3333)
    outside = torch.ones(3333, dtype=torch.bool).scatter(0, target.indices[3].long(), False)
    outside[3100:] = False
    student[3, outside] = MINUS_INF   # (a kept id at -inf makes forward KL infinite)
    labels = torch.tensor([5, 3200, -100, 3300])
    check(student, target, labels, "torch", tail=tail, temperature=temperature,
          divergence=divergence, beta=beta)
    check(student.to(torch.bfloat16), target, "teacher", "torch", tail=tail,
          temperature=temperature, divergence=divergence, beta=beta)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_minus_inf_chunks_before_very_negative_logits(temperature):
    """Whole chunks of -inf before logits near -300 (the final maximum): those chunks' zeros
    stay zeros (a finite rescaling factor from them would overflow)."""
    generator = torch.Generator().manual_seed(40)
    student = torch.randn(3, 2600, generator=generator) - 300.0
    student[:, :2100] = MINUS_INF
    teacher = torch.randn(3, 2600, generator=generator)
    top = teacher[:, 2100:].topk(8)
    target = TopKLogits(top.values, top.indices + 2100,
                        torch.logsumexp(teacher.double() / temperature, -1).float(), temperature)
    for tail in ("bucket", "ignore", "renormalize"):
        loss, grad = check(student, target, torch.tensor([2200, 5, 2599]), "torch", tail=tail,
                           temperature=temperature, reduction="none")
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("values_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_dtypes(dtype, values_dtype, ids_dtype):
    """fp32 / fp16 / bf16 students (V not a multiple of the vector width), every value and id
    dtype (uint8 ids are converted by the launcher, the rest read as they are)."""
    student, target = padded_target((5, 250), 9, 1.0, seed=32, dtype=dtype)
    target = target._replace(values=target.values.to(values_dtype),
                             indices=target.indices.to(ids_dtype))
    check(student, target, make_labels((5,), 250, ignored=[3]), "torch", divergence="jsd",
          beta=0.4)


@pytest.mark.parametrize("counts_dtype", [torch.int32, torch.int64, torch.float32])
@pytest.mark.parametrize("divergence, tail", [("forward_kl", "bucket"), ("jsd", "bucket"),
                                              ("reverse_kl", "renormalize"),
                                              ("forward_kl", "ignore")])
def test_sampled_counts(divergence, tail, counts_dtype):
    """Counts with count-0 padding (repeating a drawn id and each other), teacher labels."""
    student, ids, counts = make_padded_counts(5, 61, 8, seed=33, max_count=5,
                                              counts_dtype=counts_dtype)
    target = SampledTargets(ids, counts)
    check(student, target, "teacher", "torch", tail=tail, divergence=divergence, beta=0.4)
    check(student, target, make_labels((5,), 61, ignored=[0]), "torch", tail=tail,
          divergence=divergence, beta=0.4, hard_weight=0.0)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_batch_sequence_view_read_in_place(reduction, kernel, monkeypatch):
    """A (B, S, V) ``logits[:, :-1]`` view (its rows do not merge) reaches the kernel as that
    view, no copy; the gradient flows back to the full tensor."""
    full, target = padded_target((3, 5, 77), 6, 1.0, seed=34)
    seen = []

    def recording(student_logits, *args, **kwargs):
        seen.append((student_logits.data_ptr(), student_logits.dim()))
        return kernel.kd_sparse_cpu(student_logits, *args, **kwargs)
    recording.reduces = True
    monkeypatch.setattr(dispatch, "compiled_kernel",
                        lambda family: recording if family == "sparse" else None)
    leaf = full.clone().requires_grad_()
    short = target.map_tensors(lambda part: part[:, :-1])
    labels = make_labels((3, 4), 77, ignored=[5])
    options = dict(reduction=reduction, divergence="reverse_kl", tail="bucket")
    loss = kd_loss(leaf[:, :-1], short, labels, **options)
    assert seen == [(leaf.data_ptr(), 3)]
    loss.backward(torch.ones_like(loss))
    want_loss, want_grad = reference(full[:, :-1], short, labels, torch.ones(loss.shape),
                                     **options)
    assert_close_scaled(loss.detach(), want_loss, 1e-5, floor=1.0)
    assert_close_scaled(leaf.grad[:, :-1], want_grad, 1e-5)
    assert not leaf.grad[:, -1].any()


def test_in_place_gradient_into_a_view():
    """grad_inplace on a (B, S, V) view: the kernel reads every row element before writing
    that row's gradient over it."""
    full, target = padded_target((2, 6, 40), 5, 1.0, seed=35)
    short = target.map_tensors(lambda part: part[:, 1:])
    labels = make_labels((2, 5), 40, ignored=[3])
    _, want_grad, upstream = run_loss(full[:, 1:].contiguous(), short, labels, "torch")
    leaf = full.clone().requires_grad_()
    logits = leaf * 1.0
    loss = kd_loss(logits[:, 1:], short, labels, grad_inplace=True)
    loss.backward(upstream)
    assert_close_scaled(leaf.grad[:, 1:], want_grad, 1e-6)
    assert not leaf.grad[:, 0].any()


def test_threads_match_one_thread(kernel):
    """Enough elements to split the rows over threads: the same numbers as one thread."""
    student, target = padded_target((40, 4001), 16, 1.0, seed=36)
    labels = make_labels((40,), 4001, ignored=[7])
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            grad = torch.empty_like(student)
            loss = kernel.kd_sparse_cpu(
                student, target.indices, target.values, target.lse, None, labels,
                LossOptions(), grad=grad)
            results.append((loss, grad))
    finally:
        torch.set_num_threads(threads)
    assert 40 * 4001 >= cpu_library.THREADED_ELEMENTS
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    check(student, target, labels, "torch")


def test_label_count_sum_and_guards(kernel):
    """One call counts the kept rows and the bad labels and sums the row losses (batchmean:
    divided by the kept rows, which scales the gradient too); a bad label, a real id outside
    [0, V) or a NaN / +inf student logit makes its row NaN (loss and gradient), never an
    out-of-bounds access; an ignored row is 0 whatever it holds."""
    student, target, _ = make_topk((5, 30), 4, seed=37)
    student = student.clone()
    student[3, 2] = float("nan")
    student[1] = float("nan")
    ids = target.indices.clone()
    ids[2, 1] = 1000
    labels = torch.tensor([0, -100, 3, 4, 99])
    grad = torch.empty_like(student)
    options = dict(grad_scale=1.0, grad=grad)
    rows, total, counts = kernel.kd_sparse_rows_cpu(
        student, ids, target.values, target.lse, None, labels, LossOptions(),
        reduction="batchmean", **options)
    assert counts == (4, 1)
    assert torch.isfinite(rows[[0, 1]]).all() and rows[1] == 0 and not grad[1].any()
    assert torch.isnan(rows[[2, 3, 4]]).all() and torch.isnan(grad[[2, 3, 4]]).all()
    rows, total, _ = kernel.kd_sparse_rows_cpu(
        student[:1], ids[:1], target.values[:1], target.lse[:1], None, labels[:1],
        LossOptions(), reduction="batchmean", **dict(options, grad=grad[:1]))
    assert total == pytest.approx(rows[0].item(), rel=1e-6)
    one_kept = grad[0].clone()
    rows, total, counts = kernel.kd_sparse_rows_cpu(
        student[:2], ids[:2], target.values[:2], target.lse[:2], None,
        torch.tensor([0, 5]), LossOptions(), reduction="batchmean", **dict(options, grad=grad[:2]))
    assert counts == (2, 0)
    assert total != total   # row 1 is NaN and kept
    torch.testing.assert_close(grad[0] * 2, one_kept)   # the gradient scaled by 1 / kept


def test_turned_off_by_the_environment():
    """FASTKD_CPU_KERNEL=0: the sparse kernel is not loaded, the reason says so, and the ATen
    path gives the loss."""
    script = textwrap.dedent("""
        import torch
        from fastkd import TopKLogits, dispatch, kd_loss
        from fastkd.kernels import kd_sparse_cpu
        assert dispatch.compiled_kernel("sparse") is None
        print(kd_sparse_cpu.unavailable_reason())
        top = torch.randn(3, 10).topk(2)
        print(float(kd_loss(torch.randn(3, 10), TopKLogits(top.values, top.indices,
                                                           torch.zeros(3) + 5))))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "FASTKD_CPU_KERNEL": "0"}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "FASTKD_CPU_KERNEL=0" in result.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extra_memory_is_the_gradient(dtype):
    """Forward + backward on a ``logits[:, :-1]`` view holds one logits-sized buffer (the
    gradient) and K-sized tensors from torch's allocator (the kernel's per-thread row buffers,
    2 V float32 each, are its own): at most 1.1 logits buffers, no (N, V) temporary or copy."""
    from torch.profiler import ProfilerActivity, profile
    full, target = padded_target((4, 65, 3001), 32, 1.0, seed=39, dtype=dtype)
    short = target.map_tensors(lambda part: part[:, :-1])
    labels = make_labels((4, 64), 3001, ignored=[3])
    view = full[:, :-1].detach().requires_grad_()   # a leaf whose rows do not merge
    logits_bytes = 4 * 64 * 3001 * full.element_size()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        kd_loss(view, short, labels).backward()
    events = sorted((event for event in profiler.profiler.kineto_results.events()
                     if event.name() == "[memory]"), key=lambda event: event.start_ns())
    held = peak = 0
    for event in events:
        held += event.nbytes()
        peak = max(peak, held)
    assert logits_bytes * 0.9 <= peak <= 1.1 * logits_bytes, peak / logits_bytes


def rows_call(kernel, target, labels=None, mass_temperature=1.0, student=None):
    """kd_sparse_rows_cpu with the data checks on (no gradient): its first result."""
    num_rows = target.indices.shape[0]
    student = torch.zeros(num_rows, 20) if student is None else student
    sampled = isinstance(target, SampledTargets)
    return kernel.kd_sparse_rows_cpu(
        student, target.indices, None if sampled else target.values,
        None if sampled else target.lse, target.counts if sampled else None, labels,
        LossOptions(), grad_scale=1.0, grad=None, check_values=True,
        mass_temperature=mass_temperature)[0]


def test_the_kernel_checks_the_data(kernel, monkeypatch):
    """Valid targets never reach the ATen data check (the kernel checks them in its call);
    each kind of bad data is caught by the kernel before it writes anything (and then named by
    fastkd.checks.check_sparse_values); padding may repeat ids; ignored rows are checked for
    their id range only."""
    student, target, _ = make_topk((3, 20), 4, seed=41)
    sampled = SampledTargets(target.indices, torch.tensor([[1, 2, 0, 0], [3, 0, 0, 1],
                                                           [1, 1, 1, 1]]))
    import fastkd.sparse_loss as sparse_loss

    def refuse(*args, **kwargs):
        raise AssertionError("check_sparse_values ran for valid data")

    with monkeypatch.context() as patch:
        patch.setattr(sparse_loss, "check_sparse_values", refuse)
        for valid in (target, sampled):
            kd_loss(student.clone().requires_grad_(), valid, torch.tensor([1, -100, 2])).backward()
    assert rows_call(kernel, target) is not kernel.REFUSED
    changed = []
    for name, value in (("ids", 20), ("ids", -1), ("duplicate", None), ("values", math.nan),
                        ("lse", math.nan), ("lse", -3.0)):
        part = target.indices.clone() if name in ("ids", "duplicate") else \
            target.values.clone() if name == "values" else target.lse.clone()
        if name == "duplicate":
            part[2, 1] = part[2, 0]
        elif name == "lse":
            part[1] = value   # -3: the kept mass is far past 1
        else:
            part[1, 2] = value
        field = {"ids": "indices", "duplicate": "indices"}.get(name, name)
        changed.append(target._replace(**{field: part}))
    for bad in changed:
        assert rows_call(kernel, bad) is kernel.REFUSED
    assert rows_call(kernel, changed[-1], mass_temperature=None) is not kernel.REFUSED
    assert rows_call(kernel, target, torch.tensor([0, 20, 1])) is kernel.REFUSED   # label
    for counts in ([[1, 2, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]],
                   [[1, -2, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]],
                   [[1, math.inf, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]):
        assert rows_call(kernel, sampled._replace(counts=torch.tensor(counts))) is kernel.REFUSED
    # padding may repeat ids; an ignored row may hold anything but an out-of-range id
    ids = target.indices.clone()
    ids[0, 3] = ids[0, 0]
    values = target.values.clone()
    values[0, 3] = MINUS_INF
    values[1] = math.nan
    padded = target._replace(indices=ids, values=values)
    assert rows_call(kernel, padded, torch.tensor([1, -100, 2])) is not kernel.REFUSED
    ids[1, 0] = 20
    assert rows_call(kernel, padded._replace(indices=ids),
                     torch.tensor([1, -100, 2])) is kernel.REFUSED


def test_a_row_flagged_by_the_kernel_but_within_the_mass_limit(kernel):
    """The kernel's mass test errs towards flagging (a margin of 1e-5 below the limit): such a
    row is then checked by fastkd.checks, passes, and its loss comes from the kernel."""
    student = torch.randn(2, 20, generator=torch.Generator().manual_seed(42))
    values = torch.log(torch.tensor([[1.000995, 1e-9], [0.5, 0.25]]))
    target = TopKLogits(values, torch.tensor([[3, 4], [5, 6]]), torch.zeros(2))
    assert rows_call(kernel, target) is kernel.REFUSED
    check(student, target, None, "torch")
