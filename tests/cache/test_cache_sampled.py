"""Sampled caches stored by distinct ids (format version 3) with importance weights for a
proposal temperature.

- The importance weights ``w_j = (c_j / N) p(j) / q(j)`` of draws from ``q = softmax(z / tau)``
  average to the dense target ``p = softmax(z / T)`` (float64, seeded). Each weight is a
  binomial count scaled by ``p / q``: ``Var[w_j] = p_j^2 (1 - q_j) / (q_j N)``, so the mean of
  ``M`` independent rows lies within ``6 p_j sqrt((1 - q_j) / (q_j N M))`` of ``p_j`` except
  with probability < 1e-8 per entry; the draws are seeded, so the outcome is fixed anyway.
- Bytes follow the distinct ids, not the draws; every read path returns the same rows (checked
  against the shard files decoded here with numpy), padded with weight-0 entries that the loss
  ignores (the loss equals a float64 dense reference on the densified target: float32
  tolerances rtol 1e-5, atol 1e-6).
- Damaged caches fail naming the file; a target for another temperature is refused by the loss.
- Version 2 sampled caches (tests/fixtures/v2-sampled-tokens) still read.
"""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import cache_helpers
import fastkd
from fastkd.cache import CacheError, CachedDataset, LogitCache, collate_padded, write_cache
from fastkd.cache import manifest as fmt
from fastkd.cache.convert import sample_rows
from fastkd.cli import main as fastkd_main
from fastkd.models import digits_dataset
from fastkd.tokens import collate_causal_lm, targets_from_dict
from paths import FIXTURES

FIXTURE_DIR = Path(FIXTURES)
VOCAB = cache_helpers.TOKEN_VOCAB


def dense_weights(distinct, ids, weights, num_classes):
    """Ragged rows (what sample_rows returns) -> ``(R, V)`` float64 weights."""
    rows = torch.arange(len(distinct)).repeat_interleave(distinct)
    return torch.zeros(len(distinct), num_classes, dtype=torch.float64).index_put_(
        (rows, ids), weights.double(), accumulate=True)


class SharpLM(nn.Module):
    """``cache_helpers.tiny_lm`` with its logits scaled by ``scale``: a peaked teacher."""

    def __init__(self, scale: float = 12.0):
        super().__init__()
        self.lm, self.scale = cache_helpers.tiny_lm(), scale

    def forward(self, input_ids):
        return self.lm(input_ids) * self.scale


# ----------------------------------------------------------------------------- the estimator
@pytest.mark.parametrize("temperature, proposal", [(1.0, 2.0), (2.0, 1.0), (1.5, 1.5)])
def test_importance_weights_average_to_the_dense_target(temperature, proposal):
    generator = torch.Generator().manual_seed(3)
    logits = 1.5 * torch.randn(3, 12, generator=generator, dtype=torch.float64)
    logits[1, 5] = float("-inf")   # a masked class: probability 0, never drawn
    sets, draws = 4000, 16
    rows = logits.repeat(sets, 1)
    uniforms = np.random.default_rng(0).random((len(rows), draws))
    distinct, ids, weights = sample_rows(rows, draws, temperature, uniforms, proposal)
    assert bool((weights > 0).all()) and int(distinct.sum()) == len(ids) == len(weights)
    # plain sampling (proposal = target) stores the counts c_j: the target is c_j / N
    scale = draws if proposal == temperature else 1
    mean = dense_weights(distinct, ids, weights, 12).view(sets, 3, 12).mean(0) / scale
    p = torch.softmax(logits / temperature, -1)
    q = torch.softmax(logits / proposal, -1)
    bound = 6 * p * ((1 - q) / (q.clamp_min(1e-300) * draws * sets)).sqrt()
    assert bool(((mean - p).abs() <= bound + 1e-12).all()), float((mean - p).abs().max())
    assert float(mean[1, 5]) == 0.0
    if proposal == temperature:   # plain sampling: integer counts, every row sums to N
        assert weights.dtype == torch.int64
        assert bool((dense_weights(distinct, ids, weights, 12).sum(-1) == draws).all())
    else:
        # the weights are not self-normalized: a row sums to 1 only on average
        sums = dense_weights(distinct, ids, weights, 12).sum(-1)
        assert float((sums - 1).abs().max()) > 1e-3 and abs(float(sums.mean()) - 1) < 0.02
        # the test has power: the draws' frequencies alone estimate q, far outside the bound
        frequency = dense_weights(distinct, ids, weights * (q / p)[
            torch.arange(len(rows)).repeat_interleave(distinct) % 3, ids], 12)
        assert bool(((frequency.view(sets, 3, 12).mean(0) - p).abs() > 5 * bound).any())


# ----------------------------------------------------------------------------- storage
def test_bytes_follow_the_distinct_ids(tmp_path, capsys):
    """50 draws of a peaked teacher keep a few ids per row: a uint8 row size, then per id a
    uint16 id and a uint8 count (format version 2 stored 50 entries per row: 150 bytes)."""
    data = cache_helpers.TokenSequences(n=8)
    manifest = write_cache(SharpLM(), data, tmp_path / "c", sample=50, batch_size=4,
                           progress=False)
    cache = LogitCache(tmp_path / "c")
    distinct = fmt.mean_distinct(manifest)
    entries = sum(shard["entries"] for shard in manifest["shards"])
    assert distinct == entries / cache.num_rows and 1 <= distinct < 8
    assert cache.bytes_per_row["teacher"] == pytest.approx(1 + 3 * distinct, rel=1e-12)
    assert cache.bytes_per_row["teacher"] < 25
    write_cache(cache_helpers.tiny_lm(), data, tmp_path / "flat", sample=50, batch_size=4,
                progress=False)
    assert fmt.mean_distinct(LogitCache(tmp_path / "flat").manifest) > 2 * distinct
    assert fastkd_main(["info", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert f"50 draws, target for T=1, drawn at T=1 (counts) with seed 0; {distinct:.2f} " \
        f"distinct ids per row on average" in out
    assert f"bytes/row  {1 + 3 * distinct:,.4g} teacher (distinct 1, indices 2 x " \
        f"{distinct:.2f}, counts 1 x {distinct:.2f})" in out


def decoded_rows(directory) -> list:
    """Every row of a ragged sampled cache as ``(ids, weights)`` numpy arrays, decoded from the
    shard files with numpy alone."""
    manifest = json.loads((Path(directory) / "manifest.json").read_text())
    weight = "weights" if "weights" in manifest["shards"][0]["files"] else "counts"
    rows = []
    for shard in manifest["shards"]:
        load = {name: np.load(Path(directory) / entry["file"])
                for name, entry in shard["files"].items()}
        ends = np.cumsum(load["distinct"].astype(np.int64))
        for stop, size in zip(ends, load["distinct"]):
            rows.append((load["indices"][stop - size:stop].astype(np.int64),
                         load[weight][stop - size:stop]))
    return rows


def assert_rows(target, rows, where=""):
    """``target`` ``(n, w)`` holds ``rows``: each row's entries, then id-0, weight-0 padding."""
    assert target.indices.shape == target.counts.shape == (len(rows), target.indices.shape[-1])
    assert target.indices.shape[-1] == max(len(ids) for ids, _ in rows), where
    for number, (ids, weights) in enumerate(rows):
        size = len(ids)
        assert target.indices[number, :size].tolist() == ids.tolist(), where
        assert np.array_equal(target.counts[number, :size].numpy(), weights), where
        assert not target.indices[number, size:].any() and not target.counts[number, size:].any()


@pytest.fixture(scope="module")
def token_caches(tmp_path_factory):
    """Token data (variable rows, 3+ shards): counts (T = 1) and importance weights (T = 2
    from a T = 1 proposal); the dataset."""
    root = tmp_path_factory.mktemp("sampled")
    data = cache_helpers.TokenSequences(n=10)
    for name, options in (("counts", {}), ("weights", {"temperature": 2.0,
                                                        "proposal_temperature": 1.0})):
        write_cache(SharpLM(2.0), data, root / name, sample=20, batch_size=4, progress=False,
                    shard_size_mb=12 * 81 / 2 ** 20, **options)
    return root, data


@pytest.mark.parametrize("kind", ["counts", "weights"])
def test_every_read_path_returns_the_stored_rows(token_caches, kind):
    root, data = token_caches
    cache = LogitCache(root / kind)
    assert len(cache.manifest["shards"]) >= 3 and cache.arrays[-1] == kind
    temperature = 2.0 if kind == "weights" else 1.0
    rows = decoded_rows(root / kind)
    offsets = cache.offsets.tolist()
    per_sample = [rows[offsets[i]:offsets[i + 1]] for i in range(len(cache))]
    for index in range(len(cache)):
        target = cache[index]
        assert target.temperature == temperature and target.num_classes == VOCAB
        assert target.counts.dtype == (torch.float32 if kind == "weights" else torch.int32)
        assert_rows(target, per_sample[index], f"cache[{index}]")
    for start, stop in ((0, cache.num_rows), (3, 40), (offsets[4], offsets[7])):
        assert_rows(cache.rows(start, stop), rows[start:stop], f"rows({start}, {stop})")
    for target, sample in zip(cache[2:6], per_sample[2:6]):
        assert_rows(target, sample, "slice")
    dataset = CachedDataset(data, cache)
    items = [dataset[i] for i in range(5)]
    _, labels, batch = collate_padded(items)
    tokens = collate_causal_lm(items)
    as_dict = targets_from_dict(collate_causal_lm(items, targets_as_dict=True)["teacher_targets"])
    for padded in (batch, tokens["teacher_targets"], as_dict):
        assert padded.temperature == temperature and isinstance(padded.temperature, float)
        width = max(len(ids) for sample in per_sample[:5] for ids, _ in sample)
        assert padded.indices.shape[-1] == width
        for number, sample in enumerate(per_sample[:5]):
            stored = padded.map_tensors(lambda part, n=number: part[n, :len(sample)])
            assert_rows(stored.map_tensors(lambda part: part[:, :max(
                len(ids) for ids, _ in sample)]), sample, f"collated item {number}")
            assert not stored.counts[:, max(len(ids) for ids, _ in sample):].any()
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, collate_fn=collate_padded)
    _, _, first = next(iter(loader))
    assert all(torch.equal(a, b) for a, b in zip(first.tensors(), batch.tensors()))


def test_one_row_per_sample_reads_and_gathers(tmp_path):
    data = torch.utils.data.Subset(digits_dataset(), range(60))
    write_cache(cache_helpers.digits_teacher(), data, tmp_path / "c", sample=12,
                temperature=0.5, proposal_temperature=2.0, batch_size=8,
                shard_size_mb=8 * 61 / 2 ** 20, progress=False)
    cache = LogitCache(tmp_path / "c")
    rows = decoded_rows(tmp_path / "c")
    assert len(cache.manifest["shards"]) >= 3 and len(rows) == 60
    for index in (0, 17, 59, -1):
        target = cache[index]
        assert target.indices.dim() == 1 and target.temperature == 0.5
        assert_rows(target.map_tensors(lambda part: part[None]), [rows[index]])
    assert_rows(cache[5:40], rows[5:40])
    order = [59, 0, 17, -1, 33, 8, 8, 2]
    assert_rows(cache.gather(order), [rows[i] for i in order], "gather")
    assert_rows(cache.gather([9]), [rows[9]], "gather one")
    _, _, batch = collate_padded([CachedDataset(data, cache)[i] for i in order])
    assert_rows(batch, [rows[i] for i in order], "collate_padded")


def test_the_loss_on_padded_reads_equals_the_dense_target(token_caches):
    """Weight-0 padding entries add nothing: kd_loss on a collated batch equals the float64
    forward KL against the densified (self-normalized) target, loss and gradient."""
    root, data = token_caches
    cache = LogitCache(root / "weights")
    _, labels, target = collate_padded([CachedDataset(data, cache)[i] for i in range(4)])
    student = torch.randn(*labels.shape, VOCAB, generator=torch.Generator().manual_seed(1))
    leaf = student.clone().requires_grad_()
    loss = fastkd.kd_loss(leaf, target, labels, temperature=2.0, soft_weight=1.0,
                          hard_weight=0.0, reduction="sum")
    (grad,) = torch.autograd.grad(loss, leaf)
    reference = student.double().requires_grad_()
    probs = target.probs(VOCAB).double()
    kept = labels != -100
    log_q = torch.log_softmax(reference / 2.0, -1)
    terms = torch.where(probs > 0, probs * (probs.clamp_min(1e-300).log() - log_q), 0.0)
    expected = 4.0 * terms.sum(-1)[kept].sum()
    (expected_grad,) = torch.autograd.grad(expected, reference)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-6)
    assert not grad[~kept].any()


# ----------------------------------------------------------------------------- bad input
def damaged(token_caches, tmp_path, kind, edit):
    """A copy of a token cache whose shard-0 arrays ``edit`` changes in place (same sizes)."""
    root, _ = token_caches
    target = tmp_path / kind
    shutil.copytree(root / kind, target)
    files = fmt.read_manifest(str(target))["shards"][0]["files"]
    arrays = {name: np.load(target / entry["file"]) for name, entry in files.items()}
    edit(arrays)
    for name, entry in files.items():
        np.save(target / entry["file"], arrays[name])
    return target, files


@pytest.mark.parametrize("kind, edit, array, message", [
    ("counts", lambda a: a["distinct"].__setitem__(0, a["distinct"][0] + 1), "distinct",
     r"distinct ids add up to \d+ entries but .*indices.npy holds"),
    ("counts", lambda a: a["distinct"].__setitem__(1, 0), "distinct",
     "row 1 holds 0 distinct ids; expected 1 to 20"),
    ("counts", lambda a: a["indices"].__setitem__(3, VOCAB), "indices",
     rf"class id {VOCAB} outside \[0, {VOCAB}\)"),
    ("counts", lambda a: a["counts"].__setitem__(2, 0), "counts", "entry 2 .* has weight 0"),
    ("weights", lambda a: a["weights"].__setitem__(4, np.nan), "weights",
     "entry 4 .* has weight nan"),
    ("weights", lambda a: a["weights"].__setitem__(0, -0.25), "weights",
     "entry 0 .* has weight -0.25"),
    ("weights", lambda a: a["weights"].__setitem__(1, np.inf), "weights", "weight inf"),
    ("weights", lambda a: a["weights"].__setitem__(slice(0, int(a["distinct"][0])), 0.0),
     "weights", "the weights of row 0 sum to 0"),
], ids=["sizes-add-up", "empty-row", "id-range", "zero-count", "nan", "negative", "inf",
        "zero-row"])
def test_damaged_ragged_rows_fail_naming_the_file(token_caches, tmp_path, kind, edit, array,
                                                   message, capsys):
    directory, files = damaged(token_caches, tmp_path, kind, edit)
    cache = LogitCache(directory)   # sizes are intact: the rows are checked when first read
    for read in (lambda: cache[0], lambda: cache.rows(0, 2),
                 lambda: CachedDataset(token_caches[1], cache)[0]):
        with pytest.raises(CacheError, match=message) as caught:
            read()
        assert files[array]["file"] in str(caught.value)
    assert "damaged" in str(caught.value)
    assert len(cache[len(cache) - 1].indices)   # other shards still read
    # with the checksums recomputed (anyone can), verify still refuses it, naming the file
    manifest = fmt.read_manifest(str(directory))
    for entry in manifest["shards"][0]["files"].values():
        entry["sha256"] = fmt.file_sha256(str(directory / entry["file"]))
    fmt.write_manifest(str(directory), manifest)
    with pytest.raises(CacheError, match=message):
        LogitCache(directory).verify()
    assert fastkd_main(["verify", str(directory)]) == 1
    err = capsys.readouterr().err
    assert files[array]["file"] in err and "Traceback" not in err


def test_an_importance_weight_that_rounds_to_zero_reads(token_caches, tmp_path):
    """A tail id's weight p / q may round to 0 in float32: it reads (as a weight-0 entry, which
    the loss treats as padding) as long as its row keeps a positive weight."""
    def zero_second(arrays):
        assert arrays["distinct"][0] >= 2
        arrays["weights"][1] = 0.0
    directory, _ = damaged(token_caches, tmp_path, "weights", zero_second)
    cache = LogitCache(directory)
    assert float(cache.rows(0, 1).counts[0, 1]) == 0.0 and float(cache.rows(0, 1).counts[0, 0]) > 0


def test_the_writer_refuses_weights_float32_cannot_hold(tmp_path):
    """p / q beyond float32 (a proposal far from T on a peaked teacher) stops the run with a
    sentence, never a cache that reads fail on."""
    with pytest.raises(ValueError, match="do not fit float32 .* choose a proposal temperature "
                                         "closer to T"):
        # a nearly uniform proposal misses the one id that holds p in some row: every drawn
        # id's p / q is exp(-thousands), 0 in float32
        write_cache(SharpLM(400.0), cache_helpers.TokenSequences(n=2), tmp_path / "c",
                    sample=4, temperature=0.05, proposal_temperature=1e4, progress=False)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["shards"][0].__setitem__("entries", m["shards"][0]["entries"] + 1),
     r"(indices|counts).npy has shape \[\d+\]; expected \d+ entries"),
    (lambda m: m["shards"][0].pop("entries"), "'entries' must be an integer"),
    (lambda m: m.__setitem__("proposal_temperature", -1.0), "positive proposal_temperature"),
    (lambda m: m.__setitem__("temperatures", [1.0, 2.0]), "one target temperature"),
], ids=["entries", "no-entries", "proposal", "two-temperatures"])
def test_a_damaged_ragged_manifest_fails_on_open(token_caches, tmp_path, edit, message, capsys):
    root, _ = token_caches
    shutil.copytree(root / "counts", tmp_path / "c")
    manifest = fmt.read_manifest(str(tmp_path / "c"))
    edit(manifest)
    fmt.write_manifest(str(tmp_path / "c"), manifest)
    with pytest.raises(CacheError, match=message):
        LogitCache(tmp_path / "c")
    assert fastkd_main(["verify", str(tmp_path / "c")]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_the_loss_refuses_a_target_for_another_temperature(token_caches):
    root, data = token_caches
    for kind, made_for, other in (("counts", 1.0, 2.0), ("weights", 2.0, 1.0)):
        _, labels, target = collate_padded([CachedDataset(data, LogitCache(root / kind))[i]
                                            for i in range(2)])
        student = torch.randn(*labels.shape, VOCAB)
        assert torch.isfinite(fastkd.kd_loss(student, target, labels, temperature=made_for))
        message = (rf"temperature={made_for} \(the temperature the sampled target is for\) "
                   rf"differs from the loss temperature={other}; sample the cache for that "
                   rf"temperature \(fastkd cache --sample N --temperature {other}\)")
        for tail in ("bucket", "renormalize"):
            with pytest.raises(ValueError, match=message):
                fastkd.kd_loss(student, target, labels, temperature=other, tail=tail)
        hidden = torch.randn(*labels.shape, 8)
        with pytest.raises(ValueError, match=message):
            fastkd.linear_kd_loss(hidden, torch.randn(VOCAB, 8), target, labels,
                                  temperature=other)
    # a hand-made target is for T = 1 unless it says otherwise
    made = fastkd.SampledTargets(torch.tensor([[0, 1]]), torch.tensor([[3, 1]]))
    assert made.temperature == 1.0
    with pytest.raises(ValueError, match="sampled target is for"):
        fastkd.kd_loss(torch.randn(1, 4), made, temperature=2.0)
    fastkd.kd_loss(torch.randn(1, 4), fastkd.SampledTargets(*made.tensors(), 0, 2.0), temperature=2.0)


def test_the_topk_temperature_error_points_to_recaching():
    student = torch.randn(2, 10)
    top = student.topk(3, -1)
    target = fastkd.TopKLogits(top.values, top.indices, student.logsumexp(-1), 1.0)
    with pytest.raises(ValueError) as caught:
        fastkd.kd_loss(student, target, temperature=2.0)
    message = str(caught.value)
    assert "fastkd cache --top-k K --temperature 2.0" in message
    assert "fastkd cache --sample N --temperature 2.0" in message
    assert "renormalize" not in message


# ----------------------------------------------------------------------------- CLI, versions
def test_cli_proposal_temperature(tmp_path, capsys):
    out = tmp_path / "c"
    assert cache_helpers.cache_digits(out, "--sample", "32", "--temperature", "2",
                                      "--proposal-temperature", "1") == 0
    manifest = fmt.read_manifest(str(out))
    assert (manifest["format_version"], manifest["sample"], manifest["temperatures"],
            manifest["proposal_temperature"]) == (fmt.FORMAT_VERSION, 32, [2.0], 1.0)
    assert "weights" in manifest["shards"][0]["files"]
    assert fastkd_main(["info", str(out)]) == 0
    assert "32 draws, target for T=2, drawn at T=1 (importance weights)" in \
        capsys.readouterr().out
    assert cache_helpers.cache_digits(tmp_path / "t", "--top-k", "3",
                                      "--proposal-temperature", "2") == 1
    err = capsys.readouterr().err
    assert "--proposal-temperature) applies to sampled caches only" in err
    assert "Traceback" not in err


def test_a_version_2_sampled_cache_still_reads(tmp_path, capsys):
    shutil.copytree(FIXTURE_DIR / "v2-sampled-tokens", tmp_path / "v2")
    cache = LogitCache(tmp_path / "v2")
    cache.verify()
    assert cache.manifest["format_version"] == 2 and cache.temperature == 2.0
    assert cache.arrays == ["indices", "counts"] and len(cache.manifest["shards"]) == 2
    raw = {name: np.concatenate([np.load(tmp_path / "v2" / shard["files"][name]["file"])
                                 for shard in cache.manifest["shards"]])
           for name in ("indices", "counts")}
    offsets = cache.offsets.tolist()
    for index in range(len(cache)):
        target = cache[index]
        assert target.temperature == 2.0 and target.indices.shape[-1] == 8
        assert np.array_equal(target.indices.numpy(), raw["indices"][offsets[index]:
                                                                     offsets[index + 1]])
        assert np.array_equal(target.counts.numpy(), raw["counts"][offsets[index]:
                                                                   offsets[index + 1]])
    assert bool((torch.from_numpy(raw["counts"].astype(np.int64)).sum(-1) == 8).all())
    data = cache_helpers.TokenSequences(n=6)
    items = [CachedDataset(data, cache)[i] for i in range(4)]
    _, labels, batch = collate_padded(items)
    tokens = collate_causal_lm(items)
    for target in (batch, tokens["teacher_targets"]):
        assert target.indices.shape[-1] == 8 and target.temperature == 2.0
    student = torch.randn(*labels.shape, VOCAB)
    assert math.isfinite(float(fastkd.kd_loss(student, batch, labels, temperature=2.0)))
    with pytest.raises(ValueError, match="sampled target is for"):
        fastkd.kd_loss(student, batch, labels, temperature=1.0)
    assert fastkd_main(["info", str(tmp_path / "v2")]) == 0
    out = capsys.readouterr().out
    assert "v2" in out and "8 draws at T=2 with seed 3" in out
    assert "bytes/row  24 teacher (indices 16, counts 8)" in out
