"""The house rules that a reader relies on, checked on the source: kernel code imports nothing
from the API layer (only other kernels)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _imported_modules(path):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_kernels_import_nothing_from_the_api_layer():
    folder = os.path.join(ROOT, "kernels")
    offending = [f"{name}: {module}" for name in sorted(os.listdir(folder))
                 if name.endswith(".py")
                 for module in _imported_modules(os.path.join(folder, name))
                 if (module == "fastkd" or module.startswith("fastkd."))
                 and not module.startswith("fastkd.kernels")]
    assert not offending, offending
