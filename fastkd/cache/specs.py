"""Teacher and dataset SPEC strings (``fastkd cache --help`` lists them), and the fingerprints
that tie a cache to both. Nothing is ever downloaded.
"""
import hashlib
import importlib
import inspect
import os
import sys
from typing import Optional

import numpy as np
import torch
from torch import nn

from fastkd.cache.files import not_a_file
from fastkd.cache.items import dataset_failed, error_line
from fastkd.extras import require
from fastkd.tokens import TOKEN_SOURCES, TokenDataset

FINGERPRINT_SAMPLES = 16
FINGERPRINT_SEED = 0


def _import_attr(spec: str, option: str):
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ValueError(f"{option} {spec!r}: expected 'package.module:attr'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ValueError(f"{option} {spec!r}: cannot import module {module_name!r} "
                         f"({error})") from None
    except Exception as error:   # the module itself raised (a syntax error, a failing import)
        raise ValueError(f"{option} {spec!r}: importing module {module_name!r} raised "
                         f"{error_line(error)}") from error
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise ValueError(f"{option} {spec!r}: module {module_name!r} has no attribute "
                             f"{attr_path!r}")
        target = getattr(target, part)
    return target


def _call_factory(factory, spec: str, option: str):
    """``factory()``; what it raises becomes a ValueError naming the option and the spec."""
    try:
        return factory()
    except Exception as error:
        raise ValueError(f"{option} {spec!r}: calling it raised {error_line(error)}") from error


def resolve_teacher(spec: str, checkpoint: Optional[str] = None, *,
                    teacher_dtype: str = "auto", progress: bool = True) -> nn.Module:
    """Build the teacher named by ``spec`` and load ``checkpoint`` (a state dict) into it.
    ``teacher_dtype`` applies to ``hf:`` teachers (``auto``/``fp32``/``fp16``/``bf16``), and
    ``progress`` to their loading bars."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"--teacher must be a non-empty SPEC string, got {spec!r}")
    if spec.startswith("hf:"):
        try:
            from fastkd.hf import load_causal_lm
        except ImportError as error:
            raise ValueError(f"--teacher {spec}: {error}") from None
        teacher = load_causal_lm(spec[len("hf:"):], dtype=teacher_dtype, progress=progress)
    elif spec.startswith("torchvision:"):
        torchvision = require("torchvision", "vision", f"--teacher {spec}")
        name = spec.split(":", 1)[1]
        if name not in torchvision.models.list_models():
            raise ValueError(f"--teacher {spec!r}: torchvision has no model {name!r}")
        teacher = torchvision.models.get_model(name, weights=None)
    else:
        target = _import_attr(spec, "--teacher")
        teacher = target if isinstance(target, nn.Module) else (
            _call_factory(target, spec, "--teacher") if callable(target) else target)
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"--teacher {spec!r}: expected an nn.Module or a callable returning "
                            f"one, got {type(teacher).__name__}")
    if checkpoint is not None:
        if not os.path.isfile(checkpoint):
            raise ValueError(f"--teacher-checkpoint {checkpoint}: {not_a_file(checkpoint)}")
        state = _load_state_dict(checkpoint)
        try:
            teacher.load_state_dict(state)
        except RuntimeError as error:
            # torch lists every missing / unexpected key and shape on lines of their own
            lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
            shown = "; ".join(line[:200] for line in lines[:3]) or error_line(error)
            more = f" (and {len(lines) - 3} more)" if len(lines) > 3 else ""
            raise ValueError(f"--teacher-checkpoint {checkpoint} does not fit {spec}: "
                             f"{shown}{more}") from None
    return teacher


def _load_state_dict(checkpoint: str) -> dict:
    """``torch.load(checkpoint, weights_only=True)``, refusing anything but a state dict with
    a sentence (a pickled whole model, a file that is not a checkpoint)."""
    import pickle
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "unsupported global" in str(error).lower():
            raise ValueError(f"--teacher-checkpoint {checkpoint} holds pickled Python objects, "
                             f"not just tensors (probably torch.save(model)); save "
                             f"model.state_dict() instead (fastkd never unpickles code)") from None
        raise ValueError(f"--teacher-checkpoint {checkpoint} is not a PyTorch checkpoint "
                         f"torch.load can read; pass a file written by "
                         f"torch.save(model.state_dict(), path)") from None
    except Exception as error:  # RuntimeError, EOFError, KeyError, ... from a foreign file
        raise ValueError(f"--teacher-checkpoint {checkpoint} is not a PyTorch checkpoint "
                         f"torch.load can read ({error_line(error)}); pass a file written by "
                         f"torch.save(model.state_dict(), path)") from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor)
                                              for value in state.values()):
        found = type(state).__name__ if not isinstance(state, dict) else \
            f"a dict with non-tensor entries ({', '.join(sorted(map(str, state))[:5])})"
        raise TypeError(f"--teacher-checkpoint {checkpoint}: expected a state dict (names -> "
                        f"tensors), got {found}; save model.state_dict() (or the state dict "
                        f"inside a training checkpoint) on its own")
    return state


def _torchvision_dataset(name: str, data_root: Optional[str], split: str):
    torchvision = require("torchvision", "vision", f"--dataset torchvision:{name}")
    ToTensor = require("torchvision.transforms", "vision", f"--dataset torchvision:{name}").ToTensor
    cls = getattr(torchvision.datasets, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, torch.utils.data.Dataset)):
        raise ValueError(f"--dataset torchvision:{name}: torchvision.datasets has no dataset "
                         f"class {name!r}")
    if data_root is None:
        raise ValueError(f"--dataset torchvision:{name} needs --data-root (the directory that "
                         f"holds the downloaded data; fastkd never downloads)")
    parameters = inspect.signature(cls).parameters
    kwargs = {"transform": ToTensor()}
    if "download" in parameters:
        kwargs["download"] = False
    if "train" in parameters:
        kwargs["train"] = split == "train"
    elif "split" in parameters:
        kwargs["split"] = split
    try:
        return cls(data_root, **kwargs)
    except (RuntimeError, FileNotFoundError, OSError) as error:
        raise FileNotFoundError(
            f"--dataset torchvision:{name}: not found under --data-root "
            f"{os.path.abspath(data_root)} ({error}); fastkd never downloads, place the data "
            f"there first") from None


def resolve_dataset(spec: str, data_root: Optional[str] = None, split: Optional[str] = None, *,
                    tokenizer=None, max_length: Optional[int] = None, explicit=()):
    """Build the map-style dataset named by ``spec``. ``data_root`` applies to torchvision
    datasets, ``split`` (default ``train``) to them and to ``hf-disk:`` data; ``tokenizer`` (a
    local directory) and ``max_length`` to token data (:class:`fastkd.tokens.TokenDataset`);
    ``explicit`` names the token options the user gave. A dataset refuses options that do not
    apply to it, rather than ignoring them."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"--dataset must be a non-empty SPEC string, got {spec!r}")
    kind = spec.partition(":")[0] if ":" in spec else spec
    if data_root is not None and kind != "torchvision":
        raise ValueError(f"--data-root applies to torchvision: datasets, not to --dataset {spec}")
    if split is not None and kind not in ("torchvision", "hf-disk"):
        raise ValueError(f"--data-split applies to torchvision: and hf-disk: datasets, not to "
                         f"--dataset {spec}")
    split = "train" if split is None else split
    if explicit and spec.partition(":")[0] not in TOKEN_SOURCES:
        raise ValueError(f"{' and '.join(explicit)} {'apply' if len(explicit) > 1 else 'applies'}"
                         f" to token data (jsonl:, parquet:, hf-disk:), not to --dataset {spec}")
    if spec == "digits":
        from fastkd.models import digits_dataset
        dataset = digits_dataset()
    elif spec.startswith("torchvision:"):
        dataset = _torchvision_dataset(spec.split(":", 1)[1], data_root, split)
    elif spec.partition(":")[0] in TOKEN_SOURCES:
        dataset = TokenDataset.from_spec(spec, split, tokenizer=tokenizer, max_length=max_length)
    else:
        target = _import_attr(spec, "--dataset")
        is_instance = hasattr(target, "__getitem__") and not inspect.isclass(target)
        dataset = target if is_instance or not callable(target) else \
            _call_factory(target, spec, "--dataset")
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise TypeError(f"--dataset {spec!r}: expected a map-style dataset (with __len__ and "
                        f"__getitem__) or a callable returning one, got {type(dataset).__name__}")
    return dataset


def teacher_fingerprint(teacher: nn.Module) -> str:
    """sha256 over the state dict: names, dtypes, shapes and bytes of every tensor."""
    digest = hashlib.sha256(type(teacher).__name__.encode())
    for name, tensor in teacher.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())   # hashed in place
    return digest.hexdigest()


def _feed(digest, value) -> None:
    """Hash an item's content: tensors, arrays, numbers, strings, images, nested containers."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous()
        digest.update(f"T{value.dtype}{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, np.ndarray):
        digest.update(f"A{value.dtype.str}{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, dict):
        for key in sorted(value):
            digest.update(f"K{key}".encode())
            _feed(digest, value[key])
    elif isinstance(value, (tuple, list)):
        digest.update(f"L{len(value)}".encode())
        for element in value:
            _feed(digest, element)
    elif isinstance(value, (bool, int, float, str, bytes, type(None), np.generic)):
        digest.update(repr(value).encode())
    elif hasattr(value, "__array__") or hasattr(value, "getdata"):  # e.g. PIL images
        _feed(digest, np.asarray(value))
    else:
        digest.update(type(value).__name__.encode())


def dataset_fingerprint(dataset, name: Optional[str] = None) -> dict:
    """``{"length", "sha256"}``: the length plus sha256 of a fixed, seeded sample of items.
    With ``name`` (the user's dataset spec), an item that raises becomes a
    :class:`fastkd.cache.items.DatasetError` naming the dataset and the item; fastkd's own
    datasets raise their own errors."""
    length = len(dataset)
    count = min(FINGERPRINT_SAMPLES, length)
    indices = sorted(np.random.default_rng(FINGERPRINT_SEED).choice(length, count, replace=False)
                     .tolist()) if length else []
    digest = hashlib.sha256(str(length).encode())
    for index in indices:
        digest.update(f"#{index}".encode())
        try:
            item = dataset[index]
        except Exception as error:
            if name is None:
                raise
            raise dataset_failed(name, f"sample {index}", error) from error
        _feed(digest, item)
    return {"length": length, "sha256": digest.hexdigest(), "sampled_indices": indices}


def fingerprint_hint(dataset, fingerprint: dict) -> str:
    """A sentence to add when ``dataset`` does not match a cached fingerprint and itself returns
    different items on each read (random transforms)."""
    try:
        again = dataset_fingerprint(dataset)["sha256"]
    except Exception:  # a dataset that fails now fails again in a clearer place
        return ""
    if again != fingerprint["sha256"]:
        return ("; the dataset returns different items each time they are read, so random "
                "transforms (augmentation) in it are the likely cause: cache the dataset "
                "without them and augment only the student's inputs")
    return ""
