"""One line of a ``fastkd import --from vllm`` file: a vLLM completions response (request
``max_tokens=1, prompt_logprobs=K, logprobs=K, return_tokens_as_token_ids, return_token_ids``),
checked against what vLLM guarantees, and the top-K rows it gives.

Per choice: ``prompt_token_ids`` (``n`` ids); ``prompt_logprobs``, ``n`` entries, the first
null, entry ``j`` keyed by decimal ids and holding the top-K plus prompt token ``j`` (K or K + 1
items); ``logprobs.top_logprobs[0]``, the position after the prompt, keyed ``"token_id:<id>"``
(decoded-text keys are refused, as are ``echo=true`` responses). ``-9999.0`` reads as ``-inf``.
Every error is a :class:`ResponseError` starting with ``file:line``.
"""
import json
import re
from typing import List, Optional, Tuple

import numpy as np

LOGPROB_SLACK = 1e-3  # a log-prob above this, or top-K mass above 1 + this, is refused
VLLM_NEG_INF = -9999.0  # how vLLM serializes a log-prob of -inf
MAX_ID_DIGITS = 12  # longer decimal ids are out of any vocabulary (and int() of them is slow)
PROMPT_KEY = re.compile(r"0|[1-9][0-9]*")
GENERATED_KEY = re.compile(r"token_id:(0|[1-9][0-9]*)")


class ResponseError(ValueError):
    """A response line that cannot be imported (message starts with ``file:line``)."""


def _describe(value) -> str:
    """A short description of a JSON value (never ``str`` of a nested one: recursion limit)."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return repr(value[:40])
    return repr(value)[:40]


class DuplicateKey(Exception):
    """A JSON object with a key twice (``args[0]``: the key)."""


def _unique_keys(pairs) -> dict:
    """``json.loads``' object hook: the object, or DuplicateKey for a key given twice."""
    result = dict(pairs)
    if len(result) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return result


def load_line(raw: bytes, where: str) -> dict:
    """One raw JSONL line -> the response object."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ResponseError(f"{where}: not UTF-8 text (byte 0x{raw[error.start]:02x} at byte "
                            f"{error.start + 1} of the line); vLLM writes UTF-8 JSON") from None
    try:
        response = json.loads(text, object_pairs_hook=_unique_keys)
    except DuplicateKey as error:
        raise ResponseError(f"{where}: key {_describe(error.args[0])} appears twice in one "
                            f"object; JSON readers keep one of the two values, so the line is "
                            f"ambiguous (vLLM writes each key once)") from None
    except RecursionError:
        raise ResponseError(f"{where}: JSON nested too deeply to read; a completions response "
                            f"is a few levels deep") from None
    except ValueError as error:  # JSONDecodeError, and integers too long to convert
        raise ResponseError(f"{where}: not valid JSON ({error})") from None
    if not isinstance(response, dict):
        raise ResponseError(f"{where}: expected a JSON object (a completions response), got "
                            f"{_describe(response)}")
    return response


def _token_id(key: str, pattern, where: str, vocab_size: int, hint: str) -> int:
    match = pattern.fullmatch(key) if isinstance(key, str) else None
    if match is None:
        raise ResponseError(f"{where}: key {_describe(key)} is not a token id ({hint})")
    digits = match.group(match.lastindex or 0)
    token = int(digits) if len(digits) <= MAX_ID_DIGITS else vocab_size
    if token >= vocab_size:
        raise ResponseError(f"{where}: token id {digits} outside [0, {vocab_size}) "
                            f"(--vocab-size {vocab_size})")
    return token


PROMPT_HINT = "prompt_logprobs are keyed by decimal token ids"
GENERATED_HINT = ("vLLM writes 'token_id:<id>' keys only when the request sets "
                  "return_tokens_as_token_ids=true; without it the keys are decoded text, even "
                  "when they read as numbers: request with return_tokens_as_token_ids=true")


def _logprob(value, where: str) -> Tuple[float, Optional[int]]:
    """``{"logprob", "rank", ...}`` or a bare number -> ``(log-prob, rank or None)``."""
    rank = None
    if isinstance(value, dict):
        rank = value.get("rank")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            rank = None
        value = value.get("logprob")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ResponseError(f"{where}: expected a number or {{\"logprob\": number, ...}}, got "
                            f"{_describe(value)}")
    try:
        value = float(value)
    except OverflowError:   # an integer beyond float's range
        raise ResponseError(f"{where}: log-prob {_describe(value)}... is beyond a float's "
                            f"range") from None
    if np.isnan(value) or value > LOGPROB_SLACK:
        raise ResponseError(f"{where}: log-prob {value} is not a log-probability (must be <= 0)")
    return (-np.inf if value == VLLM_NEG_INF else value), rank


def _entry(entries, where: str, pattern, vocab_size: int, hint: str):
    """An object ``{key: log-prob}`` -> ``{token id: (log-prob, rank or None)}``."""
    if not isinstance(entries, dict):
        raise ResponseError(f"{where}: expected an object of token id -> log-prob, got "
                            f"{_describe(entries)}")
    return {_token_id(key, pattern, where, vocab_size, hint): _logprob(value,
                                                                        f"{where}[{key!r}]")
            for key, value in entries.items()}


def _top_k(parsed: dict, where: str, top_k: int, what: str):
    """The K largest ``(values (K,) float32, ids (K,) int64)`` of a parsed entry."""
    if len(parsed) < top_k:
        raise ResponseError(f"{where}: {len(parsed)} log-probs, fewer than --top-k {top_k} "
                            f"(request {what} >= {top_k})")
    pairs = sorted(((value, token) for token, (value, _) in parsed.items()),
                   key=lambda pair: -pair[0])[:top_k]
    values = np.array([value for value, _ in pairs], np.float32)
    ids = np.array([token for _, token in pairs], np.int64)
    if float(np.exp(values.astype(np.float64)).sum()) > 1 + LOGPROB_SLACK:
        raise ResponseError(f"{where}: top-{top_k} probabilities sum to more than 1")
    return values, ids


def _least_likely(parsed: dict, token: int) -> bool:
    """Whether no other item of a parsed entry is less likely than ``token``."""
    value = parsed[token][0]
    return all(value <= other for key, (other, _) in parsed.items() if key != token)


def _requested_k(parsed: dict, token: int) -> set:
    """The request's K values an entry of the top-K plus ``token`` fits: its size when the token
    ranks within it, size - 1 when the token may be the extra item (no other is less likely)."""
    size = len(parsed)
    value, rank = parsed[token]
    if rank is None:  # no rank written: its rank among the items
        rank = 1 + sum(other > value for other, _ in parsed.values())
    fits = {size} if rank <= size else set()
    if _least_likely(parsed, token):
        fits.add(size - 1)
    return fits


def _generated_token(choice: dict, logprobs: dict) -> Optional[int]:
    """The generated token: ``token_ids[0]`` (return_token_ids), else ``logprobs.tokens[0]``."""
    generated = choice.get("token_ids")
    if isinstance(generated, list) and generated and isinstance(generated[0], int):
        return generated[0]
    tokens = logprobs.get("tokens")
    if isinstance(tokens, list) and tokens and isinstance(tokens[0], str):
        match = GENERATED_KEY.fullmatch(tokens[0])
        if match and len(match.group(1)) <= MAX_ID_DIGITS:
            return int(match.group(1))
    return None


def read_choices(response: dict, where: str, *, top_k: int, vocab_size: int) -> List[dict]:
    """The structure checks that need no log-prob value: per choice ``{"token_ids" (list of
    ints), "prompt" (the prompt_logprobs list), "generated" (its top_logprobs[0] object),
    "generated_token" (int or None), "at" (where, for messages)}``."""
    choices = response.get("choices")
    if choices is None:
        raise ResponseError(f"{where}: missing 'choices' (not a completions response)")
    if not isinstance(choices, list) or not choices:
        raise ResponseError(f"{where}: 'choices' must be a non-empty list")
    out = []
    for number, choice in enumerate(choices):
        at = f"{where}: choices[{number}]"
        if not isinstance(choice, dict):
            raise ResponseError(f"{at}: expected an object, got {_describe(choice)}")
        token_ids = choice.get("prompt_token_ids", response.get("prompt_token_ids"))
        if token_ids is None:
            raise ResponseError(f"{at}: missing 'prompt_token_ids' (request with "
                                f"return_token_ids=true)")
        if not isinstance(token_ids, list) or not token_ids or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in token_ids):
            raise ResponseError(f"{at}: 'prompt_token_ids' must be a non-empty list of ints")
        for token in token_ids:
            if not 0 <= token < vocab_size:
                raise ResponseError(f"{at}: prompt token id {_describe(token)} outside "
                                    f"[0, {vocab_size}) (--vocab-size {vocab_size})")
        prompt = choice.get("prompt_logprobs", response.get("prompt_logprobs"))
        if prompt is None:
            raise ResponseError(f"{at}: missing 'prompt_logprobs' (request with "
                                f"prompt_logprobs={top_k})")
        if not isinstance(prompt, list) or len(prompt) != len(token_ids):
            raise ResponseError(f"{at}: 'prompt_logprobs' must be a list with one entry per "
                                f"prompt token ({len(token_ids)}), got {_describe(prompt)}" +
                                (f" of {len(prompt)}" if isinstance(prompt, list) else ""))
        if prompt[0] is not None:
            raise ResponseError(f"{at}: 'prompt_logprobs[0]' must be null (vLLM writes null "
                                f"for the first prompt token, which has no context), got "
                                f"{_describe(prompt[0])}")
        for j in range(1, len(prompt)):
            entry = prompt[j]
            if not isinstance(entry, dict):
                raise ResponseError(f"{at}.prompt_logprobs[{j}]: expected an object of token "
                                    f"id -> log-prob, got {_describe(entry)}")
            if str(token_ids[j]) not in entry:
                raise ResponseError(f"{at}.prompt_logprobs[{j}]: does not hold prompt token "
                                    f"{token_ids[j]} (prompt_token_ids[{j}]); vLLM's entry j "
                                    f"always holds it, so these log-probs are not of this "
                                    f"prompt")
        logprobs = choice.get("logprobs")
        top = logprobs.get("top_logprobs") if isinstance(logprobs, dict) else None
        generated = choice.get("token_ids")
        if isinstance(top, list) and top and (top[0] is None or (
                isinstance(generated, list) and len(top) == len(token_ids) + len(generated))):
            raise ResponseError(f"{at}: 'logprobs' covers the prompt as well, as vLLM writes "
                                f"for echo=true; request with echo=false (the prompt's "
                                f"log-probs come from prompt_logprobs)")
        if not isinstance(top, list) or not top or not isinstance(top[0], dict):
            raise ResponseError(
                f"{at}: missing 'logprobs.top_logprobs[0]', the distribution after the "
                f"last prompt token (request with max_tokens=1, logprobs={top_k}, "
                f"return_tokens_as_token_ids=true)")
        for key in top[0]:  # the key form decides whether the keys are ids at all
            _token_id(key, GENERATED_KEY, f"{at}.logprobs.top_logprobs[0]", vocab_size,
                      GENERATED_HINT)
        out.append({"token_ids": token_ids, "prompt": prompt, "generated": top[0],
                    "generated_token": _generated_token(choice, logprobs), "at": at})
    return out


def choice_rows(choice: dict, *, top_k: int, vocab_size: int):
    """A choice of :func:`read_choices` -> its ``n`` rows ``(values (n, K) float32, ids (n, K)
    int64)``: rows ``0 .. n-2`` from ``prompt_logprobs[1:]``, row ``n-1`` from the generated
    position."""
    at, token_ids, prompt = choice["at"], choice["token_ids"], choice["prompt"]
    rows, fits, fits_at = [], None, None
    for j in range(1, len(prompt)):
        where = f"{at}.prompt_logprobs[{j}]"
        parsed = _entry(prompt[j], where, PROMPT_KEY, vocab_size, PROMPT_HINT)
        here = _requested_k(parsed, token_ids[j])
        if fits is not None and not fits & here:
            def ks(values):
                return " or ".join(map(str, sorted(values)))
            fitted = f"a request of K = {ks(here)}" if here else \
                "no request (the prompt token ranks outside them)"
            raise ResponseError(
                f"{where}: its {len(parsed)} items and the prompt token's rank fit {fitted}, "
                f"but the entries before it fit K = {ks(fits)} (from entry {fits_at} on): "
                f"vLLM writes the top-K plus the prompt token (K or K + 1 items, "
                f"the same K for every entry), so one of them is not what vLLM wrote")
        fits, fits_at = (here if fits is None else fits & here), (fits_at or j)
        if parsed[token_ids[j]][1] is None and 1 < len(parsed) <= top_k and \
                _least_likely(parsed, token_ids[j]):
            # without vLLM's rank the least likely item may be the prompt token from far
            # outside the top-K: only len - 1 items are then known to be the top
            raise ResponseError(
                f"{where}: the prompt token {token_ids[j]} is the least likely of the "
                f"{len(parsed)} items and the entry gives no 'rank', so they may be the "
                f"top-{len(parsed) - 1} plus the prompt token, fewer than --top-k {top_k}: "
                f"import vLLM's {{\"logprob\", \"rank\"}} objects, or use --top-k "
                f"{len(parsed) - 1}")
        rows.append(_top_k(parsed, where, top_k, "prompt_logprobs"))
    if fits is not None and max(fits) < top_k:
        raise ResponseError(f"{at}: prompt_logprobs holds the top-{max(fits)} plus the prompt "
                            f"token, fewer than --top-k {top_k} (request prompt_logprobs >= "
                            f"{top_k})")
    where = f"{at}.logprobs.top_logprobs[0]"
    parsed = _entry(choice["generated"], where, GENERATED_KEY, vocab_size, GENERATED_HINT)
    token = choice["generated_token"]
    if token is not None:
        if token not in parsed:
            raise ResponseError(f"{where}: does not hold the generated token "
                                f"{_describe(token)}; vLLM always lists it, so these log-probs "
                                f"are not of this choice")
        if len(parsed) == top_k > 1 and all(parsed[token][0] < value for key, (value, _)
                                             in parsed.items() if key != token):
            raise ResponseError(
                f"{where}: the generated token {token} is the least likely of exactly "
                f"--top-k {top_k} items, so it may be the extra item after a top-{top_k - 1}; "
                f"request with temperature=0 and logprobs >= --top-k, or import with --top-k "
                f"{top_k - 1}")
    rows.append(_top_k(parsed, where, top_k, "logprobs"))
    return (np.stack([values for values, _ in rows]),
            np.stack([indices for _, indices in rows]))


def response_model(response: dict, where: str) -> str:
    """The ``model`` that served a response (one import takes one teacher's responses)."""
    model = response.get("model")
    if not isinstance(model, str) or not model:
        raise ResponseError(f"{where}: missing 'model' (vLLM names the served model in every "
                            f"response)")
    return model
