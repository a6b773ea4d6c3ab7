"""One SGD step of ``fastkd.hf.DistillationTrainer`` or of the stock ``transformers.Trainer`` with
``fastkd.hf.DistillationLoss``, run the same way by every rank of a ``torchrun`` job and by one
process (the reference): tests/distributed/run.py and tests/integrations/test_distributed.py use it.

The step is plain SGD at learning rate 1 without weight decay or clipping, so the change of each
parameter is minus its gradient, and the logged ``grad_norm`` is the norm of that change.
"""
import torch

import hf_helpers

STUDENT_SEED, TEACHER_SEED = 1, 0


class RecordedDataset(torch.utils.data.Dataset):
    """A dataset that records which sample indices this process read (its share of a batch)."""

    def __init__(self, dataset):
        self.dataset, self.indices = dataset, []

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        self.indices.append(int(index))
        return self.dataset[index]


class _Capture:
    """The last training log as the reporting integrations see it (the stock Trainer's
    ``log_history`` is written before callbacks add ``kd_loss``/``ce_loss``)."""

    def __init__(self):
        import transformers

        class Capture(transformers.TrainerCallback):
            def on_log(inner, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    self.logs = dict(logs)

        self.logs, self.callback = None, Capture()


def train_step(rows, output_dir, *, stock: bool, average_tokens: bool, batch_size: int,
               accumulation: int = 1, distributed: bool = False) -> dict:
    """One optimizer step over ``rows`` (token rows in HF conventions) with an online teacher.

    Returns ``{"logs": {loss, kd_loss, ce_loss, grad_norm}, "steps": {name: -gradient},
    "indices": the samples this process read}``.
    """
    import transformers
    from fastkd.hf import DistillationLoss, DistillationTrainer, trainer_collator
    from fastkd.tokens import TokenDataset, collate_causal_lm

    teacher = hf_helpers.tiny_gpt2(seed=TEACHER_SEED)
    model = hf_helpers.tiny_gpt2(seed=STUDENT_SEED, layers=1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    dataset = RecordedDataset(TokenDataset(rows))
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1.0, optim="sgd",
        weight_decay=0.0, lr_scheduler_type="constant", logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, remove_unused_columns=False, disable_tqdm=True,
        seed=0, max_grad_norm=0, dataloader_num_workers=0,
        average_tokens_across_devices=average_tokens,
        ddp_backend="gloo" if distributed else None)
    capture = _Capture()
    if stock:
        loss_fn = DistillationLoss(model, teacher, temperature=2.0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset,
                                       data_collator=trainer_collator,
                                       compute_loss_func=loss_fn)
        loss_fn.attach_logging(trainer)
    else:
        trainer = DistillationTrainer(model=model, teacher=teacher, args=args,
                                      train_dataset=dataset, data_collator=collate_causal_lm,
                                      temperature=2.0)
    trainer.add_callback(capture.callback)
    trainer.train()
    logs = {key: float(capture.logs[key]) for key in ("loss", "kd_loss", "ce_loss", "grad_norm")}
    steps = {name: before[name] - p.detach() for name, p in model.named_parameters()}
    return {"logs": logs, "steps": steps, "indices": sorted(dataset.indices)}


# the configurations a distributed run checks: (name, stock Trainer?, average_tokens_across_devices)
CONFIGS = [("subclass-global", False, True), ("subclass-local", False, False),
           ("stock-global", True, True), ("stock-local", True, False)]
