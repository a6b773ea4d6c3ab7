"""Run a benchmark preset and write its results under ``benchmarks/results/<device>/``.

    python benchmarks/run.py --preset quick          # CPU, a few minutes
    python benchmarks/run.py --preset full           # GPU
    python benchmarks/run.py --preset gpu-check      # GPU: tests + kernel resources + full
    python benchmarks/run.py --render results/x/pytest-benchmark.json   # tables/plots only

``gpu-check`` is the one command for a machine that has a GPU for a short while: it installs
Liger-Kernel from ``.whl/`` if it is not importable (``pip download liger-kernel --no-deps -d
.whl/`` on a machine with PyPI), runs the test suite on the real kernels (``tests-gpu.txt``),
compiles every kernel specialization and records registers, spills and shared memory
(``kernel_resources.json``), then runs the ``full`` preset with every provider and writes the
results folder, whose goals table then has every GPU row filled, and last the fused linear + KD
preset ``linear-gpu`` (``benchmarks/linear.py``: 8192 x 4096 x 128256 bf16 against Liger's
chunked and Triton fused-linear losses) into the same folder, and one TRL distillation step's
peak memory (``benchmarks/trl_memory.py``: fastkd.trl against TRL and TRL + Liger) into its
``trl/`` subfolder.

Runs the pytest-benchmark suite in ``benchmarks/`` (a subprocess), keeps its raw JSON as
``pytest-benchmark.json``, and writes ``results.json``, ``results.md`` and the PNG plots.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Nothing here imports torch at module level (benchmarks.env, .presets and .report do): the parser
# serves `fastkd bench`, whose --help and argument errors must not pay for torch's import.
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_ROOT = REPO_ROOT / "benchmarks" / "results"
# benchmarks.presets.PRESETS' names (tests/test_cli.py checks that they agree) and gpu-check
PRESET_NAMES = ("full", "quick", "smoke", "sparse")


def run_suite(preset: str, json_path: Path, only: str = "all", keyword: str = None,
              device: str = None, threads: int = None) -> int:
    """pytest on benchmarks/ with the preset; returns pytest's exit code."""
    files = {"all": ["benchmarks"], "loss": ["benchmarks/test_bench_loss.py"],
             "cache": ["benchmarks/test_bench_cache.py"]}[only]
    command = [sys.executable, "-m", "pytest", *files, "-p", "no:cacheprovider", "-q",
               f"--preset={preset}", f"--benchmark-json={json_path}",
               "--benchmark-disable-gc", "--benchmark-sort=name",
               "--benchmark-columns=median,iqr,min,max,rounds"]
    if keyword:
        command += ["-k", keyword]
    if device:
        command += [f"--bench-device={device}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads, here and in subprocesses
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, cwd=REPO_ROOT, env=env).returncode


EXPECTED_JSON = "a pytest-benchmark JSON written by benchmarks/run.py"
# what the top level of a JSON file holds, in words, for the type json.loads gives
_JSON_KINDS = {list: "a list", str: "a string", int: "a number", float: "a number",
               bool: "true or false", type(None): "null"}


class RenderError(Exception):
    """Rendering cannot go on: ``--render``'s file is not a pytest-benchmark JSON of this suite
    (then nothing has been written), or ``--out`` cannot be written. The message says which."""


def _problem(error: Exception) -> str:
    """What a report function tripped over in a JSON it read, in words."""
    if isinstance(error, KeyError):
        return f"missing key {error.args[0]!r}"
    return f"a value of the wrong kind ({type(error).__name__}: {error})"


def load_benchmark_json(path: Path) -> dict:
    """The pytest-benchmark JSON at ``path``, checked to have everything the report reads: the
    report runs once in memory here, so a file it cannot use is a RenderError before any output
    is written, not a traceback halfway through writing the results."""
    from fastkd.cache.files import not_a_file
    from benchmarks.env import device_slug
    from benchmarks.report import evaluate_goals, load_records, markdown
    where = f"--render {path}"
    if not Path(path).is_file():
        raise RenderError(f"{where}: {not_a_file(str(path))}; expected {EXPECTED_JSON}")
    try:
        data = json.loads(Path(path).read_bytes())
    except OSError as error:
        raise RenderError(f"{where}: cannot read it ({error.strerror or error}); expected "
                          f"{EXPECTED_JSON}") from None
    except ValueError as error:   # JSONDecodeError, UnicodeDecodeError
        raise RenderError(f"{where}: not JSON ({error}); expected {EXPECTED_JSON}") from None
    if not isinstance(data, dict):
        raise RenderError(f"{where}: the JSON is {_JSON_KINDS[type(data)]}, not an object; "
                          f"expected {EXPECTED_JSON}")
    env = data.get("fastkd").get("environment") if isinstance(data.get("fastkd"), dict) else None
    if env is None:
        raise RenderError(f"{where}: no fastkd environment in the JSON (no benchmark ran, or "
                          f"another program wrote it); expected {EXPECTED_JSON}")
    if not isinstance(env, dict):
        raise RenderError(f"{where}: fastkd.environment is not an object; expected "
                          f"{EXPECTED_JSON}")
    try:
        records = load_records(data)
        markdown(records, env, "?", evaluate_goals(records, env["bench_device"]))
        device_slug(env)
    except (LookupError, TypeError, AttributeError, ValueError, ArithmeticError) as error:
        raise RenderError(f"{where}: not {EXPECTED_JSON}: {_problem(error)}") from None
    return data


def render(pytest_json_path: Path, out_dir: Path = None) -> dict:
    """results.json, results.md and the plots from a pytest-benchmark JSON, and a copy of it,
    under ``out_dir``; RenderError for a file the report cannot use."""
    from benchmarks.env import device_slug
    from benchmarks.report import write_results
    data = load_benchmark_json(pytest_json_path)
    env = data["fastkd"]["environment"]
    out_dir = Path(out_dir) if out_dir else RESULTS_ROOT / device_slug(env)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        raw = out_dir / "pytest-benchmark.json"
        if Path(pytest_json_path).resolve() != raw.resolve():
            raw.write_text(json.dumps(data, indent=1))
        written = write_results(data, out_dir)
    except OSError as error:
        where = f" ({error.filename})" if error.filename else ""
        raise RenderError(f"--out {out_dir}: cannot write the results there{where}: "
                          f"{error.strerror or error}; choose a directory you can write "
                          f"to") from None
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return written


WHEEL_DIR = REPO_ROOT / ".whl"


def _ensure_liger() -> str:
    """Install liger-kernel from the carried wheels in .whl/ when it is not importable."""
    import importlib.util
    if importlib.util.find_spec("liger_kernel") is not None:
        return "already installed"
    wheels = sorted(WHEEL_DIR.glob("liger_kernel-*.whl"))
    if not wheels:
        return (f"not installed and no wheel in {WHEEL_DIR} (pip download liger-kernel --no-deps "
                "-d .whl/ where PyPI is reachable): the liger rows stay empty")
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                             "-q", str(wheels[-1])], capture_output=True, text=True)
    return f"installed {wheels[-1].name}" if result.returncode == 0 else \
        f"pip install {wheels[-1].name} failed: {result.stderr[-500:]}"


def gpu_check(args: argparse.Namespace) -> int:
    """Tests on the real kernels, kernel resources, then the full preset (see the docstring)."""
    import torch
    if not torch.cuda.is_available():
        print("gpu-check needs a CUDA device (torch sees none)", file=sys.stderr)
        return 2
    name = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
    out_dir = Path(args.out) if args.out else RESULTS_ROOT / name
    out_dir.mkdir(parents=True, exist_ok=True)
    print("liger-kernel:", _ensure_liger(), flush=True)
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    try:
        tests = subprocess.run([sys.executable, "-m", "pytest", "tests", "-q", "-p",
                                "no:cacheprovider"], cwd=REPO_ROOT, env=env,
                               capture_output=True, text=True, timeout=args.tests_timeout)
    except subprocess.TimeoutExpired as timeout:
        tests = subprocess.CompletedProcess(timeout.cmd, 124, str(timeout.stdout or ""),
                                            f"timed out after {args.tests_timeout} s")
    (out_dir / "tests-gpu.txt").write_text(tests.stdout[-200000:] + tests.stderr[-20000:])
    print(f"tests on the real kernels: exit code {tests.returncode}; "
          f"{tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else ''}", flush=True)
    resources = out_dir / "kernel_resources.json"
    aot = subprocess.run([sys.executable, "-m", "fastkd.kernels.aot", "--json", str(resources)],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    print(aot.stdout[-3000:], aot.stderr[-2000:], flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        json_path = Path(scratch) / "pytest-benchmark.json"
        code = run_suite("full", json_path, args.only, args.keyword, "cuda", args.threads)
        if not json_path.exists():
            print(f"pytest wrote no benchmark JSON (exit code {code})", file=sys.stderr)
            return code or 1
        data = json.loads(json_path.read_text())
        if resources.exists():
            data.setdefault("fastkd", {}).setdefault("environment", {})["kernel_resources"] = \
                json.loads(resources.read_text())
        data["fastkd"]["gpu_check"] = {"tests_exit_code": tests.returncode,
                                       "aot_exit_code": aot.returncode}
        json_path.write_text(json.dumps(data))
        render(json_path, out_dir)
    # the fused linear + KD preset at 8192 x 4096 x 128256 bf16, against Liger's chunked and
    # Triton fused-linear losses: linear.json / linear.md in the same folder
    linear = subprocess.run([sys.executable, "-m", "benchmarks.linear", "--preset", "linear-gpu",
                             "--device", "cuda", "--out", str(out_dir)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True)
    print(linear.stdout[-3000:], linear.stderr[-2000:], flush=True)
    trl_memory = subprocess.run([sys.executable, "-m", "benchmarks.trl_memory", "--device",
                                 "cuda", "--out", str(out_dir / "trl")], cwd=REPO_ROOT, env=env,
                                capture_output=True, text=True)
    print(trl_memory.stdout[-3000:], trl_memory.stderr[-2000:], flush=True)
    return max(code, tests.returncode != 0, aot.returncode != 0, linear.returncode != 0,
               trl_memory.returncode != 0)


def build_parser(parser: argparse.ArgumentParser = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        description="Run the fastkd benchmark suite and write JSON, markdown and plots.")
    parser.add_argument("--preset", choices=PRESET_NAMES + ("gpu-check",), default="quick",
                        help="quick: CPU, a few minutes; full: GPU sweep; gpu-check: GPU tests, "
                             "kernel resources and the full preset in one go; smoke: seconds, "
                             "for the tests only (default: quick)")
    parser.add_argument("--tests-timeout", type=int, default=900,
                        help="gpu-check: seconds allowed for the test suite (default 900)")
    parser.add_argument("--only", choices=("all", "loss", "cache"), default="all",
                        help="run only the loss or only the cache benchmarks")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression to select cases")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="benchmark device (default: cuda when available)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch (OMP_NUM_THREADS; default: torch's default)")
    parser.add_argument("--out", type=Path,
                        help="results folder (default: benchmarks/results/<device>)")
    parser.add_argument("--render", type=Path, metavar="PYTEST_JSON",
                        help="skip running; rebuild tables and plots from a pytest-benchmark JSON")
    return parser


def main(args: argparse.Namespace) -> int:
    if args.preset == "gpu-check" and not args.render:
        return gpu_check(args)
    if args.render:
        render(args.render, args.out)
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        json_path = Path(scratch) / "pytest-benchmark.json"
        code = run_suite(args.preset, json_path, args.only, args.keyword, args.device,
                         args.threads)
        if not json_path.exists():
            print(f"pytest wrote no benchmark JSON (exit code {code})", file=sys.stderr)
            return code or 1
        render(json_path, args.out)
    if code != 0:
        print(f"pytest exit code {code}: some benchmark failed or disagreed with the reference; "
              "see above (failed cases are missing or marked in results.md)", file=sys.stderr)
    return code


if __name__ == "__main__":
    PARSER = build_parser()
    try:
        sys.exit(main(PARSER.parse_args()))
    except RenderError as error:  # one line, prefixed as the parser's own errors are
        PARSER.exit(1, f"{PARSER.prog}: error: {error}\n")
