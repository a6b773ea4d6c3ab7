"""fastkd: fused knowledge-distillation losses and offline teacher-logit caching."""
__version__ = "0.1.0"

__all__ = ["kd_loss", "KDLoss", "linear_kd_loss", "LinearKDLoss", "TopKLogits", "SampledTargets",
           "TeacherHead", "__version__"]

import os as _os  # noqa: E402
import sys as _sys  # noqa: E402
from importlib.machinery import ModuleSpec as _ModuleSpec  # noqa: E402
from importlib.util import module_from_spec as _module_from_spec  # noqa: E402

from fastkd.lazy import lazy_exports  # noqa: E402


def _bind_checkout_kernels() -> None:
    """Make ``fastkd.kernels`` importable when this package runs from a source checkout.

    ``fastkd.kernels`` ships from the repository's top-level ``kernels/`` folder, which has no
    ``__init__.py``: one would shadow any other installed top-level ``kernels`` package (Hugging
    Face's, which ``transformers`` imports) whenever Python runs from the repository root. An
    installed copy has ``fastkd/kernels/`` beside this file. In a checkout, ``fastkd.kernels``
    becomes a namespace package over the checkout's ``kernels/`` folder, then any installed
    ``fastkd/kernels`` on ``sys.path`` (where a non-editable install keeps the compiled CPU
    kernel).
    """
    here = _os.path.dirname(_os.path.abspath(__file__))
    if _os.path.isdir(_os.path.join(here, "kernels")):
        return
    folders = [_os.path.join(_os.path.dirname(here), "kernels")]
    for entry in _sys.path:
        installed = _os.path.join(_os.path.abspath(entry or _os.curdir), "fastkd", "kernels")
        if _os.path.isdir(installed) and installed not in folders:
            folders.append(installed)
    spec = _ModuleSpec(__name__ + ".kernels", None, is_package=True)
    spec.submodule_search_locations = [f for f in folders if _os.path.isdir(f)]
    module = _module_from_spec(spec)
    _sys.modules[spec.name] = module
    globals()["kernels"] = module   # what the import system binds for a submodule it loads


_bind_checkout_kernels()

# Every public name loads on first use: `import fastkd` (and the `fastkd` command line, whose
# --help and argument errors never need torch) stays free of torch until something needs it.
_LAZY = {
    "kd_loss": "fastkd.loss", "KDLoss": "fastkd.loss",
    "linear_kd_loss": "fastkd.linear", "LinearKDLoss": "fastkd.linear",
    "TopKLogits": "fastkd.targets", "SampledTargets": "fastkd.targets",
    "TeacherHead": "fastkd.targets",
    "LogitCache": "fastkd.cache", "CachedDataset": "fastkd.cache",
    "collate_padded": "fastkd.cache",
    "FeatureDistillLoss": "fastkd.features",
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
