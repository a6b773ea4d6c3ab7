"""fastkd's own writer of DistillKit's compressed format (the inverse of
:mod:`fastkd.cache.distillkit_codec`), for sample datasets and tests: least-squares curve in
float64, residuals quantized to the nearest level of each bin's ``max |residual| /
2**(bits-1)`` scale, ids bit-packed."""
import numpy as np

from fastkd.cache.distillkit_codec import (FLOAT_BYTES, CompressionConfig, design_matrix,
                                           evaluate_curve, round_to)


def floats_to_bytes(values: np.ndarray, dtype: str) -> np.ndarray:
    """``(..., n)`` floats (already representable in ``dtype``) -> ``(..., n * size)`` uint8."""
    values = np.asarray(values)
    if dtype == "bfloat16":
        words = (round_to(values, "bfloat16").view(np.uint32) >> 16).astype("<u2")
    else:
        words = values.astype({"float16": "<f2", "float32": "<f4", "float64": "<f8"}[dtype])
    size = values.shape[-1] * FLOAT_BYTES[dtype]
    return np.ascontiguousarray(words).view(np.uint8).reshape(values.shape[:-1] + (size,))


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of :func:`fastkd.cache.distillkit_codec.unpack_bits`: ``(P, n)`` ints ->
    ``(P, ceil(n * bits / 8))`` uint8."""
    values = np.asarray(values, np.int64)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    stream = ((values[..., None] >> shifts) & 1).astype(np.uint8).reshape(
        len(values), values.shape[-1] * bits)
    return np.packbits(stream, axis=-1)


def pack_words(values: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of :func:`fastkd.cache.distillkit_codec.unpack_words`."""
    per_word = 64 // bits
    values = np.asarray(values, np.uint64)
    pad = (-values.shape[1]) % per_word
    values = np.pad(values, ((0, 0), (0, pad))).reshape(len(values), -1, per_word)
    shifts = np.arange(per_word, dtype=np.uint64) * np.uint64(bits)
    return np.bitwise_or.reduce(values << shifts, axis=-1)


def encode_logprobs(values: np.ndarray, config: CompressionConfig) -> np.ndarray:
    """``(P, k)`` log-probs in rank order -> ``(P, logprob_bytes)`` uint8."""
    values = np.asarray(values, np.float64)
    positions = len(values)
    work = np.asarray(values, np.float32)
    if config.delta_encoding:
        work = np.concatenate([work[:, :1], work[:, 1:] - work[:, :-1]], axis=-1)
    chunks = [floats_to_bytes(round_to(work[:, :config.exact_k], config.exact_dtype),
                              config.exact_dtype)]
    approx = work[:, config.exact_k:].astype(np.float64)
    residual = approx
    if config.polynomial_terms:
        design = design_matrix(config, approx.shape[1])
        coeffs = np.linalg.lstsq(design.astype(np.float64), approx.T, rcond=None)[0].T
        coeffs = round_to(coeffs, config.term_dtype)
        chunks.append(floats_to_bytes(coeffs, config.term_dtype))
        residual = approx - evaluate_curve(design, coeffs, config.term_dtype)
    filled = 0
    for residual_bin in config.residual_bins:
        part = residual[:, filled:filled + residual_bin.num_elements]
        filled += residual_bin.num_elements
        levels = 1 << (residual_bin.element_bits - 1) if residual_bin.element_bits > 1 else 1
        peak = np.abs(part).max(axis=-1, keepdims=True)
        scale = round_to(np.where(peak == 0, 1.0, peak / levels), residual_bin.scale_dtype)
        low, high = (0, 1) if residual_bin.element_bits == 1 else (-levels, levels - 1)
        codes = np.clip(np.round(part / scale), low, high) - low
        chunks.append(floats_to_bytes(scale, residual_bin.scale_dtype))
        chunks.append(pack_bits(codes.astype(np.int64), residual_bin.element_bits))
    out = np.concatenate([chunk.reshape(positions, chunk.shape[-1]) for chunk in chunks],
                         axis=-1)
    return out.astype(np.uint8)


def encode_indices(ids: np.ndarray, config) -> np.ndarray:
    return pack_bits(np.asarray(ids, np.int64), config.bits)
