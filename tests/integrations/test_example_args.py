"""The example scripts check their options before any work: a bad value is refused at parse
time (exit status 2, one line naming the option, no traceback), options given explicitly win
over --smoke, a teacher checkpoint must cover the whole teacher, make_vllm_sample.py leaves no
file behind when it fails, and trl_onpolicy.py's printed KL counts each sample only up to its
first EOS. Nothing here trains a model."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from paths import EXAMPLES, ROOT

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def assert_refused(parse, argv, option, capsys):
    """``parse(argv)`` exits with status 2 and one error line that names ``option``."""
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert ": error: " in last and option in last, err
    return last


# --- lm_token_distill.py --------------------------------------------------------------------

@pytest.mark.parametrize("argv, option", [
    (["--eval-every", "0"], "--eval-every"),
    (["--sequences", "0"], "--sequences"),
    (["--batch-size", "0"], "--batch-size"),
    (["--data", "markov", "--vocab", "0"], "--vocab"),
    (["--lr", "0"], "--lr"),
    (["--lr", "-0.001"], "--lr"),
    (["--top-k", "0"], "--top-k"),
    (["--sample", "0"], "--sample"),
    (["--temperature", "0"], "--temperature"),
    (["--data", "markov", "--vocab", "8", "--sources", "topk"], "--top-k"),
    (["--top-k", "257", "--sources", "online", "topk"], "--top-k"),
])
def test_lm_refuses_bad_values(lm, argv, option, capsys):
    assert_refused(lm.parse_args, ["--smoke", *argv], option, capsys)


def test_lm_refuses_a_file_as_cache_dir(lm, tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("")
    assert_refused(lm.parse_args, ["--cache-dir", str(path)], "--cache-dir", capsys)


@NO_CUDA
def test_lm_refuses_cuda_without_a_gpu(lm, capsys):
    assert_refused(lm.parse_args, ["--smoke", "--device", "cuda"], "--device", capsys)


def test_lm_explicit_options_win_over_smoke(lm):
    args = lm.parse_args(["--smoke", "--epochs", "3", "--eval-every", "7", "--batch-size", "5",
                          "--sequences", "40", "--data", "markov", "--vocab", "20"])
    assert (args.epochs, args.eval_every, args.batch_size, args.sequences, args.vocab) == \
        (3, 7, 5, 40, 20)
    assert (args.teacher_epochs, args.min_len, args.max_len) == (1, 8, 16)  # --smoke's
    full = lm.parse_args([])
    assert (full.sequences, full.epochs, full.eval_every, full.batch_size) == (3000, 2, 50, 32)


# --- hf_distill.py --------------------------------------------------------------------------

@pytest.mark.parametrize("argv, option", [
    (["--seq-len", "0"], "--seq-len"),
    (["--chars", "100", "--seq-len", "64"], "--seq-len"),
    (["--chars", "0"], "--chars"),
    (["--teacher-dim", "30"], "--teacher-dim"),
    (["--student-dim", "6"], "--student-dim"),
    (["--teacher-layers", "0"], "--teacher-layers"),
    (["--top-k", "300"], "--top-k"),
    (["--sample", "0"], "--sample"),
    (["--teacher-steps", "0"], "--teacher-steps"),
    (["--student-steps", "0"], "--student-steps"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_hf_refuses_bad_values(hf, argv, option, capsys):
    assert_refused(hf.parse_args, ["--smoke", *argv], option, capsys)


def test_hf_refuses_a_file_as_work_dir(hf, tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("")
    assert_refused(hf.parse_args, ["--smoke", "--work-dir", str(path)], "--work-dir", capsys)


@NO_CUDA
def test_hf_refuses_cuda_without_a_gpu(hf, capsys):
    assert_refused(hf.parse_args, ["--smoke", "--device", "cuda"], "--device", capsys)


def test_hf_help_names_the_width_constraints(hf, capsys):
    with pytest.raises(SystemExit):
        hf.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "a multiple of 4 for its 4 attention heads" in help_text
    assert "a multiple of 4 for its 2 attention heads" in help_text


def test_hf_explicit_options_win_over_smoke(hf):
    args = hf.parse_args(["--smoke", "--sample", "16", "--teacher-steps", "5",
                          "--batch-size", "4", "--top-k", "8"])
    assert (args.sample, args.teacher_steps, args.batch_size, args.top_k) == (16, 5, 4, 8)
    assert (args.chars, args.seq_len, args.student_steps, args.quiet) == (3000, 32, 2, True)
    full = hf.parse_args([])
    assert (full.sample, full.teacher_steps, full.chars, full.quiet) == (32, 600, 200_000, False)


# --- trl_onpolicy.py ------------------------------------------------------------------------

@pytest.mark.parametrize("argv, option", [
    (["--steps", "0"], "--steps"),
    (["--teacher-steps", "0"], "--teacher-steps"),
    (["--lines", "0"], "--lines"),
    (["--lines", "4"], "--lines"),   # 3 training prompts for --batch-size 4
    (["--prompt-len", "0"], "--prompt-len"),
    (["--completion-len", "0"], "--completion-len"),
    (["--temperature", "0"], "--temperature"),
    (["--temperature", "-1"], "--temperature"),
    (["--beta", "1.5"], "--beta"),
    (["--beta", "-0.1"], "--beta"),
    (["--batch-size", "0"], "--batch-size"),
    (["--teacher-dim", "12"], "--teacher-dim"),
])
def test_trl_refuses_bad_values(trl_example, argv, option, capsys):
    assert_refused(trl_example.parse_args, ["--smoke", *argv], option, capsys)


def test_trl_explicit_options_win_over_smoke(trl_example):
    args = trl_example.parse_args(["--smoke", "--steps", "5", "--batch-size", "2",
                                   "--lines", "30", "--completion-len", "3",
                                   "--teacher-steps", "4"])
    assert (args.steps, args.batch_size, args.lines, args.completion_len, args.teacher_steps) \
        == (5, 2, 30, 3, 4)
    smoke = trl_example.parse_args(["--smoke", "--steps", "5"])
    assert (smoke.lines, smoke.teacher_steps, smoke.completion_len, smoke.batch_size) == \
        (64, 3, 8, 4)
    full = trl_example.parse_args([])
    assert (full.lines, full.steps, full.teacher_steps, full.batch_size) == (400, 40, 150, 8)


class TokenTable(torch.nn.Module):
    """A stand-in causal LM whose logits at each position are ``table[input token]``, and whose
    ``generate`` returns fixed sequences."""

    def __init__(self, table, generated=None):
        super().__init__()
        self.table, self.generated = table, generated

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.table[input_ids])

    def generate(self, input_ids, attention_mask, **options):
        return self.generated


def test_trl_kl_counts_each_sample_up_to_its_first_eos(trl_example):
    """Prompts of 2 tokens, then completions of 4 that stop at their first EOS, pad after it,
    never stop, or stop at once. The logits at position i score token i + 1, so the counted
    positions are those whose input is the last prompt token or a completion token before the
    first EOS; an EOS or a pad after it as input is never counted."""
    pad, eos = trl_example.PAD, trl_example.EOS
    prompts = torch.tensor([[5, 4], [4, 5], [pad, 3]])
    completions = torch.tensor([[3, eos, pad, pad], [3, 4, 5, 3], [eos, pad, pad, pad]])
    counted_inputs = [4, 3] + [5, 3, 4, 5] + [3]
    teacher_table = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    teacher_table[[pad, eos]] = torch.tensor([20.0, 0, 0, 0, 0, 0])  # far from uniform
    student = TokenTable(torch.zeros(6, 6), generated=torch.cat([prompts, completions], 1))
    teacher = TokenTable(teacher_table)

    def tokenizer(texts, return_tensors, padding):
        return {"input_ids": prompts, "attention_mask": (prompts != pad).long()}

    args = SimpleNamespace(seed=0, completion_len=4)
    got = trl_example.reverse_kl_on_own_samples(student, teacher, tokenizer, ["p"] * 3, args)
    uniform = torch.full((6,), 1 / 6)
    teacher_log_probs = torch.log_softmax(teacher_table, -1)
    expected = torch.stack([(uniform * (uniform.log() - teacher_log_probs[token])).sum()
                            for token in counted_inputs]).mean()
    assert got == pytest.approx(float(expected), rel=1e-5)


# --- cifar10_distill.py ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet18_state():
    import torchvision
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).state_dict()


@pytest.mark.parametrize("keep, names", [
    (lambda name: name == "conv1.weight", ["bn1.weight"]),     # one tensor of the teacher
    (lambda name: not name.startswith("fc."), ["fc.weight", "fc.bias"]),   # no classifier
], ids=["conv1-only", "no-fc"])
def test_cifar_refuses_a_partial_teacher_checkpoint(cifar, resnet18_state, keep, names,
                                                    tmp_path, capsys):
    path = tmp_path / "teacher.pt"
    torch.save({name: tensor for name, tensor in resnet18_state.items() if keep(name)}, path)
    last = assert_refused(cifar.parse_args, ["--smoke", "--teacher-checkpoint", str(path)],
                          "--teacher-checkpoint", capsys)
    assert all(name in last for name in names)


def test_cifar_refuses_extra_tensors_in_the_teacher_checkpoint(cifar, resnet18_state,
                                                               tmp_path, capsys):
    whole, extra = tmp_path / "teacher.pt", tmp_path / "teacher-and-more.pt"
    torch.save(resnet18_state, whole)
    torch.save({**resnet18_state, "head.weight": torch.zeros(1)}, extra)
    assert cifar.parse_args(["--smoke", "--teacher-checkpoint", str(whole)]).teacher_checkpoint \
        == str(whole)
    last = assert_refused(cifar.parse_args, ["--smoke", "--teacher-checkpoint", str(extra)],
                          "--teacher-checkpoint", capsys)
    assert "head.weight" in last


@pytest.mark.parametrize("content", [None, b"", b"not a checkpoint\n"],
                         ids=["missing", "empty", "text"])
@pytest.mark.parametrize("option", ["--teacher-checkpoint", "--student-checkpoint"])
def test_cifar_refuses_an_unreadable_checkpoint(cifar, option, content, tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    if content is not None:
        path.write_bytes(content)
    assert_refused(cifar.parse_args, ["--smoke", "--student", "resnet18", option, str(path)],
                   option, capsys)


@pytest.mark.parametrize("argv, option", [
    (["--temperature", "0"], "--temperature"),
    (["--method", "pseudo", "--temperature", "2"], "--temperature"),
    (["--method", "mse", "--temperature", "0"], "--temperature"),
    (["--workers", "-1"], "--workers"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_cifar_refuses_bad_values(cifar, argv, option, capsys):
    assert_refused(cifar.parse_args, ["--smoke", *argv], option, capsys)


def test_cifar_refuses_a_student_checkpoint_for_the_cnn(cifar, resnet18_state, tmp_path,
                                                        capsys):
    path = tmp_path / "student.pt"
    torch.save({"conv1.weight": resnet18_state["conv1.weight"]}, path)
    assert_refused(cifar.parse_args, ["--smoke", "--student-checkpoint", str(path)],
                   "--student-checkpoint", capsys)


def test_cifar_refuses_a_cache_dir_without_cached(cifar, tmp_path, capsys):
    assert_refused(cifar.parse_args, ["--smoke", "--cache-dir", str(tmp_path)], "--cache-dir",
                   capsys)


def test_cifar_explicit_options_win_over_smoke(cifar):
    args = cifar.parse_args(["--smoke", "--epochs", "2", "--batch-size", "8"])
    assert (args.epochs, args.batch_size, args.teacher_epochs) == (2, 8, 1)
    assert args.temperature == 4.0
    full = cifar.parse_args([])
    assert (full.epochs, full.teacher_epochs, full.batch_size) == (10, 10, 128)
    assert cifar.parse_args(["--method", "pseudo"]).temperature is None


# --- make_vllm_sample.py --------------------------------------------------------------------

@pytest.mark.parametrize("top_k", ["0", "-1", "65"])
def test_vllm_sample_refuses_top_k_outside_the_vocabulary(vllm_sample, top_k, tmp_path, capsys):
    out = tmp_path / "sample.jsonl"
    assert_refused(vllm_sample.main, ["--out", str(out), "--top-k", top_k], "--top-k", capsys)
    assert not out.exists()


def test_vllm_sample_refuses_a_missing_directory(vllm_sample, tmp_path, capsys):
    assert_refused(vllm_sample.main, ["--out", str(tmp_path / "missing" / "sample.jsonl")],
                   "--out", capsys)


def test_vllm_sample_failure_leaves_out_as_it_was(vllm_sample, tmp_path, monkeypatch):
    """A run that fails after its first response neither truncates --out nor leaves a partial
    file beside it."""
    out = tmp_path / "sample.jsonl"
    out.write_text("the previous sample\n")
    calls = []

    def failing_response(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("generation failed")
        return {"id": "first"}

    monkeypatch.setattr(vllm_sample, "vllm_style_response", failing_response)
    with pytest.raises(RuntimeError, match="generation failed"):
        vllm_sample.main(["--out", str(out)])
    assert out.read_text() == "the previous sample\n"
    assert os.listdir(tmp_path) == ["sample.jsonl"]


# --- the command lines themselves -----------------------------------------------------------

@pytest.mark.parametrize("script, argv, option", [
    ("lm_token_distill.py", ["--smoke", "--eval-every", "0"], "--eval-every"),
    ("trl_onpolicy.py", ["--smoke", "--teacher-steps", "0"], "--teacher-steps"),
])
def test_command_line_refusal_is_one_line(script, argv, option):
    result = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), *argv], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert ": error: " in last and option in last
