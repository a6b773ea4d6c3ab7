"""The examples in examples/ run in their seconds-long smoke mode (fake / synthetic data of the
right shapes, nothing downloaded), and the token-level pieces they rely on are exact."""
import importlib.util
import os

import pytest
import torch

import fastkd
from fastkd.models import TinyCausalLM
from reference import reference_kd_loss

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _load_example(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("reproducible_cpu")


@pytest.fixture(scope="module")
def cifar():
    return _load_example("cifar10_distill")


@pytest.fixture(scope="module")
def lm():
    return _load_example("lm_token_distill")


@pytest.mark.parametrize("cached", [False, True], ids=["online", "cached"])
@pytest.mark.parametrize("method", ["kd", "pseudo", "mse", "feature"])
def test_cifar_example_smoke(cifar, method, cached, tmp_path, capsys):
    argv = ["--smoke", "--quiet", "--device", "cpu", "--method", method,
            "--cache-dir", str(tmp_path)] + (["--cached"] if cached else [])
    results = cifar.main(argv)
    assert results["method"] == method and results["cached"] == cached
    assert 0.0 <= results["student_accuracy"] <= 1.0
    assert results["images_per_second"] > 0
    assert f"method={method} cached={cached}" in capsys.readouterr().out
    if cached:
        logits = fastkd.LogitCache(str(tmp_path / "logits"))
        assert len(logits) == 96 and logits.num_classes == 10
        if method == "feature":  # resnet18 layer2 on 32x32: (128, 4, 4) per image
            assert fastkd.LogitCache(str(tmp_path / "features")).num_classes == 128 * 4 * 4


def test_cifar_example_warm_started_torchvision_student(cifar, tmp_path, capsys):
    import torchvision
    checkpoint = tmp_path / "imagenet_shaped_resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), checkpoint)
    results = cifar.main(["--smoke", "--quiet", "--device", "cpu", "--method", "feature",
                          "--student", "resnet18", "--student-checkpoint", str(checkpoint)])
    assert 0.0 <= results["student_accuracy"] <= 1.0
    assert "skipped ['fc.weight', 'fc.bias']" in capsys.readouterr().out


def test_cifar_example_never_downloads(cifar, tmp_path):
    with pytest.raises(SystemExit, match="CIFAR-10 not found under .*nothing is downloaded"):
        cifar.main(["--data-root", str(tmp_path), "--quiet"])
    with pytest.raises(SystemExit, match="--data-root is required"):
        cifar.main(["--quiet"])


def test_lm_example_smoke_online_and_cached_agree(lm, tmp_path):
    online = lm.main(["--smoke", "--quiet", "--device", "cpu"])
    cached = lm.main(["--smoke", "--quiet", "--device", "cpu", "--cached",
                      "--cache-dir", str(tmp_path)])
    assert online["teacher_loss"] == cached["teacher_loss"]  # same seed, same teacher
    # the students differ only through the fp16 rounding of the cached teacher logits
    assert abs(online["student_loss"] - cached["student_loss"]) < 1e-2
    assert abs(online["student_accuracy"] - cached["student_accuracy"]) < 0.02


def test_token_kd_on_padded_batch_equals_per_sequence_losses(lm):
    """kd_loss over right-padded (B, L, V) logits with ignore_index labels equals the token-
    weighted mean of the per-sequence losses computed without padding (float64 reference)."""
    torch.manual_seed(0)
    vocab = 40
    dataset = lm.MarkovTokens(6, vocab, 3, 12, seed=0)
    teacher, student = TinyCausalLM(vocab, dim=32), TinyCausalLM(vocab, dim=16, num_layers=1)
    items = [dataset[i] for i in range(len(dataset))]
    input_ids, labels = lm.pad_batch(items)
    assert (labels == lm.IGNORE_INDEX).any()  # there is padding
    with torch.no_grad():
        teacher_logits = teacher(input_ids)
    student_logits = student(input_ids)
    student_logits.retain_grad()
    loss = fastkd.kd_loss(student_logits, teacher_logits, labels, temperature=2.0)

    total, tokens = 0.0, 0
    for item in items:  # each sequence alone, no padding at all
        ids = item["input_ids"][None]
        with torch.no_grad():
            alone_teacher = teacher(ids)[0].double()
        alone_student = student(ids)[0].double()
        kept = int((item["labels"] != lm.IGNORE_INDEX).sum())
        total += kept * reference_kd_loss(alone_student, alone_teacher, item["labels"],
                                          temperature=2.0)
        tokens += kept
    # float32 loss vs float64 reference; the models' float32 forward differs by batch shape
    torch.testing.assert_close(loss.double(), total / tokens, rtol=1e-4, atol=1e-5)
    loss.backward()
    ignored = labels == lm.IGNORE_INDEX
    assert (student_logits.grad[ignored] == 0).all()  # padding and last positions: no gradient
    assert (student_logits.grad[~ignored].abs().sum(-1) > 0).all()


def test_lm_cache_rows_per_token_and_padded_collate(lm, tmp_path):
    """The variable-length cache holds L_i teacher rows per sequence; collate_padded lines
    them up with the padded labels."""
    torch.manual_seed(0)
    vocab = 24
    dataset = lm.MarkovTokens(10, vocab, 2, 9, seed=3)
    teacher = TinyCausalLM(vocab, dim=16, num_layers=1).eval()
    fastkd.cache.write_cache(teacher, dataset, str(tmp_path / "lm"), batch_size=4,
                             progress=False)
    cache = fastkd.LogitCache(str(tmp_path / "lm"))
    items = [fastkd.CachedDataset(dataset, cache)[i] for i in range(len(dataset))]
    input_ids, labels, teacher_logits = lm.cached_batch(items)
    for row, item in enumerate(dataset):
        length = len(item["input_ids"])
        with torch.no_grad():
            expected = teacher(item["input_ids"][None])[0]
        got = teacher_logits[row, :length].float()
        torch.testing.assert_close(got, expected, rtol=2.0 ** -10, atol=1e-3)  # fp16 storage
        assert torch.equal(labels[row, :length], item["labels"])
        assert (labels[row, length:] == lm.IGNORE_INDEX).all()
        assert torch.equal(input_ids[row, :length], item["input_ids"])


def test_methods_doc_snippets_run(tmp_path, monkeypatch):
    """Every ```python block of docs/methods.md, top to bottom in one namespace."""
    import re
    doc = os.path.join(os.path.dirname(EXAMPLES), "docs", "methods.md")
    with open(doc) as handle:
        blocks = re.findall(r"```python\n(.*?)```", handle.read(), flags=re.S)
    assert len(blocks) >= 8
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for number, block in enumerate(blocks):
        try:
            exec(compile(block, f"docs/methods.md block {number}", "exec"), namespace)
        except Exception as error:  # pragma: no cover - the message names the block
            raise AssertionError(f"docs/methods.md python block {number} failed: {error!r}\n"
                                 f"{block}") from error
