"""Token-level distillation of a tiny causal transformer LM on real text: online, or from a
dense, a top-k or a sampled teacher-logit cache, with held-out perplexity side by side.

    python examples/lm_token_distill.py                          # online vs a sampled cache
    python examples/lm_token_distill.py --sources online dense topk sample   # all four
    python examples/lm_token_distill.py --smoke                  # seconds-long run

Data: byte-level tokens (V = 256) of Python's own reference documentation,
``pydoc_data.topics`` (about 465 KB of English prose and code that ships with every CPython, so
nothing is downloaded); sorted topics are joined, the last 10% held out, and both parts cut into
consecutive sequences of seeded random length in ``[--min-len, --max-len]``. ``--data markov``
uses a synthetic sparse Markov chain over ``--vocab`` tokens instead. Items are
``{"input_ids": (L,), "labels": (L,)}`` with ``labels[i] = input_ids[i + 1]`` and the last label
``ignore_index``.

Teacher sources (``--sources``), each training an identically initialised student on the same
batches in the same order, evaluated at the same steps:

- ``online``: the teacher runs on every batch (dense ``(B, L, V)`` logits).
- ``dense``: the teacher's fp16 logits cached once per token (``fastkd.cache.write_cache``).
- ``topk``: the ``--top-k`` largest logits per token, their ids and the log-sum-exp of the row
  at the training temperature (``write_cache(top_k=K, temperature=T)``); the loss puts the
  remaining teacher mass in one tail bucket (``tail="bucket"``), exactly.
- ``sample`` (the cache to use for a language model, and the default with ``online`` as its
  reference): ``--sample`` seeded draws per token from the teacher at temperature T, stored as
  distinct ids with counts (``write_cache(sample=K, temperature=T)``): an unbiased estimate of
  the teacher distribution (Sparse Logit Sampling, Anshumann et al., ACL 2025). Top-k targets
  are biased (the tail is dropped or lumped); docs/sparse-targets.md, "Which teacher cache?".

Loss: ``fastkd.kd_loss(student_logits, teacher, labels, temperature=T)`` with ``teacher`` a dense
tensor, a ``fastkd.TopKLogits`` or a ``fastkd.SampledTargets``, the same call for all four;
no ``(N, V)`` teacher tensor is built for the sparse ones. Batches are right-padded; padded
positions carry ``ignore_index`` labels, so they drop out of both terms. Right padding needs no
attention mask: causal attention never looks ahead. Cached batches come from
``fastkd.CachedDataset`` + ``fastkd.cache.collate_padded``.
"""
import argparse
import math
import os
import tempfile
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import fastkd
from fastkd.cache import LogitCache, collate_padded, resolve_device, write_cache
from fastkd.models import TinyCausalLM

IGNORE_INDEX = -100
SOURCES = ("online", "dense", "topk", "sample")
DEFAULT_SOURCES = ("online", "sample")   # the exact teacher beside the recommended cache
# the defaults of the options that --smoke shrinks, for a full run and for --smoke
FULL_RUN = {"sequences": 3000, "min_len": 32, "max_len": 128, "vocab": 256, "epochs": 2,
            "teacher_epochs": 4, "batch_size": 32, "eval_every": 50}
SMOKE_RUN = {"sequences": 32, "min_len": 8, "max_len": 16, "vocab": 32, "epochs": 1,
             "teacher_epochs": 1, "batch_size": 16, "eval_every": 1}


class TokenSequences(torch.utils.data.Dataset):
    """A list of token sequences ``self.sequences`` as items ``{"input_ids": (L,), "labels":
    (L,)}`` with next-token labels (the last one ``ignore_index``)."""
    sequences = ()

    def __len__(self):
        return len(self.sequences)

    def __getitem__(self, index):
        input_ids = self.sequences[index]
        labels = torch.cat([input_ids[1:], torch.tensor([IGNORE_INDEX])])
        return {"input_ids": input_ids, "labels": labels}


class MarkovTokens(TokenSequences):
    """``num_sequences`` seeded sequences from a sparse random Markov chain (each token has
    ``branching`` likely successors)."""

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


def pydoc_bytes() -> bytes:
    """Python's reference documentation topics (``pydoc_data.topics``), UTF-8, topics sorted."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[name] for name in sorted(topics)).encode("utf-8")


class TextBytes(TokenSequences):
    """Consecutive chunks of ``text`` (bytes) as token sequences (byte values, V = 256) of seeded
    random length in ``[min_len, max_len]``; at most ``num_sequences`` of them."""

    def __init__(self, text: bytes, num_sequences, min_len, max_len, seed):
        tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
        generator = torch.Generator().manual_seed(seed)
        self.sequences, start = [], 0
        while len(self.sequences) < num_sequences and start + min_len <= len(tokens):
            length = int(torch.randint(min_len, max_len + 1, (), generator=generator))
            self.sequences.append(tokens[start:start + length])
            start += length


def make_datasets(args):
    """``(train, held_out)`` for ``--data``; the held-out part never overlaps the training one."""
    held_out_sequences = max(16, args.sequences // 10)
    if args.data == "markov":
        return (MarkovTokens(args.sequences, args.vocab, args.min_len, args.max_len, args.seed),
                MarkovTokens(held_out_sequences, args.vocab, args.min_len, args.max_len,
                             args.seed + 1))
    text = pydoc_bytes()
    split = len(text) * 9 // 10
    return (TextBytes(text[:split], args.sequences, args.min_len, args.max_len, args.seed),
            TextBytes(text[split:], held_out_sequences, args.min_len, args.max_len, args.seed))


def pad_batch(items):
    """Online collate: ``(input_ids (B, L) padded with 0, labels (B, L) padded with -100)``."""
    pad = torch.nn.utils.rnn.pad_sequence
    return (pad([item["input_ids"] for item in items], batch_first=True),
            pad([item["labels"] for item in items], batch_first=True, padding_value=IGNORE_INDEX))


def cached_batch(items):
    """Cached collate: ``(input_ids, labels, teacher)``, padding as above; ``teacher`` is
    ``(B, L, V)`` logits or a sparse target of ``(B, L, K)`` (``collate_padded``)."""
    inputs, labels, teacher = collate_padded(items, ignore_index=IGNORE_INDEX)
    return inputs["input_ids"], labels, teacher


def to_device(part, device):
    if isinstance(part, fastkd.targets.SPARSE_TARGETS):
        return part.map_tensors(lambda tensor: tensor.to(device))
    return part.to(device)


def train(model, loader, args, device, *, desc, loss_fn, evaluate_at=None):
    """Adam over ``model``; ``loss_fn(model, batch) -> scalar``. ``evaluate_at(step)`` runs after
    every ``--eval-every`` steps and after the last. Returns real tokens/s of the training steps."""
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    model.to(device).train()
    tokens, elapsed, step = 0, 0.0, 0
    for epoch in range(args.epochs):
        bar = tqdm(loader, desc=f"{desc} {epoch + 1}/{args.epochs}", disable=args.quiet,
                   leave=False)
        for batch in bar:
            start = time.perf_counter()
            batch = [to_device(part, device) for part in batch]
            loss = loss_fn(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed += time.perf_counter() - start
            tokens += int((batch[1] != IGNORE_INDEX).sum())
            step += 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if evaluate_at and step % args.eval_every == 0:
                evaluate_at(step)
                model.train()
    if evaluate_at and step % args.eval_every:
        evaluate_at(step)
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


def positive_int(text):
    """argparse type: an int of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text):
    """argparse type: an int of at least 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def positive_float(text):
    """argparse type: a finite float above 0."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="seconds-long run: smaller defaults for the options marked --smoke")
    parser.add_argument("--sources", nargs="+", choices=SOURCES, default=list(DEFAULT_SOURCES),
                        help="teacher sources to distil from, side by side (default: online "
                             "sample)")
    parser.add_argument("--cache-dir", help="where the caches go (default: a temporary dir)")
    parser.add_argument("--data", choices=("pydoc", "markov"), default="pydoc")
    parser.add_argument("--vocab", type=positive_int,
                        help="--data markov only (default 256; --smoke 32)")
    parser.add_argument("--sequences", type=positive_int, help="default 3000; --smoke 32")
    parser.add_argument("--min-len", type=int, help="default 32; --smoke 8")
    parser.add_argument("--max-len", type=int, help="default 128; --smoke 16")
    parser.add_argument("--epochs", type=non_negative_int, help="default 2; --smoke 1")
    parser.add_argument("--teacher-epochs", type=non_negative_int, help="default 4; --smoke 1")
    parser.add_argument("--batch-size", type=positive_int, help="default 32; --smoke 16")
    parser.add_argument("--lr", type=positive_float, default=3e-3)
    parser.add_argument("--temperature", type=positive_float, default=2.0)
    parser.add_argument("--top-k", type=positive_int, default=16,
                        help="K of the top-k cache, at most the vocabulary size")
    parser.add_argument("--sample", type=positive_int, default=32,
                        help="draws per token of the sampled cache")
    parser.add_argument("--eval-every", type=positive_int,
                        help="steps between evaluations (default 50; --smoke 1)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.data == "pydoc" and args.vocab is not None:
        parser.error("--vocab is for --data markov only (pydoc text is bytes, V = 256)")
    for name, value in (SMOKE_RUN if args.smoke else FULL_RUN).items():
        if getattr(args, name) is None:  # options given explicitly win over --smoke
            setattr(args, name, value)
    if not 2 <= args.min_len <= args.max_len:
        parser.error("need 2 <= --min-len <= --max-len")
    if args.data == "pydoc":
        args.vocab = 256  # bytes
    if "topk" in args.sources and args.top_k > args.vocab:
        parser.error(f"--top-k {args.top_k} is larger than the vocabulary ({args.vocab} tokens)")
    if args.cache_dir and os.path.exists(args.cache_dir) and not os.path.isdir(args.cache_dir):
        parser.error(f"--cache-dir {args.cache_dir} is not a directory")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (use cpu or auto)")
    return args


def write_caches(teacher, train_set, args, device):
    """The caches the cached sources need: ``{source: LogitCache}``."""
    root = args.cache_dir or tempfile.mkdtemp(prefix="fastkd-lm-cache-")
    layouts = {"dense": {}, "topk": {"top_k": args.top_k, "temperature": args.temperature},
               "sample": {"sample": args.sample, "temperature": args.temperature,
                          "seed": args.seed}}
    caches = {}
    for source in args.sources:
        if source == "online":
            continue
        directory = os.path.join(root, f"teacher-{source}")
        write_cache(teacher, train_set, directory, batch_size=64, device=device,
                    progress=not args.quiet, overwrite=True, **layouts[source])
        caches[source] = LogitCache(directory)
    return caches


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    train_set, held_out = make_datasets(args)
    small = args.smoke
    teacher = TinyCausalLM(args.vocab, dim=64 if small else 128, num_layers=2,
                           max_len=args.max_len)

    def shuffled(dataset, collate_fn):
        return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                           collate_fn=collate_fn,
                                           generator=torch.Generator().manual_seed(args.seed))

    def language_model_loss(model, batch):
        input_ids, labels = batch
        logits = model(input_ids)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)

    teacher_args = argparse.Namespace(**{**vars(args), "epochs": args.teacher_epochs})
    train(teacher, shuffled(train_set, pad_batch), teacher_args, device, desc="teacher",
          loss_fn=language_model_loss)
    teacher.eval()
    teacher_loss, teacher_accuracy = evaluate(teacher, held_out, device)

    def token_kd_loss(model, batch):
        input_ids, labels, *cached = batch
        if cached:
            teacher_target = cached[0]
        else:
            with torch.no_grad():
                teacher_target = teacher(input_ids)
        return fastkd.kd_loss(model(input_ids), teacher_target, labels,
                              temperature=args.temperature, ignore_index=IGNORE_INDEX)

    caches = write_caches(teacher, train_set, args, device)
    results = {"teacher_loss": teacher_loss, "teacher_accuracy": teacher_accuracy,
               "teacher_perplexity": math.exp(teacher_loss), "sources": {}}
    for source in args.sources:
        torch.manual_seed(args.seed + 1)  # every student starts from the same weights
        student = TinyCausalLM(args.vocab, dim=32, num_layers=1, max_len=args.max_len)
        if source == "online":
            loader = shuffled(train_set, pad_batch)
        else:
            loader = shuffled(fastkd.CachedDataset(train_set, caches[source]), cached_batch)
        curve = {}

        def evaluate_at(step, student=student, curve=curve):
            curve[step] = math.exp(evaluate(student, held_out, device)[0])

        tokens_per_second = train(student, loader, args, device, loss_fn=token_kd_loss,
                                  desc=f"student ({source})", evaluate_at=evaluate_at)
        loss, accuracy = evaluate(student, held_out, device)
        results["sources"][source] = {
            "loss": loss, "accuracy": accuracy, "perplexity": math.exp(loss),
            "perplexity_at_step": curve, "tokens_per_second": tokens_per_second,
            "cache_bytes_per_token": caches[source].bytes_per_row["files"]
            if source in caches else None}
    print(report(results, args))
    return results


def report(results, args) -> str:
    """Held-out perplexity of every student at the same steps, then a summary per source."""
    names = {"online": "online", "dense": "dense cache", "topk": f"top-{args.top_k} cache",
             "sample": f"sample-{args.sample} cache"}
    sources = list(results["sources"])
    steps = sorted(set.union(*(set(r["perplexity_at_step"]) for r in results["sources"].values())))
    lines = [f"teacher: held-out next-token CE {results['teacher_loss']:.3f}, perplexity "
             f"{results['teacher_perplexity']:.2f}, accuracy {results['teacher_accuracy']:.1%}",
             f"students (T={args.temperature:g}), held-out perplexity at the same steps:",
             "  step " + "".join(f"{names[source]:>18}" for source in sources)]
    for step in steps:
        lines.append(f"{step:>6} " + "".join(
            f"{results['sources'][source]['perplexity_at_step'].get(step, float('nan')):>18.2f}"
            for source in sources))
    for source in sources:
        r = results["sources"][source]
        stored = "" if r["cache_bytes_per_token"] is None else \
            f", cache {r['cache_bytes_per_token']:,.0f} B/token"
        lines.append(f"student ({names[source]}): held-out next-token CE {r['loss']:.3f}, "
                     f"perplexity {r['perplexity']:.2f}, accuracy {r['accuracy']:.1%}; "
                     f"{r['tokens_per_second']:,.0f} tokens/s{stored}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
