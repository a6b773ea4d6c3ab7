"""``fastkd export --to parquet``: the exported rows read back with pyarrow and ``datasets``
equal to the cache (top-k imported from the DistillKit sample; dense, sampled and two-temperature
caches written here); a directory export resumes after a kill and refuses another cache's parts;
the cache is verified first and a failed export leaves no file behind."""
import json
import os

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

import cache_helpers  # noqa: E402
from cache_helpers import import_dataset, run_cli  # noqa: E402
from fastkd.cache import export  # noqa: E402
from fastkd.cache import manifest as fmt  # noqa: E402
from fastkd.cache.reader import LogitCache  # noqa: E402
from fastkd.cache.writer import write_cache  # noqa: E402
from paths import FIXTURES  # noqa: E402

SAMPLE = os.path.join(FIXTURES, "distillkit-sample")


def check_export(cache, table):
    """``table`` (one row per sample) holds exactly the cache's rows and labels."""
    info = json.loads(table.schema.metadata[b"fastkd"])
    assert info["layout"] == cache.layout and info["num_classes"] == cache.num_classes
    records = table.to_pylist()
    assert [record["sample"] for record in records] == list(range(len(cache)))
    for index, record in enumerate(records):
        target = cache[index]
        if cache.layout == "topk":
            rows = target if cache.variable else target.map_tensors(lambda part: part[None])
            assert record["values"] == rows.values.float().numpy().tolist()
            assert record["indices"] == rows.indices.numpy().tolist()
            lse = np.stack([np.atleast_1d(LogitCache(cache.path, temperature=t)[index].lse
                                          .float().numpy()) for t in cache.temperatures], -1)
            assert record["lse"] == lse.reshape(len(record["values"]), -1).tolist()
        elif cache.layout == "sampled":
            rows = target if cache.variable else target.map_tensors(lambda part: part[None])
            keep = rows.counts > 0   # weight-0 entries pad ragged rows; export drops them
            assert record["indices"] == [row[mask].tolist() for row, mask in
                                         zip(rows.indices, keep)]
            assert record["counts"] == [row[mask].tolist() for row, mask in
                                        zip(rows.counts, keep)]
        else:
            rows = target if cache.variable else target[None]
            assert record["logits"] == rows.float().numpy().tolist()
        labels = cache.sample_labels(index)
        if cache.manifest["labels_per"] == "row":
            assert record["labels"] == labels.tolist()
        elif cache.manifest["labels_per"] == "sample":
            assert record["label"] == int(labels)


def test_export_reads_back_equal_to_the_cache(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    assert import_dataset(os.path.join(SAMPLE, "distillkit"), tmp_path / "c") == 0
    cache = LogitCache(tmp_path / "c")
    assert run_cli("export", "--to", "parquet", tmp_path / "c", "--out",
               tmp_path / "x.parquet", "--quiet") == 0
    check_export(cache, pq.read_table(tmp_path / "x.parquet"))
    loaded = datasets.load_dataset("parquet", data_files=str(tmp_path / "x.parquet"),
                                   split="train", cache_dir=str(tmp_path / "hf"))
    assert loaded[4]["values"] == cache[4].values.numpy().tolist()
    assert [name for name in os.listdir(tmp_path) if name.startswith(".")] == []
    # an existing file is kept unless --overwrite
    assert run_cli("export", "--to", "parquet", tmp_path / "c", "--out",
               tmp_path / "x.parquet", "--quiet") == 1
    assert "--overwrite" in capsys.readouterr().err


def test_export_of_dense_sampled_and_two_temperature_caches(tmp_path):
    images, tokens = cache_helpers.IndexedImages(12), cache_helpers.TokenSequences(6)
    for layout, teacher, data, options in (
            ("dense", cache_helpers.digits_teacher(), images, {}),
            ("sampled", cache_helpers.digits_teacher(), images, {"sample": 5}),
            ("topk", cache_helpers.digits_teacher(), images,
             {"top_k": 3, "temperature": [1.0, 2.0], "dtype": "bf16"}),
            ("dense-tokens", cache_helpers.tiny_lm(), tokens, {}),
            ("sampled-tokens", cache_helpers.tiny_lm(), tokens, {"sample": 3})):
        out = tmp_path / layout
        write_cache(teacher, data, out, progress=False, **options)
        assert run_cli("export", "--to", "parquet", out, "--out", tmp_path / f"{layout}.parquet",
                   "--quiet") == 0
        check_export(LogitCache(out), pq.read_table(tmp_path / f"{layout}.parquet"))


def test_directory_export_resumes_and_refuses_foreign_parts(tmp_path, capsys):
    assert import_dataset(os.path.join(SAMPLE, "distillkit"), tmp_path / "c") == 0
    cache = LogitCache(tmp_path / "c")
    out = tmp_path / "parts"
    argv = ("export", "--to", "parquet", tmp_path / "c", "--out", out, "--samples-per-file",
            "2", "--quiet")
    assert run_cli(*argv) == 0
    names = sorted(os.listdir(out))
    assert names == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    check_export(cache, pa.concat_tables([pq.read_table(out / name) for name in names]))
    # a killed export: the last part missing, a temp file left; the rerun keeps the others
    first = os.stat(out / names[0]).st_mtime_ns
    os.remove(out / names[2])
    (out / ".part-00002.parquet.tmp-1").write_bytes(b"partial")
    assert run_cli(*argv) == 0
    assert sorted(os.listdir(out)) == names and os.stat(out / names[0]).st_mtime_ns == first
    check_export(cache, pa.concat_tables([pq.read_table(out / name) for name in names]))
    # parts of another cache's export are refused unless --overwrite
    assert import_dataset(os.path.join(SAMPLE, "open-instruct"), tmp_path / "o") == 0
    other = ("export", "--to", "parquet", tmp_path / "o", "--out", out, "--samples-per-file",
             "2", "--quiet")
    assert run_cli(*other) == 1
    assert "not part of this cache's export" in capsys.readouterr().err
    assert run_cli(*other, "--overwrite") == 0
    assert sorted(os.listdir(out)) == names[:2]


def test_export_verifies_the_cache_first_and_is_atomic(tmp_path, capsys, monkeypatch):
    assert import_dataset(os.path.join(SAMPLE, "distillkit"), tmp_path / "c") == 0
    # a failure while writing leaves neither the file nor a temp file
    original = export.ExportRows.table

    def failing(self, pa_module, start, stop):
        if start > 0:
            raise OSError(28, "No space left on device")
        return original(self, pa_module, start, stop)

    monkeypatch.setattr(export, "CHUNK_ROWS", 10)
    monkeypatch.setattr(export.ExportRows, "table", failing)
    assert run_cli("export", "--to", "parquet", tmp_path / "c", "--out", tmp_path / "x.parquet",
               "--quiet") == 1
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["c"]
    monkeypatch.setattr(export.ExportRows, "table", original)
    shard = next(entry for entry in fmt.manifest_files(LogitCache(tmp_path / "c").manifest)
                 if "values" in entry["file"])
    with open(tmp_path / "c" / shard["file"], "r+b") as handle:
        handle.seek(-1, 2)
        last = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([last[0] ^ 1]))
    assert run_cli("export", "--to", "parquet", tmp_path / "c", "--out", tmp_path / "x.parquet",
               "--quiet") == 1
    err = capsys.readouterr().err
    assert "verification failed" in err and shard["file"] in err
    assert not os.path.exists(tmp_path / "x.parquet")


@pytest.mark.parametrize("case, message", [
    ("a file", "--out {out} is a file; name a .parquet file, or a directory for the parts"),
    ("no parent", "--out {out}: its directory {parent} does not exist"),
    ("upper-case suffix", "--out {out} exists; pass --overwrite to replace it"),
    ("a directory part", "{out}/part-00000.parquet is a directory, not part of an export"),
    ("no space", "writing {out} failed: [Errno 28] No space left on device"),
])
def test_an_out_that_cannot_take_the_export_is_one_sentence(tmp_path, capsys, monkeypatch,
                                                             case, message):
    assert import_dataset(os.path.join(SAMPLE, "distillkit"), tmp_path / "c") == 0
    out, extra = tmp_path / "out", ()
    if case == "a file":
        out.write_text("mine")
    elif case == "no parent":
        out = tmp_path / "missing" / "x.parquet"
    elif case == "upper-case suffix":   # a .PARQUET name is a file too, not a directory
        out = tmp_path / "X.PARQUET"
        out.write_text("mine")
    elif case == "a directory part":
        (out / "part-00000.parquet").mkdir(parents=True)
        extra = ("--overwrite",)
    else:
        out = tmp_path / "x.parquet"

        def full(*args, **kwargs):
            raise OSError("Failed to open local file '.x.parquet.tmp-1'. Detail: [Errno 28] "
                          "No space left on device")
        monkeypatch.setattr(pq, "ParquetWriter", full)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert run_cli("export", "--to", "parquet", tmp_path / "c", "--out", out, "--quiet",
                   *extra) == 1
    err = capsys.readouterr().err
    expected = message.format(out=out, parent=out.parent)
    assert err == f"fastkd: error: {expected}\n" or (err.startswith(f"fastkd: error: {expected}")
                                                   and err.count("\n") == 1), err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
