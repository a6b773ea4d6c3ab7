"""The examples in examples/ run in their seconds-long smoke mode (fake / synthetic data of the
right shapes, nothing downloaded), and the token-level pieces they rely on are exact."""
import math
import os

import pytest
import torch

import fastkd
from fastkd.models import TinyCausalLM
from reference import reference_kd_loss
from paths import ROOT



pytestmark = pytest.mark.usefixtures("reproducible_cpu")


@pytest.mark.parametrize("cached", [False, True], ids=["online", "cached"])
@pytest.mark.parametrize("method", ["kd", "pseudo", "mse", "feature"])
def test_cifar_example_smoke(cifar, method, cached, tmp_path, capsys):
    argv = ["--smoke", "--quiet", "--device", "cpu", "--method", method] + (
        ["--cached", "--cache-dir", str(tmp_path)] if cached else [])
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


def test_lm_example_smoke_every_teacher_source(lm, tmp_path, capsys):
    results = lm.main(["--smoke", "--quiet", "--device", "cpu", "--cache-dir", str(tmp_path),
                       "--sources", "online", "dense", "topk", "sample"])
    sources = results["sources"]
    assert list(sources) == ["online", "dense", "topk", "sample"]
    # evaluated at the same steps (every step of the smoke run: 32 sequences / batch 16)
    assert all(list(r["perplexity_at_step"]) == [1, 2] for r in sources.values())
    # online and dense-cache students differ only through the fp16 rounding of the cache
    assert abs(sources["online"]["loss"] - sources["dense"]["loss"]) < 1e-2
    # top-16 (with the exact tail bucket) and 32 draws: the same two steps land near dense KD
    for source in ("topk", "sample"):
        for step, perplexity in sources[source]["perplexity_at_step"].items():
            dense = sources["dense"]["perplexity_at_step"][step]
            assert math.isfinite(perplexity) and abs(perplexity / dense - 1) < 0.1
    # byte-level text (V = 256): fp16 rows 512 B, top-16 68 B, 32 draws 32 x 3 B (+ labels)
    assert sources["online"]["cache_bytes_per_token"] is None
    assert sources["topk"]["cache_bytes_per_token"] < sources["sample"]["cache_bytes_per_token"] \
        < sources["dense"]["cache_bytes_per_token"] / 4
    out = capsys.readouterr().out
    assert "held-out perplexity at the same steps" in out and "top-16 cache" in out
    assert "sample-32 cache" in out


def test_lm_example_text_is_real_and_split(lm):
    """Byte tokens of Python's bundled documentation; held-out text never seen in training."""
    args = lm.parse_args(["--sequences", "40", "--min-len", "16", "--max-len", "32"])
    train, held_out = lm.make_datasets(args)
    assert len(train) == 40 and len(held_out) == 16
    text = lm.pydoc_bytes()
    first = bytes(train[0]["input_ids"].tolist())
    assert text.startswith(first) and b"assert" in text[:2000]
    split = len(text) * 9 // 10
    assert text[split:].startswith(bytes(held_out[0]["input_ids"].tolist()))
    assert torch.equal(train[3]["labels"][:-1], train[3]["input_ids"][1:])
    assert train[3]["labels"][-1] == lm.IGNORE_INDEX


def test_lm_topk_cache_with_every_class_equals_dense_cache(lm, tmp_path):
    """A top-V cache batched by collate_padded gives kd_loss (tail bucket, T = 2) the loss and
    gradient of the dense cache: the same fp16 logits, and the tail bucket is empty. The top-k
    lse is float32 logsumexp of the teacher's float32 row, the dense loss works from the fp16
    row: rtol 1e-3 (fp16 rounding of logits of magnitude < 8)."""
    torch.manual_seed(0)
    vocab = 24
    dataset = lm.MarkovTokens(6, vocab, 3, 9, seed=5)
    teacher = TinyCausalLM(vocab, dim=16, num_layers=1).eval()
    targets = {}
    for name, layout in (("dense", {}), ("topk", {"top_k": vocab, "temperature": 2.0})):
        fastkd.cache.write_cache(teacher, dataset, str(tmp_path / name), batch_size=4,
                                 progress=False, **layout)
        cached = fastkd.CachedDataset(dataset, fastkd.LogitCache(str(tmp_path / name)))
        input_ids, labels, targets[name] = lm.cached_batch([cached[i] for i in range(6)])
    assert isinstance(targets["topk"], fastkd.TopKLogits)
    student_logits = torch.randn(*labels.shape, vocab, generator=torch.Generator().manual_seed(1))
    losses, grads = {}, {}
    for name, target in targets.items():
        logits = student_logits.clone().requires_grad_()
        losses[name] = fastkd.kd_loss(logits, target, labels, temperature=2.0)
        losses[name].backward()
        grads[name] = logits.grad
    torch.testing.assert_close(losses["topk"], losses["dense"], rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(grads["topk"], grads["dense"], rtol=1e-3, atol=1e-5)
    assert bool((grads["topk"][labels == lm.IGNORE_INDEX] == 0).all())


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
    doc = os.path.join(ROOT, "docs", "methods.md")
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
