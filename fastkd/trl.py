"""TRL's distillation trainers with fastkd's fused linear + KD loss (``pip install
'fastkd[trl]'``): drop-in subclasses in which only the loss changes, computed from the student's
last hidden state and ``lm_head`` so neither model's ``(tokens, V)`` logits are held. Each keeps
TRL's loss value and normalization:

- :class:`GKDTrainer` (``trl.experimental.gkd``): generalized JSD at temperature 1 against the
  online teacher as a :class:`fastkd.TeacherHead`.
- :class:`DistillationTrainer` (``trl``): generalized JSD at ``temperature`` without ``T^2``,
  plus TRL's entropy metric.
- :class:`ServerDistillationTrainer` (``trl.experimental.server_distillation``): the served top-k
  log-probabilities as :class:`fastkd.TopKLogits`, tail bucketed or renormalized.

``beta`` keeps TRL's convention (fastkd's ``divergence="jsd"``). The backbone and the loss run
inside the student wrapper's ``forward`` (forward redirection), so DDP and FSDP hooks fire; an
FSDP2 ``DTensor`` head is gathered with ``full_tensor()``, a DeepSpeed ZeRO-3 one with TRL's
``maybe_gather_lm_head_ctx``.
"""
import warnings
from typing import Optional

from fastkd.extras import require

require("transformers", "trl", "fastkd.trl")
trl = require("trl", "trl", "fastkd.trl")

import torch  # noqa: E402
from packaging.version import Version  # noqa: E402
from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: E402

import fastkd  # noqa: E402
from fastkd.checks import check_temperature  # noqa: E402
from fastkd.hf import logit_transforms  # noqa: E402
from fastkd.linear import DEFAULT_CHUNK_BUDGET_BYTES  # noqa: E402

if Version(trl.__version__) < Version("1.16.0"):
    raise ImportError(f"fastkd.trl needs trl >= 1.16.0, found {trl.__version__}: "
                      "pip install 'fastkd[trl]'")

from trl import DistillationTrainer as TRLDistillationTrainer  # noqa: E402
from trl.trainer.utils import maybe_gather_lm_head_ctx  # noqa: E402

with warnings.catch_warnings():   # the experimental trainers warn once at import
    warnings.simplefilter("ignore")
    from trl.experimental.gkd import GKDTrainer as TRLGKDTrainer  # noqa: E402
    from trl.experimental.server_distillation import (  # noqa: E402
        ServerDistillationTrainer as TRLServerDistillationTrainer)

__all__ = ["GKDTrainer", "DistillationTrainer", "ServerDistillationTrainer", "logit_transforms",
           "fused_divergence", "teacher_head", "backbone_hidden", "redirect",
           "student_entropy_sum"]


def _unpeft(model):
    """The causal LM under a PEFT wrapper (the model itself otherwise)."""
    if hasattr(model, "peft_config") and hasattr(model, "base_model") \
            and hasattr(model.base_model, "model"):
        return model.base_model.model
    return model


def _full(tensor, dtype):
    """An FSDP2 ``DTensor`` parameter gathered (autograd-aware) into a plain ``dtype`` tensor."""
    if tensor is not None and isinstance(tensor, torch.distributed.tensor.DTensor):
        return tensor.full_tensor().to(dtype)
    return tensor


def _head(model, hidden_dtype):
    """``(weight, bias, logit_scale, softcap)`` of a causal LM's output layer."""
    head = _unpeft(model).get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"{type(model).__name__} has no output layer (get_output_embeddings() "
                         "is None): fastkd.trl needs a causal LM with an lm_head")
    if hasattr(head, "base_layer"):   # a PEFT adapter layer around the head
        raise ValueError("an adapter on lm_head is not supported: the fused loss reads "
                         "lm_head.weight directly, so the adapter would be neither applied nor "
                         "trained; remove 'lm_head' from the adapter's target_modules")
    scale, softcap = logit_transforms(model)
    return (_full(head.weight, hidden_dtype), _full(getattr(head, "bias", None), hidden_dtype),
            scale, softcap)


def backbone_hidden(model, input_ids, attention_mask):
    """The last hidden state ``(B, L, H)`` of a causal LM's backbone (no ``lm_head``)."""
    backbone = _unpeft(model).base_model
    return backbone(input_ids=input_ids, attention_mask=attention_mask,
                    use_cache=False).last_hidden_state


def redirect(wrapper, module, method, *args, **kwargs):
    """``method(*args, **kwargs)`` run as ``module``'s forward, called through ``wrapper`` (DDP,
    FSDP, DeepSpeed, or ``module`` itself), so both modules' forward hooks fire around it."""
    original = module.forward

    def forward(*inner_args, **inner_kwargs):
        module.forward = original
        return method(*inner_args, **inner_kwargs)
    module.forward = forward
    try:
        return wrapper(*args, **kwargs)
    finally:
        module.forward = original


def fused_divergence(student_hidden, student, teacher, keep, *, beta: float,
                     temperature: float, t_squared: bool, tail: str = "bucket",
                     chunk_budget_bytes: Optional[int] = None):
    """Sum over the rows ``keep`` of the generalized JSD (TRL's ``beta``) at ``temperature``
    between the student (``student_hidden`` through ``student``'s output layer) and ``teacher``
    (a :class:`fastkd.TeacherHead` or sparse target), times ``T^2`` when ``t_squared``."""
    temperature = check_temperature(temperature)   # the losses' range
    weight, bias, scale, softcap = _head(student, student_hidden.dtype)
    if isinstance(teacher, fastkd.TeacherHead) and teacher.weight.device != weight.device:
        raise ValueError(f"the student's lm_head is on {weight.device} but the teacher's on "
                         f"{teacher.weight.device}: place both heads on the same device")
    labels = torch.where(keep, 0, -100)   # only which rows count: there is no hard term
    with maybe_gather_lm_head_ctx(weight, bias):
        return fastkd.linear_kd_loss(
            student_hidden, weight, teacher, labels, student_bias=bias,
            student_logit_scale=scale, student_softcap=softcap, temperature=temperature,
            soft_weight=1.0 if t_squared else 1.0 / temperature ** 2, hard_weight=0.0,
            divergence="jsd", beta=float(beta), reduction="sum", tail=tail,
            chunk_budget_bytes=chunk_budget_bytes)


def teacher_head(teacher, teacher_hidden):
    """A :class:`fastkd.TeacherHead` from a teacher model's hidden states and output layer."""
    weight, bias, scale, softcap = _head(teacher, teacher_hidden.dtype)
    return fastkd.TeacherHead(teacher_hidden, weight, bias, logit_scale=scale, softcap=softcap)


def _normalized(total, keep, num_items_in_batch):
    """``total / num_items_in_batch``, or over the kept rows (at least 1) when it is None."""
    if num_items_in_batch is None:
        return total / keep.sum().clamp(min=1)
    return total / torch.as_tensor(num_items_in_batch, device=total.device)


@torch.no_grad()
def student_entropy_sum(student_hidden, student, keep, temperature: float,
                        chunk_budget_bytes: Optional[int] = None):
    """Sum over the rows ``keep`` of the entropy (nats) of ``softmax(logits / temperature)``
    (TRL's logged metric), a chunk of rows (three float32 buffers within the budget) at a time."""
    temperature = check_temperature(temperature)   # the losses' range
    weight, bias, scale, softcap = _head(student, student_hidden.dtype)
    rows = student_hidden[keep]
    budget = chunk_budget_bytes or DEFAULT_CHUNK_BUDGET_BYTES
    step = max(1, min(1024, budget // (3 * 4 * weight.shape[0])))
    total = torch.zeros((), dtype=torch.float32, device=rows.device)
    with maybe_gather_lm_head_ctx(weight, bias):
        for start in range(0, rows.shape[0], step):
            z = torch.nn.functional.linear(rows[start:start + step], weight, bias).float()
            if softcap is not None:   # TRL's order: scale, softcap, then the temperature
                z.mul_(scale / softcap).tanh_().mul_(softcap / temperature)
            else:
                z.mul_(scale / temperature)
            z.sub_(torch.logsumexp(z, dim=-1, keepdim=True))   # log p
            total -= z.exp().mul_(z).sum()
    return total


class _ChunkBudget:
    """The trainers' extra keyword ``chunk_budget_bytes`` (default
    ``fastkd.linear.DEFAULT_CHUNK_BUDGET_BYTES``)."""

    def __init__(self, *args, **kwargs):
        budget = kwargs.pop("chunk_budget_bytes", None)
        if budget is not None and (not isinstance(budget, int) or budget <= 0):
            raise ValueError(f"chunk_budget_bytes must be a positive int, got {budget!r}")
        self.chunk_budget_bytes = budget
        super().__init__(*args, **kwargs)


class GKDTrainer(_ChunkBudget, TRLGKDTrainer):
    """``trl.experimental.gkd.GKDTrainer`` with fastkd's fused loss: TRL's
    ``generalized_jsd_loss`` value and gradients without either model's logits
    (``compute_loss(..., return_outputs=True)`` returns none)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student = self.accelerator.unwrap_model(model)
        loss = redirect(model, student, self._fused_loss, student, inputs, num_items_in_batch)
        return (loss, CausalLMOutputWithPast(loss=loss)) if return_outputs else loss

    def _fused_loss(self, student, inputs, num_items_in_batch):
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        hidden = backbone_hidden(student, input_ids, attention_mask)[:, :-1]
        self.teacher_model.eval()
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = redirect(self.teacher_model, teacher, backbone_hidden, teacher,
                                      input_ids, attention_mask)[:, :-1]
        keep = inputs["labels"][:, 1:] != -100
        # TRL's generalized_jsd_loss runs at temperature 1 whatever args.temperature says
        total = fused_divergence(hidden, student, teacher_head(teacher, teacher_hidden), keep,
                                 beta=self.beta, temperature=1.0, t_squared=True,
                                 chunk_budget_bytes=self.chunk_budget_bytes)
        return _normalized(total, keep, num_items_in_batch)


class DistillationTrainer(_ChunkBudget, TRLDistillationTrainer):
    """``trl.DistillationTrainer`` with fastkd's fused loss: TRL's value and gradients."""

    # TRL's compute_loss runs this inside the student wrapper's forward; (loss, entropy, n)
    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        logits_to_keep = completion_ids.size(1)
        extra = {key: inputs[key] for key in (
            "pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes",
            "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")
            if key in inputs}
        hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask,
                                             logits_to_keep, **extra)
        self.teacher_model.eval()
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(
                self.teacher_model, teacher, self._get_last_hidden_state, teacher, input_ids,
                attention_mask, logits_to_keep, **extra)
        keep = loss_mask.to(hidden.device) != 0
        total = fused_divergence(hidden, unwrapped_student,
                                 teacher_head(teacher, teacher_hidden.to(hidden.device)), keep,
                                 beta=self.beta, temperature=self.temperature,
                                 t_squared=False, chunk_budget_bytes=self.chunk_budget_bytes)
        entropy = student_entropy_sum(hidden.detach(), unwrapped_student, keep,
                                      self.temperature, self.chunk_budget_bytes)
        return _normalized(total, keep, num_items_in_batch), entropy, keep.sum()


class ServerDistillationTrainer(_ChunkBudget, TRLServerDistillationTrainer):
    """``trl.experimental.server_distillation.ServerDistillationTrainer`` with fastkd's fused
    loss: TRL's sparse-path value and gradients. A counted position without finite teacher
    log-probabilities is refused (TRL drops the entry)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        completion_labels = torch.where(completion_mask.bool(), completion_ids,
                                        torch.full_like(completion_ids, -100))
        labels = torch.cat([torch.full_like(prompt_ids, -100), completion_labels], dim=1)
        inputs = {**inputs, "input_ids": input_ids, "attention_mask": attention_mask,
                  "labels": labels, "prompt_attention_mask": prompt_mask}
        prompt_length = self._compute_prompt_length(inputs)
        teacher_result = self._get_teacher_token_logprobs_from_server(inputs, prompt_length)
        student = self.accelerator.unwrap_model(model)
        loss = redirect(model, student, self._fused_loss, student, inputs, prompt_length,
                        teacher_result)
        # TRL's server path averages per micro-batch, so it divides by the accumulation steps
        if self.model.training:
            loss = loss / self.current_gradient_accumulation_steps
        return (loss, CausalLMOutputWithPast(loss=loss)) if return_outputs else loss

    def _fused_loss(self, student, inputs, prompt_length, teacher_result):
        input_ids = inputs["input_ids"]
        comp_len = teacher_result["actual_logprobs"].shape[1]
        hidden = self._get_last_hidden_state(student, input_ids, inputs["attention_mask"],
                                             input_ids.shape[1] - prompt_length)[:, :comp_len]
        labels = inputs["labels"][:, prompt_length:][:, :comp_len]
        tokens = input_ids[:, prompt_length:][:, :comp_len]
        keep = labels != -100
        ids, logprobs = self._support(teacher_result, tokens, keep)
        if ids.shape[-1] == 2:
            # beta strictly between 0 and 1: the support is {teacher top-1, sampled token}, one
            # id where they coincide; ids are unique within a row, so those rows go separately
            same = ids[..., 0] == ids[..., 1]
            groups = [(keep & same, 1), (keep & ~same, 2)]
        else:
            groups = [(keep, ids.shape[-1])]
        total = hidden.new_zeros((), dtype=torch.float32)
        for rows, width in groups:
            if bool(rows.any()):
                total = total + fused_divergence(
                    hidden, student, self._target(ids[..., :width], logprobs[..., :width]),
                    rows, beta=self.beta, temperature=self.temperature, t_squared=False,
                    tail="bucket" if self.loss_add_tail else "renormalize",
                    chunk_budget_bytes=self.chunk_budget_bytes)
        return total / keep.sum().clamp(min=1)

    def _target(self, ids, logprobs):
        """Served log-probabilities as a ``TopKLogits`` for the loss at its temperature."""
        return fastkd.TopKLogits.from_logprobs(logprobs.float(), ids,
                                               temperature=float(self.temperature))

    def _support(self, teacher_result, tokens, keep):
        """``(ids, logprobs)`` ``(B, T, K)``: ``beta = 0``: the served top-k; ``beta = 1``: the
        sampled token; else the teacher's top-1 then the sampled token."""
        top_ids, top_logprobs = teacher_result["topk_token_ids"], teacher_result["topk_logprobs"]
        actual = teacher_result["actual_logprobs"]
        if self.beta == 0:
            ids, logprobs = top_ids, top_logprobs
        else:
            missing = keep & ~torch.isfinite(actual)
            if missing.any():
                raise ValueError(
                    "Teacher server is missing actual-token logprobs for required reverse-KL "
                    f"positions: {int(missing.sum())}/{int(keep.sum())}.")
            if self.beta == 1:
                ids, logprobs = tokens.unsqueeze(-1), actual.unsqueeze(-1)
            else:
                ids = torch.stack([top_ids[..., 0], tokens], dim=-1)
                logprobs = torch.stack([top_logprobs[..., 0], actual], dim=-1)
        bad = keep & ~torch.isfinite(logprobs).all(-1)
        if bad.any():
            raise ValueError(
                f"the teacher server returned no finite log-probability for {int(bad.sum())} of "
                f"the {int(keep.sum())} completion positions that count (every one needs all "
                f"{logprobs.shape[-1]} top-k entries)")
        logprobs = torch.where(keep.unsqueeze(-1), logprobs, torch.zeros_like(logprobs))
        return ids.long(), logprobs
