"""A causal language model from a *local* directory, for ``fastkd cache --teacher hf:<dir>``
(re-exported as :func:`fastkd.hf.load_causal_lm`). Hub ids, non-causal models, unknown custom
code and weight files that are not plain weights are refused with one sentence each.
"""
import glob
import json
import os
import pickle

import torch
from packaging.version import Version

from fastkd.extras import require

transformers = require("transformers", "hf", "fastkd.hf")

__all__ = ["load_causal_lm", "MODEL_DTYPES", "transformers"]

# --teacher-dtype choices -> torch dtype ("auto": the dtype saved in the checkpoint's config)
MODEL_DTYPES = {"auto": "auto", "fp32": torch.float32, "fp16": torch.float16,
                "bf16": torch.bfloat16}


def load_causal_lm(path, *, dtype: str = "auto", device=None, trust_remote_code: bool = False,
                   progress: bool = True):
    """``AutoModelForCausalLM.from_pretrained(path, local_files_only=True)`` in eval mode with
    the KV cache off. ``dtype``: a :data:`MODEL_DTYPES` key. The model must be causal (its saved
    architecture, and a probe: earlier logits do not change with a later token). Code named in
    ``auto_map`` runs only with ``trust_remote_code=True``. ``progress=False`` hides
    transformers' loading bars."""
    path = os.fspath(path)
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"--teacher-dtype must be one of {sorted(MODEL_DTYPES)}, got {dtype!r}")
    if not path:
        raise ValueError("--teacher hf: needs the directory of a model saved with "
                         "save_pretrained (hf:DIR)")
    if os.path.isfile(path):
        raise ValueError(f"--teacher hf:{path}: a file; expected the directory of a model saved "
                         f"with save_pretrained (config.json and weights)")
    if not os.path.isdir(path):
        raise ValueError(
            f"--teacher hf:{path}: no such local directory. fastkd never downloads models; if "
            f"{path!r} is a Hugging Face hub id, download it first (e.g. `huggingface-cli "
            f"download {path} --local-dir DIR`) and pass hf:DIR")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"--teacher hf:{path}: {os.path.abspath(path)} has no config.json; "
                         f"expected a directory written by save_pretrained")
    config = _read_config(path, config_file)
    _check_custom_code(path, config, trust_remote_code)
    _check_architecture(path, config)
    kwargs = {"local_files_only": True, "trust_remote_code": bool(trust_remote_code)}
    # transformers >= 4.56 calls it `dtype`; older releases `torch_dtype`
    dtype_key = "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"
    kwargs[dtype_key] = MODEL_DTYPES[dtype]
    bars = transformers.utils.logging.is_progress_bar_enabled()
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except pickle.UnpicklingError:
        raise ValueError(_bad_weights(path, "*.bin")) from None
    except (OSError, ValueError, KeyError) as error:
        reason = (str(error).strip() or type(error).__name__).partition("\n")[0]
        raise ValueError(f"--teacher hf:{path}: cannot load a causal LM from it with local "
                         f"files only ({reason})") from None
    except Exception as error:
        if type(error).__name__ == "SafetensorError":  # safetensors' own Exception subclass
            raise ValueError(_bad_weights(path, "*.safetensors")) from None
        raise
    finally:
        if bars and not progress:
            transformers.utils.logging.enable_progress_bar()
    if getattr(model.config, "use_cache", None) is not None:
        model.config.use_cache = False
    if device is not None:
        model = model.to(device)
    model.eval()
    _check_causal(path, model)
    return model


def _read_config(path: str, config_file: str) -> dict:
    try:
        with open(config_file, encoding="utf-8") as handle:
            config = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        where = f" (line {error.lineno})" if isinstance(error, json.JSONDecodeError) else ""
        raise ValueError(f"--teacher hf:{path}: {config_file}{where} is not a valid JSON "
                         f"config") from None
    if not isinstance(config, dict):
        raise ValueError(f"--teacher hf:{path}: {config_file} holds a JSON "
                         f"{type(config).__name__}, expected an object")
    return config


def _check_custom_code(path: str, config: dict, trust_remote_code: bool) -> None:
    if trust_remote_code or not config.get("auto_map"):
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING_NAMES:
        raise ValueError(
            f"--teacher hf:{path}: config.json names custom code (auto_map "
            f"{json.dumps(config['auto_map'])}) for model type {model_type!r}, which "
            f"transformers does not know; fastkd does not run a model directory's code "
            f"(pass trust_remote_code=True to fastkd.hf.load_causal_lm if you trust it)")


def _check_architecture(path: str, config: dict) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not architectures:
        return  # not recorded: the probe after loading decides
    causal = {name for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
              for name in ([names] if isinstance(names, str) else names)}
    if not any(name in causal for name in architectures):
        raise ValueError(
            f"--teacher hf:{path}: it holds a {', '.join(map(str, architectures))} (model type "
            f"{config.get('model_type')!r}), not a causal language model; fastkd caches "
            f"next-token teachers, whose row j has seen only tokens 0..j")


def _check_causal(path: str, model) -> None:
    """Logits before the last position must not change when the last token changes."""
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab < 2:
        return
    device = next(model.parameters()).device
    tokens = torch.arange(1, 7, device=device).remainder(vocab)[None]
    changed = tokens.clone()
    changed[0, -1] = (changed[0, -1] + 1) % vocab
    try:
        with torch.no_grad():
            first = model(input_ids=tokens).logits[0, :-1].float()
            second = model(input_ids=changed).logits[0, :-1].float()
    except (RuntimeError, NotImplementedError):
        return  # e.g. a half-precision op the CPU lacks; the architecture check still holds
    # the tolerance absorbs only summation-order noise (atomics) at the model's precision
    dtype = next(model.parameters()).dtype
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    scale = float(first.abs().max())
    if float((first - second).abs().max()) > tolerance * max(scale, 1e-6):
        raise ValueError(
            f"--teacher hf:{path}: its {type(model).__name__} (model type "
            f"{getattr(model.config, 'model_type', None)!r}) is not causal: its logits at a "
            f"position change when a later token changes, so each cached row would have seen "
            f"the token it predicts")


def _bad_weights(path: str, pattern: str) -> str:
    for name in sorted(glob.glob(os.path.join(glob.escape(path), pattern))):
        problem = _weight_file_problem(name)
        if problem:
            return f"--teacher hf:{path}: {name} {problem}"
    kind = "pytorch_model.bin" if pattern == "*.bin" else "safetensors"
    return (f"--teacher hf:{path}: a {kind} weight file in it does not load as plain "
            f"weights")


def _weight_file_problem(name: str):
    if name.endswith(".safetensors"):
        from safetensors import safe_open
        try:
            with safe_open(name, framework="pt") as handle:
                handle.keys()
        except Exception as error:  # SafetensorError, OSError
            detail = str(error).strip().partition("\n")[0]
            return (f"is not a valid safetensors file ({detail}): truncated or damaged; "
                    f"download or save it again")
        return None
    try:
        torch.load(name, map_location="meta", weights_only=True, mmap=True)
    except Exception:  # UnpicklingError, RuntimeError for a file that is not a zip archive
        return ("is not a plain weights file: torch.load(weights_only=True) refuses it (it "
                "holds other pickled objects, or is damaged); fastkd never unpickles code, so "
                "save the weights with save_pretrained (safetensors) instead")
    return None
