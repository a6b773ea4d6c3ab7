"""Tiny causal LMs (built from transformers configs, no downloads) and builders of TRL's
distillation trainers on them, for tests/integrations/test_trl*.py and tests/trl_ddp_run.py:
fastkd.trl's trainers against TRL's own on the same models and batches."""
import os

import datasets
import torch
import transformers

from paths import ROOT, load_script

EXAMPLE = os.path.join(ROOT, "examples", "trl_onpolicy.py")


def load_example():
    return load_script(EXAMPLE)


EX = load_example()
V = EX.VOCAB


def causal_lm(kind: str, seed: int, dim: int = 32, **extra):
    """A 1-layer causal LM of ``kind`` with its output weights scaled up (logits of a few units,
    so the distributions are far from uniform and a softcap bends them)."""
    classes = {"llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig, {}),
               "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config, {}),
               "gemma2": (transformers.Gemma2ForCausalLM, transformers.Gemma2Config,
                          {"head_dim": 16, "attn_implementation": "eager"}),
               "cohere": (transformers.CohereForCausalLM, transformers.CohereConfig, {})}
    model_class, config_class, defaults = classes[kind]
    torch.manual_seed(seed)
    config = config_class(vocab_size=V, hidden_size=dim, intermediate_size=2 * dim,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                          max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                          eos_token_id=2, use_cache=False, **{**defaults, **extra})
    model = model_class(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(25.0)
    return model


# (student, teacher): no transforms; a softcapped teacher with a scaled (Cohere) student; a
# softcapped student with a softcapped teacher of another width
PAIRS = {
    "plain": (("llama", {}), ("qwen2", {"dim": 48})),
    "softcap": (("cohere", {"logit_scale": 0.5}), ("gemma2", {"final_logit_softcapping": 6.0})),
    "both-softcap": (("gemma2", {"final_logit_softcapping": 4.0}),
                     ("gemma2", {"final_logit_softcapping": 7.0, "dim": 48})),
}


def model_pair(name):
    (student_kind, student_extra), (teacher_kind, teacher_extra) = PAIRS[name]
    return (causal_lm(student_kind, 1, **student_extra),
            causal_lm(teacher_kind, 2, **teacher_extra).eval())


def param_grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()
            if p.grad is not None}


def assert_same_grads(got, want):
    assert got.keys() == want.keys()
    scale = max(float(g.abs().max()) for g in want.values())
    assert scale > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


def loss_and_grads(model, compute):
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    return loss.detach(), param_grads(model)


def config_args(tmp_path, **overrides):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, report_to=[],
                save_strategy="no", use_cpu=True, bf16=False, seed=0, disable_tqdm=True,
                dataloader_num_workers=0, learning_rate=0.5, optim="sgd",
                lr_scheduler_type="constant", logging_steps=1)
    base.update(overrides)
    return base


def gkd_rows(count=8, width=14, seed=0):
    """Right-padded rows with a prompt (label -100) and a completion of varying lengths."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        length = int(torch.randint(6, width + 1, (), generator=generator))
        prompt = int(torch.randint(2, length - 2, (), generator=generator))
        tokens = torch.randint(3, V, (length,), generator=generator).tolist()
        pad = width - length
        rows.append({"input_ids": tokens + [0] * pad, "attention_mask": [1] * length + [0] * pad,
                     "labels": [-100] * prompt + tokens[prompt:] + [-100] * pad,
                     "prompts": tokens[:prompt], "prompt_attention_mask": [1] * prompt})
    return rows


def gkd_collate(rows):
    batch = {key: torch.tensor([row[key] for row in rows])
             for key in ("input_ids", "attention_mask", "labels")}
    width = max(len(row["prompts"]) for row in rows)   # left-padded prompts
    batch["prompts"] = torch.tensor([[0] * (width - len(r["prompts"])) + r["prompts"]
                                     for r in rows])
    batch["prompt_attention_mask"] = (torch.arange(width) >= width - torch.tensor(
        [len(r["prompts"]) for r in rows]).unsqueeze(1)).long()
    return batch


def gkd_trainer(cls, student, teacher, tmp_path, **config):
    from trl.experimental.gkd import GKDConfig
    args = GKDConfig(**config_args(tmp_path, lmbda=0.0, **config))
    return cls(model=student, teacher_model=teacher, args=args, data_collator=gkd_collate,
               train_dataset=datasets.Dataset.from_list(gkd_rows()),
               processing_class=EX.byte_tokenizer())


def completion_batch(rows=4, prompt=6, completion=7, seed=3):
    """A micro-batch as TRL's DistillationTrainer makes it: left-padded prompts, right-padded
    completions, num_items_in_batch over the (global) generation batch."""
    generator = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, V, (rows, prompt), generator=generator)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[1, :2] = 0
    prompt_ids[1, :2] = 0
    completion_ids = torch.randint(3, V, (rows, completion), generator=generator)
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[0, 4:] = 0
    completion_mask[2, 1:] = 0
    completion_ids[completion_mask == 0] = 0
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "completion_ids": completion_ids, "completion_mask": completion_mask,
            "num_items_in_batch": completion_mask.sum() + 3}


def distillation_trainer(cls, student, teacher, tmp_path, **config):
    from trl import DistillationConfig
    args = DistillationConfig(**config_args(tmp_path, max_completion_length=6, **config))
    return cls(model=student, teacher_model=teacher, args=args,
               train_dataset=datasets.Dataset.from_dict({"prompt": [
                   "def f(x):", "a = [1,", "class A", "import o", "for i in", "x = {",
                   "while ", "return "]}),
               processing_class=EX.byte_tokenizer())
