"""Which teacher cache should a language model be distilled from? Held-out quality and calibration
of a student distilled from dense, sampled and top-k caches, against labels only.

    nice -n 10 python benchmarks/sparse_quality.py            # full: ~30 CPU-minutes, 3 seeds
    python benchmarks/sparse_quality.py --quick               # seconds (what the test runs)

Everything is made here, nothing is downloaded:

1. Corpus: Python's bundled reference documentation (``pydoc_data.topics``, topics sorted),
   the last 10% held out. Tokens: a byte-level BPE trained on the training part only (pairs of
   adjacent tokens merged greedily by count, ``--vocab - 256`` merges), so V = ``--vocab``
   exactly (2048 by default).
2. Teacher: a GPT-2-style ``transformers`` model (untied output layer) trained on the training
   part by next-token cross-entropy, saved with ``save_pretrained``.
3. Caches: ``fastkd cache --teacher hf:<dir> --dataset jsonl:<tokens>`` writes each layout once
   (``dense``; ``--sample 32`` and ``--sample 8`` once per seed, drawn with that seed; ``--top-k
   32``; ``--top-k 8``), all at T = 1. Bytes per token: the manifest's teacher arrays per row
   (what ``fastkd info`` prints as ``bytes/row``) and every file of the cache per row.
4. Students: a Llama-style ``transformers`` model, the same initial weights and batches for
   every condition of a seed, trained ``--steps`` Adam steps with ``fastkd.kd_loss`` (T = 1)
   against ``batch["teacher_targets"]`` of ``fastkd.CachedDataset`` + ``collate_causal_lm``;
   the top-k caches with ``tail="bucket"``, ``"renormalize"`` (top-32) and ``"ignore"``
   (top-8). Two settings: the distillation term alone (``soft_weight=1, hard_weight=0``) and
   half and half with the label term (``0.5 / 0.5``). Labels only: cross-entropy alone.

Metrics on the held-out tokens: next-token cross-entropy (nats per token) and its difference to
dense KD of the same seed (mean +- sample std over seeds); expected calibration error of the top-1
prediction, ``ECE = sum_b (n_b / N) |acc_b - conf_b|`` over 15 equal-width confidence bins on
[0, 1] (``conf`` the predicted token's probability, ``acc`` whether it is the next token); and
``conf - acc`` over all tokens (> 0: over-confident, < 0: under-confident).

Writes ``results.json`` and ``results.md`` (device, date, seeds, commit, versions, load average)
to ``--out``; prints the markdown.
"""
import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastkd  # noqa: E402
from benchmarks.env import cpu_model, git_commit  # noqa: E402
from fastkd.cache import LogitCache  # noqa: E402
from fastkd.cli import main as fastkd_main  # noqa: E402
from fastkd.tokens import TokenDataset, collate_causal_lm  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
ECE_BINS = 15
# condition -> (cache name, kd_loss tail); cache names map to `fastkd cache` options below
CONDITIONS = {
    "dense": ("dense", "bucket"),
    "sampled, 32 draws": ("sample-32", "bucket"),
    "sampled, 8 draws": ("sample-8", "bucket"),
    "top-32, tail=bucket": ("top-32", "bucket"),
    "top-32, tail=renormalize": ("top-32", "renormalize"),
    "top-8, tail=ignore": ("top-8", "ignore"),
    "labels only": (None, None),
}
SETTINGS = {"kd_only": (1.0, 0.0), "kd_0.5_labels_0.5": (0.5, 0.5)}
SETTING_TITLES = {"kd_only": "distillation loss only (soft_weight=1, hard_weight=0)",
                  "kd_0.5_labels_0.5": "with the label term (soft_weight=0.5, hard_weight=0.5)"}


# ----------------------------------------------------------------------------- tokens
def corpus(max_chars: int) -> bytes:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[name] for name in sorted(topics))[:max_chars].encode("utf-8")


def _merge(tokens: np.ndarray, left: int, right: int, new: int) -> np.ndarray:
    """``tokens`` with every non-overlapping ``(left, right)`` pair, greedily left to right,
    replaced by ``new``."""
    at = np.flatnonzero((tokens[:-1] == left) & (tokens[1:] == right))
    if at.size == 0:
        return tokens
    if left == right:   # runs like x x x: keep the 1st, 3rd, ... match of each run
        run_start = np.ones(at.size, dtype=bool)
        run_start[1:] = np.diff(at) != 1
        first = np.maximum.accumulate(np.where(run_start, np.arange(at.size), 0))
        at = at[(np.arange(at.size) - first) % 2 == 0]
    tokens = tokens.copy()
    tokens[at] = new
    return np.delete(tokens, at + 1)


def train_bpe(data: bytes, vocab: int):
    """``(merges, tokens)``: ``vocab - 256`` merges of the most frequent adjacent pair (ties:
    the smallest pair id), and ``data`` encoded with them."""
    tokens = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    merges = []
    for new in range(256, vocab):
        pairs = tokens[:-1] * vocab + tokens[1:]
        counts = np.bincount(pairs, minlength=vocab * vocab)
        best = int(counts.argmax())
        if counts[best] < 2:
            raise SystemExit(f"the corpus has too few repeated pairs for --vocab {vocab}")
        left, right = divmod(best, vocab)
        merges.append((left, right))
        tokens = _merge(tokens, left, right, new)
    return merges, tokens


def encode(data: bytes, merges) -> np.ndarray:
    tokens = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    for new, (left, right) in enumerate(merges, start=256):
        tokens = _merge(tokens, left, right, new)
    return tokens


def rows_of(tokens: np.ndarray, seq_len: int):
    return [{"input_ids": tokens[start:start + seq_len].tolist()}
            for start in range(0, len(tokens) - seq_len + 1, seq_len)]


# ----------------------------------------------------------------------------- models
def teacher_model(args):
    """GPT-2-style, output layer untied from the embedding (tied, it sat at the unigram
    plateau for hundreds of steps on this corpus), no dropout."""
    import transformers
    torch.manual_seed(1000)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=args.vocab, n_positions=args.seq_len, n_embd=args.teacher_dim,
        n_layer=args.teacher_layers, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0, use_cache=False, tie_word_embeddings=False))


def student_model(args, seed: int):
    import transformers
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.student_dim,
        intermediate_size=2 * args.student_dim, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=args.seq_len, bos_token_id=0,
        eos_token_id=0, pad_token_id=0, use_cache=False, tie_word_embeddings=False))


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def batches(dataset, order, batch_size, steps):
    """``steps`` batches (``collate_causal_lm``) in ``order``, cycling through it."""
    for step in range(steps):
        start = (step * batch_size) % len(order)
        index = [order[(start + i) % len(order)] for i in range(batch_size)]
        yield collate_causal_lm([dataset[i] for i in index])


def train(model, dataset, order, args, *, steps, lr, loss_fn, log=None):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.95))
    model.train()
    for step, batch in enumerate(batches(dataset, order, args.batch_size, steps), start=1):
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits
        loss = loss_fn(logits, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if log is not None and step % 50 == 0:
            log(f"step {step}/{steps}: loss {float(loss.detach()):.3f}")
    model.eval()
    return float(loss.detach())


def label_loss(logits, batch):
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["shift_labels"].flatten(),
                           ignore_index=-100)


@torch.no_grad()
def evaluate(model, dataset, batch_size=32) -> dict:
    """Held-out next-token cross-entropy, top-1 accuracy, ECE and mean confidence - accuracy."""
    model.eval()
    losses, confidences, correct = [], [], []
    for start in range(0, len(dataset), batch_size):
        batch = collate_causal_lm([dataset[i] for i in range(start, min(start + batch_size,
                                                                       len(dataset)))])
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits.float()
        keep = batch["shift_labels"] != -100
        logits, labels = logits[keep], batch["shift_labels"][keep]
        losses.append(F.cross_entropy(logits, labels, reduction="none"))
        confidence, prediction = logits.softmax(-1).max(-1)
        confidences.append(confidence)
        correct.append((prediction == labels).float())
    loss, confidence, correct = (torch.cat(part).double() for part in
                                 (losses, confidences, correct))
    return {"ce": float(loss.mean()), "accuracy": float(correct.mean()),
            "ece": expected_calibration_error(confidence, correct),
            "overconfidence": float(confidence.mean() - correct.mean())}


def expected_calibration_error(confidence, correct, bins: int = ECE_BINS) -> float:
    """``sum_b (n_b / N) |mean(correct_b) - mean(confidence_b)|``, equal-width bins on [0, 1]
    (a confidence of exactly 1 goes in the last bin)."""
    which = (confidence * bins).long().clamp(max=bins - 1)
    count = torch.bincount(which, minlength=bins).double()
    gap = (torch.bincount(which, weights=correct, minlength=bins) -
           torch.bincount(which, weights=confidence, minlength=bins)).abs()
    return float(gap.sum() / count.sum())


# ----------------------------------------------------------------------------- caches
def make_cache(name, teacher_dir, tokens_path, out, seed) -> dict:
    """``fastkd cache`` of one layout; returns its bytes per token and ``fastkd info`` text."""
    options = {"dense": []}
    if name != "dense":
        kind, k = name.rsplit("-", 1)
        options[name] = ["--sample", k, "--seed", str(seed)] if kind == "sample" else \
            ["--top-k", k]
    status = fastkd_main(["cache", "--teacher", f"hf:{teacher_dir}", "--dataset",
                          f"jsonl:{tokens_path}", "--out", out, "--batch-size", "32",
                          "--device", "cpu", "--overwrite", "--quiet", *options[name]])
    if status != 0:
        raise SystemExit(f"fastkd cache failed for the {name} cache")
    sizes = LogitCache(out).bytes_per_row
    from contextlib import redirect_stdout
    import io
    text = io.StringIO()
    with redirect_stdout(text):
        fastkd_main(["info", out])
    return {"teacher_bytes_per_token": sizes["teacher"], "file_bytes_per_token": sizes["files"],
            "info": text.getvalue()}


# ----------------------------------------------------------------------------- the run
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, one seed, a few steps (seconds; what the test runs)")
    parser.add_argument("--out", help="results directory (default: benchmarks/results/"
                                      "sparse-quality, or a temporary one with --quick)")
    parser.add_argument("--work-dir", help="models, tokens and caches (default: temporary)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--chars", type=int, default=None, help="corpus size (default: all)")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--teacher-dim", type=int, default=256)
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--teacher-steps", type=int, default=1000)
    parser.add_argument("--student-dim", type=int, default=128)
    parser.add_argument("--steps", type=int, default=120, help="student steps")
    parser.add_argument("--lr", type=float, default=3e-3, help="student learning rate")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine two threads spin "
                             "waiting for each other)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.chars, args.vocab, args.seq_len = args.seeds[:1], 12_000, 320, 32
        args.teacher_dim, args.teacher_layers, args.teacher_steps = 32, 1, 10
        args.student_dim, args.steps, args.batch_size = 16, 3, 8
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import transformers
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    started = time.time()
    work = args.work_dir or tempfile.mkdtemp(prefix="fastkd-sparse-quality-")
    out = args.out or (tempfile.mkdtemp(prefix="fastkd-sparse-quality-out-") if args.quick else
                       str(REPO_ROOT / "benchmarks" / "results" / "sparse-quality"))
    os.makedirs(work, exist_ok=True)
    os.makedirs(out, exist_ok=True)

    text = corpus(args.chars or 10 ** 9)
    split = len(text) * 9 // 10
    merges, train_tokens = train_bpe(text[:split], args.vocab)
    held_out_tokens = encode(text[split:], merges)
    tokens_path = os.path.join(work, "train.jsonl")
    with open(tokens_path, "w") as handle:
        for row in rows_of(train_tokens, args.seq_len):
            handle.write(json.dumps(row) + "\n")
    train_set = TokenDataset.from_jsonl(tokens_path)
    held_out = TokenDataset(rows_of(held_out_tokens, args.seq_len), source="held-out")
    log = (lambda *parts: None) if args.quick else \
        (lambda *parts: print(f"[{time.time() - started:6.0f}s]", *parts, flush=True))
    log(f"V = {args.vocab}: {len(train_set)} train / {len(held_out)} held-out rows of "
        f"{args.seq_len} tokens")

    teacher = teacher_model(args)
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(1000)).tolist()
    train(teacher, train_set, order, args, steps=args.teacher_steps, lr=2e-3,
          loss_fn=label_loss, log=lambda text: log("teacher", text))
    teacher_dir = os.path.join(work, "teacher")
    teacher.save_pretrained(teacher_dir)
    teacher_metrics = evaluate(teacher, held_out)
    teacher_metrics["top32_mass"] = top_mass(teacher, held_out, 32)
    log("teacher", teacher_metrics)

    caches, shared = {}, {}
    for name in ("dense", "top-32", "top-8"):
        shared[name] = make_cache(name, teacher_dir, tokens_path,
                                  os.path.join(work, f"cache-{name}"), 0)
    runs = {setting: {condition: {} for condition in CONDITIONS} for setting in SETTINGS}
    for seed in args.seeds:
        caches = dict(shared)
        for name in ("sample-32", "sample-8"):
            caches[name] = make_cache(name, teacher_dir, tokens_path,
                                      os.path.join(work, f"cache-{name}-seed{seed}"), seed)
        caches_of_seed = {name: LogitCache(os.path.join(
            work, f"cache-{name}" + (f"-seed{seed}" if name.startswith("sample") else "")))
            for name in caches}
        order = torch.randperm(len(train_set),
                               generator=torch.Generator().manual_seed(seed)).tolist()
        for setting, (soft, hard) in SETTINGS.items():
            for condition, (cache_name, tail) in CONDITIONS.items():
                if cache_name is None and setting != "kd_only":   # the same run in both
                    runs[setting][condition][seed] = runs["kd_only"][condition][seed]
                    continue
                student = student_model(args, 2000 + seed)
                if cache_name is None:
                    train(student, train_set, order, args, steps=args.steps, lr=args.lr,
                          loss_fn=label_loss)
                else:
                    data = fastkd.CachedDataset(train_set, caches_of_seed[cache_name])

                    def kd(logits, batch, tail=tail, soft=soft, hard=hard):
                        return fastkd.kd_loss(logits, batch["teacher_targets"],
                                              batch["shift_labels"], tail=tail, temperature=1.0,
                                              soft_weight=soft, hard_weight=hard)
                    train(student, data, order, args, steps=args.steps, lr=args.lr, loss_fn=kd)
                metrics = evaluate(student, held_out)
                if cache_name is not None:
                    metrics.update({key: caches[cache_name][key] for key in
                                    ("teacher_bytes_per_token", "file_bytes_per_token")})
                runs[setting][condition][seed] = metrics
                log(f"seed {seed} {setting} {condition}: CE {metrics['ce']:.4f} "
                    f"ECE {metrics['ece']:.4f}")
        infos = {name: cache["info"] for name, cache in caches.items()}
        done = args.seeds[:args.seeds.index(seed) + 1]   # written after every seed
        results = write_results(args, started, out, done, teacher, teacher_metrics, infos,
                                runs, len(train_tokens), len(held_out_tokens))
        log(f"seeds {done} written to {out}")
    print(results.pop("markdown"))
    results["out"] = out
    return results


def write_results(args, started, out, seeds, teacher, teacher_metrics, infos, runs,
                  train_tokens, held_out_tokens) -> dict:
    """``results.json`` and ``results.md`` in ``out`` for the seeds done so far."""
    runs = {setting: {condition: {seed: by_seed[seed] for seed in seeds}
                      for condition, by_seed in conditions.items()}
            for setting, conditions in runs.items()}
    results = {
        "environment": environment(args, started),
        "settings": {"vocab": args.vocab, "seq_len": args.seq_len, "batch_size": args.batch_size,
                     "student_steps": args.steps, "student_lr": args.lr,
                     "teacher_steps": args.teacher_steps, "seeds": seeds,
                     "seeds_planned": args.seeds,
                     "temperature": 1.0, "ece_bins": ECE_BINS,
                     "train_tokens": int(train_tokens),
                     "held_out_tokens": int(held_out_tokens),
                     "teacher_parameters": parameters(teacher),
                     "student_parameters": parameters(student_model(args, 0)),
                     "quick": args.quick},
        "teacher": teacher_metrics, "fastkd_info": infos,
        "table": summarize(runs), "runs": runs}
    markdown = report(results)
    with open(os.path.join(out, "results.json"), "w") as handle:
        json.dump(results, handle, indent=1, default=str)
    with open(os.path.join(out, "results.md"), "w") as handle:
        handle.write(markdown)
    results["markdown"] = markdown
    return results


@torch.no_grad()
def top_mass(model, dataset, k: int, batch_size=32) -> float:
    """Mean teacher probability mass of its top ``k`` tokens over the held-out positions."""
    masses = []
    for start in range(0, len(dataset), batch_size):
        batch = collate_causal_lm([dataset[i] for i in range(start, min(start + batch_size,
                                                                       len(dataset)))])
        probs = model(input_ids=batch["input_ids"]).logits.float().softmax(-1)
        masses.append(probs.topk(min(k, probs.shape[-1]), -1).values.sum(-1).flatten())
    return float(torch.cat(masses).mean())


def summarize(runs) -> dict:
    """Per setting and condition: means over seeds, and CE minus dense KD's paired by seed."""
    table = {}
    for setting, conditions in runs.items():
        dense = conditions["dense"]
        table[setting] = {}
        for condition, by_seed in conditions.items():
            seeds = sorted(by_seed)
            diffs = [by_seed[s]["ce"] - dense[s]["ce"] for s in seeds]
            row = {key: float(np.mean([by_seed[s][key] for s in seeds]))
                   for key in ("ce", "ece", "overconfidence", "accuracy")}
            row["ce_vs_dense_mean"] = float(np.mean(diffs))
            row["ce_vs_dense_std"] = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None
            first = by_seed[seeds[0]]
            row["teacher_bytes_per_token"] = first.get("teacher_bytes_per_token", 0.0)
            row["file_bytes_per_token"] = float(np.mean(
                [by_seed[s].get("file_bytes_per_token", 0.0) for s in seeds]))
            table[setting][condition] = row
    return table


def environment(args, started) -> dict:
    import transformers
    return {"device": f"cpu: {cpu_model()}, {args.threads} torch threads",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "wall_seconds": round(time.time() - started, 1), **git_commit(),
            "load_average_at_end": os.getloadavg(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "fastkd": getattr(fastkd, "__version__", None),
            "command": " ".join(["python", "benchmarks/sparse_quality.py", *sys.argv[1:]])
            if not args.quick else "main(['--quick', ...])"}


def report(results) -> str:
    env, settings, teacher = results["environment"], results["settings"], results["teacher"]
    seeds = settings["seeds"]
    planned = settings["seeds_planned"]
    unfinished = "" if list(seeds) == list(planned) else \
        f"; seeds {', '.join(str(s) for s in planned if s not in seeds)} did not finish"
    lines = [
        "# Sparse teacher caches: held-out quality and calibration",
        "",
        f"- device: {env['device']}; date: {env['date']}; wall time {env['wall_seconds']:.0f} s; "
        f"load average at the end {', '.join(f'{x:.2f}' for x in env['load_average_at_end'])}",
        f"- commit: {env['commit']}{' (with uncommitted changes)' if env['dirty'] else ''}; "
        f"python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"numpy {env['numpy']}",
        f"- seeds: {', '.join(map(str, seeds))} (student init, batch order, sampled caches' "
        f"draws){unfinished}",
        f"- V = {settings['vocab']} (byte-level BPE on the training text); "
        f"{settings['train_tokens']:,} train / {settings['held_out_tokens']:,} held-out tokens; "
        f"teacher {settings['teacher_parameters'] / 1e6:.2f}M parameters (GPT-2-style, "
        f"{settings['teacher_steps']} steps), held-out CE {teacher['ce']:.3f}, ECE "
        f"{teacher['ece']:.3f}, top-32 mass {teacher['top32_mass']:.2f}; student "
        f"{settings['student_parameters'] / 1e6:.2f}M parameters (Llama-style), "
        f"{settings['student_steps']} steps of {settings['batch_size']} x "
        f"{settings['seq_len']} tokens, Adam (betas 0.9, 0.95) lr {settings['student_lr']:g}, "
        "T = 1",
        "- CE: held-out next-token cross-entropy (nats/token); vs dense: minus dense KD's, paired "
        "by seed, mean +- std over seeds; ECE: 15 equal-width bins of the top-1 probability, "
        "sum_b n_b/N |acc_b - conf_b|; conf - acc > 0: over-confident",
        "- bytes/token: the cache's teacher arrays per row (`fastkd info` bytes/row); all files "
        "per row (labels, offsets, headers) in parentheses",
    ]
    for setting, title in SETTING_TITLES.items():
        lines += ["", f"## {title}", "",
                  "| teacher cache | bytes/token | CE | CE vs dense | ECE | conf - acc |",
                  "|---|---|---|---|---|---|"]
        for condition, row in results["table"][setting].items():
            if condition == "dense":
                diff = "-"
            else:
                diff = f"{row['ce_vs_dense_mean']:+.3f}"
                if row["ce_vs_dense_std"] is not None:
                    diff += f" +- {row['ce_vs_dense_std']:.3f}"
            size = "0" if condition == "labels only" else \
                f"{row['teacher_bytes_per_token']:,.0f} ({row['file_bytes_per_token']:,.0f})"
            lines.append(f"| {condition} | {size} | {row['ce']:.3f} | {diff} | "
                         f"{row['ece']:.3f} | {row['overconfidence']:+.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
