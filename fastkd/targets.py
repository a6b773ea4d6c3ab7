"""Teacher target types: what a loss can take as its ``teacher`` besides dense logits.

- :class:`TopKLogits`: the K largest teacher logits of each row, their class ids and the full
  row's log-sum-exp (what top-k caches return).

(The sparse losses over these targets are added by the "Sparse teacher targets" work; this module
is the one home of every target type: ``TopKLogits``, ``SampledTargets``, ``TeacherHead``.)
"""
from typing import NamedTuple

import torch

__all__ = ["TopKLogits"]


class TopKLogits(NamedTuple):
    """Sparse teacher rows: ``values (..., k)`` largest logits (descending), their ``indices
    (..., k)`` int32 and ``lse (...,)`` float32 = logsumexp of the full row, so the softmax
    probability of entry j is ``exp(values[j] - lse)`` and the mass outside the top-k is
    ``1 - sum_j exp(values[j] - lse)``."""
    values: torch.Tensor
    indices: torch.Tensor
    lse: torch.Tensor

    def log_probs(self, num_classes: int) -> torch.Tensor:
        """Dense ``(..., V)`` float32 teacher log-probabilities: ``values - lse`` at the kept
        indices (exact up to the stored dtype) and the tail mass ``1 - sum exp(values - lse)``
        spread evenly over the other ``V - k`` classes (a floor of 1e-12 when it rounds to 0)."""
        kept = self.values.float() - self.lse.float().unsqueeze(-1)
        k = kept.shape[-1]
        if num_classes < k:
            raise ValueError(f"num_classes={num_classes} is smaller than top-k={k}")
        out = kept.new_empty(kept.shape[:-1] + (num_classes,))
        if num_classes > k:
            tail = (1 - kept.exp().sum(-1, keepdim=True)).clamp_min(1e-12)
            out.copy_((tail / (num_classes - k)).log().expand_as(out))
        return out.scatter_(-1, self.indices.long(), kept)
