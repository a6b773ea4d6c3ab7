"""fastkd: fused knowledge-distillation losses and offline teacher-logit caching."""
__version__ = "0.1.0"

from fastkd.loss import KDLoss, kd_loss  # noqa: E402
from fastkd.linear import LinearKDLoss, linear_kd_loss  # noqa: E402
from fastkd.targets import SampledTargets, TeacherHead, TopKLogits  # noqa: E402

__all__ = ["kd_loss", "KDLoss", "linear_kd_loss", "LinearKDLoss", "TopKLogits", "SampledTargets",
           "TeacherHead", "__version__"]


def __getattr__(name):
    # Heavier parts load on first use, so `import fastkd` stays quick.
    if name in ("LogitCache", "CachedDataset", "collate_padded"):
        from fastkd import cache
        return getattr(cache, name)
    if name in ("FeatureDistillLoss",):
        from fastkd import features
        return getattr(features, name)
    raise AttributeError(f"module 'fastkd' has no attribute {name!r}")
