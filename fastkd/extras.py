"""Optional dependencies: each is imported where its feature runs, through :func:`require`, so
the core never imports it and a missing one ends in one sentence naming the extra to install.
"""
import importlib

__all__ = ["EXTRAS", "DISTRIBUTIONS", "MissingExtraError", "require"]

# extra -> what it adds (pyproject.toml's [project.optional-dependencies] lists the packages)
EXTRAS = {
    "demo": "`fastkd demo` and `--dataset digits` (scikit-learn's bundled digits)",
    "vision": "torchvision teachers and datasets (`torchvision:` specs, the CIFAR-10 example)",
    "hf": "Hugging Face causal LMs and token datasets (`hf:`, `parquet:`, `hf-disk:`, fastkd.hf)",
    "trl": "fastkd's loss inside TRL's distillation trainers (fastkd.trl)",
    "bench": "the benchmark suite (pytest-benchmark, NVML figures, torchvision teachers)",
}


# import name -> the name pip installs it under, where they differ
DISTRIBUTIONS = {"sklearn": "scikit-learn", "pynvml": "nvidia-ml-py"}


class MissingExtraError(ImportError):
    """An optional package that a feature needs is not installed."""


def require(module: str, extra: str, feature: str):
    """``importlib.import_module(module)``, or :class:`MissingExtraError` naming ``extra`` when
    the package is not installed. ``feature`` says what needs it, e.g. ``"fastkd demo"``."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        top = module.split(".")[0]
        if error.name is None or error.name.split(".")[0] != top:
            raise   # the package is there but something it imports is not: not ours to word
        package = DISTRIBUTIONS.get(top, top)
        raise MissingExtraError(f"{feature} needs the '{package}' package, which is not installed: "
                                f"pip install 'fastkd[{extra}]'") from None
