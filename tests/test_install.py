"""Installing and running fastkd the way users do: what the wheel ships, a non-editable install
used from the repository root, no shadowing of another distribution's top-level ``kernels``
package, and the core without the optional extras."""
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_IGNORE = shutil.ignore_patterns("*.so", ".git", ".venv", "build", "*.egg-info",
                                       "__pycache__", ".benchmarks", ".whl", ".pytest_cache")
OPTIONAL = ("sklearn", "torchvision", "pynvml", "transformers", "datasets", "accelerate",
            "pyarrow", "matplotlib", "pytest_benchmark")


def _run(args, cwd, env=None, timeout=300):
    return subprocess.run(args, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """fastkd built into a wheel and installed with --target: (wheel file names, target dir)."""
    base = tmp_path_factory.mktemp("wheel")
    wheel_dir, target = base / "wheel", base / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheel_dir), ROOT], check=True, capture_output=True)
    (built,) = wheel_dir.glob("fastkd-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(built)], check=True, capture_output=True)
    return zipfile.ZipFile(built).namelist(), target


def _has_c_compiler() -> bool:
    return any(shutil.which(name) for name in ("cc", "gcc", "clang"))


# ----------------------------------------------------------------------------- the wheel
def test_wheel_ships_and_imports_kernels(wheel, tmp_path):
    """A built wheel contains fastkd/kernels/ (with the compiled CPU kernel where a C compiler
    is) and no top-level package but fastkd; `import fastkd.kernels` works from it, the kernel
    loading from the wheel too."""
    names, target = wheel
    assert "fastkd/kernels/kd_loss.py" in names
    assert "fastkd/kernels/kd_sparse.py" in names
    tops = {name.split("/")[0] for name in names if "/" in name}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"fastkd"}, tops
    probe = ("import fastkd, fastkd.kernels.kd_loss as k; "
             "print(fastkd.__file__); print(k.__file__)")
    if _has_c_compiler():   # the CPU kernel is built
        for library in ("_kd_loss_cpu", "_kd_sparse_cpu"):
            assert any(name.startswith(f"fastkd/kernels/{library}") and name.endswith(".so")
                       for name in names), (library, names)
        probe += ("; from fastkd.kernels import kd_loss_cpu as c, kd_sparse_cpu as s; "
                  "print(c.library_path()); print(s.library_path())")
    result = _run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target)})
    assert result.returncode == 0, result.stderr
    for line in result.stdout.split():
        assert line.startswith(str(target)), result.stdout


@pytest.mark.parametrize("name", ["kd_loss_cpu", "kd_sparse_cpu"])
def test_cpu_kernels_built_where_a_compiler_is(name):
    """Neither compiled CPU kernel is silently missing: where a C compiler exists the install
    built it (the build skips a kernel that fails to compile, with only a warning)."""
    if not _has_c_compiler():
        pytest.skip("no C compiler on this machine")
    import importlib
    kernel = importlib.import_module(f"fastkd.kernels.{name}")
    assert kernel.available(), kernel.unavailable_reason()


def test_wheel_without_a_c_compiler_falls_back(tmp_path):
    """Where the C compiler fails, the wheel still builds (the CPU kernel is an optional
    extension), and an install of it computes kd_loss on PyTorch ops, saying why."""
    source, wheel_dir, target = tmp_path / "source", tmp_path / "wheel", tmp_path / "site"
    # the sources alone: an editable install leaves its library in kernels/
    shutil.copytree(ROOT, source, ignore=SOURCE_IGNORE)
    env = {**os.environ, "CC": "/bin/false"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheel_dir), str(source)], check=True, capture_output=True,
                   env=env)
    (wheel_file,) = wheel_dir.glob("fastkd-*.whl")
    assert not any(name.endswith(".so") for name in zipfile.ZipFile(wheel_file).namelist())
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel_file)], check=True, capture_output=True)
    probe = ("import torch, fastkd; from fastkd.kernels import kd_loss_cpu as c; "
             "assert not c.available(), c.library_path(); print(c.unavailable_reason()); "
             "s = torch.randn(4, 10, requires_grad=True); "
             "fastkd.kd_loss(s, torch.randn(4, 10), torch.tensor([1, 2, 3, 4])).backward(); "
             "print(fastkd.__file__, bool(torch.isfinite(s.grad).all()))")
    result = _run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target)})
    assert result.returncode == 0, result.stderr
    reason, location = result.stdout.strip().splitlines()
    assert "not built at install time" in reason
    assert location.startswith(str(target)) and location.endswith("True")


def test_non_editable_install_used_from_the_repository_root(wheel, tmp_path):
    """`pip install .` then Python run from the checkout: `fastkd` is the checkout's package
    (the current directory comes first on sys.path), its kernels are the checkout's too, and the
    compiled CPU kernel is found in the installed copy (the checkout has none)."""
    _, target = wheel
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT, checkout, ignore=SOURCE_IGNORE)
    probe = ("import torch, fastkd, fastkd.kernels.kd_loss as k, fastkd.kernels.kd_sparse; "
             "from fastkd.kernels import kd_loss_cpu as c; "
             "s = torch.randn(4, 10, requires_grad=True); "
             "fastkd.kd_loss(s, torch.randn(4, 10), torch.tensor([1, 2, 3, 4])).backward(); "
             "print(fastkd.__file__); print(k.__file__); print(c.library_path())")
    env = {"PYTHONPATH": str(target)}
    result = _run([sys.executable, "-c", probe], cwd=checkout, env=env)
    assert result.returncode == 0, result.stderr
    package, kernel, library = result.stdout.split()
    assert package == str(checkout / "fastkd" / "__init__.py")
    assert kernel == str(checkout / "kernels" / "kd_loss.py")
    if _has_c_compiler():
        assert library.startswith(str(target / "fastkd" / "kernels")), library
    result = _run([sys.executable, "-m", "fastkd", "--version"], cwd=checkout, env=env)
    assert result.returncode == 0 and result.stdout.startswith("fastkd "), result.stderr


# ------------------------------------------------- another distribution's top-level `kernels`
STAND_IN = '''\
"""A stand-in for another distribution's top-level `kernels` package (tests/test_install.py);
it also carries a tiny teacher and dataset for `fastkd cache --teacher kernels:teacher`."""
import torch

ORIGIN = "stand-in"
torch.manual_seed(0)
teacher = torch.nn.Linear(4, 3)
dataset = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,)))
'''

PROBE_TEST = '''\
import os
import kernels
import fastkd.kernels.kd_loss


def test_kernels_resolve():
    assert kernels.ORIGIN == "stand-in"
    assert fastkd.kernels.kd_loss.__file__ == os.path.join({root!r}, "kernels", "kd_loss.py")
'''


@pytest.fixture
def stand_in_kernels(tmp_path):
    """A directory holding an installed-looking `kernels` distribution (package + metadata)."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text(STAND_IN)
    (site / "kernels-9.9.9.dist-info").mkdir()
    (site / "kernels-9.9.9.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: kernels\nVersion: 9.9.9\n")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site),
                                                        os.environ.get("PYTHONPATH")]))}


def test_repository_root_does_not_shadow_an_installed_kernels_package(stand_in_kernels, tmp_path):
    """From the repository root (first on sys.path for `python -c`, `python -m`, torchrun),
    `import kernels` is the installed distribution and fastkd's own kernels are
    `fastkd.kernels`: for a script, `python -m pytest`, `python -m fastkd` and
    `torchrun -m fastkd`."""
    env = stand_in_kernels
    script = ("import kernels, fastkd.kernels.kd_loss as k; print(kernels.ORIGIN); "
              "print(k.__file__)")
    result = _run([sys.executable, "-c", script], cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["stand-in", os.path.join(ROOT, "kernels", "kd_loss.py")]

    probe = tmp_path / "probe" / "test_probe.py"
    probe.parent.mkdir()
    probe.write_text(PROBE_TEST.format(root=ROOT))
    result = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   "--rootdir", str(probe.parent), "-c", os.devnull, str(probe)],
                  cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout + result.stderr

    for launcher in ([sys.executable, "-m", "fastkd"],
                     [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
                      "-m", "fastkd"]):   # torchrun's own entry point
        out = tmp_path / f"cache-{len(launcher)}"
        result = _run(launcher + ["cache", "--teacher", "kernels:teacher", "--dataset",
                                  "kernels:dataset", "--out", str(out), "--quiet"],
                      cwd=ROOT, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert (out / "manifest.json").is_file()


# ----------------------------------------------------------------------------- extras
def test_core_imports_no_optional_package():
    """The losses, the cache and the command line import none of the extras' packages (beyond
    what torch imports by itself)."""
    code = textwrap.dedent(f"""
        import sys, torch
        before = set(sys.modules)   # torch itself imports pynvml where it is installed
        import fastkd, fastkd.loss, fastkd.linear, fastkd.targets, fastkd.cache, fastkd.cli
        import fastkd.tokens, fastkd.cache.commands, fastkd.cache.importer
        s = torch.randn(4, 10, requires_grad=True)
        fastkd.kd_loss(s, torch.randn(4, 10), torch.tensor([1, 2, 3, 4])).backward()
        print(sorted({{m.split(".")[0] for m in set(sys.modules) - before}} & set({OPTIONAL!r})))
    """)
    result = _run([sys.executable, "-c", code], cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("argv, extra, package", [
    (["demo", "--quick", "--quiet"], "demo", "scikit-learn"),
    (["cache", "--teacher", "torchvision:resnet18", "--dataset", "digits", "--out", "OUT"],
     "vision", "torchvision"),
    (["cache", "--teacher", "fastkd.models:DigitsStudentCNN", "--dataset",
      "torchvision:MNIST", "--data-root", ".", "--out", "OUT"], "vision", "torchvision"),
    (["cache", "--teacher", "fastkd.models:DigitsStudentCNN", "--dataset", "parquet:x.parquet",
      "--out", "OUT"], "hf", "pyarrow"),
])
def test_missing_extra_is_one_sentence_naming_it(tmp_path, argv, extra, package):
    """Without an extra's packages, the command that needs them ends in one line naming the
    extra to install (exit 1, no traceback)."""
    argv = [str(tmp_path / "out") if word == "OUT" else word for word in argv]
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    code = textwrap.dedent(f"""
        import sys
        for name in {OPTIONAL!r}:
            sys.modules[name] = None   # as if not installed
        from fastkd.cli import main
        sys.exit(main({argv!r}))
    """)
    result = _run([sys.executable, "-c", code], cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"needs the '{package}' package" in lines[0]
    assert f"pip install 'fastkd[{extra}]'" in lines[0]


def test_extras_in_pyproject():
    """Core dependencies are what the core imports; each extra that errors name exists."""
    tomllib = pytest.importorskip("tomllib")
    from fastkd.extras import EXTRAS
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        project = tomllib.load(handle)["project"]
    core = {requirement.split(">")[0].split(";")[0].strip()
            for requirement in project["dependencies"]}
    assert core == {"torch", "triton", "numpy", "tqdm"}
    assert set(EXTRAS) <= set(project["optional-dependencies"])
    assert "scikit-learn>=1.2" in project["optional-dependencies"]["demo"]
