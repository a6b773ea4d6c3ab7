"""Hugging Face ``transformers`` integration (the only fastkd module that imports it; install
with ``pip install fastkd[hf]``).

- :func:`load_causal_lm`: a causal LM from a *local* directory (``fastkd cache --teacher
  hf:<dir>``); never downloads.

Token data and the batch layout (next-token rows, ``shift_labels``) live in
:mod:`fastkd.tokens`; see docs/llm-distillation.md.
"""
import os
from typing import Optional

import torch

try:
    import transformers
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("fastkd.hf needs the 'transformers' package: pip install 'fastkd[hf]'") \
        from error

__all__ = ["load_causal_lm", "MODEL_DTYPES"]

# --teacher-dtype choices -> torch dtype ("auto": the dtype saved in the checkpoint's config)
MODEL_DTYPES = {"auto": "auto", "fp32": torch.float32, "fp16": torch.float16,
                "bf16": torch.bfloat16}


def load_causal_lm(path, *, dtype: str = "auto", device=None):
    """``AutoModelForCausalLM.from_pretrained(path, local_files_only=True)`` in eval mode,
    with the KV cache off (caching runs whole sequences once).

    ``path`` must be a local directory holding ``config.json`` and the weights (e.g. written
    by ``save_pretrained`` or ``huggingface-cli download --local-dir``). A hub id such as
    ``gpt2`` is refused: fastkd never downloads. ``dtype``: ``auto`` (the checkpoint's),
    ``fp32``, ``fp16`` or ``bf16``.
    """
    path = os.fspath(path)
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"--teacher-dtype must be one of {sorted(MODEL_DTYPES)}, got {dtype!r}")
    if not os.path.isdir(path):
        raise ValueError(
            f"--teacher hf:{path}: no such local directory. fastkd never downloads models; if "
            f"{path!r} is a Hugging Face hub id, download it first (e.g. `huggingface-cli "
            f"download {path} --local-dir DIR`) and pass hf:DIR")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"--teacher hf:{path}: {os.path.abspath(path)} has no config.json; "
                         f"expected a directory written by save_pretrained")
    kwargs = {"local_files_only": True}
    # transformers >= 4.56 calls it `dtype`; older releases `torch_dtype`
    dtype_key = "dtype" if _version_at_least(4, 56) else "torch_dtype"
    kwargs[dtype_key] = MODEL_DTYPES[dtype]
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"--teacher hf:{path}: cannot load a causal LM from it with local "
                         f"files only ({str(error).strip().splitlines()[0]})") from None
    if getattr(model.config, "use_cache", None) is not None:
        model.config.use_cache = False
    if device is not None:
        model = model.to(device)
    return model.eval()


def _version_at_least(major: int, minor: int) -> bool:
    parts = transformers.__version__.split(".")
    try:
        return (int(parts[0]), int(parts[1])) >= (major, minor)
    except (ValueError, IndexError):
        return True


def vocab_size_of(model) -> int:
    """Width of the model's output layer (may exceed the tokenizer's vocabulary)."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)
