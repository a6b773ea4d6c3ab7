"""``fastkd.linear_kd_loss`` in a hand-written training step under DDP and under FSDP2
(``torch.distributed.fsdp.fully_shard``): the recipes of docs/llm-distillation.md ("More than
one GPU"), and the one-process step they must equal (the loss of the global batch: its KD sum
over the target tokens of every rank divided by their count).

Each rank takes a contiguous share of the rows; ranks hold different numbers of target tokens.
"""
import torch
import torch.distributed as dist
from torch import nn

import fastkd
import hf_helpers
from fastkd.tokens import TokenDataset, collate_causal_lm

STUDENT_SEED, TEACHER_SEED, TEMPERATURE = 1, 0, 2.0


def rows():
    """8 token rows of random lengths (shared with the Trainer checks)."""
    return hf_helpers.token_rows(count=8, seed=1)


def batch_of(token_rows):
    data = TokenDataset(token_rows)
    return collate_causal_lm([data[i] for i in range(len(data))])


def teacher_logits(batch):
    teacher = hf_helpers.tiny_gpt2(seed=TEACHER_SEED)
    with torch.no_grad():
        return teacher(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits


def kd_sum(student, batch, teachers):
    """The KD + CE sum over this batch's target tokens, from the student's last hidden state and
    output layer (``student`` is the module to call: the DDP/FSDP-wrapped one where there is
    one); full student logits are never made (``logits_to_keep=1``)."""
    output = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     output_hidden_states=True, logits_to_keep=1)
    labels = batch["shift_labels"]
    keep = labels != -100
    inner = student.module if isinstance(student, nn.parallel.DistributedDataParallel) \
        else student
    head = inner.get_output_embeddings()
    return fastkd.linear_kd_loss(output.hidden_states[-1][keep], head.weight, teachers[keep],
                                 labels[keep], temperature=TEMPERATURE, reduction="sum")


def share(token_rows):
    """This rank's contiguous share of the rows."""
    rank, world = dist.get_rank(), dist.get_world_size()
    size = len(token_rows) // world
    return token_rows[rank * size:(rank + 1) * size]


def global_tokens(batch) -> torch.Tensor:
    """Target tokens of the global batch (every rank's), at least 1."""
    tokens = (batch["shift_labels"] != -100).sum()
    dist.all_reduce(tokens)
    return tokens.clamp(min=1)


def reference(token_rows) -> dict:
    """One process, the whole batch: loss and gradients of the global token mean."""
    student = hf_helpers.tiny_gpt2(seed=STUDENT_SEED, layers=1).train()
    batch = batch_of(token_rows)
    tokens = (batch["shift_labels"] != -100).sum().clamp(min=1)
    loss = kd_sum(student, batch, teacher_logits(batch)) / tokens
    loss.backward()
    return {"loss": float(loss.detach()), "grads": {name: p.grad.clone()
                                           for name, p in student.named_parameters()}}


def ddp_step(token_rows) -> dict:
    """DDP: the loss is this rank's KD sum over the global token count, times the number of
    ranks, since DDP averages the ranks' gradients."""
    student = hf_helpers.tiny_gpt2(seed=STUDENT_SEED, layers=1).train()
    model = nn.parallel.DistributedDataParallel(student)
    batch = batch_of(share(token_rows))
    tokens = global_tokens(batch)
    loss = kd_sum(model, batch, teacher_logits(batch)) * dist.get_world_size() / tokens
    loss.backward()
    logged = loss.detach().clone()
    dist.all_reduce(logged)  # the mean over ranks is the loss of the global batch
    return {"loss": float(logged) / dist.get_world_size(),
            "grads": {name: p.grad.clone() for name, p in student.named_parameters()}}


class Distill(nn.Module):
    """The loss computed inside a module's forward, so that FSDP2 has unsharded the output
    layer's weight (and unshards it again for the backward) when ``linear_kd_loss`` reads it."""

    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, batch, teachers, tokens):
        return kd_sum(self.student, batch, teachers) / tokens


def fsdp2_step(token_rows) -> dict:
    """FSDP2: each block sharded, the loss module as the root (it owns the embeddings and the
    tied output layer); FSDP2 averages gradients over ranks, hence the factor."""
    from torch.distributed.fsdp import fully_shard
    student = hf_helpers.tiny_gpt2(seed=STUDENT_SEED, layers=1).train()
    distill = Distill(student)
    for block in student.transformer.h:
        fully_shard(block)
    fully_shard(distill)
    batch = batch_of(share(token_rows))
    tokens = global_tokens(batch)
    loss = distill(batch, teacher_logits(batch), tokens) * dist.get_world_size()
    loss.backward()
    logged = loss.detach().clone()
    dist.all_reduce(logged)
    grads = {name: p.grad.full_tensor() for name, p in student.named_parameters()}
    return {"loss": float(logged) / dist.get_world_size(), "grads": grads}


def sharded_head_message(token_rows) -> str:
    """``DistillationLoss`` (which reads the output layer outside the model's forward) on a
    student whose ``lm_head`` is its own FSDP2 unit, resharded after its forward: the error."""
    from torch.distributed.fsdp import fully_shard
    from fastkd.hf import DistillationLoss
    student = hf_helpers.tiny_llama(seed=STUDENT_SEED).train()  # untied output layer
    for layer in student.model.layers:
        fully_shard(layer)
    fully_shard(student.lm_head)
    fully_shard(student)
    loss_fn = DistillationLoss(student, hf_helpers.tiny_llama(seed=TEACHER_SEED), hook=False)
    try:
        loss_fn.compute(batch_of(share(token_rows)))
    except ValueError as error:
        return str(error)
    return "no error"
