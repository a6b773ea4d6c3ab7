"""Ahead-of-time compilation of every Triton kernel specialization for real GPUs (sm_80, sm_90),
without a GPU: Triton IR -> PTX -> cubin with the ptxas that ships with Triton.

The interpreter that runs the kernels in the other tests never invokes the GPU compiler, so this
catches what only the compiler rejects (loop-carried or branch types that differ, constexpr
misuse) and register spills at the default launch settings. The list of specializations lives
next to each kernel (``aot_specializations()``), the list of kernel modules in
``fastkd.kernels.aot.AOT_MODULES`` (one line per kernel family).
"""
import json
import os
import subprocess
import sys

import pytest

from fastkd.kernels import aot
from fastkd.kernels import kd_loss as dense
from fastkd.kernels import kd_sparse as sparse
from paths import ROOT


@pytest.fixture(scope="module")
def aot_records(tmp_path_factory):
    pytest.importorskip("triton.backends.nvidia")
    out = tmp_path_factory.mktemp("aot") / "records.json"
    # @triton.jit reads TRITON_INTERPRET at import: compile in a process without it
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "fastkd.kernels.aot", "--json", str(out)],
                            env=env, capture_output=True, text=True, timeout=1200)
    assert out.exists(), result.stderr[-3000:]
    return json.loads(out.read_text()), result


def test_every_specialization_compiles_for_sm80_and_sm90(aot_records):
    records, result = aot_records
    errors = [(r["module"], r["name"], r["arch"], r["error"]) for r in records if "error" in r]
    assert not errors, errors[:3]
    expected = {(module, spec["name"], arch) for module in aot.AOT_MODULES
                for spec in __import__(module, fromlist=["x"]).aot_specializations()
                for _, arch in aot.TARGETS}
    assert {(r["module"], r["name"], r["arch"]) for r in records} == expected
    assert {r["arch"] for r in records} == {"sm_80", "sm_90"}


def test_no_register_spills_at_default_settings(aot_records):
    records, result = aot_records
    spilling = [(r["name"], r["arch"], r["registers"], r["spill_store_bytes"],
                 r["spill_load_bytes"]) for r in records
                if r.get("spill_store_bytes") or r.get("spill_load_bytes")]
    assert not spilling, spilling
    assert all(0 < r["registers"] <= 255 for r in records)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_the_list_covers_what_the_benchmarks_launch():
    """Each (V, dtypes, mode) of the GPU presets launches a specialization in the AOT list."""
    sys.path.insert(0, ROOT)
    from benchmarks.presets import get_preset
    compiled = {(tuple(sorted(spec["constexprs"].items())), spec["signature"]["student_ptr"],
                 spec["signature"]["teacher_ptr"], spec["num_warps"])
                for spec in dense.aot_specializations()}
    names = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
    for case in get_preset("full").loss_cases:
        if case.teacher_k:   # a sparse teacher: the sparse family's own list
            continue
        constexprs, num_warps = dense.launch_config(
            case.vocab, divergence="forward_kl", soft_weight=0.5, hard_weight=0.5,
            temperature=case.temperature, has_labels=True, teacher_labels=False,
            write_grad=case.mode == "fwd+bwd", scale_in_memory=True)  # kept count on device
        key = (tuple(sorted(constexprs.items())), names[case.student_dtype],
               names[case.teacher_dtype], num_warps)
        assert key in compiled, case.id


def test_the_sparse_list_covers_what_the_benchmarks_launch():
    """Each sparse-teacher case of the GPU and sparse presets (top-k ``TopKLogits`` with int32
    ids, bucket tail, hard labels) launches a specialization in the sparse AOT list; the fused
    linear + KD path launches the same kernels on its chunks (same V, dtypes and options)."""
    sys.path.insert(0, ROOT)
    from benchmarks.presets import get_preset
    compiled = {(tuple(sorted(spec["constexprs"].items())), spec["signature"]["student_ptr"],
                 spec["signature"]["values_ptr"], spec["signature"]["ids_ptr"], spec["num_warps"])
                for spec in sparse.aot_specializations()}
    names = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
    cases = [case for name in ("full", "sparse") for case in get_preset(name).loss_cases
             if case.teacher_k]
    assert cases
    for case in cases:
        constexprs, num_warps = sparse.launch_config(
            case.vocab, case.teacher_k, divergence="forward_kl", soft_weight=0.5,
            hard_weight=0.5, tail="bucket", sampled=False, has_labels=True,
            teacher_labels=False, temperature=case.temperature, write_grad=case.mode == "fwd+bwd")
        key = (tuple(sorted(constexprs.items())), names[case.student_dtype],
               names[case.teacher_dtype], "*i32", num_warps)
        assert key in compiled, case.id
