"""Sparse cache layouts: compact top-k rows with the log-sum-exp at several temperatures,
sampled rows (distinct ids with counts, ragged), their bytes per row, resume, reading and
batching into the sparse targets the loss takes (importance weights and the ragged storage in
detail: tests/cache/test_cache_sampled.py).

Tolerances: top-k values are fp16 (rtol 2**-10, atol 1e-4 against the float32 teacher); the
float32 lse against float32 ``torch.logsumexp`` of the same tempered rows, rtol/atol 1e-6.
Sampling is checked statistically with fixed seeds: every empirical frequency within 5 standard
deviations ``sqrt(p (1 - p) / K)`` of the teacher probability (about 6e-7 chance per class of a
correct sampler landing outside; with fixed seeds the outcome is deterministic anyway), and
exactly for what must hold always (counts sum to K, distinct ids, zero-probability classes
never drawn, byte-identical reruns).
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

import cache_helpers
import fastkd
from fastkd.cache import CacheError, CachedDataset, LogitCache, collate_padded, write_cache
from fastkd.cache import manifest as fmt
from fastkd.cache.convert import sample_rows
from fastkd.cache.ragged import pad_rows
from fastkd.cli import main as fastkd_main
from fastkd.models import TinyCausalLM, digits_dataset

FP16 = dict(rtol=2 ** -10, atol=1e-4)


def teacher_rows(teacher, data, index):
    with torch.inference_mode():
        return teacher(data[index]["input_ids"][None])[0].float()


def dense_weights(distinct, ids, weights, num_classes):
    """Ragged rows (what sample_rows returns) -> ``(R, V)`` float64 weights."""
    rows = torch.arange(len(distinct)).repeat_interleave(distinct)
    return torch.zeros(len(distinct), num_classes, dtype=torch.float64).index_put_(
        (rows, ids), weights.double(), accumulate=True)


def padded(distinct, ids, weights):
    """Ragged rows -> the ``(R, w)`` int64 ids and weights a cache read returns."""
    ids, weights = pad_rows(distinct.numpy(), ids.numpy(), weights.numpy(), np.int64)
    return torch.from_numpy(ids).long(), torch.from_numpy(weights)


class CrashingLM(nn.Module):
    """``cache_helpers.tiny_lm`` that raises on its ``fail_at``-th forward call (the counter is
    not part of the weights, so a rerun without it resumes the same cache)."""

    def __init__(self, fail_at=None):
        super().__init__()
        self.lm, self.fail_at, self.calls = cache_helpers.tiny_lm(), fail_at, 0

    def forward(self, input_ids):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated crash")
        return self.lm(input_ids)


# ----------------------------------------------------------------------------- bytes
@pytest.fixture(scope="module")
def vocab_32000(tmp_path_factory):
    """A 32000-token teacher over ~30 tokens: dense fp16, top-32 and sample-32 caches."""
    root = tmp_path_factory.mktemp("v32000")
    torch.manual_seed(0)
    teacher = TinyCausalLM(32000, dim=8, num_layers=1, num_heads=2, max_len=16).eval()
    data = cache_helpers.TokenSequences(n=4, vocab=32000)
    caches = {}
    for name, kwargs in (("dense", {}), ("top32", {"top_k": 32}), ("sample32", {"sample": 32})):
        write_cache(teacher, data, root / name, batch_size=4, progress=False, **kwargs)
        caches[name] = LogitCache(root / name)
    return caches


def test_bytes_per_token_at_vocab_32000(vocab_32000):
    """Top-32 at V = 32000: 64 B fp16 values + 64 B uint16 ids + 4 B lse = 132 B of teacher data
    per token (212 B in format version 1, labels included); labels once as int32 add 4."""
    top = vocab_32000["top32"].bytes_per_row
    assert top["teacher"] == 132 <= 132 and top["labels"] == 4
    sampled = vocab_32000["sample32"].bytes_per_row
    # per row a uint8 count of distinct ids, then per distinct id a uint16 id and a uint8 count
    # (this near-uniform teacher draws ~32 distinct ids of 32; a peaked one far fewer)
    distinct = fmt.mean_distinct(vocab_32000["sample32"].manifest)
    assert 30 < distinct <= 32
    assert sampled["teacher"] == pytest.approx(1 + distinct * (2 + 1), rel=1e-12)
    dense = vocab_32000["dense"].bytes_per_row
    assert dense["teacher"] == 64000 and dense["labels"] == 4
    for sizes in (top, sampled, dense):  # headers, lengths and offsets on ~30 rows
        assert sizes["teacher"] + sizes["labels"] < sizes["files"] < \
            sizes["teacher"] + sizes["labels"] + 200


def test_info_shows_bytes_per_row(vocab_32000, capsys):
    assert fastkd_main(["info", vocab_32000["top32"].path]) == 0
    out = capsys.readouterr().out
    assert f"v{fmt.FORMAT_VERSION}" in out and "top-32" in out and "lse at T=1" in out
    assert "bytes/row  132 teacher (values 64, indices 64, lse 4) + 4 labels" in out
    assert "dense fp16 would be 64,000" in out
    assert fastkd_main(["info", vocab_32000["sample32"].path]) == 0
    out = capsys.readouterr().out
    distinct = fmt.mean_distinct(vocab_32000["sample32"].manifest)
    assert "sample-32" in out and "32 draws, target for T=1, drawn at T=1 (counts) with " \
        f"seed 0; {distinct:.2f} distinct ids per row on average" in out
    assert f"teacher (distinct 1, indices 2 x {distinct:.2f}, counts 1 x {distinct:.2f})" in out


# ----------------------------------------------------------------------------- top-k, temperatures
def test_topk_stores_lse_at_each_temperature(tmp_path):
    data, teacher = cache_helpers.TokenSequences(n=6), cache_helpers.tiny_lm()
    manifest = write_cache(teacher, data, tmp_path / "c", top_k=5, temperature=[2.0, 1.0, 0.5],
                           batch_size=4, progress=False)
    assert manifest["temperatures"] == [2.0, 1.0, 0.5] and manifest["format_version"] == 3
    assert LogitCache(tmp_path / "c").temperature == 2.0  # the first listed by default
    for temperature in (2.0, 1.0, 0.5):
        cache = LogitCache(tmp_path / "c", temperature=temperature)
        for index in (0, 5):
            expected = teacher_rows(teacher, data, index)
            top = cache[index]
            assert isinstance(top, fastkd.TopKLogits) and top.temperature == temperature
            assert top.indices.dtype == torch.int32 and top.lse.dtype == torch.float32
            assert torch.equal(top.indices.long(), torch.topk(expected, 5).indices)
            torch.testing.assert_close(top.values.float(), torch.topk(expected, 5).values, **FP16)
            torch.testing.assert_close(top.lse, torch.logsumexp(expected / temperature, -1),
                                       rtol=1e-6, atol=1e-6)
            # tempered kept mass, from the cache alone, is the teacher's
            kept = torch.exp(top.values.float() / temperature - top.lse[:, None]).sum(-1)
            want = torch.softmax(expected / temperature, -1).gather(
                -1, torch.topk(expected, 5).indices).sum(-1)
            torch.testing.assert_close(kept, want, rtol=2e-3, atol=1e-5)
    with pytest.raises(CacheError, match=r"temperature\(s\) \[2.0, 1.0, 0.5\], not 3"):
        LogitCache(tmp_path / "c", temperature=3.0)
    with pytest.raises(ValueError, match="open it with LogitCache"):
        CachedDataset(data, LogitCache(tmp_path / "c"), temperature=1.0)
    item = CachedDataset(data, str(tmp_path / "c"), temperature=0.5)[1]
    assert item[2].temperature == 0.5


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": 2.0}, "temperature applies to top-k and sampled caches only"),
    ({"top_k": 3, "temperature": 0.0}, "temperature must be a positive finite number"),
    ({"top_k": 3, "temperature": [1.0, 1.0]}, "lists a value twice"),
    ({"sample": 8, "temperature": [1.0, 2.0]}, "is a target for one temperature"),
    ({"top_k": 3, "proposal_temperature": 2.0}, "applies to sampled caches only"),
    ({"sample": 3, "proposal_temperature": 0.0}, "must be a positive finite number"),
    ({"sample": 3, "proposal_temperature": float("nan")}, "must be a positive finite number"),
    ({"sample": 0}, r"sample \(--sample\) must be None or an int"),
    ({"sample": 4, "top_k": 4}, "two layouts; give one"),
    ({"sample": 4, "seed": -1}, r"seed \(--seed\) must be an int >= 0"),
    ({"sample": 4, "layout": "topk"}, "sampled exactly when sample is set"),
])
def test_bad_sparse_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        write_cache(cache_helpers.digits_teacher(), cache_helpers.indexed_images(), tmp_path / "c",
                    progress=False, **kwargs)


# ----------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sample_rows_follow_the_tempered_teacher(temperature):
    generator = torch.Generator().manual_seed(0)
    rows = 2 * torch.randn(4, 10, generator=generator)
    rows[:, 7] = -1e4  # probability exactly 0 in float64: never drawn
    draws = 20000
    uniforms = np.random.default_rng(0).random((4, draws))
    distinct, flat_ids, flat_counts = sample_rows(rows, draws, temperature, uniforms)
    assert distinct.tolist() == [9] * 4 and flat_ids.shape == flat_counts.shape == (36,)
    assert flat_counts.dtype == torch.int64 and bool((flat_counts > 0).all())
    ids, counts = padded(distinct, flat_ids, flat_counts)
    assert bool((counts.sum(-1) == draws).all())
    assert all(len(set(row.tolist())) == 9 for row in ids)  # distinct ids in every row
    frequency = dense_weights(distinct, flat_ids, flat_counts, 10) / draws
    probs = torch.softmax(rows.double() / temperature, -1)
    assert bool((frequency[:, 7] == 0).all())
    assert bool(((frequency - probs).abs() <= 5 * (probs * (1 - probs) / draws).sqrt() + 1e-12)
                .all()), (frequency - probs).abs().max()
    # most drawn first
    assert bool((counts[:, 1:] <= counts[:, :-1]).all())


def test_sample_rows_keep_only_the_distinct_ids():
    """Rows hold only the ids drawn: a class holding all the mass is one entry of count N."""
    rows = torch.full((3, 50), -30.0)
    rows[0, 40] = rows[1, 0] = rows[1, 3] = 30.0  # one or two classes hold all the mass
    rows[2] = torch.linspace(-1, 1, 50)
    distinct, ids, counts = sample_rows(rows, 6, 1.0, np.random.default_rng(1).random((3, 6)))
    assert distinct[:2].tolist() == [1, 2] and 1 <= int(distinct[2]) <= 6
    assert ids[:3].tolist()[0] == 40 and counts[0] == 6
    assert sorted(ids[1:3].tolist()) == [0, 3] and int(counts[1:3].sum()) == 6
    ids, counts = padded(distinct, ids, counts)
    for row in range(3):
        real = ids[row, :int(distinct[row])].tolist()
        assert len(set(real)) == len(real) and int(counts[row].sum()) == 6
    # more draws than classes: at most V distinct ids, each once
    distinct, ids, counts = sample_rows(rows[:, :4], 9, 1.0,
                                        np.random.default_rng(2).random((3, 9)))
    assert bool((distinct <= 4).all()) and int(counts.sum()) == 27


def test_sampled_cache_reads_as_sampled_targets(tmp_path):
    data, teacher = cache_helpers.TokenSequences(n=10), cache_helpers.tiny_lm()
    manifest = write_cache(teacher, data, tmp_path / "c", sample=300, temperature=2.0, seed=7,
                           batch_size=4, progress=False)
    assert manifest["layout"] == "sampled" and manifest["sample"] == 300
    assert manifest["temperatures"] == [2.0] and manifest["seed"] == 7
    shard = manifest["shards"][0]
    files = shard["files"]
    assert files["indices"]["dtype"] == "<u2" and files["counts"]["dtype"] == "<u2"
    assert files["distinct"]["dtype"] == "|u1"   # at most min(300, V) = 40 distinct ids
    assert files["indices"]["shape"] == files["counts"]["shape"] == [shard["entries"]]
    assert files["distinct"]["shape"] == [shard["row_stop"] - shard["row_start"]]
    cache = LogitCache(tmp_path / "c")
    assert cache.temperatures == [2.0]
    for index in (0, 9):
        target = cache[index]
        assert isinstance(target, fastkd.SampledTargets)
        assert target.indices.dtype == target.counts.dtype == torch.int32
        assert bool((target.counts.sum(-1) == 300).all())
        # draws of row r of sample i: numpy.random.default_rng([seed, i]), row after row
        expected = teacher_rows(teacher, data, index)
        uniforms = np.random.default_rng([7, index]).random((expected.shape[0], 300))
        ids, counts = padded(*sample_rows(expected, 300, 2.0, uniforms))
        assert torch.equal(target.indices.long(), ids) and torch.equal(target.counts.long(),
                                                                      counts)
        assert target.temperature == 2.0
    # the empirical target of all rows together is close to the tempered teacher on average
    rows = cache.rows(0, cache.num_rows)
    frequency = rows.probs(cache_helpers.TOKEN_VOCAB)
    everything = torch.cat([teacher_rows(teacher, data, i) for i in range(10)])
    probs = torch.softmax(everything / 2.0, -1)
    assert float((frequency - probs).abs().max()) < 5 * math.sqrt(0.25 / 300)
    # other seeds draw other samples; the same seed the same bytes
    again = write_cache(teacher, data, tmp_path / "same", sample=300, temperature=2.0, seed=7,
                        batch_size=4, progress=False)
    other = write_cache(teacher, data, tmp_path / "other", sample=300, temperature=2.0, seed=8,
                        batch_size=4, progress=False)
    sums = [[entry["sha256"] for entry in fmt.manifest_files(m)] for m in (manifest, again, other)]
    assert sums[0] == sums[1] and sums[0] != sums[2]


@pytest.mark.parametrize("layout", [{"sample": 16}, {"top_k": 4, "temperature": [1.0, 2.0]},
                                    {"sample": 16, "temperature": 2.0,
                                     "proposal_temperature": 1.0}])
def test_sparse_resume_after_a_crash_is_byte_identical(tmp_path, layout, capsys):
    """An exception partway (the teacher's 12th forward call); the rerun resumes after the last
    finished shard and the result matches an uninterrupted run byte for byte."""
    data = cache_helpers.TokenSequences(n=24)
    settings = dict(batch_size=3, shard_size_mb=12 * 64 / 2 ** 20, progress=False, **layout)
    write_cache(CrashingLM(), data, tmp_path / "reference", **settings)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_cache(CrashingLM(fail_at=12), data, tmp_path / "resumed", **settings)
    partial = fmt.read_manifest(str(tmp_path / "resumed"))
    assert partial["status"] == "incomplete" and 0 < len(partial["shards"])
    assert fastkd_main(["info", str(tmp_path / "resumed")]) == 0
    assert "cached so far" in capsys.readouterr().out
    write_cache(CrashingLM(), data, tmp_path / "resumed", **settings)
    reference = fmt.read_manifest(str(tmp_path / "reference"))
    resumed = fmt.read_manifest(str(tmp_path / "resumed"))
    for manifest in (reference, resumed):
        del manifest["created"], manifest["manifest_sha256"]
    assert resumed == reference and len(reference["shards"]) > len(partial["shards"])
    for entry in fmt.manifest_files(reference):
        assert (tmp_path / "reference" / entry["file"]).read_bytes() == \
            (tmp_path / "resumed" / entry["file"]).read_bytes()


# ----------------------------------------------------------------------------- batching
@pytest.mark.parametrize("layout", [{"top_k": 5, "temperature": 2.0}, {"sample": 8}])
def test_collate_batches_variable_length_sparse_rows(tmp_path, layout):
    data = cache_helpers.TokenSequences(n=8)
    write_cache(cache_helpers.tiny_lm(), data, tmp_path / "c", batch_size=4, progress=False,
                **layout)
    cache = LogitCache(tmp_path / "c")
    dataset = CachedDataset(data, cache)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_padded)
    inputs, labels, target = next(iter(loader))
    lengths = [len(data[i]["input_ids"]) for i in range(4)]
    # sampled rows are ragged: the batch is as wide as its widest row
    k = 5 if "top_k" in layout else max(cache[row].indices.shape[-1] for row in range(4))
    assert labels.shape == (4, max(lengths)) and target.indices.shape == (4, max(lengths), k)
    for row, length in enumerate(lengths):
        stored = cache[row]
        width = stored.indices.shape[-1]
        for got, want in zip(target.tensors(), stored.tensors()):
            got = got[row, :length]
            assert torch.equal(got[:, :width] if got.dim() == 2 else got, want)
        if isinstance(target, fastkd.SampledTargets):   # weight-0 padding entries
            assert bool((target.counts[row, :length, width:] == 0).all())
        padded = slice(length, None)
        assert bool((labels[row, padded] == -100).all())
        # padded rows: ids 0..k-1 and a valid uniform target
        assert bool((target.indices[row, padded] == torch.arange(k)).all())
        if isinstance(target, fastkd.TopKLogits):
            probs = torch.exp(target.values[row, padded].float() / 2.0 -
                              target.lse[row, padded, None])
            torch.testing.assert_close(probs.sum(-1), torch.ones(max(lengths) - length))
        else:
            assert bool((target.counts[row, padded] == 1).all())
    assert target.temperature == (2.0 if "top_k" in layout else 1.0)
    assert isinstance(target.temperature, float)
    # straight into the loss: finite, and no gradient at padded positions
    student = torch.randn(*labels.shape, cache_helpers.TOKEN_VOCAB, requires_grad=True)
    temperature = 2.0 if "top_k" in layout else 1.0
    loss = fastkd.kd_loss(student, target, labels, temperature=temperature)
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(student.grad).all())
    assert bool((student.grad[labels == -100] == 0).all())
    assert bool((student.grad[labels != -100].abs().sum(-1) > 0).all())


def test_collate_batches_one_row_per_sample(tmp_path):
    data = torch.utils.data.Subset(digits_dataset(), range(40))
    write_cache(cache_helpers.digits_teacher(), data, tmp_path / "c", sample=5, progress=False)
    loader = torch.utils.data.DataLoader(CachedDataset(data, LogitCache(tmp_path / "c")),
                                         batch_size=16, collate_fn=collate_padded)
    images, labels, target = next(iter(loader))
    assert images.shape == (16, 1, 8, 8) and labels.shape == (16,)
    rows = LogitCache(tmp_path / "c")[:16]
    assert isinstance(target, fastkd.SampledTargets)
    assert target.counts.shape == rows.counts.shape and 1 <= rows.counts.shape[1] <= 5
    assert torch.equal(target.counts, rows.counts) and torch.equal(target.indices, rows.indices)


def test_cli_sample_and_temperature(tmp_path, capsys):
    out = tmp_path / "c"
    assert cache_helpers.cache_digits(out, "--sample", "16", "--temperature", "3",
                                      "--seed", "5") == 0
    manifest = fmt.read_manifest(str(out))
    assert (manifest["sample"], manifest["temperatures"], manifest["seed"]) == (16, [3.0], 5)
    assert cache_helpers.cache_digits(tmp_path / "t", "--top-k", "3", "--temperature",
                                      "1", "2") == 0
    assert LogitCache(tmp_path / "t").temperatures == [1.0, 2.0]
    assert cache_helpers.cache_digits(tmp_path / "d", "--temperature", "2") == 1
    assert "temperature applies to top-k and sampled caches only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fastkd_main(["cache", "--teacher", "x:y", "--dataset", "digits", "--out", str(out),
                     "--top-k", "3", "--sample", "3"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_version_1_cache_is_not_resumed_or_extended(tmp_path):
    import shutil
    from paths import FIXTURES
    shutil.copytree(f"{FIXTURES}/v1-dense-digits", tmp_path / "v1")
    data = torch.utils.data.Subset(digits_dataset(), range(12))
    with pytest.raises(CacheError, match="format_version: cache has 1, asked 3"):
        write_cache(cache_helpers.digits_teacher(), data, tmp_path / "v1", batch_size=8,
                    shard_size_mb=5 * 20 / 2 ** 20, progress=False)


@pytest.mark.parametrize("layout", [{"top_k": 4}, {"sample": 5}, {"dtype": "bf16"}],
                         ids=["topk", "sampled", "dense-bf16"])
def test_gather_equals_reading_each_sample(tmp_path, layout):
    """``gather`` (rows copied with torch's index_select, unsigned ids and counts as their
    bits) returns exactly what reading each sample does, across shards, in any order, with
    negative indices, and inside one shard."""
    data = torch.utils.data.Subset(digits_dataset(), range(60))
    write_cache(cache_helpers.digits_teacher(), data, tmp_path / "c", batch_size=8,
                shard_size_mb=8 * 15 / 2 ** 20, progress=False, **layout)
    cache = LogitCache(tmp_path / "c")
    assert len(cache.manifest["shards"]) >= 3
    for order in ([59, 0, 17, -1, 33, 8, 8, 2], list(range(8, 16))[::-1], [5]):
        gathered = cache.gather(order)
        one_by_one = [cache[index] for index in order]
        if "dtype" in layout:
            assert gathered.dtype == torch.bfloat16
            assert torch.equal(gathered, torch.stack(one_by_one))
            continue
        fields = ("values", "indices", "lse") if "top_k" in layout else ("indices", "counts")
        for field in fields:
            # sampled rows are ragged: each row's entries, then weight-0 padding
            width = getattr(gathered, field).shape[-1] if "sample" in layout else None
            rows = [getattr(row, field) for row in one_by_one]
            if width is not None:
                rows = [torch.nn.functional.pad(row, (0, width - row.shape[-1])) for row in rows]
            assert torch.equal(getattr(gathered, field), torch.stack(rows)), field

