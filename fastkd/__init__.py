"""fastkd: fused knowledge-distillation losses and offline teacher-logit caching."""
__version__ = "0.1.0"

__all__ = ["kd_loss", "KDLoss", "linear_kd_loss", "LinearKDLoss", "TopKLogits", "SampledTargets",
           "TeacherHead", "__version__"]

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


def __getattr__(name):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastkd' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
