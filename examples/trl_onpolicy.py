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
   held-out prompts (each sample's tokens up to and including its first ``</s>``), before and
   after.
"""
import argparse
import math
import tempfile
import warnings

import torch

VOCAB = 259   # <pad>, <s>, </s>, then the 256 bytes
PAD, BOS, EOS = 0, 1, 2
# the defaults of the options that --smoke shrinks, for a full run and for --smoke
FULL_RUN = {"lines": 400, "steps": 40, "teacher_steps": 150, "completion_len": 24,
            "batch_size": 8}
SMOKE_RUN = {"lines": 64, "steps": 2, "teacher_steps": 3, "completion_len": 8, "batch_size": 4}


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


def split_lines(lines) -> tuple:
    """``(held_out, train)``: the first 8 of every 10th line are held out; the lines between
    the 10ths train."""
    return lines[::10][:8], [line for i, line in enumerate(lines) if i % 10]


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


def up_to_first_eos(completion_ids):
    """``(B, C)`` bool: True at each completion token up to and including the row's first EOS;
    what follows it is the padding that ``generate()`` appends to finished samples."""
    is_eos = completion_ids == EOS
    return is_eos.cumsum(1) - is_eos.long() == 0   # no EOS before this token


@torch.no_grad()
def mean_reverse_kl(student, teacher, prompt_mask, sequences) -> float:
    """Mean per-token KL(student || teacher) over the completion tokens of ``sequences`` (the
    ``(B, P)`` left-padded prompts with mask ``prompt_mask``, then the completions), each row
    up to and including its first EOS."""
    prompt_len = prompt_mask.shape[1]
    keep = up_to_first_eos(sequences[:, prompt_len:])
    mask = torch.cat([prompt_mask, keep.long()], dim=1)
    s = torch.log_softmax(student(input_ids=sequences, attention_mask=mask).logits.float(), -1)
    t = torch.log_softmax(teacher(input_ids=sequences, attention_mask=mask).logits.float(), -1)
    # the logits at position i predict token i + 1: completion token j is scored at P - 1 + j
    kl = (s.exp() * (s - t)).sum(-1)[:, prompt_len - 1:-1]
    return float(kl[keep].mean())


@torch.no_grad()
def reverse_kl_on_own_samples(student, teacher, tokenizer, prompts, args) -> float:
    """Mean per-token KL(student || teacher) on completions the student samples (seeded)."""
    torch.manual_seed(args.seed + 1)
    student.eval()
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    out = student.generate(**encoded, max_new_tokens=args.completion_len, do_sample=True,
                           top_k=0, top_p=1.0, pad_token_id=PAD, eos_token_id=EOS)
    kl = mean_reverse_kl(student, teacher, encoded["attention_mask"], out)
    student.train()
    return kl


def positive_int(text):
    """argparse type: an int of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text):
    """argparse type: a finite float above 0."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def unit_interval(text):
    """argparse type: a float in [0, 1]."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="a few seconds: smaller defaults for the options marked --smoke")
    parser.add_argument("--lines", type=positive_int,
                        help="lines of text; every 10th is held out, the others give at least "
                             "--batch-size prompts (default 400; --smoke 64)")
    parser.add_argument("--steps", type=positive_int,
                        help="distillation steps (default 40; --smoke 2)")
    parser.add_argument("--teacher-steps", type=positive_int,
                        help="teacher pretraining steps (default 150; --smoke 3)")
    parser.add_argument("--beta", type=unit_interval, default=1.0,
                        help="in [0, 1]: 0 forward KL, 1 reverse KL")
    parser.add_argument("--temperature", type=positive_float, default=1.0)
    parser.add_argument("--seq-len", type=positive_int, default=64)
    parser.add_argument("--prompt-len", type=positive_int, default=24)
    parser.add_argument("--completion-len", type=positive_int, help="default 24; --smoke 8")
    parser.add_argument("--batch-size", type=positive_int, help="default 8; --smoke 4")
    parser.add_argument("--teacher-dim", type=positive_int, default=64,
                        help="Llama teacher width, a multiple of 8 (4 attention heads of an "
                             "even size)")
    parser.add_argument("--student-dim", type=positive_int, default=32,
                        help="Qwen2 student width, a multiple of 4 (2 attention heads of an "
                             "even size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars or training logs")
    args = parser.parse_args(argv)
    for name, value in (SMOKE_RUN if args.smoke else FULL_RUN).items():
        if getattr(args, name) is None:  # options given explicitly win over --smoke
            setattr(args, name, value)
    train_prompts = len(split_lines(corpus_paragraphs(args.lines))[1])
    if train_prompts < args.batch_size:  # TRL would then run no training step at all
        parser.error(f"--lines {args.lines} gives {train_prompts} training prompts, fewer than "
                     f"--batch-size {args.batch_size}")
    # rotary position embeddings need attention heads of an even size
    if args.teacher_dim % 8:
        parser.error(f"--teacher-dim must be a multiple of 8 (4 heads), got {args.teacher_dim}")
    if args.student_dim % 4:
        parser.error(f"--student-dim must be a multiple of 4 (2 heads), got {args.student_dim}")
    return args


def main(argv=None):
    args = parse_args(argv)

    import datasets
    import transformers
    from trl import DistillationConfig

    import fastkd.trl

    transformers.logging.set_verbosity_error()
    tokenizer = byte_tokenizer()
    lines = corpus_paragraphs(args.lines)
    held_out, train_lines = split_lines(lines)
    teacher, student = build_models(args)
    teacher_loss = pretrain_teacher(teacher, tokenizer, train_lines, args)
    prompts = [line[:args.prompt_len] for line in train_lines]
    held_prompts = [line[:args.prompt_len] for line in held_out]
    before = reverse_kl_on_own_samples(student, teacher, tokenizer, held_prompts, args)

    with tempfile.TemporaryDirectory() as output_dir, warnings.catch_warnings():
        if args.quiet:  # TRL's use of renamed transformers APIs: nothing to act on here
            warnings.simplefilter("ignore", FutureWarning)
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
        if args.quiet:  # with tqdm disabled, this callback prints every log dict
            trainer.remove_callback(transformers.PrinterCallback)
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
