"""The Trainer integration: DistillationLoss / DistillationTrainer against hand-written
references, gradient accumulation, cached vs online teachers, logging, errors.

Tolerances: the same float32 computation split differently (1 x 8 vs 8 x 1 micro-batches) agrees
to 1e-6 relative; an fp16 dense cache vs the online teacher differs by fp16 rounding of the
teacher logits (rtol 2**-10 per logit), which moves the loss and gradients by < 1e-3 relative.
"""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastkd  # noqa: E402
import hf_helpers  # noqa: E402
from fastkd.cache import CachedDataset, LogitCache, write_cache  # noqa: E402
from fastkd.hf import DistillationLoss, DistillationTrainer, trainer_collator  # noqa: E402
from fastkd.tokens import TokenDataset, collate_causal_lm  # noqa: E402

TEMPERATURE = 2.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    teacher = hf_helpers.tiny_gpt2(seed=0)
    data = TokenDataset(hf_helpers.token_rows(count=8, seed=1))
    caches = {}
    for name, kwargs in (("fp16", dict(dtype="fp16")), ("topk", dict(top_k=6))):
        write_cache(teacher, data, root / name, batch_size=4, progress=False, **kwargs)
        caches[name] = LogitCache(root / name)
    return teacher, data, caches, root


def student():
    return hf_helpers.tiny_gpt2(seed=1, layers=1)


def training_args(root, batch_size, accumulation):
    return transformers.TrainingArguments(
        output_dir=str(root / "out"), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1.0, optim="sgd",
        weight_decay=0.0, lr_scheduler_type="constant", logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, remove_unused_columns=False, disable_tqdm=True,
        seed=0, max_grad_norm=0, dataloader_num_workers=0)


def train_once(root, dataset, batch_size, accumulation, *, teacher=None, stock=False,
               temperature=TEMPERATURE):
    """One SGD step at lr 1: returns (logged losses, the step = -gradient per parameter)."""
    model = student()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = training_args(root, batch_size, accumulation)
    if stock:
        loss_fn = DistillationLoss(model, teacher, temperature=temperature)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset,
                                       data_collator=trainer_collator,
                                       compute_loss_func=loss_fn)
        loss_fn.attach_logging(trainer)
        logged = {}
        trainer.add_callback(_Capture(logged))
    else:
        trainer = DistillationTrainer(model=model, teacher=teacher, args=args,
                                      train_dataset=dataset, data_collator=collate_causal_lm,
                                      temperature=temperature)
    trainer.train()
    logs = trainer.state.log_history[0] if not stock else logged
    steps = {name: before[name] - p.detach() for name, p in model.named_parameters()}
    return logs, steps


class _Capture(transformers.TrainerCallback):
    def __init__(self, store):
        self.store = store

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.store.update(logs)


def assert_same_steps(first, second, **tolerance):
    for name in first:
        torch.testing.assert_close(first[name], second[name], **tolerance)


def reference_loss(model, batch, teacher_logits):
    """The objective by hand: full student logits, fastkd.kd_loss over next-token rows."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return fastkd.kd_loss(logits, teacher_logits, batch["shift_labels"],
                          temperature=TEMPERATURE, backend="torch")


def test_loss_matches_kd_loss_on_full_logits(setup):
    teacher, data, caches, _ = setup
    batch = collate_causal_lm([CachedDataset(data, caches["fp16"])[i] for i in range(5)])
    model = student()
    loss_fn = DistillationLoss(model, temperature=TEMPERATURE, backend="torch", hook=False)
    loss, parts = loss_fn.compute(batch)
    expected = reference_loss(model, batch, batch["teacher_targets"])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert float(parts["kd_loss"] + parts["ce_loss"]) == pytest.approx(loss.item(), rel=1e-5)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    reference_loss(model, batch, batch["teacher_targets"]).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6)


def test_cached_and_online_agree_within_fp16_caching(setup):
    teacher, data, caches, _ = setup
    batch = collate_causal_lm([CachedDataset(data, caches["fp16"])[i] for i in range(8)])
    model = student()
    cached_loss, _ = DistillationLoss(model, temperature=TEMPERATURE, hook=False).compute(batch)
    online_loss, _ = DistillationLoss(model, teacher, temperature=TEMPERATURE,
                                      hook=False).compute(batch)
    torch.testing.assert_close(cached_loss, online_loss, rtol=1e-3, atol=1e-5)
    grads = []
    for loss in (cached_loss, online_loss):
        model.zero_grad()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-5)


def test_gradient_accumulation_equals_one_big_batch(setup):
    teacher, data, _, root = setup
    big_logs, big_steps = train_once(root, data, 8, 1, teacher=teacher)
    small_logs, small_steps = train_once(root, data, 1, 8, teacher=teacher)
    assert big_logs["loss"] == pytest.approx(small_logs["loss"], rel=1e-6)
    assert_same_steps(big_steps, small_steps, rtol=1e-5, atol=1e-7)
    # the KD and CE parts are logged beside the loss and add up to it
    for logs in (big_logs, small_logs):
        assert logs["kd_loss"] > 0 and logs["ce_loss"] > 0
        assert logs["kd_loss"] + logs["ce_loss"] == pytest.approx(logs["loss"], abs=2e-4)


def test_stock_trainer_with_compute_loss_func_from_a_topk_cache(setup):
    _, data, caches, root = setup
    cached = CachedDataset(data, caches["topk"])  # lse stored at T = 1
    big_logs, big_steps = train_once(root, cached, 8, 1, stock=True, temperature=1.0)
    small_logs, small_steps = train_once(root, cached, 1, 8, stock=True, temperature=1.0)
    assert big_logs["loss"] == pytest.approx(small_logs["loss"], rel=1e-6)
    assert_same_steps(big_steps, small_steps, rtol=1e-5, atol=1e-7)
    assert big_logs["kd_loss"] > 0 and "ce_loss" in big_logs
    # the same step as DistillationTrainer on the same cache
    trainer_logs, trainer_steps = train_once(root, cached, 8, 1, temperature=1.0)
    assert trainer_logs["loss"] == pytest.approx(big_logs["loss"], rel=1e-6)
    assert_same_steps(trainer_steps, big_steps, rtol=1e-5, atol=1e-7)


def test_vocabulary_mismatch_is_refused(setup):
    teacher, data, caches, _ = setup
    wide = hf_helpers.tiny_gpt2(seed=2, vocab=hf_helpers.VOCAB + 16)
    with pytest.raises(ValueError, match="vocabulary mismatch: the teacher has 64 classes, "
                                         "the student's output layer 48"):
        DistillationLoss(student(), wide)
    batch = collate_causal_lm([CachedDataset(data, caches["fp16"])[i] for i in range(2)])
    narrow = hf_helpers.tiny_gpt2(seed=2, vocab=hf_helpers.VOCAB - 8)
    with pytest.raises(ValueError, match="the cached teacher has 48 classes"):
        DistillationLoss(narrow, hook=False).compute(batch)
    # teacher rows of other samples or padding than the batch's tokens: named, not an IndexError
    other = collate_causal_lm([CachedDataset(data, caches["fp16"])[i] for i in range(3)])
    for targets in (other["teacher_targets"], other["teacher_targets"][:2, :-1]):
        with pytest.raises(ValueError, match=r"teacher_targets'\] holds rows for positions "
                                             r"\(\d+, \d+\) but input_ids is"):
            DistillationLoss(student(), hook=False).compute(dict(batch, teacher_targets=targets))


def test_missing_teacher_and_labels_are_clear_errors(setup):
    _, data, _, _ = setup
    batch = collate_causal_lm([data[i] for i in range(2)])
    with pytest.raises(ValueError, match="no teacher"):  # training needs one
        DistillationLoss(student().train(), hook=False).compute(batch)
    with pytest.raises(ValueError, match="neither 'shift_labels' nor 'labels'"):
        DistillationLoss(student(), hook=False).compute({"input_ids": batch["input_ids"]})
    with pytest.raises(TypeError, match="teacher must be None"):
        DistillationLoss(student(), "gpt2")
    with pytest.raises(ValueError, match="tail must be one of"):
        DistillationLoss(student(), tail="drop", hook=False)
    # evaluation's own cross-entropy names a label outside the vocabulary
    shift_labels = batch["shift_labels"].clone()
    shift_labels[0, 1] = 100
    with pytest.raises(ValueError, match=r"labels must be in \[0, 48\) .* found 100"):
        DistillationLoss(student().eval(), hook=False).compute(
            dict(batch, shift_labels=shift_labels))


def test_online_teacher_without_hf_methods_is_checked_by_its_logits(setup):
    _, data, _, _ = setup

    class Wide(torch.nn.Module):  # a plain module returning logits 64 wide
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(hf_helpers.VOCAB, 64)

        def forward(self, input_ids, attention_mask=None):
            return self.embed(input_ids)

    batch = collate_causal_lm([data[i] for i in range(2)])
    with pytest.raises(ValueError, match="the teacher has 64 classes"):
        DistillationLoss(student(), Wide(), hook=False).compute(batch)


@pytest.mark.parametrize("layout", ["topk-T2", "sampled"])
def test_sparse_caches_of_an_hf_teacher_train(setup, layout, tmp_path):
    """Top-k with the lse cached at the training temperature, and sampled targets: the loss
    equals fastkd.kd_loss on the full student logits over the same aligned rows."""
    teacher, data, _, _ = setup
    kwargs = dict(top_k=6, temperature=[1.0, TEMPERATURE]) if layout == "topk-T2" else \
        dict(sample=8)
    write_cache(teacher, data, tmp_path / "c", batch_size=4, progress=False, **kwargs)
    temperature = TEMPERATURE if layout == "topk-T2" else 1.0
    cache = LogitCache(tmp_path / "c", **({"temperature": TEMPERATURE}
                                          if layout == "topk-T2" else {}))
    batch = collate_causal_lm([CachedDataset(data, cache)[i] for i in range(4)])
    model = student()
    loss, parts = DistillationLoss(model, temperature=temperature, hook=False).compute(batch)
    assert torch.isfinite(loss) and parts["kd_loss"] > 0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = fastkd.kd_loss(logits, batch["teacher_targets"], batch["shift_labels"],
                              temperature=temperature, backend="torch")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_bf16_teacher_cache(setup, tmp_path):
    """--teacher-dtype runs the hf: teacher in that dtype (rows within bf16 rounding)."""
    teacher, data, _, _ = setup
    teacher.save_pretrained(tmp_path / "t")
    hf_helpers.write_jsonl(tmp_path / "tokens.jsonl",
                           [{"input_ids": data[i]["input_ids"].tolist()} for i in range(3)])
    from fastkd.cli import main as fastkd_main
    assert fastkd_main(["cache", "--teacher", f"hf:{tmp_path / 't'}", "--dataset",
                        f"jsonl:{tmp_path / 'tokens.jsonl'}", "--out", str(tmp_path / "c"),
                        "--teacher-dtype", "bf16", "--dtype", "fp32", "--quiet"]) == 0
    cache = LogitCache(tmp_path / "c")
    with torch.no_grad():
        expected = teacher(data[0]["input_ids"][None]).logits[0]
    got = cache[0]
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)
    assert not torch.equal(got, expected)  # really ran in bf16


def test_fused_path_is_used_and_full_student_logits_are_never_made(setup, monkeypatch):
    """Dense cached and online teachers go through fastkd.linear_kd_loss (online as a
    TeacherHead); the student runs with logits_to_keep=1, so its output holds one position."""
    if not hasattr(fastkd, "linear_kd_loss"):
        pytest.skip("fastkd.linear_kd_loss not available")
    teacher, data, caches, _ = setup
    calls = []
    real = fastkd.linear_kd_loss

    def spy(hidden, weight, teacher_arg, *args, **kwargs):
        calls.append(type(teacher_arg).__name__)
        return real(hidden, weight, teacher_arg, *args, **kwargs)

    monkeypatch.setattr(fastkd, "linear_kd_loss", spy)
    batch = collate_causal_lm([CachedDataset(data, caches["fp16"])[i] for i in range(3)])
    model = student()
    shapes = []
    model.register_forward_hook(lambda module, args, output: shapes.append(output.logits.shape))
    DistillationLoss(model, temperature=TEMPERATURE, hook=False).compute(batch)
    DistillationLoss(model, teacher, temperature=TEMPERATURE, hook=False).compute(batch)
    assert calls == ["Tensor", "Tensor", "TeacherHead", "TeacherHead"]  # KD part, CE part
    assert all(shape[1] == 1 for shape in shapes) and len(shapes) == 2


# ----------------------------------------------------------------------------- edge steps
@pytest.mark.parametrize("stock", [False, True])
def test_a_batch_without_target_tokens_leaves_the_weights_unchanged(setup, stock):
    """A one-token sample and a sample whose labels are all -100: no target token in the whole
    step, so the loss is 0 and SGD moves nothing (as plain HF training), instead of 0 / 0."""
    teacher, _, _, root = setup
    empty = TokenDataset([{"input_ids": [5]},
                          {"input_ids": [3, 4, 7], "labels": [-100, -100, -100]}])
    logs, steps = train_once(root, empty, 2, 1, teacher=teacher, stock=stock)
    assert logs["loss"] == 0 and logs["kd_loss"] == 0 and logs["ce_loss"] == 0
    for name, step in steps.items():
        assert torch.equal(step, torch.zeros_like(step)), name


def _resumable_run(root, output_dir, data, teacher, stock, resume=None):
    """Four SGD steps of batch 2 over 8 rows, a checkpoint every 2 steps; the logs by step."""
    model = student()
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=2, max_steps=4,
        learning_rate=0.5, optim="sgd", weight_decay=0.0, lr_scheduler_type="constant",
        logging_steps=1, report_to=[], save_strategy="steps", save_steps=2, use_cpu=True,
        remove_unused_columns=False, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    logged = {}
    if stock:
        loss_fn = DistillationLoss(model, teacher, temperature=TEMPERATURE)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                       data_collator=trainer_collator, compute_loss_func=loss_fn)
        loss_fn.attach_logging(trainer)
    else:
        trainer = DistillationTrainer(model=model, teacher=teacher, args=args,
                                      train_dataset=data, data_collator=collate_causal_lm,
                                      temperature=TEMPERATURE)
    trainer.add_callback(_ByStep(logged))
    trainer.train(resume_from_checkpoint=resume)
    # what was logged is also in log_history (trainer_state.json), the parts included
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in history] == [1, 2, 3, 4]
    for entry in history:
        if entry["step"] in logged:
            for key in ("loss", "kd_loss", "ce_loss"):
                assert entry[key] == logged[entry["step"]][key], (entry, key)
        else:   # restored from the checkpoint
            assert entry["kd_loss"] > 0 and entry["ce_loss"] > 0, entry
    return logged


class _ByStep(transformers.TrainerCallback):
    def __init__(self, store):
        self.store = store

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.store[state.global_step] = dict(logs)


@pytest.mark.parametrize("stock", [False, True])
def test_resuming_from_a_checkpoint_logs_what_an_uninterrupted_run_logs(setup, stock, tmp_path):
    teacher, data, _, root = setup
    whole = _resumable_run(root, tmp_path / "whole", data, teacher, stock)
    resumed = _resumable_run(root, tmp_path / "resumed", data, teacher, stock,
                             resume=str(tmp_path / "whole" / "checkpoint-2"))
    assert sorted(whole) == [1, 2, 3, 4] and sorted(resumed) == [3, 4]
    for step in (3, 4):
        for key in ("loss", "kd_loss", "ce_loss"):
            assert resumed[step][key] == pytest.approx(whole[step][key], rel=1e-6), (step, key)
        assert resumed[step]["kd_loss"] > 0


def test_evaluate_after_label_only_training_reports_the_unweighted_cross_entropy(setup,
                                                                                  tmp_path):
    """A trainer of soft_weight=0 (plain next-token training, hard_weight 0.5) evaluates the
    student's own cross-entropy, not half of it, and reports eval_perplexity = exp of it."""
    _, data, _, _ = setup
    model = student()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=3, report_to=[], use_cpu=True,
        remove_unused_columns=False, disable_tqdm=True)
    metrics = DistillationTrainer(model=model, args=args, eval_dataset=data,
                                  data_collator=collate_causal_lm, soft_weight=0.0,
                                  hard_weight=0.5).evaluate()
    plain = transformers.Trainer(model=model, args=args, eval_dataset=data,
                                 data_collator=collate_causal_lm).evaluate()
    assert metrics["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-5)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))


@pytest.mark.parametrize("stock", [False, True])
def test_evaluate_on_plain_tokens_reports_the_students_cross_entropy(setup, stock, tmp_path):
    """No cache and no teacher: eval_loss is the student's own next-token cross-entropy, the
    loss the stock Trainer reports for the bare model on the same batches (HF's loss from
    ``labels``), and DistillationTrainer adds eval_perplexity = exp(eval_loss)."""
    _, data, _, _ = setup
    model = student()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=3, report_to=[], use_cpu=True,
        remove_unused_columns=False, disable_tqdm=True)
    if stock:
        loss_fn = DistillationLoss(model)
        trainer = transformers.Trainer(model=model, args=args, eval_dataset=data,
                                       data_collator=trainer_collator, compute_loss_func=loss_fn)
    else:
        trainer = DistillationTrainer(model=model, args=args, eval_dataset=data,
                                      data_collator=collate_causal_lm, chunk_rows=5)
    metrics = trainer.evaluate()  # chunks of 5 rows in DistillationTrainer, one in the other
    if stock:
        loss_fn.remove_hook()
    plain = transformers.Trainer(model=model, args=args, eval_dataset=data,
                                 data_collator=collate_causal_lm).evaluate()
    assert metrics["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-5)
    if not stock:
        assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
