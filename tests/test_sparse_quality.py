"""benchmarks/sparse_quality.py runs end to end in its --quick mode and reports every condition
and metric (the values depend on the run; the full run's live in
benchmarks/results/sparse-quality/). Its BPE and ECE pieces are exact."""
import json
import math
import os

import pytest
import torch

from paths import load_script

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bench():
    return load_script(os.path.join("benchmarks", "sparse_quality.py"))


def test_quick_run_reports_every_condition_and_metric(bench, tmp_path, capsys):
    results = bench.main(["--quick", "--out", str(tmp_path / "out"),
                          "--work-dir", str(tmp_path / "work")])
    assert set(results["table"]) == set(bench.SETTINGS)
    for setting, rows in results["table"].items():
        assert list(rows) == list(bench.CONDITIONS)
        for condition, row in rows.items():
            for key in ("ce", "ece", "overconfidence", "ce_vs_dense_mean",
                        "teacher_bytes_per_token", "file_bytes_per_token"):
                assert math.isfinite(row[key]), (setting, condition, key)
            assert 0.0 <= row["ece"] <= 1.0
        assert rows["dense"]["ce_vs_dense_mean"] == 0.0
        assert rows["labels only"]["teacher_bytes_per_token"] == 0.0
        # every cache's size comes from its manifest: dense fp16 rows are 2 V bytes
        assert rows["dense"]["teacher_bytes_per_token"] == 2 * results["settings"]["vocab"]
        assert 0 < rows["sampled, 8 draws"]["teacher_bytes_per_token"] \
            < rows["dense"]["teacher_bytes_per_token"]
    # the label-only student is one run, shown in both settings
    assert results["runs"]["kd_only"]["labels only"] == \
        results["runs"]["kd_0.5_labels_0.5"]["labels only"]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["table"] == json.loads(json.dumps(results["table"]))
    for key in ("device", "date", "commit", "torch", "transformers"):
        assert key in saved["environment"]
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert markdown in capsys.readouterr().out
    for title in bench.SETTING_TITLES.values():
        assert title in markdown
    for condition in bench.CONDITIONS:
        assert markdown.count(f"| {condition} |") == 2
    assert "| teacher cache | bytes/token | CE | CE vs dense | ECE | conf - acc |" in markdown


def test_bpe_merges_are_greedy_and_encode_reproduces_training(bench):
    tokens = bench._merge(torch.tensor([1, 1, 1, 1, 1, 2, 1, 1]).numpy(), 1, 1, 9)
    assert tokens.tolist() == [9, 9, 1, 2, 9]
    text = b"the cat sat on the mat; the cat ate the rat. " * 20
    merges, encoded = bench.train_bpe(text, 280)
    assert len(merges) == 24 and encoded.max() < 280
    assert bench.encode(text, merges).tolist() == encoded.tolist()


def test_expected_calibration_error(bench):
    confidence = torch.tensor([0.95, 0.95, 0.25, 0.25, 1.0], dtype=torch.float64)
    correct = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    # bins: [0.933, 1) holds 0.95, 0.95 and 1.0 (acc 2/3, conf 0.9667); [0.2, 0.267) 0.25 x 2
    expected = (3 / 5) * abs(2 / 3 - (0.95 + 0.95 + 1.0) / 3) + (2 / 5) * 0.25
    assert bench.expected_calibration_error(confidence, correct) == pytest.approx(expected)
