"""Dataset items going into the teacher and teacher outputs coming out of it, for the cache
writer: splitting an item into input and label, grouping a batch by input shape (integer labels
only, PIL images refused), calling the teacher (a failure names teacher, dataset and batch) and
picking the tensor to cache from a structured output (``--output-key``)."""
from collections.abc import Mapping
from typing import Callable

import torch


class TeacherError(RuntimeError):
    """The teacher failed on a batch (usually: teacher and dataset do not fit together)."""


class DatasetError(RuntimeError):
    """The user's dataset raised while its items were read."""


def error_line(error: Exception) -> str:
    """``"TypeName: first line of the message"`` (at most 300 characters of it). An error that a
    DataLoader worker re-raises carries the worker's traceback: its last line is the original
    ``"TypeName: message"``."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if len(lines) > 1 and "Original Traceback" in lines[1]:
        return lines[-1].strip()[:300]
    return type(error).__name__ + (f": {lines[0][:300]}" if lines else "")


def dataset_failed(name, where: str, error: Exception) -> DatasetError:
    """A :class:`DatasetError` saying which dataset raised what, reading ``where``."""
    return DatasetError(f"dataset {name} raised {error_line(error)} reading {where}")


def default_output_fn(output) -> torch.Tensor:
    """The teacher's logits: the tensor itself, ``output.logits`` / ``output["logits"]``, or the
    first tuple element."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if "logits" in output:
            return output["logits"]
        raise TypeError(f"teacher returned a {type(output).__name__} with keys "
                        f"{list(output.keys())}; pick the tensor to cache with --output-key KEY "
                        f"(output_fn= in Python)")
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"teacher returned {type(output).__name__}; pick the tensor to cache with "
                    f"--output-key KEY (output_fn= in Python)")


def output_key_fn(key: str) -> Callable:
    """``output_fn`` picking ``output[key]`` (dict, ``ModelOutput``), ``output.key``, or
    ``output[int(key)]`` of a tuple (what ``--output-key`` passes)."""
    def pick(output):
        if isinstance(output, Mapping):
            if key in output:
                return output[key]
            raise ValueError(f"--output-key {key!r}: the teacher's output has keys "
                             f"{list(output.keys())}")
        if isinstance(output, (tuple, list)) and key.lstrip("-").isdigit():
            if -len(output) <= int(key) < len(output):
                return output[int(key)]
            raise ValueError(f"--output-key {key}: the teacher returned {len(output)} outputs")
        if hasattr(output, key):
            return getattr(output, key)
        raise ValueError(f"--output-key {key!r}: the teacher returned "
                         f"{type(output).__name__}, which has no {key!r}")
    return pick


# ----------------------------------------------------------------------------- loading
def split_item(item):
    """``(model input, label or None)`` of a dataset item: input, (input, label, ...) or dict."""
    if isinstance(item, dict):
        label = item.get("labels", item.get("label"))
        return {key: value for key, value in item.items() if key not in ("labels", "label")}, label
    if isinstance(item, (tuple, list)):
        return item[0], (item[1] if len(item) > 1 else None)
    return item, None


def _shape_key(model_input):
    if isinstance(model_input, torch.Tensor):
        return tuple(model_input.shape)
    if isinstance(model_input, dict):
        return tuple((key, tuple(torch.as_tensor(value).shape))
                     for key, value in sorted(model_input.items()))
    return tuple(torch.as_tensor(model_input).shape)


class BatchProblem:
    """What is wrong with a batch's items, returned (not raised) by :func:`collate_groups` so
    that the main process reports it in one sentence even from a ``DataLoader`` worker;
    ``{sample}`` in ``message`` stands for the dataset index of the item at ``position``."""

    def __init__(self, message: str, position: int):
        self.message, self.position = message, position

    def error(self, batch_start: int) -> ValueError:
        return ValueError(self.message.replace("{sample}", str(batch_start + self.position)))


def _is_pil_image(value) -> bool:
    return any(base.__module__.startswith("PIL.") and base.__name__ == "Image"
               for base in type(value).__mro__)


def _integer_labels(label) -> torch.Tensor:
    """A label as a flat int64 tensor; ValueError/TypeError for anything but integer values."""
    if isinstance(label, torch.Tensor) and label.dtype == torch.int64:   # the common case
        return label.reshape(-1)
    labels = torch.as_tensor(label).reshape(-1)
    if labels.is_floating_point():
        bad = ~torch.isfinite(labels) | (labels != labels.round())
        if bool(bad.any()):
            raise ValueError(f"label {labels[bad][0].item():g} is not an integer class id")
    elif labels.is_complex():
        raise TypeError(f"labels must be integer class ids, got {labels.dtype}")
    return labels.long()


def _collate_uniform(items):
    """The common batch in one pass: ``(tensor, int64 tensor label, ...)`` items whose inputs
    share one shape, as :func:`collate_groups` would collate them; None for any other batch."""
    inputs, labels, shape = [], [], None
    for item in items:
        if type(item) not in (tuple, list) or len(item) < 2:
            return None
        model_input, label = item[0], item[1]
        if type(model_input) is not torch.Tensor or type(label) is not torch.Tensor or \
                label.dtype != torch.int64 or (shape is not None and model_input.shape != shape):
            return None
        shape = model_input.shape
        inputs.append(model_input)
        labels.append(label.reshape(-1))
    return [(list(range(len(items))), torch.stack(inputs), labels)] if inputs else None


def collate_groups(items):
    """Collate a batch into groups of equal input shape (variable-length items run unpadded,
    so every sample's teacher output is exact): ``[(positions, inputs, labels or None)]``, or a
    :class:`BatchProblem` naming the first unusable item."""
    uniform = _collate_uniform(items)
    if uniform is not None:
        return uniform
    groups = {}
    for position, item in enumerate(items):
        model_input, label = split_item(item)
        if not isinstance(model_input, torch.Tensor) and _is_pil_image(model_input):
            return BatchProblem(
                "dataset item {sample} is a PIL image; give the dataset a transform that turns "
                "images into tensors (e.g. torchvision.transforms.ToTensor())", position)
        if label is not None:
            try:
                label = _integer_labels(label)
            except (TypeError, ValueError, RuntimeError) as error:
                return BatchProblem(f"dataset item {{sample}} has a bad label: {error}; labels "
                                    f"must be integer class ids", position)
        try:
            key = _shape_key(model_input)
        except (TypeError, ValueError, RuntimeError) as error:
            return BatchProblem(f"dataset item {{sample}}: cannot make a tensor of its input "
                                f"({type(model_input).__name__}: {error})", position)
        groups.setdefault(key, []).append((position, model_input, label))
    collated = []
    for members in groups.values():
        positions, inputs, labels = map(list, zip(*members))
        if isinstance(inputs[0], dict):
            stacked = {key: torch.stack([torch.as_tensor(x[key]) for x in inputs])
                       for key in inputs[0]}
        else:
            stacked = torch.stack([torch.as_tensor(x) for x in inputs])
        if any(label is None for label in labels):
            labels = None
        collated.append((positions, stacked, labels))
    return collated


def call_teacher(teacher, inputs, device, names, first_sample, batch_len):
    """``teacher(inputs)``; a failure becomes a :class:`TeacherError` naming the teacher, the
    dataset and the batch (almost always: the two do not fit together)."""
    try:
        if isinstance(inputs, dict):
            return teacher(**{key: value.to(device, non_blocking=True)
                              for key, value in inputs.items()})
        return teacher(inputs.to(device, non_blocking=True))
    except Exception as error:
        shapes = ({key: tuple(value.shape) for key, value in inputs.items()}
                  if isinstance(inputs, dict) else tuple(inputs.shape))
        dtype = next(iter(inputs.values())).dtype if isinstance(inputs, dict) else inputs.dtype
        raise TeacherError(
            f"teacher {names[0]} failed on dataset {names[1]}, batch of samples "
            f"{first_sample}..{first_sample + batch_len - 1} (inputs {shapes} {dtype}): "
            f"{error_line(error)}. {_token_mismatch(teacher, inputs)}Check that the teacher "
            f"and the dataset belong together (input shape, dtype, keyword names)") from error


def _token_mismatch(teacher, inputs) -> str:
    """For token inputs and a teacher with a ``transformers`` config: a sentence naming a token
    id beyond the teacher's vocabulary or a row longer than its positions, the usual causes of
    an embedding's bare "index out of range"; else ""."""
    config = getattr(teacher, "config", None)
    ids = inputs.get("input_ids") if isinstance(inputs, dict) else None
    if config is None or not isinstance(ids, torch.Tensor) or ids.numel() == 0:
        return ""
    vocab = getattr(config, "vocab_size", None)
    positions = next((getattr(config, name) for name in ("max_position_embeddings",
                                                         "n_positions")
                      if isinstance(getattr(config, name, None), int)), None)
    if isinstance(vocab, int) and int(ids.max()) >= vocab:
        return (f"Token id {int(ids.max())} is beyond the teacher's vocabulary of {vocab}: the "
                f"data was tokenized for another model. ")
    if positions is not None and ids.shape[-1] > positions:
        return (f"Rows of {ids.shape[-1]} tokens exceed the teacher's {positions} positions: "
                f"pass --max-length {positions} (or less). ")
    return ""
