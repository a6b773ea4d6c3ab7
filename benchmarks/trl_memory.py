"""Peak memory of one distillation training step through TRL: fastkd.trl's trainers against
TRL's own loss paths and TRL with ``use_liger_kernel=True``, on the same job.

    python -m benchmarks.trl_memory                 # V = 32000, hidden 256, 1024 loss tokens
    python -m benchmarks.trl_memory --smoke         # tiny shapes, seconds (the test runs this)

The job: a Llama-style student and teacher (hidden ``--hidden``, 2 layers each, vocabulary
``--vocab``, untied heads), a batch of 4 sequences whose ``--tokens`` completion tokens all count
in the loss, ``beta = 0.5`` (generalized JSD), temperature 1. One step is ``compute_loss`` then
``accelerator.backward`` on a fixed batch (generation is left out: it is the same for every
variant), after one warm-up step, with the gradients of the previous step freed.

Variants (each in a fresh subprocess, so nothing one leaves behind is counted for another):

- ``gkd-fastkd`` / ``gkd-trl`` / ``gkd-trl-liger``: ``fastkd.trl.GKDTrainer``, TRL's
  ``GKDTrainer`` (full logits of both models, ``generalized_jsd_loss``), the latter with
  ``use_liger_kernel=True``.
- ``distill-fastkd`` / ``distill-trl`` / ``distill-trl-liger``: ``fastkd.trl.DistillationTrainer``,
  TRL's ``DistillationTrainer`` (its chunked divergence on hidden states), and with Liger.
- ``*-fastkd-32mib``: fastkd with ``chunk_budget_bytes = 32 MiB`` (smaller chunks).

Figures, per variant, by the method of benchmarks/memory.py: ``peak_extra_bytes`` is the peak
during the step above what was allocated before (CPU: torch's allocator peak plus
``kernel_work_bytes``, the row buffers fastkd's C kernel mallocs, which torch never sees; CUDA:
``max_memory_allocated``); ``peak_extra_buffers`` is that over one ``tokens x V`` float32 buffer.
The step's time is recorded with the machine's load average: on a shared machine it is noisy.
A variant that cannot run records its error instead.

On a CPU the ``*-liger`` variants run Liger-Kernel's Triton kernels in Triton's interpreter
(``TRITON_INTERPRET=1``). The interpreter works on the tensors in place and keeps a kernel's
block temporaries in numpy, so torch's allocator sees what ``max_memory_allocated`` sees on a
GPU: the tensors Liger's launchers and the model allocate. The step time of those rows is the
interpreter's and means nothing.
"""
import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.env import REPO_ROOT, capture_environment, device_slug
from benchmarks.memory import cpu_step_peak

VARIANTS = ["gkd-fastkd", "gkd-fastkd-32mib", "gkd-trl", "gkd-trl-liger", "distill-fastkd",
            "distill-fastkd-32mib", "distill-trl", "distill-trl-liger"]
ROWS = 4


def _models(vocab, hidden, seed=0):
    import transformers
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                  max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  use_cache=False, tie_word_embeddings=False)
    torch.manual_seed(seed)
    student = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    teacher = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()
    return student, teacher


def _tokenizer():
    """The byte-level tokenizer of examples/trl_onpolicy.py (built offline)."""
    import importlib.util
    path = REPO_ROOT / "examples" / "trl_onpolicy.py"
    spec = importlib.util.spec_from_file_location("trl_onpolicy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.byte_tokenizer()


def _liger_in_triton_interpreter():
    """Bridges two gaps of Triton's interpreter that Liger-Kernel's kernels hit: a ``float``
    launch argument stays a Python float (compiled Triton passes an fp32 scalar, on which the
    RMSNorm kernel calls ``.to``), and ``libdevice.rsqrt`` imported by name is not replaced by
    the interpreter's version (it replaces the attribute of ``triton.language.math``, so the name
    is pointed at that)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter
    import liger_kernel.ops.rms_norm as liger_rms_norm
    if getattr(interpreter, "_implicit_cvt", None) is None:
        raise RuntimeError("this Triton's interpreter has no _implicit_cvt to extend")
    convert = interpreter._implicit_cvt

    def convert_float_too(arg):
        if isinstance(arg, float):
            handle = interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32)
            return tl.tensor(handle, tl.float32)
        return convert(arg)

    interpreter._implicit_cvt = convert_float_too
    liger_rms_norm.rsqrt = lambda x: tl.math.rsqrt(x)


def _trainer(variant, student, teacher, device, output_dir):
    import datasets
    import trl
    import fastkd.trl
    liger = variant.endswith("-liger")
    budget = 32 << 20 if variant.endswith("-32mib") else None
    common = dict(output_dir=output_dir, per_device_train_batch_size=ROWS, report_to=[],
                  save_strategy="no", use_cpu=device == "cpu", bf16=False, beta=0.5,
                  use_liger_kernel=liger, gradient_checkpointing=False)
    extra = {"chunk_budget_bytes": budget} if budget else {}
    if variant.startswith("gkd"):
        from trl.experimental.gkd import GKDConfig
        cls = fastkd.trl.GKDTrainer if "fastkd" in variant else fastkd.trl.TRLGKDTrainer
        return cls(model=student, teacher_model=teacher, args=GKDConfig(lmbda=0.0, **common),
                   data_collator=lambda rows: rows, processing_class=_tokenizer(),
                   train_dataset=datasets.Dataset.from_dict({"input_ids": [[3]]}), **extra)
    cls = fastkd.trl.DistillationTrainer if "fastkd" in variant else trl.DistillationTrainer
    return cls(model=student, teacher_model=teacher,
               args=trl.DistillationConfig(max_completion_length=8, **common),
               train_dataset=datasets.Dataset.from_dict({"prompt": ["x"]}),
               processing_class=_tokenizer(), **extra)


def _batch(variant, tokens, vocab, device):
    generator = torch.Generator().manual_seed(1)
    per_row = tokens // ROWS
    if variant.startswith("gkd"):   # labels[:, 1:] all count: tokens loss rows
        ids = torch.randint(3, vocab, (ROWS, per_row + 1), generator=generator)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                "labels": ids.clone().to(device)}, torch.tensor(tokens)
    prompt = torch.randint(3, vocab, (ROWS, 16), generator=generator)
    completion = torch.randint(3, vocab, (ROWS, per_row), generator=generator)
    batch = {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt),
             "completion_ids": completion, "completion_mask": torch.ones_like(completion)}
    batch = {key: value.to(device) for key, value in batch.items()}
    batch["num_items_in_batch"] = torch.tensor(float(tokens), device=device)
    return batch, None


def measure(variant, *, vocab, hidden, tokens, device):
    """One variant in this process: a dict of its figures."""
    import tempfile
    import transformers
    transformers.logging.set_verbosity_error()
    if variant.endswith("-liger") and device == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("Liger-Kernel on a CPU needs TRITON_INTERPRET=1 before triton "
                               "is imported (run_variant sets it)")
        _liger_in_triton_interpreter()
    student, teacher = _models(vocab, hidden)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = _trainer(variant, student.to(device), teacher.to(device), device, output_dir)
    if variant.endswith("-liger"):   # what Trainer.train does first with use_liger_kernel
        from transformers.integrations.liger import apply_liger_kernel
        apply_liger_kernel(trainer.model, trainer.args.liger_kernel_config)
    model = trainer.model
    model.train()
    batch, items = _batch(variant, tokens, vocab, device)

    def step():
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=items)
        trainer.accelerator.backward(loss)
        return loss

    def forget():
        model.zero_grad(set_to_none=True)
        gc.collect()

    loss = float(step().detach())
    forget()
    started = time.perf_counter()
    step()
    seconds = time.perf_counter() - started
    forget()
    record = {"variant": variant, "loss": loss, "step_seconds": seconds,
              "load_average_1_5_15_min": list(os.getloadavg())}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        record["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - before
    else:
        record["peak_extra_bytes"], record["kernel_work_bytes"] = cpu_step_peak(step)
    record["peak_extra_buffers"] = record["peak_extra_bytes"] / (tokens * vocab * 4)
    return record


def run_variant(variant, args):
    """``measure`` in a fresh subprocess; an error (e.g. Liger on a CPU) is recorded."""
    command = [sys.executable, "-m", "benchmarks.trl_memory", "--variant", variant,
               "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--tokens",
               str(args.tokens), "--device", args.device]
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    env.pop("TRITON_INTERPRET", None)
    if variant.endswith("-liger") and args.device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=args.timeout)
    lines = result.stdout.strip().splitlines()
    if result.returncode == 0 and lines:
        return json.loads(lines[-1])
    error = [line for line in result.stderr.strip().splitlines() if line.strip()]
    return {"variant": variant, "error": error[-1] if error else f"exit {result.returncode}",
            "load_average_1_5_15_min": list(os.getloadavg())}


def _markdown(results, env, args):
    lines = [f"# One TRL distillation step: peak memory ({env['device_slug']})", "",
             f"V = {args.vocab}, hidden {args.hidden}, {args.tokens} loss tokens "
             f"({ROWS} rows), beta 0.5, float32; student and teacher Llama-style, 2 layers.",
             f"Date {env['timestamp_utc']}, {env['cpu_model']} ({env['cpu_count']} CPUs, "
             f"{env['torch_threads']} torch threads), torch {env['torch']}, transformers "
             f"{env['transformers']}, trl {env['trl']}, liger-kernel {env['liger_kernel']}, "
             f"fastkd commit {(env['git']['commit'] or '?')[:7]}"
             f"{' (dirty tree)' if env['git']['dirty'] else ''}.", "",
             "Peak extra = torch allocator peak during compute_loss + backward over what it "
             "held before, plus (CPU) the C kernel's row buffers; in float32 logits buffers of "
             "tokens x V "
             f"({args.tokens * args.vocab * 4 / 2**20:.0f} MiB). Load = 1-minute load "
             "average when the variant ran (times are noisy on a shared machine)." +
             (" The `*-liger` rows ran Liger-Kernel's Triton kernels in Triton's interpreter: "
              "their memory is what the allocator holds, as on a GPU; their step time is the "
              "interpreter's." if args.device == "cpu" else ""), "",
             "| variant | peak extra (MiB) | in logits buffers | of which C kernel (KiB) | "
             "step (s) | load | loss |", "|---|---|---|---|---|---|---|"]
    for r in results:
        load = f"{r['load_average_1_5_15_min'][0]:.2f}"
        if "error" in r:
            lines.append(f"| {r['variant']} | did not run: {r['error'][:160]} | | | | {load} | |")
            continue
        work = r.get("kernel_work_bytes")
        lines.append(
            f"| {r['variant']} | {r['peak_extra_bytes'] / 2**20:.1f} | "
            f"{r['peak_extra_buffers']:.2f} | "
            f"{'' if work is None else f'{work / 2**10:.0f}'} | "
            f"{r['step_seconds']:.2f} | {load} | {r['loss']:.6f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", help="measure this one variant in this process")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, no results written")
    parser.add_argument("--out", help="results folder (default benchmarks/results/<device>-trl)")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args(argv)
    if args.smoke:
        args.vocab, args.hidden, args.tokens = 512, 32, 64
    if args.variant:
        print(json.dumps(measure(args.variant, vocab=args.vocab, hidden=args.hidden,
                                 tokens=args.tokens, device=args.device)))
        return 0
    env = capture_environment(measure_cpu_bandwidth=False)
    env["bench_device"] = args.device
    env["device_slug"] = device_slug(env)
    import transformers
    import trl
    env.update(transformers=transformers.__version__, trl=trl.__version__)
    results = []
    for variant in args.variants.split(","):
        results.append(run_variant(variant, args))
        print(json.dumps(results[-1]), flush=True)
    markdown = _markdown(results, env, args)
    print(markdown)
    if not args.smoke:
        out = Path(args.out) if args.out else \
            REPO_ROOT / "benchmarks" / "results" / f"{env['device_slug']}-trl"
        out.mkdir(parents=True, exist_ok=True)
        (out / "trl_memory.json").write_text(json.dumps(
            {"environment": env, "job": {"vocab": args.vocab, "hidden": args.hidden,
                                         "tokens": args.tokens, "rows": ROWS, "beta": 0.5},
             "written_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
                 timespec="seconds"),
             "results": results}, indent=2) + "\n")
        (out / "trl_memory.md").write_text(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
