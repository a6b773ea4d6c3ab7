"""The float64 reference for fastkd.kd_loss: plain PyTorch, written for reading, not speed.

Every backend (Triton kernel, CPU fallback) and every benchmark is checked against this.
Gradients come from autograd through these float64 formulas.
"""
import torch


def _xlogy_diff(p, log_p, log_q):
    """sum_v p * (log_p - log_q) with 0 * anything = 0 (p == 0 entries dropped)."""
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(-1)


def reference_row_losses(student_logits, teacher_logits, labels=None, *, temperature=1.0,
                         soft_weight=0.5, hard_weight=0.5, divergence="forward_kl", beta=0.5,
                         ignore_index=-100):
    """Per-row loss in float64, shape ``(N,)``; ignored rows are 0. Inputs ``(N, V)``."""
    student = student_logits.double()
    teacher = teacher_logits.detach().double()
    temp = float(temperature)
    log_p_s = torch.log_softmax(student / temp, dim=-1)
    log_p_t = torch.log_softmax(teacher / temp, dim=-1)
    p_s, p_t = log_p_s.exp(), log_p_t.exp()
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"
    if divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    if divergence == "forward_kl":
        soft = temp ** 2 * _xlogy_diff(p_t, log_p_t, log_p_s)
    elif divergence == "reverse_kl":
        soft = temp ** 2 * _xlogy_diff(p_s, log_p_s, log_p_t)
    elif divergence == "jsd":
        mixture = beta * p_t + (1 - beta) * p_s
        log_m = torch.log(mixture)
        soft = temp ** 2 * (beta * _xlogy_diff(p_t, log_p_t, log_m)
                            + (1 - beta) * _xlogy_diff(p_s, log_p_s, log_m))
    elif divergence == "mse":
        soft = ((student - teacher) ** 2).mean(-1)
    else:
        raise ValueError(divergence)
    row_loss = soft_weight * soft
    keep = torch.ones(student.shape[0], dtype=torch.bool, device=student.device)
    if labels is not None:
        if isinstance(labels, str):  # "teacher": hard pseudo-labels
            targets = teacher.argmax(-1)
        else:
            targets = labels.long()
            keep = targets != ignore_index
            targets = torch.where(keep, targets, torch.zeros_like(targets))
        log_q = torch.log_softmax(student, dim=-1)
        hard = -log_q.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        row_loss = row_loss + hard_weight * hard
    return torch.where(keep, row_loss, torch.zeros_like(row_loss)), keep


def reference_kd_loss(student_logits, teacher_logits, labels=None, *, temperature=1.0,
                      soft_weight=0.5, hard_weight=0.5, divergence="forward_kl", beta=0.5,
                      ignore_index=-100, reduction="batchmean"):
    """float64 loss with fastkd.kd_loss's signature and semantics (leading dims flattened)."""
    num_classes = student_logits.shape[-1]
    leading = student_logits.shape[:-1]
    flat_labels = labels.reshape(-1) if isinstance(labels, torch.Tensor) else labels
    rows, keep = reference_row_losses(
        student_logits.reshape(-1, num_classes), teacher_logits.reshape(-1, num_classes),
        flat_labels, temperature=temperature, soft_weight=soft_weight, hard_weight=hard_weight,
        divergence=divergence, beta=beta, ignore_index=ignore_index)
    if reduction == "none":
        return rows.reshape(leading)
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / keep.sum().clamp(min=1)

