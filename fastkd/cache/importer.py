"""``fastkd import --from vllm``: a served teacher's top-k log-probs (vLLM completions responses,
one per JSONL line: :mod:`fastkd.cache.vllm_responses`) -> a top-k cache. A prompt of ``n``
tokens owns ``n`` rows, as in ``fastkd cache`` of the same tokens: ``prompt_logprobs[1:]`` and the
generated position, as log-probabilities (``lse = 0``). Memory is bounded by one response: a
first pass checks every line and keeps its offset, the second reads them again while writing.
"""
import hashlib
import os
from array import array
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from fastkd.cache import manifest as fmt
from fastkd.cache.files import not_a_file
from fastkd.cache.vllm_responses import (ResponseError, choice_rows, load_line, read_choices,
                                         response_model)
from fastkd.tokens import next_token_labels

IMPORT_BATCH = 64  # samples handed to the shard cutter at a time (does not change the bytes)
IMPORT_ROWS = 2048  # ... or fewer once they hold this many rows (bounds memory, same bytes)
MAX_VOCAB = 2 ** 31  # class ids are stored as int32 when V > 65536


def _open(path: str):
    try:
        return open(path, "rb")
    except OSError as error:
        raise ResponseError(f"{path}: cannot be read ({error.strerror or error})") from None


class ServedResponses(torch.utils.data.Dataset):
    """The prompts of response JSONL files as the token items a
    :class:`fastkd.tokens.TokenDataset` of them gives. Construction checks every line (one
    ``model`` for all) and keeps only each sample's place; items are read again on access."""

    def __init__(self, paths: Sequence[str], *, top_k: int, vocab_size: int):
        self.paths, self.top_k, self.vocab_size = [os.fspath(p) for p in paths], top_k, \
            vocab_size
        self._file, self._offset = array("i"), array("q")  # per sample
        self._line, self._choice = array("q"), array("i")
        self.model: Optional[str] = None
        self._stats: List[Tuple[int, int]] = []
        digest = hashlib.sha256(b"served")  # of the files' bytes, read in this same pass
        first = None
        for file_index, path in enumerate(self.paths):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: {not_a_file(path)}")
            digest.update(f"|{os.path.basename(path)}|".encode())
            with _open(path) as handle:
                stat = os.fstat(handle.fileno())
                self._stats.append((stat.st_size, stat.st_mtime_ns))
                offset = 0
                for number, raw in enumerate(handle, 1):
                    digest.update(raw)
                    start, offset = offset, offset + len(raw)
                    if not raw.strip():
                        continue
                    where = f"{path}:{number}"
                    response = load_line(raw, where)
                    choices = read_choices(response, where, top_k=top_k,
                                           vocab_size=vocab_size)
                    model = response_model(response, where)
                    if first is None:
                        self.model, first = model, where
                    elif model != self.model:
                        raise ResponseError(
                            f"{where}: model {model!r} differs from {self.model!r} of {first}; "
                            f"one import takes the responses of one teacher")
                    for choice in range(len(choices)):
                        self._file.append(file_index)
                        self._offset.append(start)
                        self._line.append(number)
                        self._choice.append(choice)
        if not len(self._file):
            raise ResponseError(f"{', '.join(self.paths)}: no responses found")
        self.fingerprint = digest.hexdigest()

    def __len__(self) -> int:
        return len(self._file)

    def _read(self, handle, index: int) -> Tuple[str, dict]:
        where = f"{self.paths[self._file[index]]}:{self._line[index]}"
        handle.seek(self._offset[index])
        return where, load_line(handle.readline(), where)

    def _choice_of(self, response: dict, where: str, index: int) -> dict:
        choices = read_choices(response, where, top_k=self.top_k, vocab_size=self.vocab_size)
        if self._choice[index] >= len(choices):
            raise ResponseError(f"{where}: changed since it was first read; import again")
        return choices[self._choice[index]]

    @staticmethod
    def _item(token_ids: List[int]) -> dict:
        ids = torch.tensor(token_ids, dtype=torch.long)
        return {"input_ids": ids, "labels": next_token_labels(ids)}

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        with _open(self.paths[self._file[index]]) as handle:
            where, response = self._read(handle, index)
        return self._item(self._choice_of(response, where, index)["token_ids"])

    def iter_rows(self, start: int = 0) -> Iterator[Tuple[int, dict]]:
        """``(index, {"input_ids", "labels", "values" (n, K), "indices" (n, K)})`` for every
        sample from ``start`` on, reading each line once; refuses files changed meanwhile."""
        handle, handle_file, read_key, response, where = None, None, None, None, None
        try:
            for index in range(start, len(self)):
                file_index = self._file[index]
                if file_index != handle_file:
                    if handle is not None:
                        handle.close()
                    handle, handle_file = _open(self.paths[file_index]), file_index
                if (file_index, self._offset[index]) != read_key:
                    where, response = self._read(handle, index)
                    read_key = (file_index, self._offset[index])
                choice = self._choice_of(response, where, index)
                values, indices = choice_rows(choice, top_k=self.top_k,
                                              vocab_size=self.vocab_size)
                yield index, dict(self._item(choice["token_ids"]), values=values,
                                  indices=indices)
        finally:
            if handle is not None:
                handle.close()
        self.check_unchanged()

    def check_unchanged(self) -> None:
        """Refuse input files whose size or modification time changed since construction."""
        for path, stat in zip(self.paths, self._stats):
            now = os.stat(path)
            if (now.st_size, now.st_mtime_ns) != stat:
                raise ResponseError(f"{path}: changed while it was imported; import again")


def import_served(paths: Sequence[str], out_dir, *, vocab_size: int, top_k: int,
                  dtype: str = "fp16", shard_size_mb: float = 256, overwrite: bool = False,
                  progress: bool = True, source: str = "vllm") -> dict:
    """Write the top-K cache of served-teacher responses ``paths`` into ``out_dir``; returns the
    manifest. Re-running resumes an interrupted import."""
    from fastkd.cache.specs import dataset_fingerprint
    from fastkd.cache.writer import validate_settings
    if source != "vllm":
        raise ValueError(f"--from must be 'vllm', got {source!r}")
    for name, option, value in (("vocab_size", "--vocab-size", vocab_size),
                                ("top_k", "--top-k", top_k)):
        if not fmt.is_int(value, 1):
            raise ValueError(f"{name} ({option}) must be an int >= 1, got {value!r}")
    if vocab_size > MAX_VOCAB:
        raise ValueError(f"vocab_size (--vocab-size) must be at most 2**31 (class ids are "
                         f"stored as int32), got {vocab_size}")
    if top_k > vocab_size:
        raise ValueError(f"top_k={top_k} (--top-k) exceeds vocab_size={vocab_size} "
                         f"(--vocab-size)")
    validate_settings(IMPORT_BATCH, 0, dtype, shard_size_mb, top_k, None, 0)
    paths = [os.fspath(path) for path in paths]
    if not paths:
        raise ValueError("give at least one response file")
    dataset = ServedResponses(paths, top_k=top_k, vocab_size=vocab_size)
    from fastkd.cache.teacher_import import write_rows
    return write_rows(
        _StoredRows(dataset, dtype), out_dir, source=source, paths=paths,
        teacher={"class": "served", "model": dataset.model, "fingerprint": dataset.fingerprint},
        dataset_spec=f"{source}-prompts", fingerprint=dataset_fingerprint(dataset), top_k=top_k,
        vocab_size=vocab_size, dtype=dtype, shard_size_mb=shard_size_mb,
        batch=(IMPORT_BATCH, IMPORT_ROWS), overwrite=overwrite, progress=progress)


class _StoredRows:
    """:class:`ServedResponses`' samples as :func:`fastkd.cache.teacher_import.write_rows` takes
    them: values in the storage ``dtype``, and ``lse`` 0 (the values are log-probs at T = 1)."""

    def __init__(self, dataset: ServedResponses, dtype: str):
        self.dataset, self.dtype = dataset, dtype

    def __len__(self) -> int:
        return len(self.dataset)

    def iter_rows(self, start: int = 0) -> Iterator[Tuple[int, dict]]:
        from fastkd.cache.convert import to_storage
        for index, sample in self.dataset.iter_rows(start):
            values = sample["values"]
            yield index, dict(sample, values=to_storage(torch.from_numpy(values), self.dtype),
                              lse=np.zeros(len(values), fmt.LSE_DTYPE))


def vllm_style_response(model, token_ids: Sequence[int], top_k: int,
                        model_name: str = "local", request_id: Optional[str] = None) -> dict:
    """What a vLLM server returns for ``prompt=token_ids`` with the import's request and greedy
    sampling, computed with a local causal LM ``model``, for the sample file and round-trip
    tests (``decoded_token`` is ``"token_id:<id>"``: no tokenizer is needed)."""
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    with torch.no_grad():
        output = model(ids[None])
        logits = (output.logits if hasattr(output, "logits") else output)[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    written = logprobs.clamp(min=-9999.0)  # vLLM's JSON stand-in for -inf

    def top(position: int, extra: Optional[int]):
        """vLLM's entry: the actual token first (when given), then the top-K, with ranks."""
        row = logprobs[position]
        indices = row.topk(top_k).indices.tolist()
        if extra is not None:
            indices = [extra] + [i for i in indices if i != extra]
        return [(i, float(written[position, i]), int((row > row[i]).sum()) + 1)
                for i in indices]

    prompt_logprobs = [None]
    for j in range(1, len(ids)):
        prompt_logprobs.append({str(i): {"logprob": v, "rank": rank,
                                         "decoded_token": f"token_id:{i}"}
                                for i, v, rank in top(j - 1, int(ids[j]))})
    chosen = top(len(ids) - 1, None)
    generated = chosen[0][0]
    top_logprobs = {f"token_id:{i}": v for i, v, _ in chosen}
    return {
        "id": request_id or "cmpl-fastkd-sample", "object": "text_completion", "created": 0,
        "model": model_name,
        "choices": [{
            "index": 0, "text": f"token_id:{generated}",
            "logprobs": {"text_offset": [0], "token_logprobs": [chosen[0][1]],
                         "tokens": [f"token_id:{generated}"], "top_logprobs": [top_logprobs]},
            "finish_reason": "length", "stop_reason": None,
            "token_ids": [generated], "prompt_logprobs": prompt_logprobs,
            "prompt_token_ids": [int(i) for i in ids],
        }],
        "usage": {"prompt_tokens": len(ids), "total_tokens": len(ids) + 1,
                  "completion_tokens": 1, "prompt_tokens_details": None},
    }
