"""Distil a Hugging Face causal LM into a smaller one, end to end, with no downloads.

    python examples/hf_distill.py            # the full run
    python examples/hf_distill.py --smoke    # seconds (what the test suite runs)

1. Corpus: real English text that ships with Python itself (the reference documentation in
   the standard library's ``pydoc_data.topics``), tokenized as bytes (V = 256, no tokenizer
   download), cut into sequences; 90% train, 10% held out.
2. Models: a GPT-2-style teacher and a smaller Llama-style student, both built from
   ``transformers`` configs (random init) and saved to a temporary directory.
3. The teacher is pretrained briefly (next-token cross-entropy through
   ``fastkd.hf.DistillationTrainer`` with ``soft_weight=0``).
4. ``fastkd cache --teacher hf:<dir> --dataset jsonl:<tokens>`` caches it in each layout of
   ``--sources``: by default a sampled cache (``--sample``, the layout to use for a language
   model: an unbiased target at a few bytes per token; docs/sparse-targets.md, "Which teacher
   cache?"); ``--sources sample dense topk`` adds dense fp16 and top-k caches to compare.
5. The student is trained for the same steps from each cache (``DistillationTrainer`` over
   ``CachedDataset`` + ``collate_causal_lm``) and without distillation (labels only). Printed:
   held-out perplexity of each, and each cache's bytes per token.
"""
import argparse
import json
import math
import os
import tempfile

import torch
import torch.nn.functional as F

import fastkd
from fastkd.cli import main as fastkd_main
from fastkd.tokens import TokenDataset, collate_causal_lm

VOCAB = 256  # bytes
SOURCES = ("sample", "dense", "topk")
HELD_OUT_MIN = 2  # held-out sequences, at least
# the defaults of the options that --smoke shrinks, for a full run and for --smoke
FULL_RUN = {"chars": 200_000, "seq_len": 64, "teacher_dim": 128, "teacher_layers": 3,
            "student_dim": 48, "teacher_steps": 600, "student_steps": 300, "batch_size": 32,
            "top_k": 16, "sample": 32}
SMOKE_RUN = {"chars": 3_000, "seq_len": 32, "teacher_dim": 32, "teacher_layers": 1,
             "student_dim": 16, "teacher_steps": 3, "student_steps": 2, "batch_size": 8,
             "top_k": 4, "sample": 4}


def corpus_text(max_chars: int) -> str:
    """The Python reference documentation bundled with the interpreter (``pydoc_data``)."""
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[key] for key in sorted(topics))
    return text[:max_chars]


def token_rows(text: str, seq_len: int):
    data = text.encode("utf-8")
    return [{"input_ids": list(data[start:start + seq_len])}
            for start in range(0, len(data) - seq_len + 1, seq_len)]


def build_models(args):
    import transformers
    torch.manual_seed(args.seed)
    teacher = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=args.seq_len, n_embd=args.teacher_dim,
        n_layer=args.teacher_layers, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0, use_cache=False))
    student = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=args.student_dim, intermediate_size=2 * args.student_dim,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=args.seq_len, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        use_cache=False)
    return teacher, student


def new_student(config, seed):
    import transformers
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def train(model, dataset, args, output_dir, *, steps, lr, teacher=None, soft_weight=0.5,
          hard_weight=0.5):
    import transformers
    from fastkd.hf import DistillationTrainer
    training = transformers.TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=args.batch_size, max_steps=steps,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        logging_steps=max(1, steps // 4), report_to=[], save_strategy="no",
        remove_unused_columns=False, disable_tqdm=args.quiet, seed=args.seed,
        use_cpu=args.device == "cpu", dataloader_num_workers=0)
    trainer = DistillationTrainer(model=model, teacher=teacher, args=training,
                                  train_dataset=dataset, data_collator=collate_causal_lm,
                                  temperature=1.0, soft_weight=soft_weight,
                                  hard_weight=hard_weight)
    if args.quiet:
        trainer.remove_callback(transformers.PrinterCallback)
    trainer.train()
    return trainer


def save_model(model, directory, *, quiet):
    """``model.save_pretrained(directory)``, without transformers' "Writing model shards" bar
    when ``quiet``; the bar switch is global to transformers, so it is restored afterwards."""
    from transformers.utils import logging
    bar_was_on = logging.is_progress_bar_enabled()
    if quiet:
        logging.disable_progress_bar()
    try:
        model.save_pretrained(directory)
    finally:
        if bar_was_on:
            logging.enable_progress_bar()


@torch.no_grad()
def perplexity(model, dataset, batch_size=32):
    """exp(mean next-token cross-entropy) over the held-out tokens."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size,
                                             collate_fn=collate_causal_lm):
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        labels = batch["shift_labels"].to(device)
        keep = labels != -100
        total += float(F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum"))
        count += int(keep.sum())
    return math.exp(total / count)


def cache_bytes_per_token(path) -> float:
    cache = fastkd.LogitCache(path)
    from fastkd.cache import manifest as fmt
    total = sum(entry["bytes"] for entry in fmt.manifest_files(cache.manifest))
    return total / cache.num_rows


def positive_int(text):
    """argparse type: an int of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def multiple_of_4(text):
    """argparse type of the model widths: a positive multiple of 4 (the teacher's 4 attention
    heads; the student's 2 heads, each of an even size for rotary embeddings)."""
    value = int(text)
    if value < 4 or value % 4:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 4, got {value}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="seconds-long run: --quiet, and smaller defaults for the options "
                             "marked --smoke")
    parser.add_argument("--work-dir", help="where models, tokens and caches go (default: temp)")
    parser.add_argument("--chars", type=positive_int,
                        help="corpus size in characters (default 200000; --smoke 3000)")
    parser.add_argument("--seq-len", type=int,
                        help="bytes per sequence, at least 2 (default 64; --smoke 32)")
    parser.add_argument("--teacher-dim", type=multiple_of_4,
                        help="GPT-2 teacher width, a multiple of 4 for its 4 attention heads "
                             "(default 128; --smoke 32)")
    parser.add_argument("--teacher-layers", type=positive_int, help="default 3; --smoke 1")
    parser.add_argument("--student-dim", type=multiple_of_4,
                        help="Llama student width, a multiple of 4 for its 2 attention heads "
                             "of an even size (default 48; --smoke 16)")
    parser.add_argument("--teacher-steps", type=positive_int, help="default 600; --smoke 3")
    parser.add_argument("--student-steps", type=positive_int, help="default 300; --smoke 2")
    parser.add_argument("--batch-size", type=positive_int, help="default 32; --smoke 8")
    parser.add_argument("--sources", nargs="+", choices=SOURCES, default=["sample"],
                        help="teacher caches to distil from (default: sample)")
    parser.add_argument("--top-k", type=positive_int,
                        help=f"K of the top-k cache, at most {VOCAB} (default 16; --smoke 4)")
    parser.add_argument("--sample", type=positive_int,
                        help="draws per token (default 32; --smoke 4)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for name, value in (SMOKE_RUN if args.smoke else FULL_RUN).items():
        if getattr(args, name) is None:  # options given explicitly win over --smoke
            setattr(args, name, value)
    args.quiet = args.quiet or args.smoke
    if args.seq_len < 2:
        parser.error(f"--seq-len must be at least 2 (a token and the next one), got "
                     f"{args.seq_len}")
    sequences = len(token_rows(corpus_text(args.chars), args.seq_len))
    if sequences < HELD_OUT_MIN + 1:
        parser.error(f"--seq-len {args.seq_len} is too long for --chars {args.chars}: "
                     f"{sequences} sequences, {HELD_OUT_MIN + 1} needed ({HELD_OUT_MIN} held out)")
    if args.top_k > VOCAB:
        parser.error(f"--top-k {args.top_k} is larger than the vocabulary ({VOCAB} bytes)")
    if args.work_dir and os.path.exists(args.work_dir) and not os.path.isdir(args.work_dir):
        parser.error(f"--work-dir {args.work_dir} is not a directory")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (use cpu)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    work = args.work_dir or tempfile.mkdtemp(prefix="fastkd-hf-")
    os.makedirs(work, exist_ok=True)
    rows = token_rows(corpus_text(args.chars), args.seq_len)
    held_out_count = max(HELD_OUT_MIN, len(rows) // 10)
    train_rows, held_out_rows = rows[:-held_out_count], rows[-held_out_count:]
    tokens_path = os.path.join(work, "train.jsonl")
    with open(tokens_path, "w") as handle:
        for row in train_rows:
            handle.write(json.dumps(row) + "\n")
    train_set = TokenDataset.from_jsonl(tokens_path)
    held_out = TokenDataset(held_out_rows, source="held-out")

    teacher, student_config = build_models(args)
    train(teacher, train_set, args, os.path.join(work, "teacher-run"),
          steps=args.teacher_steps, lr=3e-3, soft_weight=0.0, hard_weight=1.0)
    teacher_dir = os.path.join(work, "teacher")
    save_model(teacher, teacher_dir, quiet=args.quiet)

    layouts = {"sample": (f"sampled {args.sample}", ["--sample", str(args.sample)]),
               "dense": ("dense fp16", []),
               "topk": (f"top-{args.top_k}", ["--top-k", str(args.top_k)])}
    layouts = dict(layouts[source] for source in dict.fromkeys(args.sources))
    results = {"teacher": {"perplexity": perplexity(teacher, held_out)}}
    for name, options in layouts.items():
        cache_dir = os.path.join(work, "cache-" + name.split()[0])
        status = fastkd_main(["cache", "--teacher", f"hf:{teacher_dir}", "--dataset",
                              f"jsonl:{tokens_path}", "--out", cache_dir, "--device",
                              args.device, "--batch-size", "64", "--overwrite", "--quiet",
                              *options])
        if status != 0:
            raise SystemExit(f"fastkd cache failed for {name}")
        student = new_student(student_config, args.seed + 1)
        data = fastkd.CachedDataset(train_set, fastkd.LogitCache(cache_dir))
        train(student, data, args, os.path.join(work, "run-" + name.split()[0]),
              steps=args.student_steps, lr=3e-3)
        results[f"student, distilled ({name} cache)"] = {
            "perplexity": perplexity(student, held_out),
            "bytes_per_token": cache_bytes_per_token(cache_dir)}
    student = new_student(student_config, args.seed + 1)
    train(student, train_set, args, os.path.join(work, "run-baseline"),
          steps=args.student_steps, lr=3e-3, soft_weight=0.0, hard_weight=1.0)
    results["student, labels only"] = {"perplexity": perplexity(student, held_out)}

    print(f"\ncorpus: {len(train_rows)} train / {len(held_out_rows)} held-out sequences of "
          f"{args.seq_len} bytes (Python's bundled reference docs)")
    print(f"  {'model':44s} {'held-out ppl':>12s} {'cache B/token':>14s}")
    for name, result in results.items():
        size = f"{result['bytes_per_token']:,.0f}" if "bytes_per_token" in result else ""
        print(f"  {name:44s} {result['perplexity']:12.2f} {size:>14s}")
    return results


if __name__ == "__main__":
    main()
