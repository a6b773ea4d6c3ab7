"""fastkd.trl's ServerDistillationTrainer (a vLLM teacher server's top-k log-probs) gives TRL's
own loss, gradients and training step on the same batches; the server is a local stand-in that
scores with a tiny teacher as vLLM's /get_sequence_logprobs does. Tolerances as
test_trl.py's."""
import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

import fastkd.trl  # noqa: E402
from trl_helpers import (EX, assert_same_grads, completion_batch, config_args,  # noqa: E402
                         loss_and_grads, model_pair)

pytestmark = pytest.mark.usefixtures("reproducible_cpu")


class FakeTeacherServer:
    """Stands in for trl's VLLMClient: scores sequences with a local teacher as vLLM's
    /get_sequence_logprobs does (top-k log-probs at the request's temperature, sorted, and the
    sampled token's log-prob)."""
    teacher = None

    def __init__(self, base_url=None, connection_timeout=0.0, **_):
        self.base_url = base_url

    @torch.no_grad()
    def get_sequence_logprobs(self, sequences, prompt_lengths, top_logprobs, temperature):
        out = {"logprobs": [], "logprob_token_ids": [], "actual_logprobs": []}
        for sequence, prompt_length in zip(sequences, prompt_lengths):
            ids = torch.tensor([sequence])
            logits = self.teacher(input_ids=ids).logits[0].float()
            log_probs = torch.log_softmax(logits / temperature, -1)[prompt_length - 1:-1]
            top = log_probs.topk(top_logprobs, dim=-1)
            actual = log_probs.gather(-1, ids[0, prompt_length:].unsqueeze(-1))
            out["logprobs"].append(top.values.tolist())
            out["logprob_token_ids"].append(top.indices.tolist())
            out["actual_logprobs"].append(actual.tolist())
        return out


def _server_trainer(student, teacher, tmp_path, monkeypatch, **config):
    import trl.generation.vllm_client as vllm_client
    from trl.experimental.server_distillation import ServerDistillationConfig
    FakeTeacherServer.teacher = teacher
    monkeypatch.setattr(vllm_client, "VLLMClient", FakeTeacherServer)
    args = ServerDistillationConfig(**config_args(
        tmp_path, max_completion_length=6, teacher_model_server_url="http://teacher.invalid",
        **config))
    return fastkd.trl.ServerDistillationTrainer(
        model=student, args=args, processing_class=EX.byte_tokenizer(),
        train_dataset=datasets.Dataset.from_dict({"prompt": ["x = 1", "def g():", "if a:",
                                                            "print("]}))


@pytest.mark.parametrize("beta,top_k,tail", [(0.0, 4, True), (0.0, 4, False), (0.0, 1, True),
                                             (0.5, 1, True), (0.5, 1, False), (1.0, 1, True)])
def test_server_loss_and_grads_equal_trl(beta, top_k, tail, tmp_path, monkeypatch):
    student, teacher = model_pair("softcap")
    trainer = _server_trainer(student, teacher, tmp_path, monkeypatch, beta=beta,
                              loss_top_k=top_k, loss_add_tail=tail)
    trl_class = fastkd.trl.TRLServerDistillationTrainer
    batch = completion_batch(seed=5)
    # half the rows follow the teacher's greedy choice, so top-1 == sampled token there
    with torch.no_grad():
        greedy = teacher.generate(input_ids=batch["prompt_ids"][2:],
                                  attention_mask=batch["prompt_mask"][2:], do_sample=False,
                                  max_new_tokens=batch["completion_ids"].shape[1],
                                  min_new_tokens=batch["completion_ids"].shape[1],
                                  pad_token_id=0, eos_token_id=None)
    batch["completion_ids"][2:] = greedy[:, batch["prompt_ids"].shape[1]:]
    batch["completion_ids"][batch["completion_mask"] == 0] = 0
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 3   # what Trainer.train sets
    for temperature in (1.0, 1.7):
        trainer.temperature = temperature
        got = loss_and_grads(model, lambda: trainer.compute_loss(model, dict(batch)))
        want = loss_and_grads(model, lambda: trl_class.compute_loss(trainer, model,
                                                                     dict(batch)))
        if beta != 1.0 or tail:
            assert float(want[0]) > 1e-3
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-7)
        assert_same_grads(got[1], want[1]) if float(want[0]) > 0 else None


def test_server_training_step_equals_trl(tmp_path, monkeypatch):
    """One optimizer step of on-policy training against the (fake) teacher server, gradient
    accumulation 2 (TRL divides each micro-batch's mean by the accumulation steps): the same
    logged loss and weights as TRL's trainer."""
    results = []
    for fastkd_loss in (True, False):
        student, teacher = model_pair("softcap")
        trainer = _server_trainer(student, teacher, tmp_path / str(fastkd_loss), monkeypatch,
                                  beta=0.0, loss_top_k=3, gradient_accumulation_steps=2,
                                  max_steps=1, temperature=1.3)
        if not fastkd_loss:   # the same trainer object with TRL's own compute_loss
            trainer.compute_loss = lambda *a, trainer=trainer, **k: \
                fastkd.trl.TRLServerDistillationTrainer.compute_loss(trainer, *a, **k)
        trainer.train()
        log = [entry for entry in trainer.state.log_history if "loss" in entry]
        results.append((log[0], {n: p.detach().clone() for n, p in student.named_parameters()}))
    (got_log, got_params), (want_log, want_params) = results
    assert want_log["loss"] > 1e-3
    assert got_log["loss"] == pytest.approx(want_log["loss"], rel=1e-5)
    for name, want in want_params.items():
        torch.testing.assert_close(got_params[name], want, rtol=1e-5, atol=1e-6)
