"""``fastkd bench --render`` and ``benchmarks/run.py --render`` with a file that is not a
pytest-benchmark JSON written by ``benchmarks/run.py``: one error line naming the file and what
was expected (exit 1, no traceback), and nothing written to ``--out``."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastkd.cli import main

REPO_ROOT = Path(__file__).resolve().parent.parent
EXPECTED = "a pytest-benchmark JSON written by benchmarks/run.py"


def _environment() -> dict:
    """A complete environment record, as the suite's conftest stores it."""
    sys.path.insert(0, str(REPO_ROOT))
    from benchmarks import env as bench_env
    env = bench_env.capture_environment(measure_cpu_bandwidth=False)
    return {**env, "bench_device": "cpu", "peak_bandwidth_gbps": 1.0}


def _write(path: Path, content) -> Path:
    """``content`` into ``path``: bytes or text as given, anything else as JSON."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


# each maker returns the --render argument; then the words the error must contain
RENDER_INPUTS = {
    "missing": (lambda tmp: tmp / "missing.json", ["no such file"]),
    "directory": (lambda tmp: tmp, ["a directory, not a file"]),
    "not-json": (lambda tmp: _write(tmp / "bad.json", "{\"fastkd\": "), ["not JSON"]),
    "binary": (lambda tmp: _write(tmp / "bin.json", b"\xff\xfe\x00{"), ["not JSON"]),
    "json-list": (lambda tmp: _write(tmp / "list.json", [1, 2]),
                  ["the JSON is a list, not an object"]),
    "no-environment": (lambda tmp: _write(tmp / "empty.json", {}),
                       ["no fastkd environment"]),
    "empty-environment": (lambda tmp: _write(tmp / "env.json", {"fastkd": {"environment": {}}}),
                          ["'bench_device'"]),
    "environment-not-an-object": (lambda tmp: _write(tmp / "env.json",
                                                     {"fastkd": {"environment": [1]}}),
                                  ["fastkd.environment"]),
    "benchmark-without-stats": (lambda tmp: _write(tmp / "bench.json", {
        "fastkd": {"environment": _environment()}, "benchmarks": [{"name": "x"}]}),
        ["'stats'"]),
}


@pytest.mark.parametrize("kind", list(RENDER_INPUTS))
def test_render_refuses_a_file_that_is_not_a_benchmark_json(kind, tmp_path, capsys):
    make, words = RENDER_INPUTS[kind]
    (tmp_path / "in").mkdir()
    source = make(tmp_path / "in")
    out = tmp_path / "out"
    status = main(["bench", "--render", str(source), "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 1, err
    assert "Traceback" not in err and err.startswith("fastkd: error: "), err
    assert err.count("\n") == 1, err
    for word in [f"--render {source}", EXPECTED] + words:
        assert word in err, (word, err)
    assert not out.exists()


def test_render_of_a_complete_json_writes_the_results(tmp_path, capsys):
    """The checks refuse nothing a benchmark run writes (here: a run with no benchmark rows)."""
    source = _write(tmp_path / "pytest-benchmark.json",
                    {"fastkd": {"environment": _environment(), "preset": "smoke"},
                     "benchmarks": []})
    out = tmp_path / "out"
    assert main(["bench", "--render", str(source), "--out", str(out)]) == 0, \
        capsys.readouterr().err
    assert {"pytest-benchmark.json", "results.json", "results.md"} <= {
        path.name for path in out.iterdir()}


def test_run_script_render_error_uses_its_own_prefix(tmp_path):
    """benchmarks/run.py run as a script: the same line, prefixed as its argparse errors are."""
    source = _write(tmp_path / "list.json", [])
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "benchmarks/run.py", "--render", str(source),
                             "--out", str(out)], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("run.py: error: --render "), result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert EXPECTED in result.stderr and not out.exists()
