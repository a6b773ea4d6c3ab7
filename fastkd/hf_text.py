"""Text and chat rows -> HF token rows ``{"input_ids", "labels"}`` (labels unshifted, ``-100``
where nothing is learned), with a local Hugging Face tokenizer (``pip install 'fastkd[hf]'``).

- ``text``: every token is learned.
- ``prompt`` + ``completion``: the prompt with the tokenizer's special tokens, the completion
  after it without them; only the completion is learned, as in TRL's SFT.
- ``messages``: rendered with the chat template; only assistant turns are learned, each located
  between the renderings up to it (with the generation prompt) and through it.

``text`` and ``completion`` end with the EOS token when the tokenizer has one.
"""
import os
from typing import List, Tuple

from fastkd.extras import require

__all__ = ["TextTokenizer", "TEXT_FIELDS", "IGNORE_INDEX"]

TEXT_FIELDS = ("text", "prompt", "completion", "messages")
IGNORE_INDEX = -100
# files that hold a tokenizer's vocabulary (transformers' fast, sentencepiece and BPE formats)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


class TextTokenizer:
    """Text, prompt/completion and chat rows -> token rows, with a ``transformers`` fast
    tokenizer (chat rows need its ``chat_template`` and character offsets)."""

    def __init__(self, tokenizer, *, name: str = "tokenizer"):
        self.tokenizer, self.name = tokenizer, name

    @classmethod
    def from_dir(cls, path) -> "TextTokenizer":
        """``AutoTokenizer.from_pretrained(path, local_files_only=True)``, running no code."""
        path = os.fspath(path)
        transformers = require("transformers", "hf", f"--tokenizer {path}")
        if not os.path.isdir(path):
            raise ValueError(f"--tokenizer {path}: no such local directory (fastkd never "
                             f"downloads; pass the directory holding tokenizer.json)")
        if not any(name in TOKENIZER_FILES or name.endswith(".tiktoken")
                   for name in os.listdir(path)):
            raise ValueError(f"tokenizer {path}: the directory holds no tokenizer files "
                             f"({', '.join(TOKENIZER_FILES)}); pass --tokenizer DIR with the "
                             f"teacher's tokenizer")
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                path, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError, KeyError, TypeError) as error:
            lines = (str(error).strip() or type(error).__name__).splitlines()
            first = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
            raise ValueError(f"tokenizer {path}: cannot load a tokenizer from it with local "
                             f"files only ({first})") from None
        if getattr(tokenizer, "vocab_size", 1) == 0:   # built from a config, without its files
            raise ValueError(f"tokenizer {path}: the tokenizer it loads has an empty vocabulary; "
                             f"pass --tokenizer DIR with the teacher's tokenizer files")
        return cls(tokenizer, name=path)

    def __repr__(self) -> str:
        return f"TextTokenizer({self.name!r})"

    def __call__(self, row: dict, where: str) -> dict:
        """A text, prompt/completion or chat row -> ``{"input_ids", "labels"}`` (HF labels)."""
        if "messages" in row:
            ids, labels = self._chat(row["messages"], where)
        elif "prompt" in row or "completion" in row:
            prompt = _string(row, "prompt", where)
            completion = _string(row, "completion", where)
            prompt_ids = self._encode(prompt, special=True)
            completion_ids = self._with_eos(self._encode(completion, special=False))
            ids = prompt_ids + completion_ids
            labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
        elif "text" in row:
            ids = self._with_eos(self._encode(_string(row, "text", where), special=True))
            labels = list(ids)
        else:
            raise ValueError(f"{where}: expected 'input_ids', 'text', 'prompt' and "
                             f"'completion', or 'messages'; got {sorted(row)}")
        if not ids:
            raise ValueError(f"{where}: the row tokenizes to no tokens")
        return {"input_ids": ids, "labels": labels}

    def _encode(self, text: str, *, special: bool) -> List[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _with_eos(self, ids: List[int]) -> List[int]:
        eos = self.tokenizer.eos_token_id
        return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids

    def _render(self, messages, where: str, *, generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as error:   # jinja2 raises its own types for a template's errors
            raise ValueError(f"{where}: the chat template of {self.name} cannot render these "
                             f"messages ({type(error).__name__}: {error})") from None

    def _chat(self, messages, where: str) -> Tuple[List[int], List[int]]:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(f"{where}: 'messages' needs a tokenizer with a chat template; "
                             f"{self.name} has none")
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages)):
            raise ValueError(f"{where}: 'messages' must be a non-empty list of "
                             f"{{'role': str, 'content': str}}")
        text = self._render(messages, where)
        spans = []   # character spans of the assistant turns in the rendered chat
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:turn], where, generation_prompt=True)
            through = self._render(messages[:turn + 1], where)
            if not (through.startswith(before) and text.startswith(through)):
                raise ValueError(f"{where}: the chat template of {self.name} does not render "
                                 f"the conversation up to turn {turn} as a prefix of the "
                                 f"whole, so the assistant tokens cannot be located")
            spans.append((len(before), len(through)))
        if not spans:
            raise ValueError(f"{where}: 'messages' has no assistant turn to learn")
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        labels = [token if any(start < token_end and token_start < end
                               for start, end in spans) and token_end > token_start
                  else IGNORE_INDEX
                  for token, (token_start, token_end) in zip(ids, encoded["offset_mapping"])]
        return ids, labels


def _string(row: dict, field: str, where: str) -> str:
    value = row.get(field)
    if not isinstance(value, str):
        raise ValueError(f"{where}: '{field}' must be a string, got "
                         f"{type(value).__name__ if field in row else 'nothing'}")
    return value
