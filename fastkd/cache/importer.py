"""``fastkd import --from vllm``: a served teacher's top-k log-probs -> a top-k cache.

Input: JSONL files, one OpenAI-compatible *completions* response per line exactly as a vLLM
server serializes it (``CompletionResponse`` in vLLM's ``vllm/entrypoints/openai/protocol.py``;
``Logprob`` in ``vllm/logprobs.py``), for a request with::

    {"prompt": [token ids], "max_tokens": 1, "prompt_logprobs": K, "logprobs": K,
     "return_tokens_as_token_ids": true, "return_token_ids": true}

Per choice, the fields read are:

- ``prompt_token_ids``: the prompt's ``n`` token ids (``return_token_ids``);
- ``prompt_logprobs``: ``n`` entries, the first ``null`` (the first token has no context),
  entry ``j`` a dict ``{"<token id>": {"logprob", "rank", "decoded_token"}}`` with the top-K
  tokens at prompt position ``j`` (plus the actual prompt token when it is not among them;
  JSON object keys are strings);
- ``logprobs.top_logprobs[0]``: the top-K of the first *generated* position, keyed
  ``"token_id:<id>"`` (``return_tokens_as_token_ids``): the distribution after the whole prompt.

fastkd row ``j`` is the distribution for token ``j + 1`` (see :mod:`fastkd.tokens`), so rows
``0 .. n-2`` are ``prompt_logprobs[1 .. n-1]`` and row ``n - 1`` is the generated position's
top-K: each prompt owns ``n`` rows, like ``fastkd cache`` of the same tokens. Each row keeps the
K largest log-probs (descending), ``lse = 0`` (values are already log-probabilities, exactly
``fastkd.TopKLogits.from_logprobs``), so the tail mass ``1 - sum exp(values)`` is exact.
Labels are next-token labels from ``prompt_token_ids``. The cache is written with the writer's
shard machinery: same manifest, checksums, resume and ``fastkd verify``.
"""
import hashlib
import json
import os
from typing import List, Optional, Sequence

import numpy as np
import torch

from fastkd.cache import manifest as fmt

IMPORT_BATCH = 64  # samples handed to the shard cutter at a time (does not change the bytes)
LOGPROB_SLACK = 1e-3  # a log-prob above this, or top-K mass above 1 + this, is refused


class ResponseError(ValueError):
    """A response line that cannot be imported (message starts with ``file:line``)."""


# ----------------------------------------------------------------------------- parsing
def _token_id(key: str, where: str, vocab_size: int) -> int:
    text = key[len("token_id:"):] if key.startswith("token_id:") else key
    try:
        token = int(text)
    except ValueError:
        raise ResponseError(f"{where}: top-logprob key {key!r} is not a token id; request with "
                           f"return_tokens_as_token_ids=true") from None
    if not 0 <= token < vocab_size:
        raise ResponseError(f"{where}: token id {token} outside [0, {vocab_size}) "
                           f"(--vocab-size {vocab_size})")
    return token


def _logprob(value, where: str) -> float:
    if isinstance(value, dict):
        value = value.get("logprob")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ResponseError(f"{where}: expected a number or {{\"logprob\": number, ...}}, got "
                           f"{str(value)[:60]}")
    value = float(value)
    if np.isnan(value) or value > LOGPROB_SLACK:
        raise ResponseError(f"{where}: log-prob {value} is not a log-probability (must be <= 0)")
    return value


def _top_k_row(entries, where: str, top_k: int, vocab_size: int):
    """A dict ``{token: logprob}`` -> its K largest ``(values (K,), ids (K,))``."""
    if not isinstance(entries, dict):
        raise ResponseError(f"{where}: expected an object of token id -> log-prob, got "
                           f"{type(entries).__name__}")
    if len(entries) < top_k:
        raise ResponseError(f"{where}: {len(entries)} log-probs, fewer than --top-k {top_k} "
                           f"(request prompt_logprobs / logprobs >= {top_k})")
    pairs = sorted(((_logprob(value, f"{where}[{key!r}]"), _token_id(key, where, vocab_size))
                    for key, value in entries.items()), key=lambda pair: -pair[0])[:top_k]
    values = np.array([value for value, _ in pairs], np.float32)
    ids = np.array([token for _, token in pairs], np.int64)
    if len(set(ids.tolist())) != top_k:
        raise ResponseError(f"{where}: duplicate token ids")
    if float(np.exp(values.astype(np.float64)).sum()) > 1 + LOGPROB_SLACK:
        raise ResponseError(f"{where}: top-{top_k} probabilities sum to more than 1")
    return values, ids


def _field(container: dict, key: str, where: str, hint: str):
    value = container.get(key)
    if value is None:
        raise ResponseError(f"{where}: missing {key!r} ({hint})")
    return value


def parse_response_line(line: str, where: str, *, top_k: int, vocab_size: int,
                        with_rows: bool = True) -> List[dict]:
    """One response JSON -> per choice ``{"input_ids", "labels", "values", "indices"}``
    (``values``/``indices`` ``(n, K)`` only with ``with_rows``)."""
    try:
        response = json.loads(line)
    except json.JSONDecodeError as error:
        raise ResponseError(f"{where}: not valid JSON ({error})") from None
    if not isinstance(response, dict):
        raise ResponseError(f"{where}: expected a JSON object (a completions response)")
    choices = _field(response, "choices", where, "not a completions response")
    if not isinstance(choices, list) or not choices:
        raise ResponseError(f"{where}: 'choices' must be a non-empty list")
    samples = []
    for number, choice in enumerate(choices):
        at = f"{where}: choices[{number}]"
        if not isinstance(choice, dict):
            raise ResponseError(f"{at}: expected an object")
        token_ids = choice.get("prompt_token_ids", response.get("prompt_token_ids"))
        if token_ids is None:
            raise ResponseError(f"{at}: missing 'prompt_token_ids' (request with "
                               f"return_token_ids=true)")
        if not isinstance(token_ids, list) or not token_ids or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in token_ids):
            raise ResponseError(f"{at}: 'prompt_token_ids' must be a non-empty list of ints")
        for token in token_ids:
            if not 0 <= token < vocab_size:
                raise ResponseError(f"{at}: prompt token id {token} outside [0, {vocab_size}) "
                                   f"(--vocab-size {vocab_size})")
        ids = torch.tensor(token_ids, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        labels[:-1] = ids[1:]
        sample = {"input_ids": ids, "labels": labels}
        if with_rows:
            prompt = choice.get("prompt_logprobs", response.get("prompt_logprobs"))
            if prompt is None:
                raise ResponseError(f"{at}: missing 'prompt_logprobs' (request with "
                                   f"prompt_logprobs={top_k})")
            if not isinstance(prompt, list) or len(prompt) != len(token_ids):
                raise ResponseError(f"{at}: 'prompt_logprobs' must be a list with one entry per "
                                   f"prompt token ({len(token_ids)})")
            logprobs = choice.get("logprobs")
            top = logprobs.get("top_logprobs") if isinstance(logprobs, dict) else None
            generated = top[0] if isinstance(top, list) and top else None
            if generated is None:
                raise ResponseError(
                    f"{at}: missing 'logprobs.top_logprobs[0]', the distribution after the "
                    f"last prompt token (request with max_tokens=1, logprobs={top_k}, "
                    f"return_tokens_as_token_ids=true)")
            rows = [_top_k_row(entries, f"{at}.prompt_logprobs[{j}]", top_k, vocab_size)
                    for j, entries in enumerate(prompt[1:], 1)]
            rows.append(_top_k_row(generated, f"{at}.logprobs.top_logprobs[0]", top_k,
                                   vocab_size))
            sample["values"] = np.stack([values for values, _ in rows])
            sample["indices"] = np.stack([indices for _, indices in rows])
        samples.append(sample)
    return samples


class ServedResponses(torch.utils.data.Dataset):
    """The prompts of response JSONL files as token items ``{"input_ids", "labels"}`` (the
    same items a :class:`fastkd.tokens.TokenDataset` of those tokens gives, so the dataset
    fingerprint matches and ``CachedDataset(TokenDataset(...), cache)`` works)."""

    def __init__(self, paths: Sequence[str], *, top_k: int, vocab_size: int):
        self.paths, self.top_k, self.vocab_size = list(paths), top_k, vocab_size
        self.items, self.lines = [], []  # per sample: token item; (path, line, text, choice)
        for path in self.paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: no such file")
            with open(path, encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    where = f"{path}:{number}"
                    samples = parse_response_line(line, where, top_k=top_k,
                                                  vocab_size=vocab_size, with_rows=False)
                    for choice, sample in enumerate(samples):
                        self.items.append(sample)
                        self.lines.append((where, line, choice))
        if not self.items:
            raise ResponseError(f"{', '.join(self.paths)}: no responses found")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]

    def rows(self, index: int) -> dict:
        where, line, choice = self.lines[index]
        return parse_response_line(line, where, top_k=self.top_k,
                                   vocab_size=self.vocab_size)[choice]


def _files_fingerprint(paths: Sequence[str]) -> str:
    digest = hashlib.sha256(b"served")
    for path in paths:
        digest.update(f"|{os.path.basename(path)}|".encode())
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(fmt.HASH_CHUNK), b""):
                digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- writing
def import_served(paths: Sequence[str], out_dir, *, vocab_size: int, top_k: int,
                  dtype: str = "fp16", shard_size_mb: float = 256, overwrite: bool = False,
                  progress: bool = True, source: str = "vllm") -> dict:
    """Write the top-K cache of served-teacher responses ``paths`` into ``out_dir`` (see the
    module docstring). Returns the manifest. Re-running resumes an interrupted import."""
    from fastkd.cache.specs import dataset_fingerprint
    from fastkd.cache.writer import _validate
    if source != "vllm":
        raise ValueError(f"--from must be 'vllm', got {source!r}")
    for name, value in (("vocab_size", vocab_size), ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if top_k > vocab_size:
        raise ValueError(f"top_k={top_k} exceeds vocab_size={vocab_size}")
    _validate(IMPORT_BATCH, 0, dtype, shard_size_mb, top_k, None, 0)
    paths = [os.fspath(path) for path in paths]
    if not paths:
        raise ValueError("give at least one response file")
    out_dir = os.fspath(out_dir)
    dataset = ServedResponses(paths, top_k=top_k, vocab_size=vocab_size)
    config = {
        "teacher": {"spec": f"{source}:" + ",".join(os.path.basename(p) for p in paths),
                    "class": "served", "fingerprint": _files_fingerprint(paths)},
        "dataset": {"spec": f"{source}-prompts", "class": "TokenDataset",
                    "fingerprint": dataset_fingerprint(dataset)},
        "format_version": fmt.FORMAT_VERSION, "dtype": dtype, "layout": "topk",
        "top_k": top_k, "sample": None, "temperatures": [1.0], "seed": None,
        "shard_size_mb": shard_size_mb, "batch_size": IMPORT_BATCH, "world_size": 1,
        "clamp": False,
    }
    from fastkd.cache import outdir
    outdir.make_directory(out_dir)
    with outdir.DirectoryLock(out_dir):  # one writer at a time, as for `fastkd cache`
        return _import_locked(dataset, out_dir, config, overwrite, dtype, vocab_size, top_k,
                              progress)


def _import_locked(dataset, out_dir, config, overwrite, dtype, vocab_size, top_k, progress):
    from fastkd import __version__
    from fastkd.cache.shards import (_finalize, _labels_to_storage, _record_or_check_shape,
                                     _ShardCutter, _ShardWriter)
    from fastkd.cache.writer import _now, _prepare_directory
    finished = _prepare_directory(out_dir, config, overwrite, 0, 1, None)
    if finished is not None:
        return finished
    if os.path.exists(os.path.join(out_dir, fmt.MANIFEST_NAME)):
        state = fmt.read_manifest(out_dir)
        problems = fmt.check_sizes(out_dir, fmt.manifest_files(state))
        if problems:
            raise fmt.CacheError(f"cannot resume {out_dir}: {'; '.join(problems)}; pass "
                                 f"--overwrite to start again")
    else:
        state = dict(config, format=fmt.FORMAT_NAME, fastkd_version=__version__, created=_now(), status="incomplete", rank=0,
                     sample_range=[0, len(dataset)], num_classes=None, rows_per_sample=None,
                     labels_per=None, rows_per_shard=None, shards=[])
    for name in os.listdir(out_dir):  # leftovers of a killed run (fastkd's own temp files)
        if fmt.is_temp_file(name):
            os.remove(os.path.join(out_dir, name))
    last = state["shards"][-1] if state["shards"] else None
    resume_at = last["sample_stop"] if last else 0
    arrays_spec = fmt.row_arrays("topk", dtype, vocab_size, top_k, num_temperatures=1)
    from tqdm.auto import tqdm
    writer = _ShardWriter(out_dir, state, fmt.MANIFEST_NAME)
    cutter = _ShardCutter(writer.put, state, 0, next_index=len(state["shards"]),
                          sample_start=resume_at, row_start=last["row_stop"] if last else 0)
    bar = tqdm(total=len(dataset), initial=resume_at, unit="sample", disable=not progress,
               desc="fastkd import", dynamic_ncols=True)
    try:
        for start in range(resume_at, len(dataset), IMPORT_BATCH):
            samples = [dataset.rows(i) for i in range(start, min(start + IMPORT_BATCH,
                                                                 len(dataset)))]
            values = np.concatenate([sample["values"] for sample in samples])
            arrays = {
                "values": _storage(torch.from_numpy(values), dtype),
                "indices": np.concatenate([s["indices"] for s in samples]).astype(
                    arrays_spec["indices"][0]),
                # values are log-probs: the log-sum-exp of every row is 0 (at T = 1)
                "lse": np.zeros((len(values),) + arrays_spec["lse"][1], arrays_spec["lse"][0]),
            }
            batch = {"arrays": arrays,
                     "lengths": np.array([len(s["input_ids"]) for s in samples], np.int64),
                     "labels": _labels_to_storage(torch.cat([s["labels"] for s in samples])),
                     "variable": True, "num_classes": vocab_size}
            _record_or_check_shape(state, batch)
            cutter.add(batch["arrays"], batch["lengths"], batch["labels"],
                       np.zeros(len(values), np.int64))
            bar.update(len(samples))
        cutter.finish()
    finally:
        bar.close()
        writer.close()
    return _finalize(out_dir, 1, len(dataset))


def _storage(values: torch.Tensor, dtype: str) -> np.ndarray:
    from fastkd.cache.writer import _to_storage
    return _to_storage(values, dtype)


# ----------------------------------------------------------------------------- sample responses
def vllm_style_response(model, token_ids: Sequence[int], top_k: int,
                        model_name: str = "local", request_id: Optional[str] = None) -> dict:
    """What a vLLM server returns for ``prompt=token_ids`` with ``max_tokens=1``,
    ``prompt_logprobs=top_k``, ``logprobs=top_k``, ``return_tokens_as_token_ids=true``,
    ``return_token_ids=true`` and greedy sampling, computed with a local causal LM ``model``
    (its ``logits`` output). Used to make the sample file and the round-trip tests; decoded
    tokens are ``"token_id:<id>"`` as with ``return_tokens_as_token_ids``."""
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    with torch.no_grad():
        output = model(ids[None])
        logits = (output.logits if hasattr(output, "logits") else output)[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    ranks = (logprobs[:, None, :] > logprobs[:, :, None]).sum(-1) + 1  # (n, V) rank of each id

    def top(position: int, extra: Optional[int]):
        values, indices = logprobs[position].topk(top_k)
        chosen = [(int(i), float(v)) for v, i in zip(values, indices)]
        if extra is not None and extra not in {i for i, _ in chosen}:
            chosen.append((extra, float(logprobs[position, extra])))
        return chosen, ranks[position]

    prompt_logprobs = [None]
    for j in range(1, len(ids)):
        chosen, rank = top(j - 1, int(ids[j]))
        prompt_logprobs.append({str(i): {"logprob": v, "rank": int(rank[i]),
                                         "decoded_token": f"token_id:{i}"} for i, v in chosen})
    chosen, _ = top(len(ids) - 1, None)
    generated = chosen[0][0]
    top_logprobs = {f"token_id:{i}": v for i, v in chosen}
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
