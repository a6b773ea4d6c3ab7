"""Distributed checks of fastkd's training recipes, run by ``torchrun`` on CPU with gloo:

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed/run.py OUT_DIR

Every rank runs each check; rank 0 saves what the one-process references are compared with
(tests/integrations/test_distributed.py does that) to ``OUT_DIR/results.pt``:

- ``trainer``: one step of ``DistillationTrainer`` and of the stock Trainer with
  ``DistillationLoss``, with ``average_tokens_across_devices`` on and off (trainer_checks.py);
- ``linear``: ``fastkd.linear_kd_loss`` in a hand-written step under DDP and under FSDP2
  (``fully_shard``), the recipes of docs/llm-distillation.md (linear_checks.py).
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # these checks and tests/hf_helpers.py

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import linear_checks  # noqa: E402
import trainer_checks  # noqa: E402


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    results = {"trainer": {}}
    rows = linear_checks.rows()
    for name, stock, average_tokens in trainer_checks.CONFIGS:
        result = trainer_checks.train_step(
            rows, os.path.join(out_dir, name), stock=stock, average_tokens=average_tokens,
            batch_size=len(rows) // int(os.environ["WORLD_SIZE"]), distributed=True)
        indices = [None] * dist.get_world_size()
        dist.all_gather_object(indices, result["indices"])
        result["indices"] = indices
        results["trainer"][name] = result
    results["linear"] = {"ddp": linear_checks.ddp_step(rows),
                         "fsdp2": linear_checks.fsdp2_step(rows),
                         "sharded-head": linear_checks.sharded_head_message(rows)}
    results["world_size"] = dist.get_world_size()
    if dist.get_rank() == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
