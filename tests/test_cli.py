"""The ``fastkd`` command line's start-up cost: a sub-command's argument error and its ``--help``
are answered without importing torch, and the names users import from the lazily loaded
modules still work."""
import json
import subprocess
import sys
import textwrap

import pytest

# Runs every argv in one fresh interpreter (one subprocess for the whole table): after each one,
# the exit status, whether torch got imported, and what was written to stderr.
PROBE = textwrap.dedent("""
    import contextlib, io, json, sys
    from fastkd.cli import main
    results = []
    for argv in json.loads(sys.argv[1]):
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exit:
                code = exit.code
        results.append({"code": code, "torch": "torch" in sys.modules,
                        "stderr": err.getvalue()})
    print(json.dumps(results))
""")

# argv -> words the error message must contain (the missing or unknown argument)
ARGUMENT_ERRORS = [
    (["cache"], ["fastkd cache: error", "--teacher", "--dataset", "--out"]),
    (["cache", "--teacher", "m:t", "--dataset", "digits"], ["fastkd cache: error", "--out"]),
    (["cache", "--teacher", "m:t", "--dataset", "digits", "--out", "x", "--top-k", "2",
      "--sample", "2"], ["not allowed with argument --top-k"]),
    (["cache", "--teacher", "m:t", "--dataset", "digits", "--out", "x", "--dtype", "fp8"],
     ["--dtype", "invalid choice", "'fp8'"]),
    (["import", "--bogus"], ["fastkd import: error", "FILE.jsonl", "--from", "--top-k"]),
    (["import", "a.jsonl", "--from", "vllm", "--out", "x", "--vocab-size", "9", "--top-k", "5",
      "--bogus"], ["unrecognized arguments: --bogus"]),
    (["import", "a.jsonl", "--from", "vllm", "--out", "x", "--top-k", "5"],
     ["fastkd import: error", "--vocab-size"]),
    (["import", "a.jsonl", "--from", "sglang", "--out", "x", "--vocab-size", "9", "--top-k", "5"],
     ["--from", "invalid choice", "'sglang'"]),
    (["verify"], ["fastkd verify: error", "DIR"]),
    (["info", "--bogus"], ["fastkd info: error", "DIR"]),
    (["info", "some-dir", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["info"], ["fastkd info: error", "DIR"]),
    (["demo", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["demo", "--epochs", "many"], ["--epochs", "invalid int value", "'many'"]),
    (["bench", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["bench", "--preset", "huge"], ["--preset", "invalid choice", "'huge'"]),
]


def _probe(argvs):
    result = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argvs)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_sub_command_argument_errors_do_not_import_torch():
    """Each mistake exits with status 2 and names the argument; torch is never imported (in one
    process, so a later case would also see an import made by an earlier one)."""
    results = _probe([argv for argv, _ in ARGUMENT_ERRORS])
    for (argv, words), result in zip(ARGUMENT_ERRORS, results):
        assert result["code"] == 2, (argv, result)
        assert result["torch"] is False, (argv, result)
        assert "Traceback" not in result["stderr"], (argv, result["stderr"])
        for word in words:
            assert word in result["stderr"], (argv, word, result["stderr"])


def test_sub_command_help_does_not_import_torch():
    argvs = [[command, "--help"] for command in ("cache", "verify", "info", "import", "demo",
                                                 "bench")]
    results = _probe(argvs)
    assert [result["code"] for result in results] == [0] * len(argvs)
    assert not any(result["torch"] for result in results), results


@pytest.mark.parametrize("command", ["cache", "verify", "info", "import", "demo"])
def test_sub_command_help_text(command, capsys):
    from fastkd.cli import main
    with pytest.raises(SystemExit) as exit:
        main([command, "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: fastkd {command}")
    if command == "demo":  # the step-by-step description of the job
        assert "Cache its logits over the training split" in out


def test_names_behind_the_lazy_modules_still_import():
    """``fastkd.cache`` loads its public names on first use; they are the real objects."""
    import fastkd.cache
    from fastkd.cache import (CacheError, CachedDataset, LogitCache, TopKLogits, collate_padded,
                              resolve_device, write_cache)
    from fastkd.cache import manifest, reader, writer
    from fastkd.demo import run_demo  # noqa: F401
    from fastkd.demo_cli import add_parser  # noqa: F401
    from fastkd.targets import TopKLogits as target_top_k
    assert CacheError is manifest.CacheError and issubclass(CacheError, ValueError)
    assert LogitCache is reader.LogitCache and CachedDataset is reader.CachedDataset
    assert collate_padded is reader.collate_padded and TopKLogits is target_top_k
    assert write_cache is writer.write_cache and resolve_device is writer.resolve_device
    assert set(fastkd.cache.__all__) <= set(dir(fastkd.cache))
    with pytest.raises(AttributeError, match="no_such_name"):
        fastkd.cache.no_such_name  # noqa: B018


def test_bench_preset_choices_are_the_presets():
    """benchmarks/run.py lists the preset names without importing benchmarks.presets (torch)."""
    from benchmarks.presets import PRESETS
    from benchmarks.run import PRESET_NAMES
    assert sorted(PRESET_NAMES) == sorted(PRESETS)
