"""Run by tests/integrations/test_trl.py under ``torchrun --nproc_per_node 2`` (gloo, CPU):
fastkd.trl's trainers against TRL's under DDP, the loss with an FSDP2-style sharded
(``DTensor``) ``lm_head`` weight, and GKD's loss on a student sharded with FSDP2's
``fully_shard``. Rank 0 prints one JSON line of figures; the test asserts on them."""
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import trl_helpers as T  # noqa: E402  (the tiny models and trainer builders)

import fastkd.trl  # noqa: E402


def flat_params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def train_pair(build, tmp, **config):
    """Train fastkd's and TRL's trainer one step from the same weights: their parameters."""
    out = {}
    for name in ("fastkd", "trl"):
        student, teacher = T.model_pair("softcap")
        initial = flat_params(student)
        trainer = build(name, student, teacher, Path(tmp) / name, **config)
        trainer.train()
        out[name] = flat_params(student)
        out["wrapper"] = type(trainer.model_wrapped).__name__
        out["moved"] = float((out[name] - initial).abs().max())
    return out


def build_gkd(name, student, teacher, path, **config):
    cls = fastkd.trl.GKDTrainer if name == "fastkd" else fastkd.trl.TRLGKDTrainer
    return T.gkd_trainer(cls, student, teacher, path, **config)


def build_distillation(name, student, teacher, path, **config):
    cls = fastkd.trl.DistillationTrainer if name == "fastkd" else fastkd.trl.TRLDistillationTrainer
    return T.distillation_trainer(cls, student, teacher, path, **config)


def sharded_head_check():
    """The fused loss with the student's lm_head weight as a DTensor sharded over the ranks
    (what FSDP2 leaves outside its forward) equals the loss with the plain weight, and the
    sharded weight's gradient is the plain one's shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    student, teacher = T.model_pair("softcap")
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 32, generator=generator, requires_grad=True)
    teacher_hidden = torch.randn(3, 5, 32, generator=generator)
    keep = torch.rand(3, 5, generator=generator) > 0.3
    head = fastkd.trl.teacher_head(teacher, teacher_hidden)
    options = dict(beta=0.5, temperature=1.5, t_squared=False)
    plain = fastkd.trl.fused_divergence(hidden, student, head, keep, **options)
    plain.backward()
    plain_grad = student.lm_head.weight.grad.clone()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    student.lm_head.weight = torch.nn.Parameter(
        distribute_tensor(student.lm_head.weight.detach(), mesh, [Shard(0)]))
    sharded = fastkd.trl.fused_divergence(hidden, student, head, keep, **options)
    sharded.backward()
    grad = student.lm_head.weight.grad
    return {"dtensor_grad": type(grad).__name__,
            "loss_diff": float((sharded - plain).detach().abs()),
            "grad_diff": float((grad.full_tensor() - plain_grad).abs().max()),
            "grad_scale": float(plain_grad.abs().max())}


def fsdp2_check():
    """GKD's fused loss on a student sharded with FSDP2's ``fully_shard`` (per layer and at the
    root, no wrapper module) equals the unsharded student's, and every parameter's gradient
    equals the unsharded gradient averaged over the ranks (what FSDP2's reduce-scatter gives)."""
    import copy
    import types
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    student, teacher = T.model_pair("softcap")
    reference = copy.deepcopy(student)
    for layer in student.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(student, mesh=mesh)
    # the trainer's loss alone: no Trainer set-up (it would wrap the sharded student)
    trainer = object.__new__(fastkd.trl.GKDTrainer)
    trainer.beta, trainer.chunk_budget_bytes, trainer.teacher_model = 0.5, None, teacher
    trainer.accelerator = types.SimpleNamespace(unwrap_model=lambda model: model)
    batch = T.gkd_collate(T.gkd_rows(4, seed=1 + dist.get_rank()))
    items = torch.tensor(20.0)
    losses = []
    for model in (student, reference):
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=items)
        loss.backward()
        losses.append(float(loss))
    grad_diff = scale = 0.0
    sharded = dict(student.named_parameters())
    for name, param in reference.named_parameters():
        want = param.grad.clone()
        dist.all_reduce(want)
        want /= dist.get_world_size()
        got = sharded[name].grad.full_tensor()
        grad_diff = max(grad_diff, float((got - want).abs().max()))
        scale = max(scale, float(want.abs().max()))
    return {"loss_diff": abs(losses[0] - losses[1]), "grad_diff": grad_diff,
            "grad_scale": scale,
            "head_is_dtensor": type(student.lm_head.weight).__name__ == "DTensor"}


def main():
    torch.set_num_threads(1)
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, build, config in (
                ("gkd", build_gkd, dict(gradient_accumulation_steps=2, max_steps=1, beta=0.5,
                                        temperature=0.7)),
                ("distillation", build_distillation,
                 dict(gradient_accumulation_steps=2, max_steps=1, beta=0.5, temperature=1.5))):
            out = train_pair(build, tmp, **config)
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, out["fastkd"])
            figures[label] = {
                "wrapper": out["wrapper"], "moved": out["moved"],
                "fastkd_vs_trl": float((out["fastkd"] - out["trl"]).abs().max()),
                "rank_spread": float((gathered[0] - gathered[-1]).abs().max())}
    figures["sharded_head"] = sharded_head_check()
    figures["fsdp2"] = fsdp2_check()
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(figures), flush=True)
    dist.barrier()
    # gloo's worker threads must stop before the interpreter finalizes, or a rank may abort
    # at exit ("terminate called without an active exception")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
