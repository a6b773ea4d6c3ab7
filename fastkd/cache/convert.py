"""Teacher rows -> the arrays of a cache layout (dtype cast, top-k with log-sum-exp, seeded
sampling with importance weights), refusing NaN/inf and out-of-range values."""
from typing import Optional

import numpy as np
import torch

from fastkd.cache import manifest as fmt

SAMPLE_CHUNK_ELEMENTS = 1 << 24  # float64 CDF elements per sampling chunk (128 MiB)


def to_storage(values: torch.Tensor, dtype: str) -> np.ndarray:
    """Cast on the teacher's device, then copy the (smaller) result to host memory."""
    if dtype == "bf16":
        return values.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    return values.to(torch.float16 if dtype == "fp16" else torch.float32).cpu().numpy()


def ids_to_storage(indices: torch.Tensor, num_classes: int) -> np.ndarray:
    """Class ids in the format's id dtype (uint16 when V <= 65536, else int32)."""
    return indices.to(torch.int32).cpu().numpy().astype(fmt.index_dtype(num_classes))


def _row_uniforms(row_samples: np.ndarray, draws: int, seed: int) -> np.ndarray:
    """``(R, draws)`` float64 uniforms: the rows of dataset sample ``i`` take the first numbers of
    ``numpy.random.default_rng([seed, i])`` in row order, independent of batching, ranks and
    resumption."""
    uniforms = np.empty((len(row_samples), draws))
    starts = np.flatnonzero(np.r_[True, row_samples[1:] != row_samples[:-1]])
    for start, stop in zip(starts, np.r_[starts[1:], len(row_samples)]):
        generator = np.random.default_rng([seed, int(row_samples[start])])
        uniforms[start:stop] = generator.random((stop - start, draws))
    return uniforms


def sample_rows(rows: torch.Tensor, draws: int, temperature: float, uniforms: np.ndarray,
                proposal_temperature: Optional[float] = None):
    """Draw ``draws`` classes per row from ``q = softmax(rows / proposal_temperature)`` (default
    ``temperature``) by inverse float64 CDF with the given uniforms. Returns ``(distinct (R,),
    indices (E,), weights (E,))``: per row the distinct ids (most drawn first, then smaller id)
    with their int64 counts ``c``, or, when the proposal differs, the float64 importance weights
    ``(c / draws) p / q`` with ``p = softmax(rows / temperature)``."""
    proposal = temperature if proposal_temperature is None else proposal_temperature
    chunk = max(1, SAMPLE_CHUNK_ELEMENTS // rows.shape[1])
    parts = [_sample_chunk(rows[start:start + chunk], draws, temperature, proposal,
                           uniforms[start:start + chunk]) for start in range(0, len(rows), chunk)]
    if not parts:
        empty = torch.zeros(0, dtype=torch.int64, device=rows.device)
        return empty, empty.clone(), (empty.clone() if proposal == temperature else
                                      empty.double())
    return tuple(torch.cat(pieces) for pieces in zip(*parts))


def _sample_chunk(rows: torch.Tensor, draws: int, temperature: float, proposal: float,
                  uniforms: np.ndarray):
    num_rows, num_classes = rows.shape
    logits = rows.double()
    cdf = torch.softmax(logits / proposal, dim=-1).cumsum_(-1)
    # class j is drawn when cdf[j - 1] < u * total <= cdf[j] (zero-probability classes never);
    # the floor keeps u = 0 off a zero-probability class 0
    targets = (torch.from_numpy(uniforms).to(rows.device) * cdf[:, -1:]).clamp_(
        min=torch.finfo(torch.float64).tiny)
    drawn = torch.searchsorted(cdf, targets).clamp_(max=num_classes - 1)
    del cdf, targets
    drawn, _ = drawn.sort(dim=-1)
    # run-length encode each sorted row: group of entry j = number of distinct ids before it
    starts = torch.ones_like(drawn, dtype=torch.bool)
    starts[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    group = starts.cumsum(-1) - 1
    counts = torch.zeros_like(drawn).scatter_add_(1, group, torch.ones_like(drawn))
    ids = torch.zeros_like(drawn).scatter_(1, group, drawn)  # one id per group
    distinct = starts.sum(-1)
    # most drawn first, then by id; the unused groups (count 0) last, then dropped
    order = ((draws - counts) * num_classes + ids).argsort(dim=-1)
    ids, counts = ids.gather(1, order), counts.gather(1, order)
    real = torch.arange(draws, device=rows.device) < distinct.unsqueeze(1)
    ids, counts = ids[real], counts[real]
    if proposal == temperature:
        return distinct, ids, counts
    # w = (c / N) p / q: log p - log q = z / T - lse(z / T) - z / tau + lse(z / tau)
    row = torch.arange(num_rows, device=rows.device).repeat_interleave(distinct)
    z = logits[row, ids]
    log_ratio = z / temperature - z / proposal + \
        (torch.logsumexp(logits / proposal, -1) - torch.logsumexp(logits / temperature, -1))[row]
    return distinct, ids, counts.double() / draws * log_ratio.exp()


class RowConverter:
    """Teacher rows (float) -> the layout's arrays, refusing NaN/inf and out-of-range values.
    Sparse layouts take ``-inf`` logits (probability 0) and store them as such; they refuse only
    NaN, ``+inf`` and rows without a finite logit."""

    def __init__(self, state: dict):
        self.layout, self.dtype, self.clamp = state["layout"], state["dtype"], state["clamp"]
        self.k = fmt.manifest_k(state)
        self.temperatures, self.seed = state["temperatures"], state["seed"]
        self.proposal = state.get("proposal_temperature")
        self.limit = fmt.DTYPE_MAX[self.dtype]

    def __call__(self, rows: torch.Tensor, row_samples: np.ndarray):
        """``rows (R, V)`` float32 -> ``({array: (R, ...)}, clamped values per row (R,))``;
        ``row_samples[r]`` is row ``r``'s dataset index (for messages and sampling). One
        ``aminmax`` pass decides the common case; only a failing batch is searched."""
        low, high = (float(bound) for bound in torch.aminmax(rows))
        finite = np.isfinite(low) and np.isfinite(high)
        sparse = self.layout in fmt.SPARSE_K_FIELD
        if not finite:
            self._refuse(torch.isnan(rows), row_samples, "NaN")
            if sparse:
                self._refuse(rows == float("inf"), row_samples, "+inf")
                self._refuse((rows == float("-inf")).all(dim=1), row_samples,
                             "no finite logit (every class is -inf)")
            elif not self.clamp:
                self._refuse(~torch.isfinite(rows), row_samples, "NaN/inf")
        if self.layout == "topk":
            if self.k > rows.shape[1]:
                raise ValueError(f"top_k={self.k} exceeds the teacher's {rows.shape[1]} "
                                 f"classes")
            values, indices = torch.topk(rows, self.k, dim=-1)
            values, clamped = self._range(values, row_samples, minus_inf=True)
            lse = torch.stack([torch.logsumexp(rows if temperature == 1 else rows / temperature,
                                               dim=-1) for temperature in self.temperatures], -1)
            return {"values": to_storage(values, self.dtype),
                    "indices": ids_to_storage(indices, rows.shape[1]),
                    "lse": lse.cpu().numpy()}, clamped
        if self.layout == "sampled":
            distinct, indices, weights = sample_rows(
                rows, self.k, self.temperatures[0], _row_uniforms(row_samples, self.k, self.seed),
                self.proposal)
            arrays = fmt.row_arrays("sampled", self.dtype, rows.shape[1], self.k,
                                    weighted=self.proposal != self.temperatures[0])
            stored = {"distinct": distinct, "indices": indices, "counts": weights,
                      "weights": weights}
            out = {name: ids_to_storage(indices, rows.shape[1]) if name == "indices" else
                   stored[name].cpu().numpy().astype(np_dtype)
                   for name, (np_dtype, _) in arrays.items()}
            if "weights" in out:
                self._check_weights(out["weights"], out["distinct"], row_samples)
            return out, np.zeros(rows.shape[0], np.int64)
        if finite and -self.limit <= low and high <= self.limit:
            clamped = np.zeros(rows.shape[0], np.int64)
        else:
            rows, clamped = self._range(rows, row_samples)
        return {fmt.DENSE_ARRAY[self.layout]: to_storage(rows, self.dtype)}, clamped

    def _check_weights(self, weights: np.ndarray, distinct: np.ndarray,
                       row_samples: np.ndarray) -> None:
        """Importance weights must survive float32: finite, and not all 0 in a row."""
        if not len(weights):
            return
        starts = np.zeros(len(distinct), np.int64)
        np.cumsum(distinct[:-1], out=starts[1:])
        sums = np.add.reduceat(weights.astype(np.float64), starts)
        bad = ~np.isfinite(sums) | (sums <= 0)   # weights are >= 0: an inf one makes the sum inf
        if bad.any():
            raise ValueError(
                f"importance weights of dataset sample {int(row_samples[np.flatnonzero(bad)[0]])} "
                f"do not fit float32 (p / q at T={self.temperatures[0]:g} with proposal "
                f"temperature {self.proposal:g}); choose a proposal temperature closer to T")

    def _range(self, values: torch.Tensor, row_samples: np.ndarray, minus_inf: bool = False):
        """Clamp (or refuse) values beyond the dtype's range; also returns clamps per row.
        With ``minus_inf``, ``-inf`` is a value of its own (stored as is), not out of range."""
        out_of_range = values.abs() > self.limit
        if minus_inf:
            out_of_range &= values != float("-inf")
        if not bool(out_of_range.any()):
            return values, np.zeros(values.shape[0], np.int64)
        if not self.clamp:
            self._refuse(out_of_range, row_samples,
                         f"values beyond the {self.dtype} range (|x| > {self.limit:g}); pass "
                         f"--clamp (clamp=True) to clamp them or use a wider --dtype")
        return (torch.where(out_of_range, values.clamp(-self.limit, self.limit), values),
                out_of_range.sum(dim=1).cpu().numpy().astype(np.int64))

    @staticmethod
    def _refuse(bad: torch.Tensor, row_samples: np.ndarray, what: str) -> None:
        if bool(bad.any()):
            row = int(bad.reshape(bad.shape[0], -1).any(dim=1).nonzero()[0, 0])
            raise ValueError(f"teacher output for dataset sample {int(row_samples[row])} "
                             f"contains {what}")
