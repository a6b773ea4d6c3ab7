"""Small models and data for ``fastkd demo``, the examples and the method tests: scikit-learn's
bundled 8x8 digits (no download) with a teacher and a student CNN, a CIFAR-shaped student, a tiny
causal LM and :func:`load_checkpoint`. ``fastkd cache`` builds them by spec string
(``fastkd.models:DigitsTeacherCNN``).
"""
from functools import lru_cache
from typing import Tuple

import numpy as np
import torch
from torch import nn

from fastkd.extras import require

__all__ = [
    "digits_dataset", "digits_split", "digits_train_dataset", "digits_held_out_dataset",
    "DigitsTeacherCNN", "DigitsStudentCNN", "CifarStudentCNN", "TinyCausalLM", "load_checkpoint",
]

DIGITS_SPLIT_SEED = 0
DIGITS_HELD_OUT_FRACTION = 0.25


@lru_cache(maxsize=1)
def _digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    digits = require("sklearn.datasets", "demo", "the digits data").load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8) in [0, 1]
    return images, digits.target.astype(np.int64)


def digits_dataset() -> torch.utils.data.TensorDataset:
    """All 1797 digits as ``(image (1, 8, 8) float32 in [0, 1], label int64)``, sklearn's order."""
    images, labels = _digits_arrays()
    return torch.utils.data.TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))


def digits_split(seed: int = DIGITS_SPLIT_SEED,
                 held_out_fraction: float = DIGITS_HELD_OUT_FRACTION
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """Fixed, class-stratified ``(train_indices, held_out_indices)`` into :func:`digits_dataset`."""
    train_test_split = require("sklearn.model_selection", "demo",
                               "the digits data").train_test_split
    _, labels = _digits_arrays()
    train, held_out = train_test_split(np.arange(len(labels)), test_size=held_out_fraction,
                                       random_state=seed, stratify=labels)
    return np.sort(train), np.sort(held_out)


def digits_train_dataset() -> torch.utils.data.Subset:
    """The training split (the distillation transfer set); what the demo caches."""
    return torch.utils.data.Subset(digits_dataset(), digits_split()[0].tolist())


def digits_held_out_dataset() -> torch.utils.data.Subset:
    """The held-out split every accuracy in the demo is measured on."""
    return torch.utils.data.Subset(digits_dataset(), digits_split()[1].tolist())


def _as_digit_images(inputs: torch.Tensor) -> torch.Tensor:
    """Accept ``(N, 64)`` or ``(N, 1, 8, 8)`` digit batches; return ``(N, 1, 8, 8)``."""
    if inputs.dim() < 2 or inputs[0].numel() != 64:
        raise ValueError(f"digit inputs must be (N, 64) or (N, 1, 8, 8), got {tuple(inputs.shape)}")
    return inputs.reshape(-1, 1, 8, 8)


class DigitsTeacherCNN(nn.Module):
    """Teacher for 8x8 digits, ``(N, 1, 8, 8) -> (N, 10)``: stages ``conv1``, ``conv2`` and
    ``conv3`` (``(N, 64, 4, 4)``), ``fc1``, ``fc2``."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.conv3 = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU())
        self.fc1 = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 96), nn.ReLU(),
                                 nn.Dropout(0.2))
        self.fc2 = nn.Linear(96, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.conv3(self.conv2(self.conv1(_as_digit_images(inputs))))
        return self.fc2(self.fc1(hidden))


class DigitsStudentCNN(nn.Module):
    """A tiny digits student: stages ``conv`` (``(N, channels, 4, 4)``) and ``fc``."""

    def __init__(self, num_classes: int = 10, channels: int = 4):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(channels * 4 * 4, num_classes))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(_as_digit_images(inputs)))


class CifarStudentCNN(nn.Module):
    """Small CNN for ``(N, 3, 32, 32)`` images: stages ``block1``, ``block2``, ``block3``
    (``(N, 128, 4, 4)``, pairing with resnet18's ``layer2`` for feature distillation), ``head``."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()

        def block(c_in, c_out):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2))

        self.block1 = block(3, width)
        self.block2 = block(width, 2 * width)
        self.block3 = block(2 * width, 4 * width)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(4 * width, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.block3(self.block2(self.block1(images))))


class TinyCausalLM(nn.Module):
    """A tiny pre-norm causal transformer: ``input_ids (B, L)`` -> logits ``(B, L, V)``; ``norm``
    is a feature layer. ``padding_mask`` (True at padding) is needed for left padding only."""

    def __init__(self, vocab_size: int, dim: int = 64, num_layers: int = 2, num_heads: int = 4,
                 max_len: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.positions = nn.Parameter(torch.zeros(max_len, dim))
        layer = nn.TransformerEncoderLayer(dim, num_heads, dim_feedforward=4 * dim, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)
        self.max_len = max_len

    def forward(self, input_ids: torch.Tensor, padding_mask: torch.Tensor = None) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len={self.max_len}")
        # bool, like `padding_mask` (PyTorch warns when the two masks' types differ)
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).triu(1)
        hidden = self.embed(input_ids) + self.positions[:length]
        hidden = self.blocks(hidden, mask=causal, src_key_padding_mask=padding_mask)
        return self.head(self.norm(hidden))


def load_checkpoint(model: nn.Module, path, *, skip_mismatched: bool = True) -> dict:
    """Warm-start ``model`` from a local state dict (or one under ``"state_dict"``/``"model"``),
    skipping entries of another shape when ``skip_mismatched`` (else ``ValueError``). Returns
    ``{"loaded", "skipped", "missing"}`` parameter-name lists."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} does not hold a state dict (got "
                         f"{type(state).__name__})")
    own = model.state_dict()
    loaded, skipped = {}, []
    for name, tensor in state.items():
        if name not in own:
            skipped.append(name)
        elif own[name].shape != tensor.shape:
            if not skip_mismatched:
                raise ValueError(f"checkpoint {path}: {name} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(own[name].shape)}")
            skipped.append(name)
        else:
            loaded[name] = tensor
    if not loaded:
        raise ValueError(f"checkpoint {path} shares no parameter names/shapes with "
                         f"{type(model).__name__}; is it the right checkpoint?")
    model.load_state_dict(loaded, strict=False)
    missing = [name for name in own if name not in loaded]
    return {"loaded": sorted(loaded), "skipped": skipped, "missing": missing}
