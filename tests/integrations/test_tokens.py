"""Token data read from files (`jsonl:`): hostile or broken lines end in one sentence naming the
file and line, through the API and the command line."""
import pytest
import torch

import cache_helpers
import fastkd
from fastkd.cache import CachedDataset, LogitCache, write_cache
from fastkd.cli import main as fastkd_main
from fastkd.tokens import TokenDataset, collate_causal_lm


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


BROKEN_LINES = [
    (b'{"input_ids": [1, 2]}\n' + b'{"input_ids": ' + b"[" * 100000 + b"]" * 100000 + b"}\n",
     r":2: JSON nested too deeply"),
    (b'{"input_ids": [1, 2]}\n{"input_ids": [1, 2], "text": "caf\xe9"}\n',
     r":2: not UTF-8 text \(byte 0xe9 at column 35\)"),
    (b'{"input_ids": [1, 2]}\n\n{"input_ids": [1, 92233720368547758070]}\n',
     r":3: input_ids: 92233720368547758070 does not fit in a 64-bit integer"),
    (b'{"input_ids": [1, 2], "labels": [-100, -9223372036854775809]}\n',
     r":1: labels: -9223372036854775809 does not fit in a 64-bit integer"),
]


@pytest.mark.parametrize("data, message", BROKEN_LINES)
def test_broken_jsonl_line_names_file_and_line(tmp_path, data, message):
    path = _write(tmp_path / "tokens.jsonl", data)
    with pytest.raises(ValueError, match=r"tokens\.jsonl" + message):
        dataset = TokenDataset.from_jsonl(path)
        for index in range(len(dataset)):
            dataset[index]


@pytest.mark.parametrize("data, message", BROKEN_LINES)
def test_broken_jsonl_line_on_the_command_line(tmp_path, capsys, data, message):
    """`fastkd cache` over such a file exits 1 with one line, no traceback."""
    path = _write(tmp_path / "tokens.jsonl", data)
    status = fastkd_main(["cache", "--teacher", "torch.nn:Identity", "--dataset", f"jsonl:{path}",
                          "--out", str(tmp_path / "c"), "--quiet"])
    err = capsys.readouterr().err
    assert status == 1, err
    assert "Traceback" not in err and err.count("\n") == 1 and "tokens.jsonl" in err, err


def test_row_errors_name_no_internal_keys(tmp_path):
    """A row without input_ids lists the row's own keys, nothing fastkd added."""
    path = _write(tmp_path / "tokens.jsonl", b'{"title": "hello"}\n')
    with pytest.raises(ValueError, match=r"tokens\.jsonl:1: .* got \['title'\]$"):
        TokenDataset.from_jsonl(path)[0]


@pytest.mark.parametrize("layout", [{"top_k": 4}, {"sample": 8}, {}])
def test_pad_to_multiple_of_only_adds_ignored_positions(tmp_path, layout):
    """collate_causal_lm(pad_to_multiple_of=m) rounds the length up to a multiple of m; the
    added positions are padding (pad id, mask 0, ignored labels) and leave the loss unchanged."""
    data = cache_helpers.TokenSequences(n=5)
    write_cache(cache_helpers.tiny_lm(), data, tmp_path / "c", batch_size=5, progress=False,
                **layout)
    items = [CachedDataset(data, LogitCache(tmp_path / "c"))[i] for i in range(5)]
    plain = collate_causal_lm(items, pad_token_id=7)
    length = plain["input_ids"].shape[1]
    student = torch.randn(5, length + 8, cache_helpers.TOKEN_VOCAB)
    expected = fastkd.kd_loss(student[:, :length], plain["teacher_targets"],
                              plain["shift_labels"])
    for multiple in (4, 8):
        padded = collate_causal_lm(items, pad_token_id=7, pad_to_multiple_of=multiple)
        width = -(-length // multiple) * multiple
        assert padded["input_ids"].shape == (5, width)
        for key, fill in (("input_ids", 7), ("attention_mask", 0), ("labels", -100),
                          ("shift_labels", -100)):
            assert torch.equal(padded[key][:, :length], plain[key]), key
            assert bool((padded[key][:, length:] == fill).all()), key
        loss = fastkd.kd_loss(student[:, :width], padded["teacher_targets"],
                              padded["shift_labels"])
        torch.testing.assert_close(loss, expected)
        # the padded rows are valid targets too: a loss over every row (no labels) is finite
        assert torch.isfinite(fastkd.kd_loss(student[:, :width], padded["teacher_targets"]))
