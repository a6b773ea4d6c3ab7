"""Fused linear + KD benchmark: the loss from hidden states, fwd+bwd, time and peak memory.

    python -m benchmarks.linear --preset linear          # CPU, the goal shapes (~10-12 min on
                                                         # 2 idle cores; textbook needs an estimated ~17 GB)
    python -m benchmarks.linear --preset linear --vocab 32000 --teacher head   # one part
    python -m benchmarks.linear --preset smoke --out /tmp/x   # seconds (tests/test_benchmarks_linear.py)

Providers (same objective everywhere: ``0.5 * KL(p_t || p_s) + 0.5 * CE`` at T = 1, batchmean
over the rows; the student logits are ``hidden @ W^T``; the teacher is dense logits ``(N, V)``
or a head, teacher hidden ``(N, H)`` and ``W_t (V, H)``):

- ``fastkd``: ``fastkd.linear_kd_loss`` (chunked: matmul, fused kernel, matmuls; gradients in
  forward).
- ``unfused``: ``F.linear`` (+ the teacher's ``F.linear`` under ``no_grad``) then ``fastkd.kd_loss``.
- ``textbook``: ``F.linear`` then the textbook eager composition (``fastkd.demo.textbook_kd_loss``).
- ``liger``: Liger-Kernel's chunked ``LigerFusedLinearJSDLoss`` (``liger_kernel.chunked_loss``,
  pure PyTorch, ``torch.compile`` d per chunk by default) with ``beta=0``, which Liger defines as
  KL(p_t || p_s): the same objective. It takes the teacher as hidden states + weight, so it runs on
  the ``head`` cases only; skipped, with the reason, when ``liger_kernel`` is not importable.
- ``liger-triton``: Liger-Kernel's Triton ``LigerFusedLinearJSD`` (``liger_kernel.transformers``,
  CUDA only). It computes the generalized JSD alone (no hard term), so it runs on cases with
  ``objective="jsd"``: ``JSD_0.5(p_t, p_s)`` at T = 1, batchmean, which every other provider then
  computes too (``divergence="jsd", beta=0.5, soft_weight=1, hard_weight=0``; Liger's ``beta`` is
  the teacher's weight in the mixture, as fastkd's; at 0.5 the two orders coincide anyway).

Each (case, provider) runs in a fresh subprocess: build the inputs, one warm-up step (full size
for ``liger``, whose compiled chunk function must not recompile in the timed step; a few rows for
the others, for lazy initialisation), then ``rounds`` timed steps (forward + backward, gradients
cleared between rounds, untimed). The first timed step also gives the peak extra memory, by the
method of ``benchmarks/memory.py``: on CPU torch's allocator peak (the step runs under torch's
profiler, whose per-op bookkeeping is small against a step of these shapes) plus the CPU kernel's
row buffers (``kernel_work_bytes``), on CUDA ``max_memory_allocated`` minus the allocation before
the step. "Extra" includes the gradients left in ``hidden.grad`` / ``weight.grad`` (every provider
must produce them; the table also shows the peak without them).

Each provider's loss and gradient norms are compared with ``unfused``'s (the exactness of
``linear_kd_loss`` itself is tested against the float64 reference in tests/loss/test_linear.py).
Results: ``linear.json`` and ``linear.md`` in ``benchmarks/results/<device>/`` (or ``--out``),
with the environment (``benchmarks.env.capture_environment``).
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional, Tuple

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.env import REPO_ROOT, capture_environment, device_slug, synchronize  # noqa: E402
from benchmarks.memory import cpu_step_peak, memory_metrics  # noqa: E402

PROVIDERS = ("fastkd", "unfused", "textbook", "liger", "liger-triton")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SOFT_WEIGHT = HARD_WEIGHT = 0.5
TEMPERATURE = 1.0   # Liger's chunked loss divides logits by T but has no T^2 factor: compare at 1
JSD_BETA = 0.5      # the jsd objective (the one Liger's Triton fused-linear loss computes)
# Loss / gradient-norm agreement with the unfused provider (relative), per dtype.
AGREEMENT = {"fp32": 1e-4, "bf16": 3e-2}


@dataclass(frozen=True)
class LinearCase:
    rows: int
    hidden: int
    vocab: int
    teacher: str = "logits"      # "logits" (dense teacher logits) or "head" (TeacherHead)
    dtype: str = "fp32"
    objective: str = "kl+ce"     # "kl+ce" (0.5 KL + 0.5 CE) or "jsd" (JSD_0.5 alone)

    @property
    def id(self) -> str:
        suffix = "" if self.objective == "kl+ce" else f"-{self.objective}"
        return f"{self.rows}x{self.hidden}x{self.vocab}-{self.teacher}-{self.dtype}{suffix}"

    @property
    def loss_options(self) -> dict:
        """fastkd keyword arguments of this case's objective."""
        if self.objective == "jsd":
            return dict(temperature=TEMPERATURE, soft_weight=1.0, hard_weight=0.0,
                        divergence="jsd", beta=JSD_BETA)
        return dict(temperature=TEMPERATURE, soft_weight=SOFT_WEIGHT, hard_weight=HARD_WEIGHT)

    @property
    def logits_bytes(self) -> int:
        return self.rows * self.vocab * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class LinearPreset:
    name: str
    cases: Tuple[LinearCase, ...]
    providers: Tuple[str, ...] = PROVIDERS
    rounds: int = 1
    liger_compiled: bool = True


def _bf16_matmul_is_native() -> bool:
    """bf16 on this CPU only where it has bf16 matrix instructions (AVX512-BF16 or AMX);
    without them torch's bf16 matmul is several times slower than fp32 (6.5x measured here)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _linear_preset() -> LinearPreset:
    """The CPU benchmark: N = 4096 tokens, H = 1024, V = 32000 and 128256, dense teacher
    logits and a teacher head, fp32 (and bf16 where the CPU has bf16 matrix instructions)."""
    dtypes = ("fp32", "bf16") if _bf16_matmul_is_native() else ("fp32",)
    cases = tuple(LinearCase(4096, 1024, vocab, teacher, dtype) for dtype in dtypes
                  for vocab in (32000, 128256) for teacher in ("logits", "head"))
    return LinearPreset("linear", cases)


def _gpu_preset() -> LinearPreset:
    """The GPU shape (run with --device cuda): 8192 x 4096 x 128256, bf16; the JSD case
    compares with Liger-Kernel's Triton fused-linear JSD (the only objective it has)."""
    return LinearPreset("linear-gpu", (LinearCase(8192, 4096, 128256, "logits", "bf16"),
                                       LinearCase(8192, 4096, 128256, "head", "bf16"),
                                       LinearCase(8192, 4096, 128256, "head", "bf16", "jsd")),
                        rounds=5)


def _smoke_preset() -> LinearPreset:
    """Seconds: tiny teacher-head cases of both objectives, Liger uncompiled."""
    return LinearPreset("smoke", (LinearCase(96, 32, 2000, "head"),
                                  LinearCase(96, 32, 2000, "head", objective="jsd")), rounds=2,
                        liger_compiled=False)


PRESETS = {"linear": _linear_preset, "linear-gpu": _gpu_preset, "smoke": _smoke_preset}


# ----------------------------------------------------------------------------- providers
def liger_unavailable_reason() -> Optional[str]:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # noqa: F401
    except Exception as error:   # ImportError, or its own imports failing on this machine
        return f"liger_kernel.chunked_loss is not importable ({type(error).__name__}: {error})"
    return None


def not_applicable_reason(provider: str, case: LinearCase, device: str = "cpu") -> Optional[str]:
    if provider in ("liger", "liger-triton") and case.teacher != "head":
        return "Liger's fused-linear loss takes the teacher as hidden states + weight only"
    if provider == "liger":
        return liger_unavailable_reason()
    if provider == "liger-triton":
        if case.objective != "jsd":
            return "Liger's Triton fused-linear loss computes the JSD alone (objective='jsd' cases)"
        if device != "cuda":
            return "Liger's Triton fused-linear JSD needs a CUDA device"
        try:
            from liger_kernel.transformers import LigerFusedLinearJSD  # noqa: F401
        except Exception as error:
            return f"liger_kernel.transformers is not importable ({type(error).__name__}: {error})"
    if provider == "textbook" and case.objective != "kl+ce":
        return "the textbook composition is 0.5 KL + 0.5 CE only"
    return None


def make_inputs(case: LinearCase, device: str, seed: int = 0) -> dict:
    """Student hidden (N, H) and weight (V, H) requiring grad, teacher logits or head, labels.
    Scales give logits of standard deviation ~2, like the loss benchmarks."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[case.dtype]

    def randn(*shape, scale):
        return (scale * torch.randn(*shape, generator=gen, device=device)).to(dtype)
    weight_scale = 2.0 / case.hidden ** 0.5
    inputs = {"hidden": randn(case.rows, case.hidden, scale=1.0).requires_grad_(),
              "weight": randn(case.vocab, case.hidden, scale=weight_scale).requires_grad_(),
              "labels": torch.randint(0, case.vocab, (case.rows,), generator=gen, device=device)}
    if case.teacher == "head":
        inputs["teacher_hidden"] = randn(case.rows, case.hidden, scale=1.0)
        inputs["teacher_weight"] = randn(case.vocab, case.hidden, scale=weight_scale)
    else:
        inputs["teacher_logits"] = randn(case.rows, case.vocab, scale=2.0)
    return inputs


def _teacher_logits(inputs):
    if "teacher_logits" in inputs:
        return inputs["teacher_logits"]
    with torch.no_grad():
        return F.linear(inputs["teacher_hidden"], inputs["teacher_weight"])


def make_loss(provider: str, case: LinearCase, liger_compiled: bool = True):
    """``loss_fn(inputs) -> scalar loss`` for one provider."""
    import fastkd
    options = case.loss_options
    if provider == "fastkd":
        def fastkd_loss(inputs):
            teacher = inputs.get("teacher_logits")
            if teacher is None:
                teacher = fastkd.TeacherHead(inputs["teacher_hidden"], inputs["teacher_weight"])
            return fastkd.linear_kd_loss(inputs["hidden"], inputs["weight"], teacher,
                                         inputs["labels"], **options)
        return fastkd_loss
    if provider == "unfused":
        def unfused_loss(inputs):
            logits = F.linear(inputs["hidden"], inputs["weight"])
            return fastkd.kd_loss(logits, _teacher_logits(inputs), inputs["labels"], **options)
        return unfused_loss
    if provider == "textbook":
        from fastkd.demo import textbook_kd_loss

        def textbook_loss(inputs):
            logits = F.linear(inputs["hidden"], inputs["weight"])
            return textbook_kd_loss(logits, _teacher_logits(inputs), inputs["labels"],
                                    TEMPERATURE, SOFT_WEIGHT, HARD_WEIGHT)
        return textbook_loss
    if provider == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        liger = LigerFusedLinearJSDLoss(weight_hard_loss=options["hard_weight"],
                                        weight_soft_loss=options["soft_weight"],
                                        beta=options.get("beta", 0.0), temperature=TEMPERATURE,
                                        compiled=liger_compiled)

        def liger_loss(inputs):
            return liger(inputs["hidden"], inputs["weight"], inputs["teacher_hidden"],
                         inputs["teacher_weight"], inputs["labels"])
        return liger_loss
    if provider == "liger-triton":
        from liger_kernel.transformers import LigerFusedLinearJSD
        liger_triton = LigerFusedLinearJSD(jsd_beta=JSD_BETA, temperature=TEMPERATURE)

        def liger_triton_loss(inputs):
            return liger_triton(inputs["hidden"], inputs["weight"], inputs["teacher_hidden"],
                                inputs["teacher_weight"])
        return liger_triton_loss
    raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")


# ----------------------------------------------------------------------------- one measurement
def _step(loss_fn, inputs, device):
    loss = loss_fn(inputs)
    loss.backward()
    synchronize(device)
    return loss


def _clear(inputs):
    inputs["hidden"].grad = inputs["weight"].grad = None


def measure(provider: str, case: LinearCase, device: str, rounds: int,
            liger_compiled: bool = True) -> dict:
    """Warm up, then ``rounds`` timed fwd+bwd steps; the first timed step's peak extra memory."""
    inputs = make_inputs(case, device)
    loss_fn = make_loss(provider, case, liger_compiled)
    if provider == "liger":
        warm = inputs
    else:   # a few rows: lazy initialisation without the full step's cost
        warm = {key: (value[:64].detach().requires_grad_(value.requires_grad)
                      if key not in ("weight", "teacher_weight") else value)
                for key, value in inputs.items()}
    _step(loss_fn, warm, device)
    _clear(inputs)
    del warm
    gc.collect()
    seconds, first = [], {}

    def first_step():
        start = time.perf_counter()
        first["loss"] = _step(loss_fn, inputs, device)
        seconds.append(time.perf_counter() - start)

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        first_step()
        memory = memory_metrics(torch.cuda.max_memory_allocated() - before, case)
    else:
        extra, work = cpu_step_peak(first_step)
        memory = memory_metrics(extra, case, work)
    loss = first["loss"]
    grad_norms = {"hidden": inputs["hidden"].grad.double().norm().item(),
                  "weight": inputs["weight"].grad.double().norm().item()}
    gradient_bytes = sum(inputs[key].grad.numel() * inputs[key].grad.element_size()
                         for key in ("hidden", "weight"))
    for _ in range(rounds - 1):
        _clear(inputs)
        start = time.perf_counter()
        _step(loss_fn, inputs, device)
        seconds.append(time.perf_counter() - start)
    ordered = sorted(seconds)
    return {"provider": provider, "case": {**asdict(case), "id": case.id},
            "median_s": ordered[len(ordered) // 2], "min_s": ordered[0], "rounds": len(seconds),
            "seconds": seconds, **memory, "gradient_bytes": gradient_bytes, "loss": loss.item(),
            "grad_norms": grad_norms, "threads": torch.get_num_threads()}


def run_in_subprocess(provider: str, case: LinearCase, device: str, rounds: int,
                      liger_compiled: bool, timeout_s: float = 3600) -> dict:
    command = [sys.executable, "-m", "benchmarks.linear", "--measure", provider,
               "--case", json.dumps(asdict(case)), "--device", device, "--rounds", str(rounds)]
    if not liger_compiled:
        command.append("--liger-eager")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                   os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout_s)
    if result.returncode != 0:
        return {"provider": provider, "case": {**asdict(case), "id": case.id},
                "error": result.stderr[-3000:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- report
def check_agreement(records: list) -> None:
    """Mark each record ``agrees`` with the unfused provider of its case (loss and grad norms)."""
    baseline = {r["case"]["id"]: r for r in records
                if r["provider"] == "unfused" and "loss" in r}
    for record in records:
        base = baseline.get(record["case"]["id"])
        if "loss" not in record or base is None:
            continue
        tol = AGREEMENT[record["case"]["dtype"]]
        errors = [abs(record["loss"] - base["loss"]) / max(abs(base["loss"]), 1e-12)]
        errors += [abs(record["grad_norms"][k] - base["grad_norms"][k])
                   / max(base["grad_norms"][k], 1e-30) for k in ("hidden", "weight")]
        record["max_rel_diff_vs_unfused"] = max(errors)
        record["agrees"] = max(errors) <= tol


def evaluate_goals(records: list) -> list:
    """The goals at the largest V of each (teacher, dtype): fastkd's extra peak memory
    <= 10% of unfused's; time <= 1.05x unfused; at least as fast as Liger with less memory."""
    by_case = {}
    for record in records:
        if "median_s" in record:
            by_case.setdefault(record["case"]["id"], {})[record["provider"]] = record
    goals = []
    for case_id, providers in sorted(by_case.items()):
        fused, unfused = providers.get("fastkd"), providers.get("unfused")
        if fused is None:
            continue
        if unfused is not None:
            ratio = fused["peak_extra_bytes"] / max(unfused["peak_extra_bytes"], 1)
            goals.append(_goal(f"{case_id}: extra peak memory vs unfused", ratio, 0.10, "x"))
            # the same without the gradients both must return (weight.grad alone is V x H)
            beyond = [r["peak_extra_bytes"] - r["gradient_bytes"] for r in (fused, unfused)]
            goals.append(_goal(f"{case_id}: extra peak memory beyond the returned gradients vs "
                               "unfused", beyond[0] / max(beyond[1], 1), 0.10, "x"))
            goals.append(_goal(f"{case_id}: time vs unfused", fused["median_s"] / unfused["median_s"],
                               1.05, "x"))
        for name, label in (("liger", "Liger chunked"), ("liger-triton", "Liger Triton")):
            liger = providers.get(name)
            if liger is None:
                continue
            goals.append(_goal(f"{case_id}: time vs {label}",
                               fused["median_s"] / liger["median_s"], 1.0, "x"))
            goals.append(_goal(f"{case_id}: extra peak memory vs {label}",
                               fused["peak_extra_bytes"] / max(liger["peak_extra_bytes"], 1),
                               1.0, "x", strict=True))
    return goals


def _goal(name, measured, target, unit, strict=False):
    met = measured < target if strict else measured <= target
    return {"goal": name, "target": f"{'<' if strict else '<='} {target:g}{unit}",
            "measured": f"{measured:.3f}{unit}",
            "status": "met" if met else f"missed by {measured / target:.2f}x"}


def render_markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"# fastkd fused linear + KD: preset `{results['preset']}` on {results['device']}", "",
             f"- when: {env.get('timestamp_utc')}; git {env.get('git', {}).get('commit')}"
             f" (dirty: {env.get('git', {}).get('dirty')})",
             f"- CPU: {env.get('cpu_model')}, {env.get('cpu_count')} logical CPUs, torch threads "
             f"{env.get('torch_threads')}; load average at the start "
             f"{env.get('load_average_1_5_15_min')}",
             f"- versions: torch {env.get('torch')}, triton {env.get('triton')}, liger-kernel "
             f"{env.get('liger_kernel')}",
             "- loss: 0.5 * KL(p_t || p_s) + 0.5 * CE at T = 1 from hidden states (N x H) and "
             "W (V x H); fwd+bwd; extra peak memory includes the gradients left in .grad",
             ""]
    for note in results.get("notes", []):
        lines.append(f"- note: {note}")
    lines += ["", "## Goals", "", "| goal | target | measured | status |", "|---|---|---|---|"]
    for goal in results["goals"]:
        lines.append(f"| {goal['goal']} | {goal['target']} | {goal['measured']} | "
                     f"{goal['status']} |")
    lines += ["", "## Results", "",
              "| case | provider | median s | rounds | extra peak MB | without the grads MB | "
              "logits buffers | vs unfused time | agrees with unfused |",
              "|---|---|---|---|---|---|---|---|---|"]
    unfused = {r["case"]["id"]: r for r in results["records"]
               if r["provider"] == "unfused" and "median_s" in r}
    for record in results["records"]:
        case_id = record["case"]["id"]
        if "median_s" not in record:
            reason = record.get("skipped") or "FAILED: " + record.get("error", "")[-200:].replace(
                "\n", " ").replace("|", "/")
            lines.append(f"| {case_id} | {record['provider']} | - | - | - | - | - | - | {reason} |")
            continue
        base = unfused.get(case_id)
        vs = f"{record['median_s'] / base['median_s']:.3f}x" if base else "-"
        agrees = {True: "yes", False: "**NO**"}.get(record.get("agrees"), "-")
        lines.append(
            f"| {case_id} | {record['provider']} | {record['median_s']:.3f} | {record['rounds']} | "
            f"{record['peak_extra_bytes'] / 2**20:.0f} | "
            f"{(record['peak_extra_bytes'] - record['gradient_bytes']) / 2**20:.0f} | "
            f"{record['peak_extra_buffers']:.2f} | {vs} | {agrees} |")
    return "\n".join(lines) + "\n"


def run_preset(preset: LinearPreset, device: str, out_dir: Optional[Path] = None,
               vocab: Optional[int] = None, teacher: Optional[str] = None,
               providers: Optional[Tuple[str, ...]] = None) -> dict:
    env = capture_environment(measure_cpu_bandwidth=False)
    env["bench_device"] = device
    records, notes = [], []
    if preset.name == "linear" and not _bf16_matmul_is_native():
        notes.append("bf16 cases left out: this CPU has no bf16 matrix instructions "
                     "(AVX512-BF16 / AMX), where torch's bf16 matmul is several times slower "
                     "than fp32")
    for case in preset.cases:
        if (vocab and case.vocab != vocab) or (teacher and case.teacher != teacher):
            continue
        for provider in providers or preset.providers:
            reason = not_applicable_reason(provider, case, device)
            if reason:
                records.append({"provider": provider, "case": {**asdict(case), "id": case.id},
                                "skipped": reason})
                continue
            print(f"{case.id} {provider} ...", end=" ", flush=True)
            record = run_in_subprocess(provider, case, device, preset.rounds,
                                       preset.liger_compiled)
            print("failed" if "error" in record else f"{record['median_s']:.3f} s, "
                  f"{record['peak_extra_bytes'] / 2**20:.0f} MB", flush=True)
            records.append(record)
    check_agreement(records)
    results = {"preset": preset.name, "device": device, "environment": env, "notes": notes,
               "records": records, "goals": evaluate_goals(records)}
    if hasattr(os, "getloadavg"):
        env["load_average_at_end_1_5_15_min"] = list(os.getloadavg())
    out_dir = Path(out_dir) if out_dir else REPO_ROOT / "benchmarks" / "results" / device_slug(env)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "linear.json").write_text(json.dumps(results, indent=1))
    (out_dir / "linear.md").write_text(render_markdown(results))
    print(f"wrote {out_dir / 'linear.json'} and {out_dir / 'linear.md'}")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="linear")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vocab", type=int, help="only the cases of this V")
    parser.add_argument("--teacher", choices=("logits", "head"), help="only this teacher kind")
    parser.add_argument("--providers", help="comma-separated subset of " + ",".join(PROVIDERS))
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<device>)")
    parser.add_argument("--rounds", type=int, help="timed rounds per measurement (default: the "
                                                   "preset's; 1 for `linear`)")
    # internal: one measurement in this process (run_in_subprocess)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--liger-eager", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        case = LinearCase(**json.loads(args.case))
        print(json.dumps(measure(args.measure, case, args.device, args.rounds or 1,
                                 liger_compiled=not args.liger_eager)))
        return 0
    providers = tuple(args.providers.split(",")) if args.providers else None
    if providers and not set(providers) <= set(PROVIDERS):
        parser.error(f"--providers: choose from {', '.join(PROVIDERS)}")
    preset = PRESETS[args.preset]()
    if args.rounds:
        if args.rounds < 1:
            parser.error("--rounds must be >= 1")
        preset = replace(preset, rounds=args.rounds)
    results = run_preset(preset, args.device, args.out, args.vocab, args.teacher, providers)
    failed = [r for r in results["records"] if "error" in r or r.get("agrees") is False]
    for record in failed:
        print(f"{record['case']['id']} {record['provider']}: "
              f"{record.get('error', 'disagrees with unfused')}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
