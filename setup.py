"""Build step for the compiled pieces of fastkd: the CPU kernels of the KD loss against dense
teachers (kernels/kd_loss_cpu.c) and sparse ones (kernels/kd_sparse_cpu.c), plain C loaded with
ctypes (kernels/kd_loss_cpu.py, kernels/kd_sparse_cpu.py). Everything else is configured in
pyproject.toml.

Each extension is optional: where no C compiler works the install goes on without it, and the
PyTorch fallback's ATen path runs instead (``fastkd.kernels.kd_loss_cpu.unavailable_reason()``
says so). It is built with OpenMP where the compiler has it (its threads are then torch's own:
torch loads the same libgomp.so.1), else single-threaded.
"""
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP_FLAGS = ["-fopenmp"]

CPU_KERNEL = Extension(
    "fastkd.kernels._kd_loss_cpu",
    sources=["kernels/kd_loss_cpu.c"],
    depends=["kernels/kd_loss_cpu_math.h"],
    # -O3 for the vector loops; no -ffast-math (NaN, inf and -inf handling is part of the
    # contract); the AVX-512, AVX2 + FMA or baseline copy of the row code is chosen at run
    # time (target_clones; tests/cpu_isas.py builds and tests each copy on its own)
    extra_compile_args=["-O3", "-std=gnu11", "-Wno-psabi", "-fno-math-errno"],
    extra_link_args=[],
    optional=True,
)

SPARSE_CPU_KERNEL = Extension(
    "fastkd.kernels._kd_sparse_cpu",
    sources=["kernels/kd_sparse_cpu.c"],
    depends=["kernels/kd_loss_cpu_math.h", "kernels/kd_sparse_cpu_parts.h"],
    extra_compile_args=list(CPU_KERNEL.extra_compile_args),
    extra_link_args=[],
    optional=True,
)


class BuildWithOptionalOpenMP(build_ext):
    """Build the kernel with OpenMP; if that fails (a compiler without it), once more without."""

    def build_extension(self, ext):
        plain_compile, plain_link = list(ext.extra_compile_args), list(ext.extra_link_args)
        ext.extra_compile_args = plain_compile + OPENMP_FLAGS
        ext.extra_link_args = plain_link + OPENMP_FLAGS
        try:
            super().build_extension(ext)
        except Exception:   # CompileError / LinkError: retry single-threaded
            ext.extra_compile_args, ext.extra_link_args = plain_compile, plain_link
            super().build_extension(ext)


setup(ext_modules=[CPU_KERNEL, SPARSE_CPU_KERNEL], cmdclass={"build_ext": BuildWithOptionalOpenMP})
