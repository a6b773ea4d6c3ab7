"""Caches written by older fastkd versions still read.

tests/fixtures/v1-* were written by fastkd 26bd65e (format version 1: int32 top-k ids, labels
int64 in every shard and again in labels.npy) with tests/fixtures/make_v1_fixtures.py. The
reader must return the very bytes stored there (compared exactly with a plain ``np.load`` of the
files) and the teacher outputs they came from (fp16 rounding: rtol 2**-10, atol 1e-4).
"""
import os
import shutil

import numpy as np
import pytest
import torch

import cache_helpers
from fastkd.cache import CachedDataset, LogitCache, collate_padded
from fastkd.cache import manifest as fmt
from fastkd.cli import main as fastkd_main
from fastkd.models import digits_dataset
from paths import FIXTURES

FP16 = dict(rtol=2 ** -10, atol=1e-4)


def _stored(directory, shard, array):
    entry = fmt.read_manifest(directory)["shards"][shard]["files"][array]
    return np.load(os.path.join(directory, entry["file"]), allow_pickle=False)


@pytest.fixture
def v1_copy(tmp_path):
    """A private copy, so reading can never touch the committed files."""
    def copy(name):
        shutil.copytree(os.path.join(FIXTURES, name), tmp_path / name)
        return str(tmp_path / name)
    return copy


def test_v1_topk_token_cache_reads(v1_copy, capsys):
    directory = v1_copy("v1-topk-tokens")
    cache = LogitCache(directory)
    cache.verify()
    assert cache.manifest["format_version"] == 1 and len(cache) == 6
    data = cache_helpers.TokenSequences(n=6)
    lengths = [len(item["input_ids"]) for item in data.items]
    assert cache.num_rows == sum(lengths) and len(cache.manifest["shards"]) == 2
    rows = cache.rows(0, cache.num_rows)
    stored = {name: np.concatenate([_stored(directory, s, name) for s in range(2)])
              for name in ("values", "indices", "lse")}
    assert torch.equal(rows.values, torch.from_numpy(stored["values"]))
    assert torch.equal(rows.indices.long(), torch.from_numpy(stored["indices"]).long())
    assert torch.equal(rows.lse, torch.from_numpy(stored["lse"]))
    teacher = cache_helpers.tiny_lm()
    for index in range(6):
        with torch.inference_mode():
            expected = teacher(data[index]["input_ids"][None])[0].float()
        top = cache[index]
        assert torch.equal(top.indices.long(), torch.topk(expected, 4).indices)
        torch.testing.assert_close(top.values.float(), torch.topk(expected, 4).values, **FP16)
        torch.testing.assert_close(top.lse, torch.logsumexp(expected, -1), rtol=1e-6, atol=1e-6)
    assert torch.equal(cache.labels, torch.cat([item["labels"] for item in data.items]))
    _, labels, teacher_rows = collate_padded([CachedDataset(data, cache)[i] for i in range(3)])
    assert labels.shape == teacher_rows.values.shape[:2] == (3, max(lengths[:3]))
    assert fastkd_main(["info", directory]) == 0
    assert "v1" in capsys.readouterr().out


def test_v1_dense_cache_reads(v1_copy):
    directory = v1_copy("v1-dense-digits")
    cache = LogitCache(directory)
    cache.verify()
    assert cache.manifest["format_version"] == 1 and len(cache) == 12
    stored = np.concatenate([_stored(directory, s, "logits") for s in range(3)])
    assert torch.equal(cache[:], torch.from_numpy(stored))
    images, labels = digits_dataset().tensors
    with torch.inference_mode():
        expected = cache_helpers.digits_teacher()(images[:12]).float()
    torch.testing.assert_close(cache[:].float(), expected, **FP16)
    assert torch.equal(cache.labels, labels[:12])
    item = CachedDataset(torch.utils.data.Subset(digits_dataset(), range(12)), cache)[5]
    assert item[1] == labels[5] and torch.equal(item[2], cache[5])
