"""Single-instruction-set builds of the compiled CPU kernels.

The installed libraries carry one copy of the row code per x86-64 level (``target_clones`` in
kernels/kd_loss_cpu_math.h: x86-64-v4, x86-64-v3 and the baseline) and the loader runs only the
one it picks for this machine. The kernel tests also run each copy this machine can execute,
built here on its own (``-march=<level> -DROW_TARGETS=``) and loaded in place of the installed
library through ``fastkd.kernels.cpu_library.library_path``.
"""
import ast
import functools
import importlib.machinery
import os
import platform
import shutil
import subprocess

import pytest

from fastkd.kernels import cpu_library
from paths import ROOT

LEVELS = ("x86-64-v4", "x86-64-v3", "x86-64")
# /proc/cpuinfo flags each level needs (x86-64-v2's are implied by v3's here: every CPU with
# these has them; "abm" is lzcnt)
_V3_FLAGS = {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"}
FLAGS = {"x86-64": set(), "x86-64-v3": _V3_FLAGS,
         "x86-64-v4": _V3_FLAGS | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}}
LIBRARIES = {"_kd_loss_cpu": "kd_loss_cpu.c", "_kd_sparse_cpu": "kd_sparse_cpu.c"}


def _setup_compile_flags():
    """The dense kernel's ``extra_compile_args`` list in setup.py (which cannot be imported: it
    runs ``setup()``), read from its source; the sparse kernel's are a copy of them."""
    with open(os.path.join(ROOT, "setup.py")) as source:
        tree = ast.parse(source.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extra_compile_args" \
                and isinstance(node.value, ast.List):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no extra_compile_args list")


FLAGS_OF_SETUP = _setup_compile_flags()


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=None)
def skip_reason(level):
    """Why ``level`` cannot be built and run here, or None."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return "single-level builds are for x86-64 Linux"
    if shutil.which("gcc") is None:
        return "no gcc"
    flags = _cpu_flags()
    if flags is None or not FLAGS[level] <= flags:
        return f"this CPU does not run {level}"
    accepted = subprocess.run(["gcc", f"-march={level}", "-E", "-x", "c", os.devnull],
                              capture_output=True, text=True, timeout=60)
    if accepted.returncode != 0:   # GCC before 11 has no x86-64-vN names
        return f"this gcc does not know -march={level}"
    return None


def build(level, folder):
    """Both kernels built for ``level`` alone into ``folder`` (under the installed names)."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    for library, source in LIBRARIES.items():
        command = ["gcc", *FLAGS_OF_SETUP, f"-march={level}", "-DROW_TARGETS=", "-shared",
                   "-fPIC", "-o", os.path.join(folder, library + suffix),
                   os.path.join(ROOT, "kernels", source), "-lm"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr}"
    return folder


@pytest.fixture(scope="session")
def level_builds(tmp_path_factory):
    """``get(level)``: the folder of ``level``'s build (built once per session)."""
    folders = {}

    def get(level):
        if level not in folders:
            folders[level] = build(level, str(tmp_path_factory.mktemp(level)))
        return folders[level]
    return get


def use_level(level, level_builds, monkeypatch, request):
    """Load the kernels from ``level``'s build for the rest of this test (skips where it cannot
    run here); the installed ones are looked up again afterwards."""
    reason = skip_reason(level)
    if reason:
        pytest.skip(reason)
    folder = level_builds(level)
    installed = cpu_library.library_path

    def library_path(name):
        path = os.path.join(folder, name + importlib.machinery.EXTENSION_SUFFIXES[0])
        return path if os.path.isfile(path) else installed(name)
    monkeypatch.setattr(cpu_library, "library_path", library_path)
    cpu_library.reload_all()
    from fastkd.kernels import kd_loss_cpu, kd_sparse_cpu
    for kernel in (kd_loss_cpu, kd_sparse_cpu):
        assert os.path.dirname(kernel.library_path()) == folder and kernel.available(), \
            kernel.unavailable_reason()
    request.addfinalizer(cpu_library.reload_all)
