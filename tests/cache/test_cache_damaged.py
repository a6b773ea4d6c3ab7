"""A damaged teacher-logit cache is refused with the file and the problem named: a flipped byte
(found by ``verify``'s checksums), a truncated or missing shard (found on open), and a manifest
edited by hand or re-signed with shards that do not agree with it."""
import json
import os
import shutil

import pytest

from fastkd.cache import CacheError, LogitCache
from fastkd.cache import manifest as fmt
from fastkd.cli import main as fastkd_main


@pytest.fixture
def damaged_copy(digits_cache, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(digits_cache[0], copy)
    return copy, fmt.read_manifest(str(copy))


def test_flipped_byte_fails_verify_naming_the_shard(damaged_copy, capsys):
    copy, manifest = damaged_copy
    name = manifest["shards"][2]["files"]["logits"]["file"]
    with open(copy / name, "r+b") as handle:
        handle.seek(-7, os.SEEK_END)
        byte = handle.read(1)
        handle.seek(-7, os.SEEK_END)
        handle.write(bytes([byte[0] ^ 0x01]))
    cache = LogitCache(copy)  # same size: opening succeeds, checksums find it
    with pytest.raises(CacheError, match=name.replace(".", r"\.") + ": sha256 differs"):
        cache.verify()
    assert fastkd_main(["verify", str(copy)]) == 1
    assert name in capsys.readouterr().err


def test_truncated_or_missing_shard_fails_on_open(damaged_copy):
    copy, manifest = damaged_copy
    truncated = manifest["shards"][1]["files"]["logits"]["file"]
    os.truncate(copy / truncated, os.path.getsize(copy / truncated) - 20)
    with pytest.raises(CacheError, match=truncated.replace(".", r"\.") + ".*truncated"):
        LogitCache(copy)
    missing = manifest["shards"][4]["files"]["logits"]["file"]
    os.remove(copy / missing)
    with pytest.raises(CacheError, match=missing.replace(".", r"\.") + ": missing"):
        LogitCache(copy)


def test_edited_manifest_is_detected(damaged_copy, capsys):
    copy, manifest = damaged_copy
    path = copy / fmt.MANIFEST_NAME
    raw = json.loads(path.read_text())
    raw["num_rows"] = 1796
    path.write_text(json.dumps(raw))
    with pytest.raises(CacheError, match="modified after it was written"):
        LogitCache(copy)
    assert fastkd_main(["info", str(copy)]) == 1
    assert "manifest.json" in capsys.readouterr().err
    # edits that re-sign the manifest still have to agree with the files
    moved = json.loads(json.dumps(manifest))
    moved["shards"][3]["row_start"] += 1
    fmt.write_manifest(str(copy), moved)
    with pytest.raises(CacheError, match="starts at sample"):
        LogitCache(copy)
    resized = json.loads(json.dumps(manifest))
    entry = resized["shards"][0]["files"]["logits"]
    entry["bytes"] += 2
    fmt.write_manifest(str(copy), resized)
    with pytest.raises(CacheError, match=entry["file"].replace(".", r"\.") + ".*manifest says"):
        LogitCache(copy)
    dropped = json.loads(json.dumps(manifest))
    del dropped["shards"][2]["files"]["labels"]
    fmt.write_manifest(str(copy), dropped)
    with pytest.raises(CacheError, match="shard 2 lists arrays"):
        LogitCache(copy)
    resigned = json.loads(json.dumps(manifest))
    resigned["shards"][5]["files"]["logits"]["sha256"] = "0" * 64
    fmt.write_manifest(str(copy), resigned)
    with pytest.raises(CacheError, match="sha256 differs"):
        LogitCache(copy).verify()
