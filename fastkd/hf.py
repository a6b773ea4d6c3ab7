"""Hugging Face ``transformers`` integration (``pip install fastkd[hf]``): :func:`load_causal_lm`
(local directories only), :class:`DistillationLoss` (fused linear + KD from a causal LM's last
hidden state, against an online teacher or cached targets) and :class:`DistillationTrainer`.
The batch layout lives in :mod:`fastkd.tokens`; see docs/llm-distillation.md.
"""
import inspect
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import fastkd
# transformers through hf_load, whose import names the extra to install when it is missing
from fastkd.checks import check_label_values
from fastkd.hf_load import MODEL_DTYPES, load_causal_lm, transformers
from fastkd.targets import SPARSE_TARGETS
from fastkd.tokens import collate_causal_lm, next_token_labels, targets_from_dict

__all__ = ["load_causal_lm", "DistillationLoss", "DistillationTrainer", "trainer_collator",
           "MODEL_DTYPES", "logit_transforms", "output_transforms", "token_average_scale"]


# float32 logits of one chunk of rows for the cross-entropy of an evaluation without a teacher
EVAL_CHUNK_BYTES = 64 * 2 ** 20


def vocab_size_of(model) -> Optional[int]:
    """Width of the model's output layer (may exceed the tokenizer's vocabulary); None when
    the module does not say (then its logits' width is checked instead)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return None if vocab is None else int(vocab)


def logit_transforms(model) -> tuple:
    """``(logit_scale, softcap)`` applied after a causal LM's output layer, read from its text
    config as TRL's ``DistillationTrainer`` reads them."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    scale = next((getattr(config, name) for name in ("logit_scale", "output_multiplier",
                                                     "lm_head_multiplier")
                  if getattr(config, name, None) is not None), None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scaling = config.logits_scaling
        scale = scaling if config.model_type == "hyperclovax" else 1 / scaling
    softcap = getattr(config, "final_logit_softcapping", None)
    return (1.0 if scale is None else float(scale)), (float(softcap) if softcap else None)


def output_transforms(model) -> dict:
    """:func:`logit_transforms` as ``{"logit_scale", "softcap"}`` (``cap * tanh(z / cap)``)."""
    scale, softcap = logit_transforms(model)
    return {"logit_scale": scale, "softcap": softcap}


def _apply_transforms(logits: torch.Tensor, transforms: dict) -> torch.Tensor:
    logits = logits * transforms["logit_scale"] if transforms["logit_scale"] != 1 else logits
    if transforms["softcap"]:
        logits = transforms["softcap"] * torch.tanh(logits / transforms["softcap"])
    return logits


class DistillationLoss:
    """Knowledge distillation for a causal LM student, from its last hidden state.

    ``loss = (soft_weight * sum_rows T^2 D(p_t, p_s) + hard_weight * sum_rows CE) / n`` over the
    rows with a next-token label, ``n`` being ``num_items_in_batch`` when given (gradient
    accumulation then equals one big batch), else this batch's kept rows. Student logits are
    made chunk by chunk inside the fused loss, never whole.

    ``teacher=None`` reads cached ``batch["teacher_targets"]``; an ``nn.Module`` runs online
    (eval mode, no gradients, on its own device). Batches hold ``input_ids``,
    ``attention_mask``, ``shift_labels`` (derived from HF ``labels`` when absent).

    As the stock ``Trainer``'s ``compute_loss_func``, a forward pre-hook on the student takes
    the distillation keys out of its keyword arguments; use
    ``data_collator=fastkd.hf.trainer_collator``, ``remove_unused_columns=False`` and
    ``loss_fn.attach_logging(trainer)``.
    """

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module] = None, *,
                 temperature: float = 1.0, soft_weight: float = 0.5, hard_weight: float = 0.5,
                 divergence: str = "forward_kl", beta: float = 0.5, tail: str = "bucket",
                 ignore_index: int = -100, chunk_rows: Optional[int] = None,
                 backend: str = "auto", hook: bool = True):
        from fastkd.checks import check_choice, check_options
        check_options(temperature, soft_weight, hard_weight, divergence, beta, ignore_index,
                      "sum", backend)
        check_choice("tail", tail, ("bucket", "renormalize", "ignore"))
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be None (cached targets) or an nn.Module, got "
                            f"{type(teacher).__name__}")
        self.student, self.teacher = student, teacher
        self.options = dict(temperature=temperature, divergence=divergence, beta=beta,
                            ignore_index=ignore_index, backend=backend)
        self.soft_weight, self.hard_weight = float(soft_weight), float(hard_weight)
        self.tail, self.chunk_rows = tail, chunk_rows
        self.ignore_index = ignore_index
        if teacher is not None and vocab_size_of(teacher) is not None:
            self._check_vocab(vocab_size_of(teacher), "the teacher")
        self.parts = {"kd_loss": 0.0, "ce_loss": 0.0}  # sums since the last log
        self.evaluated = {"cross_entropy": 0, "distillation": 0}  # eval batches of each kind
        self._trainer = None  # the stock Trainer, once attach_logging is called
        self._stash = None
        self._hook = student.register_forward_pre_hook(self._pre_hook, with_kwargs=True) \
            if hook else None

    def _check_vocab(self, teacher_vocab: int, what: str) -> None:
        student_vocab = vocab_size_of(self.student)
        if teacher_vocab != student_vocab:
            raise ValueError(
                f"vocabulary mismatch: {what} has {teacher_vocab} classes, the student's "
                f"output layer {student_vocab}; teacher and student must share a tokenizer and "
                f"output width (resize the student's embeddings, or slice the teacher's "
                f"extra padding columns yourself)")

    def student_kwargs(self, kwargs: dict) -> dict:
        """The student's forward keyword arguments: hidden states on, and only the last
        position's logits where the model supports it (``logits_to_keep`` or, in transformers
        4.45-4.49, ``num_logits_to_keep``)."""
        kwargs = {key: value for key, value in kwargs.items() if value is not None}
        kwargs["output_hidden_states"] = True
        parameters = inspect.signature(self.student.forward).parameters
        for name in ("logits_to_keep", "num_logits_to_keep"):
            if name in parameters:
                kwargs[name] = 1
                break
        return kwargs

    def compute(self, inputs: dict, num_items_in_batch=None, student_hidden=None, model=None):
        """``(loss, {"kd_loss", "ce_loss"})`` for one (micro-)batch, the parts detached. The
        student runs through ``model`` (default the student) unless ``student_hidden`` is given.
        In eval mode without any teacher the loss is the student's own cross-entropy."""
        input_ids = inputs["input_ids"]
        attention_mask = inputs.get("attention_mask")
        labels = inputs.get("shift_labels")
        if labels is None:
            if inputs.get("labels") is None:
                raise ValueError("the batch has neither 'shift_labels' nor 'labels'; build it "
                                 "with fastkd.tokens.collate_causal_lm")
            labels = next_token_labels(inputs["labels"], self.ignore_index)
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} do not match input_ids "
                             f"{tuple(input_ids.shape)}")
        if student_hidden is None:
            model = self.student if model is None else model
            output = model(**self.student_kwargs(
                {"input_ids": input_ids, "attention_mask": attention_mask}))
            student_hidden = output.hidden_states[-1]
        keep = labels != self.ignore_index
        hidden = student_hidden[keep]
        kept_labels = labels[keep]
        # a batch without target tokens has sums of 0: dividing by at least 1 keeps its loss and
        # gradients 0 (weights unchanged) instead of 0 / 0
        normalizer = num_items_in_batch if num_items_in_batch is not None else keep.sum()
        normalizer = torch.as_tensor(normalizer).to(hidden.device, torch.float32).clamp(min=1)
        zero = hidden.new_zeros((), dtype=torch.float32)
        if not self.student.training and self.teacher is None and \
                inputs.get("teacher_targets") is None:
            # evaluation on plain token data: the student's own next-token cross-entropy,
            # unweighted (also for soft_weight=0 training, so eval_perplexity is exp of it)
            self.evaluated["cross_entropy"] += 1
            ce = self._loss_sum(hidden, None, kept_labels, 0.0, 1.0) / normalizer
            return ce, {"kd_loss": zero, "ce_loss": ce.detach()}
        if not self.student.training:
            self.evaluated["distillation"] += 1
        # soft_weight 0 is plain next-token cross-entropy: no teacher needed
        teacher = self._teacher_rows(inputs, keep) if self.soft_weight else None
        kd_sum = self._loss_sum(hidden, teacher, kept_labels, self.soft_weight, 0.0) \
            if self.soft_weight else zero
        ce_sum = self._loss_sum(hidden, teacher, kept_labels, 0.0, self.hard_weight) \
            if self.hard_weight else zero
        kd, ce = kd_sum / normalizer, ce_sum / normalizer
        return kd + ce, {"kd_loss": kd.detach(), "ce_loss": ce.detach()}

    def _teacher_rows(self, inputs: dict, keep: torch.Tensor):
        """The teacher's targets at the kept positions: cached rows, or the online teacher's
        hidden states + head (its logits when it has no head)."""
        if self.teacher is None:
            targets = targets_from_dict(inputs.get("teacher_targets"))
            if targets is None:
                raise ValueError("no teacher: pass teacher= (online) or batches with "
                                 "'teacher_targets' (fastkd.tokens.collate_causal_lm over a "
                                 "fastkd.CachedDataset)")
            rows = targets.indices if isinstance(targets, SPARSE_TARGETS) else targets
            if tuple(rows.shape[:-1]) != tuple(keep.shape):
                raise ValueError(
                    f"batch['teacher_targets'] holds rows for positions "
                    f"{tuple(rows.shape[:-1])} but input_ids is {tuple(keep.shape)}: the "
                    f"teacher rows must come with the same samples, padded the same way "
                    f"(fastkd.tokens.collate_causal_lm over a fastkd.CachedDataset)")
            if not isinstance(targets, SPARSE_TARGETS):
                self._check_vocab(targets.shape[-1], "the cached teacher")
                return targets[keep.to(targets.device)]
            return targets.map_tensors(lambda part: part[keep.to(part.device)])
        device = next(self.teacher.parameters()).device
        kwargs = {key: inputs[key].to(device) for key in ("input_ids", "attention_mask")
                  if inputs.get(key) is not None}
        self.teacher.eval()
        with torch.no_grad():
            head = self.teacher.get_output_embeddings() if hasattr(
                self.teacher, "get_output_embeddings") else None
            if head is not None and hasattr(self.teacher, "base_model"):
                hidden = self.teacher.base_model(**kwargs).last_hidden_state
                transforms = output_transforms(self.teacher)
                return fastkd.TeacherHead(
                    hidden[keep.to(device)].to(keep.device), head.weight.to(keep.device),
                    None if head.bias is None else head.bias.to(keep.device),
                    logit_scale=transforms["logit_scale"], softcap=transforms["softcap"])
            output = self.teacher(**kwargs)
            logits = output.logits if hasattr(output, "logits") else output
        self._check_vocab(logits.shape[-1], "the teacher")
        return logits[keep.to(device)].to(keep.device)

    def _loss_sum(self, hidden, teacher, labels, soft_weight, hard_weight):
        head = self.student.get_output_embeddings()
        if type(head.weight).__name__ == "DTensor":
            raise ValueError(
                "the student's output layer weight is sharded (an FSDP DTensor) where the loss "
                "reads it, outside the model's forward; fastkd.hf's Trainer integration "
                "supports DDP: under FSDP compute fastkd.linear_kd_loss inside a module's "
                "forward (docs/llm-distillation.md, 'More than one GPU')")
        transforms = output_transforms(self.student)
        if teacher is None:  # cross-entropy only
            check_label_values(labels, head.weight.shape[0], self.ignore_index)   # named
            # without gradients (evaluation) a chunk of rows at a time: full logits never held
            rows = len(hidden) if torch.is_grad_enabled() else max(
                1, self.chunk_rows or EVAL_CHUNK_BYTES // (4 * head.weight.shape[0]))
            total = hidden.new_zeros((), dtype=torch.float32)
            for start in range(0, len(hidden), rows) if len(hidden) else [0]:
                logits = _apply_transforms(F.linear(hidden[start:start + rows], head.weight,
                                                    head.bias), transforms)
                total = total + F.cross_entropy(logits.float(), labels[start:start + rows],
                                                reduction="sum")
            return hard_weight * total
        options = dict(self.options, soft_weight=soft_weight, hard_weight=hard_weight,
                       reduction="sum")
        if isinstance(teacher, SPARSE_TARGETS):
            options["tail"] = self.tail
        return fastkd.linear_kd_loss(
            hidden, head.weight, teacher, labels, student_bias=head.bias,
            student_logit_scale=transforms["logit_scale"],
            student_softcap=transforms["softcap"], chunk_rows=self.chunk_rows, **options)

    def _pre_hook(self, module, args, kwargs):
        """Take the distillation keys out of the student's keyword arguments (the stock
        Trainer passes the whole batch to ``model(**inputs)``) and ask for hidden states."""
        if "teacher_targets" not in kwargs and "shift_labels" not in kwargs:
            return None
        self._stash = {key: kwargs.pop(key, None) for key in ("teacher_targets", "shift_labels")}
        self._stash.update({key: kwargs.get(key) for key in ("input_ids", "attention_mask")})
        return args, self.student_kwargs(kwargs)

    def __call__(self, outputs, labels, num_items_in_batch=None):
        """The stock ``Trainer``'s ``compute_loss_func(outputs, labels, num_items_in_batch)``."""
        stash, self._stash = self._stash, None
        if stash is None or getattr(outputs, "hidden_states", None) is None:
            raise ValueError("DistillationLoss as compute_loss_func needs batches from "
                             "fastkd.tokens.collate_causal_lm (with 'shift_labels') and "
                             "TrainingArguments(remove_unused_columns=False)")
        inputs = dict(stash, labels=labels)
        loss, parts = self.compute(inputs, num_items_in_batch,
                                   student_hidden=outputs.hidden_states[-1])
        if self.student.training:   # the stock Trainer scales the returned loss after this call
            self.accumulate(parts, 1 if self._trainer is None else
                            token_average_scale(self._trainer, num_items_in_batch))
        return loss

    def accumulate(self, parts: dict, scale=1) -> None:
        """Add one micro-batch's parts times ``scale`` (the Trainer's loss scale) to the sums."""
        for key, value in parts.items():
            self.parts[key] = self.parts[key] + value * scale

    def reset_parts(self) -> None:
        self.parts = {key: 0.0 for key in self.parts}

    def take_parts(self, steps: int, parallel_mode=None, device=None) -> dict:
        """The parts averaged over ``steps`` optimizer steps and over the processes, as the
        Trainer averages its logged ``loss``; resets the sums."""
        from transformers.trainer_pt_utils import nested_gather
        keys = list(self.parts)
        values = torch.stack([torch.as_tensor(self.parts[key], dtype=torch.float32,
                                              device=device) for key in keys])
        if parallel_mode is not None:
            values = nested_gather(values, parallel_mode).view(-1, len(keys)).mean(0)
        self.reset_parts()
        return {key: float(value) / max(steps, 1) for key, value in zip(keys, values.tolist())}

    def attach_logging(self, trainer) -> None:
        """Log ``kd_loss`` and ``ce_loss`` with the stock Trainer: a callback placed before the
        reporting integrations (``report_to``) adds them to each training log and its entry in
        ``trainer.state.log_history``."""
        self._trainer = trainer
        trainer.callback_handler.callbacks.insert(0, _PartsCallback(self))

    def remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def token_average_scale(trainer, num_items_in_batch) -> int:
    """The factor ``transformers.Trainer.compute_loss`` multiplies a loss normalized by
    ``num_items_in_batch`` by: the number of data-parallel processes when the count covers every
    process's tokens (``average_tokens_across_devices``), since DDP averages gradients."""
    args = trainer.args
    if num_items_in_batch is None or not getattr(args, "average_tokens_across_devices", False):
        return 1
    if args.n_gpu > 1:
        return args.n_gpu
    tp_size = trainer.get_tp_size() if hasattr(trainer, "get_tp_size") else 1
    return trainer.accelerator.num_processes // tp_size


class _PartsCallback(transformers.TrainerCallback):
    """Counts the optimizer steps behind the summed parts (from the step a ``train()`` call
    starts at, which is the checkpoint's step on resume) and logs them with ``loss``."""

    def __init__(self, loss: DistillationLoss, update_logs: bool = True):
        self.loss, self.last_step, self.update_logs = loss, 0, update_logs

    def on_train_begin(self, args, state, control, **kwargs):
        self.loss.reset_parts()
        self.last_step = state.global_step

    def take(self, args, state) -> dict:
        parts = self.loss.take_parts(state.global_step - self.last_step, args.parallel_mode,
                                     args.device)
        self.last_step = state.global_step
        return parts

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.update_logs and logs is not None and "loss" in logs:
            parts = self.take(args, state)
            logs.update(parts)
            # Trainer.log appends a copy of these logs to log_history before the callbacks run:
            # the parts go into that entry too (trainer_state.json, checkpoints)
            entry = state.log_history[-1] if state.log_history else None
            if entry is not None and entry.get("step") == state.global_step and "loss" in entry:
                entry.update(parts)


def trainer_collator(items, **kwargs) -> dict:
    """:func:`fastkd.tokens.collate_causal_lm` with sparse targets as dicts: the collator for
    the stock ``transformers.Trainer`` (which cannot move named tuples between devices)."""
    return collate_causal_lm(items, targets_as_dict=True, **kwargs)


class DistillationTrainer(transformers.Trainer):
    """``transformers.Trainer`` whose loss is :class:`DistillationLoss` (``teacher=None``: batches
    of cached ``teacher_targets`` from ``collate_causal_lm``). Logs ``kd_loss`` and ``ce_loss``;
    under DDP the loss and gradients equal one process's on the global batch. ``evaluate()``
    without any teacher reports the student's cross-entropy and ``eval_perplexity``.
    """

    def __init__(self, *args, teacher: Optional[nn.Module] = None, temperature: float = 1.0,
                 soft_weight: float = 0.5, hard_weight: float = 0.5,
                 divergence: str = "forward_kl", beta: float = 0.5, tail: str = "bucket",
                 chunk_rows: Optional[int] = None, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.distillation = DistillationLoss(
            self.model, teacher, temperature=temperature, soft_weight=soft_weight,
            hard_weight=hard_weight, divergence=divergence, beta=beta, tail=tail,
            ignore_index=-100, chunk_rows=chunk_rows, backend=backend, hook=False)
        if teacher is not None and self.args.device is not None and \
                next(teacher.parameters()).device.type == "cpu":
            teacher.to(self.args.device)
        # our loss is normalized by num_items_in_batch: the Trainer must count the items and
        # must not divide by the accumulation steps again (transformers 4.46+ and 5.x)
        self.model_accepts_loss_kwargs = True
        self._parts_log = _PartsCallback(self.distillation, update_logs=False)
        self.add_callback(self._parts_log)
        self._num_items_given = True

    @property
    def loss_is_scaled_for_ga(self):  # read by transformers 5.x's training_step
        return self._num_items_given

    @loss_is_scaled_for_ga.setter
    def loss_is_scaled_for_ga(self, value):
        pass

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns += [key for key in ("teacher_targets", "shift_labels")
                                    if key not in self._signature_columns]

    def _prepare_input(self, data):
        if isinstance(data, SPARSE_TARGETS):  # the base class cannot rebuild named tuples
            return data.map_tensors(super()._prepare_input)
        return super()._prepare_input(data)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._num_items_given = num_items_in_batch is not None
        loss, parts = self.distillation.compute(inputs, num_items_in_batch, model=model)
        # the stock compute_loss's scaling for a count gathered across processes
        scale = token_average_scale(self, num_items_in_batch)
        loss = loss * scale if scale != 1 else loss
        if model.training:
            self.distillation.accumulate(parts, scale)
        return (loss, {"loss": loss}) if return_outputs else loss

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None,
                        ignore_keys=None, metric_key_prefix="eval"):
        """The Trainer's loop, adding ``<prefix>_perplexity`` when no batch had a teacher."""
        self.distillation.evaluated = {key: 0 for key in self.distillation.evaluated}
        output = super().evaluation_loop(dataloader, description, prediction_loss_only,
                                         ignore_keys, metric_key_prefix)
        evaluated = self.distillation.evaluated
        loss = output.metrics.get(f"{metric_key_prefix}_loss")
        if evaluated["cross_entropy"] and not evaluated["distillation"] and loss is not None:
            output.metrics[f"{metric_key_prefix}_perplexity"] = math.exp(min(loss, 700.0))
        return output

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self.state.global_step > self._parts_log.last_step:
            logs.update(self._parts_log.take(self.args, self.state))
        return super().log(logs, *args, **kwargs)
