"""Hugging Face integration: caching a local causal LM over padded token data, the collator's
alignment with a student's logits, and clear errors for bad input.

Tolerances: fp16 storage rounds each logit to 11 significant bits (rtol 2**-10); teacher runs
batched vs alone differ by float32 reduction order (atol 1e-4); fp32 caches are compared at
rtol 1e-5 / atol 1e-5 against separately run forwards.
"""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import fastkd  # noqa: E402
import hf_helpers  # noqa: E402
from fastkd.cache import CachedDataset, LogitCache  # noqa: E402
from fastkd.cli import main as fastkd_main  # noqa: E402
from fastkd.tokens import TokenDataset, collate_causal_lm, next_token_labels  # noqa: E402

FP16 = dict(rtol=2 ** -10, atol=1e-4)
FP32 = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-teacher")
    model = hf_helpers.tiny_gpt2(seed=0)
    model.save_pretrained(root / "gpt2")
    return root / "gpt2", model


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-tokens")
    rows = hf_helpers.token_rows()
    return hf_helpers.write_jsonl(root / "tokens.jsonl", rows), rows


def attended(row):
    mask = torch.tensor(row["attention_mask"])
    ids = torch.tensor(row["input_ids"])[mask.bool()]
    labels = torch.tensor(row.get("labels", row["input_ids"]))[mask.bool()]
    return ids, labels


def run_cache(teacher_dir, dataset_spec, out, *extra):
    return fastkd_main(["cache", "--teacher", f"hf:{teacher_dir}", "--dataset", dataset_spec,
                        "--out", str(out), "--batch-size", "5", "--device", "cpu", "--quiet",
                        *extra])


@pytest.fixture(scope="module")
def dense_cache(teacher_dir, token_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf-cache") / "dense"
    assert run_cache(teacher_dir[0], f"jsonl:{token_file[0]}", out, "--dtype", "fp32") == 0
    return out


def test_cached_rows_are_next_token_logits_at_attended_positions(teacher_dir, token_file,
                                                                 dense_cache):
    _, model = teacher_dir
    _, rows = token_file
    cache = LogitCache(dense_cache)
    assert len(cache) == len(rows)
    lengths = [int(sum(row["attention_mask"])) for row in rows]
    # padding produces no rows: each sample owns exactly its attended tokens
    assert cache.num_rows == sum(lengths) < len(rows) * len(rows[0]["input_ids"])
    assert torch.equal(cache.offsets, torch.tensor(np.cumsum([0] + lengths)))
    for index, row in enumerate(rows):
        ids, hf_labels = attended(row)
        with torch.no_grad():
            expected = model(ids[None]).logits[0]
        torch.testing.assert_close(cache[index], expected, **FP32)
        # stored labels are next-token labels: the label of row j is the token at j + 1
        start, stop = int(cache.offsets[index]), int(cache.offsets[index + 1])
        assert torch.equal(cache.labels[start:stop], next_token_labels(hf_labels))
    # right-padded rows also equal the teacher run on the padded batch with its mask
    right = [row for number, row in enumerate(rows) if number % 2 == 0]
    with torch.no_grad():
        padded = model(input_ids=torch.tensor([r["input_ids"] for r in right]),
                       attention_mask=torch.tensor([r["attention_mask"] for r in right])).logits
    for slot, number in enumerate(range(0, len(rows), 2)):
        torch.testing.assert_close(cache[number], padded[slot, :lengths[number]],
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("source", ["parquet", "hf-disk"])
def test_parquet_and_saved_datasets_cache_the_same_rows(teacher_dir, token_file, dense_cache,
                                                        source, tmp_path):
    datasets = pytest.importorskip("datasets")
    _, rows = token_file
    # a labels column needs a value in every row: None means "use input_ids"
    table = datasets.Dataset.from_list([dict(row, labels=row.get("labels")) for row in rows])
    if source == "parquet":
        path = tmp_path / "tokens.parquet"
        table.to_parquet(str(path))
    else:
        path = tmp_path / "saved"
        datasets.DatasetDict({"train": table}).save_to_disk(str(path))
    out = tmp_path / "cache"
    assert run_cache(teacher_dir[0], f"{source}:{path}", out, "--dtype", "fp32") == 0
    cache, reference = LogitCache(out), LogitCache(dense_cache)
    assert torch.equal(cache.offsets, reference.offsets)
    assert torch.equal(cache.labels, reference.labels)
    torch.testing.assert_close(cache[0:len(cache)][3], reference[0:len(reference)][3])
    assert cache.manifest["dataset"]["fingerprint"]["sha256"] == \
        reference.manifest["dataset"]["fingerprint"]["sha256"]


def test_topk_cache_of_hf_teacher(teacher_dir, token_file, dense_cache, tmp_path):
    out = tmp_path / "topk"
    assert run_cache(teacher_dir[0], f"jsonl:{token_file[0]}", out, "--top-k", "5") == 0
    topk, dense = LogitCache(out), LogitCache(dense_cache)
    assert topk.num_rows == dense.num_rows
    for index in (0, 1, 7):
        rows = dense[index]
        values, indices = rows.topk(5, dim=-1)
        got = topk[index]
        assert torch.equal(got.indices.long(), indices)
        torch.testing.assert_close(got.values.float(), values, **FP16)
        torch.testing.assert_close(got.lse, rows.logsumexp(-1), rtol=1e-6, atol=1e-6)


def test_collator_aligns_teacher_rows_with_shifted_student_logits(teacher_dir, token_file,
                                                                 dense_cache):
    _, rows = token_file
    dataset = TokenDataset.from_jsonl(token_file[0])
    cached = CachedDataset(dataset, LogitCache(dense_cache))
    items = [cached[i] for i in range(6)]
    batch = collate_causal_lm(items)
    student = hf_helpers.tiny_gpt2(seed=1, layers=1)
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = fastkd.kd_loss(logits, batch["teacher_targets"], batch["shift_labels"],
                          temperature=2.0, backend="torch")
    # the same loss by hand, shifting HF labels ourselves, one unpadded sample at a time
    total, count = 0.0, 0
    for index in range(6):
        ids, hf_labels = attended(rows[index])
        student_logits = student(ids[None]).logits[0][:-1]
        teacher_logits = LogitCache(dense_cache)[index][:-1]
        targets = hf_labels[1:]
        per_row = fastkd.kd_loss(student_logits, teacher_logits, targets, temperature=2.0,
                                 reduction="sum", backend="torch")
        total, count = total + per_row, count + int((targets != -100).sum())
        # batch position j of sample i is its unpadded position j
        n = len(ids)
        assert torch.equal(batch["input_ids"][index, :n], ids)
        assert torch.equal(batch["teacher_targets"][index, :n], LogitCache(dense_cache)[index])
        assert torch.equal(batch["shift_labels"][index, :n - 1], targets)
        assert (batch["shift_labels"][index, n - 1:] == -100).all()
        assert (batch["labels"][index, 1:n] == hf_labels[1:]).all()
        assert (batch["attention_mask"][index, n:] == 0).all()
    torch.testing.assert_close(loss, total / count, rtol=1e-5, atol=1e-6)
    # HF's own loss on the collated labels counts the same tokens
    assert int((batch["labels"] != -100).sum()) == count == int((batch["shift_labels"] != -100)
                                                                .sum())


def test_collator_pads_topk_targets(teacher_dir, token_file, tmp_path):
    out = tmp_path / "topk"
    assert run_cache(teacher_dir[0], f"jsonl:{token_file[0]}", out, "--top-k", "4") == 0
    cached = CachedDataset(TokenDataset.from_jsonl(token_file[0]), LogitCache(out))
    batch = collate_causal_lm([cached[i] for i in range(3)], pad_token_id=7)
    targets = batch["teacher_targets"]
    assert isinstance(targets, fastkd.TopKLogits)
    length = batch["input_ids"].shape[1]
    assert targets.values.shape == (3, length, 4) and targets.lse.shape == (3, length)
    n = int(batch["attention_mask"][0].sum())
    assert torch.equal(targets.indices[0, :n], LogitCache(out)[0].indices)
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 7).all()


# ----------------------------------------------------------------------------- bad input
def test_unknown_dir_and_hub_id_are_refused(token_file, tmp_path, capsys):
    for spec in ("hf:gpt2", f"hf:{tmp_path / 'missing'}"):
        status = fastkd_main(["cache", "--teacher", spec, "--dataset", f"jsonl:{token_file[0]}",
                              "--out", str(tmp_path / "c"), "--quiet"])
        err = capsys.readouterr().err
        assert status == 1 and "never downloads" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    status = fastkd_main(["cache", "--teacher", f"hf:{tmp_path / 'empty'}", "--dataset",
                          f"jsonl:{token_file[0]}", "--out", str(tmp_path / "c"), "--quiet"])
    assert status == 1 and "no config.json" in capsys.readouterr().err
    (tmp_path / "noweights").mkdir()
    hf_helpers.tiny_gpt2().config.save_pretrained(tmp_path / "noweights")
    status = fastkd_main(["cache", "--teacher", f"hf:{tmp_path / 'noweights'}", "--dataset",
                          f"jsonl:{token_file[0]}", "--out", str(tmp_path / "c"), "--quiet"])
    err = capsys.readouterr().err
    assert status == 1 and "local files only" in err and "Traceback" not in err


@pytest.mark.parametrize("rows, message", [
    ([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 500]}],
     "Token id 500 is beyond the teacher's vocabulary of 48"),
    ([{"input_ids": [1] * 69}], "Rows of 69 tokens exceed the teacher's 64 positions: pass "
                                "--max-length 64"),
])
def test_data_that_does_not_fit_the_teacher_is_named(teacher_dir, tmp_path, capsys, rows,
                                                     message):
    """The embedding's bare "index out of range" comes with its likely cause."""
    assert teacher_dir[1].config.vocab_size == 48 and teacher_dir[1].config.n_positions == 64
    data = hf_helpers.write_jsonl(tmp_path / "rows.jsonl", rows)
    assert run_cache(teacher_dir[0], f"jsonl:{data}", tmp_path / "c") == 1
    err = capsys.readouterr().err
    assert err.startswith("fastkd: error: teacher hf:") and message in err, err
    assert "Traceback" not in err and not (tmp_path / "c").exists()


@pytest.mark.parametrize("row, message", [
    ({"tokens": [1, 2]}, "expected a row with 'input_ids'"),
    ({"input_ids": [1, 2, 3], "attention_mask": [1, 1]}, "attention_mask has 2 entries"),
    ({"input_ids": [1, 2, 3], "labels": [1, 2]}, "labels has 2 entries"),
    ({"input_ids": [1, 2, 3], "attention_mask": [1, 0, 1]}, "holes"),
    ({"input_ids": [1, 2, 3], "attention_mask": [0, 0, 0]}, "no attended tokens"),
    ({"input_ids": []}, "input_ids is empty"),
    ({"input_ids": [1, "a"]}, "flat list of ints"),
    ({"input_ids": [1, -5]}, "must be >= 0"),
])
def test_bad_token_rows_name_the_line(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"input_ids": [1, 2]}) + "\n" + json.dumps(row) + "\n")
    dataset = TokenDataset.from_jsonl(path)
    dataset[0]
    with pytest.raises(ValueError, match=message) as error:
        dataset[1]
    assert f"{path}:2" in str(error.value)


def test_bad_token_sources(tmp_path, capsys):
    (tmp_path / "x.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"x.jsonl:1: not valid JSON"):
        TokenDataset.from_spec(f"jsonl:{tmp_path / 'x.jsonl'}")
    with pytest.raises(FileNotFoundError, match="none.parquet: no such file"):
        TokenDataset.from_spec(f"parquet:{tmp_path / 'none.parquet'}")
    with pytest.raises(FileNotFoundError, match="a directory, not a file"):
        TokenDataset.from_spec(f"jsonl:{tmp_path}")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        TokenDataset.from_spec(f"hf-disk:{tmp_path / 'none'}")
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="cannot read as parquet"):
        TokenDataset.from_spec(f"parquet:{tmp_path / 'x.parquet'}")
    status = fastkd_main(["cache", "--teacher", "cache_helpers:digits_teacher", "--dataset",
                          f"jsonl:{tmp_path / 'missing.jsonl'}", "--out", str(tmp_path / "c"),
                          "--quiet"])
    assert status == 1 and "no such file" in capsys.readouterr().err


# ----------------------------------------------------------------------------- hf: directories
def cache_status(directory, token_file, tmp_path, capsys):
    """``fastkd cache --teacher hf:DIR``: (exit status, its stderr)."""
    capsys.readouterr()
    status = fastkd_main(["cache", "--teacher", f"hf:{directory}", "--dataset",
                          f"jsonl:{token_file[0]}", "--out", str(tmp_path / "c"), "--quiet"])
    return status, capsys.readouterr().err


def assert_one_sentence(status, err, *fragments):
    """Exit status 1 and one error line holding every fragment (transformers' own progress
    bars and warnings may come before it), no traceback."""
    assert status == 1 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("fastkd: error:")]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, err)


def tiny_bert(cls_name, **config):
    import transformers
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=hf_helpers.VOCAB, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=64, **config)
    return getattr(transformers, cls_name)(cfg)


def test_non_causal_models_are_refused(token_file, tmp_path, capsys):
    """A saved BertForMaskedLM (AutoModelForCausalLM would load it as a bidirectional
    BertLMHeadModel) is refused by its saved architecture; a BertLMHeadModel without
    is_decoder by what it computes (logits change with later tokens); with is_decoder it is
    causal and loads."""
    from fastkd.hf import load_causal_lm
    tiny_bert("BertForMaskedLM").save_pretrained(tmp_path / "mlm")
    assert_one_sentence(*cache_status(tmp_path / "mlm", token_file, tmp_path, capsys),
                        "BertForMaskedLM", "model type 'bert'", "not a causal language model")
    tiny_bert("BertLMHeadModel").save_pretrained(tmp_path / "bidirectional")
    assert_one_sentence(*cache_status(tmp_path / "bidirectional", token_file, tmp_path, capsys),
                        "BertLMHeadModel", "model type 'bert'", "is not causal")
    tiny_bert("BertLMHeadModel", is_decoder=True).save_pretrained(tmp_path / "decoder")
    assert type(load_causal_lm(tmp_path / "decoder")).__name__ == "BertLMHeadModel"


def with_custom_code(source, target, model_type, marker):
    """A copy of a saved model whose config.json names custom code (auto_map) that would leave
    ``marker`` behind if it ever ran."""
    import shutil
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(model_type=model_type, auto_map={
        "AutoConfig": "custom_model.CustomConfig",
        "AutoModelForCausalLM": "custom_model.CustomForCausalLM"})
    (target / "config.json").write_text(json.dumps(config))
    (target / "custom_model.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    return target


def test_custom_code_is_never_run(teacher_dir, token_file, tmp_path, capsys):
    from fastkd.hf import load_causal_lm
    marker = tmp_path / "custom-code-ran"
    known = with_custom_code(teacher_dir[0], tmp_path / "known", "gpt2", marker)
    model = load_causal_lm(known)  # transformers' own GPT-2 class, as from_pretrained does
    assert type(model).__name__ == "GPT2LMHeadModel"
    unknown = with_custom_code(teacher_dir[0], tmp_path / "unknown", "custom-lm", marker)
    assert_one_sentence(*cache_status(unknown, token_file, tmp_path, capsys),
                        "auto_map", "custom_model.CustomForCausalLM", "'custom-lm'",
                        "trust_remote_code=True")
    assert not marker.exists()


class _RunsCode:
    """Unpickling this calls ``open(marker, 'w')``: what torch.load(weights_only=True) refuses."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("damage", ["pickled-object", "garbage-bin", "garbage-safetensors",
                                    "truncated-safetensors"])
def test_weight_files_that_do_not_load_are_named(teacher_dir, token_file, tmp_path, capsys,
                                                 damage):
    import shutil
    directory = tmp_path / "teacher"
    shutil.copytree(teacher_dir[0], directory)
    marker = tmp_path / "unpickled"
    if damage.endswith("bin"):
        (directory / "model.safetensors").unlink()
        target = directory / "pytorch_model.bin"
        target.write_bytes(b"not a checkpoint " * 8)
    elif damage == "pickled-object":
        (directory / "model.safetensors").unlink()
        target = directory / "pytorch_model.bin"
        torch.save({"transformer.wte.weight": _RunsCode(marker)}, target)
    else:
        target = directory / "model.safetensors"
        data = target.read_bytes()
        target.write_bytes(data[:len(data) // 2] if damage.startswith("truncated")
                           else b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    status, err = cache_status(directory, token_file, tmp_path, capsys)
    kind = "not a plain weights file" if target.suffix == ".bin" else \
        "not a valid safetensors file"
    assert_one_sentence(status, err, str(target), kind)
    assert not marker.exists()


def test_output_transforms_read_every_config_spelling():
    """The scale and softcap DistillationLoss applies after the output layer are the model's
    own: Granite's logits_scaling divides (a config TRL reads as well), Cohere's logit_scale
    multiplies, Gemma-2 caps."""
    import transformers
    from fastkd.hf import output_transforms
    granite = transformers.GraniteForCausalLM(transformers.GraniteConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, logits_scaling=8.0))
    assert output_transforms(granite) == {"logit_scale": 0.125, "softcap": None}
    gemma = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        final_logit_softcapping=30.0))
    assert output_transforms(gemma) == {"logit_scale": 1.0, "softcap": 30.0}
