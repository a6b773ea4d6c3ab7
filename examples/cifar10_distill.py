"""CIFAR-10 teacher -> student distillation with fastkd, online or from a teacher-logit cache.

    python examples/cifar10_distill.py --data-root ~/data --method kd            # online teacher
    python examples/cifar10_distill.py --data-root ~/data --method kd --cached   # cache, then train
    python examples/cifar10_distill.py --smoke --method feature --cached   # seconds, fake data

Methods (``--method``):
  kd       Hinton soft targets + hard labels: ``kd_loss(s, t, y, temperature=T)``
  pseudo   hard pseudo-labels, the teacher's argmax: ``kd_loss(s, t, "teacher", soft_weight=0)``
  mse      logit matching: ``kd_loss(s, t, y, divergence="mse")``
  feature  FitNets-style hint on an intermediate layer + KD on the outputs (FeatureDistillLoss)

Teacher: torchvision resnet18 (10 classes), from ``--teacher-checkpoint`` or trained here first
for ``--teacher-epochs``. Student: ``fastkd.models.CifarStudentCNN`` or a torchvision resnet18
warm-started from a local checkpoint (``--student resnet18 --student-checkpoint PATH``; heads
with another number of classes are skipped). A teacher checkpoint must cover the whole teacher.
``--data-root`` must hold torchvision's ``cifar-10-batches-py`` folder: nothing is ever
downloaded. ``--smoke`` uses ``torchvision.datasets.FakeData`` of the right shape instead, with
small sizes for the options not given. Images are only normalized, never augmented, so online
and cached training see the same fixed images. With ``--cached`` the teacher runs once over the
training set (``fastkd.cache.write_cache``) and training reads fp16 logits (and, for
``feature``, the hinted layer's features) from disk.
"""
import argparse
import os
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
import torchvision
from torchvision import transforms
from tqdm.auto import tqdm

import fastkd
from fastkd.cache import resolve_device, write_cache
from fastkd.demo import accuracy
from fastkd.features import FeatureDistillLoss, TeacherFeatures
from fastkd.models import CifarStudentCNN, load_checkpoint

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
# (student layer, teacher layer) with the same 4x4 spatial size on 32x32 inputs
FEATURE_PAIRS = {"cnn": {"block3": "layer2"}, "resnet18": {"layer2": "layer2"}}
# the defaults of the options that --smoke shrinks, for a full run and for --smoke
FULL_RUN = {"epochs": 10, "teacher_epochs": 10, "batch_size": 128}
SMOKE_RUN = {"epochs": 1, "teacher_epochs": 1, "batch_size": 32}
DEFAULT_TEMPERATURE = 4.0


class IndexedDataset(torch.utils.data.Dataset):
    """Items ``(index, *item)``, so cached feature rows can be gathered per batch."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return (index, *self.dataset[index])


def load_data(args):
    """``(train, test)`` datasets of ``(image (3, 32, 32), label)``."""
    to_tensor = transforms.Compose([transforms.ToTensor(),
                                    transforms.Normalize(CIFAR_MEAN, CIFAR_STD)])
    if args.smoke:
        def fake(size, offset):
            return torchvision.datasets.FakeData(size=size, image_size=(3, 32, 32),
                                                 num_classes=10, transform=to_tensor,
                                                 random_offset=offset)
        return fake(96, 0), fake(32, 1000)
    if args.data_root is None:
        raise SystemExit("--data-root is required (a folder holding cifar-10-batches-py), "
                         "or pass --smoke")
    try:
        return (torchvision.datasets.CIFAR10(args.data_root, train=True, transform=to_tensor,
                                             download=False),
                torchvision.datasets.CIFAR10(args.data_root, train=False, transform=to_tensor,
                                             download=False))
    except RuntimeError as error:  # torchvision: "Dataset not found or corrupted"
        raise SystemExit(f"CIFAR-10 not found under {os.path.abspath(args.data_root)} "
                         f"(expected cifar-10-batches-py there; nothing is downloaded): {error}")


def build_teacher(args, train_set, device):
    teacher = torchvision.models.resnet18(num_classes=10)
    if args.teacher_checkpoint:
        load_checkpoint(teacher, args.teacher_checkpoint, skip_mismatched=False)
    else:
        train(teacher, train_set, None, args, device, epochs=args.teacher_epochs, desc="teacher",
              loss_fn=lambda batch: F.cross_entropy(teacher(batch["images"]), batch["labels"]))
    return teacher.to(device).eval()


def build_student(args):
    if args.student == "cnn":
        return CifarStudentCNN(num_classes=10, width=16)
    student = torchvision.models.resnet18(num_classes=10)
    if args.student_checkpoint:  # transfer-learning warm start
        report = load_checkpoint(student, args.student_checkpoint)
        print(f"warm start: {len(report['loaded'])} tensors loaded, skipped {report['skipped']}, "
              f"left at their initialization {report['missing']}")
    return student


def cache_teacher(teacher, train_set, args, device):
    """Run the teacher once: logits (and the hinted layer's features) into ``--cache-dir``."""
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="fastkd-cifar-cache-")
    options = dict(batch_size=256, device=device, progress=not args.quiet, overwrite=True)
    write_cache(teacher, train_set, os.path.join(cache_dir, "logits"), **options)
    caches = {"logits": fastkd.LogitCache(os.path.join(cache_dir, "logits"))}
    if args.method == "feature":
        (teacher_layer,) = FEATURE_PAIRS[args.student].values()
        features = TeacherFeatures(teacher, teacher_layer)
        write_cache(features, train_set, os.path.join(cache_dir, "features"), layout="features",
                    **options)
        features.close()
        caches["features"] = fastkd.LogitCache(os.path.join(cache_dir, "features"))
    return caches


def make_loss(args, teacher, student, example_images):
    """``loss_fn(batch) -> scalar`` for ``--method``; ``batch`` holds images, labels and, when
    cached, teacher_logits / teacher_features. Also returns extra trainable modules."""
    temperature = args.temperature
    if args.method == "feature":
        pairs = FEATURE_PAIRS[args.student]
        distill = FeatureDistillLoss(teacher, student, pairs, example_input=example_images,
                                     lambda_feature=1.0, lambda_output=1.0,
                                     output_loss=fastkd.KDLoss(temperature=temperature))

        def feature_loss(batch):
            if "teacher_logits" in batch:
                (teacher_layer,) = pairs.values()
                return distill(batch["images"], batch["labels"],
                               teacher_logits=batch["teacher_logits"],
                               teacher_features={teacher_layer: batch["teacher_features"]})
            return distill(batch["images"], batch["labels"])
        return feature_loss, distill

    def output_loss(batch):
        teacher_logits = batch.get("teacher_logits")
        if teacher_logits is None:
            with torch.no_grad():
                teacher_logits = teacher(batch["images"])
        student_logits = student(batch["images"])
        if args.method == "kd":
            return fastkd.kd_loss(student_logits, teacher_logits, batch["labels"],
                                  temperature=temperature)
        if args.method == "pseudo":
            return fastkd.kd_loss(student_logits, teacher_logits, "teacher", soft_weight=0.0,
                                  hard_weight=1.0)
        return fastkd.kd_loss(student_logits, teacher_logits, batch["labels"], divergence="mse",
                              soft_weight=1.0, hard_weight=0.5)
    return output_loss, None


def train(model, train_set, caches, args, device, *, epochs, desc, loss_fn, extra=None):
    """Adam over ``model`` (+ ``extra`` modules such as projectors); returns images/s."""
    parameters = list(model.parameters()) + (list(extra.parameters()) if extra else [])
    optimizer = torch.optim.Adam(parameters, lr=args.lr)
    loader = torch.utils.data.DataLoader(IndexedDataset(train_set), batch_size=args.batch_size,
                                         shuffle=True, num_workers=args.workers,
                                         generator=torch.Generator().manual_seed(args.seed))
    model.to(device).train()
    seen, elapsed = 0, 0.0
    for epoch in range(epochs):
        bar = tqdm(loader, desc=f"{desc} {epoch + 1}/{epochs}", disable=args.quiet, leave=False)
        for indices, images, labels in bar:
            start = time.perf_counter()
            batch = {"images": images.to(device), "labels": labels.to(device)}
            if caches:
                batch["teacher_logits"] = caches["logits"].gather(indices).to(device)
                if "features" in caches:
                    batch["teacher_features"] = caches["features"].gather(indices).to(device)
            loss = loss_fn(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed += time.perf_counter() - start
            seen += len(images)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return seen / max(elapsed, 1e-9)


def positive_int(text):
    """argparse type: an int of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text):
    """argparse type: an int of at least 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def positive_float(text):
    """argparse type: a finite float above 0."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def few(names, count=3):
    """The first ``count`` of ``names``, comma-separated, for a one-line message."""
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


def read_checkpoint(path, *, strict):
    """``load_checkpoint``'s report for ``path`` loaded into a fresh 10-class resnet18 (with
    ``skip_mismatched=not strict``). A file that is not a readable state dict raises
    ``argparse.ArgumentTypeError``, which argparse reports in one line naming the option."""
    model = torchvision.models.resnet18(num_classes=10)
    try:
        with warnings.catch_warnings():  # torch.load's notes on foreign pickles: the error says it
            warnings.simplefilter("ignore")
            return load_checkpoint(model, path, skip_mismatched=not strict)
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {error.strerror}") from None
    except ValueError as error:  # not a state dict, a tensor of another shape, nothing shared
        raise argparse.ArgumentTypeError(str(error)) from None
    except Exception:  # torch.load on another kind of file: UnpicklingError, KeyError, EOFError
        raise argparse.ArgumentTypeError(f"{path} is not a PyTorch checkpoint") from None


def teacher_checkpoint(path):
    """argparse type of ``--teacher-checkpoint``: a state dict of exactly the teacher's tensors
    (a 10-class resnet18), so that no teacher weight is left at its random initialization."""
    report = read_checkpoint(path, strict=True)
    problems = []
    if report["missing"]:
        problems.append(f"lacks {len(report['missing'])} of the teacher's tensors "
                        f"({few(report['missing'])})")
    if report["skipped"]:
        problems.append(f"holds tensors the teacher does not have ({few(report['skipped'])})")
    if problems:
        raise argparse.ArgumentTypeError(f"{path} {' and '.join(problems)}; it must hold a whole "
                                         f"10-class torchvision resnet18")
    return path


def student_checkpoint(path):
    """argparse type of ``--student-checkpoint``: a state dict sharing tensors with resnet18
    (the others are skipped at the warm start)."""
    read_checkpoint(path, strict=False)
    return path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", help="folder holding cifar-10-batches-py (no download)")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds-long run on FakeData (3x32x32); smaller defaults for "
                             "--epochs, --teacher-epochs and --batch-size")
    parser.add_argument("--method", choices=("kd", "pseudo", "mse", "feature"), default="kd")
    parser.add_argument("--cached", action="store_true",
                        help="cache teacher logits first, train the student from the cache")
    parser.add_argument("--cache-dir", help="where --cached writes (default: a temporary dir)")
    parser.add_argument("--teacher-checkpoint", type=teacher_checkpoint,
                        help="state dict of a whole 10-class resnet18 for the teacher")
    parser.add_argument("--teacher-epochs", type=non_negative_int,
                        help="epochs to train the teacher when no checkpoint is given "
                             "(default 10; --smoke 1)")
    parser.add_argument("--student", choices=("cnn", "resnet18"), default="cnn")
    parser.add_argument("--student-checkpoint", type=student_checkpoint,
                        help="warm-start state dict for --student resnet18 (transfer learning)")
    parser.add_argument("--epochs", type=non_negative_int,
                        help="student epochs (default 10; --smoke 1)")
    parser.add_argument("--batch-size", type=positive_int, help="default 128; --smoke 32")
    parser.add_argument("--lr", type=positive_float, default=1e-3)
    parser.add_argument("--temperature", type=positive_float,
                        help=f"softening of --method kd and feature (default "
                             f"{DEFAULT_TEMPERATURE:g}); pseudo and mse do not use one")
    parser.add_argument("--workers", type=non_negative_int, default=0,
                        help="DataLoader workers")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for name, value in (SMOKE_RUN if args.smoke else FULL_RUN).items():
        if getattr(args, name) is None:  # options given explicitly win over --smoke
            setattr(args, name, value)
    if args.method in ("pseudo", "mse"):
        if args.temperature is not None:
            parser.error(f"--temperature is unused by --method {args.method} (kd and feature "
                         f"use it)")
    elif args.temperature is None:
        args.temperature = DEFAULT_TEMPERATURE
    if args.student_checkpoint and args.student != "resnet18":
        parser.error("--student-checkpoint needs --student resnet18 (the cnn student starts "
                     "from scratch)")
    if args.cache_dir and os.path.exists(args.cache_dir) and not os.path.isdir(args.cache_dir):
        parser.error(f"--cache-dir {args.cache_dir} is not a directory")
    if args.cache_dir and not args.cached:
        parser.error("--cache-dir applies to --cached runs only (online runs cache nothing)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (use cpu or auto)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    train_set, test_set = load_data(args)
    teacher = build_teacher(args, train_set, device)
    caches = cache_teacher(teacher, train_set, args, device) if args.cached else None
    student = build_student(args).to(device)
    example_images = torch.stack([train_set[i][0] for i in range(2)]).to(device)
    loss_fn, extra = make_loss(args, teacher, student, example_images)
    images_per_second = train(student, train_set, caches, args, device, epochs=args.epochs,
                              desc=f"student ({args.method}{', cached' if args.cached else ''})",
                              loss_fn=loss_fn, extra=extra)
    if extra is not None:
        extra.close()
    results = {"method": args.method, "cached": args.cached,
               "teacher_accuracy": accuracy(teacher, test_set, device),
               "student_accuracy": accuracy(student, test_set, device),
               "images_per_second": images_per_second}
    print(f"method={args.method} cached={args.cached} teacher acc {results['teacher_accuracy']:.1%}"
          f"  student acc {results['student_accuracy']:.1%}"
          f"  student training {images_per_second:,.0f} images/s")
    return results


if __name__ == "__main__":
    main()
