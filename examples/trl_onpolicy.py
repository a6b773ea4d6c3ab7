"""On-policy distillation through TRL with fastkd's fused loss, end to end, with no downloads.

    python examples/trl_onpolicy.py            # the full run
    python examples/trl_onpolicy.py --smoke    # seconds (what the test suite runs)

1. Text: a few hundred lines of the Python reference documentation that ships with Python
   (``pydoc_data.topics``), tokenized by a byte-level tokenizer built here (256 bytes and three
   special tokens, V = 259; nothing downloaded). Each paragraph's first bytes are a prompt.
2. Models: a Llama-style teacher (pretrained briefly on the text with next-token cross-entropy)
   and a smaller, untrained Qwen2-style student, both built from ``transformers`` configs.
3. ``fastkd.trl.DistillationTrainer`` (TRL's ``DistillationTrainer`` with fastkd's fused linear
   + KD loss): the student generates completions of the prompts (real sampling), the teacher
   scores them, the loss is the generalized JSD (``--beta``; 1 = reverse KL) on those tokens.
4. Printed: the student's mean per-token reverse KL to the teacher on its own samples of
   held-out prompts, before and after.
"""
import argparse
import math
import tempfile

import torch

VOCAB = 259   # <pad>, <s>, </s>, then the 256 bytes
PAD, BOS, EOS = 0, 1, 2


def byte_tokenizer(padding_side: str = "left"):
    """A byte-level ``PreTrainedTokenizerFast`` built offline: ids 0-2 are ``<pad>``, ``<s>``,
    ``</s>``, then id ``3 + b`` is byte ``b`` (GPT-2's byte alphabet, no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS}
    for byte, char in bytes_to_unicode().items():   # GPT-2's printable stand-in for each byte
        vocab[char] = 3 + byte   # token id = 3 + byte value
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>", padding_side=padding_side)


def corpus_paragraphs(max_lines: int) -> list:
    """Paragraphs of the first ``max_lines`` non-empty lines of Python's bundled docs."""
    from pydoc_data.topics import topics
    lines = [line.strip() for key in sorted(topics) for line in topics[key].splitlines()]
    lines = [line for line in lines if line.isascii() and len(line) > 20][:max_lines]
    return lines


def build_models(args):
    import transformers
    common = dict(vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=PAD,
                  bos_token_id=BOS, eos_token_id=EOS, use_cache=False)
    torch.manual_seed(args.seed)
    teacher = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=args.teacher_dim, intermediate_size=2 * args.teacher_dim,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, **common))
    student = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        hidden_size=args.student_dim, intermediate_size=2 * args.student_dim,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, **common))
    return teacher, student


def pretrain_teacher(teacher, tokenizer, lines, args):
    """Next-token cross-entropy on the text, so the teacher has something to teach."""
    ids = [tokenizer(line)["input_ids"][:args.seq_len] + [EOS] for line in lines]
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    teacher.train()
    generator = torch.Generator().manual_seed(args.seed)
    for _ in range(args.teacher_steps):
        batch = [ids[i] for i in torch.randint(len(ids), (16,), generator=generator).tolist()]
        width = max(map(len, batch))
        input_ids = torch.tensor([row + [PAD] * (width - len(row)) for row in batch])
        labels = torch.tensor([row + [-100] * (width - len(row)) for row in batch])
        loss = teacher(input_ids=input_ids, attention_mask=(labels != -100).long(),
                       labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    teacher.eval()
    return loss.item()


@torch.no_grad()
def reverse_kl_on_own_samples(student, teacher, tokenizer, prompts, args) -> float:
    """Mean per-token KL(student || teacher) on completions the student samples (seeded)."""
    torch.manual_seed(args.seed + 1)
    student.eval()
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    out = student.generate(**encoded, max_new_tokens=args.completion_len, do_sample=True,
                           top_k=0, top_p=1.0, pad_token_id=PAD, eos_token_id=EOS)
    mask = torch.cat([encoded["attention_mask"],
                      torch.ones_like(out[:, encoded["input_ids"].shape[1]:])], dim=1)
    s = torch.log_softmax(student(input_ids=out, attention_mask=mask).logits.float(), -1)
    t = torch.log_softmax(teacher(input_ids=out, attention_mask=mask).logits.float(), -1)
    start = encoded["input_ids"].shape[1] - 1
    kl = (s.exp() * (s - t)).sum(-1)[:, start:-1]
    student.train()
    return float(kl.mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds: tiny everything")
    parser.add_argument("--lines", type=int, default=400)
    parser.add_argument("--steps", type=int, default=40, help="distillation steps")
    parser.add_argument("--teacher-steps", type=int, default=150)
    parser.add_argument("--beta", type=float, default=1.0, help="0 forward KL, 1 reverse KL")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=24)
    parser.add_argument("--completion-len", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--teacher-dim", type=int, default=64)
    parser.add_argument("--student-dim", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.lines, args.steps, args.teacher_steps = 64, 2, 3
        args.completion_len, args.batch_size = 8, 4

    import datasets
    import transformers
    from trl import DistillationConfig

    import fastkd.trl

    transformers.logging.set_verbosity_error()
    tokenizer = byte_tokenizer()
    lines = corpus_paragraphs(args.lines)
    held_out = lines[::10][:8]
    train_lines = [line for i, line in enumerate(lines) if i % 10]
    teacher, student = build_models(args)
    teacher_loss = pretrain_teacher(teacher, tokenizer, train_lines, args)
    prompts = [line[:args.prompt_len] for line in train_lines]
    held_prompts = [line[:args.prompt_len] for line in held_out]
    before = reverse_kl_on_own_samples(student, teacher, tokenizer, held_prompts, args)

    with tempfile.TemporaryDirectory() as output_dir:
        config = DistillationConfig(
            output_dir=output_dir, per_device_train_batch_size=args.batch_size,
            max_steps=args.steps, learning_rate=3e-3, lr_scheduler_type="constant",
            max_completion_length=args.completion_len, beta=args.beta,
            temperature=args.temperature, logging_steps=max(1, args.steps // 4), report_to=[],
            save_strategy="no", use_cpu=True, bf16=False, seed=args.seed,
            disable_tqdm=args.quiet, dataloader_num_workers=0)
        trainer = fastkd.trl.DistillationTrainer(
            model=student, teacher_model=teacher, args=config,
            train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
            processing_class=tokenizer)
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    after = reverse_kl_on_own_samples(student, teacher, tokenizer, held_prompts, args)
    print(f"teacher pretraining loss (last batch): {teacher_loss:.3f}")
    print(f"distillation losses logged: {', '.join(f'{loss:.4f}' for loss in losses)}")
    print(f"held-out KL(student || teacher) per token on the student's samples: "
          f"before {before:.4f}, after {after:.4f}")
    if not all(math.isfinite(value) for value in losses + [before, after]):
        raise SystemExit("a loss is not finite")
    return {"losses": losses, "before": before, "after": after}


if __name__ == "__main__":
    main()
