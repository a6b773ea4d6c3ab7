"""Sparse cache rows as loss targets: they carry the cache's vocabulary size, so every loss
refuses a student of another V (as for dense rows), and teachers with -inf logits (masked
classes) are cached by the sparse layouts as probability 0.

Tolerances: top-k values are fp16 (rtol 2**-10, atol 1e-4 against the float32 teacher); the
float32 lse against float32 ``torch.logsumexp`` of the same rows, rtol/atol 1e-6.
"""
import os

import pytest
import torch
from torch import nn

import cache_helpers
import fastkd
from fastkd.cache import CachedDataset, LogitCache, collate_padded, write_cache
from fastkd.cli import main as fastkd_main
from paths import FIXTURES

FP16 = dict(rtol=2 ** -10, atol=1e-4)


def teacher_rows(teacher, data, index):
    with torch.inference_mode():
        return teacher(data[index]["input_ids"][None])[0].float()


# ----------------------------------------------------------------------------- vocabulary size
@pytest.mark.parametrize("layout", [{"top_k": 4}, {"sample": 8}])
def test_sparse_rows_carry_the_vocabulary_and_refuse_another(tmp_path, layout):
    """A sparse cache's targets carry its V (the manifest's num_classes) through reading,
    collating (the cache's, the token collator's with and without dicts, DataLoader's default)
    and slicing, and every loss refuses a student of another V, as for dense rows."""
    from fastkd.tokens import collate_causal_lm, targets_from_dict
    data = cache_helpers.TokenSequences(n=6)
    write_cache(cache_helpers.tiny_lm(), data, tmp_path / "c", batch_size=3, progress=False,
                **layout)
    cache = LogitCache(tmp_path / "c")
    vocab = cache_helpers.TOKEN_VOCAB
    items = [CachedDataset(data, cache)[i] for i in range(3)]
    _, labels, padded = collate_padded(items)
    tokens = collate_causal_lm(items)
    as_dict = targets_from_dict(collate_causal_lm(items, targets_as_dict=True)["teacher_targets"])
    # one row per item, batched by DataLoader's default collate (num_classes becomes a tensor);
    # ragged sampled rows share a width within one read (padded), so the rows of one read
    rows = cache.rows(0, 3)
    collated = torch.utils.data.default_collate(
        [rows.map_tensors(lambda part, i=i: part[i]) for i in range(3)])
    for target in (cache[0], cache[0:2][0], cache.gather([1, 0])[0], padded,
                   tokens["teacher_targets"], as_dict, collated):
        assert int(torch.as_tensor(target.num_classes).flatten()[0]) == vocab
    for wrong in (vocab + 8, vocab - 1):
        student = torch.randn(*labels.shape, wrong)
        with pytest.raises(ValueError, match=rf"num_classes={vocab} .* V = {wrong} classes"):
            fastkd.kd_loss(student, padded, labels)
        with pytest.raises(ValueError, match=rf"num_classes={vocab} .* V = {wrong} classes"):
            fastkd.kd_loss(torch.randn(3, wrong), collated)
        hidden = torch.randn(*tokens["shift_labels"].shape, 8)
        with pytest.raises(ValueError, match="vocabulary mismatch"):
            fastkd.linear_kd_loss(hidden, torch.randn(wrong, 8), tokens["teacher_targets"],
                                  tokens["shift_labels"])
    # the student of the cache's own V trains on them
    assert torch.isfinite(fastkd.kd_loss(torch.randn(*labels.shape, vocab), padded, labels))
    assert torch.isfinite(fastkd.kd_loss(torch.randn(3, vocab), collated))
    assert torch.isfinite(fastkd.linear_kd_loss(
        torch.randn(*tokens["shift_labels"].shape, 8), torch.randn(vocab, 8), as_dict,
        tokens["shift_labels"]))


def test_distillation_loss_refuses_a_sparse_cache_of_another_vocabulary(tmp_path):
    """The Trainer's loss (fastkd.hf.DistillationLoss over trainer_collator batches of a
    CachedDataset): a V = 40 top-k cache and a V = 48 student are refused, a V = 40 student
    trains."""
    pytest.importorskip("transformers")
    import hf_helpers
    from fastkd.hf import DistillationLoss, trainer_collator
    data = cache_helpers.TokenSequences(n=4)
    write_cache(cache_helpers.tiny_lm(), data, tmp_path / "c", top_k=4, progress=False)
    batch = trainer_collator([item for item in CachedDataset(data, LogitCache(tmp_path / "c"))])
    wrong = DistillationLoss(hf_helpers.tiny_llama(vocab=48), hook=False)
    with pytest.raises(ValueError, match="num_classes=40 .* V = 48 classes"):
        wrong.compute(batch)
    loss, _ = DistillationLoss(hf_helpers.tiny_llama(vocab=40), hook=False).compute(batch)
    assert torch.isfinite(loss)


def test_version_1_sparse_cache_carries_its_vocabulary():
    """Caches written before targets carried V still read, and their manifest's num_classes
    (recorded since format version 1) protects them the same way."""
    fixture = os.path.join(FIXTURES,
                           "v1-topk-tokens")
    cache = LogitCache(fixture)
    target = cache[0]
    assert target.num_classes == cache_helpers.TOKEN_VOCAB == 40
    fastkd.kd_loss(torch.randn(target.indices.shape[0], 40), target)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        fastkd.kd_loss(torch.randn(target.indices.shape[0], 48), target)


def test_targets_without_a_vocabulary_are_taken_at_any_size():
    """A target made by hand (num_classes 0: not recorded) is checked by its ids only."""
    target = fastkd.SampledTargets(torch.tensor([[0, 1]]), torch.tensor([[1, 1]]))
    for vocab in (2, 5):
        fastkd.kd_loss(torch.randn(1, vocab), target)
    with pytest.raises(TypeError, match=r"num_classes must be an int >= 0"):
        fastkd.kd_loss(torch.randn(1, 5), target._replace(num_classes=-1))
    # a temperature given by position lands in num_classes: the error says so
    with pytest.raises(TypeError, match=r"got 2.0 \(a float there is often a temperature given "
                                        r"by position: pass temperature=\.\.\. by name\)"):
        fastkd.kd_loss(torch.randn(1, 5), fastkd.SampledTargets(target.indices, target.counts,
                                                                2.0))
    with pytest.raises(ValueError, match="one vocabulary size for the whole batch"):
        fastkd.kd_loss(torch.randn(2, 5), fastkd.SampledTargets(
            torch.tensor([[0, 1], [0, 1]]), torch.ones(2, 2), torch.tensor([5, 6])))


# ----------------------------------------------------------------------------- -inf logits
class MaskedLM(nn.Module):
    """``cache_helpers.tiny_lm`` with ``fill`` at the ids ``masked`` of every row and, in the
    rows of the sequences whose first token is ``narrow_token``, at every id but 30 and 31."""

    def __init__(self, masked=range(10), fill=float("-inf"), narrow_token=None):
        super().__init__()
        self.lm, self.masked, self.fill = cache_helpers.tiny_lm(), list(masked), fill
        self.narrow_token = narrow_token

    def forward(self, input_ids):
        logits = self.lm(input_ids).clone()
        logits[..., self.masked] = self.fill
        if self.narrow_token is not None:
            narrow = input_ids[:, 0] == self.narrow_token
            keep = torch.zeros(logits.shape[-1], dtype=torch.bool)
            keep[[30, 31]] = True
            logits[narrow] = torch.where(keep, logits[narrow], self.fill)
        return logits


def test_minus_inf_logits_are_cached_as_probability_zero(tmp_path):
    """-inf logits (masked classes) are cached by the sparse layouts: top-k keeps -inf where a
    row has fewer than K finite logits, lse is over the finite ones, draws never pick them, and
    the loss takes the rows; NaN, +inf and a row without a finite logit are still refused."""
    data = cache_helpers.TokenSequences(n=8)
    narrow_token = int(data[3]["input_ids"][0])
    teacher = MaskedLM(narrow_token=narrow_token)
    write_cache(teacher, data, tmp_path / "topk", top_k=4, batch_size=3, progress=False)
    write_cache(teacher, data, tmp_path / "sampled", sample=64, batch_size=3, progress=False)
    topk, sampled = LogitCache(tmp_path / "topk"), LogitCache(tmp_path / "sampled")
    saw_minus_inf = False
    for index in range(len(data)):
        rows = teacher_rows(teacher, data, index)
        top = torch.topk(rows, 4)
        stored = topk[index]
        assert torch.equal(stored.indices.long()[:, :2], top.indices[:, :2])
        torch.testing.assert_close(stored.values.float(), top.values, **FP16)
        torch.testing.assert_close(stored.lse, torch.logsumexp(rows, -1), rtol=1e-6, atol=1e-6)
        saw_minus_inf |= bool(torch.isneginf(stored.values).any())
        drawn = sampled[index]
        assert not bool(torch.isin(drawn.indices[drawn.counts > 0], torch.arange(10)).any())
    assert saw_minus_inf   # the narrow rows: 2 finite logits under top-4
    for target in (topk.rows(0, topk.num_rows), sampled.rows(0, sampled.num_rows)):
        student = torch.randn(target.indices.shape[0], cache_helpers.TOKEN_VOCAB,
                              requires_grad=True)
        for tail in ("bucket", "renormalize"):
            loss = fastkd.kd_loss(student, target, tail=tail)
            loss.backward()
            assert torch.isfinite(loss) and bool(torch.isfinite(student.grad).all())
    for fill, message in ((float("nan"), "contains NaN"), (float("inf"), r"contains \+inf")):
        with pytest.raises(ValueError, match=message):
            write_cache(MaskedLM(fill=fill), data, tmp_path / str(fill), top_k=4,
                        progress=False)
    everything = MaskedLM(masked=range(cache_helpers.TOKEN_VOCAB))
    for layout in ({"top_k": 4}, {"sample": 4}):
        with pytest.raises(ValueError, match=r"dataset sample 0 contains no finite logit"):
            write_cache(everything, data, tmp_path / "all", progress=False, overwrite=True,
                        **layout)


def test_cli_caches_an_hf_teacher_with_minus_inf_logits_top_k(tmp_path):
    """`fastkd cache --teacher hf:DIR --top-k K` of a transformers model whose output bias is
    -inf at some ids (logits -inf there, outside the stored top-k)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.PhiConfig(vocab_size=cache_helpers.TOKEN_VOCAB, hidden_size=16,
                                    intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, max_position_embeddings=32,
                                    use_cache=False)
    model = transformers.PhiForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.bias[:10] = float("-inf")
    model.save_pretrained(tmp_path / "teacher")
    out = tmp_path / "cache"
    assert fastkd_main(["cache", "--teacher", f"hf:{tmp_path / 'teacher'}", "--dataset",
                        "cache_helpers:TokenSequences", "--out", str(out), "--top-k", "4",
                        "--batch-size", "6", "--device", "cpu", "--quiet"]) == 0
    cache = LogitCache(out)
    data = cache_helpers.TokenSequences()
    with torch.inference_mode():
        logits = model(data[5]["input_ids"][None]).logits[0].float()
    assert bool(torch.isneginf(logits[:, :10]).all())
    stored = cache[5]
    assert torch.equal(stored.indices.long(), torch.topk(logits, 4).indices)
    torch.testing.assert_close(stored.lse, torch.logsumexp(logits, -1), rtol=1e-6, atol=1e-6)
