"""``fastkd import --from vllm``: served-teacher responses -> the same top-k cache as
``fastkd cache --top-k`` of that model; resume, verify, and refusal of malformed lines.

Tolerance of the round trip: both caches store fp16 values (the import stores log-probs, the
cache raw logits plus an fp32 lse), so each log-prob differs by at most the two fp16 roundings:
``|d| <= 2**-11 * (|a| + |b|) + 1e-5``.
"""
import copy
import importlib.util
import json
import os
import re

import pytest
import torch

pytest.importorskip("transformers")

import fastkd  # noqa: E402
import hf_helpers  # noqa: E402
from fastkd.cache import LogitCache, importer, manifest as fmt  # noqa: E402
from fastkd.cache.importer import ServedResponses, vllm_style_response  # noqa: E402
from fastkd.cli import main as fastkd_main  # noqa: E402
from fastkd.tokens import TokenDataset  # noqa: E402

TOP_K = 5
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "examples", "data", "vllm_prompt_logprobs.jsonl")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A local tiny model, its responses as JSONL, and the same tokens as a token file."""
    root = tmp_path_factory.mktemp("served")
    model = hf_helpers.tiny_gpt2(seed=3)
    model.save_pretrained(root / "teacher")
    tokens = TokenDataset(hf_helpers.token_rows(count=10, seed=5))
    prompts = [tokens[i]["input_ids"].tolist() for i in range(len(tokens))]
    with open(root / "responses.jsonl", "w") as handle:
        for prompt in prompts:
            handle.write(json.dumps(vllm_style_response(model, prompt, TOP_K)) + "\n")
    hf_helpers.write_jsonl(root / "tokens.jsonl", [{"input_ids": p} for p in prompts])
    return root


def run_import(files, out, *extra):
    return fastkd_main(["import", "--from", "vllm", *map(str, files), "--out", str(out),
                        "--vocab-size", str(hf_helpers.VOCAB), "--top-k", str(TOP_K), "--quiet",
                        *extra])


def test_import_round_trips_to_the_cache_of_the_same_model(served, tmp_path):
    assert run_import([served / "responses.jsonl"], tmp_path / "imported") == 0
    assert fastkd_main(["cache", "--teacher", f"hf:{served / 'teacher'}", "--dataset",
                        f"jsonl:{served / 'tokens.jsonl'}", "--out", str(tmp_path / "cached"),
                        "--top-k", str(TOP_K), "--quiet"]) == 0
    imported, cached = LogitCache(tmp_path / "imported"), LogitCache(tmp_path / "cached")
    assert imported.manifest["layout"] == "topk" and imported.num_classes == hf_helpers.VOCAB
    assert torch.equal(imported.offsets, cached.offsets)
    assert torch.equal(imported.labels, cached.labels)
    assert imported.manifest["dataset"]["fingerprint"]["sha256"] == \
        cached.manifest["dataset"]["fingerprint"]["sha256"]
    for index in range(len(cached)):
        got, want = imported[index], cached[index]
        assert torch.equal(got.indices.long(), want.indices.long())
        assert torch.equal(got.lse, torch.zeros_like(got.lse))  # from_logprobs: lse = 0
        got_lp = got.values.float()
        want_lp = want.values.float() - want.lse[:, None]
        bound = 2 ** -11 * (got_lp.abs() + want.values.float().abs()) + 1e-5
        assert ((got_lp - want_lp).abs() <= bound).all()
    # the import pairs with the token data like a cache does
    fastkd.CachedDataset(TokenDataset.from_spec(f"jsonl:{served / 'tokens.jsonl'}"), imported)
    assert fastkd_main(["verify", str(tmp_path / "imported")]) == 0


def test_import_resumes_byte_identically(served, tmp_path, monkeypatch):
    small = str(TOP_K * 7 * 12 / 2 ** 20)  # ~12 rows per shard: several shards
    monkeypatch.setattr(importer, "IMPORT_BATCH", 2)  # small batches, so shards land early
    assert run_import([served / "responses.jsonl"], tmp_path / "whole",
                      "--shard-size-mb", small) == 0
    original = ServedResponses.rows

    def interrupted(self, index):
        if index >= 6:
            raise KeyboardInterrupt
        return original(self, index)

    monkeypatch.setattr(ServedResponses, "rows", interrupted)
    # Ctrl-C: the CLI prints one line and exits 130 (the shell's status for SIGINT)
    assert run_import([served / "responses.jsonl"], tmp_path / "part",
                      "--shard-size-mb", small) == 130
    manifest = fmt.read_manifest(str(tmp_path / "part"))
    assert manifest["status"] == "incomplete" and manifest["shards"]
    monkeypatch.setattr(ServedResponses, "rows", original)
    assert run_import([served / "responses.jsonl"], tmp_path / "part",
                      "--shard-size-mb", small) == 0
    whole, part = fmt.read_manifest(str(tmp_path / "whole")), fmt.read_manifest(
        str(tmp_path / "part"))
    assert len(whole["shards"]) > 2
    assert [f["sha256"] for f in fmt.manifest_files(whole)] == \
        [f["sha256"] for f in fmt.manifest_files(part)]
    # other input files: refused unless --overwrite
    other = tmp_path / "other.jsonl"
    other.write_text((served / "responses.jsonl").read_text().splitlines()[0] + "\n")
    assert run_import([other], tmp_path / "part") == 1
    assert run_import([other], tmp_path / "part", "--overwrite") == 0
    assert len(LogitCache(tmp_path / "part")) == 1


def test_shipped_sample_imports(tmp_path, capsys):
    status = fastkd_main(["import", "--from", "vllm", SAMPLE, "--out", str(tmp_path / "s"),
                          "--vocab-size", "64", "--top-k", "4"])
    assert status == 0, capsys.readouterr().err
    cache = LogitCache(tmp_path / "s")
    lines = [json.loads(line) for line in open(SAMPLE)]
    assert len(cache) == len(lines)
    for index, response in enumerate(lines):
        choice = response["choices"][0]
        n = len(choice["prompt_token_ids"])
        rows = cache[index]
        assert rows.values.shape == (n, 4)
        # row j = prompt position j + 1's distribution; its best id has rank 1 there
        for j, entries in enumerate(choice["prompt_logprobs"][1:]):
            best = min(entries, key=lambda key: entries[key]["rank"])
            assert int(rows.indices[j, 0]) == int(best)
        last = choice["logprobs"]["top_logprobs"][0]
        assert int(rows.indices[-1, 0]) == int(max(last, key=last.get).split(":")[1])
        assert (rows.values.float().exp().sum(-1) <= 1 + 1e-3).all()


def test_the_sample_script_writes_the_shipped_sample(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "make_vllm_sample", os.path.join(REPO, "examples", "make_vllm_sample.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "sample.jsonl"
    module.main(["--out", str(out)])
    written = [json.loads(line) for line in out.read_text().splitlines()]
    shipped = [json.loads(line) for line in open(SAMPLE)]
    assert len(written) == len(shipped)
    for new, old in zip(written, shipped):  # same prompts and ids; log-probs up to float noise
        assert new["choices"][0]["prompt_token_ids"] == old["choices"][0]["prompt_token_ids"]
        for a, b in zip(new["choices"][0]["prompt_logprobs"][1:],
                        old["choices"][0]["prompt_logprobs"][1:]):
            assert a.keys() == b.keys()
            assert all(abs(a[key]["logprob"] - b[key]["logprob"]) < 1e-4 for key in a)


def _sample_line():
    return json.loads(open(SAMPLE).readline())


def _broken(edit):
    response = copy.deepcopy(_sample_line())
    edit(response, response["choices"][0])
    return json.dumps(response)


BAD_LINES = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"id": "x"}), "missing 'choices'"),
    (_broken(lambda r, c: c.pop("prompt_token_ids")), "missing 'prompt_token_ids'"),
    (_broken(lambda r, c: c.pop("prompt_logprobs")), "missing 'prompt_logprobs'"),
    (_broken(lambda r, c: c.pop("logprobs")), r"missing 'logprobs.top_logprobs\[0\]'"),
    (_broken(lambda r, c: c.__setitem__("logprobs", [1])), r"missing 'logprobs.top_logprobs"),
    (_broken(lambda r, c: c["prompt_logprobs"].pop()), "one entry per prompt token"),
    (_broken(lambda r, c: c["prompt_logprobs"].__setitem__(2, None)), "expected an object"),
    (_broken(lambda r, c: c["prompt_token_ids"].__setitem__(0, 64)), r"outside \[0, 64\)"),
    (_broken(lambda r, c: c["prompt_logprobs"][1].__setitem__("70", {"logprob": -0.5})),
     r"token id 70 outside \[0, 64\)"),
    (_broken(lambda r, c: c["prompt_logprobs"][1].__setitem__("x", {"logprob": -9.0})),
     "is not a token id"),
    (_broken(lambda r, c: c["prompt_logprobs"].__setitem__(2, {"3": {"logprob": -1.0}})),
     "fewer than --top-k"),
    (_broken(lambda r, c: c["prompt_logprobs"][1].__setitem__("3", {"logprob": 0.7})),
     "not a log-probability"),
    (_broken(lambda r, c: c["prompt_logprobs"][1].__setitem__("3", {"rank": 1})),
     "expected a number"),
]


@pytest.mark.parametrize("line, message", BAD_LINES)
def test_malformed_lines_are_refused_with_their_line_number(tmp_path, capsys, line, message):
    path = tmp_path / "responses.jsonl"
    good = open(SAMPLE).readline()
    path.write_text(good + "\n" + line + "\n")  # the bad response is on line 3
    status = fastkd_main(["import", "--from", "vllm", str(path), "--out", str(tmp_path / "c"),
                          "--vocab-size", "64", "--top-k", "4", "--quiet"])
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err
    assert f"{path}:3" in err
    assert re.search(message, err), err


def test_import_argument_errors(tmp_path, capsys):
    assert fastkd_main(["import", "--from", "vllm", str(tmp_path / "none.jsonl"), "--out",
                        str(tmp_path / "c"), "--vocab-size", "64", "--top-k", "4"]) == 1
    assert "no such file" in capsys.readouterr().err
    assert fastkd_main(["import", "--from", "vllm", SAMPLE, "--out", str(tmp_path / "c"),
                        "--vocab-size", "3", "--top-k", "4"]) == 1
    assert "exceeds vocab_size" in capsys.readouterr().err
    assert fastkd_main(["import", "--from", "vllm", SAMPLE, "--out", str(tmp_path / "c"),
                        "--vocab-size", "64", "--top-k", "0"]) == 1
    assert "top_k must be an int >= 1" in capsys.readouterr().err
