"""Start-up and host-sync benchmarks: what the first ``kd_loss`` call costs in a
fresh process beyond ``import torch`` (and whether it loads the compiler stack), how long
``fastkd --help`` and a sub-command's argument error (``fastkd cache`` without ``--out``) take
and whether they import torch, and (CUDA only) how many host syncs one
``kd_loss`` step makes with each option. Each measurement runs in fresh subprocesses; the
figure is the best of ``rounds``."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks.env import REPO_ROOT

FIRST_CALL = """
import json, sys, time
start = time.perf_counter()
import torch
imported = time.perf_counter()
before = set(sys.modules)
import fastkd
student = torch.randn(64, 100, requires_grad=True)
loss = fastkd.kd_loss(student, torch.randn(64, 100), torch.randint(0, 100, (64,)),
                      temperature=2.0)
loss.backward()
done = time.perf_counter()
new = set(sys.modules) - before
heavy = [m for m in new if m.startswith(("torch._dynamo", "torch._inductor", "sympy"))]
print(json.dumps({"import_torch": imported - start, "first_call": done - imported,
                  "new_modules": len(new), "heavy": len(heavy)}))
"""

CLI_HELP = """
import contextlib, io, json, sys, time
start = time.perf_counter()
from fastkd.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main(["--help"])
    except SystemExit:
        pass
print(json.dumps({"seconds": time.perf_counter() - start, "torch": "torch" in sys.modules}))
"""

CLI_ARGUMENT_ERROR = """
import contextlib, io, json, sys, time
start = time.perf_counter()
from fastkd.cli import main
error = io.StringIO()
with contextlib.redirect_stderr(error):
    try:
        main(["cache", "--teacher", "fastkd.models:DigitsTeacherCNN", "--dataset", "digits"])
    except SystemExit as exit:
        code = exit.code
assert code == 2 and "--out" in error.getvalue(), (code, error.getvalue())
print(json.dumps({"seconds": time.perf_counter() - start, "torch": "torch" in sys.modules}))
"""

SYNCS = """
import json, torch
from torch.utils._python_dispatch import TorchDispatchMode
import fastkd

class Count(TorchDispatchMode):
    count = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))

student = torch.randn(256, 32000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
teacher = torch.randn(256, 32000, device="cuda", dtype=torch.bfloat16)
labels = torch.randint(0, 32000, (256,), device="cuda")
result = {}
for name, target, options in (("default", labels, {}), ("sync_free", labels,
                              {"validate_labels": False}), ("no_labels", None, {})):
    fastkd.kd_loss(student, teacher, target, **options).backward()   # warm-up (compile)
    with Count() as counter:
        fastkd.kd_loss(student, teacher, target, **options).backward()
    result[name] = counter.count
print(json.dumps(result))
"""


def _python(code: str) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, cwd=REPO_ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _rounds(preset) -> int:
    return max(1, min(5, preset.min_rounds))


def test_first_call(benchmark, preset):
    runs = []
    benchmark.group = "startup"
    benchmark.pedantic(lambda: runs.append(_python(FIRST_CALL)), rounds=_rounds(preset))
    best = min(runs, key=lambda run: run["first_call"])
    benchmark.extra_info.update(
        kind="startup", metric="first_call", seconds=best["first_call"],
        import_torch_seconds=best["import_torch"], new_modules=best["new_modules"],
        compiler_stack_imported=best["heavy"] > 0)


def test_cli_help(benchmark, preset):
    runs = []
    benchmark.group = "startup"
    benchmark.pedantic(lambda: runs.append(_python(CLI_HELP)), rounds=_rounds(preset))
    best = min(runs, key=lambda run: run["seconds"])
    benchmark.extra_info.update(kind="startup", metric="cli_help", seconds=best["seconds"],
                                torch_imported=any(run["torch"] for run in runs))


def test_cli_argument_error(benchmark, preset):
    runs = []
    benchmark.group = "startup"
    benchmark.pedantic(lambda: runs.append(_python(CLI_ARGUMENT_ERROR)), rounds=_rounds(preset))
    best = min(runs, key=lambda run: run["seconds"])
    benchmark.extra_info.update(kind="startup", metric="cli_argument_error",
                                seconds=best["seconds"],
                                torch_imported=any(run["torch"] for run in runs))


def test_host_syncs_per_step(benchmark, device):
    if device != "cuda":
        pytest.skip("host syncs are counted on CUDA (a CPU read is not a device sync)")
    runs = []
    benchmark.group = "startup"
    benchmark.pedantic(lambda: runs.append(_python(SYNCS)), rounds=1)
    benchmark.extra_info.update(kind="startup", metric="host_syncs", **runs[-1])
