"""``fastkd import --from distillkit|axolotl``: the shipped samples
(tests/fixtures/distillkit-sample, tests/fixtures/axolotl-sample, written by make_samples.py with
fastkd's own encoder) import row by row equal to what they store, decoded here independently
(direct float and bit-string reads of the stored bytes); bad input ends in one sentence naming
file and row; an interrupted import resumes to the same bytes; imported rows train with
``kd_loss``. ``fastkd export --to parquet``: tests/cache/test_export_parquet.py."""
import importlib.util
import math
import os
import shutil

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
yaml = pytest.importorskip("yaml")

from fastkd.cache import distillkit  # noqa: E402
from fastkd.cache import manifest as fmt  # noqa: E402
from fastkd.cache.distillkit_codec import parse_config  # noqa: E402
from distillkit_encode import encode_indices, encode_logprobs  # noqa: E402
from fastkd.cache.reader import LogitCache  # noqa: E402
from cache_helpers import import_dataset, run_cli  # noqa: E402
from paths import FIXTURES  # noqa: E402

SAMPLE = os.path.join(FIXTURES, "distillkit-sample")
AXOLOTL = os.path.join(FIXTURES, "axolotl-sample")
_spec = importlib.util.spec_from_file_location("make_samples",
                                               os.path.join(SAMPLE, "make_samples.py"))
samples = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(samples)


def stored_rows(directory):
    rows = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".parquet"):
            rows += pq.read_table(os.path.join(directory, name)).to_pylist()
    return rows


def bit_fields(raw, bits, count):
    """Independent id reader: the bytes as one bit string, cut into ``bits``-wide fields."""
    stream = "".join(f"{byte:08b}" for byte in raw)
    return [int(stream[i * bits:(i + 1) * bits], 2) for i in range(count)]


# ----------------------------------------------------------------------------- DistillKit
def test_distillkit_sample_imports_what_it_stores(tmp_path):
    """Curve [1, t, t^2, sqrt t] + one 4-bit residual bin + delta encoding, decoded in float64
    from the raw bytes: the cache holds those values (float32), the ids, lse 0, and
    next-token labels of the tokens without DistillKit's appended pad."""
    assert import_dataset(os.path.join(SAMPLE, "distillkit"), tmp_path / "c") == 0
    cache = LogitCache(tmp_path / "c")
    cache.verify()
    known = samples.distillkit_sequences()
    rows = stored_rows(os.path.join(SAMPLE, "distillkit"))
    assert len(cache) == len(rows) == len(known) == 5
    assert cache.num_classes == 4096 and cache.manifest["top_k"] == 16
    t = np.arange(12, dtype=np.float64)
    design = np.stack([np.ones(12), t, t * t, np.sqrt(t)], axis=1)
    for index, (row, (tokens, logprobs, ids)) in enumerate(zip(rows, known)):
        target = cache[index]
        positions = len(row["input_ids"]) - 1
        assert target.values.shape == (positions, 16)
        for j in range(positions):
            raw = bytes(row["compressed_logprobs"][j])
            deltas = np.frombuffer(raw[:16], "<f4").astype(np.float64)
            coeffs = np.frombuffer(raw[16:32], "<f4").astype(np.float64)
            scale = float(np.frombuffer(raw[32:34], "<f2")[0])
            codes = np.array(bit_fields(raw[34:38], 4, 8))
            residual = np.concatenate([(codes - 8) * scale, np.zeros(4)])
            expected = np.cumsum(np.concatenate([deltas, design @ coeffs + residual]))
            np.testing.assert_allclose(target.values[j].numpy(), expected, rtol=0, atol=2e-5)
            assert target.values[j, :4].tolist() == np.cumsum(deltas).astype(np.float32).tolist()
            assert bit_fields(bytes(row["bytepacked_indices"][j]), 12, 16) == \
                target.indices[j].tolist() == ids[j].tolist()
        assert abs(target.values[:, 0].numpy() - logprobs[:, 0]).max() < 1e-6  # exact part
        assert (target.lse == 0).all()
        labels = cache.sample_labels(index).tolist()
        assert labels == list(tokens[1:positions]) + [-100]
        assert row["input_ids"][-1] == samples.PAD  # the appended pad has no row


def test_the_token_items_match_a_token_dataset_of_the_same_tokens(tmp_path):
    """The cache's dataset fingerprint is that of a TokenDataset of input_ids[:-1], so
    ``CachedDataset(TokenDataset(...), cache)`` pairs them."""
    from fastkd.cache.reader import CachedDataset
    from fastkd.cache.specs import dataset_fingerprint
    from fastkd.tokens import TokenDataset
    assert import_dataset(os.path.join(SAMPLE, "distillkit"), tmp_path / "c") == 0
    tokens = TokenDataset([{"input_ids": row["input_ids"][:-1]}
                           for row in stored_rows(os.path.join(SAMPLE, "distillkit"))])
    cache = LogitCache(tmp_path / "c")
    assert dataset_fingerprint(tokens) == cache.manifest["dataset"]["fingerprint"]
    model_input, labels, targets = CachedDataset(tokens, cache)[3]
    assert len(model_input["input_ids"]) == len(labels) == targets.values.shape[0]


def test_open_instruct_sample_is_lossless_and_has_no_pad(tmp_path):
    """bfloat16 exact top-8, no delta: the values are the known log-probs rounded to bfloat16
    (read here straight from the bytes), ids equal; open-instruct appends no pad, so the last
    input id (a real token) is the one left out."""
    assert import_dataset(os.path.join(SAMPLE, "open-instruct"), tmp_path / "c") == 0
    cache = LogitCache(tmp_path / "c")
    rows = stored_rows(os.path.join(SAMPLE, "open-instruct"))
    known = samples.teacher_rows(2, lengths=(6, 10, 4), k=8)
    for index, (row, (tokens, logprobs, ids)) in enumerate(zip(rows, known)):
        raw = np.array(row["compressed_logprobs"], np.uint8)
        bf16 = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        assert cache[index].values.numpy().tolist() == bf16.tolist()
        assert np.abs(bf16 - logprobs).max() <= 2 ** -7 * np.abs(logprobs).max()
        assert cache[index].indices.numpy().tolist() == ids.tolist()
        assert cache.sample_labels(index).tolist() == list(tokens[1:-1]) + [-100]


def test_legacy_layout_with_a_training_config(tmp_path):
    """packed_indices (LSB-first uint64 words), exact_values and coeffs of a curve in
    a = 1..k-exact_k with terms a^0, a^-1, a^-2, sqrt(a): read with the training config."""
    directory = os.path.join(SAMPLE, "legacy")
    assert import_dataset(directory, tmp_path / "c", "--compression-config",
                   os.path.join(directory, "distillkit-train.yaml")) == 0
    cache = LogitCache(tmp_path / "c")
    a = np.arange(1, 9, dtype=np.float64)
    design = np.stack([np.ones(8), 1 / a, 1 / (a * a), np.sqrt(a)], axis=1)
    for index, (row, (_, _, ids)) in enumerate(zip(stored_rows(directory),
                                                   samples.teacher_rows(3, (5, 8), k=12))):
        target = cache[index]
        for j, words in enumerate(row["packed_indices"]):
            fields = [(word >> (12 * i)) & 0xFFF for word in words for i in range(5)][:12]
            assert fields == target.indices[j].tolist() == ids[j].tolist()
            expected = np.concatenate([row["exact_values"][j],
                                       design @ np.array(row["coeffs"][j], np.float64)])
            np.testing.assert_allclose(target.values[j].numpy(), expected, rtol=0, atol=1e-5)
    # without the training config the directory has no compression_config.yaml
    assert import_dataset(directory, tmp_path / "d") == 1


# ----------------------------------------------------------------------------- axolotl
@pytest.mark.parametrize("offset", [1, 0])
def test_axolotl_sample_imports_what_it_stores(tmp_path, offset):
    """fastkd row j is axolotl row j + offset (default 1: axolotl's writers store row p over
    token p; 0 as its Liger trainer pairs them); attended tokens only (less the last with
    offset 1); rows with target_mask 0 get label -100, which with offset 1 is exactly where the
    next-token label is -100 anyway, so a TokenDataset of the same tokens matches."""
    from fastkd.cache.specs import dataset_fingerprint
    from fastkd.tokens import TokenDataset
    extra = () if offset == 1 else ("--row-offset", 0)
    assert import_dataset(AXOLOTL, tmp_path / "c", "--vocab-size", 4096, *extra,
                   source="axolotl") == 0
    cache = LogitCache(tmp_path / "c")
    cache.verify()
    assert cache.num_classes == 4096 and cache.manifest["top_k"] == 8
    token_rows = []
    for index, (tokens, attention, labels, ids, logprobs, mask) in enumerate(
            samples.axolotl_rows()):
        length = int(attention.sum()) - offset
        rows = slice(offset, offset + length)
        target = cache[index]
        assert target.values.numpy().tolist() == logprobs[rows].astype(np.float32).tolist()
        assert target.indices.numpy().tolist() == ids[rows].tolist()
        expected = [int(labels[j + 1]) if j + 1 < length and mask[j + offset].all() else -100
                    for j in range(length)]
        assert cache.sample_labels(index).tolist() == expected
        assert np.all(target.lse.numpy() < 1e-6)  # axolotl's rows sum to 1 (float rounding)
        token_rows.append({"input_ids": tokens[:length].tolist(),
                           "labels": labels[:length].tolist()})
    if offset == 1:
        assert dataset_fingerprint(TokenDataset(token_rows)) == \
            cache.manifest["dataset"]["fingerprint"]
        # the last prompt token's row predicts the first completion token: kept, finite
        prompt, labels = samples.AXOLOTL_PROMPT[0], cache.sample_labels(0)
        assert np.isfinite(cache[0].values.numpy()[prompt - 1:]).all()
        assert labels[:prompt - 1].eq(-100).all() and labels[prompt - 1] != -100


def test_axolotl_needs_the_vocabulary_size(tmp_path, capsys):
    assert import_dataset(AXOLOTL, tmp_path / "c", source="axolotl") == 1
    err = capsys.readouterr().err
    assert "--vocab-size" in err and "Traceback" not in err


@pytest.mark.parametrize("source, path, options, message, status", [
    ("vllm", "x.jsonl", ("--vocab-size", "64", "--top-k", "4", "--split", "test",
                         "--max-excess-mass", "0.1"),
     "--split and --max-excess-mass do not apply to --from vllm", 2),
    ("distillkit", os.path.join(SAMPLE, "distillkit"), ("--row-offset", "0"),
     "--row-offset does not apply to --from distillkit", 2),
    ("axolotl", AXOLOTL, ("--vocab-size", "64", "--compression-config", "c.yaml"),
     "--compression-config does not apply to --from axolotl", 2),
    ("axolotl", AXOLOTL, ("--vocab-size", "64", "--split", "test"),
     "one dataset, not a DatasetDict of splits; --split does not apply", 1),
    ("distillkit", os.path.join(SAMPLE, "distillkit"), ("--split", "test"),
     "parquet files have no splits; --split applies to a save_to_disk DatasetDict", 1),
])
def test_options_of_other_sources_are_refused_not_ignored(tmp_path, capsys, source, path,
                                                         options, message, status):
    assert run_cli("import", path, "--from", source, "--out", tmp_path / "c", "--quiet",
                   *options) == status
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------- mass policy
def write_dataset(directory, rows, config, extra=None):
    """A DistillKit-layout dataset of ``rows`` = [(input_ids, log-probs (P, k), ids (P, k))]."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "compression_config.yaml"), "w") as handle:
        yaml.safe_dump(config, handle)
    parsed = parse_config(config, "config")
    byte_lists = pa.list_(pa.list_(pa.uint8()))
    columns = {
        "input_ids": pa.array([list(t) for t, _, _ in rows], pa.list_(pa.uint64())),
        "compressed_logprobs": pa.array([encode_logprobs(v, parsed).tolist()
                                         for _, v, _ in rows], byte_lists),
        "bytepacked_indices": pa.array([encode_indices(i, parsed).tolist()
                                        for _, _, i in rows], byte_lists)}
    columns.update(extra or {})
    pq.write_table(pa.table(columns), os.path.join(directory, "data_0.parquet"))
    return os.path.join(directory, "data_0.parquet")


LOSSLESS = {"d": 64, "k": 4, "exact_k": 4, "exact_dtype": "float32", "polynomial_terms": [],
            "term_dtype": "float32", "residual_bins": [], "delta_encoding": False,
            "error_diffusion": False, "normalize_t": False}
IDS = np.array([[5, 9, 2, 7], [1, 2, 3, 4]])


def mass_rows(first_mass):
    """One sequence of 3 tokens: position 0 sums to ``first_mass``, position 1 to 0.9."""
    values = np.log(np.array([[0.5, 0.25, 0.125, 0.0625], [0.4, 0.3, 0.1, 0.1]]))
    values[0] += math.log(first_mass / 0.9375)
    return [([3, 4, 5], values, IDS)]


def test_rows_over_one_keep_their_values_with_lse_log_mass(tmp_path, capsys):
    path = write_dataset(tmp_path / "d", mass_rows(1.005), LOSSLESS)
    assert import_dataset(tmp_path / "d", tmp_path / "c") == 0
    target = LogitCache(tmp_path / "c")[0]
    stored = target.values.double().numpy()
    assert stored.tolist() == mass_rows(1.005)[0][1].astype(np.float32).tolist()
    assert target.lse[0].item() == pytest.approx(math.log(np.exp(stored[0]).sum()), abs=1e-7)
    assert target.lse[0].item() > 0 and target.lse[1].item() == 0
    # --max-excess-mass 0: refused, naming file, row and position
    assert import_dataset(tmp_path / "d", tmp_path / "e", "--max-excess-mass", 0) == 1
    err = capsys.readouterr().err
    assert f"{path}: row 0: position 0" in err and "--max-excess-mass" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_row_far_over_one_is_refused(tmp_path, capsys):
    path = write_dataset(tmp_path / "d", mass_rows(1.5), LOSSLESS)
    assert import_dataset(tmp_path / "d", tmp_path / "c") == 1
    err = capsys.readouterr().err
    assert f"{path}: row 0: position 0's top-4 probabilities sum to 1.5" in err


# ----------------------------------------------------------------------------- bad input
def _bad(kind, directory):
    good = [([3, 4, 5], np.log(np.full((2, 4), 0.2)), IDS)]
    if kind == "positions":  # as many positions as input ids
        return write_dataset(directory, [([3, 4], good[0][1], IDS)], LOSSLESS), \
            "2 positions for 2 input_ids"
    if kind == "config":  # a config of another k
        path = write_dataset(directory, good, LOSSLESS)
        with open(os.path.join(directory, "compression_config.yaml"), "w") as handle:
            yaml.safe_dump(dict(LOSSLESS, k=5, exact_k=5), handle)
        return path, "compressed_logprobs has 16 entries per position, the compression config " \
                     "gives 20"
    if kind == "id":  # 6-bit ids can hold 63 > d - 1
        return _id_outside(directory, good), "token id 61 outside [0, 60)"
    if kind == "twice":
        return write_dataset(directory, [([3, 4, 5], good[0][1], np.array(
            [[1, 2, 1, 3], [1, 2, 3, 4]]))], LOSSLESS), "position 0 lists a token id twice"
    if kind == "nan":
        values = good[0][1].copy()
        values[1, 2] = np.nan
        return write_dataset(directory, [([3, 4, 5], values, IDS)], LOSSLESS), \
            "position 1 holds a NaN"
    if kind == "legacy-config":
        path = write_dataset(directory, good, LOSSLESS)
        with open(os.path.join(directory, "compression_config.yaml"), "w") as handle:
            yaml.safe_dump(samples.LEGACY_CONFIG, handle)
        return path, "the data holds the other layout"
    if kind == "unknown-field":
        path = write_dataset(directory, good, LOSSLESS)
        with open(os.path.join(directory, "compression_config.yaml"), "w") as handle:
            yaml.safe_dump(dict(LOSSLESS, shuffle=True), handle)
        return path, "unknown field(s) 'shuffle'"
    if kind == "token":
        return write_dataset(directory, [([3, 99, 5], good[0][1], IDS)], LOSSLESS), \
            "input_ids holds token id 99 outside [0, 64)"
    if kind == "short":
        return write_dataset(directory, [([3], good[0][1][:0], IDS[:0])], LOSSLESS), \
            "1 input_ids, no position to import"
    if kind == "null":
        return write_dataset(directory, good, LOSSLESS, {"bytepacked_indices": pa.array(
            [None], pa.list_(pa.list_(pa.uint8())))}), "bytepacked_indices is null"
    raise AssertionError(kind)


def _id_outside(directory, good):
    path = write_dataset(directory, [([3, 4, 5], good[0][1], np.array([[1, 61, 2, 3],
                                                                        [1, 2, 3, 4]]))],
                         dict(LOSSLESS, d=64))
    with open(os.path.join(directory, "compression_config.yaml"), "w") as handle:
        yaml.safe_dump(dict(LOSSLESS, d=60), handle)  # also 6-bit ids
    return path


@pytest.mark.parametrize("kind", ["positions", "config", "id", "twice", "nan", "legacy-config",
                                  "unknown-field", "null", "token", "short"])
def test_bad_input_ends_in_one_sentence(tmp_path, capsys, kind):
    path, words = _bad(kind, str(tmp_path / "d"))
    assert import_dataset(tmp_path / "d", tmp_path / "c") == 1
    err = capsys.readouterr().err
    assert err.startswith("fastkd: error: ") and err.count("\n") == 1, err
    assert words in err and "Traceback" not in err, err
    if kind not in ("legacy-config", "unknown-field"):  # the row's own problems name it
        assert f"{path}: row 0" in err, err


def test_missing_config_and_unreadable_files(tmp_path, capsys):
    directory = tmp_path / "d"
    directory.mkdir()
    shutil.copy(os.path.join(SAMPLE, "distillkit", "data_0.parquet"), directory)
    assert import_dataset(directory, tmp_path / "c") == 1
    assert "no compression_config.yaml beside the data; pass --compression-config" in \
        capsys.readouterr().err
    (tmp_path / "bad.parquet").write_text("not parquet")
    assert import_dataset(tmp_path / "bad.parquet", tmp_path / "c") == 1
    assert "bad.parquet: not a readable parquet file" in capsys.readouterr().err
    assert import_dataset(tmp_path / "missing", tmp_path / "c") == 1
    assert "missing: no such file" in capsys.readouterr().err
    assert import_dataset(os.devnull, tmp_path / "c") == 1   # exists, not a regular file
    assert f"{os.devnull}: not a regular file" in capsys.readouterr().err
    assert import_dataset(directory / "data_0.parquet", tmp_path / "c",
                          "--compression-config", directory) == 1
    assert f"{directory}: a directory, not a file" in capsys.readouterr().err


# ----------------------------------------------------------------------------- resume, lock
def test_an_interrupted_import_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    source = os.path.join(SAMPLE, "distillkit")
    small = "0.001"  # about 10 rows per shard: several shards
    monkeypatch.setattr(distillkit, "IMPORT_BATCH", 1)
    assert import_dataset(source, tmp_path / "whole", "--shard-size-mb", small) == 0
    original = distillkit.TeacherRows.iter_rows
    started = []

    def interrupted(self, start=0):
        started.append(start)
        for index, sample in original(self, start):
            if index == 3:
                raise KeyboardInterrupt
            yield index, sample

    monkeypatch.setattr(distillkit.TeacherRows, "iter_rows", interrupted)
    assert import_dataset(source, tmp_path / "part", "--shard-size-mb", small) == 130
    manifest = fmt.read_manifest(str(tmp_path / "part"))
    assert manifest["status"] == "incomplete" and manifest["shards"]
    done = manifest["shards"][-1]["sample_stop"]
    monkeypatch.setattr(distillkit.TeacherRows, "iter_rows",
                        lambda self, start=0: started.append(start) or original(self, start))
    assert import_dataset(source, tmp_path / "part", "--shard-size-mb", small) == 0
    assert started == [0, done]  # the second run starts after the finished shards
    whole, part = (fmt.read_manifest(str(tmp_path / name)) for name in ("whole", "part"))
    assert len(whole["shards"]) > 2 and done > 0
    assert [f["sha256"] for f in fmt.manifest_files(whole)] == \
        [f["sha256"] for f in fmt.manifest_files(part)]
    # a finished import is not redone; other input is refused unless --overwrite
    assert import_dataset(source, tmp_path / "part", "--shard-size-mb", small) == 0
    assert import_dataset(os.path.join(SAMPLE, "open-instruct"), tmp_path / "part") == 1
    assert import_dataset(os.path.join(SAMPLE, "open-instruct"), tmp_path / "part",
                   "--overwrite") == 0
    assert len(LogitCache(tmp_path / "part")) == 3


def test_a_locked_directory_is_refused(tmp_path, capsys):
    from fastkd.cache import outdir
    out = tmp_path / "c"
    out.mkdir()
    with outdir.DirectoryLock(str(out)):
        assert import_dataset(os.path.join(SAMPLE, "distillkit"), out) == 1
    assert "writing to" in capsys.readouterr().err
    assert not os.path.exists(out / fmt.MANIFEST_NAME)


def test_imported_rows_train_with_kd_loss(tmp_path):
    """The imported targets go straight into fastkd.kd_loss (tail bucket at T = 1): a row kept
    at mass 1.005 with lse = log m passes the loss's mass check, while the same values with
    lse 0 are refused there; the loss equals KL over the K ids plus the tail bucket."""
    import torch
    import fastkd
    write_dataset(tmp_path / "d", mass_rows(1.005), LOSSLESS)
    assert import_dataset(tmp_path / "d", tmp_path / "c") == 0
    target = LogitCache(tmp_path / "c")[0]
    student = torch.randn(2, 64, dtype=torch.float64).float()
    loss = fastkd.kd_loss(student, target, None, soft_weight=1.0, hard_weight=0.0,
                          reduction="sum")
    log_s = torch.log_softmax(student.double(), -1)
    expected = 0.0
    for row in range(2):
        p = torch.exp(target.values[row].double() - target.lse[row].double())
        q = torch.exp(log_s[row, target.indices[row].long()])
        expected += float((p * (p.log() - q.log())).sum())
        rest_p, rest_q = 1 - float(p.sum()), 1 - float(q.sum())
        if rest_p > 1e-12:
            expected += rest_p * (math.log(rest_p) - math.log(rest_q))
    assert float(loss) == pytest.approx(expected, rel=1e-4, abs=1e-5)
    unnormalized = type(target)(target.values, target.indices, torch.zeros_like(target.lse),
                                target.temperature, target.num_classes)
    with pytest.raises(ValueError, match="sum"):
        fastkd.kd_loss(student, unnormalized, None, soft_weight=1.0, hard_weight=0.0)


def test_parquet_rows_are_read_from_any_start(tmp_path):
    """Resumption reads from any row on: across files and row groups, in order."""
    from fastkd.cache.teacher_tables import open_table
    for number, (low, high) in enumerate(((0, 5), (5, 6), (6, 13))):
        pq.write_table(pa.table({"input_ids": [[i] for i in range(low, high)]}),
                       tmp_path / f"data_{number}.parquet", row_group_size=2)
    (tmp_path / "data_10.parquet").write_bytes((tmp_path / "data_2.parquet").read_bytes())
    table = open_table([str(tmp_path)])
    assert len(table) == 20 and table.where(13) == f"{tmp_path / 'data_10.parquet'}: row 0"
    expected = list(range(13)) + list(range(6, 13))
    for start in range(21):
        got = [(first + row, batch.column("input_ids")[row].as_py()[0])
               for first, batch in table.batches(start, ["input_ids"])
               for row in range(len(batch))]
        assert got == list(enumerate(expected))[start:], start
        if start < 20:
            assert table.row(start, ["input_ids"]).column("input_ids")[0].as_py() == \
                [expected[start]]
