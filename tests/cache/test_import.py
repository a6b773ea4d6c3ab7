"""``fastkd import --from vllm``: served-teacher responses -> the same top-k cache as
``fastkd cache --top-k`` of that model; resume, verify, and refusal of malformed lines.

Tolerance of the round trip: both caches store fp16 values (the import stores log-probs, the
cache raw logits plus an fp32 lse), so each log-prob differs by at most the two fp16 roundings:
``|d| <= 2**-11 * (|a| + |b|) + 1e-5``.
"""
import copy
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
from paths import ROOT, load_script

TOP_K = 5
REPO = ROOT
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
    hf_helpers.assert_import_matches_cache(imported, cached, absolute=1e-5)
    # the import pairs with the token data like a cache does
    fastkd.CachedDataset(TokenDataset.from_spec(f"jsonl:{served / 'tokens.jsonl'}"), imported)
    assert fastkd_main(["verify", str(tmp_path / "imported")]) == 0


def test_import_resumes_byte_identically(served, tmp_path, monkeypatch):
    small = str(TOP_K * 7 * 12 / 2 ** 20)  # ~12 rows per shard: several shards
    monkeypatch.setattr(importer, "IMPORT_BATCH", 2)  # small batches, so shards land early
    assert run_import([served / "responses.jsonl"], tmp_path / "whole",
                      "--shard-size-mb", small) == 0
    original = ServedResponses.iter_rows

    def interrupted(self, start=0):
        for index, sample in original(self, start):
            if index >= 6:
                raise KeyboardInterrupt
            yield index, sample

    monkeypatch.setattr(ServedResponses, "iter_rows", interrupted)
    # Ctrl-C: the CLI prints one line and exits 130 (the shell's status for SIGINT)
    assert run_import([served / "responses.jsonl"], tmp_path / "part",
                      "--shard-size-mb", small) == 130
    manifest = fmt.read_manifest(str(tmp_path / "part"))
    assert manifest["status"] == "incomplete" and manifest["shards"]
    monkeypatch.setattr(ServedResponses, "iter_rows", original)
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
    capsys.readouterr()
    assert fastkd_main(["info", str(tmp_path / "s")]) == 0   # the fingerprint is the files'
    info = capsys.readouterr().out
    assert "input files sha256" in info and "weights" not in info
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
    module = load_script(os.path.join("examples", "make_vllm_sample.py"))
    out = tmp_path / "sample.jsonl"
    module.main(["--out", str(out)])
    written = [json.loads(line) for line in out.read_text().splitlines()]
    shipped = [json.loads(line) for line in open(SAMPLE)]
    assert len(written) == len(shipped)
    for new, old in zip(written, shipped):  # same prompts and ids; log-probs up to float noise
        assert new["choices"][0]["prompt_token_ids"] == old["choices"][0]["prompt_token_ids"]
        for a, b in zip(new["choices"][0]["prompt_logprobs"][1:],
                        old["choices"][0]["prompt_logprobs"][1:]):
            assert list(a) == list(b)  # vLLM's order: the prompt token, then the top-K
            assert all(abs(a[key]["logprob"] - b[key]["logprob"]) < 1e-4 for key in a)


def _sample_line():
    return json.loads(open(SAMPLE).readline())


def _absent(entry: dict, count: int):
    """``count`` token ids of the sample's vocabulary that ``entry`` does not hold."""
    return [token for token in range(64) if str(token) not in entry][:count]


def _absent_from(entry: dict) -> int:
    return _absent(entry, 1)[0]


def _shifted(choice: dict) -> list:
    """prompt_logprobs without the leading null, with the generated position's entry in the
    last place: the length still matches, every entry is one position off."""
    last = {key.split(":")[1]: {"logprob": value, "rank": rank} for rank, (key, value) in
            enumerate(choice["logprobs"]["top_logprobs"][0].items(), 1)}
    return choice["prompt_logprobs"][1:] + [last]


def _make_echo(choice: dict) -> None:
    """What vLLM writes with echo=true: ``logprobs`` covers the prompt tokens, then the
    generated one."""
    prompt = [None] + [{f"token_id:{key}": value["logprob"] for key, value in entry.items()}
                       for entry in choice["prompt_logprobs"][1:]]
    logprobs = choice["logprobs"]
    logprobs["top_logprobs"] = prompt + logprobs["top_logprobs"]
    logprobs["tokens"] = [f"token_id:{t}" for t in choice["prompt_token_ids"]] + \
        logprobs["tokens"]


def _rankless_top3_and_prompt_token(choice: dict) -> dict:
    """Entry 1 as bare numbers: its top 3 and the prompt token as the least likely item, which
    without ranks may be a top-3 plus a prompt token from far outside the top-4."""
    entry, token = choice["prompt_logprobs"][1], str(choice["prompt_token_ids"][1])
    others = sorted((key for key in entry if key != token), key=lambda k: -entry[k]["logprob"])
    return {**{key: entry[key]["logprob"] for key in others[:3]}, token: -30.0}


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
    (_broken(lambda r, c: c["prompt_logprobs"].__setitem__(
        1, {str(c["prompt_token_ids"][1]): {"logprob": -1.0}})), "fewer than --top-k"),
    (_broken(lambda r, c: c["prompt_logprobs"][1].__setitem__("3", {"logprob": 0.7})),
     "not a log-probability"),
    (_broken(lambda r, c: c["prompt_logprobs"][1].__setitem__("3", {"rank": 1})),
     "expected a number"),
    # top_logprobs keyed by decoded text (no return_tokens_as_token_ids): every token of this
    # vocabulary "decodes" to its number here, the case that would read as ids
    (_broken(lambda r, c: c["logprobs"].__setitem__("top_logprobs", [
        {key.split(":")[1]: value for key, value in c["logprobs"]["top_logprobs"][0].items()}])),
     "request with return_tokens_as_token_ids=true"),
    (_broken(lambda r, c: c["logprobs"].__setitem__("top_logprobs", [
        {" " + key.split(":")[1]: v for key, v in c["logprobs"]["top_logprobs"][0].items()}])),
     "request with return_tokens_as_token_ids=true"),
    (_broken(lambda r, c: c["prompt_logprobs"][1].__setitem__(" 5", {"logprob": -9.0})),
     "is not a token id"),
    # vLLM's guarantees
    (_broken(lambda r, c: c.__setitem__("prompt_logprobs", _shifted(c))),
     r"'prompt_logprobs\[0\]' must be null"),
    (_broken(lambda r, c: c["prompt_token_ids"].__setitem__(1, _absent_from(
        c["prompt_logprobs"][1]))), "does not hold prompt token"),
    (_broken(lambda r, c: r.pop("model")), "missing 'model'"),
    (_broken(lambda r, c: _make_echo(c)), "echo=true"),
    (_broken(lambda r, c: c["prompt_logprobs"][2].update(
        {str(t): {"logprob": -50.0 - t, "rank": 60 + t} for t in _absent(
            c["prompt_logprobs"][2], 3)})),
     r"prompt_logprobs\[2\]: its 8 items and the prompt token's rank fit no request \(the "
     r"prompt token ranks outside them\), but the entries before it fit K = 4 \(from entry 1 "
     r"on\).*K or K \+ 1 items"),
    (_broken(lambda r, c: c.__setitem__("token_ids", [_absent_from(
        {key.split(":")[1]: 0 for key in c["logprobs"]["top_logprobs"][0]})])),
     "does not hold the generated token"),
    (_broken(lambda r, c: c["prompt_logprobs"].__setitem__(
        1, _rankless_top3_and_prompt_token(c))),
     r"prompt_logprobs\[1\]: the prompt token \d+ is the least likely of the 4 items and the "
     r"entry gives no 'rank'.*fewer than --top-k 4"),
    (_broken(lambda r, c: c.__setitem__("token_ids", [int(min(
        c["logprobs"]["top_logprobs"][0], key=c["logprobs"]["top_logprobs"][0].get)
        .split(":")[1])])), "least likely of exactly --top-k 4"),
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


def test_an_unreadable_file_ends_in_one_sentence(tmp_path, capsys, monkeypatch):
    def refuse(path, mode="r"):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(importer, "open", refuse, raising=False)
    assert fastkd_main(["import", "--from", "vllm", SAMPLE, "--out", str(tmp_path / "c"),
                        "--vocab-size", "64", "--top-k", "4"]) == 1
    assert f"{SAMPLE}: cannot be read (Permission denied)" in capsys.readouterr().err


def test_import_argument_errors(tmp_path, capsys):
    assert fastkd_main(["import", "--from", "vllm", str(tmp_path / "none.jsonl"), "--out",
                        str(tmp_path / "c"), "--vocab-size", "64", "--top-k", "4"]) == 1
    assert "none.jsonl: no such file" in capsys.readouterr().err
    assert fastkd_main(["import", "--from", "vllm", os.devnull, "--out", str(tmp_path / "c"),
                        "--vocab-size", "64", "--top-k", "4"]) == 1
    assert f"{os.devnull}: not a regular file" in capsys.readouterr().err
    assert fastkd_main(["import", "--from", "vllm", SAMPLE, "--out", str(tmp_path / "c"),
                        "--vocab-size", "3", "--top-k", "4"]) == 1
    assert "exceeds vocab_size" in capsys.readouterr().err
    assert fastkd_main(["import", "--from", "vllm", SAMPLE, "--out", str(tmp_path / "c"),
                        "--vocab-size", "64", "--top-k", "0"]) == 1
    assert "top_k (--top-k) must be an int >= 1" in capsys.readouterr().err
    # the same file twice, under two names: its rows would be imported twice
    again = os.path.join(os.path.dirname(SAMPLE), ".", os.path.basename(SAMPLE))
    assert fastkd_main(["import", "--from", "vllm", SAMPLE, again, "--out",
                        str(tmp_path / "c"), "--vocab-size", "64", "--top-k", "4"]) == 1
    assert f"{again} is given twice (also as {SAMPLE}); give each input file once" in \
        capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    # ids past int32 (the stored class ids) cannot be asked for
    assert fastkd_main(["import", "--from", "vllm", SAMPLE, "--out", str(tmp_path / "c"),
                        "--vocab-size", str(2 ** 65), "--top-k", "4"]) == 1
    assert "--vocab-size" in capsys.readouterr().err


def _raw_lines():
    good = open(SAMPLE, "rb").readline().rstrip(b"\n")
    response = _sample_line()
    huge_id = copy.deepcopy(response)
    huge_id["choices"][0]["prompt_token_ids"][0] = 2 ** 64
    huge_key = copy.deepcopy(response)
    huge_key["choices"][0]["prompt_logprobs"][1][str(2 ** 64)] = {"logprob": -20.0, "rank": 9}
    long_key = copy.deepcopy(response)
    long_key["choices"][0]["logprobs"]["top_logprobs"][0]["token_id:" + "9" * 5000] = -20.0
    huge_logprob = copy.deepcopy(response)
    huge_logprob["choices"][0]["prompt_logprobs"][1]["3"] = {"logprob": -10 ** 400, "rank": 9}
    twice = copy.deepcopy(response)   # a key written twice in one object
    entry = twice["choices"][0]["prompt_logprobs"][2]
    entry["DUPLICATE"] = {"logprob": -0.01, "rank": 1}
    return [
        (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
        (good.replace(b'"text_completion"', b'"text_\xffcompletion"'), "not UTF-8 text"),
        (json.dumps(huge_id).encode(), r"prompt token id 18446744073709551616 outside \[0, 64\)"),
        (json.dumps(huge_key).encode(), r"token id 18446744073709551616 outside \[0, 64\)"),
        (json.dumps(long_key).encode(), r"token id 9{20}9* outside \[0, 64\)"),
        # an integer literal too long for Python to convert
        (good.replace(b'"prompt_token_ids": [', b'"prompt_token_ids": [' + b"7" * 5000 + b", "),
         "not valid JSON"),
        (json.dumps(huge_logprob).encode(), r"log-prob -10{30}.* is beyond a float's range"),
        (json.dumps(twice).encode().replace(b'"DUPLICATE"', json.dumps(next(iter(
            entry))).encode()), r"key '\d+' appears twice in one object"),
    ]


@pytest.mark.parametrize("number", range(8))
def test_unreadable_lines_end_in_one_sentence_naming_file_and_line(tmp_path, capsys, number):
    raw, message = _raw_lines()[number]
    path = tmp_path / "responses.jsonl"
    path.write_bytes(open(SAMPLE, "rb").readline() + b"\n" + raw + b"\n")
    status = fastkd_main(["import", "--from", "vllm", str(path), "--out", str(tmp_path / "c"),
                          "--vocab-size", "64", "--top-k", "4", "--quiet"])
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err and err.count("\n") == 1, err
    assert f"{path}:3" in err and re.search(message, err), err


def test_two_models_in_one_import_are_refused(tmp_path, capsys):
    first, second = _sample_line(), json.loads(open(SAMPLE).readlines()[1])
    second["model"] = "another-teacher"
    one, two = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    one.write_text(json.dumps(first) + "\n")
    two.write_text("\n" + json.dumps(second) + "\n")
    status = fastkd_main(["import", "--from", "vllm", str(one), str(two), "--out",
                          str(tmp_path / "c"), "--vocab-size", "64", "--top-k", "4", "--quiet"])
    err = capsys.readouterr().err
    assert status == 1 and f"{two}:2" in err and f"{one}:1" in err, err
    assert "'another-teacher' differs from 'tiny-gpt2'" in err


class _MaskedTeacher(torch.nn.Module):
    """Logits with only 3 finite classes per row: every top-5 holds -inf log-probs, which vLLM
    writes as -9999.0."""
    vocab = 16

    def forward(self, ids):
        logits = torch.randn(ids.shape + (self.vocab,),
                             generator=torch.Generator().manual_seed(int(ids.sum())))
        logits[..., 3:] = float("-inf")
        return logits


def test_vllm_minus_9999_is_stored_as_minus_inf(tmp_path):
    teacher = _MaskedTeacher()
    path = tmp_path / "responses.jsonl"
    prompts = [[1, 5, 2, 9, 0], [4, 4, 11, 2], [7]]
    lines = [json.dumps(vllm_style_response(teacher, p, 5)) for p in prompts]
    assert "-9999.0" in lines[0] and "Infinity" not in lines[0]
    path.write_text("\n".join(lines) + "\n")
    assert fastkd_main(["import", "--from", "vllm", str(path), "--out", str(tmp_path / "c"),
                        "--vocab-size", "16", "--top-k", "5", "--quiet"]) == 0
    cache = LogitCache(tmp_path / "c")
    for index, prompt in enumerate(prompts):
        rows = cache[index]
        logprobs = torch.log_softmax(teacher(torch.tensor(prompt)[None])[0], -1)
        values = rows.values.float()
        assert torch.isneginf(values[:, 3:]).all() and torch.isfinite(values[:, :3]).all()
        assert torch.equal(rows.indices[:, :3].long(), logprobs.topk(3).indices)
        assert (values[:, :3] - logprobs.topk(3).values).abs().max() < 2e-3
        student = torch.randn(len(prompt), 16, requires_grad=True)
        loss = fastkd.kd_loss(student, rows)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    assert fastkd_main(["verify", str(tmp_path / "c")]) == 0
