"""fastkd.linear_kd_loss's chunked pass: chunk sizes from ``chunk_rows`` and the budget, ignored
rows dropped before the matmul, ``torch.compile`` with ``fullgraph``, the Triton backend (in
Triton's interpreter here), no compiler stack on the first eager call, and peak memory bounded by
the chunk. Cases, reference and tolerances: tests/linear_cases.py.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastkd import TeacherHead, linear_kd_loss
from linear_cases import (FP32_TOL, assert_close, fused, make_case, reference, student_params,
                          teacher_of)


@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 23, 1000])
def test_chunk_sizes_and_batch_seq_hidden(chunk_rows):
    """(B, S, H) inputs, chunk sizes that do and do not divide the kept rows."""
    case = make_case(rows=(3, 9), seed=2)
    teacher = teacher_of(case, "head")
    got = fused(case, teacher, case["labels"], chunk_rows=chunk_rows, temperature=3.0)
    assert_close(got, reference(case, teacher, case["labels"], temperature=3.0), FP32_TOL)


def test_chunk_rows_come_from_the_budget(monkeypatch):
    """Without chunk_rows, the chunk is budget // bytes-per-row (one fp32 row of student logits
    and one of a teacher head's logits here); chunk_rows overrides it."""
    import fastkd.linear_chunks as chunks   # the chunked pass calls the kernel family
    seen = []
    real = chunks.dispatch

    def recording_dispatch(backend, family="dense", device=None, student=None):
        kernel = real(backend, family, device, student)

        def record(student, *args, **kwargs):
            seen.append(student.shape[0])
            return kernel(student, *args, **kwargs)
        return record
    monkeypatch.setattr(chunks, "dispatch", recording_dispatch)
    case = make_case(rows=(50,), vocab=64, ignored=0)
    teacher = teacher_of(case, "head")
    per_row = 64 * 4 * 2
    fused(case, teacher, case["labels"], chunk_budget_bytes=per_row * 8)
    assert seen == [8] * 6 + [2]
    seen.clear()
    fused(case, teacher, case["labels"], chunk_budget_bytes=per_row * 8, chunk_rows=20)
    assert seen == [20, 20, 10]
    seen.clear()   # a softcap needs the gradient beside the logits: a third buffer per row
    fused(case, teacher, case["labels"], chunk_budget_bytes=64 * 4 * 3 * 10, student_softcap=5.0)
    assert seen == [10] * 5
    seen.clear()   # a bf16 softcap: bf16 raw logits beside the float32 capped ones (gradient
    half = make_case(rows=(50,), vocab=64, ignored=0, dtype=torch.bfloat16)   # over those)
    fused(half, teacher_of(half, "logits"), half["labels"], chunk_budget_bytes=64 * 6 * 10,
          student_softcap=5.0)
    assert seen == [10] * 5
    seen.clear()   # the default budget is per side: the head's chunk comes on top
    monkeypatch.setattr(chunks, "DEFAULT_CHUNK_BUDGET_BYTES", 64 * 4 * 16)
    fused(case, teacher, case["labels"])
    assert seen == [16] * 3 + [2]
    seen.clear()
    fused(case, teacher_of(case, "logits"), case["labels"])
    assert seen == [16] * 3 + [2]
    seen.clear()   # and stops at DEFAULT_MAX_CHUNK_ROWS
    monkeypatch.setattr(chunks, "DEFAULT_MAX_CHUNK_ROWS", 12)
    fused(case, teacher, case["labels"])
    assert seen == [12] * 4 + [2]


def test_ignored_rows_are_dropped_before_the_matmul(monkeypatch):
    """Only kept rows reach the kernel; batchmean divides by their number; the hidden-state
    gradient of an ignored row is exactly 0; 'none' gives 0 there."""
    import fastkd.linear_chunks as chunks   # the chunked pass calls the kernel family
    seen = []
    real = chunks.dispatch
    monkeypatch.setattr(chunks, "dispatch", lambda backend, family="dense", device=None, _=None: (
        lambda rows, *a, **k: seen.append(rows.shape[0]) or real(backend, family, device)(
            rows, *a, **k)))
    case = make_case(rows=(30,), ignored=0.5, seed=3)
    kept = int((case["labels"] != -100).sum())
    assert 5 < kept < 25
    teacher = teacher_of(case, "logits")
    got = fused(case, teacher, case["labels"], chunk_rows=4)
    assert sum(seen) == kept
    assert_close(got, reference(case, teacher, case["labels"]), FP32_TOL)
    ignored = case["labels"] == -100
    assert torch.equal(got[1][0][ignored], torch.zeros_like(got[1][0][ignored]))
    with torch.no_grad():
        rows = linear_kd_loss(case["hidden"], case["weight"], teacher, case["labels"],
                              student_bias=case["bias"], reduction="none")
    assert rows.shape == (30,) and bool((rows[ignored] == 0).all()) and bool((rows[~ignored] > 0).all())


def test_all_rows_ignored_gives_zero_loss_and_zero_gradients():
    case = make_case(rows=(6,), ignored=0)
    labels = torch.full((6,), -100)
    loss, grads = fused(case, teacher_of(case, "head"), labels)
    assert loss.item() == 0.0 and all(bool((g == 0).all()) for g in grads)


def test_torch_compile_fullgraph():
    case = make_case(rows=(2, 5), seed=12)
    teacher = teacher_of(case, "head", 1.0, 5.0)

    def step(hidden, weight, bias, teacher_hidden, labels):
        head = TeacherHead(teacher_hidden, case["teacher_weight"], softcap=5.0)
        return linear_kd_loss(hidden, weight, head, labels, student_bias=bias,
                              student_softcap=7.0, chunk_rows=3, temperature=2.0)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    args = (case["hidden"], case["weight"], case["bias"], teacher.hidden, case["labels"])
    loss = compiled(*args)
    grads = torch.autograd.grad(loss, student_params(case))
    eager = step(*args)
    torch.testing.assert_close(loss, eager)
    for grad, want in zip(grads, torch.autograd.grad(eager, student_params(case))):
        torch.testing.assert_close(grad, want)


@pytest.mark.parametrize("teacher_kind,divergence", [("logits", "forward_kl"), ("head", "jsd"),
                                                     ("topk", "forward_kl")])
def test_triton_backend(kernel_device, teacher_kind, divergence):
    case = make_case(rows=(2, 5), hidden=8, vocab=33, teacher_hidden=6, seed=13,
                     device=kernel_device)
    teacher = teacher_of(case, teacher_kind, 0.9, 6.0, temperature=2.0)
    options = dict(divergence=divergence, temperature=2.0)
    got = fused(case, teacher, case["labels"], chunk_rows=3, student_softcap=4.0,
                backend="triton", **options)
    want = reference(case, teacher, case["labels"], softcap=4.0, **options)
    assert_close(got, want, FP32_TOL, "triton")


def test_first_eager_call_imports_no_compiler_stack():
    """Like kd_loss: the eager path goes through an autograd.Function; the custom op (which would
    import torch._dynamo on its first call) is only used while torch.compile traces."""
    probe = textwrap.dedent("""
        import json, sys
        import torch, fastkd
        before = set(sys.modules)
        hidden = torch.randn(6, 4, requires_grad=True)
        weight = torch.randn(10, 4, requires_grad=True)
        head = fastkd.TeacherHead(torch.randn(6, 4), torch.randn(10, 4))
        fastkd.linear_kd_loss(hidden, weight, head, torch.arange(6), student_softcap=3.0).backward()
        print(json.dumps(sorted(set(sys.modules) - before)))
    """)
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=300, env=env, check=True)
    new = json.loads(result.stdout.strip().splitlines()[-1])
    heavy = [name for name in new if name.startswith(("torch._dynamo", "torch._inductor",
                                                      "sympy", "triton"))]
    assert not heavy, heavy[:20]


# ----------------------------------------------------------------------------- peak memory
def test_peak_memory_is_bounded_by_the_chunk_not_by_n():
    """8192 x 8192 fp32 logits would be 256 MiB (and the unfused path holds several such
    buffers). With a 16 MiB chunk budget the extra peak of one forward+backward (measured as
    benchmarks/memory.py does: torch's allocator peak plus the CPU kernel's row buffers) stays
    under budget + the gradients left behind (hidden and weight, 0.5 MiB each) + 24 MiB for the
    loss's work memory (the C kernel's row buffers, or the PyTorch path's chunk temporaries)."""
    from benchmarks.memory import cpu_step_peak
    rows, hidden_size, vocab = 8192, 16, 8192
    budget = 16 * 2**20
    torch.manual_seed(0)
    hidden = torch.randn(rows, hidden_size, requires_grad=True)
    weight = (0.3 * torch.randn(vocab, hidden_size)).requires_grad_()
    teacher = TeacherHead(torch.randn(rows, hidden_size), 0.3 * torch.randn(vocab, hidden_size))
    labels = torch.randint(0, vocab, (rows,))

    def step(rows=rows):
        head = TeacherHead(teacher.hidden[:rows], teacher.weight)
        linear_kd_loss(hidden[:rows], weight, head, labels[:rows], temperature=2.0,
                       chunk_budget_bytes=budget).backward()

    step(64)   # warm-up (lazy inits), at a few rows
    hidden.grad = weight.grad = None
    extra, _ = cpu_step_peak(step)
    full_logits = rows * vocab * 4
    gradients = (rows + vocab) * hidden_size * 4
    bound = budget + gradients + 24 * 2**20
    assert extra < bound, (extra, bound)
    assert bound < full_logits / 4   # a sixth of one full logits buffer; unfused holds >= 2

