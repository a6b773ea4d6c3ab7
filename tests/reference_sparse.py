"""The float64 reference for fastkd.kd_loss with a sparse teacher (TopKLogits / SampledTargets):
dense math, written for reading, not speed.

The student's full softmax over V is formed in float64, the bucket distributions are built from
it (a dense 0/1 mask of the kept ids gives the rest bucket), the divergence is evaluated on those
bucket masses and the gradient comes from autograd. Every sparse backend is checked against it.
"""
import torch

from fastkd import SampledTargets


def _xlogy_diff(weight, log_weight, log_other):
    """sum_b weight * (log_weight - log_other) with 0 * anything = 0."""
    safe_other = torch.where(weight > 0, log_other, torch.zeros_like(log_other))
    safe_weight = torch.where(weight > 0, log_weight, torch.zeros_like(log_weight))
    terms = torch.where(weight > 0, weight * (safe_weight - safe_other), torch.zeros_like(weight))
    return terms.sum(-1)


def _safe_log(mass):
    """log(mass) with -inf at 0 and a zero (not NaN) autograd gradient there."""
    positive = mass > 0
    return torch.where(positive, torch.where(positive, mass, torch.ones_like(mass)).log(),
                       torch.full_like(mass, float("-inf")))


def active_entries(target):
    """(N, K) bool: the real entries of each row. Padding is a count-0 entry of a sampled
    target or a -inf value of a top-k target: it is not one of the kept ids (its class stays in
    the rest bucket) and it may repeat an id."""
    if isinstance(target, SampledTargets):
        return target.counts.double() > 0
    return target.values.double() != float("-inf")


def bucket_masses(student, target, *, tail, temperature):
    """float64 ``(P, Q)`` of shape (N, B): teacher and student masses over the buckets (the K ids,
    padding entries 0, plus the rest bucket in "bucket" mode). A row without real entries has
    P = Q = 0 over its K buckets and, in "bucket" mode, everything in the rest bucket: P_rest =
    Q_rest = 1 (its divergence is 0)."""
    temp = float(temperature)
    num_classes = student.shape[-1]
    ids = target.indices.long()
    sampled = isinstance(target, SampledTargets)
    active = active_entries(target)
    if sampled:
        counts = target.counts.double() * active
        teacher = counts / counts.sum(-1, keepdim=True).clamp_min(1e-300)
    else:
        values = target.values.double()
        if tail == "renormalize":
            scaled = (values / temp).masked_fill(~active, float("-inf"))
            top = scaled.amax(-1, keepdim=True).clamp_min(-1e300)   # a row of -inf: no NaN
            weights = (scaled - top).exp()
            teacher = weights / weights.sum(-1, keepdim=True).clamp_min(1e-300)
        else:
            teacher = torch.where(active, values / temp - target.lse.double().unsqueeze(-1),
                                  torch.full_like(values, float("-inf"))).exp()
    if tail == "renormalize":
        kept_logits = (student.gather(-1, ids) / temp).masked_fill(~active, float("-inf"))
        top = kept_logits.detach().amax(-1, keepdim=True).clamp_min(-1e300)
        weights = (kept_logits - top).exp()
        return teacher, weights / weights.sum(-1, keepdim=True).clamp_min(1e-300)
    probs = torch.softmax(student / temp, -1)
    kept = probs.gather(-1, ids) * active
    if tail == "ignore":
        return teacher, kept
    in_kept = torch.zeros_like(probs).scatter_add(-1, ids, active.double()) > 0
    student_rest = (probs * ~in_kept).sum(-1, keepdim=True)
    if sampled:
        teacher_rest = torch.zeros_like(student_rest)
    else:
        # no class outside the ids: the rest bucket is empty on both sides
        full = in_kept.sum(-1, keepdim=True) == num_classes
        teacher_rest = torch.where(full, torch.zeros_like(student_rest),
                                   (1 - teacher.sum(-1, keepdim=True)).clamp_min(0))
    return torch.cat([teacher, teacher_rest], -1), torch.cat([kept, student_rest], -1)


def reference_sparse_row_losses(student_logits, target, labels=None, *, tail="bucket",
                                temperature=1.0, soft_weight=0.5, hard_weight=0.5,
                                divergence="forward_kl", beta=0.5, ignore_index=-100):
    """Per-row loss in float64 ``(N,)`` (ignored rows 0) and the kept-row mask. Inputs (N, V) and
    a target of (N, K) rows."""
    student = student_logits.double()
    temp = float(temperature)
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"
    if divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    teacher_mass, student_mass = bucket_masses(student, target, tail=tail, temperature=temp)
    log_p, log_q = _safe_log(teacher_mass), _safe_log(student_mass)
    if divergence == "forward_kl":
        soft = _xlogy_diff(teacher_mass, log_p, log_q)
    elif divergence == "reverse_kl":
        soft = _xlogy_diff(student_mass, log_q, log_p)
    else:
        mixture = beta * teacher_mass + (1 - beta) * student_mass
        log_m = _safe_log(mixture)
        soft = (beta * _xlogy_diff(teacher_mass, log_p, log_m)
                + (1 - beta) * _xlogy_diff(student_mass, log_q, log_m))
    row_loss = soft_weight * temp ** 2 * soft
    keep = torch.ones(student.shape[0], dtype=torch.bool)
    if labels is not None:
        hard_on = torch.ones(student.shape[0], dtype=torch.bool)
        if isinstance(labels, str):   # "teacher": id of the largest real value / count
            active = active_entries(target)
            score = (target.counts if isinstance(target, SampledTargets) else target.values)
            score = score.double().masked_fill(~active, float("-inf"))
            targets = target.indices.long().gather(-1, score.argmax(-1, keepdim=True))
            targets = targets.squeeze(-1)
            hard_on = active.any(-1)   # a row without real entries has no teacher label
        else:
            targets = labels.long()
            keep = targets != ignore_index
            targets = torch.where(keep, targets, torch.zeros_like(targets))
        hard = -torch.log_softmax(student, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        row_loss = row_loss + hard_weight * torch.where(hard_on, hard, torch.zeros_like(hard))
    return torch.where(keep, row_loss, torch.zeros_like(row_loss)), keep


def reference_sparse_kd_loss(student_logits, target, labels=None, *, reduction="batchmean",
                             **options):
    """float64 loss with fastkd.kd_loss's signature for a sparse teacher (leading dims flat)."""
    num_classes = student_logits.shape[-1]
    leading = student_logits.shape[:-1]
    flat_target = target.map_tensors(lambda part: part.reshape(-1, *part.shape[len(leading):])) \
        if hasattr(target, "map_tensors") else target
    flat_labels = labels.reshape(-1) if isinstance(labels, torch.Tensor) else labels
    rows, keep = reference_sparse_row_losses(student_logits.reshape(-1, num_classes),
                                             flat_target, flat_labels, **options)
    if reduction == "none":
        return rows.reshape(leading)
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / keep.sum().clamp(min=1)
