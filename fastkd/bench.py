"""``fastkd bench``: the benchmark suite's ``benchmarks/run.py``, available from a source checkout
only (the suite is not part of the installed package)."""
import importlib.util
import sys
from pathlib import Path

_RUN_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"


def _load_run_module():
    sys.path.insert(0, str(_RUN_SCRIPT.parent.parent))
    spec = importlib.util.spec_from_file_location("benchmarks.run", _RUN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="run the benchmark suite (source checkout only)",
        description="Run the pytest-benchmark suite in benchmarks/ and write JSON, a markdown "
                    "table and plots under benchmarks/results/<device>/.")
    if not _RUN_SCRIPT.exists():
        parser.set_defaults(func=_no_checkout)
        return
    run = _load_run_module()
    run.build_parser(parser)
    parser.set_defaults(func=lambda args: _run(run, args))


def _run(run, args) -> int:
    """``benchmarks/run.py``'s main; a ``--render`` it cannot carry out (a file that is not its
    pytest-benchmark JSON, an unwritable ``--out``) is one ``fastkd: error:`` line, exit 1."""
    try:
        return run.main(args)
    except run.RenderError as error:
        from fastkd.cache.commands import fail
        return fail(str(error))


def _no_checkout(args) -> int:
    print(f"fastkd bench needs a source checkout of fastkd ({_RUN_SCRIPT} does not exist): "
          "git clone the repository, pip install -e . there, and run `fastkd bench` or "
          "`python benchmarks/run.py`", file=sys.stderr)
    return 2
