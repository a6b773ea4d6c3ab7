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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds-long run")
    parser.add_argument("--work-dir", help="where models, tokens and caches go (default: temp)")
    parser.add_argument("--chars", type=int, default=200_000, help="corpus size in characters")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--teacher-dim", type=int, default=128)
    parser.add_argument("--teacher-layers", type=int, default=3)
    parser.add_argument("--student-dim", type=int, default=48)
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--student-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sources", nargs="+", choices=SOURCES, default=["sample"],
                        help="teacher caches to distil from (default: sample)")
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--sample", type=int, default=32, help="draws per token")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.smoke:
        args.chars, args.seq_len, args.teacher_dim, args.teacher_layers = 3_000, 32, 32, 1
        args.student_dim, args.teacher_steps, args.student_steps = 16, 3, 2
        args.batch_size, args.top_k, args.sample, args.quiet = 8, 4, 4, True
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    work = args.work_dir or tempfile.mkdtemp(prefix="fastkd-hf-")
    os.makedirs(work, exist_ok=True)
    rows = token_rows(corpus_text(args.chars), args.seq_len)
    held_out_count = max(2, len(rows) // 10)
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
    teacher.save_pretrained(teacher_dir)

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
