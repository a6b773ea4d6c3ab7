"""Teacher-logit cache: end to end on the digits data, layouts, reading, errors. A damaged cache:
tests/cache/test_cache_damaged.py.

Tolerances: fp16 storage rounds each logit to 11 significant bits, so cached vs teacher rows
are compared with rtol 2**-10 (one fp16 ulp) and atol 1e-4 (batch-size-dependent float32
reductions); bf16 with rtol 2**-7; fp32 and exact-byte facts (top-k indices, labels, offsets)
exactly; the fp32 log-sum-exp against float32 ``torch.logsumexp`` with rtol 1e-6; top-k
log-probabilities with atol 2e-3 (fp16 rounding of logits below 4 in magnitude).
"""
import hashlib
import os

import numpy as np
import pytest
import torch
from torch import nn

import cache_helpers
import fastkd
from fastkd.cache import CacheError, CachedDataset, LogitCache, collate_padded, write_cache
from fastkd.cache import manifest as fmt
from fastkd.cache.specs import resolve_dataset, resolve_teacher, teacher_fingerprint
from fastkd.cli import main as fastkd_main
from fastkd.models import digits_dataset

FP16 = dict(rtol=2 ** -10, atol=1e-4)


def teacher_outputs(teacher, inputs):
    with torch.inference_mode():
        return teacher(inputs).float()


def test_cli_cache_matches_teacher(digits_cache, capsys):
    out, teacher = digits_cache
    images, labels = digits_dataset().tensors
    expected = teacher_outputs(teacher, images)
    cache = fastkd.LogitCache(out)
    manifest = cache.manifest
    assert (len(cache), cache.num_rows, cache.num_classes) == (1797, 1797, 10)
    assert manifest["dtype"] == "fp16" and manifest["layout"] == "dense"
    assert len(manifest["shards"]) == 6 and manifest["rows_per_shard"] == 300
    assert manifest["teacher"]["fingerprint"] == teacher_fingerprint(teacher)
    assert manifest["dataset"]["fingerprint"]["length"] == 1797
    assert manifest["dataset"]["spec"] == "digits"
    stored = cache[0:len(cache)]
    assert stored.dtype == torch.float16 and stored.shape == (1797, 10)
    torch.testing.assert_close(stored.float(), expected, **FP16)
    assert torch.equal(cache.labels, labels)
    # the teacher is real: its cached argmax agrees with the labels on most digits
    assert (stored.float().argmax(1) == labels).float().mean() > 0.9
    assert fastkd_main(["verify", str(out)]) == 0
    assert "ok:" in capsys.readouterr().out
    assert fastkd_main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "1797 samples" in info and "V=10" in info and "6 shards" in info
    assert "weights sha256" in info


def test_shards_are_plain_npy(digits_cache):
    out, _ = digits_cache
    manifest = fmt.read_manifest(str(out))
    for shard in manifest["shards"]:
        entry = shard["files"]["logits"]
        array = np.load(out / entry["file"], mmap_mode="r", allow_pickle=False)
        assert array.dtype == np.float16
        assert array.shape == (shard["row_stop"] - shard["row_start"], 10)
        assert os.path.getsize(out / entry["file"]) == entry["bytes"]
    # labels are stored once (format version 2): int32, in the shards, no labels.npy
    assert manifest["format_version"] == 3 and manifest["labels"] is None
    assert not (out / fmt.LABELS_NAME).exists()
    labels = np.concatenate([np.load(out / shard["files"]["labels"]["file"], allow_pickle=False)
                             for shard in manifest["shards"]])
    assert labels.dtype == np.int32 and labels.shape == (1797,)
    assert np.array_equal(labels, digits_dataset().tensors[1].numpy())


def test_indexing_slicing_gather(digits_cache):
    cache = LogitCache(digits_cache[0])
    everything = cache[:]
    assert torch.equal(cache[5], everything[5]) and torch.equal(cache[-1], everything[-1])
    assert torch.equal(cache[torch.tensor(7)], everything[7])
    # no two reads share memory (writing into one result cannot change another)
    assert cache[10:20].data_ptr() != cache[10].data_ptr()
    assert torch.equal(cache[290:310], everything[290:310])
    assert torch.equal(cache[3:1500:7], everything[3:1500:7])
    order = torch.randperm(len(cache), generator=torch.Generator().manual_seed(0))[:200]
    assert torch.equal(cache.gather(order), everything[order])
    assert torch.equal(cache.gather([-1, 0]), everything[[-1, 0]])
    assert cache.gather([]).shape == (0, 10)
    with pytest.raises(IndexError):
        cache[1797]
    with pytest.raises(IndexError):
        cache.gather([0, 1797])
    with pytest.raises(TypeError, match="index"):
        cache["3"]
    with pytest.raises(TypeError, match="indices"):
        cache.gather([0.5])
    with pytest.raises(TypeError, match="rows\\(\\) start must be an int, got float"):
        cache.rows(1.0, 2)
    assert torch.equal(cache.rows(np.int64(1), 3), everything[1:3])
    with pytest.raises(TypeError, match="LogitCache path must be a str or os.PathLike, got int"):
        LogitCache(5)


@pytest.mark.parametrize("device", ["gpu", 3.5, "cuda:x"])
def test_write_cache_names_a_device_it_cannot_read(tmp_path, device):
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda'"):
        write_cache(torch.nn.Linear(64, 10), digits_dataset(), tmp_path / "c", device=device)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_and_distributed_sampler(digits_cache, context):
    cache = LogitCache(digits_cache[0])
    cache[0]  # maps opened in the parent must not leak into the workers
    dataset = CachedDataset(digits_dataset(), cache)
    sampler = torch.utils.data.distributed.DistributedSampler(dataset, num_replicas=2, rank=1,
                                                              shuffle=True, seed=3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=128, sampler=sampler, num_workers=2,
                                         multiprocessing_context=context,
                                         pin_memory=torch.cuda.is_available())
    images, labels, logits = (torch.cat(parts) for parts in zip(*loader))
    indices = list(sampler)
    all_images, all_labels = digits_dataset().tensors
    assert torch.equal(images, all_images[indices]) and torch.equal(labels, all_labels[indices])
    assert torch.equal(logits.cpu(), cache.gather(indices))


def test_cached_dataset_refuses_other_data(digits_cache):
    cache = LogitCache(digits_cache[0])
    dataset = digits_dataset()
    with pytest.raises(ValueError, match="1000 items but the cache"):
        CachedDataset(torch.utils.data.Subset(dataset, range(1000)), cache)
    reversed_order = torch.utils.data.Subset(dataset, list(range(1796, -1, -1)))
    with pytest.raises(ValueError, match="fingerprint differs"):
        CachedDataset(reversed_order, cache)
    assert len(CachedDataset(reversed_order, cache, check_fingerprint=False)) == 1797


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("argv, message", [
    (["--teacher", "no_colon"], "expected 'package.module:attr'"),
    (["--teacher", "no_such_module_xyz:Model"], "cannot import module 'no_such_module_xyz'"),
    (["--teacher", "cache_helpers:missing"], "has no attribute 'missing'"),
    (["--teacher", "cache_helpers:TOKEN_VOCAB"], "expected an nn.Module"),
    (["--teacher", "torchvision:not_a_model"], "torchvision has no model"),
    (["--dataset", "cache_helpers:nope"], "has no attribute 'nope'"),
    (["--dataset", "cache_helpers:TOKEN_VOCAB"], "expected a map-style dataset"),
    (["--dataset", "torchvision:CIFAR10"], "needs --data-root"),
    (["--dataset", "torchvision:NoSuchSet", "--data-root", "."], "has no dataset class"),
])
def test_bad_specs_fail_with_a_clear_message(tmp_path, capsys, argv, message):
    options = dict(zip(argv[::2], argv[1::2]))
    full = ["cache", "--teacher", options.pop("--teacher", "cache_helpers:digits_teacher"),
            "--dataset", options.pop("--dataset", "digits"), "--out", str(tmp_path / "c"),
            "--quiet"] + [part for item in options.items() for part in item]
    assert fastkd_main(full) == 1
    assert message in capsys.readouterr().err


def test_missing_data_root_says_where_it_looked(tmp_path):
    root = tmp_path / "no-cifar-here"
    root.mkdir()
    with pytest.raises(FileNotFoundError, match=f"not found under --data-root {root}"):
        resolve_dataset("torchvision:CIFAR10", str(root))


def test_torchvision_teacher_and_checkpoint(tmp_path):
    teacher = resolve_teacher("torchvision:resnet18")
    assert isinstance(teacher, nn.Module)
    checkpoint = tmp_path / "wrong.pt"
    torch.save(cache_helpers.digits_teacher().state_dict(), checkpoint)
    with pytest.raises(ValueError, match="does not fit torchvision:resnet18") as caught:
        resolve_teacher("torchvision:resnet18", str(checkpoint))
    # one line, the first missing and unexpected keys, not all of resnet18's
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 700, caught.value
    assert 'Missing key(s) in state_dict: "conv1.weight"' in str(caught.value)
    with pytest.raises(ValueError, match="absent.pt: no such file"):
        resolve_teacher("cache_helpers:digits_teacher", str(tmp_path / "absent.pt"))
    with pytest.raises(ValueError, match="a directory, not a file"):
        resolve_teacher("cache_helpers:digits_teacher", str(tmp_path))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_teacher_fingerprint_is_sha256_of_the_state_dict_bytes(dtype):
    """The fingerprint a manifest stores, rebuilt here with hashlib from its definition (class
    name, then per tensor ``name|dtype|shape|`` and the raw bytes): a changed definition would
    make every cache written before it refuse to resume."""
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(6.0).reshape(2, 3) / 7)
        layer.bias.copy_(torch.tensor([-1.5, 0.25]))
    layer = layer.to(dtype)
    expected = hashlib.sha256(b"Linear")
    for name in ("weight", "bias"):
        tensor = getattr(layer, name).detach()
        expected.update(f"{name}|{dtype}|{tuple(tensor.shape)}|".encode())
        raw = tensor.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)
        expected.update(raw.numpy().tobytes())
    assert teacher_fingerprint(layer) == expected.hexdigest()


def test_mismatched_rerun_refuses_unless_overwrite(tmp_path):
    data = torch.utils.data.Subset(digits_dataset(), range(200))
    out = tmp_path / "c"
    first = write_cache(cache_helpers.digits_teacher(), data, out, progress=False)
    again = write_cache(cache_helpers.digits_teacher(), data, out, progress=False)
    assert again == first  # same settings, finished: nothing to do
    with pytest.raises(CacheError, match="dtype: cache has 'fp16', asked 'fp32'"):
        write_cache(cache_helpers.digits_teacher(), data, out, dtype="fp32", progress=False)
    with pytest.raises(CacheError, match="layout"):
        write_cache(cache_helpers.digits_teacher(), data, out, top_k=3, progress=False)
    other_teacher = cache_helpers.DigitsMLP()
    with pytest.raises(CacheError, match="teacher"):
        write_cache(other_teacher, data, out, progress=False)
    other_data = torch.utils.data.Subset(digits_dataset(), range(1, 201))
    with pytest.raises(CacheError, match="dataset"):
        write_cache(cache_helpers.digits_teacher(), other_data, out, progress=False)
    replaced = write_cache(cache_helpers.digits_teacher(), data, out, dtype="fp32",
                           overwrite=True, progress=False)
    assert replaced["dtype"] == "fp32" and LogitCache(out)[0].dtype == torch.float32
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not part of a fastkd cache"):
        write_cache(cache_helpers.digits_teacher(), data, foreign, progress=False)


class IntegerOutput(nn.Module):
    def forward(self, images):
        return images.flatten(1).long()


def test_a_teacher_output_that_is_not_floating_names_its_dtype(tmp_path):
    with pytest.raises(ValueError, match=r"floating \(B, V\) or \(B, L, V\) tensor, got a "
                                         r"torch.int64 tensor of shape \(16, 64\)"):
        write_cache(IntegerOutput(), cache_helpers.indexed_images(), tmp_path / "c",
                    batch_size=16, progress=False)
    assert not (tmp_path / "c").exists()


def test_bad_arguments(tmp_path):
    data = cache_helpers.indexed_images()
    teacher = cache_helpers.digits_teacher()
    for kwargs, message in [({"dtype": "fp8"}, r"dtype \(--dtype\) must be one of"),
                            ({"batch_size": 0}, r"batch_size \(--batch-size\) must be"),
                            ({"shard_size_mb": 0}, "shard_size_mb"),
                            ({"top_k": 0}, r"top_k \(--top-k\) must be"),
                            ({"top_k": 11}, "top_k=11 exceeds the teacher's 10 classes")]:
        with pytest.raises(ValueError, match=message):
            write_cache(teacher, data, tmp_path / "c", overwrite=True, progress=False, **kwargs)
    with pytest.raises(TypeError, match="teacher must be an nn.Module"):
        write_cache(lambda x: x, data, tmp_path / "c")


def test_nan_teacher_names_the_sample(tmp_path, capsys):
    with pytest.raises(ValueError, match="dataset sample 37 contains NaN"):
        write_cache(cache_helpers.nan_teacher(), cache_helpers.indexed_images(), tmp_path / "c",
                    batch_size=16, progress=False)
    assert fastkd_main(["cache", "--teacher", "cache_helpers:nan_teacher", "--dataset",
                        "cache_helpers:indexed_images", "--out", str(tmp_path / "d"),
                        "--clamp", "--quiet"]) == 1
    assert "dataset sample 37 contains NaN" in capsys.readouterr().err


def test_fp16_overflow_fails_or_clamps(tmp_path):
    data = cache_helpers.indexed_images()
    with pytest.raises(ValueError, match=r"sample 0 contains values beyond the fp16 range.*--clamp"):
        write_cache(cache_helpers.HugeLogits(), data, tmp_path / "a", progress=False)
    manifest = write_cache(cache_helpers.HugeLogits(), data, tmp_path / "b", clamp=True,
                           progress=False)
    raw = teacher_outputs(cache_helpers.HugeLogits(), torch.stack([x for x, _ in
                                                                   (data[i] for i in range(100))]))
    assert manifest["clamped_values"] == int((raw.abs() > 65504).sum()) > 0
    stored = LogitCache(tmp_path / "b")[:].float()
    torch.testing.assert_close(stored, raw.clamp(-65504, 65504), **FP16)
    wide = write_cache(cache_helpers.HugeLogits(), data, tmp_path / "c", dtype="fp32",
                       progress=False)
    assert wide["clamped_values"] == 0
    assert torch.equal(LogitCache(tmp_path / "c")[:], raw)


# ----------------------------------------------------------------------------- layouts
def test_bf16_and_fp32_storage(tmp_path):
    data = torch.utils.data.Subset(digits_dataset(), range(300))
    teacher = cache_helpers.digits_teacher()
    expected = teacher_outputs(teacher, digits_dataset().tensors[0][:300])
    write_cache(teacher, data, tmp_path / "bf16", dtype="bf16", progress=False)
    bf16 = LogitCache(tmp_path / "bf16")
    assert bf16[0].dtype == torch.bfloat16
    torch.testing.assert_close(bf16[:].float(), expected, rtol=2 ** -7, atol=1e-4)
    write_cache(teacher, data, tmp_path / "fp32", dtype="fp32", batch_size=300, num_workers=2,
                progress=False)
    assert torch.equal(LogitCache(tmp_path / "fp32")[:], expected)


def test_topk_layout(tmp_path):
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 100))
    data = torch.utils.data.Subset(digits_dataset(), range(500))
    expected = teacher_outputs(teacher, digits_dataset().tensors[0][:500])
    manifest = write_cache(teacher, data, tmp_path / "c", top_k=8, batch_size=500,
                           shard_size_mb=100 * (8 * 2 + 8 * 2 + 4) / 2 ** 20, progress=False)
    assert manifest["layout"] == "topk" and manifest["top_k"] == 8
    assert manifest["num_classes"] == 100 and len(manifest["shards"]) == 5
    # on disk: uint16 ids (V <= 65536), lse (R, 1) at T = 1; read back as int32 and (R,)
    files = manifest["shards"][0]["files"]
    assert files["indices"]["dtype"] == "<u2" and files["lse"]["shape"] == [100, 1]
    assert manifest["temperatures"] == [1.0]
    cache = LogitCache(tmp_path / "c")
    top = cache[:]
    want_values, want_indices = torch.topk(expected, 8, dim=-1)
    assert top.indices.dtype == torch.int32 and torch.equal(top.indices.long(), want_indices)
    assert top.values.dtype == torch.float16
    torch.testing.assert_close(top.values.float(), want_values, **FP16)
    assert top.lse.dtype == torch.float32
    torch.testing.assert_close(top.lse, torch.logsumexp(expected, -1), rtol=1e-6, atol=1e-6)
    one = cache[123]
    assert one.values.shape == (8,) and torch.equal(one.indices.long(), want_indices[123])
    gathered = cache.gather([499, 2])
    assert torch.equal(gathered.indices.long(), want_indices[[499, 2]])
    # exactly known tail mass: probabilities of the top-k plus the rest sum to 1
    tail = 1 - torch.exp(top.values.float() - top.lse[:, None]).sum(-1)
    assert bool((tail >= -1e-3).all()) and bool((tail < 1).all())
    # dense log-probabilities: exact at the kept classes, a distribution over all 100
    log_probs = top.log_probs(100)
    want_log_probs = torch.log_softmax(expected, -1)
    torch.testing.assert_close(log_probs.gather(-1, want_indices),
                               want_log_probs.gather(-1, want_indices), rtol=0, atol=2e-3)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(500), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="smaller than top-k"):
        top.log_probs(5)
    item = CachedDataset(data, cache)[7]
    assert isinstance(item[2], fastkd.cache.TopKLogits) and item[1] == digits_dataset()[7][1]
    cache.verify()


@pytest.mark.parametrize("top_k", [None, 5])
def test_variable_length_tokens(tmp_path, top_k):
    data = cache_helpers.TokenSequences()
    teacher = cache_helpers.tiny_lm()
    manifest = write_cache(teacher, data, tmp_path / "c", batch_size=8, dtype="fp32",
                           top_k=top_k, shard_size_mb=40 * 160 / 2 ** 20, progress=False)
    lengths = [len(item["input_ids"]) for item in data.items]
    assert manifest["rows_per_sample"] == "variable" and manifest["labels_per"] == "row"
    assert manifest["num_rows"] == sum(lengths) and manifest["num_classes"] == cache_helpers.TOKEN_VOCAB
    cache = LogitCache(tmp_path / "c")
    assert torch.equal(cache.offsets, torch.tensor([0] + np.cumsum(lengths).tolist()))
    assert torch.equal(cache.labels, torch.cat([item["labels"] for item in data.items]))
    for index in (0, 5, len(data) - 1):
        expected = teacher_outputs(teacher, data[index]["input_ids"][None])[0]
        if top_k is None:
            torch.testing.assert_close(cache[index], expected, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(cache[index].indices.long(), torch.topk(expected, top_k).indices)
    assert len(cache[2:6]) == 4 and len(cache.gather([3, 1])) == 2
    # a dataset item -> (inputs, per-token labels, rows); collate pads labels with ignore_index
    batch = [CachedDataset(data, cache)[i] for i in range(4)]
    inputs, labels, teacher_rows = collate_padded(batch)
    longest = max(lengths[:4])
    assert inputs["input_ids"].shape == (4, longest) and labels.shape == (4, longest)
    for row, length in enumerate(lengths[:4]):
        assert bool((labels[row, length:] == -100).all())
        assert torch.equal(labels[row, :length], data[row]["labels"])
        assert torch.equal(inputs["input_ids"][row, :length], data[row]["input_ids"])
    rows = teacher_rows.values if top_k else teacher_rows
    assert rows.shape[:2] == (4, longest)


def test_feature_cache(tmp_path):
    from fastkd.features import TeacherFeatures
    from fastkd.models import DigitsTeacherCNN
    torch.manual_seed(0)
    cnn = DigitsTeacherCNN().eval()
    data = torch.utils.data.Subset(digits_dataset(), range(64))
    manifest = write_cache(TeacherFeatures(cnn, "conv2"), data, tmp_path / "f", dtype="fp32",
                           batch_size=64, progress=False, layout="features")
    assert manifest["layout"] == "features"
    assert {name for shard in manifest["shards"] for name in shard["files"]} >= {"features"}
    cache = LogitCache(tmp_path / "f")
    assert "features" in repr(cache)
    features = cache[:]
    assert features.shape == (64, manifest["num_classes"]) == (64, 64 * 4 * 4)
    with torch.inference_mode():
        expected = TeacherFeatures(cnn, "conv2")(digits_dataset().tensors[0][:64])
    torch.testing.assert_close(features, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="layout must be one of"):
        write_cache(cnn, data, tmp_path / "g", layout="sparse", progress=False)
    with pytest.raises(ValueError, match="topk exactly when top_k is set"):
        write_cache(cnn, data, tmp_path / "g", layout="features", top_k=3, progress=False)


# ----------------------------------------------------------------------------- training
def _train_student(batches, steps_teacher, seed=0):
    torch.manual_seed(seed)
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    for images, labels, indices in batches:
        teacher_logits = steps_teacher(images, indices)
        loss = fastkd.kd_loss(student(images), teacher_logits, labels, temperature=2.0,
                              backend="torch")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return torch.cat([parameter.detach().reshape(-1) for parameter in student.parameters()])


def test_cached_logits_reproduce_online_distillation(digits_cache):
    out, teacher = digits_cache
    cache = LogitCache(out)
    images, labels = digits_dataset().tensors
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    batches = [(images[idx], labels[idx], idx) for idx in order[:640].split(64)]
    online = _train_student(batches, lambda x, _: teacher_outputs(teacher, x))
    online_fp16 = _train_student(batches, lambda x, _: teacher_outputs(teacher, x).half())
    cached = _train_student(batches, lambda _, idx: cache.gather(idx))
    # cached == online with the teacher rounded to fp16 (up to batch-size-dependent float32
    # last bits in the teacher, which can flip an fp16 rounding); online differs only by that
    torch.testing.assert_close(cached, online_fp16, rtol=1e-5, atol=1e-6)
    assert not torch.equal(cached, online)
    torch.testing.assert_close(cached, online, rtol=1e-2, atol=1e-3)


def test_torchvision_dataset_from_data_root(tmp_path):
    """A torchvision dataset class read from --data-root (ImageFolder of PNGs made here)."""
    from PIL import Image
    generator = np.random.default_rng(0)
    for class_name in ("cats", "dogs"):
        (tmp_path / "images" / class_name).mkdir(parents=True)
        for number in range(3):
            pixels = generator.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / class_name / f"{number}.png")
    dataset = resolve_dataset("torchvision:ImageFolder", str(tmp_path / "images"))
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    write_cache(teacher, dataset, tmp_path / "c", dtype="fp32", progress=False,
                dataset_spec="torchvision:ImageFolder")
    cache = LogitCache(tmp_path / "c")
    images = torch.stack([dataset[i][0] for i in range(6)])
    assert torch.equal(cache.labels, torch.tensor([0, 0, 0, 1, 1, 1]))
    torch.testing.assert_close(cache[:], teacher_outputs(teacher, images), rtol=1e-6, atol=1e-6)


def test_mixed_input_shapes_with_one_row_each(tmp_path):
    """Items of different shapes (run in equal-shape groups) still give one row per sample."""
    sizes = [8, 6, 8, 4, 6, 8, 4]
    images = [torch.rand(1, size, size, generator=torch.Generator().manual_seed(size + i))
              for i, size in enumerate(sizes)]
    data = [(image, i % 3) for i, image in enumerate(images)]
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 5, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    manifest = write_cache(teacher, data, tmp_path / "c", batch_size=4, dtype="fp32",
                           progress=False)
    assert manifest["rows_per_sample"] == 1 and manifest["num_rows"] == len(sizes)
    cache = LogitCache(tmp_path / "c")
    for index, image in enumerate(images):
        torch.testing.assert_close(cache[index], teacher_outputs(teacher, image[None])[0],
                                   rtol=1e-6, atol=1e-6)
    assert cache.labels.tolist() == [i % 3 for i in range(len(sizes))]


def test_info_on_an_incomplete_cache(tmp_path, capsys):
    with pytest.raises(ValueError, match="sample 37"):
        write_cache(cache_helpers.nan_teacher(), cache_helpers.indexed_images(), tmp_path / "c",
                    batch_size=8, shard_size_mb=16 * 20 / 2 ** 20, progress=False)
    assert fastkd_main(["info", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "incomplete" in out and "32 of 100 samples cached so far" in out
    assert fastkd_main(["verify", str(tmp_path / "c")]) == 1
    assert "incomplete" in capsys.readouterr().err


def test_teacher_spec_imports_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "my_local_teacher.py").write_text(
        "import torch\nteacher = torch.nn.Linear(64, 3)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path
                                     if p not in ("", str(tmp_path))])
    teacher = resolve_teacher("my_local_teacher:teacher")
    assert isinstance(teacher, nn.Linear) and teacher.out_features == 3


def test_spec_forms_resolve():
    """Module attributes that are instances, factory functions or classes all work."""
    assert len(resolve_dataset("cache_helpers:IndexedImages")) == 100  # a Dataset class
    assert len(resolve_dataset("cache_helpers:indexed_images")) == 100  # a factory
    assert len(resolve_dataset("digits")) == 1797
    assert isinstance(resolve_teacher("cache_helpers:DigitsMLP"), cache_helpers.DigitsMLP)
    assert isinstance(resolve_teacher("fastkd.models:DigitsTeacherCNN"), nn.Module)
