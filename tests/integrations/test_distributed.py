"""Two ranks (``torchrun``, gloo, CPU) against one process on the same global batch:
``DistillationTrainer`` and the stock Trainer with ``DistillationLoss`` (one SGD step, with
``average_tokens_across_devices`` on and off), and ``fastkd.linear_kd_loss`` in hand-written DDP
and FSDP2 steps. tests/distributed/run.py runs the ranks (one launch for every check).

Expected values:
- ``average_tokens_across_devices=True`` (the default) and the hand-written recipes: the loss,
  its KD and CE parts, the gradient norm and every parameter's step equal one process's on the
  whole batch (the global token mean).
- ``average_tokens_across_devices=False``: each rank averages over its own tokens and DDP averages
  the ranks, so the reference is the mean of one-process steps on each rank's samples.

Tolerances: the same float32 sums split over ranks and padded to other lengths agree to about
1e-6 relative; losses are compared at rel 1e-5, gradients at rtol 1e-4 / atol 1e-6.
"""
import os
import signal
import subprocess
import sys

import pytest
import torch

from paths import TESTS

pytest.importorskip("transformers")
if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

HERE = TESTS
sys.path.insert(0, os.path.join(HERE, "distributed"))

import linear_checks  # noqa: E402
import trainer_checks  # noqa: E402

RANKS = 2
GRADS = dict(rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [HERE, os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(RANKS), os.path.join(HERE, "distributed", "run.py"),
               str(out)]
    # a session of its own, so that a hung run is ended with its ranks
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail("the distributed run did not finish in 240 s:\n" + output[-5000:])
    assert process.returncode == 0, output[-5000:]
    results = torch.load(out / "results.pt", weights_only=False)
    assert results["world_size"] == RANKS
    return results


def norm(steps: dict) -> float:
    return float(torch.cat([step.flatten() for step in steps.values()]).norm())


def mean_of(results: list) -> dict:
    """The mean of several one-process steps: what DDP applies when each rank averages over its
    own tokens."""
    steps = {name: sum(r["steps"][name] for r in results) / len(results)
             for name in results[0]["steps"]}
    logs = {key: sum(r["logs"][key] for r in results) / len(results)
            for key in ("loss", "kd_loss", "ce_loss")}
    return {"logs": dict(logs, grad_norm=norm(steps)), "steps": steps}


@pytest.mark.parametrize("name, stock, average_tokens", trainer_checks.CONFIGS)
def test_trainer_on_two_ranks_equals_one_process(ranks, tmp_path, name, stock, average_tokens):
    got = ranks["trainer"][name]
    rows = linear_checks.rows()
    shares = got["indices"]
    # the ranks read disjoint halves of the batch, with different numbers of target tokens
    assert sorted(shares[0] + shares[1]) == list(range(len(rows)))
    if average_tokens:
        expected = trainer_checks.train_step(rows, tmp_path, stock=stock, average_tokens=True,
                                             batch_size=len(rows))
    else:
        expected = mean_of([trainer_checks.train_step(
            [rows[i] for i in share], tmp_path, stock=stock, average_tokens=False,
            batch_size=len(share)) for share in shares])
    for key in ("loss", "kd_loss", "ce_loss", "grad_norm"):
        assert got["logs"][key] == pytest.approx(expected["logs"][key], rel=1e-5), key
    assert got["logs"]["grad_norm"] == pytest.approx(norm(got["steps"]), rel=1e-5)
    for parameter, step in expected["steps"].items():
        torch.testing.assert_close(got["steps"][parameter], step, **GRADS)


def test_the_ranks_hold_different_token_counts(ranks):
    """Otherwise the mean of per-rank means would equal the global mean and the checks above
    could not tell the two normalizations apart."""
    rows = linear_checks.rows()
    counts = [sum(sum(1 for label in linear_checks.batch_of([rows[i]])["shift_labels"][0]
                      if label != -100) for i in share)
              for share in ranks["trainer"]["subclass-local"]["indices"]]
    assert counts[0] != counts[1]


@pytest.mark.parametrize("recipe", ["ddp", "fsdp2"])
def test_linear_kd_loss_recipes_equal_one_process(ranks, recipe):
    got = ranks["linear"][recipe]
    expected = linear_checks.reference(linear_checks.rows())
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert set(got["grads"]) == set(expected["grads"])
    for name, grad in expected["grads"].items():
        torch.testing.assert_close(got["grads"][name], grad, **GRADS)


def test_the_trainer_loss_refuses_a_sharded_output_layer(ranks):
    """DistillationLoss reads the head outside the model's forward: an lm_head that FSDP2 has
    resharded after its own forward is refused with a sentence, not computed on a shard."""
    message = ranks["linear"]["sharded-head"]
    assert "output layer weight is sharded" in message and "More than one GPU" in message
