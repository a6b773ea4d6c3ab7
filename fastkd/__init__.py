"""fastkd: fused knowledge-distillation losses and offline teacher-logit caching."""
__version__ = "0.1.0"

__all__ = ["kd_loss", "KDLoss", "linear_kd_loss", "LinearKDLoss", "TopKLogits", "SampledTargets",
           "TeacherHead", "__version__"]

from fastkd._lazy import lazy_exports  # noqa: E402

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
