"""Token datasets for causal language models, and the collator that lines their teacher rows up
with a student's logits. The conventions, decided here:

- **Rows are next-token targets**: teacher row ``j`` is its distribution for token ``j + 1``, so
  it pairs with ``student_logits[:, j]`` without shifting.
- **Labels**: items carry next-token labels, ``labels[j] = hf_labels[j + 1]`` (HF ``labels``
  are unshifted; default the ``input_ids``) and the last ``ignore_index``.
- **Padding produces no rows**: unattended positions are dropped before the teacher runs; the
  mask must be one contiguous run of ones.
"""
import json
import os
from typing import List, Optional, Sequence

import torch

from fastkd.cache.collate import pad_stack, pad_targets, sparse_filler, target_like
from fastkd.cache.files import not_a_file
from fastkd.extras import require
from fastkd.hf_text import IGNORE_INDEX, TEXT_FIELDS, TextTokenizer
from fastkd.targets import SampledTargets, TopKLogits

__all__ = ["TokenDataset", "next_token_labels", "collate_causal_lm", "targets_to_dict",
           "targets_from_dict", "TOKEN_SOURCES", "learned_positions", "IGNORE_INDEX"]

ROW_FIELDS = ("input_ids",) + TEXT_FIELDS
INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1
TOKEN_SOURCES = ("jsonl", "parquet", "hf-disk")


def _int_list(value, what: str) -> List[int]:
    """A flat list of ints from a list / array / tensor, or a ValueError naming ``what``."""
    if hasattr(value, "tolist"):  # tensors, numpy, pyarrow scalars
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise ValueError(f"{what} must be a flat list of ints, got {str(value)[:80]}")
    for x in value:
        if not INT64_MIN <= x <= INT64_MAX:
            raise ValueError(f"{what}: {str(x)[:40]} does not fit in a 64-bit integer")
    return list(value)


def _integer_ids(value, what: str) -> torch.Tensor:
    """``value`` as an integer tensor, or a TypeError naming ``what``: float, complex and bool
    ids are refused, not truncated to ints. An empty list is taken as no ids."""
    tensor = torch.as_tensor(value)
    if tensor.numel() == 0 and not isinstance(value, torch.Tensor):
        return tensor.long()
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"{what} must be integers, got {tensor.dtype} ({str(value)[:60]})")
    return tensor


def next_token_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """HF (unshifted) labels ``(..., L)`` of any integer dtype -> int64 next-token labels:
    ``out[..., j] = labels[..., j+1]``, ``out[..., -1] = ignore_index``. Position ``j``'s logits
    are then scored against ``out[j]``. The result is int64 whatever the input's dtype, so
    ``ignore_index`` (negative) is held exactly, also for unsigned token ids."""
    labels = _integer_ids(labels, "labels")
    if labels.dim() == 0:
        raise ValueError("labels must have a sequence dimension (..., L), got a 0-dim tensor")
    out = torch.full(labels.shape, ignore_index, dtype=torch.long, device=labels.device)
    out[..., :-1] = labels[..., 1:]
    return out


def _max_length(value: Optional[int]) -> Optional[int]:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or
                              value < 1):
        raise ValueError(f"max_length (--max-length) must be a positive integer, got {value!r}")
    return value


def learned_positions(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``(L,)`` bool: the positions of one sequence a token cache keeps rows for: those with a
    next-token label, and the last (ignored only because the sequence ends there). ``labels``
    is one sequence ``(L,)``: in a padded batch the last column is not each sequence's end, so
    other shapes are refused."""
    labels = torch.as_tensor(labels)
    if labels.dim() != 1:
        raise ValueError(f"labels must be one sequence (L,), got shape {tuple(labels.shape)}")
    keep = labels != ignore_index
    keep[-1:] = True
    return keep


def prepare_tokens(row: dict, where: str, ignore_index: int = IGNORE_INDEX, *,
                   max_length: Optional[int] = None) -> dict:
    """One raw row ``{input_ids, attention_mask?, labels?}`` (HF conventions) -> the item
    ``{"input_ids": (n,), "labels": (n,)}`` of its ``n`` attended tokens, labels next-token;
    with ``max_length``, of the first ``max_length`` attended tokens."""
    if not isinstance(row, dict) or "input_ids" not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"{where}: expected a row with 'input_ids' (and optional "
                         f"'attention_mask', 'labels'), or text: 'text', 'prompt' and "
                         f"'completion', or 'messages'; got {keys}")
    input_ids = _int_list(row["input_ids"], f"{where}: input_ids")
    length = len(input_ids)
    labels = input_ids if row.get("labels") is None else _int_list(row["labels"],
                                                                   f"{where}: labels")
    mask = [1] * length if row.get("attention_mask") is None else _int_list(
        row["attention_mask"], f"{where}: attention_mask")
    for name, values in (("labels", labels), ("attention_mask", mask)):
        if len(values) != length:
            raise ValueError(f"{where}: {name} has {len(values)} entries but input_ids has "
                             f"{length}")
    if any(m not in (0, 1) for m in mask):
        raise ValueError(f"{where}: attention_mask must hold only 0 and 1")
    if any(i < 0 for i in input_ids):
        raise ValueError(f"{where}: input_ids must be >= 0, got {min(input_ids)}")
    if not length:
        raise ValueError(f"{where}: input_ids is empty (a row needs at least one token)")
    attended = [position for position, m in enumerate(mask) if m]
    if not attended:
        raise ValueError(f"{where}: no attended tokens (attention_mask is all 0)")
    first, last = attended[0], attended[-1]
    if last - first + 1 != len(attended):
        raise ValueError(f"{where}: attention_mask has holes (0s between 1s); fastkd supports "
                         f"left/right padding only, one contiguous run of attended tokens")
    if max_length is not None:
        last = min(last, first + max_length - 1)
    tokens = torch.tensor(input_ids[first:last + 1], dtype=torch.long)
    hf_labels = torch.tensor(labels[first:last + 1], dtype=torch.long)
    return {"input_ids": tokens, "labels": next_token_labels(hf_labels, ignore_index)}


class TokenDataset(torch.utils.data.Dataset):
    """Tokenized rows for a causal LM: items ``{"input_ids": (n,), "labels": (n,)}`` of the
    attended tokens and their next-token labels, validated on access.

    Rows hold ``input_ids`` (optional ``attention_mask``, ``labels``), or text
    (:mod:`fastkd.hf_text`) with ``tokenizer``: a :class:`fastkd.hf_text.TextTokenizer` or a
    local tokenizer directory. ``max_length`` keeps the first ``max_length`` tokens of a row.
    """

    cache_rows = "learned"  # `fastkd cache` stores the rows of :func:`learned_positions`

    def __init__(self, rows, source: str = "rows", *, ignore_index: int = IGNORE_INDEX,
                 locations: Optional[Sequence[str]] = None, tokenizer=None,
                 max_length: Optional[int] = None):
        if not (hasattr(rows, "__getitem__") and hasattr(rows, "__len__")):
            raise TypeError(f"rows must be a sequence of dicts, got {type(rows).__name__}")
        self.rows, self.source, self.ignore_index = rows, source, ignore_index
        # where each row came from, for errors ("file:line"); default "<source> row <index>"
        self.locations = locations
        self.tokenizer, self.max_length = tokenizer, _max_length(max_length)

    @classmethod
    def from_spec(cls, spec: str, split: Optional[str] = "train", *, tokenizer=None,
                  max_length: Optional[int] = None) -> "TokenDataset":
        """``jsonl:<file>``, ``parquet:<file>`` or ``hf-disk:<dir>`` (``split`` picks one split
        of a saved ``DatasetDict``); ``tokenizer`` and ``max_length`` as for the class."""
        kind, _, path = spec.partition(":")
        if kind not in TOKEN_SOURCES or not path:
            raise ValueError(f"--dataset {spec!r}: expected one of "
                             f"{', '.join(k + ':<path>' for k in TOKEN_SOURCES)}")
        if kind == "hf-disk":
            dataset = cls.from_disk(path, split)
        elif not os.path.isfile(path):
            raise FileNotFoundError(f"--dataset {spec}: {os.path.abspath(path)}: "
                                    f"{not_a_file(path)}")
        else:
            dataset = cls.from_jsonl(path) if kind == "jsonl" else cls.from_parquet(path)
        dataset.tokenizer, dataset.max_length = tokenizer, _max_length(max_length)
        return dataset

    @classmethod
    def from_jsonl(cls, path) -> "TokenDataset":
        """One JSON object per line (blank lines skipped), UTF-8."""
        rows, locations = [], []
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, 1):
                where = f"{path}:{number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise ValueError(f"{where}: not UTF-8 text (byte 0x{raw[error.start]:02x} at "
                                     f"column {error.start + 1})") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{where}: not valid JSON ({error})") from None
                except RecursionError:
                    raise ValueError(f"{where}: JSON nested too deeply to read; expected one "
                                     f"flat object per line") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{where}: expected a JSON object, got "
                                     f"{type(row).__name__}")
                rows.append(row)
                locations.append(where)
        return cls(rows, source=f"jsonl:{path}", locations=locations)

    @classmethod
    def from_parquet(cls, path) -> "TokenDataset":
        pq = require("pyarrow.parquet", "hf", f"--dataset parquet:{path}")
        try:
            table = pq.read_table(path)
        except Exception as error:  # pyarrow raises its own types for non-parquet files
            raise ValueError(f"{path}: cannot read as parquet ({error})") from None
        return cls(_TableRows(table, path), source=f"parquet:{path}")

    @classmethod
    def from_disk(cls, path, split: Optional[str] = "train") -> "TokenDataset":
        """A ``datasets.Dataset`` (or one split of a ``DatasetDict``) saved with
        ``save_to_disk``."""
        datasets = require("datasets", "hf", f"--dataset hf-disk:{path}")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--dataset hf-disk:{path}: no such directory "
                                    f"{os.path.abspath(path)}")
        try:
            loaded = datasets.load_from_disk(path)
        except (FileNotFoundError, ValueError) as error:
            raise ValueError(f"--dataset hf-disk:{path}: not a dataset saved with "
                             f"save_to_disk ({error})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"--dataset hf-disk:{path} holds splits {sorted(loaded)}; pick "
                                 f"one with --data-split (got {split!r})")
            loaded = loaded[split]
        if not set(ROW_FIELDS) & set(loaded.column_names):
            raise ValueError(f"--dataset hf-disk:{path}: no {' / '.join(ROW_FIELDS)} column "
                             f"(columns: {loaded.column_names})")
        return cls(loaded, source=f"hf-disk:{path}")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        where = self.locations[index] if self.locations is not None else \
            f"{self.source} row {index}"
        row = self.rows[index]
        if isinstance(row, dict) and "input_ids" not in row and \
                any(field in row for field in TEXT_FIELDS):
            row = self._text_tokenizer(where)(row, where)
        return prepare_tokens(row, where, self.ignore_index, max_length=self.max_length)

    def _text_tokenizer(self, where: str):
        """The tokenizer for text rows, loaded from its directory on first use."""
        if self.tokenizer is None:
            raise ValueError(f"{where}: the row holds text, which needs a tokenizer: pass "
                             f"--tokenizer DIR (`fastkd cache` uses an hf: teacher's own by "
                             f"default; TokenDataset(..., tokenizer=DIR) in Python)")
        if isinstance(self.tokenizer, (str, os.PathLike)):
            self.tokenizer = TextTokenizer.from_dir(self.tokenizer)
        return self.tokenizer

    def __repr__(self) -> str:
        return f"TokenDataset({self.source!r}, {len(self)} rows)"


class _TableRows:
    """Row access to a pyarrow table (one row converted per access)."""

    def __init__(self, table, path):
        self.table, self.path = table, path
        if not set(ROW_FIELDS) & set(table.column_names):
            raise ValueError(f"{path}: no {' / '.join(ROW_FIELDS)} column (columns: "
                             f"{table.column_names})")

    def __len__(self):
        return self.table.num_rows

    def __getitem__(self, index):
        return self.table.slice(index, 1).to_pylist()[0]   # IndexError past either end


# the "kind" of each sparse target type in :func:`targets_to_dict` dicts
TARGET_KINDS = {"topk": TopKLogits, "sampled": SampledTargets}


def targets_to_dict(target):
    """A sparse target as a plain dict of its fields with a ``"kind"`` (``"topk"`` or
    ``"sampled"``), which ``transformers.Trainer`` can move between devices (named tuples it
    cannot). Dense tensors pass through."""
    for kind, target_type in TARGET_KINDS.items():
        if isinstance(target, target_type):
            return {"kind": kind, **target._asdict()}
    return target


def targets_from_dict(target):
    """Inverse of :func:`targets_to_dict` (targets already in object form pass through)."""
    if not isinstance(target, dict):
        return target
    target_type = TARGET_KINDS.get(target.get("kind"))
    if target_type is None:
        raise ValueError(f"teacher_targets dict of unknown kind {target.get('kind')!r}; "
                         f"expected 'topk' or 'sampled'")
    return target_type(**{field: target[field] for field in target_type._fields
                           if field in target})


def _pad(tensors: Sequence[torch.Tensor], length: int, value) -> torch.Tensor:
    """:func:`fastkd.cache.collate.pad_stack` right-padded on to ``length`` rows."""
    out = pad_stack(list(tensors), value)
    if out.shape[1] == length:
        return out
    return torch.nn.functional.pad(out, (0, 0) * (out.dim() - 2) + (0, length - out.shape[1]),
                                   value=value)


def _rows_at_positions(teacher, labels: torch.Tensor, ignore_index: int, number: int):
    """One sample's cached rows -> one row per position (at the positions a cache of
    :func:`learned_positions` leaves out, whose labels are ignored: zero rows, or a sparse
    target's valid filler)."""
    rows = (teacher if isinstance(teacher, torch.Tensor) else teacher.indices).shape[0]
    length = labels.shape[0]
    if rows == length:
        return teacher
    keep = learned_positions(labels, ignore_index)
    if rows != int(keep.sum()):
        raise ValueError(f"item {number}: {rows} teacher rows for {length} tokens, of which "
                         f"{int(keep.sum())} are learned (the cache was made from other token "
                         f"data)")

    def place(part, full):
        full = full.clone()
        full[keep] = part
        return full
    if isinstance(teacher, torch.Tensor):
        return place(teacher, teacher.new_zeros((length,) + tuple(teacher.shape[1:])))
    return target_like(teacher, [place(part, fill) for part, fill in
                                 zip(teacher.tensors(), sparse_filler(teacher, length).tensors())])


def _sequence(value, what: str) -> torch.Tensor:
    """One sequence of integer ids as an int64 ``(L,)`` tensor (``(1, L)`` accepted), or an
    error naming ``what``."""
    tensor = _integer_ids(value, what)
    if tensor.dim() > 1 and tensor.shape[:-1].numel() != 1:
        raise ValueError(f"{what} must be one sequence (L,), got shape {tuple(tensor.shape)}")
    return tensor.reshape(-1).long()


def collate_causal_lm(items, *, pad_token_id: int = 0, ignore_index: int = IGNORE_INDEX,
                      pad_to_multiple_of: Optional[int] = None,
                      targets_as_dict: bool = False) -> dict:
    """Right-pad a batch of :class:`TokenDataset` items or :class:`fastkd.CachedDataset` items
    ``(inputs, next-token labels, teacher rows)`` for a causal LM student: ``input_ids``,
    ``attention_mask``, HF ``labels`` (unshifted), ``shift_labels`` (next-token) and, for cached
    items, ``teacher_targets`` aligned with the student's logits:
    ``kd_loss(student_logits, batch["teacher_targets"], batch["shift_labels"])``. With
    ``targets_as_dict`` sparse targets come as :func:`targets_to_dict` dicts.
    """
    if not items:
        raise ValueError("collate_causal_lm: empty batch")
    if pad_to_multiple_of is not None and (isinstance(pad_to_multiple_of, bool) or not
                                           isinstance(pad_to_multiple_of, int) or
                                           pad_to_multiple_of < 1):
        raise ValueError(f"pad_to_multiple_of must be a positive int or None, got "
                         f"{pad_to_multiple_of!r}")
    teachers = None
    for number, item in enumerate(items):
        if isinstance(item, dict) != isinstance(items[0], dict):
            raise TypeError(f"item {number}: {type(item).__name__} but item 0 is a "
                            f"{type(items[0]).__name__}; a batch holds TokenDataset items "
                            f"(dicts) or CachedDataset items ((inputs, labels, teacher) "
                            f"tuples), not both")
        if not isinstance(item, dict) and (not isinstance(item, (tuple, list)) or
                                           len(item) != 3):
            raise ValueError(f"item {number}: expected a dict with 'input_ids' or an (inputs, "
                             f"labels, teacher) tuple, got {type(item).__name__}")
    if isinstance(items[0], dict):
        model_inputs, labels = items, [item.get("labels") for item in items]
    else:
        model_inputs, labels, teachers = zip(*items)
    inputs = []
    for number, item in enumerate(model_inputs):
        if isinstance(item, dict) and "input_ids" not in item:
            raise ValueError(f"item {number}: no 'input_ids' (keys: {sorted(item)})")
        inputs.append(_sequence(item["input_ids"] if isinstance(item, dict) else item,
                                f"item {number}: input_ids"))
    lengths = [len(ids) for ids in inputs]
    labels = [next_token_labels(ids, ignore_index) if label is None else
              _sequence(label, f"item {number}: labels")
              for number, (ids, label) in enumerate(zip(inputs, labels))]
    for number, (ids, label) in enumerate(zip(inputs, labels)):
        if label.shape != ids.shape:
            raise ValueError(f"item {number}: {len(label)} labels for {len(ids)} tokens")
    length = max(lengths)
    if pad_to_multiple_of is not None:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    shift_labels = _pad(labels, length, ignore_index)
    batch = {
        "input_ids": _pad(inputs, length, pad_token_id),
        "attention_mask": _pad([torch.ones(n, dtype=torch.long) for n in lengths], length, 0),
        # HF labels: label of token j is the next-token label of position j - 1
        "labels": torch.cat([torch.full((len(items), 1), ignore_index, dtype=torch.long),
                             shift_labels[:, :-1]], dim=1),
        "shift_labels": shift_labels,
    }
    if teachers is not None:
        teachers = [_rows_at_positions(teacher, label, ignore_index, number)
                    for number, (teacher, label) in enumerate(zip(teachers, labels))]
        targets = pad_targets(teachers, length)
        batch["teacher_targets"] = targets_to_dict(targets) if targets_as_dict else targets
    return batch
