"""Tiny ``transformers`` causal LMs built from configs (random, seeded; nothing downloaded) and
token data with padding, for the HF integration tests."""
import json

import torch

VOCAB = 48


def tiny_gpt2(seed: int = 0, vocab: int = VOCAB, layers: int = 2, dim: int = 32):
    import transformers
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=dim,
                                     n_layer=layers, n_head=2, use_cache=False, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0, vocab: int = VOCAB, layers: int = 1, dim: int = 32):
    import transformers
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=64,
                                      num_hidden_layers=layers, num_attention_heads=2,
                                      num_key_value_heads=2, max_position_embeddings=64,
                                      use_cache=False, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=0)
    return transformers.LlamaForCausalLM(config).eval()


def token_rows(count: int = 12, vocab: int = VOCAB, seed: int = 0, max_len: int = 14):
    """Rows in HF conventions: right- or left-padded ``input_ids``/``attention_mask`` of a fixed
    width, ``labels`` unshifted with some prompt tokens at -100 (every third row has none)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for number in range(count):
        length = int(torch.randint(3, max_len + 1, (), generator=generator))
        tokens = torch.randint(1, vocab, (length,), generator=generator).tolist()
        pad = max_len - length
        left = number % 2 == 1
        input_ids = [0] * pad + tokens if left else tokens + [0] * pad
        mask = [0] * pad + [1] * length if left else [1] * length + [0] * pad
        labels = [-100 if (m == 0 or i == (pad if left else 0)) else t
                  for i, (t, m) in enumerate(zip(input_ids, mask))]
        row = {"input_ids": input_ids, "attention_mask": mask}
        if number % 3:
            row["labels"] = labels
        rows.append(row)
    return rows


def write_jsonl(path, rows):
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def assert_import_matches_cache(imported, cached, absolute: float) -> None:
    """A top-k import of served log-probabilities against ``fastkd cache --top-k`` of the same
    model over the same tokens: the same rows, labels, data fingerprint and ids, ``lse = 0``
    (``TopKLogits.from_logprobs``), and log-probabilities equal within the served values'
    rounding (2^-11 relative, fp16) plus ``absolute``."""
    assert torch.equal(imported.offsets, cached.offsets)
    assert torch.equal(imported.labels, cached.labels)
    assert imported.manifest["dataset"]["fingerprint"]["sha256"] == \
        cached.manifest["dataset"]["fingerprint"]["sha256"]
    for index in range(len(cached)):
        got, want = imported[index], cached[index]
        assert torch.equal(got.indices.long(), want.indices.long())
        assert torch.equal(got.lse, torch.zeros_like(got.lse))
        got_lp = got.values.float()
        want_lp = want.values.float() - want.lse[:, None]
        bound = 2 ** -11 * (got_lp.abs() + want.values.float().abs()) + absolute
        assert ((got_lp - want_lp).abs() <= bound).all(), f"sample {index}"
