"""fastkd.trl: TRL's distillation trainers with fastkd's fused linear + KD loss give TRL's own
loss and gradients on the same batches (tiny transformers models built from configs, CPU, no
downloads; tests/trl_helpers.py). The served-teacher trainer: test_trl_server.py.

Tolerances (float32 throughout): losses rtol 1e-5 / atol 1e-7; gradients atol 1e-4 times the
largest gradient entry over all parameters (plus rtol 1e-4); the two paths sum the same terms in different orders
and chunkings, nothing more.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")

import fastkd.trl  # noqa: E402
from fastkd.trl import logit_transforms  # noqa: E402
from paths import ROOT  # noqa: E402
from trl_helpers import (EXAMPLE, PAIRS, V, assert_same_grads, causal_lm,  # noqa: E402
                         completion_batch, distillation_trainer, gkd_collate, gkd_rows,
                         gkd_trainer, loss_and_grads, model_pair, param_grads)

pytestmark = pytest.mark.usefixtures("reproducible_cpu")


# ----------------------------------------------------------------------------- GKD
@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_gkd_loss_and_grads_equal_trl(pair, tmp_path):
    student, teacher = model_pair(pair)
    trainer = gkd_trainer(fastkd.trl.GKDTrainer, student, teacher, tmp_path)
    trl_class = fastkd.trl.TRLGKDTrainer
    batch = gkd_collate(gkd_rows(4, seed=1))
    batch["labels"][0, :] = -100   # a row with nothing to learn
    model = trainer.model
    model.train()
    count = int((batch["labels"][:, 1:] != -100).sum())
    for beta in (0.0, 0.5, 1.0):
        for temperature in (1.0, 2.5):   # GKD's loss is at T = 1 whatever temperature says
            trainer.beta, trainer.temperature = beta, temperature
            for items in (None, torch.tensor(count + 5)):
                got = loss_and_grads(model, lambda: trainer.compute_loss(
                    model, dict(batch), num_items_in_batch=items))
                want = loss_and_grads(model, lambda: trl_class.compute_loss(
                    trainer, model, dict(batch), num_items_in_batch=items))
                assert float(want[0]) > 1e-3   # a loss that can tell the paths apart
                torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-7)
                assert_same_grads(got[1], want[1])


def test_gkd_training_steps_equal_trl(tmp_path):
    """Two optimizer steps with gradient accumulation 2: the logged losses and the weights after
    each step equal TRL's (num_items_in_batch over the accumulation window, as TRL uses it)."""
    results = []
    for cls in (fastkd.trl.GKDTrainer, fastkd.trl.TRLGKDTrainer):
        student, teacher = model_pair("softcap")
        trainer = gkd_trainer(cls, student, teacher, tmp_path / cls.__module__,
                               gradient_accumulation_steps=2, max_steps=2, beta=0.5,
                               temperature=0.7)
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        results.append((losses, {n: p.detach().clone() for n, p in student.named_parameters()}))
    (got_losses, got_params), (want_losses, want_params) = results
    assert len(want_losses) == 2
    assert got_losses == pytest.approx(want_losses, rel=1e-5)
    initial = model_pair("softcap")[0].state_dict()
    for name, want in want_params.items():
        moved = float((want - initial[name]).abs().max())
        torch.testing.assert_close(got_params[name], want, rtol=0, atol=1e-4 * max(moved, 1e-3))
    assert any(float((want_params[n] - initial[n]).abs().max()) > 1e-3 for n in want_params)



# ----------------------------------------------------------------------------- Distillation
@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_distillation_loss_and_grads_equal_trl(pair, tmp_path):
    student, teacher = model_pair(pair)
    trainer = distillation_trainer(fastkd.trl.DistillationTrainer, student, teacher, tmp_path)
    trl_class = fastkd.trl.TRLDistillationTrainer
    batch = completion_batch()
    model = trainer.model
    model.train()
    for beta in (0.0, 0.5, 1.0):
        for temperature in (1.0, 0.6, 2.0):
            trainer.beta, trainer.temperature = beta, temperature
            for items in (None, batch["num_items_in_batch"]):
                outs = {}
                for name, method in (("fastkd", trainer._compute_loss),
                                     ("trl", lambda *a: trl_class._compute_loss(trainer, *a))):
                    model.zero_grad(set_to_none=True)
                    loss, entropy, count = method(model, batch, items)
                    loss.backward()
                    outs[name] = (loss.detach(), entropy, count, param_grads(model))
                (loss, entropy, count, grads), (want, want_entropy, want_count, want_grads) = \
                    outs["fastkd"], outs["trl"]
                assert float(want) > 1e-3
                torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(entropy.float(), want_entropy.float(), rtol=1e-5,
                                           atol=1e-5)
                assert int(count) == int(want_count)
                assert_same_grads(grads, want_grads)


def test_distillation_training_step_equals_trl(tmp_path):
    """One optimizer step of on-policy training (real sampling, gradient accumulation 2): the
    same seed gives the same completions, so the logged loss and the weights equal TRL's."""
    results = []
    for cls in (fastkd.trl.DistillationTrainer, fastkd.trl.TRLDistillationTrainer):
        student, teacher = model_pair("both-softcap")
        trainer = distillation_trainer(cls, student, teacher, tmp_path / cls.__name__,
                                        gradient_accumulation_steps=2, max_steps=1, beta=0.5,
                                        temperature=1.5)
        trainer.train()
        log = [entry for entry in trainer.state.log_history if "loss" in entry]
        results.append((log[0], {n: p.detach().clone() for n, p in student.named_parameters()}))
    (got_log, got_params), (want_log, want_params) = results
    assert got_log["completions/mean_length"] == want_log["completions/mean_length"]
    assert got_log["loss"] == pytest.approx(want_log["loss"], rel=1e-5)
    assert got_log["entropy"] == pytest.approx(want_log["entropy"], rel=1e-5)
    for name, want in want_params.items():
        torch.testing.assert_close(got_params[name], want, rtol=1e-5, atol=1e-6)

# ----------------------------------------------------------------------------- pieces
def test_logit_transforms_follow_the_configs():
    assert logit_transforms(causal_lm("llama", 0)) == (1.0, None)
    assert logit_transforms(causal_lm("cohere", 0, logit_scale=0.25)) == (0.25, None)
    assert logit_transforms(causal_lm("gemma2", 0, final_logit_softcapping=30.0)) == (1.0, 30.0)
    granite = transformers.GraniteConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         logits_scaling=8.0)
    assert logit_transforms(transformers.GraniteForCausalLM(granite)) == (0.125, None)


@pytest.mark.parametrize("kind,extra", [
    ("llama", {}), ("cohere", {"logit_scale": 0.3}), ("gemma2", {"final_logit_softcapping": 4.0}),
    ("granite", {"logits_scaling": 6.0})])
def test_logit_transforms_reproduce_the_models_forward(kind, extra):
    """softcap(scale * hidden @ W^T) with logit_transforms' figures is the model's own logits."""
    if kind == "granite":
        torch.manual_seed(0)
        model = transformers.GraniteForCausalLM(transformers.GraniteConfig(
            vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, use_cache=False, **extra))
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(25.0)
    else:
        model = causal_lm(kind, 0, **extra)
    ids = torch.randint(3, V, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        scale, softcap = logit_transforms(model)
        got = fastkd.trl.backbone_hidden(model, ids, torch.ones_like(ids)) \
            @ model.get_output_embeddings().weight.T * scale
        if softcap is not None:
            got = softcap * torch.tanh(got / softcap)
    assert float(want.abs().max()) > 1.0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_chunk_budget_bytes_is_checked(tmp_path):
    student, teacher = model_pair("plain")
    with pytest.raises(ValueError, match="chunk_budget_bytes must be a positive int"):
        gkd_trainer(lambda **kw: fastkd.trl.GKDTrainer(chunk_budget_bytes=0, **kw), student,
                     teacher, tmp_path)


def test_example_smoke_runs():
    result = subprocess.run([sys.executable, EXAMPLE, "--smoke", "--quiet"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distillation losses logged:" in result.stdout
    assert "held-out KL(student || teacher)" in result.stdout


def test_adapter_on_the_head_is_refused():
    """A PEFT-style adapter layer around lm_head (``base_layer``) would be bypassed by a loss
    that reads lm_head.weight: refused."""
    student, teacher = model_pair("plain")

    class AdapterLayer(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base_layer = base

        @property
        def weight(self):
            return self.base_layer.weight

    student.set_output_embeddings(AdapterLayer(student.get_output_embeddings()))
    hidden = torch.randn(2, 3, 32)
    head = fastkd.trl.teacher_head(teacher, torch.randn(2, 3, 48))
    with pytest.raises(ValueError, match="an adapter on lm_head is not supported"):
        fastkd.trl.fused_divergence(hidden, student, head, torch.ones(2, 3, dtype=torch.bool),
                                    beta=0.5, temperature=1.0, t_squared=True)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), 1e-4, 1e3])
def test_a_temperature_outside_the_losses_range_is_refused(temperature):
    """The trainers' loss and entropy helpers refuse what the losses refuse (0 divided by zero;
    a negative temperature gave an entropy)."""
    student, teacher = model_pair("plain")
    hidden, keep = torch.randn(2, 3, 32), torch.ones(2, 3, dtype=torch.bool)
    head = fastkd.trl.teacher_head(teacher, torch.randn(2, 3, 48))
    with pytest.raises(ValueError, match="temperature must be"):
        fastkd.trl.fused_divergence(hidden, student, head, keep, beta=0.5,
                                    temperature=temperature, t_squared=False)
    with pytest.raises(ValueError, match="temperature must be"):
        fastkd.trl.student_entropy_sum(hidden, student, keep, temperature)


def test_ddp_two_ranks_equal_trl_and_sharded_head():
    """Under torchrun with 2 ranks (gloo, CPU) and DDP, one training step (gradient accumulation
    2) of fastkd's GKD and Distillation trainers leaves the weights TRL's leaves, identical on
    both ranks; a DTensor-sharded lm_head weight (FSDP2's layout) gives the plain weight's loss
    and gradient; a student sharded with fully_shard (no wrapper module: the loss must run
    through the root's forward hooks) gives the unsharded loss and averaged gradients."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         os.path.join(ROOT, "tests", "trl_ddp_run.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-1000:] + result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    figures = json.loads(line[len("RESULT "):])
    for trainer in ("gkd", "distillation"):
        f = figures[trainer]
        assert f["wrapper"] == "DistributedDataParallel"
        assert f["moved"] > 1e-3
        assert f["fastkd_vs_trl"] <= 1e-5 * f["moved"] + 1e-7, f
        assert f["rank_spread"] == 0.0, f
    sharded = figures["sharded_head"]
    assert sharded["dtensor_grad"] == "DTensor"
    assert sharded["loss_diff"] <= 1e-6
    assert sharded["grad_diff"] <= 1e-5 * sharded["grad_scale"]
    fsdp2 = figures["fsdp2"]
    assert fsdp2["head_is_dtensor"]
    assert fsdp2["loss_diff"] <= 1e-6
    assert fsdp2["grad_diff"] <= 1e-5 * fsdp2["grad_scale"], fsdp2


def test_memory_benchmark_smoke():
    """benchmarks/trl_memory.py's measurement runs (tiny shapes) and, on the same job, fastkd's
    step, its C kernel's row buffers included, holds less than TRL's full-logits GKD step."""
    from benchmarks.trl_memory import measure
    from fastkd.kernels import kd_loss_cpu
    shapes = dict(vocab=512, hidden=32, tokens=64, device="cpu")
    fast, trl_default = measure("gkd-fastkd", **shapes), measure("gkd-trl", **shapes)
    assert fast["loss"] == pytest.approx(trl_default["loss"], rel=1e-5)
    assert (fast["kernel_work_bytes"] > 0) == kd_loss_cpu.available(), fast
    # TRL's step calls no C kernel: in this one process the kernel still reports fastkd's call
    trl_allocator = trl_default["peak_extra_bytes"] - trl_default["kernel_work_bytes"]
    assert fast["kernel_work_bytes"] < fast["peak_extra_bytes"] < trl_allocator


def test_memory_benchmark_runs_liger_in_the_interpreter():
    """Where liger-kernel is installed, the benchmark's TRL + Liger variant runs on a CPU (its
    Triton kernels in the interpreter, in a subprocess) and gives TRL's loss on the same job."""
    pytest.importorskip("liger_kernel")
    import argparse
    from benchmarks.trl_memory import run_variant
    args = argparse.Namespace(vocab=512, hidden=32, tokens=64, device="cpu", timeout=300)
    liger, default = run_variant("gkd-trl-liger", args), run_variant("gkd-trl", args)
    assert "error" not in liger, liger
    assert liger["loss"] == pytest.approx(default["loss"], rel=1e-5)
    assert 0 < liger["peak_extra_bytes"]


def test_missing_trl_is_one_sentence_and_core_never_imports_it():
    code = ("import sys\n"
            "import fastkd, fastkd.linear, fastkd.loss\n"
            "assert 'trl' not in sys.modules, 'the core imported trl'\n"
            "sys.modules['trl'] = None\n"
            "try:\n"
            "    import fastkd.trl\n"
            "except ImportError as error:\n"
            "    print('ERROR', error)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("ERROR fastkd.trl needs the 'trl' package, which is not installed: "
            "pip install 'fastkd[trl]'") in result.stdout
