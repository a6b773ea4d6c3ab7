"""Text, prompt/completion and chat rows in: tokenized with a local Hugging Face tokenizer
(`--tokenizer`, default an hf: teacher's own), completion-only labels, a cache that keeps only
the learned positions' rows, and the collator putting them back in place. Real text: Python's
bundled reference docs; a real byte-level BPE tokenizer (the vLLM fixture's teacher)."""
import json
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastkd import CachedDataset, LogitCache, kd_loss  # noqa: E402
from fastkd.cli import main as fastkd_main  # noqa: E402
from fastkd.hf_text import TextTokenizer  # noqa: E402
from fastkd.tokens import TokenDataset, collate_causal_lm, learned_positions  # noqa: E402
from paths import FIXTURES

TOKENIZER_DIR = os.path.join(FIXTURES, "vllm-0.32.0", "teacher")
VOCAB = 4096
# a minimal ChatML-style template: what a chat model's tokenizer_config.json carries
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _docs(count: int):
    from pydoc_data.topics import topics
    texts = [topics[key] for key in sorted(topics)]
    return [" ".join(text.split())[:200] for text in texts[:count]]


@pytest.fixture(scope="module")
def tokenizer():
    loaded = transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR, local_files_only=True)
    loaded.chat_template = CHAT_TEMPLATE
    return loaded


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer):
    """A tiny Llama of the tokenizer's vocabulary saved with its tokenizer (as `hf:` takes it)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, max_position_embeddings=512,
                                      use_cache=False, bos_token_id=0, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model


def _rows(kind: str, count: int = 6):
    docs = _docs(2 * count)
    if kind == "text":
        return [{"text": doc} for doc in docs[:count]]
    if kind == "prompt":
        return [{"prompt": f"Summarize: {docs[i][:60]}", "completion": docs[count + i][:80]}
                for i in range(count)]
    return [{"messages": [{"role": "user", "content": docs[i][:50]},
                          {"role": "assistant", "content": docs[count + i][:40]},
                          {"role": "user", "content": "More."},
                          {"role": "assistant", "content": docs[i][60:100]}]}
            for i in range(count)]


def _write(path, rows):
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


# ----------------------------------------------------------------------------- tokenizing
def test_text_rows_learn_every_token_and_end_with_eos(tokenizer):
    text = TextTokenizer(tokenizer)
    row = text({"text": "def f(x): return x"}, "t:1")
    expected = tokenizer("def f(x): return x")["input_ids"] + [tokenizer.eos_token_id]
    assert row["input_ids"] == expected and row["labels"] == expected


def test_prompt_completion_learns_only_the_completion(tokenizer):
    text = TextTokenizer(tokenizer)
    row = text({"prompt": "Question: 2 + 2?", "completion": " Answer: 4."}, "t:1")
    prompt = tokenizer("Question: 2 + 2?")["input_ids"]
    completion = tokenizer(" Answer: 4.", add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == prompt + completion + [tokenizer.eos_token_id]
    assert row["labels"] == [-100] * len(prompt) + completion + [tokenizer.eos_token_id]


def test_chat_learns_only_the_assistant_turns(tokenizer):
    text = TextTokenizer(tokenizer)
    messages = [{"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello, how can I help?"},
                {"role": "user", "content": "Tell me a joke"},
                {"role": "assistant", "content": "No."}]
    row = text({"messages": messages}, "t:1")
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert row["input_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    learned = tokenizer.decode([t for t in row["labels"] if t != -100])
    assert learned == "Hello, how can I help?</s>No.</s>"
    assert "Hi there" not in learned and "<|assistant|>" not in learned


@pytest.mark.parametrize("row, message", [
    ({"text": 5}, r"t:1: 'text' must be a string, got int"),
    ({"prompt": "a"}, r"t:1: 'completion' must be a string, got nothing"),
    ({"messages": []}, r"t:1: 'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "x"}]}, r"t:1: 'messages' has no assistant turn"),
    ({"title": "x"}, r"t:1: expected 'input_ids', 'text', 'prompt' and 'completion', or "
                     r"'messages'; got \['title'\]"),
])
def test_bad_text_rows_name_the_row_and_field(tokenizer, row, message):
    with pytest.raises(ValueError, match=message):
        TextTokenizer(tokenizer)(row, "t:1")


def test_chat_template_that_is_not_a_prefix_of_itself_is_refused(tokenizer):
    """A template that renders earlier turns differently once later ones exist (e.g. one that
    drops earlier assistant reasoning) cannot locate the assistant tokens: refused, not guessed."""
    odd = TextTokenizer(tokenizer)
    odd.tokenizer = type(tokenizer).from_pretrained(TOKENIZER_DIR, local_files_only=True)
    odd.tokenizer.chat_template = ("{% for m in messages %}{% if loop.last %}<|{{ m['role'] }}|>"
                                   "{{ m['content'] }}{% else %}<|{{ m['role'] }}|>...{% endif %}"
                                   "{% endfor %}{% if add_generation_prompt %}<|assistant|>"
                                   "{% endif %}")
    with pytest.raises(ValueError, match="does not render the conversation up to turn 1 as a "
                                         "prefix of the whole"):
        odd(_rows("chat", 1)[0], "t:1")


def test_chat_rows_need_a_chat_template(tmp_path):
    plain = transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR, local_files_only=True)
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        TextTokenizer(plain)(_rows("chat", 1)[0], "t:1")


def test_text_rows_without_a_tokenizer_say_how_to_pass_one(tmp_path):
    path = _write(tmp_path / "text.jsonl", _rows("text", 2))
    with pytest.raises(ValueError, match=r"text\.jsonl:1: the row holds text, which needs a "
                                         r"tokenizer: pass --tokenizer DIR"):
        TokenDataset.from_spec(f"jsonl:{path}")[0]


def test_max_length_truncates_every_kind_of_row(tmp_path):
    rows = _rows("text", 2) + [{"input_ids": [0] * 3 + list(range(5, 30)),
                                "attention_mask": [0] * 3 + [1] * 25}]
    path = _write(tmp_path / "mixed.jsonl", rows)
    data = TokenDataset.from_spec(f"jsonl:{path}", tokenizer=TOKENIZER_DIR, max_length=7)
    for index in range(3):
        item = data[index]
        assert item["input_ids"].shape == (7,) and item["labels"][-1] == -100
        assert torch.equal(item["labels"][:-1], item["input_ids"][1:])
    assert data[2]["input_ids"].tolist() == list(range(5, 12))   # padding is not counted


# ----------------------------------------------------------------------------- caching
@pytest.mark.parametrize("kind", ["prompt", "chat"])
def test_cache_keeps_only_learned_rows_and_the_collator_puts_them_back(tmp_path, teacher_dir,
                                                                       kind):
    """`fastkd cache --teacher hf:DIR` over prompt/completion or chat rows, the tokenizer taken
    from the teacher's directory: the cache holds rows only for learned positions (fewer bytes);
    collated, they equal the teacher's logits at those positions, and the loss equals the loss
    against the online teacher."""
    path, model = teacher_dir
    data_file = _write(tmp_path / f"{kind}.jsonl", _rows(kind))
    out = tmp_path / "cache"
    status = fastkd_main(["cache", "--teacher", f"hf:{path}", "--dataset", f"jsonl:{data_file}",
                          "--out", str(out), "--dtype", "fp32", "--quiet"])
    assert status == 0
    tokens = TokenDataset.from_spec(f"jsonl:{data_file}", tokenizer=str(path))
    cache = LogitCache(out)
    assert cache.manifest["rows"] == "learned"
    total_positions = sum(len(tokens[i]["input_ids"]) for i in range(len(tokens)))
    learned = [int(learned_positions(tokens[i]["labels"]).sum()) for i in range(len(tokens))]
    assert cache.num_rows == sum(learned) < total_positions
    batch = collate_causal_lm([CachedDataset(tokens, cache)[i] for i in range(len(tokens))])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits
    keep = batch["shift_labels"] != -100
    torch.testing.assert_close(batch["teacher_targets"][keep], logits[keep], rtol=1e-4,
                               atol=1e-4)
    student = torch.randn(logits.shape)
    torch.testing.assert_close(
        kd_loss(student, batch["teacher_targets"], batch["shift_labels"], temperature=2.0),
        kd_loss(student, logits, batch["shift_labels"], temperature=2.0), rtol=1e-4, atol=1e-5)


def test_sparse_cache_of_learned_rows_collates(tmp_path, teacher_dir):
    """A top-k cache of completion-only rows collates into finite targets at every position."""
    path, _ = teacher_dir
    data_file = _write(tmp_path / "prompt.jsonl", _rows("prompt", 4))
    out = tmp_path / "cache"
    assert fastkd_main(["cache", "--teacher", f"hf:{path}", "--dataset", f"jsonl:{data_file}",
                        "--out", str(out), "--top-k", "8", "--quiet"]) == 0
    tokens = TokenDataset.from_spec(f"jsonl:{data_file}", tokenizer=str(path))
    batch = collate_causal_lm([CachedDataset(tokens, LogitCache(out))[i] for i in range(4)])
    target = batch["teacher_targets"]
    assert target.values.shape[:2] == batch["input_ids"].shape
    loss = kd_loss(torch.randn(*batch["input_ids"].shape, VOCAB, requires_grad=True), target,
                   batch["shift_labels"])
    assert torch.isfinite(loss)


def test_collator_refuses_rows_of_other_token_data(tmp_path):
    item = {"input_ids": torch.arange(6)}
    labels = torch.tensor([-100, -100, 7, 8, 9, -100])   # 4 learned positions (3 + the last)
    with pytest.raises(ValueError, match=r"item 0: 3 teacher rows for 6 tokens, of which 4 are "
                                         r"learned"):
        collate_causal_lm([(item, labels, torch.zeros(3, 5))])
    batch = collate_causal_lm([(item, labels, torch.ones(4, 5))])
    assert batch["teacher_targets"][0, :, 0].tolist() == [0, 0, 1, 1, 1, 1]


def test_cache_options_for_token_data_only(tmp_path, capsys):
    status = fastkd_main(["cache", "--teacher", "torch.nn:Identity", "--dataset", "digits",
                          "--out", str(tmp_path / "c"), "--max-length", "8", "--quiet"])
    assert status == 1
    assert "--max-length applies to token data" in capsys.readouterr().err


def test_a_tokenizer_directory_is_never_a_hub_id(tmp_path):
    with pytest.raises(ValueError, match="no such local directory"):
        TextTokenizer.from_dir(tmp_path / "gpt2")
    broken = tmp_path / "broken"
    shutil.copytree(TOKENIZER_DIR, broken)
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot load a tokenizer from it"):
        TextTokenizer.from_dir(broken)


def test_a_model_directory_without_tokenizer_files_is_refused(tmp_path, capsys):
    """A GPT-2 model saved without its tokenizer: transformers would build an empty-vocabulary
    tokenizer from its config, turning every text row into EOS alone; fastkd refuses instead."""
    from hf_helpers import tiny_gpt2
    model_dir = tmp_path / "gpt2-no-tokenizer"
    tiny_gpt2().save_pretrained(model_dir)
    with pytest.raises(ValueError, match="the directory holds no tokenizer files"):
        TextTokenizer.from_dir(model_dir)
    data = tmp_path / "text.jsonl"
    _write(data, _rows("text"))
    status = fastkd_main(["cache", "--teacher", f"hf:{model_dir}", "--dataset", f"jsonl:{data}",
                          "--out", str(tmp_path / "c"), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert status == 1 and "holds no tokenizer files" in err and "Traceback" not in err, err
    assert not (tmp_path / "c").exists()
