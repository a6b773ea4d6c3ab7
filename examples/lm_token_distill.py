"""Token-level distillation of a tiny causal transformer LM, online or from a variable-length cache.

    python examples/lm_token_distill.py                 # teacher, then distilled student, online
    python examples/lm_token_distill.py --cached        # teacher logits cached per token first
    python examples/lm_token_distill.py --smoke         # seconds-long run

Data: a synthetic "language" (no download): token sequences of random length in
``[--min-len, --max-len]`` drawn from a seeded sparse Markov chain over ``--vocab`` tokens, so
there is structure for the teacher to learn. Items are ``{"input_ids": (L,), "labels": (L,)}``
with ``labels[i] = input_ids[i + 1]`` and the last label ``ignore_index``.

Loss: ``fastkd.kd_loss`` on ``(batch, seq, V)`` logits with ``(batch, seq)`` labels; batches are
right-padded and padded positions carry ``ignore_index`` labels, so they drop out of both the
soft and the hard term (``batchmean`` divides by the number of real tokens). Right padding needs
no attention mask: causal attention never looks ahead. With ``--cached`` the teacher runs once
(``fastkd.cache.write_cache`` stores ``L_i`` rows per sequence with offsets) and batches come
from ``fastkd.CachedDataset`` + ``fastkd.cache.collate_padded``.
"""
import argparse
import os
import tempfile
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import fastkd
from fastkd.cache import collate_padded, resolve_device, write_cache
from fastkd.models import TinyCausalLM

IGNORE_INDEX = -100


class MarkovTokens(torch.utils.data.Dataset):
    """``num_sequences`` seeded sequences from a sparse random Markov chain (each token has
    ``branching`` likely successors). Item: ``{"input_ids": (L,), "labels": (L,)}``."""

    def __init__(self, num_sequences, vocab_size, min_len, max_len, seed, branching=3):
        chain = torch.Generator().manual_seed(1234)  # the language is shared by all splits
        successors = torch.randint(0, vocab_size, (vocab_size, branching), generator=chain)
        generator = torch.Generator().manual_seed(seed)
        self.sequences = []
        for _ in range(num_sequences):
            length = int(torch.randint(min_len, max_len + 1, (), generator=generator))
            tokens = [int(torch.randint(0, vocab_size, (), generator=generator))]
            for _ in range(length - 1):
                choice = int(torch.randint(0, branching, (), generator=generator))
                tokens.append(int(successors[tokens[-1], choice]))
            self.sequences.append(torch.tensor(tokens))

    def __len__(self):
        return len(self.sequences)

    def __getitem__(self, index):
        input_ids = self.sequences[index]
        labels = torch.cat([input_ids[1:], torch.tensor([IGNORE_INDEX])])
        return {"input_ids": input_ids, "labels": labels}


def pad_batch(items):
    """Online collate: ``(input_ids (B, L) padded with 0, labels (B, L) padded with -100)``."""
    length = max(len(item["input_ids"]) for item in items)
    input_ids = torch.zeros(len(items), length, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        input_ids[row, :len(item["input_ids"])] = item["input_ids"]
        labels[row, :len(item["labels"])] = item["labels"]
    return input_ids, labels


def cached_batch(items):
    """Cached collate: ``(input_ids, labels, teacher_logits (B, L, V))``, padding as above."""
    inputs, labels, teacher_logits = collate_padded(items, ignore_index=IGNORE_INDEX)
    return inputs["input_ids"], labels, teacher_logits


def train(model, loader, args, device, *, desc, loss_fn):
    """Adam over ``model``; ``loss_fn(model, batch) -> scalar``. Returns real tokens/s."""
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    model.to(device).train()
    tokens, elapsed = 0, 0.0
    for epoch in range(args.epochs):
        bar = tqdm(loader, desc=f"{desc} {epoch + 1}/{args.epochs}", disable=args.quiet,
                   leave=False)
        for batch in bar:
            start = time.perf_counter()
            batch = [part.to(device) for part in batch]
            loss = loss_fn(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed += time.perf_counter() - start
            tokens += int((batch[1] != IGNORE_INDEX).sum())
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return tokens / max(elapsed, 1e-9)


@torch.no_grad()
def evaluate(model, dataset, device, batch_size=64):
    """``(next-token cross-entropy, next-token accuracy)`` over the real tokens of ``dataset``."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=pad_batch)
    for input_ids, labels in loader:
        logits, labels = model(input_ids.to(device)), labels.to(device)
        keep = labels != IGNORE_INDEX
        total_loss += F.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
        correct += (logits[keep].argmax(-1) == labels[keep]).sum().item()
        count += int(keep.sum())
    return total_loss / count, correct / count


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds-long run")
    parser.add_argument("--cached", action="store_true", help="distil from a teacher cache")
    parser.add_argument("--cache-dir", help="where --cached writes (default: a temporary dir)")
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--sequences", type=int, default=2000)
    parser.add_argument("--min-len", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.smoke:
        args.vocab, args.sequences, args.min_len, args.max_len = 32, 64, 4, 16
        args.epochs, args.batch_size = 1, 16
    if not 2 <= args.min_len <= args.max_len:
        parser.error("need 2 <= --min-len <= --max-len")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    train_set = MarkovTokens(args.sequences, args.vocab, args.min_len, args.max_len, args.seed)
    held_out = MarkovTokens(max(16, args.sequences // 10), args.vocab, args.min_len,
                            args.max_len, args.seed + 1)
    teacher = TinyCausalLM(args.vocab, dim=64 if args.smoke else 128, num_layers=2,
                           max_len=args.max_len)
    student = TinyCausalLM(args.vocab, dim=32, num_layers=1, max_len=args.max_len)

    def shuffled(dataset, collate_fn):
        return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                           collate_fn=collate_fn,
                                           generator=torch.Generator().manual_seed(args.seed))

    def language_model_loss(model, batch):
        input_ids, labels = batch
        logits = model(input_ids)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)

    train(teacher, shuffled(train_set, pad_batch), args, device, desc="teacher",
          loss_fn=language_model_loss)
    teacher.eval()

    def token_kd_loss(model, batch):
        input_ids, labels, *cached = batch
        if cached:
            teacher_logits = cached[0]
        else:
            with torch.no_grad():
                teacher_logits = teacher(input_ids)
        return fastkd.kd_loss(model(input_ids), teacher_logits, labels,
                              temperature=args.temperature, ignore_index=IGNORE_INDEX)

    if args.cached:
        cache_dir = os.path.join(args.cache_dir or tempfile.mkdtemp(prefix="fastkd-lm-cache-"),
                                 "teacher-logits")
        write_cache(teacher, train_set, cache_dir, batch_size=64, device=device,
                    progress=not args.quiet, overwrite=True)
        loader = shuffled(fastkd.CachedDataset(train_set, fastkd.LogitCache(cache_dir)),
                          cached_batch)
    else:
        loader = shuffled(train_set, pad_batch)
    tokens_per_second = train(student, loader, args, device, loss_fn=token_kd_loss,
                              desc=f"student{' (cached)' if args.cached else ''}")
    teacher_loss, teacher_accuracy = evaluate(teacher, held_out, device)
    student_loss, student_accuracy = evaluate(student, held_out, device)
    print(f"teacher: held-out next-token CE {teacher_loss:.3f}, accuracy {teacher_accuracy:.1%}\n"
          f"student{' (cached)' if args.cached else ''}: held-out next-token CE "
          f"{student_loss:.3f}, accuracy {student_accuracy:.1%}; distillation "
          f"{tokens_per_second:,.0f} tokens/s")
    return {"teacher_loss": teacher_loss, "teacher_accuracy": teacher_accuracy,
            "student_loss": student_loss, "student_accuracy": student_accuracy,
            "tokens_per_second": tokens_per_second}


if __name__ == "__main__":
    main()
