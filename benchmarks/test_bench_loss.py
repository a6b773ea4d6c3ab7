"""Loss benchmarks: every (case, provider) of the preset, forward or forward+backward.

Each test: check the provider's loss and gradient against the float64 reference (the warm-up
call, which also compiles), time ``rounds`` calls with pytest-benchmark (each ends with a device
sync; clearing ``student.grad`` is untimed; ``grad_inplace`` cases time a copy of the student,
see benchmarks/providers.py), then record rows/s, GB/s, % of peak and, where the
preset asks, the peak extra memory in ``benchmark.extra_info``.
"""
import pytest

from benchmarks.memory import cpu_peak_extra, cuda_peak_extra, memory_metrics
from benchmarks.providers import (check_against_reference, liger_unavailable_reason, make_provider,
                                  make_step, rounds_for, student_for_grad_inplace,
                                  throughput_metrics, time_once)


def test_loss(benchmark, loss_case, provider, preset, device, environment, case_data):
    if provider == "liger" and liger_unavailable_reason(device):
        pytest.skip(f"liger: {liger_unavailable_reason(device)}")
    student, teacher, labels, reference_of = case_data(loss_case)
    reference = reference_of(provider)
    if loss_case.grad_inplace:   # the case's student is shared by its providers: keep it
        student = student_for_grad_inplace(student)
    loss_fn = make_provider(provider, loss_case, compile_backend=preset.compile_backend)
    step = make_step(loss_fn, student, teacher, labels, loss_case.mode, loss_case.grad_inplace)

    def clear_grad():
        student.grad = None

    clear_grad()  # inputs are shared by a case's providers
    loss = step()  # warm-up (compilation happens here) and the correctness check
    grad = step.grad if loss_case.grad_inplace else student.grad
    check = check_against_reference(loss_case, loss, grad, reference)
    del grad
    clear_grad()
    seconds_per_call = time_once(step)
    clear_grad()
    rounds = rounds_for(seconds_per_call, *preset.rounds_policy(loss_case))

    benchmark.group = f"loss {loss_case.group} {loss_case.dtypes} {loss_case.mode}"
    benchmark.pedantic(step, teardown=clear_grad, rounds=rounds)
    clear_grad()
    if benchmark.enabled:  # (not under --benchmark-disable)
        benchmark.extra_info.update(
            kind="loss", provider=provider, case=loss_case.as_dict(), check=check,
            **throughput_metrics(loss_case, benchmark.stats.stats.median,
                                 environment["peak_bandwidth_gbps"]))
    assert check["ok"], f"{provider} disagrees with the float64 reference on {loss_case.id}: {check}"

    if benchmark.enabled and preset.measures_memory(loss_case, provider):
        if device == "cuda":
            metrics = memory_metrics(cuda_peak_extra(step, student), loss_case)
            clear_grad()
        else:
            metrics = cpu_peak_extra(provider, loss_case, compile_backend=preset.compile_backend)
        benchmark.extra_info.update(metrics)

