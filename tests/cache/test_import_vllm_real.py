"""``fastkd import --from vllm`` against what a real vLLM 0.32.0 server wrote (tests/fixtures/
vllm-0.32.0: 8 responses, K = 20, 175 prompt positions, and the tiny Llama that served them),
and the importer's memory bound on a large input.

Tolerances: the import stores fp16 log-probs (rounding <= 2**-11 relative); the fixture's README
reports vLLM's log-probs within 3.1e-5 of ``transformers`` on the machine that made it, so 1e-4
absolute covers that difference on another machine's CPU kernels.
"""
import json
import os
import tracemalloc

import pytest
import torch

pytest.importorskip("transformers")

import fastkd  # noqa: E402
import hf_helpers  # noqa: E402
from fastkd.cache import LogitCache, importer  # noqa: E402
from fastkd.cache.importer import import_served, vllm_style_response  # noqa: E402
from fastkd.cli import main as fastkd_main  # noqa: E402
from fastkd.tokens import TokenDataset  # noqa: E402
from paths import FIXTURES

FIXTURE = os.path.join(FIXTURES, "vllm-0.32.0")
RESPONSES = os.path.join(FIXTURE, "responses.jsonl")
TOKENS = os.path.join(FIXTURE, "tokens.jsonl")
TEACHER = os.path.join(FIXTURE, "teacher")
K, VOCAB = 20, 4096
ABSOLUTE = 1e-4


def _import(out, *files, top_k=K):
    return fastkd_main(["import", "--from", "vllm", *map(str, files or [RESPONSES]), "--out",
                        str(out), "--vocab-size", str(VOCAB), "--top-k", str(top_k),
                        "--quiet"])


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "imported"
    assert _import(out) == 0
    return LogitCache(out)


@pytest.fixture(scope="module")
def prompts():
    return [json.loads(line)["input_ids"] for line in open(TOKENS)]


def test_the_import_is_the_top_20_of_the_served_models_log_softmax(imported, prompts):
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(TEACHER, local_files_only=True)
    model.eval()
    assert imported.num_classes == VOCAB and imported.manifest["top_k"] == K
    assert imported.manifest["teacher"]["model"] == "teacher"
    assert len(imported) == len(prompts) == 8
    assert sum(len(p) for p in prompts) == 175
    for index, ids in enumerate(prompts):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        want_values, want_ids = torch.log_softmax(logits, -1).topk(K)
        rows = imported[index]
        assert torch.equal(rows.indices.long(), want_ids)  # ids, in order
        assert torch.equal(rows.lse, torch.zeros_like(rows.lse))
        got = rows.values.float()
        assert ((got - want_values).abs() <= 2 ** -11 * want_values.abs() + ABSOLUTE).all()
        labels = imported.sample_labels(index)
        assert labels[:-1].tolist() == ids[1:] and int(labels[-1]) == -100


def test_the_import_agrees_with_fastkd_cache_of_the_same_model(imported, tmp_path):
    assert fastkd_main(["cache", "--teacher", f"hf:{TEACHER}", "--dataset", f"jsonl:{TOKENS}",
                        "--out", str(tmp_path / "cached"), "--top-k", str(K), "--quiet"]) == 0
    cached = LogitCache(tmp_path / "cached")
    assert cached.num_classes == imported.num_classes == VOCAB
    hf_helpers.assert_import_matches_cache(imported, cached, absolute=ABSOLUTE)
    fastkd.CachedDataset(TokenDataset.from_spec(f"jsonl:{TOKENS}"), imported)


def _rewritten(tmp_path, edit):
    path = tmp_path / "edited.jsonl"
    with open(RESPONSES) as source, open(path, "w") as target:
        for line in source:
            response = json.loads(line)
            edit(response["choices"][0])
            target.write(json.dumps(response) + "\n")
    return path


def test_real_responses_without_token_id_keys_are_refused(tmp_path, capsys):
    """Without return_tokens_as_token_ids vLLM keys top_logprobs by decoded text; here each
    key is made the id's digits, as when every top token decodes to a number."""
    def as_text(choice):
        top = choice["logprobs"]["top_logprobs"]
        top[0] = {key.split(":")[1]: value for key, value in top[0].items()}
    path = _rewritten(tmp_path, as_text)
    assert _import(tmp_path / "c", path) == 1
    err = capsys.readouterr().err
    assert f"{path}:1" in err and "return_tokens_as_token_ids=true" in err, err


def test_a_top_k_beyond_the_requested_prompt_logprobs_is_refused(tmp_path, capsys):
    """prompt_logprobs=20: an entry holds the top-20 and the prompt token; with --top-k 21
    that token (rank 2850 on line 1) would pass for the 21st most likely."""
    assert _import(tmp_path / "c", top_k=K + 1) == 1
    err = capsys.readouterr().err
    assert f"{RESPONSES}:1" in err and "top-20 plus the prompt token" in err, err


def test_real_responses_with_another_prompt_are_refused(tmp_path, capsys):
    def other_prompt(choice):
        ids = choice["prompt_token_ids"]
        if len(ids) > 2:
            ids[1], ids[2] = ids[2], ids[1]
    path = _rewritten(tmp_path, other_prompt)
    assert _import(tmp_path / "c", path) == 1
    err = capsys.readouterr().err
    assert f"{path}:1" in err and "does not hold prompt token" in err, err


class _RandomTeacher(torch.nn.Module):
    vocab = 512

    def forward(self, ids):
        return torch.randn(ids.shape + (self.vocab,),
                           generator=torch.Generator().manual_seed(int(ids.sum())))


def test_memory_is_bounded_by_a_response_not_by_the_input(tmp_path, monkeypatch):
    """8 MB of responses (about 60 KB each): the import's peak of Python and numpy memory stays
    far below the input (a reader that keeps the lines needs more than the input), and each
    line is parsed at most once per pass (plus the dataset fingerprint's 16 sampled items)."""
    generator = torch.Generator().manual_seed(0)
    distinct = [json.dumps(vllm_style_response(
        _RandomTeacher(), torch.randint(0, 512, (40,), generator=generator).tolist(), 16))
        for _ in range(4)]
    path = tmp_path / "big.jsonl"
    with open(path, "w") as handle:
        count = 0
        while handle.tell() < 8 * 2 ** 20:
            handle.write(distinct[count % len(distinct)] + "\n")
            count += 1
    size = os.path.getsize(path)
    (tmp_path / "one.jsonl").write_text(distinct[0] + "\n")  # loads the modules it uses
    import_served([tmp_path / "one.jsonl"], tmp_path / "warm", vocab_size=512, top_k=16,
                  progress=False)
    parsed = []
    original = importer.load_line
    monkeypatch.setattr(importer, "load_line",
                        lambda raw, where: parsed.append(where) or original(raw, where))
    tracemalloc.start()
    try:
        manifest = import_served([path], tmp_path / "c", vocab_size=512, top_k=16,
                                 shard_size_mb=0.25, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert manifest["num_samples"] == count and manifest["num_rows"] == 40 * count
    assert peak < size / 4, (peak, size)
    assert len(parsed) <= 2 * count + 16
