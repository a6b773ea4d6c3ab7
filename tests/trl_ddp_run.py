"""Run by tests/test_trl.py under ``torchrun --nproc_per_node 2`` (gloo, CPU): fastkd.trl's
trainers against TRL's under DDP, and the loss with an FSDP2-style sharded (``DTensor``)
``lm_head`` weight. Rank 0 prints one JSON line of figures; the test asserts on them."""
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_trl as T  # noqa: E402  (the tiny models and trainer builders)

import fastkd.trl  # noqa: E402


def flat_params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def train_pair(build, tmp, **config):
    """Train fastkd's and TRL's trainer one step from the same weights: their parameters."""
    out = {}
    for name in ("fastkd", "trl"):
        student, teacher = T._pair("softcap")
        initial = flat_params(student)
        trainer = build(name, student, teacher, Path(tmp) / name, **config)
        trainer.train()
        out[name] = flat_params(student)
        out["wrapper"] = type(trainer.model_wrapped).__name__
        out["moved"] = float((out[name] - initial).abs().max())
    return out


def build_gkd(name, student, teacher, path, **config):
    cls = fastkd.trl.GKDTrainer if name == "fastkd" else fastkd.trl.TRLGKDTrainer
    return T._gkd_trainer(cls, student, teacher, path, **config)


def build_distillation(name, student, teacher, path, **config):
    cls = fastkd.trl.DistillationTrainer if name == "fastkd" else fastkd.trl.TRLDistillationTrainer
    return T._distillation_trainer(cls, student, teacher, path, **config)


def sharded_head_check():
    """The fused loss with the student's lm_head weight as a DTensor sharded over the ranks
    (what FSDP2 leaves outside its forward) equals the loss with the plain weight, and the
    sharded weight's gradient is the plain one's shard."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    student, teacher = T._pair("softcap")
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
            "loss_diff": float((sharded - plain).abs()),
            "grad_diff": float((grad.full_tensor() - plain_grad).abs().max()),
            "grad_scale": float(plain_grad.abs().max())}


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
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(figures), flush=True)
    dist.barrier()


if __name__ == "__main__":
    main()
