"""``fastkd import --from distillkit|axolotl`` on columns of the wrong kind or range: a scalar
where a list belongs, floats or strings where ids, labels, masks or bytes belong, bytes past 255,
labels outside the vocabulary, masks other than 0/1, too many curve terms and unreadable YAML
all end in one ``fastkd: error:`` line naming the file (and row); none is truncated, wrapped or
read as something else."""
import os
import re

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
yaml = pytest.importorskip("yaml")

from cache_helpers import import_dataset  # noqa: E402

VOCAB = 64
LOSSLESS = {"d": VOCAB, "k": 4, "exact_k": 4, "exact_dtype": "float32", "polynomial_terms": [],
            "term_dtype": "float32", "residual_bins": [], "delta_encoding": False,
            "error_diffusion": False, "normalize_t": False}
BYTES = pa.list_(pa.list_(pa.uint8()))


def _distillkit(directory, config=LOSSLESS, **columns):
    """A one-row DistillKit dataset (2 positions; bytes zero, so every value decodes to 0.0 and
    every id to 0: the rows fail later checks, but only after the columns' own) with
    ``columns`` replacing the defaults; the parquet path."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "compression_config.yaml"), "w") as handle:
        if isinstance(config, str):
            handle.write(config)
        else:
            yaml.safe_dump(config, handle)
    table = {"input_ids": pa.array([[3, 4, 5]], pa.list_(pa.uint64())),
             "compressed_logprobs": pa.array([[[0] * 16] * 2], BYTES),
             "bytepacked_indices": pa.array([[[0] * 3] * 2], BYTES)}
    table.update(columns)
    path = os.path.join(directory, "data_0.parquet")
    pq.write_table(pa.table(table), path)
    return path


def _axolotl(directory, **columns):
    """A one-row axolotl dataset (4 tokens, K = 2) with ``columns`` replacing the defaults."""
    os.makedirs(directory, exist_ok=True)
    ids = [[1, 2], [2, 3], [3, 4], [4, 5]]
    table = {"input_ids": pa.array([[1, 2, 3, 4]]),
             "target_token_ids": pa.array([ids]),
             "target_logprobs": pa.array([[np.log([0.5, 0.25]).tolist()] * 4]),
             "target_mask": pa.array([[[1, 1]] * 4]),
             "attention_mask": pa.array([[1, 1, 1, 1]]),
             "labels": pa.array([[1, 2, 3, 4]])}
    table.update(columns)
    path = os.path.join(directory, "data_0.parquet")
    pq.write_table(pa.table(table), path)
    return path


DISTILLKIT_CASES = {
    "ids-scalar": (dict(input_ids=pa.array([7])), "input_ids must be a list, got a int64 value"),
    "bytes-scalar": (dict(compressed_logprobs=pa.array([7])),
                     "compressed_logprobs must be a list of lists, got a int64 value"),
    "bytes-over-255": (dict(compressed_logprobs=pa.array([[[300] + [0] * 15] * 2])),
                       r"compressed_logprobs holds 300, outside \[0, 255\]"),
    "bytes-negative": (dict(bytepacked_indices=pa.array([[[-1, 0, 0]] * 2])),
                       r"bytepacked_indices holds -1, outside \[0, 255\]"),
    "bytes-float": (dict(bytepacked_indices=pa.array([[[0.5, 0.0, 0.0]] * 2])),
                    "bytepacked_indices must hold integers, got float64"),
}


@pytest.mark.parametrize("case", sorted(DISTILLKIT_CASES))
def test_distillkit_columns_of_the_wrong_kind(tmp_path, capsys, case):
    columns, message = DISTILLKIT_CASES[case]
    path = _distillkit(str(tmp_path / "d"), **columns)
    assert import_dataset(tmp_path / "d", tmp_path / "c") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{path}: row 0: " in err
    assert re.search(message, err), err


AXOLOTL_CASES = {
    "labels-outside": (dict(labels=pa.array([[1, 2, 99999, 4]])),
                       r"labels holds 99999, outside \[0, 63\] or -100"),
    "labels-negative": (dict(labels=pa.array([[1, -7, 3, 4]])),
                        r"labels holds -7, outside \[0, 63\] or -100"),
    "labels-float": (dict(labels=pa.array([[1.0, 2.0, 4.5, 4.0]])),
                     "labels must hold integers, got float64"),
    "ids-float": (dict(target_token_ids=pa.array([[[1.0, 2.0], [2.0, 3.9], [3.0, 4.0],
                                                   [4.0, 5.0]]])),
                  "target_token_ids must hold integers, got float64"),
    "logprobs-strings": (dict(target_logprobs=pa.array([[["a", "b"]] * 4])),
                         "target_logprobs must hold numbers, got object"),
    "attention-half": (dict(attention_mask=pa.array([[0.5, 1.0, 1.0, 1.0]])),
                       r"attention_mask must hold integers \(0 or 1\), got float64"),
    "attention-two": (dict(attention_mask=pa.array([[1, 2, 1, 1]])),
                      r"attention_mask holds 2, outside \[0, 1\]"),
    "target-mask-float": (dict(target_mask=pa.array([[[0.4, 0.4]] * 4])),
                          r"target_mask must hold integers \(0 or 1\), got float64"),
    "target-mask-scalar": (dict(target_mask=pa.array([1])),
                           "target_mask must be a list of lists, got a int64 value"),
}


@pytest.mark.parametrize("case", sorted(AXOLOTL_CASES))
def test_axolotl_columns_of_the_wrong_kind_or_range(tmp_path, capsys, case):
    columns, message = AXOLOTL_CASES[case]
    path = _axolotl(str(tmp_path / "d"), **columns)
    assert import_dataset(tmp_path / "d", tmp_path / "c", "--vocab-size", VOCAB,
                          source="axolotl") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{path}: row 0: " in err
    assert re.search(message, err), err
    assert not (tmp_path / "c" / "manifest.json").exists() or \
        "complete" not in (tmp_path / "c" / "manifest.json").read_text()


def test_the_valid_axolotl_row_imports(tmp_path):
    """The rows the cases above spoil import as they are (so each case fails on its column)."""
    _axolotl(str(tmp_path / "d"))
    assert import_dataset(tmp_path / "d", tmp_path / "c", "--vocab-size", VOCAB,
                          source="axolotl") == 0


@pytest.mark.parametrize("config, message", [
    ("k: [4\n", r"not readable YAML \(.*line 2, column 1\)"),
    (yaml.safe_dump(dict(LOSSLESS, exact_k=0, polynomial_terms=[0] * 33)),
     "33 polynomial_terms, more than the 32 fastkd reads"),
])
def test_config_errors_are_one_line(tmp_path, capsys, config, message):
    _distillkit(str(tmp_path / "d"), config)
    assert import_dataset(tmp_path / "d", tmp_path / "c") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "compression_config.yaml" in err
    assert re.search(message, err), err


def test_a_missing_column_names_the_data(tmp_path, capsys):
    _distillkit(str(tmp_path / "d"))
    pq.write_table(pa.table({"input_ids": pa.array([[3, 4, 5]])}),
                   str(tmp_path / "d" / "data_0.parquet"))
    assert import_dataset(tmp_path / "d", tmp_path / "c") == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'd'}: the compression config is for the current" in err, err
