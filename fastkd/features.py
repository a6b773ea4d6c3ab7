"""Feature distillation (FitNets hints, Romero et al. 2015) combined with output distillation:
``lambda_feature * mean_pairs feature_loss(projector(f_s), f_t) + lambda_output * output_loss``.

Features are named submodules' outputs, captured with forward hooks; a learnable projector (a
1x1 conv over channels, or a linear map over the last dim) fixes differing sizes. Cached teacher
features: :class:`TeacherFeatures` makes a teacher return one layer as rows for ``write_cache``.
"""
import difflib
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastkd.loss import KDLoss

__all__ = ["FeatureDistillLoss", "TeacherFeatures"]

FeaturePairs = Union[Mapping[str, str], Iterable[Tuple[str, str]], Iterable[str]]


def _find_module(model: nn.Module, name: str, role: str) -> nn.Module:
    """``model``'s submodule called ``name``; a ValueError listing the nearest names otherwise."""
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return modules[name]
    valid = [key for key in modules if key]
    nearest = difflib.get_close_matches(name, valid, n=5, cutoff=0.5) or valid[:10]
    raise ValueError(f"{role} module {name!r} not found in {type(model).__name__}; "
                     f"nearest valid names: {', '.join(map(repr, nearest))}")


def _as_feature(output, module_name: str) -> torch.Tensor:
    """A hooked module's output as a tensor (first element of a tuple output)."""
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"module {module_name!r} returned {type(output).__name__}; feature "
                        "distillation needs a tensor (or a tuple whose first item is one)")
    return output


def _normalize_pairs(feature_pairs: FeaturePairs) -> List[Tuple[str, str]]:
    if isinstance(feature_pairs, Mapping):
        pairs = list(feature_pairs.items())
    elif isinstance(feature_pairs, str):
        raise TypeError("feature_pairs must be a mapping or a list, not a single string; "
                        f"did you mean [{feature_pairs!r}]?")
    else:
        pairs = [(item, item) if isinstance(item, str) else tuple(item) for item in feature_pairs]
    if not pairs:
        raise ValueError("feature_pairs must name at least one (student, teacher) module pair")
    for pair in pairs:
        if len(pair) != 2 or not all(isinstance(name, str) for name in pair):
            raise TypeError("feature_pairs must map student module names (str) to teacher module "
                            f"names (str); got {pair!r}")
    return pairs


def _make_projector(student_shape, teacher_shape, pair) -> nn.Module:
    """Identity for equal per-sample shapes, else a 1x1 conv (C, H, W) or a linear map (D or
    L, D); a ValueError for what a projector cannot fix."""
    student_name, teacher_name = pair
    if student_shape == teacher_shape:
        return nn.Identity()
    where = (f"student {student_name!r} {tuple(student_shape)} vs teacher {teacher_name!r} "
             f"{tuple(teacher_shape)} (per-sample shapes)")
    if len(student_shape) != len(teacher_shape):
        raise ValueError(f"feature ranks differ: {where}; pick layers with the same layout")
    if len(student_shape) == 3:  # (C, H, W)
        if student_shape[1:] != teacher_shape[1:]:
            raise ValueError(f"spatial sizes differ: {where}; the 1x1-conv projector maps "
                             "channels only, so pick layers with the same H x W")
        return nn.Conv2d(student_shape[0], teacher_shape[0], kernel_size=1, bias=False)
    if len(student_shape) in (1, 2):  # (D,) or (L, D)
        if student_shape[:-1] != teacher_shape[:-1]:
            raise ValueError(f"sequence lengths differ: {where}; the linear projector maps the "
                             "last dim only")
        return nn.Linear(student_shape[-1], teacher_shape[-1], bias=False)
    raise ValueError(f"no projector for {len(student_shape) + 1}-D features: {where}; "
                     "supported: (N, D), (N, L, D), (N, C, H, W)")


class FeatureDistillLoss(nn.Module):
    """The feature + output loss over hooked features (see the module docstring).

    ``feature_pairs``: ``{student_module: teacher_module}``, a list of pairs, or names present in
    both. ``example_input``: a batch both models run once to size the projectors. The teacher runs
    in eval mode under ``no_grad``. ``output_loss(student_logits, teacher_logits, labels)``
    defaults to ``KDLoss(temperature=4.0)``, ``feature_loss`` to MSE. The projectors are this
    module's only parameters (optimize them with the student's); :meth:`close` or leaving a
    ``with`` block removes the hooks.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, feature_pairs: FeaturePairs, *,
                 example_input, lambda_feature: float = 1.0, lambda_output: float = 1.0,
                 output_loss: Optional[Callable] = None, feature_loss: Optional[Callable] = None):
        super().__init__()
        for name, model in (("teacher", teacher), ("student", student)):
            if not isinstance(model, nn.Module):
                raise TypeError(f"{name} must be an nn.Module, got {type(model).__name__}")
        for name, value in (("lambda_feature", lambda_feature), ("lambda_output", lambda_output)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        self.pairs = _normalize_pairs(feature_pairs)
        # plain attributes (a tuple), so the models' weights are not this module's parameters
        self._models = (teacher.eval(), student)
        self.lambda_feature = float(lambda_feature)
        self.lambda_output = float(lambda_output)
        self.output_loss = output_loss if output_loss is not None else KDLoss(temperature=4.0)
        self.feature_loss = feature_loss if feature_loss is not None else F.mse_loss
        self._captured: Optional[Dict[Tuple[str, str], torch.Tensor]] = None
        self._hooks = []
        for student_name, teacher_name in self.pairs:
            self._hook(_find_module(student, student_name, "student"), ("student", student_name))
            self._hook(_find_module(teacher, teacher_name, "teacher"), ("teacher", teacher_name))
        self.teacher_shapes, self.projectors = self._build_projectors(example_input)
        self.student_logits: Optional[torch.Tensor] = None
        self.last_terms: Dict[str, torch.Tensor] = {}

    def _hook(self, module: nn.Module, key: Tuple[str, str]) -> None:
        def capture(_module, _inputs, output):
            if self._captured is not None:
                feature = _as_feature(output, key[1])
                self._captured[key] = feature.detach() if key[0] == "teacher" else feature
        self._hooks.append(module.register_forward_hook(capture))

    def close(self) -> None:
        """Remove the forward hooks from both models (idempotent)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    @property
    def teacher(self) -> nn.Module:
        return self._models[0]

    @property
    def student(self) -> nn.Module:
        return self._models[1]

    def projector_parameters(self):
        """The projectors' parameters (the same as ``self.parameters()``)."""
        return self.projectors.parameters()

    def _run(self, model: nn.Module, inputs, role: str):
        """Run ``model`` with capture on; return (output, {module_name: feature})."""
        if not self._hooks:
            raise RuntimeError("FeatureDistillLoss was closed; its hooks are gone")
        self._captured = {}
        try:
            output = model(inputs)
            features = {name: value for (who, name), value in self._captured.items() if who == role}
        finally:
            self._captured = None
        wanted = {pair[0] if role == "student" else pair[1] for pair in self.pairs}
        missing = sorted(wanted - set(features))
        if missing:
            raise ValueError(f"{role} module(s) {missing} did not run in {role}'s forward pass; "
                             "pick modules on the forward path")
        return output, features

    def _build_projectors(self, example_input):
        student_was_training = self.student.training
        self.student.eval()  # no BatchNorm statistics update from the probe batch
        try:
            with torch.no_grad():
                _, student_features = self._run(self.student, example_input, "student")
                _, teacher_features = self._run(self.teacher, example_input, "teacher")
        finally:
            self.student.train(student_was_training)
        teacher_shapes, projectors = {}, nn.ModuleDict()
        parameter = next(self.student.parameters(), None)
        for student_name, teacher_name in self.pairs:
            student_shape = tuple(student_features[student_name].shape[1:])
            teacher_shape = tuple(teacher_features[teacher_name].shape[1:])
            teacher_shapes[teacher_name] = teacher_shape
            projector = _make_projector(student_shape, teacher_shape, (student_name, teacher_name))
            if parameter is not None:
                projector.to(device=parameter.device, dtype=parameter.dtype)
            projectors[self._key(student_name)] = projector
        return teacher_shapes, projectors

    @staticmethod
    def _key(student_name: str) -> str:
        return student_name.replace(".", "__")  # ModuleDict keys may not contain dots

    def forward(self, inputs, labels=None, *, teacher_logits: Optional[torch.Tensor] = None,
                teacher_features: Optional[Mapping[str, torch.Tensor]] = None) -> torch.Tensor:
        """Scalar loss. Cached ``teacher_logits`` and ``teacher_features`` (``{teacher_module:
        rows}``, reshaped to the layer's shape) replace the teacher run: both or neither. Keeps
        ``self.student_logits`` and the detached terms as ``self.last_terms``."""
        from_cache = teacher_logits is not None or teacher_features is not None
        if from_cache and (teacher_logits is None or teacher_features is None):
            raise ValueError("pass both teacher_logits and teacher_features (cached teacher) or "
                             "neither (the teacher runs online)")
        student_logits, student_features = self._run(self.student, inputs, "student")
        if from_cache:
            teacher_features = self._check_cached_features(teacher_features)
        else:
            with torch.no_grad():
                teacher_logits, teacher_features = self._run(self.teacher, inputs, "teacher")
        feature_terms = []
        for student_name, teacher_name in self.pairs:
            projected = self.projectors[self._key(student_name)](student_features[student_name])
            target = teacher_features[teacher_name].to(projected.dtype)
            if projected.shape != target.shape:
                raise ValueError(
                    f"feature shapes differ at run time: student {student_name!r} projected to "
                    f"{tuple(projected.shape)}, teacher {teacher_name!r} is {tuple(target.shape)}")
            feature_terms.append(self.feature_loss(projected, target))
        feature_term = torch.stack(feature_terms).mean()
        output_term = self.output_loss(student_logits, teacher_logits, labels)
        self.student_logits = student_logits
        self.last_terms = {"feature": feature_term.detach(), "output": output_term.detach()}
        return self.lambda_feature * feature_term + self.lambda_output * output_term

    def _check_cached_features(self, teacher_features) -> Dict[str, torch.Tensor]:
        """Cached rows ``(N, prod(shape))`` (or ``(N, L, D)`` token features) -> layer shape."""
        if not isinstance(teacher_features, Mapping):
            raise TypeError("teacher_features must map teacher module names to tensors, got "
                            f"{type(teacher_features).__name__}")
        shaped = {}
        for teacher_name, shape in self.teacher_shapes.items():
            if teacher_name not in teacher_features:
                raise ValueError(f"teacher_features lacks {teacher_name!r} (has "
                                 f"{sorted(teacher_features)})")
            rows = teacher_features[teacher_name]
            if len(shape) == 2 and rows.dim() == 3:  # (N, L, D) token features; L varies
                target_shape = (rows.shape[0], rows.shape[1], shape[-1])
            else:
                target_shape = (rows.shape[0],) + shape
            if rows.numel() != torch.Size(target_shape).numel():
                raise ValueError(f"teacher_features[{teacher_name!r}] has shape "
                                 f"{tuple(rows.shape)}; layer {teacher_name!r} gives per-sample "
                                 f"features of shape {shape}")
            shaped[teacher_name] = rows.reshape(target_shape)
        return shaped


class TeacherFeatures(nn.Module):
    """A teacher whose forward returns one layer's output as ``(N, D)`` rows (``(N, L, D)`` with
    ``keep_sequence_dim``), for ``write_cache``; the rows go back in as
    ``FeatureDistillLoss(..., teacher_features={module_name: rows})``."""

    def __init__(self, teacher: nn.Module, module_name: str, *, keep_sequence_dim: bool = False):
        super().__init__()
        self.teacher = teacher
        self.module_name = module_name
        self.keep_sequence_dim = keep_sequence_dim
        self._feature = None
        self._hook = _find_module(teacher, module_name, "teacher").register_forward_hook(
            self._capture)

    def close(self) -> None:
        """Remove the forward hook from the teacher."""
        self._hook.remove()

    def _capture(self, _module, _inputs, output):
        self._feature = _as_feature(output, self.module_name)

    def forward(self, *inputs, **kwargs) -> torch.Tensor:
        self._feature = None
        self.teacher(*inputs, **kwargs)
        feature, self._feature = self._feature, None
        if feature is None:
            raise RuntimeError(f"teacher module {self.module_name!r} did not run in forward")
        if self.keep_sequence_dim:
            return feature.reshape(feature.shape[0], feature.shape[1], -1)
        return feature.reshape(feature.shape[0], -1)
