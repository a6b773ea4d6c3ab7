"""Triton kernels of fastkd, shipped as ``fastkd.kernels`` (source folder: top-level kernels/)."""
