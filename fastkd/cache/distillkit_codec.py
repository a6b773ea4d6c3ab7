"""DistillKit's compressed top-k log-prob format (open-instruct writes the same one), decoded and
encoded from the format's facts; no DistillKit code is used. ``docs/teacher-datasets.md`` lists
the files of DistillKit (``distillkit/compression/``) and open-instruct the facts come from.

One position of a sequence is two byte strings:

- ``compressed_logprobs``: the position's ``k`` log-probs in rank order (largest first), after
  optional *delta encoding* (entry 0 kept, entry ``i`` replaced by ``v[i] - v[i-1]``), stored as
  ``exact_k`` little-endian floats of ``exact_dtype``, then (if ``polynomial_terms``) one
  ``term_dtype`` coefficient per term of a least-squares curve through the other ``k - exact_k``
  values at ``t = 0, 1, ...`` (or ``t`` evenly in ``[0, 1]`` with ``normalize_t``), then per
  residual bin a ``scale_dtype`` scale and ``num_elements`` quantized residuals of
  ``element_bits`` bits each (bit-packed, padded to a byte). A residual ``q`` decodes to
  ``(q - 2**(bits-1)) * scale`` (``(2q - 1) * scale`` for 1 bit); residuals past the bins are 0.
  Decoding adds curve and residuals, then undoes the delta encoding with a running sum.
- ``bytepacked_indices``: the ``k`` token ids as ``ceil(log2 d)``-bit fields, most significant
  bit first, packed back to back and padded with zero bits to a whole byte.

The *legacy* layout holds per position ``packed_indices`` (uint64 words, each holding
``64 // bits`` ids from its least significant bit up, none straddling two words),
``exact_values`` (floats) and ``coeffs`` of a curve in ``a = 1 .. k - exact_k`` with terms
``a**-e`` (``invert_polynomial``, else ``a**e``) for ``e = 0 .. polynomial_degree`` and
optionally ``sqrt(a)``.

Arithmetic follows DistillKit's decoder step by step (each operation rounded to the dtype it
runs in, the delta running sum in float64 as PyTorch's CPU ``cumsum``): bit-equal for curves of
up to four terms without ``exp`` or ``normalize_t``, else within one unit in the last place.
"""
from dataclasses import dataclass
from typing import Tuple

import numpy as np

FLOAT_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
SPECIAL_TERMS = ("sqrt", "exp")
MAX_BITS = 62  # id and residual widths fastkd decodes (int64 arithmetic)
MAX_POLYNOMIAL_TERMS = 32  # a curve's terms (DistillKit's use a handful; decoding time grows)
CONFIG_FIELDS = ("d", "k", "exact_k", "exact_dtype", "polynomial_terms", "term_dtype",
                 "residual_bins", "delta_encoding", "error_diffusion", "normalize_t")
LEGACY_FIELDS = ("k", "exact_k", "polynomial_degree", "vocab_size", "invert_polynomial",
                 "with_sqrt_term", "term_dtype")


class FormatError(ValueError):
    """A compression config or compressed row that cannot be decoded (message names where)."""


def _check_fields(data: dict, where: str, fields: tuple, required: tuple, kind: str) -> None:
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise FormatError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; "
                          f"expected DistillKit's {kind}{', '.join(fields)}")
    for name in required:
        if name not in data:
            raise FormatError(f"{where}: missing '{name}'")


def _wide(dtype: str):
    return np.float64 if dtype == "float64" else np.float32


def round_to(values: np.ndarray, dtype: str) -> np.ndarray:
    """``values`` rounded to ``dtype`` (to nearest, ties to even), returned as float32 (float64
    for ``"float64"``)."""
    if dtype == "float64":
        return np.asarray(values, np.float64)
    values = np.asarray(values, np.float32)
    if dtype == "float16":
        return values.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        bits = values.view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        out = rounded.astype(np.uint32).view(np.float32)
        return np.where(np.isnan(values), values, out)
    return values


def floats_from_bytes(raw: np.ndarray, dtype: str) -> np.ndarray:
    """``(..., n * size)`` uint8 -> ``(..., n)`` little-endian floats of ``dtype`` as float32
    (float64 for ``"float64"``)."""
    raw = np.ascontiguousarray(raw, np.uint8)
    if dtype == "bfloat16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    return raw.view({"float16": "<f2", "float32": "<f4", "float64": "<f8"}[dtype]).astype(
        _wide(dtype))


def _promote(first: str, second: str) -> str:
    """PyTorch's type promotion of two floating dtypes."""
    if first == second:
        return first
    order = ("float16", "bfloat16", "float32", "float64")
    wider = max(first, second, key=order.index)
    return "float32" if wider in ("float16", "bfloat16") else wider


def unpack_bits(raw: np.ndarray, bits: int, count: int) -> np.ndarray:
    """``(P, B)`` uint8 -> ``(P, count)`` int64 of ``bits``-bit fields, most significant bit
    first (the stream's first bit is the first field's highest)."""
    stream = np.unpackbits(np.ascontiguousarray(raw, np.uint8), axis=-1)[:, :count * bits]
    fields = stream.reshape(len(raw), count, bits).astype(np.int64)
    weights = np.left_shift(np.int64(1), np.arange(bits - 1, -1, -1, dtype=np.int64))
    return fields @ weights


def unpack_words(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Legacy ids: ``(P, W)`` uint64 words, ``64 // bits`` fields per word from the least
    significant bit up -> ``(P, count)`` int64."""
    per_word = 64 // bits
    words = np.asarray(words, np.uint64)
    shifts = (np.arange(per_word, dtype=np.uint64) * np.uint64(bits))
    fields = (words[..., None] >> shifts) & np.uint64((1 << bits) - 1)
    return fields.reshape(len(words), -1)[:, :count].astype(np.int64)


def index_bits(vocab_size: int) -> int:
    """Bits per id for a vocabulary of ``vocab_size``: ``ceil(log2 vocab_size)``."""
    return (vocab_size - 1).bit_length()


def _field(data: dict, name: str, where: str, kind, default=None, minimum=None):
    value = data.get(name, default)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int) or \
                (minimum is not None and value < minimum):
            raise FormatError(f"{where}: '{name}' must be an int >= {minimum}, got {value!r}")
    elif kind is bool:
        if not isinstance(value, bool):
            raise FormatError(f"{where}: '{name}' must be true or false, got {value!r}")
    elif kind == "dtype":
        if value not in FLOAT_BYTES:
            raise FormatError(f"{where}: '{name}' must be one of {', '.join(FLOAT_BYTES)}, got "
                              f"{value!r}")
    return value


@dataclass(frozen=True)
class ResidualBin:
    scale_dtype: str
    element_bits: int
    num_elements: int


@dataclass(frozen=True)
class CompressionConfig:
    """DistillKit's ``DistributionQuantizationConfig`` (its ``compression_config.yaml``)."""
    d: int
    k: int
    exact_k: int
    exact_dtype: str = "float32"
    polynomial_terms: Tuple = ()
    term_dtype: str = "float32"
    residual_bins: Tuple[ResidualBin, ...] = ()
    delta_encoding: bool = True
    error_diffusion: bool = False
    normalize_t: bool = False

    legacy = False

    @classmethod
    def from_mapping(cls, data: dict, where: str) -> "CompressionConfig":
        _check_fields(data, where, CONFIG_FIELDS, ("d", "k", "exact_k"), "")
        d, k = _field(data, "d", where, int, minimum=2), _field(data, "k", where, int, minimum=1)
        exact_k = _field(data, "exact_k", where, int, minimum=0)
        if exact_k > k:
            raise FormatError(f"{where}: exact_k {exact_k} exceeds k {k}")
        terms = data.get("polynomial_terms") or []
        if isinstance(terms, list) and len(terms) > MAX_POLYNOMIAL_TERMS:
            raise FormatError(f"{where}: {len(terms)} polynomial_terms, more than the "
                              f"{MAX_POLYNOMIAL_TERMS} fastkd reads (a curve has a handful)")
        if not isinstance(terms, list) or any(
                isinstance(t, bool) or not (isinstance(t, int) or t in SPECIAL_TERMS)
                for t in terms):
            raise FormatError(f"{where}: 'polynomial_terms' must be a list of ints and "
                              f"{'/'.join(SPECIAL_TERMS)}, got {terms!r}")
        bins_raw = data.get("residual_bins") or []
        if not isinstance(bins_raw, list):
            raise FormatError(f"{where}: 'residual_bins' must be a list, got {bins_raw!r}")
        bins = []
        for number, entry in enumerate(bins_raw):
            at = f"{where}: residual_bins[{number}]"
            if not isinstance(entry, dict) or set(entry) != {"scale_dtype", "element_bits",
                                                             "num_elements"}:
                raise FormatError(f"{at}: expected scale_dtype, element_bits and num_elements")
            bits = _field(entry, "element_bits", at, int, minimum=1)
            if bits > MAX_BITS:
                raise FormatError(f"{at}: element_bits {bits} above the {MAX_BITS} fastkd reads")
            bins.append(ResidualBin(_field(entry, "scale_dtype", at, "dtype"), bits,
                                    _field(entry, "num_elements", at, int, minimum=1)))
        if sum(b.num_elements for b in bins) > k - exact_k:
            raise FormatError(f"{where}: residual_bins hold more than k - exact_k = "
                              f"{k - exact_k} elements")
        if exact_k < k and not terms and not bins:
            raise FormatError(f"{where}: exact_k < k needs polynomial_terms or residual_bins")
        config = cls(d, k, exact_k, _field(data, "exact_dtype", where, "dtype", "float32"),
                     tuple(terms), _field(data, "term_dtype", where, "dtype", "float32"),
                     tuple(bins), _field(data, "delta_encoding", where, bool, True),
                     _field(data, "error_diffusion", where, bool, False),
                     _field(data, "normalize_t", where, bool, False))
        if config.bits > MAX_BITS:
            raise FormatError(f"{where}: d = {d} needs {config.bits}-bit ids, above the "
                              f"{MAX_BITS} fastkd reads")
        return config

    def to_mapping(self) -> dict:
        out = {name: getattr(self, name) for name in CONFIG_FIELDS}
        out["polynomial_terms"] = list(self.polynomial_terms)
        out["residual_bins"] = [dict(scale_dtype=b.scale_dtype, element_bits=b.element_bits,
                                     num_elements=b.num_elements) for b in self.residual_bins]
        return out

    @property
    def bits(self) -> int:
        return index_bits(self.d)

    @property
    def vocab_size(self) -> int:
        return self.d

    @property
    def logprob_bytes(self) -> int:
        size = self.exact_k * FLOAT_BYTES[self.exact_dtype]
        size += len(self.polynomial_terms) * FLOAT_BYTES[self.term_dtype]
        return size + sum(FLOAT_BYTES[b.scale_dtype] + (b.num_elements * b.element_bits + 7) // 8
                          for b in self.residual_bins)

    @property
    def index_bytes(self) -> int:
        return (self.k * self.bits + 7) // 8


@dataclass(frozen=True)
class LegacyConfig:
    """DistillKit's ``LegacyLogitCompressionConfig`` (the training config's
    ``teacher.legacy_logit_compression``)."""
    k: int
    exact_k: int
    polynomial_degree: int
    vocab_size: int
    invert_polynomial: bool = True
    with_sqrt_term: bool = False
    term_dtype: str = "float32"

    legacy = True

    @classmethod
    def from_mapping(cls, data: dict, where: str) -> "LegacyConfig":
        _check_fields(data, where, LEGACY_FIELDS, LEGACY_FIELDS[:4], "legacy ")
        config = cls(_field(data, "k", where, int, minimum=1),
                     _field(data, "exact_k", where, int, minimum=0),
                     _field(data, "polynomial_degree", where, int, minimum=0),
                     _field(data, "vocab_size", where, int, minimum=2),
                     _field(data, "invert_polynomial", where, bool, True),
                     _field(data, "with_sqrt_term", where, bool, False),
                     _field(data, "term_dtype", where, "dtype", "float32"))
        if config.exact_k > config.k:
            raise FormatError(f"{where}: exact_k {config.exact_k} exceeds k {config.k}")
        if index_bits(config.vocab_size) > MAX_BITS:
            raise FormatError(f"{where}: vocab_size {config.vocab_size} too large")
        return config

    @property
    def bits(self) -> int:
        return index_bits(self.vocab_size)

    @property
    def num_coeffs(self) -> int:
        return 0 if self.exact_k == self.k else self.polynomial_degree + 1 + self.with_sqrt_term


def parse_config(data, where: str):
    """A loaded YAML mapping -> :class:`CompressionConfig` or :class:`LegacyConfig`. Takes
    ``compression_config.yaml`` as DistillKit or open-instruct write it, or a DistillKit training
    config (its ``teacher`` section's ``logprob_compressor`` / ``legacy_logit_compression``)."""
    if not isinstance(data, dict):
        raise FormatError(f"{where}: expected a mapping of compression settings, got "
                          f"{type(data).__name__}")
    if isinstance(data.get("teacher"), dict):
        data, where = data["teacher"], f"{where}: teacher"
    for key, kind in (("logprob_compressor", CompressionConfig),
                      ("legacy_logit_compression", LegacyConfig)):
        if isinstance(data.get(key), dict):
            return kind.from_mapping(data[key], f"{where}: {key}")
    if "polynomial_degree" in data:
        return LegacyConfig.from_mapping(data, where)
    return CompressionConfig.from_mapping(data, where)


def _powers(points: np.ndarray, exponent: int, dtype: str) -> np.ndarray:
    """``points ** exponent`` as PyTorch computes it in ``dtype`` (squares and cubes by
    multiplication, reciprocals by division, the rest by ``pow``; each step rounded)."""
    wide = _wide(dtype)
    if exponent == 0:
        return np.ones_like(points)
    if exponent == 1:
        return points
    if exponent == 2:
        return round_to(points * points, dtype)
    if exponent == 3:
        return round_to(round_to(points * points, dtype) * points, dtype)
    if exponent == -1:
        return round_to(wide(1) / points, dtype)
    if exponent == -2:
        return round_to(wide(1) / round_to(points * points, dtype), dtype)
    with np.errstate(divide="ignore", over="ignore"):
        return round_to(np.power(points.astype(np.float64), float(exponent)), dtype)


def _linspace(count: int, dtype: str) -> np.ndarray:
    """PyTorch's CPU ``linspace(0, 1, count)``: ``step * i`` for the first half and
    ``1 - step * (count - 1 - i)`` for the rest, each with one rounding (16-bit dtypes: computed
    in float32 and rounded, within one unit in the last place of PyTorch's)."""
    if count == 1:
        return np.zeros(1, _wide(dtype))
    wide = np.longdouble if dtype == "float64" else np.float64  # holds the exact product
    step = wide(1.0 / (count - 1)) if dtype == "float64" else \
        wide(np.float32(1) / np.float32(count - 1))
    index = np.arange(count).astype(wide)
    low = step * index
    high = wide(1) - step * (count - 1 - index)
    points = np.where(index < count // 2, low, high).astype(_wide(dtype))
    return round_to(points, dtype)


def design_matrix(config: CompressionConfig, count: int) -> np.ndarray:
    """``(count, terms)`` values of the curve's terms at the approximated positions."""
    dtype = config.term_dtype
    points = _linspace(count, dtype) if config.normalize_t else \
        round_to(np.arange(count, dtype=np.float64), dtype)
    special = {"sqrt": np.sqrt, "exp": np.exp}
    columns = [round_to(special[term](points.astype(np.float64)), dtype)
               if term in special else _powers(points, term, dtype)
               for term in config.polynomial_terms]
    return np.stack(columns, axis=-1)


def evaluate_curve(design: np.ndarray, coeffs: np.ndarray, dtype: str) -> np.ndarray:
    """``sum_j design[t, j] * coeffs[p, j]`` in ``dtype``: each product rounded, summed in
    order (float32 running sum for the 16-bit dtypes, rounded once at the end)."""
    def product(column):   # one term at a time: memory stays (positions, count)
        return round_to(design[None, :, column] * coeffs[:, None, column], dtype)
    total = product(0)
    for column in range(1, design.shape[-1]):
        total = total + product(column)
        if dtype in ("float32", "float64"):
            total = round_to(total, dtype)
    return round_to(total, dtype)


def _dequantize(codes: np.ndarray, scale: np.ndarray, bits: int, scale_dtype: str):
    wide = _wide(_promote("float32", scale_dtype))
    if bits == 1:
        return (codes.astype(np.float32) * np.float32(2) - np.float32(1)).astype(wide) * scale
    offset = -(1 << (bits - 1))
    return ((codes + offset).astype(np.float32)).astype(wide) * scale.astype(wide)


def decode_logprobs(raw: np.ndarray, config: CompressionConfig) -> np.ndarray:
    """``(P, logprob_bytes)`` uint8 -> ``(P, k)`` float32 log-probs (rank order)."""
    positions, out_dtype = len(raw), config.exact_dtype
    exact_size = config.exact_k * FLOAT_BYTES[out_dtype]
    exact = floats_from_bytes(raw[:, :exact_size].reshape(positions, exact_size), out_dtype)
    exact = exact.reshape(positions, config.exact_k)
    cursor = exact_size
    coeffs = None
    if config.polynomial_terms:
        size = len(config.polynomial_terms) * FLOAT_BYTES[config.term_dtype]
        coeffs = floats_from_bytes(raw[:, cursor:cursor + size], config.term_dtype).reshape(
            positions, len(config.polynomial_terms))
        cursor += size
    approx_count = config.k - config.exact_k
    residual = np.zeros((positions, approx_count), _wide(out_dtype))
    filled = 0
    for residual_bin in config.residual_bins:
        scale_size = FLOAT_BYTES[residual_bin.scale_dtype]
        scale = floats_from_bytes(raw[:, cursor:cursor + scale_size], residual_bin.scale_dtype)
        cursor += scale_size
        size = (residual_bin.num_elements * residual_bin.element_bits + 7) // 8
        codes = unpack_bits(raw[:, cursor:cursor + size], residual_bin.element_bits,
                            residual_bin.num_elements)
        cursor += size
        part = _dequantize(codes, scale.reshape(positions, 1), residual_bin.element_bits,
                           residual_bin.scale_dtype)
        if part.dtype == np.float64 and residual.dtype != np.float64:
            residual = residual.astype(np.float64)
        residual[:, filled:filled + residual_bin.num_elements] = part
        filled += residual_bin.num_elements
    residual = round_to(residual, out_dtype)  # `residual.to(out_dtype)`
    if coeffs is not None:
        curve = evaluate_curve(design_matrix(config, approx_count), coeffs, config.term_dtype)
        approx_dtype = _promote(config.term_dtype, out_dtype)
        approx = round_to(curve.astype(_wide(approx_dtype)) + residual, approx_dtype)
    else:
        approx_dtype, approx = out_dtype, residual
    values = np.concatenate([exact.astype(_wide(approx_dtype)), approx.astype(
        _wide(approx_dtype))], axis=-1)
    if config.delta_encoding:
        # a running sum accumulated in float64, each entry rounded to float32, then out_dtype
        running = np.cumsum(values.astype(np.float32).astype(np.float64), axis=-1)
        values = round_to(running.astype(np.float32), out_dtype)
    return values.astype(np.float32)


def decode_indices(raw: np.ndarray, config) -> np.ndarray:
    """``(P, index_bytes)`` uint8 -> ``(P, k)`` int64 token ids."""
    return unpack_bits(raw, config.bits, config.k)


def legacy_design(config: LegacyConfig) -> np.ndarray:
    count = config.k - config.exact_k
    points = np.arange(count, dtype=np.float32) + np.float32(1)
    columns = [_powers(points, -e if config.invert_polynomial else e, "float32")
               for e in range(config.polynomial_degree + 1)]
    if config.with_sqrt_term:
        columns.append(round_to(np.sqrt(points.astype(np.float64)), "float32"))
    return np.stack(columns, axis=-1)


def decode_legacy(words: np.ndarray, exact: np.ndarray, coeffs: np.ndarray,
                  config: LegacyConfig) -> Tuple[np.ndarray, np.ndarray]:
    """Legacy rows -> ``(values (P, k) float32, ids (P, k) int64)``."""
    ids = unpack_words(words, config.bits, config.k)
    exact = np.asarray(exact, np.float32)
    if config.exact_k == config.k:
        return exact, ids
    curve = evaluate_curve(legacy_design(config), np.asarray(coeffs, np.float32), "float32")
    return np.concatenate([exact, curve], axis=-1), ids
